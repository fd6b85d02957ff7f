//! Create a snapshot of a volume: Cinder's `create_snapshot` (volume `available`) and
//! `create_snapshot_force` (also `in-use`: the driver snapshots the attached volume while
//! it may be written).
//!
//! Recovery: a snapshot cannot be redone later (it would be another point in time), so it
//! is kept if the backend made it — with the location the backend reports — else marked
//! `error` with the reason.

use chrono::Utc;

use super::{Ctx, conflict_error};
use crate::attrs::{ObjectKind, Owner};
use crate::error::Result;
use crate::store::{NewOp, Operation, Step};
use crate::types::{Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId, VolumeStatus};
use crate::validate::validate_label;

/// Journal kind.
pub(crate) const KIND: &str = "create_snapshot";

/// A new snapshot record of `v` in `creating`.
pub(crate) fn new_record(v: &Volume, name: Option<String>) -> Snapshot {
    let now = Utc::now();
    Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name,
        size_bytes: v.size_bytes,
        backend: v.backend.clone(),
        status: SnapshotStatus::Creating,
        status_reason: None,
        provider_location: None,
        forced: v.status == VolumeStatus::InUse,
        image_id: None,
        consistency: None,
        created_at: now,
        updated_at: now,
    }
}

/// Snapshots volume `volume_id`. Without `force` it must be `available`; with `force`,
/// `available` or `in-use`. On a driver failure nothing is left behind and the error is
/// returned.
pub(crate) async fn run(
    ctx: &Ctx,
    volume_id: VolumeId,
    name: Option<String>,
    force: bool,
    owner: Option<&Owner>,
) -> Result<Snapshot> {
    if let Some(n) = &name {
        validate_label(n)?;
    }
    ctx.volume(volume_id).await?;
    ctx.locked([volume_id.into()], async {
        let v = ctx.volume(volume_id).await?;
        let driver = ctx.driver(&v.backend).await?;
        let (allowed, needed) = if force {
            (
                vec![VolumeStatus::Available, VolumeStatus::InUse],
                "available or in-use",
            )
        } else {
            (
                vec![VolumeStatus::Available],
                "available (use --force to snapshot an attached volume)",
            )
        };
        let snap = new_record(&v, name);
        let op = ctx
            .begin(
                std::iter::once(Step::VolumeIn {
                    id: volume_id,
                    any_of: allowed,
                })
                .chain(Owner::insert_steps(
                    owner,
                    ObjectKind::Snapshot,
                    snap.id.to_string(),
                    snap.size_bytes,
                    Step::InsertSnapshot(snap.clone()),
                ))
                .collect(),
                NewOp::of(KIND, volume_id, Some(snap.id)),
                |c| conflict_error(c, "snapshot volume", needed),
            )
            .await?;
        let result = ctx
            .drive(KIND, async {
                match v.attachments.first() {
                    Some(a) if v.status == VolumeStatus::InUse => {
                        driver.create_snapshot_force(&snap, &v, a).await
                    }
                    _ => driver.create_snapshot(&snap, &v).await,
                }
            })
            .await;
        match result {
            Ok(update) => {
                ctx.finish(vec![
                    Step::SetSnapshotStatus {
                        id: snap.id,
                        from: vec![SnapshotStatus::Creating],
                        to: SnapshotStatus::Available,
                        reason: None,
                    },
                    Step::SetSnapshotLocation(snap.id, update.provider_location),
                    Step::FinishOp(op),
                ])
                .await?;
                ctx.snapshot(snap.id).await
            }
            Err(e) => {
                match driver.delete_snapshot(&snap).await {
                    Ok(_) => {
                        ctx.finish(vec![Step::DeleteSnapshot(snap.id), Step::FinishOp(op)])
                            .await?
                    }
                    Err(cleanup) => {
                        ctx.finish(vec![
                            Step::SetSnapshotStatus {
                                id: snap.id,
                                from: vec![],
                                to: SnapshotStatus::Error,
                                reason: Some(format!(
                                    "create failed ({e}); cleanup failed too ({cleanup})"
                                )),
                            },
                            Step::FinishOp(op),
                        ])
                        .await?
                    }
                }
                Err(e)
            }
        }
    })
    .await
}

/// Recovery of an interrupted snapshot create (see the module docs).
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(sid) = op.snapshot_id else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("journal entry names no snapshot".into());
    };
    let Some(s) = ctx.store.snapshot(sid).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("snapshot record already gone".into());
    };
    let (steps, outcome) = resolve(ctx, &s).await?;
    let mut steps = steps;
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(outcome)
}

/// The steps that settle a snapshot whose creation was interrupted, and what they mean:
/// `available` with the backend's location if the backend has it, else `error`.
pub(crate) async fn resolve(ctx: &Ctx, s: &Snapshot) -> Result<(Vec<Step>, String)> {
    let driver = ctx.driver(&s.backend).await?;
    Ok(match driver.lookup_snapshot(s).await? {
        Some(update) => (
            vec![
                Step::SetSnapshotStatus {
                    id: s.id,
                    from: vec![],
                    to: SnapshotStatus::Available,
                    reason: None,
                },
                Step::SetSnapshotLocation(s.id, update.provider_location),
            ],
            "backend snapshot exists; snapshot available".into(),
        ),
        None => {
            let reason =
                "creation interrupted by a crash before the backend snapshot was made".to_string();
            (
                vec![Step::SetSnapshotStatus {
                    id: s.id,
                    from: vec![],
                    to: SnapshotStatus::Error,
                    reason: Some(reason.clone()),
                }],
                reason,
            )
        }
    })
}
