//! The snapshot service: owns every status transition, journals each driver call, and
//! resolves operations a crash left unfinished.
//!
//! Every mutation follows one pattern:
//! 1. take the per-volume lock(s) (serializes tasks and processes on one volume);
//! 2. one store batch: guards (compare-and-set on statuses) + the transitional status +
//!    a journal entry for the operation — all or nothing;
//! 3. the driver call (with `crash_point!`s on both sides of it);
//! 4. one store batch with the result that also removes the journal entry.
//!
//! A crash between 2 and 4 leaves a journal entry whose volume lock is free; [`Service::recover`]
//! finds it and finishes or rolls back the operation by asking the backend what exists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use tracing::{info, warn};

use crate::crash_point;
use crate::driver::{SnapshotReader, VolumeDriver};
use crate::error::{Error, ErrorKind, Result};
use crate::locks::{VolumeGuard, VolumeLocks};
use crate::progress::{ProgressHandle, no_progress};
use crate::store::{Batch, Conflict, OpId, OpKind, Operation, Step, Store};
use crate::types::{
    Attachment, Capabilities, Extent, InstanceId, Snapshot, SnapshotId, SnapshotStatus, Volume,
    VolumeId, VolumeStatus,
};
use crate::validate::{check_size, validate_device, validate_label};

/// What `create_volume` needs.
#[derive(Debug, Clone, Default)]
pub struct CreateVolume {
    /// Size in bytes; required unless `source_snapshot` is given (then defaults to its size).
    pub size_bytes: Option<u64>,
    /// Backend name; defaults to the service's default backend (or the snapshot's backend).
    pub backend: Option<String>,
    /// Optional label.
    pub name: Option<String>,
    /// Create the volume from this snapshot (lineage is recorded).
    pub source_snapshot: Option<SnapshotId>,
}

/// A node of `snapshot tree`: a volume, its snapshots, and the volumes cloned from each.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeNode {
    /// The volume.
    pub volume: Volume,
    /// Its snapshots, oldest first, each with its clones.
    pub snapshots: Vec<SnapshotNode>,
}

/// A snapshot in the lineage tree.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotNode {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Volumes created from it.
    pub clones: Vec<VolumeNode>,
}

/// What recovery did with one unfinished operation.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryAction {
    /// The operation found in the journal.
    pub operation: Operation,
    /// What was done about it.
    pub outcome: String,
}

/// A backend as the service sees it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendInfo {
    /// Configured name.
    pub name: String,
    /// Driver kind ("file", "lvm", "rbd").
    pub driver: String,
    /// Whether it is the default backend for new volumes.
    pub default: bool,
    /// Why the backend could not be opened, when it could not.
    pub unavailable: Option<String>,
    /// What it can do.
    pub capabilities: Capabilities,
}

/// A configured backend: its driver and the driver kind's name.
pub struct Backend {
    /// Driver kind, for display ("file", "lvm", "rbd").
    pub kind: String,
    /// The driver, or why it could not be opened (cluster down, volume group missing).
    /// An unavailable backend is listed, and every operation on it is refused before the
    /// store is touched, so nothing is left half-made on it.
    pub driver: std::result::Result<Arc<dyn VolumeDriver>, String>,
}

/// The service. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Service {
    store: Arc<dyn Store>,
    backends: BTreeMap<String, Backend>,
    default_backend: String,
    locks: VolumeLocks,
}

/// Recovery's maximum lineage depth when walking trees; deeper means a corrupt store.
const MAX_TREE_DEPTH: usize = 256;

fn conflict_error(c: &Conflict, action: &str, needed: &str) -> Error {
    match &c.found {
        None => Error::NotFound {
            what: c.what,
            id: c.id.clone(),
        },
        Some(found) => Error::WrongState(format!(
            "cannot {action}: {} {} is {found}; it must be {needed}",
            c.what, c.id
        )),
    }
}

fn committed(
    r: std::result::Result<Option<OpId>, Conflict>,
    action: &str,
    needed: &str,
) -> Result<Option<OpId>> {
    r.map_err(|c| conflict_error(&c, action, needed))
}

async fn timed<T>(
    op: &str,
    id: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let start = Instant::now();
    let r = fut.await;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &r {
        Ok(_) => info!(op, id, elapsed_ms = ms, "driver call done"),
        // The caller reports the error; at info so the CLI keeps its one-line promise.
        Err(e) => info!(op, id, elapsed_ms = ms, error = %e, "driver call failed"),
    }
    r
}

