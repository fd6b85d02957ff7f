//! Delete a snapshot: `available`/`error`/`error_deleting` → `deleting` → gone.
//!
//! When backend clones depend on it the backend refuses (`Busy`, naming them) and the
//! snapshot goes back to the status and reason it had before — an `error` snapshot stays
//! `error`, its reason intact. With `flatten_dependents`, the dependent volumes kiln knows
//! (its lineage records) are flattened first ([`super::flatten`]), then the delete is
//! retried. Recovery re-runs the delete (idempotent) and reports honestly whether the
//! backend object was still there.

use std::sync::Arc;

use super::{Before, Ctx, conflict_error, flatten, refused};
use crate::driver::VolumeDriver;
use crate::error::{Error, ErrorKind, Result};
use crate::locks::LockKey;
use crate::progress::ProgressHandle;
use crate::store::{NewOp, Operation, Step};
use crate::types::{DeleteAction, Snapshot, SnapshotId, SnapshotStatus};

/// Journal kind.
pub(crate) const KIND: &str = "delete_snapshot";

const DELETABLE: [SnapshotStatus; 3] = [
    SnapshotStatus::Available,
    SnapshotStatus::Error,
    SnapshotStatus::ErrorDeleting,
];

/// Deletes snapshot `id` (see the module docs).
pub(crate) async fn run(
    ctx: &Ctx,
    id: SnapshotId,
    flatten_dependents: bool,
    progress: ProgressHandle,
) -> Result<DeleteAction> {
    let s = ctx.snapshot(id).await?;
    let driver = ctx.driver(&s.backend).await?;
    let mut keys: Vec<LockKey> = vec![s.volume_id.into()];
    keys.extend(
        ctx.store
            .volumes_from_snapshot(id)
            .await?
            .iter()
            .map(|c| LockKey::from(c.id)),
    );
    ctx.locked(keys, async {
        let s = ctx.snapshot(id).await?;
        run_locked(ctx, &driver, s, flatten_dependents, progress).await
    })
    .await
}

/// The delete, for a caller that holds the snapshot's volume lock (and its clones' when
/// flattening), e.g. a cascading volume delete.
pub(crate) async fn run_locked(
    ctx: &Ctx,
    driver: &Arc<dyn VolumeDriver>,
    s: Snapshot,
    flatten_dependents: bool,
    progress: ProgressHandle,
) -> Result<DeleteAction> {
    let id = s.id;
    let op = ctx
        .begin(
            vec![
                Step::SnapshotFreeOfImage(id),
                Step::SetSnapshotStatus {
                    id,
                    from: DELETABLE.to_vec(),
                    to: SnapshotStatus::Deleting,
                    reason: None,
                },
            ],
            // What it was before, so a refusal (here or in recovery) can put it back.
            NewOp::of(KIND, s.volume_id, Some(id)).payload(
                Before {
                    status: s.status,
                    reason: s.status_reason.clone(),
                    updated_at: s.updated_at,
                }
                .payload(),
            ),
            |c| match c.what {
                "image" => Error::busy(
                    format!(
                        "snapshot {id} belongs to image {}; delete the image instead (kiln image delete {})",
                        c.id, c.id
                    ),
                    vec![format!("image {}", c.id)],
                ),
                _ => conflict_error(c, "delete snapshot", "available, error or error_deleting"),
            },
        )
        .await?;
    let result = ctx
        .drive(KIND, async {
            match driver
                .delete_snapshot_with_progress(&s, progress.clone())
                .await
            {
                Err(e) if flatten_dependents && e.kind() == ErrorKind::Busy => {
                    flatten::dependents_of(ctx, driver, &s).await?;
                    driver.delete_snapshot_with_progress(&s, progress).await
                }
                r => r,
            }
        })
        .await;
    let (steps, r) = conclude(&s, result);
    let mut steps = steps;
    steps.push(Step::FinishOp(op));
    ctx.finish(steps).await?;
    r
}

/// The steps recording a delete's result on `s` (its status before the delete is
/// `s.status`/`s.status_reason`), and the result to return.
fn conclude(s: &Snapshot, result: Result<DeleteAction>) -> (Vec<Step>, Result<DeleteAction>) {
    match result {
        Ok(action) => (vec![Step::DeleteSnapshot(s.id)], Ok(action)),
        // Refused before anything changed: back to exactly what it was.
        Err(e) if refused(&e) => (
            vec![Step::RestoreSnapshotStatus {
                id: s.id,
                status: s.status,
                reason: s.status_reason.clone(),
                updated_at: s.updated_at,
            }],
            Err(e),
        ),
        Err(e) => (
            vec![Step::SetSnapshotStatus {
                id: s.id,
                from: vec![],
                to: SnapshotStatus::ErrorDeleting,
                reason: Some(e.to_string()),
            }],
            Err(e),
        ),
    }
}

/// Recovery: re-runs the delete. A backend that cannot answer now leaves it journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(sid) = op.snapshot_id else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("journal entry names no snapshot".into());
    };
    let Some(mut s) = ctx.store.snapshot(sid).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("snapshot record already gone".into());
    };
    // The record as it was before the delete began.
    let before = Before::read(&op.payload, SnapshotStatus::Available, s.updated_at);
    (s.status, s.status_reason, s.updated_at) = (before.status, before.reason, before.updated_at);
    let driver = ctx.driver(&s.backend).await?;
    let result = match driver.delete_snapshot(&s).await {
        Err(e) if e.is_transient() => return Err(e),
        r => r,
    };
    let outcome = match &result {
        Ok(DeleteAction::Deleted) => "snapshot deletion completed".to_string(),
        Ok(DeleteAction::AlreadyGone) => {
            "snapshot deletion completed (the backend object was already gone)".to_string()
        }
        Err(e) => format!("snapshot deletion could not be completed: {e}"),
    };
    let (mut steps, _) = conclude(&s, result);
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(outcome)
}
