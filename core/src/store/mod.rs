//! The metadata store: volumes, snapshots, attachments, lineage and the operation journal.
//!
//! Writes go through [`Store::commit`], which applies a [`Batch`] of guarded steps in one
//! transaction: either every guard holds and every write lands, or nothing changes and the
//! first failed guard is reported as a [`Conflict`]. That one primitive gives the service
//! compare-and-set status transitions (`UPDATE ... WHERE status IN (...)`) and lets it record
//! an operation in the same transaction as the status change that starts it, which is what
//! crash recovery relies on. A PostgreSQL implementation needs only the same two ideas.

mod sqlite;

pub use sqlite::SqliteStore;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Result;
use crate::types::{
    Attachment, Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId, VolumeStatus,
};

/// Id of a journaled operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct OpId(pub i64);

/// What a journaled operation does; recovery decides per kind how to finish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `create_volume` of an empty volume.
    CreateVolume,
    /// `create_volume_from_snapshot`.
    CreateVolumeFromSnapshot,
    /// `delete_volume`.
    DeleteVolume,
    /// `create_snapshot` or `create_snapshot_force`.
    CreateSnapshot,
    /// `delete_snapshot`.
    DeleteSnapshot,
    /// `revert_to_snapshot`.
    Revert,
}

impl OpKind {
    const ALL: [OpKind; 6] = [
        OpKind::CreateVolume,
        OpKind::CreateVolumeFromSnapshot,
        OpKind::DeleteVolume,
        OpKind::CreateSnapshot,
        OpKind::DeleteSnapshot,
        OpKind::Revert,
    ];

    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::CreateVolume => "create_volume",
            OpKind::CreateVolumeFromSnapshot => "create_volume_from_snapshot",
            OpKind::DeleteVolume => "delete_volume",
            OpKind::CreateSnapshot => "create_snapshot",
            OpKind::DeleteSnapshot => "delete_snapshot",
            OpKind::Revert => "revert",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A journaled operation: recorded before the driver is called, removed when the store has
/// the result. One left behind means the process died in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Journal id (assigned by the store).
    pub id: OpId,
    /// What was being done.
    pub kind: OpKind,
    /// The volume the operation is about (for snapshot operations: the snapshot's volume;
    /// for clones: the new volume).
    pub volume_id: VolumeId,
    /// The snapshot involved, if any (for reverts and clones: the source snapshot).
    pub snapshot_id: Option<SnapshotId>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Process that ran it (informational; liveness is decided by the volume lock).
    pub pid: u32,
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
}

/// Steps applied atomically, optionally journaling a new operation in the same transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The steps, applied in order; the first failing guard aborts the batch.
    pub steps: Vec<Step>,
    /// An operation to journal: kind, volume, snapshot.
    pub begin: Option<(OpKind, VolumeId, Option<SnapshotId>)>,
}

impl Batch {
    /// A batch of plain steps.
    pub fn new(steps: Vec<Step>) -> Self {
        Batch { steps, begin: None }
    }

    /// A batch that also journals an operation.
    pub fn with_op(
        steps: Vec<Step>,
        kind: OpKind,
        volume: VolumeId,
        snapshot: Option<SnapshotId>,
    ) -> Self {
        Batch {
            steps,
            begin: Some((kind, volume, snapshot)),
        }
    }
}

/// Why a batch was not applied: which guard failed and what was found instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Index of the failing step in the batch.
    pub step: usize,
    /// "volume" or "snapshot".
    pub what: &'static str,
    /// The object's id.
    pub id: String,
    /// Its current status, or `None` if it does not exist; for `VolumeHasNoSnapshots`, the
    /// number of snapshots.
    pub found: Option<String>,
}

/// The store interface. Implementations must make [`Store::commit`] atomic and serializable
/// against other processes using the same store.
pub trait Store: Send + Sync {
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
    /// Unfinished operations, oldest first.
    fn operations(&self) -> Result<Vec<Operation>>;
}