impl Service {
    /// Builds the service. `lock_dir` holds the per-volume lock files and must be shared by
    /// every kiln process using the same store.
    pub fn new(
        store: Arc<dyn Store>,
        backends: BTreeMap<String, Backend>,
        default_backend: String,
        lock_dir: std::path::PathBuf,
    ) -> Result<Self> {
        if !backends.contains_key(&default_backend) {
            return Err(Error::Config(format!(
                "default backend {default_backend:?} is not configured"
            )));
        }
        Ok(Service {
            store,
            backends,
            default_backend,
            locks: VolumeLocks::new(lock_dir)?,
        })
    }

    /// The store (read access for listings).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The driver of a configured backend (for benchmarks and diagnostics; mutations go
    /// through the service's own methods).
    pub fn backend_driver(&self, backend: &str) -> Result<Arc<dyn VolumeDriver>> {
        self.driver(backend).cloned()
    }

    fn driver(&self, backend: &str) -> Result<&Arc<dyn VolumeDriver>> {
        let b = self.backends.get(backend).ok_or_else(|| Error::NotFound {
            what: "backend",
            id: backend.to_string(),
        })?;
        b.driver.as_ref().map_err(|reason| {
            Error::backend(
                "open backend",
                format!("backend {backend} is unavailable: {reason}"),
            )
        })
    }

    /// The configured backends with their capabilities.
    pub fn backends(&self) -> Vec<BackendInfo> {
        self.backends
            .iter()
            .map(|(name, b)| BackendInfo {
                name: name.clone(),
                driver: b.kind.clone(),
                default: *name == self.default_backend,
                capabilities: b
                    .driver
                    .as_ref()
                    .map(|d| d.capabilities())
                    .unwrap_or_default(),
                unavailable: b.driver.as_ref().err().cloned(),
            })
            .collect()
    }

    /// Capacity and usage of one backend.
    pub async fn backend_stats(&self, name: &str) -> Result<crate::types::BackendStats> {
        self.driver(name)?.stats().await
    }

    /// One volume.
    pub fn volume(&self, id: VolumeId) -> Result<Volume> {
        self.store.volume(id)?.ok_or_else(|| Error::NotFound {
            what: "volume",
            id: id.to_string(),
        })
    }

