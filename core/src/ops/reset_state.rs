//! Admin status resets (Cinder's `os-reset_status`): the way out of a status no operation
//! can leave, e.g. an `error` volume after a failed revert the admin repaired by hand.
//!
//! A reset never touches the backend. It is refused while an operation on the object runs
//! (its lock is held) or is journaled and not yet recovered (recovery would then act on a
//! status the admin changed under it). The old status, the new one and the reason are kept
//! in the object's status history, in the same transaction as the change.

use chrono::Utc;

use super::Ctx;
use crate::error::{Error, Result};
use crate::locks::LockKey;
use crate::store::{HistoryEntry, Step};
use crate::types::{Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId, VolumeStatus};

/// Runs `body` under the volume's lock, taken without waiting, once no journaled
/// operation names the volume; the lock is released (for every node) before it returns.
async fn when_idle<T>(
    ctx: &Ctx,
    volume: VolumeId,
    what: &str,
    body: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(locks) = ctx.locks.try_lock(&[LockKey::from(volume)]).await? else {
        return Err(Error::wrong_state(format!(
            "cannot reset {what}: an operation on volume {volume} is running; try again when it ends"
        )));
    };
    Ctx::holding(locks, async {
        let ops = ctx.store.operations().await?;
        if let Some(op) = ops.iter().find(|o| o.volume_id == volume) {
            return Err(Error::wrong_state(format!(
                "cannot reset {what}: operation {} ({}) on volume {volume} is unfinished; the next kiln start recovers it",
                op.id.0, op.kind
            )));
        }
        body.await
    })
    .await
}

fn reason_or_default(reason: Option<String>) -> Result<String> {
    let reason = reason.unwrap_or_else(|| "reset by an administrator".to_string());
    // Same rules as a name: it is printed in tables and logs, and pasted into shells.
    crate::validate::validate_label(&reason)
        .map_err(|e| Error::invalid("reason", e.message().trim_start_matches("invalid name: ")))?;
    Ok(reason)
}

/// Sets volume `id`'s status to `to`, recording why.
pub(crate) async fn volume(
    ctx: &Ctx,
    id: VolumeId,
    to: VolumeStatus,
    reason: Option<String>,
) -> Result<Volume> {
    let reason = reason_or_default(reason)?;
    let v = ctx.volume(id).await?;
    when_idle(ctx, id, &format!("volume {id}"), async {
        let v = ctx.store.volume(id).await?.unwrap_or(v);
        if to == VolumeStatus::InUse && v.attachments.is_empty() {
            return Err(Error::invalid(
                "state",
                format!(
                    "volume {id} has no attachment; attach it instead of resetting it to in-use"
                ),
            ));
        }
        if to != VolumeStatus::InUse && !v.attachments.is_empty() {
            return Err(Error::invalid(
                "state",
                format!("volume {id} is attached; detach it (or reset it to in-use)"),
            ));
        }
        ctx.guarded(
            vec![
                Step::SetVolumeStatus {
                    id,
                    from: vec![v.status],
                    to,
                    reason: (to == VolumeStatus::Error).then(|| reason.clone()),
                },
                Step::RecordHistory(HistoryEntry {
                    object: "volume".into(),
                    object_id: id.to_string(),
                    from_status: v.status.as_str().into(),
                    to_status: to.as_str().into(),
                    reason,
                    at: Utc::now(),
                }),
            ],
            |c| super::conflict_error(c, "reset volume", "unchanged since it was read"),
        )
        .await?;
        ctx.volume(id).await
    })
    .await
}

/// Sets snapshot `id`'s status to `to`, recording why.
pub(crate) async fn snapshot(
    ctx: &Ctx,
    id: SnapshotId,
    to: SnapshotStatus,
    reason: Option<String>,
) -> Result<Snapshot> {
    let reason = reason_or_default(reason)?;
    let s = ctx.snapshot(id).await?;
    when_idle(ctx, s.volume_id, &format!("snapshot {id}"), async {
        let s = ctx.store.snapshot(id).await?.unwrap_or(s);
        ctx.guarded(
            vec![
                Step::SetSnapshotStatus {
                    id,
                    from: vec![s.status],
                    to,
                    reason: (to == SnapshotStatus::Error).then(|| reason.clone()),
                },
                Step::RecordHistory(HistoryEntry {
                    object: "snapshot".into(),
                    object_id: id.to_string(),
                    from_status: s.status.as_str().into(),
                    to_status: to.as_str().into(),
                    reason,
                    at: Utc::now(),
                }),
            ],
            |c| super::conflict_error(c, "reset snapshot", "unchanged since it was read"),
        )
        .await?;
        ctx.snapshot(id).await
    })
    .await
}
