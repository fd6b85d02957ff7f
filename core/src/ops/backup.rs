//! Backups of volumes (see [`crate::backup`]): create, delete, verify; restores are composed
//! in the service from these pieces and [`crate::ops::restore`].
//!
//! Create: the snapshot is read as a diff stream — whole, or with an incremental the changes
//! since the snapshot of the latest backup on the same target — into the target, under the
//! volume's lock, journaled with the backup record (`creating`). The backup turns
//! `available` only once the target holds it whole; any failure removes what was written
//! and the record (no half backup, no stuck status). Recovery of an interrupted create
//! keeps a backup the target holds whole and removes anything else.
//!
//! Delete: refused while another backup builds on it (`Busy`, naming it); the files go
//! first, the record after. Recovery finishes an interrupted delete.

use chrono::Utc;

use super::{Ctx, conflict_error};
use std::sync::Arc;

use crate::backup::dir::{DirTarget, FORMAT, Manifest};
use crate::backup::{PoolBackups, Target};
use crate::crash::crash_point;
use crate::delta::{Base, Changes, DeltaSource, StreamStats};
use crate::driver::SnapshotDelta;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::ProgressHandle;
use crate::store::{NewOp, Operation, Step};
use crate::types::{
    Backup, BackupId, BackupStatus, Snapshot, SnapshotId, SnapshotStatus, VolumeId, VolumeStatus,
};

/// Journal kind of a create.
pub(crate) const CREATE: &str = "backup_create";
/// Journal kind of a delete.
pub(crate) const DELETE: &str = "backup_delete";

/// Longest chain of incrementals a restore follows (deeper means a corrupt store).
const MAX_CHAIN: usize = 10_000;

/// What `backup create` asks for.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The volume.
    pub volume_id: VolumeId,
    /// Back up this snapshot of it (default: take one now and keep it as the base of the
    /// next incremental).
    pub snapshot_id: Option<SnapshotId>,
    /// Where (`dir:PATH`, `rbd:POOL`).
    pub target: String,
    /// Only the changes since the latest backup of the volume on the same target.
    pub incremental: bool,
    /// A label.
    pub name: Option<String>,
}

/// A backup just made, with what making it read and wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupCreated {
    /// The backup record.
    #[serde(flatten)]
    pub backup: Backup,
    /// The stream: bytes of data and zeros it carries, and bytes read from the backend.
    pub stream: StreamStats,
}

/// The diff stream source of snapshot `s` (whole, or since `older`); the caller holds the
/// volume's lock and has checked both are available.
pub(crate) async fn delta_locked(
    ctx: &Ctx,
    s: &Snapshot,
    older: Option<&Snapshot>,
) -> Result<DeltaSource> {
    let driver = ctx.driver(&s.backend).await?;
    let base = match older {
        None => None,
        Some(o) => {
            let changes = match driver.diff_snapshots(o, s).await? {
                SnapshotDelta::Changed(ranges) => Changes::Tracked(ranges),
                SnapshotDelta::Untracked => Changes::Compare(driver.open_snapshot_reader(o).await?),
            };
            Some(Base {
                name: o.id.to_string(),
                changes,
            })
        }
    };
    Ok(DeltaSource {
        to_name: s.id.to_string(),
        to: driver.open_snapshot_reader(s).await?,
        base,
        guard: None,
    })
}

/// Where backups are kept: a directory, or a backend's pool.
#[derive(Clone)]
pub(crate) enum Place {
    /// `dir:PATH`.
    Dir(DirTarget),
    /// `rbd:POOL`.
    Pool(Arc<dyn PoolBackups>),
}

/// The place a target names, for writing (a directory must be writable, a pool reachable).
pub(crate) async fn writable(ctx: &Ctx, target: &Target) -> Result<Place> {
    match target {
        Target::Dir(p) => Ok(Place::Dir(DirTarget::open(p)?)),
        Target::Rbd(pool) => Ok(Place::Pool(ctx.backends.backup_pool("rbd", pool).await?)),
    }
}