    /// One snapshot.
    pub fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        self.store.snapshot(id)?.ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: id.to_string(),
        })
    }

    /// All volumes.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        self.store.volumes()
    }

    /// Snapshots of one volume (which must exist) or of all volumes.
    pub fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        if let Some(v) = volume {
            self.volume(v)?;
        }
        self.store.snapshots(volume)
    }

    /// One snapshot, after asking its backend whether its data is still usable: an
    /// `available` snapshot the backend reports as broken (e.g. an overflowed LVM thick
    /// snapshot) is marked `error` with the backend's reason first.
    pub async fn snapshot_checked(&self, id: SnapshotId) -> Result<Snapshot> {
        self.refresh_health(self.snapshot(id)?).await
    }

    /// [`Service::snapshots`], with every `available` snapshot's health refreshed.
    pub async fn snapshots_checked(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for s in self.snapshots(volume)? {
            out.push(self.refresh_health(s).await?);
        }
        Ok(out)
    }

    async fn refresh_health(&self, s: Snapshot) -> Result<Snapshot> {
        if s.status != SnapshotStatus::Available {
            return Ok(s);
        }
        // An unavailable backend cannot say anything about its snapshots: keep the record.
        let Ok(driver) = self.driver(&s.backend) else {
            return Ok(s);
        };
        match driver.snapshot_health(&s).await {
            Ok(None) => Ok(s),
            Ok(Some(reason)) => {
                warn!(snapshot = %s.id, %reason, "backend reports the snapshot unusable; marking it error");
                // Compare-and-set: if someone else changed it meanwhile, their status stands.
                self.store
                    .commit(Batch::new(vec![Step::SetSnapshotStatus {
                        id: s.id,
                        from: vec![SnapshotStatus::Available],
                        to: SnapshotStatus::Error,
                        reason: Some(reason),
                    }]))?
                    .ok();
                self.snapshot(s.id)
            }
            // A failed probe says nothing about the snapshot; keep what the store knows.
            Err(e) => {
                info!(snapshot = %s.id, error = %e, "snapshot health probe failed");
                Ok(s)
            }
        }
    }

    // ---------------------------------------------------------------- volumes

    /// Creates a volume, empty or from a snapshot. On a driver failure the partial backend
    /// object is removed and no record is left; the error is returned.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<Volume> {
        if let Some(name) = &req.name {
            validate_label(name)?;
        }
        let source = match req.source_snapshot {
            Some(sid) => Some(self.snapshot_checked(sid).await?),
            None => None,
        };
        let backend = match (&req.backend, &source) {
            (Some(b), Some(s)) if *b != s.backend => {
                return Err(Error::invalid(
                    "backend",
                    format!(
                        "snapshot {} lives on backend {:?}; clones stay on their snapshot's backend",
                        s.id, s.backend
                    ),
                ));
            }
            (Some(b), _) => b.clone(),
            (None, Some(s)) => s.backend.clone(),
            (None, None) => self.default_backend.clone(),
        };
        let driver = self.driver(&backend)?.clone();
        let size_bytes = match (req.size_bytes, &source) {
            (Some(size), _) => check_size(size)?,
            (None, Some(s)) => s.size_bytes,
            (None, None) => return Err(Error::invalid("size", "a size is required")),
        };
        if let Some(s) = &source
            && size_bytes < s.size_bytes
        {
            return Err(Error::invalid(
                "size",
                format!(
                    "{size_bytes} bytes is smaller than snapshot {} ({} bytes)",
                    s.id, s.size_bytes
                ),
            ));
        }
        let now = Utc::now();
        let volume = Volume {
            id: VolumeId::new(),
            name: req.name.clone(),
            size_bytes,
            backend,
            status: VolumeStatus::Creating,
            status_reason: None,
            provider_location: None,
            source_snapshot_id: source.as_ref().map(|s| s.id),
            attachments: vec![],
            created_at: now,
            updated_at: now,
        };
        let mut lock_ids = vec![volume.id];
        if let Some(s) = &source {
            lock_ids.push(s.volume_id);
        }
        let _guards = self.locks.lock(&lock_ids).await?;

        let mut steps = vec![Step::InsertVolume(volume.clone())];
        let kind = match &source {
            Some(s) => {
                steps.push(Step::SnapshotIn {
                    id: s.id,
                    any_of: vec![SnapshotStatus::Available],
                });
                OpKind::CreateVolumeFromSnapshot
            }
            None => OpKind::CreateVolume,
        };
        let op = committed(
            self.store.commit(Batch::with_op(
                steps,
                kind,
                volume.id,
                source.as_ref().map(|s| s.id),
            ))?,
            "create a volume from it",
            "available",
        )?
        .ok_or_else(|| Error::Store("no operation id returned".into()))?;

        crash_point!("create_volume::before_driver");
        let result = match &source {
            Some(s) => {
                timed(
                    "create_volume_from_snapshot",
                    &volume.id.to_string(),
                    driver.create_volume_from_snapshot(&volume, s, no_progress()),
                )
                .await
            }
            None => {
                timed(
                    "create_volume",
                    &volume.id.to_string(),
                    driver.create_volume(&volume),
                )
                .await
            }
        };
        crash_point!("create_volume::after_driver");
        match result {
            Ok(update) => {
                self.finish(vec![
                    Step::SetVolumeStatus {
                        id: volume.id,
                        from: vec![VolumeStatus::Creating],
                        to: VolumeStatus::Available,
                        reason: None,
                    },
                    Step::SetVolumeLocation(volume.id, update.provider_location),
                    Step::FinishOp(op),
                ])?;
                self.volume(volume.id)
            }
            Err(e) => {
                self.undo_create_volume(&driver, &volume, op, &e).await?;
                Err(e)
            }
        }
    }

    /// After a failed create: remove the partial backend object and the record; if the
    /// backend refuses, keep the record in `error` so nothing is left untracked.
    async fn undo_create_volume(
        &self,
        driver: &Arc<dyn VolumeDriver>,
        v: &Volume,
        op: OpId,
        cause: &Error,
    ) -> Result<()> {
        match driver.delete_volume(v).await {
            Ok(()) => self.finish(vec![Step::DeleteVolume(v.id), Step::FinishOp(op)]),
            Err(cleanup) => self.finish(vec![
                Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![],
                    to: VolumeStatus::Error,
                    reason: Some(format!(
                        "create failed ({cause}); cleanup failed too ({cleanup})"
                    )),
                },
                Step::FinishOp(op),
            ]),
        }
    }

    /// Applies a batch whose guards are expected to hold (we hold the volume lock).
    fn finish(&self, steps: Vec<Step>) -> Result<()> {
        self.store
            .commit(Batch::new(steps))?
            .map(|_| ())
            .map_err(|c| {
                Error::Store(format!(
                    "unexpected concurrent change of {} {} (now {:?})",
                    c.what, c.id, c.found
                ))
            })
    }

    /// Deletes a volume. Refused while it is attached or has snapshots, unless `cascade`,
    /// which deletes its snapshots first (oldest first; stops at the first failure).
    pub async fn delete_volume(&self, id: VolumeId, cascade: bool) -> Result<()> {
        let v = self.volume(id)?;
        let driver = self.driver(&v.backend)?.clone();
        let deletable = vec![
            VolumeStatus::Available,
            VolumeStatus::Error,
            VolumeStatus::ErrorDeleting,
        ];
        let clones: Vec<VolumeId> = self
            .store
            .snapshots(Some(id))?
            .iter()
            .map(|s| self.store.volumes_from_snapshot(s.id))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .map(|c| c.id)
            .collect();
        let mut lock_ids = vec![id];
        lock_ids.extend(clones);
        let _guards = self.locks.lock(&lock_ids).await?;
        let needed = "available, error or error_deleting (detach it first if it is in-use)";
        if cascade {
            committed(
                self.store.commit(Batch::new(vec![Step::VolumeIn {
                    id,
                    any_of: deletable.clone(),
                }]))?,
                "delete volume",
                needed,
            )?;
            for s in self.store.snapshots(Some(id))? {
                self.delete_snapshot_locked(&driver, s, false).await?;
            }
        }
        let r = self.store.commit(Batch::with_op(
            vec![
                Step::SetVolumeStatus {
                    id,
                    from: deletable,
                    to: VolumeStatus::Deleting,
                    reason: None,
                },
                Step::VolumeHasNoSnapshots(id),
            ],
            OpKind::DeleteVolume,
            id,
            None,
        ))?;
        let op = match r {
            Ok(op) => op.ok_or_else(|| Error::Store("no operation id returned".into()))?,
            Err(c) if c.step == 1 => {
                return Err(Error::WrongState(format!(
                    "cannot delete volume {id}: it has {} snapshot(s); delete them first or use --cascade",
                    c.found.unwrap_or_default()
                )));
            }
            Err(c) => return Err(conflict_error(&c, "delete volume", needed)),
        };
        crash_point!("delete_volume::before_driver");
        let result = timed("delete_volume", &id.to_string(), driver.delete_volume(&v)).await;
        crash_point!("delete_volume::after_driver");
        self.finish_delete_volume(id, op, result)
    }

    fn finish_delete_volume(&self, id: VolumeId, op: OpId, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => self.finish(vec![Step::DeleteVolume(id), Step::FinishOp(op)]),
            Err(e) => {
                // Busy means the backend refused before touching anything.
                let to = if e.kind() == ErrorKind::Busy {
                    VolumeStatus::Available
                } else {
                    VolumeStatus::ErrorDeleting
                };
                self.finish(vec![
                    Step::SetVolumeStatus {
                        id,
                        from: vec![],
                        to,
                        reason: Some(e.to_string()),
                    },
                    Step::FinishOp(op),
                ])?;
                Err(e)
            }
        }
    }

    /// Records an attachment: `available` -> `in-use`.
    pub async fn attach(&self, id: VolumeId, instance: InstanceId, device: &str) -> Result<Volume> {
        validate_device(device)?;
        self.volume(id)?;
        let _g = self.locks.lock(&[id]).await?;
        let a = Attachment {
            instance_id: instance,
            device: device.to_string(),
            attached_at: Utc::now(),
        };
        committed(
            self.store.commit(Batch::new(vec![
                Step::SetVolumeStatus {
                    id,
                    from: vec![VolumeStatus::Available],
                    to: VolumeStatus::InUse,
                    reason: None,
                },
                Step::Attach(id, a),
            ]))?,
            "attach volume",
            "available",
        )?;
        self.volume(id)
    }

    /// Removes the attachment: `in-use` -> `available`.
    pub async fn detach(&self, id: VolumeId) -> Result<Volume> {
        self.volume(id)?;
        let _g = self.locks.lock(&[id]).await?;
        committed(
            self.store.commit(Batch::new(vec![
                Step::SetVolumeStatus {
                    id,
                    from: vec![VolumeStatus::InUse],
                    to: VolumeStatus::Available,
                    reason: None,
                },
                Step::Detach(id),
            ]))?,
            "detach volume",
            "in-use",
        )?;
        self.volume(id)
    }

    // ---------------------------------------------------------------- snapshots

    /// Snapshots a volume. Without `force` the volume must be `available`; with `force`,
    /// `available` or `in-use` (then the driver's `create_snapshot_force` runs with the
    /// attachment). On a driver failure nothing is left behind and the error is returned.
    pub async fn create_snapshot(
        &self,
        volume_id: VolumeId,
        name: Option<String>,
        force: bool,
    ) -> Result<Snapshot> {
        if let Some(n) = &name {
            validate_label(n)?;
        }
        self.volume(volume_id)?;
        let _g = self.locks.lock(&[volume_id]).await?;
        let v = self.volume(volume_id)?;
        let driver = self.driver(&v.backend)?.clone();
        let allowed = if force {
            vec![VolumeStatus::Available, VolumeStatus::InUse]
        } else {
            vec![VolumeStatus::Available]
        };
        let needed = if force {
            "available or in-use"
        } else {
            "available (use --force to snapshot an attached volume)"
        };
        let now = Utc::now();
        let snap = Snapshot {
            id: SnapshotId::new(),
            volume_id,
            name,
            size_bytes: v.size_bytes,
            backend: v.backend.clone(),
            status: SnapshotStatus::Creating,
            status_reason: None,
            provider_location: None,
            forced: v.status == VolumeStatus::InUse,
            created_at: now,
            updated_at: now,
        };
        let op = committed(
            self.store.commit(Batch::with_op(
                vec![
                    Step::VolumeIn {
                        id: volume_id,
                        any_of: allowed,
                    },
                    Step::InsertSnapshot(snap.clone()),
                ],
                OpKind::CreateSnapshot,
                volume_id,
                Some(snap.id),
            ))?,
            "snapshot volume",
            needed,
        )?
        .ok_or_else(|| Error::Store("no operation id returned".into()))?;

        crash_point!("create_snapshot::before_driver");
        let sid = snap.id.to_string();
        let result = match v.attachments.first() {
            Some(a) if v.status == VolumeStatus::InUse => {
                timed(
                    "create_snapshot_force",
                    &sid,
                    driver.create_snapshot_force(&snap, &v, a),
                )
                .await
            }
            _ => timed("create_snapshot", &sid, driver.create_snapshot(&snap, &v)).await,
        };
        crash_point!("create_snapshot::after_driver");
        match result {
            Ok(update) => {
                self.finish(vec![
                    Step::SetSnapshotStatus {
                        id: snap.id,
                        from: vec![SnapshotStatus::Creating],
                        to: SnapshotStatus::Available,
                        reason: None,
                    },
                    Step::SetSnapshotLocation(snap.id, update.provider_location),
                    Step::FinishOp(op),
                ])?;
                self.snapshot(snap.id)
            }
            Err(e) => {
                match driver.delete_snapshot(&snap).await {
                    Ok(()) => {
                        self.finish(vec![Step::DeleteSnapshot(snap.id), Step::FinishOp(op)])?
                    }
                    Err(cleanup) => self.finish(vec![
                        Step::SetSnapshotStatus {
                            id: snap.id,
                            from: vec![],
                            to: SnapshotStatus::Error,
                            reason: Some(format!(
                                "create failed ({e}); cleanup failed too ({cleanup})"
                            )),
                        },
                        Step::FinishOp(op),
                    ])?,
                }
                Err(e)
            }
        }
    }

    /// Deletes a snapshot. When backend clones depend on it the result is `Busy` naming
    /// them and the snapshot stays `available`; with `flatten_dependents`, kiln first
    /// flattens the dependent volumes it knows (its lineage records), then deletes.
    pub async fn delete_snapshot(&self, id: SnapshotId, flatten_dependents: bool) -> Result<()> {
        let s = self.snapshot(id)?;
        let driver = self.driver(&s.backend)?.clone();
        let mut lock_ids = vec![s.volume_id];
        lock_ids.extend(self.store.volumes_from_snapshot(id)?.iter().map(|c| c.id));
        let _g = self.locks.lock(&lock_ids).await?;
        let s = self.snapshot(id)?;
        self.delete_snapshot_locked(&driver, s, flatten_dependents)
            .await
    }

    async fn delete_snapshot_locked(
        &self,
        driver: &Arc<dyn VolumeDriver>,
        s: Snapshot,
        flatten_dependents: bool,
    ) -> Result<()> {
        let id = s.id;
        let op = committed(
            self.store.commit(Batch::with_op(
                vec![Step::SetSnapshotStatus {
                    id,
                    from: vec![
                        SnapshotStatus::Available,
                        SnapshotStatus::Error,
                        SnapshotStatus::ErrorDeleting,
                    ],
                    to: SnapshotStatus::Deleting,
                    reason: None,
                }],
                OpKind::DeleteSnapshot,
                s.volume_id,
                Some(id),
            ))?,
            "delete snapshot",
            "available, error or error_deleting",
        )?
        .ok_or_else(|| Error::Store("no operation id returned".into()))?;
        crash_point!("delete_snapshot::before_driver");
        let mut result = timed(
            "delete_snapshot",
            &id.to_string(),
            driver.delete_snapshot(&s),
        )
        .await;
        if flatten_dependents && matches!(&result, Err(e) if e.kind() == ErrorKind::Busy) {
            result = self.flatten_clones_then_delete(driver, &s).await;
        }
        crash_point!("delete_snapshot::after_driver");
        match result {
            Ok(()) => self.finish(vec![Step::DeleteSnapshot(id), Step::FinishOp(op)]),
            Err(e) => {
                // Busy: the backend refused before touching anything (Cinder does the same).
                let to = if e.kind() == ErrorKind::Busy {
                    SnapshotStatus::Available
                } else {
                    SnapshotStatus::ErrorDeleting
                };
                let reason = (to == SnapshotStatus::ErrorDeleting).then(|| e.to_string());
                self.finish(vec![
                    Step::SetSnapshotStatus {
                        id,
                        from: vec![],
                        to,
                        reason,
                    },
                    Step::FinishOp(op),
                ])?;
                Err(e)
            }
        }
    }

    async fn flatten_clones_then_delete(
        &self,
        driver: &Arc<dyn VolumeDriver>,
        s: &Snapshot,
    ) -> Result<()> {
        for clone in self.store.volumes_from_snapshot(s.id)? {
            info!(snapshot = %s.id, volume = %clone.id, "flattening dependent volume before deleting its snapshot");
            timed(
                "flatten_volume",
                &clone.id.to_string(),
                driver.flatten_volume(&clone, no_progress()),
            )
            .await?;
        }
        timed(
            "delete_snapshot",
            &s.id.to_string(),
            driver.delete_snapshot(s),
        )
        .await
    }

    /// Reverts the snapshot's volume to it. Works for any snapshot of the volume (not only
    /// the latest) and keeps every snapshot. The volume must be `available` (detached).
    pub async fn revert(
        &self,
        snapshot_id: SnapshotId,
        progress: ProgressHandle,
    ) -> Result<Volume> {
        let s = self.snapshot(snapshot_id)?;
        let _g = self.locks.lock(&[s.volume_id]).await?;
        let s = self.snapshot_checked(snapshot_id).await?;
        let v = self.volume(s.volume_id)?;
        let driver = self.driver(&v.backend)?.clone();
        let op = committed(
            self.store.commit(Batch::with_op(
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
                OpKind::Revert,
                v.id,
                Some(s.id),
            ))?,
            "revert",
            "available (a volume must be detached to be reverted)",
        )?
        .ok_or_else(|| Error::Store("no operation id returned".into()))?;
        crash_point!("revert::before_driver");
        let result = timed(
            "revert_to_snapshot",
            &s.id.to_string(),
            driver.revert_to_snapshot(&v, &s, progress),
        )
        .await;
        crash_point!("revert::after_driver");
        self.finish_revert(&v, &s, op, result)?;
        self.volume(v.id)
    }

    fn finish_revert(&self, v: &Volume, s: &Snapshot, op: OpId, result: Result<()>) -> Result<()> {
        let (vstatus, reason, err) = match result {
            Ok(()) => (VolumeStatus::Available, None, None),
            Err(e) => (
                VolumeStatus::Error,
                Some(format!("revert to snapshot {} failed: {e}", s.id)),
                Some(e),
            ),
        };
        self.finish(vec![
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
            Step::FinishOp(op),
        ])?;
        err.map_or(Ok(()), Err)
    }

    /// Lineage from a volume: its snapshots, the volumes cloned from each, and so on.
    pub fn tree(&self, volume_id: VolumeId) -> Result<VolumeNode> {
        self.tree_at(self.volume(volume_id)?, 0)
    }

    fn tree_at(&self, volume: Volume, depth: usize) -> Result<VolumeNode> {
        if depth > MAX_TREE_DEPTH {
            return Err(Error::Store(format!(
                "lineage deeper than {MAX_TREE_DEPTH} levels at volume {}",
                volume.id
            )));
        }
        let mut snapshots = Vec::new();
        for s in self.store.snapshots(Some(volume.id))? {
            let clones = self
                .store
                .volumes_from_snapshot(s.id)?
                .into_iter()
                .map(|c| self.tree_at(c, depth + 1))
                .collect::<Result<Vec<_>>>()?;
            snapshots.push(SnapshotNode {
                snapshot: s,
                clones,
            });
        }
        Ok(VolumeNode { volume, snapshots })
    }

    /// Opens an `available` snapshot for reading. The returned reader holds the volume's lock,
    /// so the snapshot cannot be deleted or reverted to while it is read.
    pub async fn open_snapshot_reader(&self, id: SnapshotId) -> Result<LockedReader> {
        let s = self.snapshot(id)?;
        let guards = self.locks.lock(&[s.volume_id]).await?;
        let s = self.snapshot_checked(id).await?;
        if s.status != SnapshotStatus::Available {
            return Err(Error::WrongState(format!(
                "cannot read snapshot {id}: it is {}; it must be available",
                s.status
            )));
        }
        let reader = self.driver(&s.backend)?.open_snapshot_reader(&s).await?;
        Ok(LockedReader {
            reader,
            _guards: guards,
        })
    }

    // ---------------------------------------------------------------- recovery

    /// Resolves every journaled operation whose process is gone (its volume lock is free):
    /// creates are kept if the backend object exists (snapshots) or redone (volumes),
    /// else marked `error` with a reason; deletes and reverts are rolled forward.
    /// Operations still held by a live process are left alone, and so are those whose
    /// backend cannot answer right now (they stay journaled for the next start).
    pub async fn recover(&self) -> Result<Vec<RecoveryAction>> {
        let mut actions = Vec::new();
        for op in self.store.operations()? {
            let Some(guard) = self.locks.try_lock(op.volume_id)? else {
                continue;
            };
            // Re-check under the lock: the owner may have finished just before we took it.
            if !self.store.operations()?.iter().any(|o| o.id == op.id) {
                continue;
            }
            match self.recover_one(&op, guard).await {
                Ok(outcome) => {
                    warn!(op = op.kind.as_str(), volume = %op.volume_id, snapshot = ?op.snapshot_id, outcome = %outcome, "recovered an unfinished operation");
                    actions.push(RecoveryAction {
                        operation: op,
                        outcome,
                    });
                }
                // The backend cannot answer now (e.g. unreachable): keep the journal entry
                // for the next start rather than guess, and let kiln serve other backends.
                Err(e) => {
                    warn!(op = op.kind.as_str(), volume = %op.volume_id, error = %e, "cannot recover this operation yet; will retry on the next start")
                }
            }
        }
        Ok(actions)
    }

    async fn recover_one(&self, op: &Operation, _guard: VolumeGuard) -> Result<String> {
        let volume = self.store.volume(op.volume_id)?;
        let snapshot = match op.snapshot_id {
            Some(id) => self.store.snapshot(id)?,
            None => None,
        };
        let finish_only = |msg: &str| -> Result<String> {
            self.finish(vec![Step::FinishOp(op.id)])?;
            Ok(msg.to_string())
        };
        match op.kind {
            OpKind::CreateVolume | OpKind::CreateVolumeFromSnapshot => {
                let Some(v) = volume else {
                    return finish_only("volume record already gone");
                };
                let driver = self.driver(&v.backend)?.clone();
                // A half-made volume (an interrupted copy) may exist; redo it from scratch.
                let redo = async {
                    driver.delete_volume(&v).await?;
                    match (&op.kind, &snapshot) {
                        (OpKind::CreateVolumeFromSnapshot, Some(s)) => {
                            driver
                                .create_volume_from_snapshot(&v, s, no_progress())
                                .await
                        }
                        (OpKind::CreateVolumeFromSnapshot, None) => Err(Error::NotFound {
                            what: "snapshot",
                            id: format!("{:?}", op.snapshot_id),
                        }),
                        _ => driver.create_volume(&v).await,
                    }
                };
                match redo.await {
                    Ok(update) => {
                        self.finish(vec![
                            Step::SetVolumeStatus {
                                id: v.id,
                                from: vec![],
                                to: VolumeStatus::Available,
                                reason: None,
                            },
                            Step::SetVolumeLocation(v.id, update.provider_location),
                            Step::FinishOp(op.id),
                        ])?;
                        Ok("volume creation redone; volume available".into())
                    }
                    Err(e) => {
                        let reason =
                            format!("creation interrupted by a crash and could not be redone: {e}");
                        self.finish(vec![
                            Step::SetVolumeStatus {
                                id: v.id,
                                from: vec![],
                                to: VolumeStatus::Error,
                                reason: Some(reason.clone()),
                            },
                            Step::FinishOp(op.id),
                        ])?;
                        Ok(reason)
                    }
                }
            }
            OpKind::CreateSnapshot => {
                let Some(s) = snapshot else {
                    return finish_only("snapshot record already gone");
                };
                let driver = self.driver(&s.backend)?.clone();
                // A snapshot cannot be redone later (it would be another point in time):
                // keep it if the backend made it, else record why it is missing.
                if driver.snapshot_exists(&s).await? {
                    self.finish(vec![
                        Step::SetSnapshotStatus {
                            id: s.id,
                            from: vec![],
                            to: SnapshotStatus::Available,
                            reason: None,
                        },
                        Step::FinishOp(op.id),
                    ])?;
                    Ok("backend snapshot exists; snapshot available".into())
                } else {
                    let reason =
                        "creation interrupted by a crash before the backend snapshot was made"
                            .to_string();
                    self.finish(vec![
                        Step::SetSnapshotStatus {
                            id: s.id,
                            from: vec![],
                            to: SnapshotStatus::Error,
                            reason: Some(reason.clone()),
                        },
                        Step::FinishOp(op.id),
                    ])?;
                    Ok(reason)
                }
            }
            OpKind::DeleteSnapshot => {
                let Some(s) = snapshot else {
                    return finish_only("snapshot record already gone");
                };
                let driver = self.driver(&s.backend)?.clone();
                match driver.delete_snapshot(&s).await {
                    Ok(()) => {
                        self.finish(vec![Step::DeleteSnapshot(s.id), Step::FinishOp(op.id)])?;
                        Ok("snapshot deletion completed".into())
                    }
                    Err(e) => {
                        let to = if e.kind() == ErrorKind::Busy {
                            SnapshotStatus::Available
                        } else {
                            SnapshotStatus::ErrorDeleting
                        };
                        self.finish(vec![
                            Step::SetSnapshotStatus {
                                id: s.id,
                                from: vec![],
                                to,
                                reason: Some(e.to_string()),
                            },
                            Step::FinishOp(op.id),
                        ])?;
                        Ok(format!("snapshot deletion could not be completed: {e}"))
                    }
                }
            }
            OpKind::DeleteVolume => {
                let Some(v) = volume else {
                    return finish_only("volume record already gone");
                };
                let driver = self.driver(&v.backend)?.clone();
                let r = driver.delete_volume(&v).await;
                let msg = match &r {
                    Ok(()) => "volume deletion completed".to_string(),
                    Err(e) => format!("volume deletion could not be completed: {e}"),
                };
                // Errors are recorded on the volume; recovery itself succeeded.
                let _ = self.finish_delete_volume(v.id, op.id, r);
                Ok(msg)
            }
            OpKind::Revert => {
                let (Some(v), Some(s)) = (volume, snapshot) else {
                    return finish_only("volume or snapshot record already gone");
                };
                let driver = self.driver(&v.backend)?.clone();
                let r = driver.revert_to_snapshot(&v, &s, no_progress()).await;
                let msg = match &r {
                    Ok(()) => format!("revert to snapshot {} completed", s.id),
                    Err(e) => format!("revert to snapshot {} could not be completed: {e}", s.id),
                };
                let _ = self.finish_revert(&v, &s, op.id, r);
                Ok(msg)
            }
        }
    }
}

/// A snapshot reader that keeps its volume locked while it lives.
pub struct LockedReader {
    reader: Box<dyn SnapshotReader>,
    _guards: Vec<VolumeGuard>,
}

impl SnapshotReader for LockedReader {
    fn size(&self) -> u64 {
        self.reader.size()
    }
    fn extents(&self) -> &[Extent] {
        self.reader.extents()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read_at(offset, buf)
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
