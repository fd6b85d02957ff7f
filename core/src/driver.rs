//! The `VolumeDriver` trait every backend implements, and the snapshot reader it hands out.
//!
//! Drivers never touch the store and know nothing about instances; the service owns every
//! status transition and calls a driver only for the backend work. Every method must be safe
//! to call again after a crash interrupted an earlier call for the same object (recovery
//! re-runs deletes and reverts, and probes creates with `volume_exists`/`snapshot_exists`).

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::progress::ProgressHandle;
use crate::types::{
    Attachment, BackendStats, Capabilities, Extent, PrimitiveSample, ProviderUpdate, Snapshot,
    Volume,
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
}

/// Per-member result of a group snapshot.
pub type GroupOutcome = Vec<Result<ProviderUpdate>>;

/// A storage backend. Object-safe; the service holds it as `Arc<dyn VolumeDriver>`.
#[async_trait]
pub trait VolumeDriver: Send + Sync {
    /// What this backend (as configured) can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates an empty volume of `v.size_bytes`, named from `v.id`.
    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate>;

    /// Removes the volume. Succeeds if it is already gone. `Busy` if backend objects
    /// (snapshots, clones) still depend on it.
    async fn delete_volume(&self, v: &Volume) -> Result<()>;

    /// Whether the volume's backend object exists (used by crash recovery).
    async fn volume_exists(&self, v: &Volume) -> Result<bool>;

    /// Snapshots a volume that nobody writes to.
    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate>;

    /// Snapshots a volume that is attached and may be written to right now. The result must be a
    /// crash-consistent point-in-time image; a driver that cannot promise that for this
    /// attachment returns [`Error::Unsupported`] rather than a torn image.
    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate>;

    /// Snapshots several volumes of this backend. The default takes them one by one (not one
    /// instant); a backend with a native group primitive overrides it. One result per member,
    /// in order.
    async fn create_group_snapshot(
        &self,
        members: &[(Snapshot, Volume, Option<Attachment>)],
    ) -> Result<GroupOutcome> {
        let mut out = Vec::with_capacity(members.len());
        for (s, v, a) in members {
            out.push(match a {
                Some(a) => self.create_snapshot_force(s, v, a).await,
                None => self.create_snapshot(s, v).await,
            });
        }
        Ok(out)
    }

    /// Removes the snapshot. Succeeds if it is already gone. Returns [`Error::Busy`] naming
    /// the dependents when backend clones still depend on it.
    async fn delete_snapshot(&self, s: &Snapshot) -> Result<()>;

    /// Whether the snapshot's backend object exists (used by crash recovery).
    async fn snapshot_exists(&self, s: &Snapshot) -> Result<bool>;

    /// Creates volume `v` (of `v.size_bytes`, at least the snapshot's size) holding the
    /// snapshot's data.
    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate>;

    /// Makes `v`'s data equal to snapshot `s` (any snapshot of `v`, not only the latest),
    /// keeping `s` and every other snapshot intact. Safe to re-run after a crash.
    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<()>;

    /// Makes `v` independent of the snapshot it was cloned from (copying shared data).
    /// Backends whose clones are always independent return `Ok(())`.
    async fn flatten_volume(&self, v: &Volume, progress: ProgressHandle) -> Result<()> {
        let _ = (v, progress);
        Ok(())
    }

    /// Opens the snapshot's image for reading.
    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>>;

    /// Capacity and usage.
    async fn stats(&self) -> Result<BackendStats>;

    /// `Some(reason)` when the snapshot still exists but its data is unusable (e.g. an LVM
    /// thick snapshot whose copy-on-write space overflowed), so the service can mark it
    /// `error` with that reason; `None` when it is healthy. Backends whose snapshots cannot
    /// go bad keep the default.
    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let _ = s;
        Ok(None)
    }

    /// Times the backend's raw snapshot primitive once on `v` (create and remove a snapshot
    /// with no kiln bookkeeping), for `kiln bench`. The first sample is "the primitive"; any
    /// further samples are comparisons (e.g. the `rbd` CLI). Nothing is left behind.
    async fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let _ = v;
        Err(Error::Unsupported(
            "this backend has no benchmark primitive".into(),
        ))
    }
}
