//! The metadata store: volumes, snapshots, attachments, lineage and the operation journal.
//!
//! Writes go through [`Store::commit`], which applies a [`Batch`] of guarded steps in one
//! transaction: either every guard holds and every write lands, or nothing changes and the
//! first failed guard is reported as a [`Conflict`]. That one primitive gives the service
//! compare-and-set status transitions (`UPDATE ... WHERE status IN (...)`) and lets it record
//! an operation in the same transaction as the status change that starts it, which is what
//! crash recovery relies on. A PostgreSQL implementation needs only the same two ideas.

mod postgres;
pub mod sql;
mod sqlite;

pub use postgres::{PgOptions, Postgres, PostgresStore};
pub use sql::SqlStore;
pub use sqlite::{Sqlite, SqliteStore};

use chrono::{DateTime, Utc};
use serde::Serialize;

use std::sync::Arc;

use crate::attrs::{ObjectAttrs, ObjectKind, QuotaLimits, Usage};
use crate::error::{Error, Result};
use crate::instance::{Image, ImageStatus, Instance};
use crate::types::{
    Attachment, Backup, BackupId, BackupStatus, Consistency, ImageId, InstanceId, Snapshot,
    SnapshotId, SnapshotStatus, Volume, VolumeId, VolumeStatus,
};

/// Id of a journaled operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OpId(pub i64);

/// A journaled operation: recorded before the driver is called, removed when the store has
/// the result. One left behind means the process died in between.
///
/// The journal is open: `kind` names the operation module that wrote it (see
/// `crate::ops`), which alone knows how to recover it. An operation over several volumes
/// is a *parent* with one *child* entry per member step (`parent` set); recovery resolves
/// the parent and its children as one unit, by the rule the parent's operation declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Journal id (assigned by the store).
    pub id: OpId,
    /// What is being done, e.g. `create_snapshot`, `group_snapshot`.
    pub kind: String,
    /// The parent operation, for a child step of a multi-volume operation.
    pub parent: Option<OpId>,
    /// The volume the operation is about (for snapshot operations: the snapshot's volume;
    /// for clones: the new volume; for a parent: its first member).
    pub volume_id: VolumeId,
    /// The snapshot involved, if any (for reverts and clones: the source snapshot).
    pub snapshot_id: Option<SnapshotId>,
    /// Operation-specific data its recovery needs (JSON; `null` when none).
    pub payload: serde_json::Value,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Process that ran it (informational; liveness is decided by the locks).
    pub pid: u32,
    /// The incarnation that ran it ([`crate::node::incarnation`]); other nodes leave it
    /// alone while that incarnation is alive (see [`crate::locks::LockManager::owner_alive`]).
    /// `None` in journals written before kiln recorded it.
    pub owner: Option<String>,
}

/// An operation to journal in the same transaction as a batch's steps.
#[derive(Debug, Clone)]
pub struct NewOp {
    /// See [`Operation::kind`].
    pub kind: &'static str,
    /// See [`Operation::parent`].
    pub parent: Option<OpId>,
    /// See [`Operation::volume_id`].
    pub volume_id: VolumeId,
    /// See [`Operation::snapshot_id`].
    pub snapshot_id: Option<SnapshotId>,
    /// See [`Operation::payload`].
    pub payload: serde_json::Value,
}

