//! Pool capacity and usage, from the monitors' `df` (what `ceph df` prints).

use std::collections::BTreeMap;

use kiln_core::{BackendStats, Error, Result};
use serde_json::{Value, json};

use crate::cluster::Cluster;

/// Capacity of the backend's pool: `free` is the pool's `max_avail` (what can still be
/// stored, after replication and the full ratio), `total` is `stored + max_avail` — the
/// same figures Cinder's RBD driver reports.
pub fn pool_stats(c: &Cluster) -> Result<BackendStats> {
    let out = c.mon_command(&json!({"prefix": "df", "format": "json"}))?;
    let df: Value = serde_json::from_slice(&out)
        .map_err(|e| Error::backend("ceph df", format!("unparsable JSON from the monitor: {e}")))?;
    parse_df(&df, c.pool())
}

fn parse_df(df: &Value, pool: &str) -> Result<BackendStats> {
    let pool_stats = df["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
        .map(|p| &p["stats"])
        .ok_or_else(|| {
            Error::backend(
                "ceph df",
                format!("pool {pool:?} is missing from the report"),
            )
        })?;
    let num = |v: &Value, key: &str| v[key].as_u64();
    let stored = num(pool_stats, "stored").or_else(|| num(pool_stats, "bytes_used"));
    let max_avail = num(pool_stats, "max_avail");
    let mut details = BTreeMap::new();
    details.insert("pool".into(), json!(pool));
    for (key, value) in [
        ("pool_stored_bytes", stored),
        ("pool_used_raw_bytes", num(pool_stats, "bytes_used")),
        ("pool_objects", num(pool_stats, "objects")),
        ("pool_max_avail_bytes", max_avail),
        ("cluster_total_bytes", num(&df["stats"], "total_bytes")),
        (
            "cluster_avail_bytes",
            num(&df["stats"], "total_avail_bytes"),
        ),
    ] {
        if let Some(v) = value {
            details.insert(key.into(), json!(v));
        }
    }
    Ok(BackendStats {
        total_bytes: match (stored, max_avail) {
            (Some(s), Some(a)) => Some(s.saturating_add(a)),
            _ => None,
        },
        free_bytes: max_avail,
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_report_maps_to_pool_capacity() {
        let df = json!({
            "stats": {"total_bytes": 4294967296u64, "total_avail_bytes": 4294939393u64},
            "pools": [
                {"name": "other", "stats": {"stored": 1, "max_avail": 2}},
                {"name": "rbd", "stats": {"stored": 100, "objects": 3, "bytes_used": 300, "max_avail": 4000}}
            ]
        });
        let s = parse_df(&df, "rbd").unwrap();
        assert_eq!(s.total_bytes, Some(4100));
        assert_eq!(s.free_bytes, Some(4000));
        assert_eq!(s.details["pool_used_raw_bytes"], json!(300));
        assert_eq!(s.details["cluster_total_bytes"], json!(4294967296u64));
        assert!(parse_df(&df, "missing").is_err());
    }
}