/// The place a stored backup lives in.
pub(crate) async fn stored_at(ctx: &Ctx, target: &str) -> Result<Place> {
    match Target::parse(target)? {
        Target::Dir(p) => Ok(Place::Dir(DirTarget::at(&p))),
        Target::Rbd(pool) => Ok(Place::Pool(ctx.backends.backup_pool("rbd", &pool).await?)),
    }
}

/// Streams `src` into a pool backup: the stream, produced on one thread, applied onto the
/// backup image's writer on this one (the same records `rbd import-diff` would apply).
fn stream_into_pool(
    src: &mut DeltaSource,
    w: &mut dyn crate::driver::VolumeWriter,
    progress: &ProgressHandle,
) -> Result<StreamStats> {
    let (r, pw) = std::io::pipe().map_err(|e| Error::io("make a pipe", e))?;
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || {
            let sink = std::io::BufWriter::with_capacity(1 << 20, pw);
            src.write_to(sink, &|n| progress.advance(n))
                .map(|(stats, _)| stats)
        });
        let applied = crate::diff_apply::apply(
            std::io::BufReader::with_capacity(1 << 20, r),
            w,
            &|_| Ok(()),
            &|_| {},
        );
        let produced = producer
            .join()
            .map_err(|_| Error::backend("backup", "the stream thread panicked"))?;
        // The producer's own error (a read failure) says more than the broken pipe.
        let stats = produced?;
        applied?;
        Ok(stats)
    })
}

/// The latest available backup of the volume on `target` whose snapshot is still available
/// (and older than `before`, when given): what an incremental builds on.
async fn latest_base(
    ctx: &Ctx,
    volume: VolumeId,
    target: &str,
    before: Option<&Snapshot>,
) -> Result<Option<(Backup, Snapshot)>> {
    let mut backups = ctx.store.backups(Some(volume)).await?;
    backups.reverse();
    for b in backups {
        if b.target != target || b.status != BackupStatus::Available {
            continue;
        }
        let Some(s) = ctx.store.snapshot(b.snapshot_id).await? else {
            continue;
        };
        let older = before.is_none_or(|t| s.created_at < t.created_at && s.id != t.id);
        if s.status == SnapshotStatus::Available && older {
            return Ok(Some((b, s)));
        }
    }
    Ok(None)
}

/// Creates a backup (see the module docs).
pub(crate) async fn create(
    ctx: &Ctx,
    req: BackupRequest,
    progress: ProgressHandle,
) -> Result<BackupCreated> {
    if let Some(n) = &req.name {
        crate::validate::validate_label(n)?;
    }
    let target = Target::parse(&req.target)?;
    let dir = writable(ctx, &target).await?;
    let target_s = target.to_string();
    let v = ctx.volume(req.volume_id).await?;
    let given = match req.snapshot_id {
        None => None,
        Some(sid) => {
            let s = ctx.snapshot(sid).await?;
            if s.volume_id != v.id {
                return Err(Error::invalid(
                    "--snapshot",
                    format!("snapshot {sid} is not a snapshot of volume {}", v.id),
                ));
            }
            Some(s)
        }
    };
    // Checked before a snapshot is taken, so a refused incremental changes nothing.
    let base = if req.incremental {
        match latest_base(ctx, v.id, &target_s, given.as_ref()).await? {
            Some(b) => Some(b),
            None => {
                return Err(Error::invalid(
                    "--incremental",
                    format!(
                        "volume {} has no available backup on {target_s} whose snapshot still \
                         exists to build on; make a full backup first",
                        v.id
                    ),
                ));
            }
        }
    } else {
        None
    };
    let id = BackupId::new();
    let auto = given.is_none();
    let s = match given {
        Some(s) => s,
        None => {
            let force = v.status == VolumeStatus::InUse;
            super::create_snapshot::run(ctx, v.id, Some(format!("backup-{id}")), force, None)
                .await?
        }
    };
    let r = write_backup(ctx, id, &v, &s, base, req.name, &dir, target_s, progress).await;
    if r.is_err() && auto {
        // The snapshot was taken for this backup only: nothing will build on it.
        if let Err(d) =
            super::delete_snapshot::run(ctx, s.id, false, crate::progress::no_progress()).await
        {
            tracing::warn!(snapshot = %s.id, error = %d, "could not remove the snapshot of a failed backup");
        }
    }
    r
}

