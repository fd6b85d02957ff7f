//! `/v3/snapshots`: create (with Cinder's `force` rules), list, show, update, delete,
//! metadata and `os-reset_status`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_core::SnapshotStatus;
use kiln_core::attrs::ObjectKind;
use serde_json::{Value, json};

use crate::body;
use crate::context::Req;
use crate::error::{ApiError, ApiResult};
use crate::listing::{ListQuery, page};
use crate::state::{Shared, listed};
use crate::views;
use crate::volumes::{param, require_admin};

const CREATE_KEYS: &[&str] = &[
    "volume_id",
    "force",
    "name",
    "display_name",
    "description",
    "display_description",
    "metadata",
];

/// Whether a snapshot may be taken of an attached volume, from the request's `force` and
/// microversion. From 3.66 on, Cinder snapshots attached volumes without `force` and
/// refuses `force: false`. Before 3.66 Cinder reads a missing `force` as false; kiln reads
/// it as true, because openstackclient omits `force` (even with `--force`) when the server
/// supports 3.66 while it sends the request at 3.65. An explicit `false` refuses, as in
/// Cinder.
pub fn force_allowed(
    force: Option<bool>,
    version: crate::microversion::Version,
) -> ApiResult<bool> {
    match force {
        Some(false) if version.at_least(3, 66) => Err(ApiError::bad_request(
            "Since microversion 3.66 'force' may only be true or absent: attached volumes are snapshotted without it.",
        )),
        Some(f) => Ok(f),
        None => Ok(true),
    }
}

/// `POST /snapshots`: 202 with the new snapshot, made.
pub async fn create(State(st): State<Shared>, req: Req, bytes: Bytes) -> ApiResult<Response> {
    let b = body::wrapped(&bytes, "snapshot", &[])?;
    body::only_keys(&b, CREATE_KEYS, "snapshot")?;
    let force = force_allowed(body::opt_bool(&b, "force")?, req.version)?;
    let (v, _) = st.volume(&req, &body::req_str(&b, "volume_id")?).await?;
    let mut owner = st.owner(&req.caller);
    owner.attrs.description = body::label(&b, "description", "display_description")?;
    owner.attrs.properties = body::opt_metadata(&b, "metadata")?.unwrap_or_default();
    owner.attrs.validate()?;
    let name = body::label(&b, "name", "display_name")?;
    // A snapshot takes milliseconds on every backend, so it is answered when made: the
    // answer says `available`, and a backend's refusal (an attached qcow2 volume without a
    // hypervisor monitor) is the answer instead of a snapshot that vanishes.
    let snap = st
        .service
        .create_snapshot_owned(v.id, name, force, &owner)
        .await?;
    let attrs = st.service.attrs(snap.id.to_string()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"snapshot": views::snapshot(&req, &snap, &attrs, true)})),
    )
        .into_response())
}

async fn list(st: &Shared, req: &Req, q: &ListQuery, detail: bool) -> ApiResult<Json<Value>> {
    let attrs = st.all_attrs(ObjectKind::Snapshot).await?;
    let rows = crate::listing::with_attrs(
        st.service.snapshots(None).await?,
        &attrs,
        |s| (s.created_at, s.id),
        |s, a| {
            listed(&req.caller, a, q.all_tenants())
                && q.name.as_ref().is_none_or(|n| s.name.as_ref() == Some(n))
                && q.status.as_ref().is_none_or(|x| s.status.as_str() == x)
                && q.volume_id
                    .as_ref()
                    .is_none_or(|x| s.volume_id.to_string() == *x)
        },
    );
    let (rows, next) = page(rows, q, |(s, _)| s.id.to_string())?;
    let items: Vec<Value> = rows
        .iter()
        .map(|(s, a)| views::snapshot(req, s, a, detail))
        .collect();
    let mut out = json!({"snapshots": items});
    if let Some(marker) = next {
        let path = if detail {
            "snapshots/detail"
        } else {
            "snapshots"
        };
        out["snapshots_links"] = json!([{"rel": "next", "href": q.next_href(req, path, &marker)}]);
    }
    Ok(Json(out))
}