/// One entry of a record's status history (admin resets; kept forever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// "volume" or "snapshot".
    pub object: String,
    /// The object's id.
    pub object_id: String,
    /// Status before the change.
    pub from_status: String,
    /// Status after the change.
    pub to_status: String,
    /// Why (given by the admin, or the event that caused it).
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// One guarded step of a [`Batch`].
#[derive(Debug, Clone)]
pub enum Step {
    /// Insert a new volume row (and its attachments).
    InsertVolume(Volume),
    /// Insert a new snapshot row.
    InsertSnapshot(Snapshot),
    /// Guard: the volume exists and its status is one of `any_of`.
    VolumeIn {
        /// Volume to check.
        id: VolumeId,
        /// Allowed statuses.
        any_of: Vec<VolumeStatus>,
    },
    /// Guard: the snapshot exists and its status is one of `any_of`.
    SnapshotIn {
        /// Snapshot to check.
        id: SnapshotId,
        /// Allowed statuses.
        any_of: Vec<SnapshotStatus>,
    },
    /// Guard: the volume has no snapshots at all.
    VolumeHasNoSnapshots(VolumeId),
    /// Compare-and-set of a volume's status (empty `from` = any status); sets the reason too.
    SetVolumeStatus {
        /// Volume to change.
        id: VolumeId,
        /// Statuses it must be in now.
        from: Vec<VolumeStatus>,
        /// New status.
        to: VolumeStatus,
        /// New status reason (`None` clears it).
        reason: Option<String>,
    },
    /// Compare-and-set of a snapshot's status (empty `from` = any status); sets the reason too.
    SetSnapshotStatus {
        /// Snapshot to change.
        id: SnapshotId,
        /// Statuses it must be in now.
        from: Vec<SnapshotStatus>,
        /// New status.
        to: SnapshotStatus,
        /// New status reason (`None` clears it).
        reason: Option<String>,
    },
    /// Put a volume back exactly as it was before an operation that changed nothing
    /// (status, reason and `updated_at`): a refused operation leaves no trace.
    RestoreVolumeStatus {
        /// Volume to restore.
        id: VolumeId,
        /// Its status before.
        status: VolumeStatus,
        /// Its status reason before.
        reason: Option<String>,
        /// Its `updated_at` before.
        updated_at: DateTime<Utc>,
    },
    /// Put a snapshot back exactly as it was (see [`Step::RestoreVolumeStatus`]).
    RestoreSnapshotStatus {
        /// Snapshot to restore.
        id: SnapshotId,
        /// Its status before.
        status: SnapshotStatus,
        /// Its status reason before.
        reason: Option<String>,
        /// Its `updated_at` before.
        updated_at: DateTime<Utc>,
    },
    /// Record the backend location of a volume.
    SetVolumeLocation(VolumeId, Option<String>),
    /// Record the backend location of a snapshot.
    SetSnapshotLocation(SnapshotId, Option<String>),
    /// Record an attachment (replaces any previous one).
    Attach(VolumeId, Attachment),
    /// Remove every attachment of the volume.
    Detach(VolumeId),
    /// Delete the volume row and its attachments (its snapshots must be gone).
    DeleteVolume(VolumeId),
    /// Delete the snapshot row.
    DeleteSnapshot(SnapshotId),
    /// Remove a journaled operation.
    FinishOp(OpId),
    /// Remove every child operation of a parent (the parent is removed by `FinishOp`).
    FinishChildren(OpId),
    /// Append to the status history.
    RecordHistory(HistoryEntry),
    /// Insert a new instance row.
    InsertInstance(Instance),
    /// Guard: no volume is attached to the instance (conflict `found` = how many are).
    InstanceHasNoVolumes(InstanceId),
    /// Delete the instance row (conflict if it does not exist).
    DeleteInstance(InstanceId),
    /// Insert a new image row (its snapshots are linked with [`Step::SetSnapshotImage`]).
    InsertImage(Image),
    /// Compare-and-set of an image's status (empty `from` = any status).
    SetImageStatus {
        /// Image to change.
        id: ImageId,
        /// Statuses it must be in now.
        from: Vec<ImageStatus>,
        /// New status.
        to: ImageStatus,
    },
    /// Delete the image row; snapshots that listed it are released (kept).
    DeleteImage(ImageId),
    /// Record which image a snapshot belongs to and how consistent it is.
    SetSnapshotImage {
        /// Snapshot to change.
        id: SnapshotId,
        /// Its image.
        image: Option<ImageId>,
        /// Its consistency.
        consistency: Option<Consistency>,
    },
    /// Insert a new backup row.
    InsertBackup(Backup),
    /// Compare-and-set of a backup's status (empty `from` = any status); sets the reason.
    SetBackupStatus {
        /// Backup to change.
        id: BackupId,
        /// Statuses it must be in now.
        from: Vec<BackupStatus>,
        /// New status.
        to: BackupStatus,
        /// New status reason (`None` clears it).
        reason: Option<String>,
    },
    /// Record how many bytes a backup occupies on its target.
    SetBackupStored(BackupId, u64),
    /// Guard: no backup builds on this one (conflict: `what` "backup", `id` a child).
    BackupHasNoChildren(BackupId),
    /// Delete the backup row.
    DeleteBackup(BackupId),
    /// Guard: no image (other than one being deleted) lists the snapshot (conflict: `what`
    /// "image", `id` the image, `found` its status).
    SnapshotFreeOfImage(SnapshotId),
    /// Set a volume's label (conflict with `found` `None` if it does not exist).
    SetVolumeName(VolumeId, Option<String>),
    /// Set a snapshot's label (conflict with `found` `None` if it does not exist).
    SetSnapshotName(SnapshotId, Option<String>),
    /// Record (or replace) an object's API attributes; conflict (`found` `None`) if the
    /// object does not exist. Deleting the object deletes them.
    PutAttrs {
        /// The object's kind.
        kind: ObjectKind,
        /// Its id.
        id: String,
        /// Its attributes.
        attrs: ObjectAttrs,
    },
    /// Guard: object `id`'s attributes are exactly `expected` (`None`: it has no row) —
    /// the compare of a read-modify-write (conflict: `what` "attributes").
    AttrsAre {
        /// The object's id.
        id: String,
        /// What they must be.
        expected: Option<ObjectAttrs>,
    },
    /// Guard: `project` may create one more object of `kind` (volume or snapshot) of
    /// `add_bytes` within `limits` (conflict: `what` "quota", `id` the exceeded limit —
    /// `volumes`, `snapshots` or `gigabytes` — and `found` the current usage).
    QuotaAllows {
        /// The project.
        project: String,
        /// Volume or snapshot.
        kind: ObjectKind,
        /// Its limits.
        limits: QuotaLimits,
        /// The new object's size.
        add_bytes: u64,
    },
}

