//! Revert a volume to any of its snapshots (not only the latest, unlike Cinder), keeping
//! every snapshot. The volume must be `available` (detached): reverting under a running
//! guest would change its disk behind its back.
//!
//! Status: volume `reverting`, snapshot `restoring` while the driver works; on failure the
//! volume is `error` with the reason (its data may be half-reverted) and the snapshot is
//! `available` again. A refusal (`Busy`/`Unavailable`: nothing changed) puts both back. A
//! revert that succeeded but invalidated other snapshots (LVM thick COW overflow) leaves
//! the volume `available` and marks each of those snapshots `error` with the reason.
//! Recovery re-runs the revert (drivers make it safe to re-run).

use super::{Ctx, conflict_error, refused};
use crate::error::Result;
use crate::progress::{ProgressHandle, no_progress};
use crate::store::{NewOp, Operation, Step};
use crate::types::{RevertOutcome, Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeStatus};

/// Journal kind.
pub(crate) const KIND: &str = "revert";

/// Reverts snapshot `snapshot_id`'s volume to it.
pub(crate) async fn run(
    ctx: &Ctx,
    snapshot_id: SnapshotId,
    progress: ProgressHandle,
) -> Result<Volume> {
    let s = ctx.snapshot(snapshot_id).await?;
    ctx.locked([s.volume_id.into()], async {
        let s = ctx.checked_snapshot(snapshot_id).await?;
        let v = ctx.volume(s.volume_id).await?;
        let driver = ctx.driver(&v.backend).await?;
        let op = ctx
            .begin(
                vec![
                    Step::SetVolumeStatus {
                        id: v.id,
                        from: vec![VolumeStatus::Available],
                        to: VolumeStatus::Reverting,
                        reason: None,
                    },
                    Step::SetSnapshotStatus {
                        id: s.id,
                        from: vec![SnapshotStatus::Available],
                        to: SnapshotStatus::Restoring,
                        reason: None,
                    },
                ],
                NewOp::of(KIND, v.id, Some(s.id)),
                |c| {
                    conflict_error(
                        c,
                        "revert",
                        "available (a volume must be detached to be reverted)",
                    )
                },
            )
            .await?;
        let result = ctx
            .drive(KIND, driver.revert_to_snapshot(&v, &s, progress))
            .await;
        let result = known_only(ctx, result).await?;
        let (mut steps, r) = conclude(&v, &s, result);
        steps.push(Step::FinishOp(op));
        ctx.finish(steps).await?;
        r?;
        ctx.volume(v.id).await
    })
    .await
}

/// Keeps only the invalidated snapshots kiln has records of (a backend may name objects
/// made outside kiln; those are not kiln's to mark).
async fn known_only(ctx: &Ctx, result: Result<RevertOutcome>) -> Result<Result<RevertOutcome>> {
    let Ok(mut outcome) = result else {
        return Ok(result);
    };
    let mut kept = Vec::new();
    for inv in outcome.invalidated {
        if ctx.store.snapshot(inv.snapshot).await?.is_some() {
            kept.push(inv);
        }
    }
    outcome.invalidated = kept;
    Ok(Ok(outcome))
}

fn conclude(
    v: &Volume,
    s: &Snapshot,
    result: Result<RevertOutcome>,
) -> (Vec<Step>, Result<RevertOutcome>) {
    if let Err(e) = &result
        && refused(e)
    {
        // Nothing changed: both records back exactly as they were.
        return (
            vec![
                Step::RestoreVolumeStatus {
                    id: v.id,
                    status: v.status,
                    reason: v.status_reason.clone(),
                    updated_at: v.updated_at,
                },
                Step::RestoreSnapshotStatus {
                    id: s.id,
                    status: s.status,
                    reason: s.status_reason.clone(),
                    updated_at: s.updated_at,
                },
            ],
            result,
        );
    }
    let (vstatus, reason) = match &result {
        Ok(_) => (VolumeStatus::Available, None),
        Err(e) => (
            VolumeStatus::Error,
            Some(format!("revert to snapshot {} failed: {e}", s.id)),
        ),
    };
    let (mut steps, result) = (
        vec![
            Step::SetVolumeStatus {
                id: v.id,
                from: vec![],
                to: vstatus,
                reason,
            },
            Step::SetSnapshotStatus {
                id: s.id,
                from: vec![],
                to: SnapshotStatus::Available,
                reason: None,
            },
        ],
        result,
    );
    if let Ok(outcome) = &result {
        for inv in &outcome.invalidated {
            tracing::warn!(snapshot = %inv.snapshot, reason = %inv.reason, "the revert invalidated another snapshot; marked error");
            steps.push(Step::SetSnapshotStatus {
                id: inv.snapshot,
                from: vec![],
                to: SnapshotStatus::Error,
                reason: Some(inv.reason.clone()),
            });
        }
    }
    (steps, result)
}

/// Recovery: re-runs the revert. A backend that cannot answer now leaves it journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let v = ctx.store.volume(op.volume_id).await?;
    let s = match op.snapshot_id {
        Some(id) => ctx.store.snapshot(id).await?,
        None => None,
    };
    let (Some(v), Some(s)) = (v, s) else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("volume or snapshot record already gone".into());
    };
    let driver = ctx.driver(&v.backend).await?;
    let result = match driver.revert_to_snapshot(&v, &s, no_progress()).await {
        Err(e) if e.is_transient() => return Err(e),
        r => r,
    };
    let result = known_only(ctx, result).await?;
    let outcome = match &result {
        Ok(_) => format!("revert to snapshot {} completed", s.id),
        Err(e) => format!("revert to snapshot {} could not be completed: {e}", s.id),
    };
    let (mut steps, _) = conclude(&v, &s, result);
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(outcome)
}
