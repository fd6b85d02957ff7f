//! Create an empty volume — and what every volume creation shares with a clone: the new
//! record, the finish on success, the cleanup on failure, and the recovery rule (a volume
//! has no point in time: an interrupted creation is redone from scratch).

use std::sync::Arc;

use chrono::Utc;

use super::{Ctx, conflict_error};
use crate::attrs::{ObjectKind, Owner};
use crate::driver::VolumeDriver;
use crate::error::{Error, Result};
use crate::progress::no_progress;
use crate::store::{NewOp, OpId, Operation, Step};
use crate::types::{ProviderUpdate, Volume, VolumeId, VolumeStatus};
use crate::validate::check_size;

/// Journal kind.
pub(crate) const KIND: &str = "create_volume";

/// A new volume record in `creating`.
pub(crate) fn new_record(
    size_bytes: u64,
    backend: String,
    name: Option<String>,
    source: Option<crate::types::SnapshotId>,
) -> Volume {
    let now = Utc::now();
    Volume {
        id: VolumeId::new(),
        name,
        size_bytes,
        backend,
        status: VolumeStatus::Creating,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: source,
        attachments: vec![],
        created_at: now,
        updated_at: now,
    }
}

/// Creates an empty volume of `size_bytes` on `backend`. On a driver failure the partial
/// backend object is removed and no record is left; the error is returned.
pub(crate) async fn run(
    ctx: &Ctx,
    size_bytes: u64,
    backend: String,
    name: Option<String>,
    owner: Option<&Owner>,
) -> Result<Volume> {
    let size_bytes = check_size(size_bytes)?;
    let driver = ctx.driver(&backend).await?;
    let volume = new_record(size_bytes, backend, name, None);
    ctx.locked([volume.id.into()], async {
        let op = ctx
            .begin(
                Owner::insert_steps(
                    owner,
                    ObjectKind::Volume,
                    volume.id.to_string(),
                    volume.size_bytes,
                    Step::InsertVolume(volume.clone()),
                ),
                NewOp::of(KIND, volume.id, None),
                |c| conflict_error(c, "create volume", "new"),
            )
            .await?;
        let result = ctx.drive(KIND, driver.create_volume(&volume)).await;
        conclude(ctx, &driver, &volume, op, result).await
    })
    .await
}

/// Records a creation's result: `available` with its location, or — after removing the
/// partial backend object — no record at all (the error is returned). If the backend
/// refuses the cleanup, the record stays in `error` so nothing is left untracked.
pub(crate) async fn conclude(
    ctx: &Ctx,
    driver: &Arc<dyn VolumeDriver>,
    v: &Volume,
    op: OpId,
    result: Result<ProviderUpdate>,
) -> Result<Volume> {
    match result {
        Ok(update) => {
            ctx.finish(vec![
                Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![VolumeStatus::Creating],
                    to: VolumeStatus::Available,
                    reason: None,
                },
                Step::SetVolumeLocation(v.id, update.provider_location),
                Step::FinishOp(op),
            ])
            .await?;
            ctx.volume(v.id).await
        }
        Err(cause) => {
            match driver.delete_volume(v).await {
                Ok(_) => {
                    ctx.finish(vec![Step::DeleteVolume(v.id), Step::FinishOp(op)])
                        .await?
                }
                Err(cleanup) => {
                    ctx.finish(vec![
                        Step::SetVolumeStatus {
                            id: v.id,
                            from: vec![],
                            to: VolumeStatus::Error,
                            reason: Some(format!(
                                "create failed ({cause}); cleanup failed too ({cleanup})"
                            )),
                        },
                        Step::FinishOp(op),
                    ])
                    .await?
                }
            }
            Err(cause)
        }
    }
}

/// Recovery of an interrupted creation (empty or clone): a half-made volume (an
/// interrupted copy) may exist, so remove whatever is there and create it again; if that
/// fails, the volume is `error` with the reason. A backend that cannot answer now leaves
/// the operation journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(v) = ctx.store.volume(op.volume_id).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("volume record already gone".into());
    };
    let driver = ctx.driver(&v.backend).await?;
    let found = driver.lookup_volume(&v).await?.is_some();
    let redo = async {
        driver.delete_volume(&v).await?;
        match op.snapshot_id {
            Some(sid) => {
                let s = ctx.snapshot(sid).await?;
                driver
                    .create_volume_from_snapshot(&v, &s, no_progress())
                    .await
            }
            None => driver.create_volume(&v).await,
        }
    };
    let what = if found {
        "a partial backend volume was found and removed; creation redone"
    } else {
        "no backend volume had been made; creation redone"
    };
    match redo.await {
        Ok(update) => {
            ctx.finish(vec![
                Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![],
                    to: VolumeStatus::Available,
                    reason: None,
                },
                Step::SetVolumeLocation(v.id, update.provider_location),
                Step::FinishOp(op.id),
            ])
            .await?;
            Ok(format!("{what}; volume available"))
        }
        Err(e) if e.is_transient() => Err(e),
        Err(e) => {
            let reason = format!("creation interrupted by a crash and could not be redone: {e}");
            ctx.finish(vec![
                Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![],
                    to: VolumeStatus::Error,
                    reason: Some(reason.clone()),
                },
                Step::FinishOp(op.id),
            ])
            .await?;
            Ok(reason)
        }
    }
}

/// Refuses a `size` smaller than what the volume must hold.
pub(crate) fn at_least(size_bytes: u64, min: u64, what: impl std::fmt::Display) -> Result<u64> {
    if size_bytes < min {
        return Err(Error::invalid(
            "size",
            format!("{size_bytes} bytes is smaller than {what} ({min} bytes)"),
        ));
    }
    Ok(size_bytes)
}