/// Writes backup `id` of snapshot `s` (whole, or since `base`'s snapshot) into `dir`,
/// journaled, under the volume's lock.
#[allow(clippy::too_many_arguments)]
async fn write_backup(
    ctx: &Ctx,
    id: BackupId,
    v: &crate::types::Volume,
    s: &Snapshot,
    base: Option<(Backup, Snapshot)>,
    name: Option<String>,
    dir: &Place,
    target_s: String,
    progress: ProgressHandle,
) -> Result<BackupCreated> {
    ctx.locked([v.id.into()], async {
    let now = Utc::now();
    let record = Backup {
        id,
        volume_id: v.id,
        snapshot_id: s.id,
        parent_id: base.as_ref().map(|(b, _)| b.id),
        name,
        target: target_s.clone(),
        status: BackupStatus::Creating,
        status_reason: None,
        size_bytes: s.size_bytes,
        stored_bytes: 0,
        created_at: now,
        updated_at: now,
    };
    let mut steps = vec![Step::SnapshotIn {
        id: s.id,
        any_of: vec![SnapshotStatus::Available],
    }];
    if let Some((_, bs)) = &base {
        steps.push(Step::SnapshotIn {
            id: bs.id,
            any_of: vec![SnapshotStatus::Available],
        });
    }
    steps.push(Step::InsertBackup(record.clone()));
    let op = ctx
        .begin(
            steps,
            NewOp::of(CREATE, v.id, Some(s.id))
                .payload(serde_json::json!({"backup": id.to_string(), "target": target_s})),
            |c| conflict_error(c, "back up snapshot", "available"),
        )
        .await?;
    let written = async {
        let mut src = delta_locked(ctx, s, base.as_ref().map(|(_, bs)| bs)).await?;
        progress.set_total(src.scan_bytes());
        let dir = dir.clone();
        let manifest_of = {
            let record = record.clone();
            let from = base.as_ref().map(|(_, bs)| bs.id.to_string());
            move |chunks, stream_bytes| Manifest {
                format: FORMAT.into(),
                backup_id: record.id.to_string(),
                volume_id: record.volume_id.to_string(),
                snapshot_id: record.snapshot_id.to_string(),
                parent_id: record.parent_id.map(|p| p.to_string()),
                from_snapshot_id: from,
                size_bytes: record.size_bytes,
                stream_bytes,
                chunks,
                created_at: record.created_at,
            }
        };
        let (volume, size, parent) = (record.volume_id, record.size_bytes, record.parent_id);
        tokio::task::spawn_blocking(move || -> Result<(StreamStats, u64)> {
            match dir {
                Place::Dir(dir) => {
                    let w = dir.create(id)?;
                    let (stats, w) = src.write_to(w, &|n| progress.advance(n))?;
                    let (chunks, bytes) = w.finish()?;
                    crash_point(CREATE, "before_commit");
                    let stored = dir.commit(id, &manifest_of(chunks, bytes))?;
                    Ok((stats, stored))
                }
                Place::Pool(pool) => {
                    let mut w = pool.begin(volume, size, parent)?;
                    let stats = stream_into_pool(&mut src, &mut *w, &progress)?;
                    w.finish()?;
                    crash_point(CREATE, "before_commit");
                    pool.seal(volume, id)?;
                    // What the pool received; its allocation is Ceph's to report.
                    Ok((stats.clone(), stats.data_bytes))
                }
            }
        })
        .await
        .map_err(|e| Error::backend("backup", format!("backup task failed: {e}")))?
    }
    .await;
    match written {
        Ok((stats, stored)) => {
            crash_point(CREATE, "after_commit");
            ctx.finish(vec![
                Step::SetBackupStored(id, stored),
                Step::SetBackupStatus {
                    id,
                    from: vec![BackupStatus::Creating],
                    to: BackupStatus::Available,
                    reason: None,
                },
                Step::FinishOp(op),
            ])
            .await?;
            let backup = ctx
                .store
                .backup(id)
                .await?
                .ok_or_else(|| Error::not_found("backup", id))?;
            Ok(BackupCreated {
                backup,
                stream: stats,
            })
        }
        Err(e) => {
            let undone = match dir {
                Place::Dir(d) => d.abandon(id),
                Place::Pool(p) => {
                    let vid = v.id;
                    on_pool(p, move |p| p.abandon(vid)).await
                }
            };
            if let Err(c) = undone {
                tracing::warn!(backup = %id, error = %c, "could not remove a failed backup's data");
            }
            ctx.finish(vec![Step::DeleteBackup(id), Step::FinishOp(op)])
                .await?;
            Err(e)
        }
    }
    })
    .await
}

