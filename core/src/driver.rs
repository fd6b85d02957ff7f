//! The `VolumeDriver` trait every backend implements, the snapshot reader it hands out, and
//! the optional capabilities a driver may add.
//!
//! Drivers never touch the store and know nothing about instances; the service owns every
//! status transition and calls a driver only for the backend work. Every method must be safe
//! to call again after a crash interrupted an earlier call for the same object (recovery
//! re-runs deletes and reverts, and probes creates with `lookup_volume`/`lookup_snapshot`).
//!
//! Most backends are plain blocking code (commands, ioctls, C libraries): they implement
//! [`crate::blocking::BlockingDriver`] and run behind the one adapter
//! [`crate::blocking::Blocking`], which turns them into a `VolumeDriver`.

use async_trait::async_trait;

use crate::error::Result;
use crate::progress::ProgressHandle;
use crate::types::{
    Attachment, BackendStats, Capabilities, ConnectionInfo, DeleteAction, Extent, PrimitiveSample,
    ProviderUpdate, Snapshot, Volume,
};

/// Sequential raw reader of a snapshot's image, with the extents that hold data.
///
/// `read_at` blocks: call it from `spawn_blocking` or a dedicated thread.
pub trait SnapshotReader: Send {
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// Sorted, non-overlapping ranges that may hold data; everything else reads as zeros.
    /// A backend that cannot tell returns one extent covering the whole image.
    fn extents(&self) -> &[Extent];
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 only at or past `size()`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
    /// A hint: the `(start, end)` ranges the caller reads next, in order. A reader whose
    /// backend has a long round trip may start reading them ahead; reads anywhere still
    /// return the same bytes. The default ignores it.
    fn will_read(&mut self, _ranges: &[(u64, u64)]) {}
}

/// Writer into a detached volume's image, for restores and applied diff streams.
///
/// Its calls block: call them from `spawn_blocking` or a dedicated thread. Writes become
/// durable at [`VolumeWriter::finish`]; a writer dropped without it may have applied any
/// part of them (callers record the volume as `error` until a finish succeeds).
pub trait VolumeWriter: Send {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Writes all of `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros, deallocating them where the backend can.
    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Makes every write durable and releases the image.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// What changed between two snapshots of one volume (see [`VolumeDriver::diff_snapshots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotDelta {
    /// Sorted, non-overlapping ranges of the newer snapshot that may differ from the older
    /// one; everywhere else the two read the same. A range may cover unchanged bytes (the
    /// backend's tracking granule), never miss a changed one.
    Changed(Vec<Extent>),
    /// The backend keeps no record of what changed: read both and compare.
    Untracked,
}

/// Refuses a diff between snapshots of different volumes (drivers call it first in
/// `diff_snapshots`: their tracking only relates snapshots of one volume).
pub fn same_volume(from: &Snapshot, to: &Snapshot) -> Result<()> {
    if from.volume_id != to.volume_id {
        return Err(crate::error::Error::invalid(
            "--from",
            format!(
                "snapshot {} is not of the same volume as {}",
                from.id, to.id
            ),
        ));
    }
    Ok(())
}

/// Per-member result of a group snapshot.
pub type GroupOutcome = Vec<Result<ProviderUpdate>>;

/// One member of a group snapshot: the new snapshot record, its volume, and the attachment
/// when the volume is in use (then the member is taken as a forced snapshot).
pub type GroupMember = (Snapshot, Volume, Option<Attachment>);

/// Optional diagnostic capability: time the backend's raw snapshot primitive, for
/// `kiln bench`. Kept off [`VolumeDriver`] so the production contract carries only what
/// operations call.
pub trait BenchPrimitives: Send + Sync + 'static {
    /// Times the raw primitive once on `v` (create and remove a snapshot with no kiln
    /// bookkeeping). The first sample is "the primitive"; further samples are comparisons
    /// (e.g. the `rbd` CLI). Nothing is left behind. Blocks: run it on a blocking thread.
    fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>>;
}

