//! The snapshot service: the facade the CLI (and later the API server) calls.
//!
//! It owns no protocol of its own: every mutation is an operation in [`crate::ops`] (forward
//! steps and recovery in one file, run by one executor), and reads go to the store. See
//! `docs/architecture.md` for the layers and the crash rules.

use std::sync::Arc;

use serde::Serialize;

use crate::backends::{BackendInfo, Backends};
use crate::driver::{CheckReport, SnapshotReader, VolumeDriver};
use crate::error::{Error, Result};
use crate::locks::{LockKey, LockManager, LockSet};
use crate::ops::{self, Ctx};
use crate::progress::{ProgressHandle, no_progress};
use crate::store::{AsyncStore, HistoryEntry, Store};
use crate::types::{
    DeleteAction, Extent, Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId, VolumeStatus,
};

pub use crate::ops::recovery::RecoveryAction;

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
    /// The project and attributes to record, and its quota to check, in the transaction
    /// that inserts the volume; `None`: the default project, unlimited.
    pub owner: Option<crate::attrs::Owner>,
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

/// The service. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Service {
    ctx: Ctx,
}

/// Recovery's maximum lineage depth when walking trees; deeper means a corrupt store.
const MAX_TREE_DEPTH: usize = 256;

mod backups;
mod image_transfer;
pub use backups::{BackupVerified, Pruned, RestoreTarget};
pub use image_transfer::{ExportedSnapshot, ImageExport, ImageExported};
mod instances;
pub use instances::InstanceSpec;

impl Service {
    /// Builds the service over `store`, `backends` (opened on first use) and `locks`.
    pub fn new(
        store: Arc<dyn Store>,
        backends: Backends,
        locks: Arc<dyn LockManager>,
    ) -> Result<Self> {
        backends.validate()?;
        Ok(Service {
            ctx: Ctx {
                store: AsyncStore::new(store),
                backends,
                locks,
                agents: None,
            },
        })
    }

    /// Gives the service access to guest agents (instance snapshots freeze through them;
    /// recovery thaws through them). Without it, instance snapshots are crash-consistent.
    pub fn with_agents(mut self, agents: Arc<dyn crate::agent::GuestAgents>) -> Self {
        self.ctx.agents = Some(agents);
        self
    }

    /// The store (async face), for listings and tests.
    pub fn store(&self) -> &AsyncStore {
        &self.ctx.store
    }

    /// The default backend for new volumes.
    pub fn default_backend(&self) -> &str {
        self.ctx.backends.default_name()
    }

    /// The driver of a configured backend, opened if needed (for benchmarks and
    /// diagnostics; mutations go through the service's own methods).
    pub async fn backend_driver(&self, backend: &str) -> Result<Arc<dyn VolumeDriver>> {
        self.ctx.driver(backend).await
    }

    /// The configured backends with their capabilities (opens every backend).
    pub async fn backends(&self) -> Vec<BackendInfo> {
        self.ctx.backends.infos().await
    }

    /// Capacity and usage of one backend.
    pub async fn backend_stats(&self, name: &str) -> Result<crate::types::BackendStats> {
        self.ctx.driver(name).await?.stats().await
    }

    // ---------------------------------------------------------------- reads (store only)

    /// One volume.
    pub async fn volume(&self, id: VolumeId) -> Result<Volume> {
        self.ctx.volume(id).await
    }