/// Runs a blocking pool call off the async threads.
async fn on_pool<T: Send + 'static>(
    pool: &Arc<dyn PoolBackups>,
    f: impl FnOnce(&dyn PoolBackups) -> Result<T> + Send + 'static,
) -> Result<T> {
    let p = pool.clone();
    tokio::task::spawn_blocking(move || f(&*p))
        .await
        .map_err(|e| Error::backend("backup pool", format!("task failed: {e}")))?
}

/// Removes backup `id` of `volume` from its place (gone already is fine).
async fn remove_from(place: &Place, volume: VolumeId, id: BackupId) -> Result<()> {
    match place {
        Place::Dir(d) => d.delete(id),
        Place::Pool(p) => on_pool(p, move |p| p.delete(volume, id)).await,
    }
}

/// The backup id and target a journaled backup operation recorded.
fn journaled(op: &Operation) -> Result<(BackupId, Target)> {
    let field = |k: &str| {
        op.payload
            .get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::store(format!("operation {} has no {k} in its payload", op.id.0)))
    };
    Ok((field("backup")?.parse()?, Target::parse(field("target")?)?))
}

/// Recovery of a create: a backup the target holds whole (manifest written and renamed into
/// place) is kept; anything else is removed, record and files.
pub(crate) async fn recover_create(ctx: &Ctx, op: &Operation) -> Result<String> {
    let (id, target) = journaled(op)?;
    let volume = op.volume_id;
    let place = stored_at(ctx, &target.to_string()).await?;
    // Whole on its target: the manifest renamed into place, or the pool's snapshot made.
    let whole: Option<u64> = match &place {
        Place::Dir(d) => d
            .manifest(id)
            .ok()
            .map(|m| m.chunks.iter().map(|c| c.bytes).sum::<u64>()),
        Place::Pool(p) => on_pool(p, move |p| p.has(volume, id)).await?.then_some(0),
    };
    let exists = ctx.store.backup(id).await?.is_some();
    let (steps, outcome) = match whole {
        Some(stored) if exists => (
            vec![
                Step::SetBackupStored(id, stored),
                Step::SetBackupStatus {
                    id,
                    from: vec![],
                    to: BackupStatus::Available,
                    reason: None,
                },
            ],
            format!("backup {id} was complete on its target: kept"),
        ),
        _ => {
            match &place {
                Place::Dir(d) => d.delete(id)?,
                Place::Pool(p) => {
                    on_pool(p, move |p| {
                        p.delete(volume, id)?;
                        p.abandon(volume)
                    })
                    .await?
                }
            }
            let steps = if exists {
                vec![Step::DeleteBackup(id)]
            } else {
                vec![]
            };
            (steps, format!("unfinished backup {id} removed"))
        }
    };
    let mut steps = steps;
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(outcome)
}