/// Steps applied atomically, optionally journaling a new operation in the same transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The steps, applied in order; the first failing guard aborts the batch.
    pub steps: Vec<Step>,
    /// An operation to journal.
    pub begin: Option<NewOp>,
    /// More operations journaled in the same transaction (e.g. every child step of a
    /// parent at once); their ids are not returned.
    pub also: Vec<NewOp>,
}

impl Batch {
    /// A batch of plain steps.
    pub fn new(steps: Vec<Step>) -> Self {
        Batch {
            steps,
            begin: None,
            also: Vec::new(),
        }
    }

    /// A batch that also journals an operation.
    pub fn with_op(steps: Vec<Step>, op: NewOp) -> Self {
        Batch {
            steps,
            begin: Some(op),
            also: Vec::new(),
        }
    }

    /// Whether the batch must be on stable storage before `commit` returns.
    ///
    /// Every batch is, except one that only finishes journaled operations (it removes a
    /// journal entry and begins none): if it is lost to a power failure, the journal entry
    /// it removed is still there, and recovery reaches the same result again by asking the
    /// backend. Any later durable commit persists it anyway (the log is sequential). This
    /// saves one fsync per operation.
    pub fn needs_sync(&self) -> bool {
        self.begin.is_some()
            || !self.also.is_empty()
            || !self
                .steps
                .iter()
                .any(|s| matches!(s, Step::FinishOp(_) | Step::FinishChildren(_)))
    }
}

/// Why a batch was not applied: which guard failed and what was found instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Index of the failing step in the batch.
    pub step: usize,
    /// "volume", "snapshot", "instance" or "image".
    pub what: &'static str,
    /// The object's id.
    pub id: String,
    /// Its current status, or `None` if it does not exist; for `VolumeHasNoSnapshots`, the
    /// number of snapshots.
    pub found: Option<String>,
}

/// The store interface, synchronous: implementations may block (disk, network). The
/// service never calls it directly but through [`AsyncStore`], which keeps every call off
/// the async runtime's worker threads.
///
/// Implementations must make [`Store::commit`] atomic and serializable against other
/// processes (or nodes) using the same store.
pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically. `Ok(Err(conflict))` when a guard failed (nothing changed);
    /// `Ok(Ok(op))` with the new operation id when `batch.begin` was set.
    fn commit(&self, batch: Batch) -> Result<std::result::Result<Option<OpId>, Conflict>>;
    /// One volume, with its attachments.
    fn volume(&self, id: VolumeId) -> Result<Option<Volume>>;
    /// All volumes, oldest first.
    fn volumes(&self) -> Result<Vec<Volume>>;
    /// Volumes created from the snapshot (lineage), oldest first.
    fn volumes_from_snapshot(&self, id: SnapshotId) -> Result<Vec<Volume>>;
    /// One snapshot.
    fn snapshot(&self, id: SnapshotId) -> Result<Option<Snapshot>>;
    /// Snapshots, of one volume or all, oldest first.
    fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>>;
    /// Unfinished operations (parents and children), oldest first.
    fn operations(&self) -> Result<Vec<Operation>>;
    /// The status history of one object, oldest first.
    fn history(&self, object_id: &str) -> Result<Vec<HistoryEntry>>;
    /// One instance.
    fn instance(&self, id: InstanceId) -> Result<Option<Instance>>;
    /// All instances, oldest first.
    fn instances(&self) -> Result<Vec<Instance>>;
    /// The volumes attached to an instance, by device name.
    fn instance_volumes(&self, id: InstanceId) -> Result<Vec<Volume>>;
    /// One image, with its snapshots.
    fn image(&self, id: ImageId) -> Result<Option<Image>>;
    /// All images, oldest first.
    fn images(&self) -> Result<Vec<Image>>;
    /// One backup.
    fn backup(&self, id: BackupId) -> Result<Option<Backup>>;
    /// Every backup (of one volume), oldest first.
    fn backups(&self, volume: Option<VolumeId>) -> Result<Vec<Backup>>;
    /// One object's API attributes (`None`: it has none recorded).
    fn attrs(&self, id: &str) -> Result<Option<ObjectAttrs>>;
    /// The API attributes of every object of `kind` that has them, by id.
    fn attrs_of(&self, kind: ObjectKind)
    -> Result<std::collections::BTreeMap<String, ObjectAttrs>>;
    /// What `project` uses now (objects without attributes count for the default project).
    fn usage(&self, project: &str) -> Result<Usage>;
}

