//! Delete a volume: refused while it is attached or has snapshots, unless `cascade`, which
//! deletes its snapshots first (oldest first, each its own journaled delete; stops at the
//! first failure). A backend refusal (`Busy`, `Unavailable`) puts the volume back in the
//! status and reason it had; any other failure leaves it `error_deleting` with the reason.
//! Recovery re-runs the delete (idempotent) and says whether anything was still there.

use super::{Before, Ctx, conflict_error, delete_snapshot, refused};
use crate::error::{Error, Result};
use crate::locks::LockKey;
use crate::store::{NewOp, Operation, Step};
use crate::types::{DeleteAction, Volume, VolumeId, VolumeStatus};

/// Journal kind.
pub(crate) const KIND: &str = "delete_volume";

const DELETABLE: [VolumeStatus; 3] = [
    VolumeStatus::Available,
    VolumeStatus::Error,
    VolumeStatus::ErrorDeleting,
];
const NEEDED: &str = "available, error or error_deleting (detach it first if it is in-use)";

/// Deletes volume `id` (see the module docs).
pub(crate) async fn run(ctx: &Ctx, id: VolumeId, cascade: bool) -> Result<DeleteAction> {
    let v = ctx.volume(id).await?;
    let driver = ctx.driver(&v.backend).await?;
    // A cascade may flatten nothing, but deleting a snapshot locks its clones too.
    let mut keys: Vec<LockKey> = vec![id.into()];
    for s in ctx.store.snapshots(Some(id)).await? {
        keys.extend(
            ctx.store
                .volumes_from_snapshot(s.id)
                .await?
                .iter()
                .map(|c| LockKey::from(c.id)),
        );
    }
    ctx.locked(keys, async {
    if cascade {
        ctx.guarded(
            vec![Step::VolumeIn {
                id,
                any_of: DELETABLE.to_vec(),
            }],
            |c| conflict_error(c, "delete volume", NEEDED),
        )
        .await?;
        for s in ctx.store.snapshots(Some(id)).await? {
            delete_snapshot::run_locked(ctx, &driver, s, false, crate::progress::no_progress())
                .await?;
        }
    }
    let v = ctx.volume(id).await?;
    let op = ctx
        .begin(
            vec![
                Step::SetVolumeStatus {
                    id,
                    from: DELETABLE.to_vec(),
                    to: VolumeStatus::Deleting,
                    reason: None,
                },
                Step::VolumeHasNoSnapshots(id),
            ],
            NewOp::of(KIND, id, None).payload(
                Before {
                    status: v.status,
                    reason: v.status_reason.clone(),
                    updated_at: v.updated_at,
                }
                .payload(),
            ),
            |c| {
                if c.step == 1 {
                    Error::wrong_state(format!(
                        "cannot delete volume {id}: it has {} snapshot(s); delete them first or use --cascade",
                        c.found.clone().unwrap_or_default()
                    ))
                } else {
                    conflict_error(c, "delete volume", NEEDED)
                }
            },
        )
        .await?;
    let result = ctx.drive(KIND, driver.delete_volume(&v)).await;
    let (mut steps, r) = conclude(&v, result);
    steps.push(Step::FinishOp(op));
    ctx.finish(steps).await?;
    r
    })
    .await
}

fn conclude(v: &Volume, result: Result<DeleteAction>) -> (Vec<Step>, Result<DeleteAction>) {
    match result {
        Ok(action) => (vec![Step::DeleteVolume(v.id)], Ok(action)),
        // Refused before anything changed: back to exactly what it was.
        Err(e) if refused(&e) => (
            vec![Step::RestoreVolumeStatus {
                id: v.id,
                status: v.status,
                reason: v.status_reason.clone(),
                updated_at: v.updated_at,
            }],
            Err(e),
        ),
        Err(e) => (
            vec![Step::SetVolumeStatus {
                id: v.id,
                from: vec![],
                to: VolumeStatus::ErrorDeleting,
                reason: Some(e.to_string()),
            }],
            Err(e),
        ),
    }
}

/// Recovery: re-runs the delete. A backend that cannot answer now leaves it journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(mut v) = ctx.store.volume(op.volume_id).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("volume record already gone".into());
    };
    // The record as it was before the delete began.
    let before = Before::read(&op.payload, VolumeStatus::Available, v.updated_at);
    (v.status, v.status_reason, v.updated_at) = (before.status, before.reason, before.updated_at);
    let driver = ctx.driver(&v.backend).await?;
    let result = match driver.delete_volume(&v).await {
        Err(e) if e.is_transient() => return Err(e),
        r => r,
    };
    let outcome = match &result {
        Ok(DeleteAction::Deleted) => "volume deletion completed".to_string(),
        Ok(DeleteAction::AlreadyGone) => {
            "volume deletion completed (the backend object was already gone)".to_string()
        }
        Err(e) => format!("volume deletion could not be completed: {e}"),
    };
    let (mut steps, _) = conclude(&v, result);
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(outcome)
}