/// What a consistency check of one volume's backend objects found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Each inconsistency found, one line each (empty: consistent).
    pub findings: Vec<String>,
    /// Each repair made (only when repairs were asked for), one line each.
    pub repaired: Vec<String>,
    /// Whether the volume is consistent now (after any repairs).
    pub consistent: bool,
}

/// Optional admin capability: compare what the backend records about a volume (e.g. a
/// qcow2 chain record) with the backend objects themselves, and repair what is safe.
pub trait VolumeCheck: Send + Sync + 'static {
    /// Checks volume `v`; with `repair`, fixes what can be fixed without losing data and
    /// reports the rest. Blocks: run it on a blocking thread. The caller holds the volume's
    /// lock and has verified no operation on it is journaled.
    fn check_volume(&self, v: &Volume, repair: bool) -> Result<CheckReport>;
}

/// Optional capability for instance snapshots: a snapshot in two steps around a freeze
/// window, for backends where making a snapshot durable costs more than fixing its point in
/// time (raw+reflink: FICLONE is the cut; fsync, rename and the directory fsync are not).
/// Only the cut runs while the guest is frozen. Both steps block: run them on a blocking
/// thread.
pub trait WindowedSnapshots: Send + Sync + 'static {
    /// Inside the window: fix each member's point in time and do nothing more. One result
    /// per member, in order. A cut member that is never finished is removed by
    /// [`VolumeDriver::delete_snapshot`] like a made one.
    fn cut(&self, members: &[GroupMember]) -> Vec<Result<()>>;
    /// After the thaw: make each cut member a durable snapshot and return its location.
    fn finish(&self, members: &[GroupMember]) -> Vec<Result<ProviderUpdate>>;
}

/// A storage backend. Object-safe; the service holds it as `Arc<dyn VolumeDriver>`.
#[async_trait]
pub trait VolumeDriver: Send + Sync {
    /// What this backend (as configured) can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates an empty volume of `v.size_bytes`, named from `v.id`.
    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate>;

    /// Removes the volume; [`DeleteAction::AlreadyGone`] if it did not exist. `Busy` if
    /// backend objects (snapshots, clones) still depend on it.
    async fn delete_volume(&self, v: &Volume) -> Result<DeleteAction>;

    /// The volume's backend location if its backend object exists, `None` if not (used by
    /// crash recovery).
    async fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>>;

    /// Snapshots a volume that nobody writes to.
    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate>;

    /// Snapshots a volume that is attached and may be written to right now. The result must be a
    /// crash-consistent point-in-time image; a driver that cannot promise that for this
    /// attachment returns an `Unsupported` error rather than a torn image.
    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate>;

    /// Snapshots several volumes of this backend. The default takes them one by one (not one
    /// instant); a backend with a native group primitive overrides it (and then reports
    /// `group_snapshot` in its capabilities). One result per member, in order.
    async fn create_group_snapshot(&self, members: &[GroupMember]) -> Result<GroupOutcome> {
        let mut out = Vec::with_capacity(members.len());
        for (s, v, a) in members {
            out.push(match a {
                Some(a) => self.create_snapshot_force(s, v, a).await,
                None => self.create_snapshot(s, v).await,
            });
        }
        Ok(out)
    }

    /// Removes the snapshot; [`DeleteAction::AlreadyGone`] if it did not exist. A `Busy`
    /// error naming the dependents when backend clones still depend on it.
    async fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction>;

