//! Query parameters of list requests and Cinder's `limit`/`marker` paging.

use std::collections::BTreeMap;

use kiln_core::attrs::ObjectAttrs;
use serde::Deserialize;

use crate::context::Req;
use crate::error::{ApiError, ApiResult};

/// Most items one page holds (Cinder's `osapi_max_limit`).
pub const MAX_LIMIT: usize = 1000;

/// What list requests understand; other parameters are ignored, as Cinder ignores
/// filters it does not know.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Only objects with this name.
    pub name: Option<String>,
    /// Only objects in this status.
    pub status: Option<String>,
    /// Only snapshots of this volume.
    pub volume_id: Option<String>,
    /// Most items on the page.
    pub limit: Option<String>,
    /// The last id of the previous page.
    pub marker: Option<String>,
    /// Admins: every project's objects.
    pub all_tenants: Option<String>,
}

impl ListQuery {
    /// Whether `all_tenants` asks for every project (any value but a false one).
    pub fn all_tenants(&self) -> bool {
        self.all_tenants.as_deref().is_some_and(|v| {
            !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "false" | "no" | "off"
            )
        })
    }

    fn limit(&self) -> ApiResult<usize> {
        match &self.limit {
            None => Ok(MAX_LIMIT),
            Some(l) => match l.parse::<usize>() {
                Ok(n) => Ok(n.min(MAX_LIMIT)),
                Err(_) => Err(ApiError::bad_request(format!(
                    "limit must be a non-negative integer, got {l:?}"
                ))),
            },
        }
    }

    /// The `next` link of a page that ended at `marker`.
    pub fn next_href(&self, req: &Req, path: &str, marker: &str) -> String {
        let mut q = vec![format!("marker={marker}")];
        if let Some(l) = &self.limit {
            q.push(format!("limit={}", urlencode(l)));
        }
        for (k, v) in [
            ("name", &self.name),
            ("status", &self.status),
            ("volume_id", &self.volume_id),
            ("all_tenants", &self.all_tenants),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", urlencode(v)));
            }
        }
        format!(
            "{}/v3/{}/{path}?{}",
            req.base_url,
            req.caller.project,
            q.join("&")
        )
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One page of `rows` (already filtered and sorted): the rows after `marker`, at most
/// `limit`, and the marker of the next page when the page is full (Cinder's rule). An
/// unknown marker is 400, as in Cinder.
pub fn page<T>(
    rows: Vec<T>,
    q: &ListQuery,
    id: impl Fn(&T) -> String,
) -> ApiResult<(Vec<T>, Option<String>)> {
    let limit = q.limit()?;
    let start = match &q.marker {
        None => 0,
        Some(m) => rows
            .iter()
            .position(|r| &id(r) == m)
            .map(|i| i + 1)
            .ok_or_else(|| ApiError::bad_request(format!("Marker {m} could not be found.")))?,
    };
    let mut page: Vec<T> = rows.into_iter().skip(start).take(limit).collect();
    let next = (q.limit.is_some() && page.len() == limit && limit > 0)
        .then(|| page.last().map(&id))
        .flatten();
    page.shrink_to_fit();
    Ok((page, next))
}

/// An object kiln keeps attributes for, by id.
pub trait Keyed {
    /// Its id, as the attributes are keyed.
    fn key(&self) -> String;
}

macro_rules! keyed {
    ($($t:ty),*) => {$(
        impl Keyed for $t {
            fn key(&self) -> String {
                self.id.to_string()
            }
        }
    )*};
}
keyed!(
    kiln_core::Volume,
    kiln_core::Snapshot,
    kiln_core::Instance,
    kiln_core::Image
);

/// Pairs each object with its attributes (none recorded: the default project's), keeps
/// those `keep` accepts, and sorts them newest first by `order` — Cinder's default order.
pub fn with_attrs<T: Keyed, K: Ord>(
    objects: Vec<T>,
    attrs: &BTreeMap<String, ObjectAttrs>,
    order: impl Fn(&T) -> K,
    keep: impl Fn(&T, &ObjectAttrs) -> bool,
) -> Vec<(T, ObjectAttrs)> {
    let mut rows: Vec<(T, ObjectAttrs)> = objects
        .into_iter()
        .map(|o| {
            let a = attrs.get(&o.key()).cloned().unwrap_or_default();
            (o, a)
        })
        .filter(|(o, a)| keep(o, a))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(order(&r.0)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_markers() {
        let rows: Vec<u32> = (0..5).collect();
        let q = |limit: Option<&str>, marker: Option<&str>| ListQuery {
            limit: limit.map(str::to_string),
            marker: marker.map(str::to_string),
            ..ListQuery::default()
        };
        let id = |r: &u32| r.to_string();
        assert_eq!(
            page(rows.clone(), &q(None, None), id).ok(),
            Some((rows.clone(), None))
        );
        assert_eq!(
            page(rows.clone(), &q(Some("2"), None), id).ok(),
            Some((vec![0, 1], Some("1".into())))
        );
        assert_eq!(
            page(rows.clone(), &q(Some("2"), Some("1")), id).ok(),
            Some((vec![2, 3], Some("3".into())))
        );
        assert_eq!(
            page(rows.clone(), &q(Some("2"), Some("3")), id).ok(),
            Some((vec![4], None))
        );
        assert!(page(rows.clone(), &q(Some("x"), None), id).is_err());
        assert!(page(rows.clone(), &q(None, Some("9")), id).is_err());
        assert!(
            ListQuery {
                all_tenants: Some("1".into()),
                ..ListQuery::default()
            }
            .all_tenants()
        );
        assert!(
            !ListQuery {
                all_tenants: Some("False".into()),
                ..ListQuery::default()
            }
            .all_tenants()
        );
        assert_eq!(urlencode("a b/&"), "a%20b%2F%26");
    }
}