/// `GET /snapshots`.
pub async fn index(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, false).await
}

/// `GET /snapshots/detail`.
pub async fn detail(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, true).await
}

/// `GET /snapshots/{id}`.
pub async fn show(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (s, a) = st.snapshot(&req, param(&p, "id")?).await?;
    Ok(Json(
        json!({"snapshot": views::snapshot(&req, &s, &a, true)}),
    ))
}

/// `PUT /snapshots/{id}`: name and description.
pub async fn update(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let id = param(&p, "id")?;
    let b = body::wrapped(&bytes, "snapshot", &[])?;
    body::only_keys(
        &b,
        &["name", "display_name", "description", "display_description"],
        "snapshot",
    )?;
    if b.is_empty() {
        return Err(ApiError::bad_request(
            "Invalid input: 'snapshot' names nothing to update.",
        ));
    }
    let (mut s, mut a) = st.snapshot(&req, id).await?;
    let description = (b.contains_key("description") || b.contains_key("display_description"))
        .then(|| body::label(&b, "description", "display_description"))
        .transpose()?;
    if let Some(d) = &description {
        let mut check = a.clone();
        check.description.clone_from(d);
        check.validate()?;
    }
    if b.contains_key("name") || b.contains_key("display_name") {
        let name = body::label(&b, "name", "display_name")?;
        if let Some(n) = &name {
            kiln_core::validate::validate_label(n)?;
        }
        s = st.service.rename_snapshot(s.id, name).await?;
    }
    if let Some(d) = description {
        a = st
            .service
            .update_attrs(ObjectKind::Snapshot, id.to_string(), |x| {
                x.description.clone_from(&d);
                Ok(())
            })
            .await?;
    }
    Ok(Json(
        json!({"snapshot": views::snapshot(&req, &s, &a, true)}),
    ))
}

/// `DELETE /snapshots/{id}`: 202; the snapshot answers 404 once it is gone.
pub async fn delete(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let (s, _) = st.snapshot(&req, param(&p, "id")?).await?;
    let svc = st.service.clone();
    st.launch(async move { svc.delete_snapshot(s.id, false).await })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /snapshots/{id}/action`: `os-reset_status` (admin).
pub async fn action(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let b = body::object(&bytes)?;
    let (s, _) = st.snapshot(&req, param(&p, "id")?).await?;
    match b.iter().next() {
        Some((name, Value::Object(arg))) if b.len() == 1 && name == "os-reset_status" => {
            require_admin(&req, name)?;
            body::only_keys(arg, &["status"], name)?;
            let status: SnapshotStatus = body::req_str(arg, "status")?.parse()?;
            let reason = format!(
                "os-reset_status by {}",
                req.caller.user.as_deref().unwrap_or("admin")
            );
            st.service
                .reset_snapshot_state(s.id, status, Some(reason))
                .await?;
            Ok(StatusCode::ACCEPTED)
        }
        Some((name, _)) if b.len() == 1 => Err(ApiError::bad_request(format!(
            "There is no such action: {name}"
        ))),
        _ => Err(ApiError::bad_request(
            "An action body names exactly one action.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microversion::Version;

    #[test]
    fn force_follows_the_microversion() {
        let v = Version::new;
        assert_eq!(force_allowed(None, v(3, 0)).ok(), Some(true));
        assert_eq!(force_allowed(Some(false), v(3, 65)).ok(), Some(false));
        assert_eq!(force_allowed(Some(true), v(3, 0)).ok(), Some(true));
        assert_eq!(force_allowed(None, v(3, 66)).ok(), Some(true));
        assert_eq!(force_allowed(Some(true), v(3, 66)).ok(), Some(true));
        assert!(force_allowed(Some(false), v(3, 66)).is_err());
    }
}
