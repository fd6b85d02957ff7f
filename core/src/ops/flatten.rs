//! Flatten a volume cloned from a snapshot: copy the data it still shares with the
//! snapshot, so the snapshot can be deleted. The volume keeps its status (flattening does
//! not change what a guest sees); the journal entry lets recovery finish a flatten a crash
//! interrupted (drivers make it safe to re-run). Lineage stays recorded: the volume was
//! still created from that snapshot.

use std::sync::Arc;

use super::Ctx;
use crate::driver::VolumeDriver;
use crate::error::Result;
use crate::progress::{ProgressHandle, no_progress};
use crate::store::{NewOp, Operation, Step};
use crate::types::{Snapshot, Volume, VolumeId};

/// Journal kind.
pub(crate) const KIND: &str = "flatten";

/// Flattens volume `id` (which must exist; any status but a transitional one).
pub(crate) async fn run(ctx: &Ctx, id: VolumeId, progress: ProgressHandle) -> Result<Volume> {
    ctx.volume(id).await?;
    ctx.locked([id.into()], async {
        let v = ctx.volume(id).await?;
        let driver = ctx.driver(&v.backend).await?;
        run_locked(ctx, &driver, &v, progress).await?;
        ctx.volume(id).await
    })
    .await
}

/// The flatten, for a caller holding the volume's lock.
pub(crate) async fn run_locked(
    ctx: &Ctx,
    driver: &Arc<dyn VolumeDriver>,
    v: &Volume,
    progress: ProgressHandle,
) -> Result<()> {
    use crate::types::VolumeStatus::{Available, Error, InUse};
    let op = ctx
        .begin(
            vec![Step::VolumeIn {
                id: v.id,
                any_of: vec![Available, InUse, Error],
            }],
            NewOp::of(KIND, v.id, v.source_snapshot_id),
            |c| super::conflict_error(c, "flatten volume", "available, in-use or error"),
        )
        .await?;
    let result = ctx.drive(KIND, driver.flatten_volume(v, progress)).await;
    // A failed flatten leaves the clone as it was (still sharing data): nothing to record
    // on it but the error, which the caller gets.
    ctx.finish(vec![Step::FinishOp(op)]).await?;
    result
}

/// Flattens every volume kiln's lineage records as cloned from `s` (the caller holds their
/// locks), so the backend lets `s` be deleted.
pub(crate) async fn dependents_of(
    ctx: &Ctx,
    driver: &Arc<dyn VolumeDriver>,
    s: &Snapshot,
) -> Result<()> {
    for clone in ctx.store.volumes_from_snapshot(s.id).await? {
        tracing::info!(snapshot = %s.id, volume = %clone.id, "flattening dependent volume before deleting its snapshot");
        run_locked(ctx, driver, &clone, no_progress()).await?;
    }
    Ok(())
}

/// Recovery: flattens again. A backend that cannot answer now leaves it journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(v) = ctx.store.volume(op.volume_id).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("volume record already gone".into());
    };
    let driver = ctx.driver(&v.backend).await?;
    let outcome = match driver.flatten_volume(&v, no_progress()).await {
        Err(e) if e.is_transient() => return Err(e),
        Ok(()) => "flatten completed".to_string(),
        Err(e) => format!(
            "flatten could not be completed (the volume still shares data with its snapshot): {e}"
        ),
    };
    ctx.finish(vec![Step::FinishOp(op.id)]).await?;
    Ok(outcome)
}