    /// [`VolumeDriver::delete_snapshot`], reporting the bytes a merge copies to `progress`
    /// (a backend whose delete merges data, e.g. a hypervisor's block job). The default
    /// reports nothing.
    async fn delete_snapshot_with_progress(
        &self,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<DeleteAction> {
        let _ = progress;
        self.delete_snapshot(s).await
    }

    /// The snapshot's backend location if its backend object exists, `None` if not (used by
    /// crash recovery, which must record the location of a snapshot the backend finished).
    async fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>>;

    /// Creates volume `v` (of `v.size_bytes`, at least the snapshot's size) holding the
    /// snapshot's data.
    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate>;

    /// Makes `v`'s data equal to snapshot `s` (any snapshot of `v`, not only the latest),
    /// keeping `s` and every other snapshot intact — or, where the backend cannot (LVM
    /// thick COW overflow), naming in the outcome the other snapshots it invalidated. Safe
    /// to re-run after a crash.
    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<crate::types::RevertOutcome>;

    /// Makes `v` independent of the snapshot it was cloned from (copying shared data).
    /// Backends whose clones are always independent return `Ok(())`.
    async fn flatten_volume(&self, v: &Volume, progress: ProgressHandle) -> Result<()> {
        let _ = (v, progress);
        Ok(())
    }

    /// Opens the snapshot's image for reading.
    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>>;

    /// Opens detached volume `v` for writing (the service has checked it is `available`
    /// and holds its lock). Backends that cannot write a volume say so with `Unsupported`.
    async fn open_volume_writer(&self, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
        let _ = v;
        Err(crate::error::Error::unsupported(
            "this backend cannot write a volume's data",
        ))
    }

    /// The backups kept in `pool` of this backend's cluster (`rbd:POOL` targets). Backends
    /// without pools say so with `Unsupported`.
    async fn backup_pool(
        &self,
        pool: &str,
    ) -> Result<std::sync::Arc<dyn crate::backup::PoolBackups>> {
        let _ = pool;
        Err(crate::error::Error::unsupported(
            "this backend keeps no backup pools",
        ))
    }

    /// Which ranges of snapshot `to` may differ from the older snapshot `from` of the same
    /// volume, from the backend's own tracking (shared blocks, layers, object maps), without
    /// reading data. A backend that keeps no track answers [`SnapshotDelta::Untracked`] (the
    /// default) and callers compare the two images' data instead.
    async fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        let _ = (from, to);
        Ok(SnapshotDelta::Untracked)
    }

    /// Capacity and usage.
    async fn stats(&self) -> Result<BackendStats>;

    /// Called for each member before an instance snapshot freezes the guest: do now what
    /// would otherwise slow the snapshot down inside the window (e.g. open and cache the
    /// volume's image handle). Changes nothing visible. The default does nothing.
    async fn prepare_snapshot(&self, v: &Volume) -> Result<()> {
        let _ = v;
        Ok(())
    }

    /// What a hypervisor needs to open volume `v` now (Cinder's `initialize_connection`);
    /// it can change with every snapshot (a qcow2 active layer does). Drivers that have not
    /// implemented it yet say so with an `Unsupported` error.
    async fn connection_info(&self, v: &Volume) -> Result<ConnectionInfo> {
        let _ = v;
        Err(crate::error::Error::unsupported(
            "this backend does not report connection info yet",
        ))
    }

    /// `Some(reason)` when the snapshot still exists but its data is unusable (e.g. an LVM
    /// thick snapshot whose copy-on-write space overflowed), so the service can mark it
    /// `error` with that reason; `None` when it is healthy. Backends whose snapshots cannot
    /// go bad keep the default.
    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let _ = s;
        Ok(None)
    }

    /// Cuts off from this backend's storage every client among `handles` (published by a
    /// dead kiln process with [`crate::node::publish_fence`]) that this backend recognises,
    /// so that what that process left behind — open watches, writes in flight, a process
    /// only stalled — can neither hold up nor disturb the operations another node takes
    /// over. Returns what it fenced (for the log). Backends a dead process cannot reach
    /// any more (local files, LVM) keep the default: nothing to do.
    async fn fence(&self, handles: &[String]) -> Result<Vec<String>> {
        let _ = handles;
        Ok(vec![])
    }

    /// The benchmark capability, when this backend has a raw primitive to time.
    fn bench(&self) -> Option<std::sync::Arc<dyn BenchPrimitives>> {
        None
    }

    /// The two-step snapshot capability instance snapshots use inside a freeze window
    /// (see [`WindowedSnapshots`]); `None`: the whole snapshot runs inside the window.
    fn windowed(&self) -> Option<std::sync::Arc<dyn WindowedSnapshots>> {
        None
    }

    /// The consistency-check capability, when this backend keeps records a crash or a
    /// foreign process could leave out of step with its objects.
    fn check(&self) -> Option<std::sync::Arc<dyn VolumeCheck>> {
        None
    }
}