/// Deletes a backup (see the module docs).
pub(crate) async fn delete(ctx: &Ctx, id: BackupId) -> Result<Backup> {
    let b = ctx
        .store
        .backup(id)
        .await?
        .ok_or_else(|| Error::not_found("backup", id))?;
    ctx.locked([b.volume_id.into()], async {
        let b = ctx
            .store
            .backup(id)
            .await?
            .ok_or_else(|| Error::not_found("backup", id))?;
        let place = stored_at(ctx, &b.target).await?;
        let op = ctx
            .begin(
                vec![
                    Step::BackupHasNoChildren(id),
                    Step::SetBackupStatus {
                        id,
                        from: vec![BackupStatus::Available, BackupStatus::Error],
                        to: BackupStatus::Deleting,
                        reason: None,
                    },
                ],
                NewOp::of(DELETE, b.volume_id, Some(b.snapshot_id))
                    .payload(serde_json::json!({"backup": id.to_string(), "target": b.target})),
                |c| match c.found.as_deref() {
                    Some("builds on it") => Error::busy(
                        format!(
                            "backup {id} is the base of backup {}; delete that first",
                            c.id
                        ),
                        vec![c.id.clone()],
                    ),
                    _ => conflict_error(c, "delete backup", "available or error"),
                },
            )
            .await?;
        crash_point(DELETE, "before_remove");
        match remove_from(&place, b.volume_id, id).await {
            Ok(()) => {
                ctx.finish(vec![Step::DeleteBackup(id), Step::FinishOp(op)])
                    .await?;
                Ok(b)
            }
            Err(e) => {
                ctx.finish(vec![
                    Step::SetBackupStatus {
                        id,
                        from: vec![],
                        to: BackupStatus::Error,
                        reason: Some(format!("delete failed: {e}")),
                    },
                    Step::FinishOp(op),
                ])
                .await?;
                Err(e)
            }
        }
    })
    .await
}

/// Recovery of a delete: removes the files (again) and the record.
pub(crate) async fn recover_delete(ctx: &Ctx, op: &Operation) -> Result<String> {
    let (id, target) = journaled(op)?;
    let place = stored_at(ctx, &target.to_string()).await?;
    remove_from(&place, op.volume_id, id).await?;
    let mut steps = vec![];
    if ctx.store.backup(id).await?.is_some() {
        steps.push(Step::DeleteBackup(id));
    }
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(format!("delete of backup {id} completed"))
}

/// The backups `id` needs, base first, ending with `id` itself; each must be available.
pub(crate) async fn chain(ctx: &Ctx, id: BackupId) -> Result<Vec<Backup>> {
    let mut out = Vec::new();
    let mut next = Some(id);
    while let Some(b) = next {
        if out.len() > MAX_CHAIN {
            return Err(Error::store(format!(
                "backup {id}: its chain of parents loops"
            )));
        }
        let rec = ctx
            .store
            .backup(b)
            .await?
            .ok_or_else(|| Error::not_found("backup", b))?;
        if rec.status != BackupStatus::Available {
            return Err(Error::wrong_state(format!(
                "backup {} is {}; it must be available",
                rec.id, rec.status
            )));
        }
        next = rec.parent_id;
        out.push(rec);
    }
    out.reverse();
    Ok(out)
}

/// One stored backup, opened for reading: its directory and checked manifest.
pub(crate) struct Stored {
    /// The record.
    pub backup: Backup,
    /// Its directory target.
    pub dir: DirTarget,
    /// Its manifest (matching the record).
    pub manifest: Manifest,
}

/// Opens every backup of `chain` (reads and checks the manifests; no data yet).
pub(crate) fn open_chain(chain: Vec<Backup>) -> Result<Vec<Stored>> {
    chain
        .into_iter()
        .map(|b| {
            let Target::Dir(root) = Target::parse(&b.target)? else {
                return Err(Error::store(format!(
                    "backup {} is not in a directory",
                    b.id
                )));
            };
            let dir = DirTarget::at(&root);
            let manifest = dir.manifest(b.id)?;
            let parent = b.parent_id.map(|p| p.to_string());
            if manifest.snapshot_id != b.snapshot_id.to_string()
                || manifest.parent_id != parent
                || manifest.size_bytes != b.size_bytes
            {
                return Err(damaged(
                    b.id,
                    "its manifest does not describe this backup (snapshot, parent or size)",
                ));
            }
            Ok(Stored {
                backup: b,
                dir,
                manifest,
            })
        })
        .collect()
}

/// The error for a backup whose stored data is not what was written.
pub(crate) fn damaged(id: BackupId, what: impl std::fmt::Display) -> Error {
    Error::backend("read backup", format!("backup {id} is damaged: {what}"))
}

/// Turns a stored stream that does not read as one (a chunk that fails its checksum or is
/// missing, a broken record) into [`damaged`]; other errors (the volume's writes, a
/// refusal) stay what they are.
pub(crate) fn as_damaged(id: BackupId) -> impl Fn(Error) -> Error {
    move |e| match e.kind() {
        ErrorKind::InvalidInput => damaged(id, e.message()),
        _ => e,
    }
}
