//! Request bodies, read and checked by hand so every refusal is Cinder's 400 with a
//! message that names the field (axum's own JSON rejection answers 422 in another shape).

use axum::body::Bytes;
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// Largest request body: kiln's requests are small; anything bigger is refused unread.
pub const MAX_BODY: usize = 256 * 1024;

/// A JSON object body.
pub fn object(bytes: &Bytes) -> ApiResult<Map<String, Value>> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "The request body is empty; a JSON object is required.",
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "Malformed request body: {e}"
        ))),
    }
}

/// The object under `key` of a body (`{"volume": {...}}`); other top-level keys must be
/// in `also_allowed`.
pub fn wrapped(bytes: &Bytes, key: &str, also_allowed: &[&str]) -> ApiResult<Map<String, Value>> {
    let mut body = object(bytes)?;
    only_keys(&body, &[&[key], also_allowed].concat(), "request body")?;
    match body.remove(key) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(ApiError::bad_request(format!(
            "Invalid input: '{key}' must be an object."
        ))),
        None => Err(ApiError::bad_request(format!(
            "Missing required element '{key}' in request body."
        ))),
    }
}

/// Refuses keys not in `allowed` (Cinder's `additionalProperties: false`).
pub fn only_keys(m: &Map<String, Value>, allowed: &[&str], what: &str) -> ApiResult<()> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(format!(
            "Invalid input for {what}: additional property {k:?} is not allowed."
        ))),
        None => Ok(()),
    }
}

/// An optional string field (`null` = absent).
pub fn opt_str(m: &Map<String, Value>, key: &str) -> ApiResult<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!(
            "Invalid input for field '{key}': it must be a string."
        ))),
    }
}

/// A required string field.
pub fn req_str(m: &Map<String, Value>, key: &str) -> ApiResult<String> {
    opt_str(m, key)?
        .ok_or_else(|| ApiError::bad_request(format!("'{key}' is a required property.")))
}

/// A label: `name`, else its old spelling `display_name`; whitespace around it dropped, as
/// Cinder does; an empty label is none.
pub fn label(m: &Map<String, Value>, key: &str, old: &str) -> ApiResult<Option<String>> {
    let v = match opt_str(m, key)? {
        Some(v) => Some(v),
        None => opt_str(m, old)?,
    };
    Ok(v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
}

/// An optional positive integer, given as a number or a string of digits (Cinder accepts
/// both for sizes).
pub fn opt_uint(m: &Map<String, Value>, key: &str) -> ApiResult<Option<u64>> {
    let bad = || {
        ApiError::bad_request(format!(
            "Invalid input for field '{key}': it must be a positive integer."
        ))
    };
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().filter(|n| *n > 0).map(Some).ok_or_else(bad),
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

/// A boolean as Cinder accepts it: JSON `true`/`false` or the strings of oslo's strict
/// `bool_from_string` (`true`, `yes`, `1`, `on`, `t`, `y` and their negatives).
pub fn opt_bool(m: &Map<String, Value>, key: &str) -> ApiResult<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "on" | "t" | "y" => Ok(Some(true)),
            "false" | "no" | "0" | "off" | "f" | "n" => Ok(Some(false)),
            _ => Err(ApiError::bad_request(format!(
                "Invalid value {s:?} for '{key}': it must be a boolean."
            ))),
        },
        Some(_) => Err(ApiError::bad_request(format!(
            "Invalid value for '{key}': it must be a boolean."
        ))),
    }
}

/// A string map (`metadata`): values must be strings, as in Cinder.
pub fn opt_metadata(
    m: &Map<String, Value>,
    key: &str,
) -> ApiResult<Option<std::collections::BTreeMap<String, String>>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(ApiError::bad_request(format!(
                    "Invalid input for field '{key}': the value of {k:?} must be a string."
                ))),
            })
            .collect::<ApiResult<_>>()
            .map(Some),
        Some(_) => Err(ApiError::bad_request(format!(
            "Invalid input for field '{key}': it must be an object."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn fields_are_typed_as_cinder_types_them() {
        assert!(object(&Bytes::from_static(b"")).is_err());
        assert!(object(&Bytes::from_static(b"[1]")).is_err());
        assert!(object(&Bytes::from_static(b"{\"a\":")).is_err());
        assert!(
            wrapped(
                &Bytes::from_static(b"{\"volume\":{},\"x\":1}"),
                "volume",
                &[]
            )
            .is_err()
        );
        assert!(wrapped(&Bytes::from_static(b"{\"volume\":1}"), "volume", &[]).is_err());
        assert!(wrapped(&Bytes::from_static(b"{}"), "volume", &[]).is_err());
        let b = m(
            r#"{"size": "2", "s": 3, "z": 0, "neg": -1, "f": 1.5, "force": "True", "bad": "maybe", "md": {"a": "b"}, "mdbad": {"a": 1}, "name": "  x  ", "display_name": "y"}"#,
        );
        assert_eq!(opt_uint(&b, "size").ok(), Some(Some(2)));
        assert!(opt_uint(&b, "s").is_ok());
        for k in ["z", "neg", "f", "force"] {
            assert!(opt_uint(&b, k).is_err(), "{k}");
        }
        assert_eq!(opt_bool(&b, "force").ok(), Some(Some(true)));
        assert!(opt_bool(&b, "bad").is_err());
        assert!(opt_bool(&b, "s").is_err());
        assert_eq!(opt_bool(&b, "absent").ok(), Some(None));
        assert_eq!(
            opt_metadata(&b, "md").ok().flatten().map(|m| m.len()),
            Some(1)
        );
        assert!(opt_metadata(&b, "mdbad").is_err());
        assert_eq!(
            label(&b, "name", "display_name").ok().flatten().as_deref(),
            Some("x")
        );
        assert_eq!(
            label(&b, "nope", "display_name").ok().flatten().as_deref(),
            Some("y")
        );
        assert!(opt_str(&b, "s").is_err());
        assert!(only_keys(&b, &["size"], "volume").is_err());
    }
}