    /// One snapshot, as recorded. Read-only: no backend call.
    pub async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        self.ctx.snapshot(id).await
    }

    /// All volumes.
    pub async fn volumes(&self) -> Result<Vec<Volume>> {
        self.ctx.store.volumes().await
    }

    /// Snapshots of one volume (which must exist) or of all volumes, as recorded.
    /// Read-only and one store query: listings never probe backends.
    pub async fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        if let Some(v) = volume {
            self.ctx.volume(v).await?;
        }
        self.ctx.store.snapshots(volume).await
    }

    /// One snapshot after asking its backend whether its data is still usable (an
    /// `available` snapshot the backend reports broken is marked `error` first).
    pub async fn snapshot_checked(&self, id: SnapshotId) -> Result<Snapshot> {
        self.ctx.checked_snapshot(id).await
    }

    /// The status history (admin resets) of a volume or snapshot.
    pub async fn history(&self, object_id: &str) -> Result<Vec<HistoryEntry>> {
        self.ctx.store.history(object_id.to_string()).await
    }

    /// Lineage from a volume: its snapshots, the volumes cloned from each, and so on.
    pub async fn tree(&self, volume_id: VolumeId) -> Result<VolumeNode> {
        let root = self.ctx.volume(volume_id).await?;
        self.tree_at(root, 0).await
    }

    fn tree_at(
        &self,
        volume: Volume,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<VolumeNode>> + Send + '_>> {
        Box::pin(async move {
            if depth > MAX_TREE_DEPTH {
                return Err(Error::store(format!(
                    "lineage deeper than {MAX_TREE_DEPTH} levels at volume {}",
                    volume.id
                )));
            }
            let mut snapshots = Vec::new();
            for s in self.ctx.store.snapshots(Some(volume.id)).await? {
                let mut clones = Vec::new();
                for c in self.ctx.store.volumes_from_snapshot(s.id).await? {
                    clones.push(self.tree_at(c, depth + 1).await?);
                }
                snapshots.push(SnapshotNode {
                    snapshot: s,
                    clones,
                });
            }
            Ok(VolumeNode { volume, snapshots })
        })
    }

    // ---------------------------------------------------------------- operations

    /// Creates a volume, empty or from a snapshot. On a driver failure the partial backend
    /// object is removed and no record is left; the error is returned.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<Volume> {
        self.create_volume_with_progress(req, no_progress()).await
    }

    /// [`Service::create_volume`] reporting a clone's copy progress.
    pub async fn create_volume_with_progress(
        &self,
        req: CreateVolume,
        progress: ProgressHandle,
    ) -> Result<Volume> {
        if let Some(name) = &req.name {
            crate::validate::validate_label(name)?;
        }
        match req.source_snapshot {
            Some(sid) => {
                ops::clone::run(
                    &self.ctx,
                    sid,
                    req.size_bytes,
                    req.backend,
                    req.name,
                    req.owner.as_ref(),
                    progress,
                )
                .await
            }
            None => {
                let size = req
                    .size_bytes
                    .ok_or_else(|| Error::invalid("size", "a size is required"))?;
                let backend = req
                    .backend
                    .unwrap_or_else(|| self.ctx.backends.default_name().to_string());
                ops::create_volume::run(&self.ctx, size, backend, req.name, req.owner.as_ref())
                    .await
            }
        }
    }

    /// Deletes a volume (see [`crate::ops::delete_volume`]); says whether the backend
    /// object was still there.
    pub async fn delete_volume(&self, id: VolumeId, cascade: bool) -> Result<DeleteAction> {
        ops::delete_volume::run(&self.ctx, id, cascade).await
    }

    /// Records an attachment `a` (instance, device, boot index, bus, ...): `available` ->
    /// `in-use`. The device must be free on that instance.
    pub async fn attach(&self, id: VolumeId, mut a: crate::types::Attachment) -> Result<Volume> {
        crate::validate::validate_device(&a.device)?;
        crate::validate::validate_attachment(&a)?;
        self.ctx.volume(id).await?;
        self.ctx.locked([id.into(), LockKey::Instance(a.instance_id)], async {
        let v = self.ctx.volume(id).await?;
        a.qmp = self
            .ctx
            .store
            .instance(a.instance_id)
            .await?
            .and_then(|i| i.qmp);
        if a.qmp.is_none() && a.node.is_some() {
            return Err(Error::invalid(
                "block node",
                format!(
                    "instance {} has no QMP monitor (`instance create --qmp`) whose node it \
                     could name",
                    a.instance_id
                ),
            ));
        }
        if let Some(qmp) = a.qmp.clone()
            && v.status == VolumeStatus::Available
        {
            a.node = self.serving_node(&v, &qmp, a.node.take()).await?;
        }
        if let Some(other) = self
            .ctx
            .store
            .instance_volumes(a.instance_id)
            .await?
            .iter()
            .find(|v| v.attachments.iter().any(|x| x.device == a.device))
        {
            return Err(Error::wrong_state(format!(
                "cannot attach volume {id}: instance {} already has volume {} at {}",
                a.instance_id, other.id, a.device
            )));
        }
        self.ctx
            .guarded(
                vec![
                    crate::store::Step::SetVolumeStatus {
                        id,
                        from: vec![VolumeStatus::Available],
                        to: VolumeStatus::InUse,
                        reason: None,
                    },
                    crate::store::Step::Attach(id, a),
                ],
                |c| ops::conflict_error(c, "attach volume", "available"),
            )
            .await?;
        self.ctx.volume(id).await
        })
        .await
    }

    /// The block node of the hypervisor at `qmp` that has qcow2 volume `v`'s active file
    /// open: `given` if that node serves the file (an error if it serves another), else the
    /// node found by the file. When the monitor cannot be asked, or the volume is not a qcow2
    /// file (nothing to find), `given` as it is: the hypervisor may open the volume later,
    /// and an online snapshot looks the node up again.
    async fn serving_node(
        &self,
        v: &Volume,
        qmp: &str,
        given: Option<String>,
    ) -> Result<Option<String>> {
        let info = self
            .ctx
            .driver(&v.backend)
            .await?
            .connection_info(v)
            .await?;
        let active = match (info.data.get("format"), info.data.get("path")) {
            (Some(f), Some(serde_json::Value::String(p))) if f == "qcow2" => p.clone(),
            _ => return Ok(given),
        };
        let qmp = qmp.to_string();
        let vid = v.id;
        tokio::task::spawn_blocking(move || {
            let nodes = match crate::hypervisor::with_live_monitor(&qmp, |q| q.block_nodes()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(volume = %vid, error = %e, "cannot ask the hypervisor which node serves the volume; an online snapshot asks again");
                    return Ok(given);
                }
            };
            let serves = |n: &crate::hypervisor::qmp::BlockNode| {
                n.driver == "qcow2" && n.image_file() == active
            };
            match given {
                Some(g) => match nodes.iter().find(|n| n.node_name == g) {
                    None => Err(Error::invalid(
                        "block node",
                        format!("the hypervisor at {qmp} has no node {g:?}"),
                    )),
                    Some(n) if !serves(n) => Err(Error::invalid(
                        "block node",
                        format!(
                            "node {g:?} of the hypervisor at {qmp} has {} open, not volume \
                             {vid}'s active file {active}",
                            n.image_file()
                        ),
                    )),
                    Some(_) => Ok(Some(g)),
                },
                None => Ok(nodes.iter().find(|n| serves(n)).map(|n| n.node_name.clone())),
            }
        })
        .await
        .map_err(|e| Error::backend("attach", format!("worker failed: {e}")))?
    }

    /// Removes the attachment: `in-use` -> `available`.
    pub async fn detach(&self, id: VolumeId) -> Result<Volume> {
        self.ctx.volume(id).await?;
        self.ctx
            .locked([id.into()], async {
                self.ctx
                    .guarded(
                        vec![
                            crate::store::Step::SetVolumeStatus {
                                id,
                                from: vec![VolumeStatus::InUse],
                                to: VolumeStatus::Available,
                                reason: None,
                            },
                            crate::store::Step::Detach(id),
                        ],
                        |c| ops::conflict_error(c, "detach volume", "in-use"),
                    )
                    .await?;
                self.ctx.volume(id).await
            })
            .await
    }

    /// Snapshots a volume. Without `force` the volume must be `available`; with `force`,
    /// `available` or `in-use` (then the driver's `create_snapshot_force` runs with the
    /// attachment). On a driver failure nothing is left behind and the error is returned.
    pub async fn create_snapshot(
        &self,
        volume_id: VolumeId,
        name: Option<String>,
        force: bool,
    ) -> Result<Snapshot> {
        ops::create_snapshot::run(&self.ctx, volume_id, name, force, None).await
    }

    /// [`Service::create_snapshot`] on behalf of `owner`: its attributes are recorded and
    /// its quota checked in the transaction that inserts the snapshot.
    pub async fn create_snapshot_owned(
        &self,
        volume_id: VolumeId,
        name: Option<String>,
        force: bool,
        owner: &crate::attrs::Owner,
    ) -> Result<Snapshot> {
        ops::create_snapshot::run(&self.ctx, volume_id, name, force, Some(owner)).await
    }

    /// Snapshots several volumes (on any backends) as one unit: all or nothing. See
    /// [`crate::ops::group_snapshot`].
    pub async fn create_group_snapshot(
        &self,
        volumes: &[VolumeId],
        name: Option<String>,
        force: bool,
    ) -> Result<Vec<Snapshot>> {
        ops::group_snapshot::run(&self.ctx, volumes, name, force).await
    }

    /// Deletes a snapshot. When backend clones depend on it the result is `Busy` naming
    /// them and the snapshot keeps its status; with `flatten_dependents`, kiln first
    /// flattens the dependent volumes it knows (its lineage records), then deletes.
    pub async fn delete_snapshot(
        &self,
        id: SnapshotId,
        flatten_dependents: bool,
    ) -> Result<DeleteAction> {
        self.delete_snapshot_with_progress(id, flatten_dependents, crate::progress::no_progress())
            .await
    }

    /// [`Service::delete_snapshot`], reporting the bytes a merge copies (a qcow2 snapshot of
    /// an attached volume is merged by the hypervisor's block job) to `progress`.
    pub async fn delete_snapshot_with_progress(
        &self,
        id: SnapshotId,
        flatten_dependents: bool,
        progress: ProgressHandle,
    ) -> Result<DeleteAction> {
        ops::delete_snapshot::run(&self.ctx, id, flatten_dependents, progress).await
    }

    /// Reverts the snapshot's volume to it. Works for any snapshot of the volume (not only
    /// the latest) and keeps every snapshot. The volume must be `available` (detached).
    pub async fn revert(
        &self,
        snapshot_id: SnapshotId,
        progress: ProgressHandle,
    ) -> Result<Volume> {
        ops::revert::run(&self.ctx, snapshot_id, progress).await
    }

    /// Makes a cloned volume independent of its snapshot.
    pub async fn flatten_volume(&self, id: VolumeId, progress: ProgressHandle) -> Result<Volume> {
        ops::flatten::run(&self.ctx, id, progress).await
    }

    /// Admin: sets a volume's status (Cinder's `os-reset_status`), recording the old status
    /// and the reason in its history. Refused while an operation on it runs.
    pub async fn reset_volume_state(
        &self,
        id: VolumeId,
        to: VolumeStatus,
        reason: Option<String>,
    ) -> Result<Volume> {
        ops::reset_state::volume(&self.ctx, id, to, reason).await
    }

    /// Admin: sets a snapshot's status, like [`Service::reset_volume_state`].
    pub async fn reset_snapshot_state(
        &self,
        id: SnapshotId,
        to: SnapshotStatus,
        reason: Option<String>,
    ) -> Result<Snapshot> {
        ops::reset_state::snapshot(&self.ctx, id, to, reason).await
    }

    /// Admin: compares what the backend records about a volume with its objects (e.g. a
    /// qcow2 chain record with the qcow2 headers), and with `repair` fixes what is safe.
    /// Holds the volume's lock; refused while an operation on it is unfinished.
    pub async fn check_volume(&self, id: VolumeId, repair: bool) -> Result<CheckReport> {
        let v = self.ctx.volume(id).await?;
        let driver = self.ctx.driver(&v.backend).await?;
        let Some(check) = driver.check() else {
            return Err(Error::unsupported(format!(
                "backend {} has no consistency check",
                v.backend
            )));
        };
        self.ctx.locked([id.into()], async {
        if let Some(op) = self
            .ctx
            .store
            .operations()
            .await?
            .into_iter()
            .find(|o| o.volume_id == id)
        {
            return Err(Error::wrong_state(format!(
                "cannot check volume {id}: operation {} ({}) on it is unfinished; the next kiln start recovers it",
                op.id.0, op.kind
            )));
        }
        let v = self.ctx.volume(id).await?;
        tokio::task::spawn_blocking(move || check.check_volume(&v, repair))
            .await
            .map_err(|e| Error::backend("check", format!("worker thread failed: {e}")))?
        })
        .await
    }

    /// What a hypervisor needs to open the volume now (Cinder's `initialize_connection`).
    pub async fn connection_info(&self, id: VolumeId) -> Result<crate::types::ConnectionInfo> {
        let v = self.ctx.volume(id).await?;
        self.ctx.driver(&v.backend).await?.connection_info(&v).await
    }

    /// Opens an `available` snapshot for reading. The returned reader holds the volume's
    /// lock, so the snapshot cannot be deleted or reverted to while it is read.
    pub async fn open_snapshot_reader(&self, id: SnapshotId) -> Result<LockedReader> {
        let s = self.ctx.snapshot(id).await?;
        let locks = self.ctx.lock([LockKey::from(s.volume_id)]).await?;
        let s = self.ctx.checked_snapshot(id).await?;
        if s.status != SnapshotStatus::Available {
            return Err(Error::wrong_state(format!(
                "cannot read snapshot {id}: it is {}; it must be available",
                s.status
            )));
        }
        let reader = self
            .ctx
            .driver(&s.backend)
            .await?
            .open_snapshot_reader(&s)
            .await?;
        Ok(LockedReader::new(reader, Arc::new(locks)))
    }

    /// Opens snapshot `to` as a diff stream source: the whole snapshot, or with `from` (an
    /// older available snapshot of the same volume) only what changed since it, as the
    /// backend tracks it (or by comparing both images when it does not). The volume stays
    /// locked while the source lives.
    pub async fn open_delta(
        &self,
        to: SnapshotId,
        from: Option<SnapshotId>,
    ) -> Result<crate::delta::DeltaSource> {
        let s = self.ctx.snapshot(to).await?;
        let locks = self.ctx.lock([LockKey::from(s.volume_id)]).await?;
        let readable = |s: &Snapshot| {
            if s.status == SnapshotStatus::Available {
                Ok(())
            } else {
                Err(Error::wrong_state(format!(
                    "cannot read snapshot {}: it is {}; it must be available",
                    s.id, s.status
                )))
            }
        };
        let s = self.ctx.checked_snapshot(to).await?;
        readable(&s)?;
        let older = match from {
            None => None,
            Some(f) => {
                let o = self.ctx.checked_snapshot(f).await?;
                if o.volume_id != s.volume_id || o.id == s.id || o.created_at > s.created_at {
                    return Err(Error::invalid(
                        "--from",
                        format!(
                            "snapshot {f} is not an older snapshot of volume {} than {to}",
                            s.volume_id
                        ),
                    ));
                }
                readable(&o)?;
                Some(o)
            }
        };
        let mut src = ops::backup::delta_locked(&self.ctx, &s, older.as_ref()).await?;
        let locks = Arc::new(locks);
        src.to = Box::new(LockedReader::new(src.to, locks.clone()));
        src.base = src.base.take().map(|b| crate::delta::Base {
            name: b.name,
            changes: match b.changes {
                crate::delta::Changes::Compare(r) => {
                    crate::delta::Changes::Compare(Box::new(LockedReader::new(r, locks.clone())))
                }
                tracked => tracked,
            },
        });
        src.guard = Some(Box::new(locks));
        Ok(src)
    }

    /// Applies an `rbd diff v1` stream onto detached volume `id`, as `rbd import-diff` does
    /// onto an image: the stream's size must be the volume's; a stream that starts from a
    /// snapshot needs the volume to have an available snapshot of that name or id (streams
    /// apply in order); when the stream names the snapshot it leads to, a snapshot of that
    /// name is taken once the data is written. A stream refused on its metadata writes
    /// nothing. See [`crate::ops::restore`] for the statuses.
    pub async fn import_diff(
        &self,
        id: VolumeId,
        input: Box<dyn std::io::Read + Send>,
        progress: ProgressHandle,
    ) -> Result<ImportedDiff> {
        use crate::diff_apply::{StreamInfo, apply};
        let v = self.ctx.volume(id).await?;
        let have: Vec<(String, Option<String>)> = self
            .ctx
            .store
            .snapshots(Some(id))
            .await?
            .into_iter()
            .filter(|s| s.status == SnapshotStatus::Available)
            .map(|s| (s.id.to_string(), s.name))
            .collect();
        let size = v.size_bytes;
        progress.set_total(size);
        let accept = move |info: &StreamInfo| -> Result<()> {
            if info.size_bytes != size {
                return Err(Error::invalid(
                    "diff stream",
                    format!(
                        "it describes an image of {} bytes; volume {id} has {size}",
                        info.size_bytes
                    ),
                ));
            }
            if let Some(f) = &info.from
                && !have
                    .iter()
                    .any(|(sid, name)| sid == f || name.as_ref() == Some(f))
            {
                return Err(Error::invalid(
                    "diff stream",
                    format!(
                        "it starts from snapshot {f:?}, which volume {id} does not have \
                         (apply the streams in order)"
                    ),
                ));
            }
            if let Some(t) = &info.to {
                crate::validate::validate_label(t)?;
            }
            Ok(())
        };
        let (info, stats) = ops::restore::run(&self.ctx, id, "a diff stream".into(), move |w| {
            // Large pieces of a file pass straight into the volume; a pipe's small ones are
            // gathered per record (diff_stream::RecordReader::payload).
            let input = std::io::BufReader::with_capacity(crate::diff_stream::MAX_WRITE, input);
            apply(input, w, &accept, &|n| progress.advance(n))
        })
        .await?;
        let snapshot = match &info.to {
            Some(t) => Some(self.create_snapshot(id, Some(t.clone()), false).await?),
            None => None,
        };
        Ok(ImportedDiff {
            volume: self.ctx.volume(id).await?,
            stream: info,
            stats,
            snapshot,
        })
    }

    /// Replaces the API attributes of object `id` of `kind` (after validating them); a
    /// missing object is `NotFound` and nothing is recorded.
    pub async fn set_attrs(
        &self,
        kind: crate::attrs::ObjectKind,
        id: String,
        attrs: crate::attrs::ObjectAttrs,
    ) -> Result<crate::attrs::ObjectAttrs> {
        attrs.validate()?;
        let step = crate::store::Step::PutAttrs {
            kind,
            id: id.clone(),
            attrs: attrs.clone(),
        };
        match self
            .ctx
            .store
            .commit(crate::store::Batch::new(vec![step]))
            .await?
        {
            Ok(_) => Ok(attrs),
            Err(_) => Err(Error::not_found(kind.as_str(), id)),
        }
    }

    /// Renames a volume (`None` clears its label).
    pub async fn rename_volume(&self, id: VolumeId, name: Option<String>) -> Result<Volume> {
        if let Some(n) = &name {
            crate::validate::validate_label(n)?;
        }
        self.ctx
            .guarded(vec![crate::store::Step::SetVolumeName(id, name)], |c| {
                ops::conflict_error(c, "rename volume", "present")
            })
            .await?;
        self.ctx.volume(id).await
    }

    /// Renames a snapshot (`None` clears its label).
    pub async fn rename_snapshot(&self, id: SnapshotId, name: Option<String>) -> Result<Snapshot> {
        if let Some(n) = &name {
            crate::validate::validate_label(n)?;
        }
        self.ctx
            .guarded(vec![crate::store::Step::SetSnapshotName(id, name)], |c| {
                ops::conflict_error(c, "rename snapshot", "present")
            })
            .await?;
        self.snapshot(id).await
    }

    /// Changes the API attributes of object `id` of `kind` with `change` — a
    /// read-modify-write that retries when another writer changed them in between, so
    /// concurrent updates (two metadata keys set at once) are never lost. `change` may
    /// refuse (its error is returned, nothing recorded). Returns the attributes written.
    pub async fn update_attrs(
        &self,
        kind: crate::attrs::ObjectKind,
        id: String,
        change: impl Fn(&mut crate::attrs::ObjectAttrs) -> Result<()>,
    ) -> Result<crate::attrs::ObjectAttrs> {
        const ATTEMPTS: usize = 20;
        for _ in 0..ATTEMPTS {
            let before = self.ctx.store.attrs(id.clone()).await?;
            let mut attrs = before.clone().unwrap_or_default();
            change(&mut attrs)?;
            attrs.validate()?;
            let steps = vec![
                crate::store::Step::AttrsAre {
                    id: id.clone(),
                    expected: before,
                },
                crate::store::Step::PutAttrs {
                    kind,
                    id: id.clone(),
                    attrs: attrs.clone(),
                },
            ];
            match self
                .ctx
                .store
                .commit(crate::store::Batch::new(steps))
                .await?
            {
                Ok(_) => return Ok(attrs),
                Err(c) if c.what == "attributes" => continue,
                Err(_) => return Err(Error::not_found(kind.as_str(), id)),
            }
        }
        Err(Error::new(
            crate::error::ErrorKind::Busy,
            format!("attributes of {id} kept changing under {ATTEMPTS} attempts; retry"),
        ))
    }

    /// The API attributes of object `id`: those recorded, else the default project's.
    pub async fn attrs(&self, id: String) -> Result<crate::attrs::ObjectAttrs> {
        Ok(self.ctx.store.attrs(id).await?.unwrap_or_default())
    }

    /// Resolves every journaled operation whose owner is gone (see
    /// [`crate::ops::recovery`]). Operations a live process holds, or whose backend cannot
    /// answer now, stay journaled.
    pub async fn recover(&self) -> Result<Vec<RecoveryAction>> {
        ops::recovery::recover(&self.ctx).await
    }
}

/// What [`Service::import_diff`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedDiff {
    /// The volume, as it is now.
    pub volume: Volume,
    /// What the stream said about itself.
    pub stream: crate::diff_apply::StreamInfo,
    /// What was written.
    pub stats: crate::diff_apply::ApplyStats,
    /// The snapshot taken afterwards, named as the stream's end snapshot.
    pub snapshot: Option<Snapshot>,
}

/// A snapshot reader that keeps its volume locked while it lives, and stops reading (an
/// error) once that lock ended under it ([`LockSet::intact`]).
pub struct LockedReader {
    reader: Box<dyn SnapshotReader>,
    locks: Arc<LockSet>,
}

impl LockedReader {
    fn new(reader: Box<dyn SnapshotReader>, locks: Arc<LockSet>) -> Self {
        LockedReader { reader, locks }
    }
}

impl SnapshotReader for LockedReader {
    fn size(&self) -> u64 {
        self.reader.size()
    }
    fn extents(&self) -> &[Extent] {
        self.reader.extents()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.reader.read_at(offset, buf)?;
        // Checked after the read: while the lock still stands, nothing it protects can have
        // changed during it.
        self.locks.intact().map_err(std::io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
