//! `GET /v3/limits`: the caller's project's quotas and what it uses, as Cinder reports them
//! (`-1` = unlimited).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::context::Req;
use crate::error::ApiResult;
use crate::state::Shared;

/// `GET /limits`.
pub async fn show(State(st): State<Shared>, req: Req) -> ApiResult<Json<Value>> {
    let usage = st.service.store().usage(req.caller.project.clone()).await?;
    let q = st.config.quotas;
    let max = |v: Option<u64>| v.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let gib = i64::try_from(usage.bytes.div_ceil(crate::views::GIB)).unwrap_or(i64::MAX);
    Ok(Json(json!({"limits": {
        "rate": [],
        "absolute": {
            "maxTotalVolumes": max(q.volumes),
            "maxTotalSnapshots": max(q.snapshots),
            "maxTotalVolumeGigabytes": max(q.gigabytes),
            "maxTotalBackups": -1,
            "maxTotalBackupGigabytes": -1,
            "totalVolumesUsed": usage.volumes,
            "totalSnapshotsUsed": usage.snapshots,
            "totalGigabytesUsed": gib,
            "totalBackupsUsed": 0,
            "totalBackupGigabytesUsed": 0,
        }
    }})))
}