/// The async face of a [`Store`]: every call runs on the blocking pool, so a slow disk (a
/// FULL-sync commit) or a lock wait never stalls a runtime worker. Cheap to clone.
#[derive(Clone)]
pub struct AsyncStore(Arc<dyn Store>);

macro_rules! blocking_call {
    ($self:ident, |$s:ident| $body:expr) => {{
        let $s = $self.0.clone();
        tokio::task::spawn_blocking(move || $body)
            .await
            .map_err(|e| Error::store(format!("store worker failed: {e}")))?
    }};
}

impl AsyncStore {
    /// Wraps `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        AsyncStore(store)
    }

    /// The synchronous store (for tests and tools running on a blocking thread).
    pub fn sync(&self) -> &Arc<dyn Store> {
        &self.0
    }

    /// See [`Store::commit`].
    pub async fn commit(
        &self,
        batch: Batch,
    ) -> Result<std::result::Result<Option<OpId>, Conflict>> {
        blocking_call!(self, |s| s.commit(batch))
    }
    /// See [`Store::volume`].
    pub async fn volume(&self, id: VolumeId) -> Result<Option<Volume>> {
        blocking_call!(self, |s| s.volume(id))
    }
    /// See [`Store::volumes`].
    pub async fn volumes(&self) -> Result<Vec<Volume>> {
        blocking_call!(self, |s| s.volumes())
    }
    /// See [`Store::volumes_from_snapshot`].
    pub async fn volumes_from_snapshot(&self, id: SnapshotId) -> Result<Vec<Volume>> {
        blocking_call!(self, |s| s.volumes_from_snapshot(id))
    }
    /// See [`Store::snapshot`].
    pub async fn snapshot(&self, id: SnapshotId) -> Result<Option<Snapshot>> {
        blocking_call!(self, |s| s.snapshot(id))
    }
    /// See [`Store::snapshots`].
    pub async fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        blocking_call!(self, |s| s.snapshots(volume))
    }
    /// See [`Store::operations`].
    pub async fn operations(&self) -> Result<Vec<Operation>> {
        blocking_call!(self, |s| s.operations())
    }
    /// See [`Store::instance`].
    pub async fn instance(&self, id: InstanceId) -> Result<Option<Instance>> {
        blocking_call!(self, |s| s.instance(id))
    }
    /// See [`Store::instances`].
    pub async fn instances(&self) -> Result<Vec<Instance>> {
        blocking_call!(self, |s| s.instances())
    }
    /// See [`Store::instance_volumes`].
    pub async fn instance_volumes(&self, id: InstanceId) -> Result<Vec<Volume>> {
        blocking_call!(self, |s| s.instance_volumes(id))
    }
    /// See [`Store::image`].
    pub async fn image(&self, id: ImageId) -> Result<Option<Image>> {
        blocking_call!(self, |s| s.image(id))
    }
    /// See [`Store::images`].
    pub async fn images(&self) -> Result<Vec<Image>> {
        blocking_call!(self, |s| s.images())
    }
    /// See [`Store::backup`].
    pub async fn backup(&self, id: BackupId) -> Result<Option<Backup>> {
        blocking_call!(self, |s| s.backup(id))
    }
    /// See [`Store::backups`].
    pub async fn backups(&self, volume: Option<VolumeId>) -> Result<Vec<Backup>> {
        blocking_call!(self, |s| s.backups(volume))
    }
    /// See [`Store::attrs`].
    pub async fn attrs(&self, id: String) -> Result<Option<ObjectAttrs>> {
        blocking_call!(self, |s| s.attrs(&id))
    }
    /// See [`Store::attrs_of`].
    pub async fn attrs_of(
        &self,
        kind: ObjectKind,
    ) -> Result<std::collections::BTreeMap<String, ObjectAttrs>> {
        blocking_call!(self, |s| s.attrs_of(kind))
    }
    /// See [`Store::usage`].
    pub async fn usage(&self, project: String) -> Result<Usage> {
        blocking_call!(self, |s| s.usage(&project))
    }
    /// See [`Store::history`].
    pub async fn history(&self, object_id: String) -> Result<Vec<HistoryEntry>> {
        blocking_call!(self, |s| s.history(&object_id))
    }
}
