//! The in-memory driver: a simulator beside the real backends, behind the same trait
//! (stratisd's `sim_engine` idea). It exists for tests of everything above the drivers
//! (status machine, races, recovery, multi-volume operations) and to prove the driver
//! contract suite is not shaped to one backend. It is never used to test a backend: drivers
//! are tested against the real thing. Its knobs (`fail_next`, `busy`, `broken`, `hang`,
//! `unreachable`) inject the backend behaviours those tests need.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use crate::driver::{SnapshotReader, VolumeDriver};
use crate::error::{Error, Result};
use crate::progress::ProgressHandle;
use crate::types::*;

/// Volumes and snapshots as byte vectors; `fail_next` makes the next mutating call fail.
#[derive(Default)]
pub struct MemoryDriver {
    /// Volume data by id.
    pub volumes: Mutex<HashMap<VolumeId, Vec<u8>>>,
    /// Snapshot data by id.
    pub snapshots: Mutex<HashMap<SnapshotId, Vec<u8>>>,
    /// The next call of this operation fails with a backend error.
    pub fail_next: Mutex<Option<&'static str>>,
    /// Snapshot ids the fake reports as having dependent clones.
    pub busy: Mutex<Vec<SnapshotId>>,
    /// Snapshot ids the fake reports as unusable (like an overflowed LVM thick snapshot).
    pub broken: Mutex<Vec<SnapshotId>>,
    /// Volumes whose snapshot create hangs forever once entered (to abort an operation in
    /// the middle); `entered` is notified when one is reached.
    pub hang: Mutex<Vec<VolumeId>>,
    /// Notified when a create reaches a hanging volume.
    pub entered: tokio::sync::Notify,
    /// Every mutating call that fails with `Unavailable` while set (a cluster that cannot
    /// answer).
    pub unreachable: std::sync::atomic::AtomicBool,
    /// Snapshots the next revert reports as invalidated (like LVM thick snapshots whose
    /// COW space a revert overflowed); they become `broken`.
    pub invalidate_on_revert: Mutex<Vec<SnapshotId>>,
}

impl MemoryDriver {
    fn check_fail(&self, op: &str) -> Result<()> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable(op.to_string(), "cluster unreachable"));
        }
        let mut f = self
            .fail_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if f.is_some_and(|o| o == op) {
            *f = None;
            return Err(Error::backend(op.to_string(), "injected failure"));
        }
        Ok(())
    }

    /// Replaces volume `v`'s whole content with `data`.
    pub fn write(&self, v: VolumeId, data: &[u8]) {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(v, data.to_vec());
    }

    /// Writes `data` at `offset` into volume `v` (growing it if needed), as a guest would.
    pub fn write_at(&self, v: VolumeId, offset: u64, data: &[u8]) {
        let mut vols = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        let buf = vols.entry(v).or_default();
        let (start, end) = (offset as usize, offset as usize + data.len());
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[start..end].copy_from_slice(data);
    }

    /// Volume `v`'s content.
    pub fn data(&self, v: VolumeId) -> Option<Vec<u8>> {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&v)
            .cloned()
    }
}

/// Reads a snapshot of `size` bytes whose first `data.len()` bytes were written (the rest
/// reads as zeros, like a sparse image).
/// A delete's result from what `HashMap::remove` returned.
fn delete_action<T>(removed: Option<T>) -> DeleteAction {
    match removed {
        Some(_) => DeleteAction::Deleted,
        None => DeleteAction::AlreadyGone,
    }
}

/// Where the in-memory backend says an object lives.
fn location(name: String) -> ProviderUpdate {
    ProviderUpdate {
        provider_location: Some(format!("mem:{name}")),
    }
}

struct VecReader {
    data: Vec<u8>,
    size: u64,
    extents: Vec<Extent>,
}

impl SnapshotReader for VecReader {
    fn size(&self) -> u64 {
        self.size
    }
    fn extents(&self) -> &[Extent] {
        &self.extents
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - offset) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self.data.get(offset as usize + i).copied().unwrap_or(0);
        }
        Ok(n)
    }
}

#[async_trait]
impl VolumeDriver for MemoryDriver {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            thin: true,
            online_snapshot: true,
            hypervisor_snapshot: false,
            revert_any: true,
            clone: true,
            snapshot_method: "in-memory copy".into(),
            ..Default::default()
        }
    }
    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        self.check_fail("create_volume")?;
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(v.id, Vec::new());
        Ok(location(v.backend_name()))
    }
    async fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        self.check_fail("delete_volume")?;
        Ok(delete_action(
            self.volumes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&v.id),
        ))
    }
    async fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        self.check_fail("lookup_volume")?;
        Ok(self
            .volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&v.id)
            .then(|| location(v.backend_name())))
    }
    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        self.check_fail("create_snapshot")?;
        let data = self
            .data(v.id)
            .ok_or_else(|| Error::not_found("volume", v.id.to_string()))?;
        // Yield so concurrent tasks really interleave in the race tests.
        tokio::task::yield_now().await;
        if self
            .hang
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&v.id)
        {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(s.id, data);
        Ok(location(s.backend_name()))
    }
    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        _a: &Attachment,
    ) -> Result<ProviderUpdate> {
        self.create_snapshot(s, v).await
    }
    async fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction> {
        self.check_fail("delete_snapshot")?;
        if self
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&s.id)
        {
            return Err(Error::busy(
                format!("snapshot {} has dependent clones", s.id),
                vec![],
            ));
        }
        tokio::task::yield_now().await;
        Ok(delete_action(
            self.snapshots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&s.id),
        ))
    }
    async fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        self.check_fail("lookup_snapshot")?;
        Ok(self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&s.id)
            .then(|| location(s.backend_name())))
    }
    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        _p: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        self.check_fail("create_volume_from_snapshot")?;
        let data = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(v.id, data);
        Ok(location(v.backend_name()))
    }
    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        _p: ProgressHandle,
    ) -> Result<crate::types::RevertOutcome> {
        self.check_fail("revert_to_snapshot")?;
        let data = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(v.id, data);
        let ids: Vec<SnapshotId> = std::mem::take(
            &mut *self
                .invalidate_on_revert
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(ids.iter().copied());
        Ok(crate::types::RevertOutcome {
            invalidated: ids
                .into_iter()
                .map(|snapshot| crate::types::Invalidated {
                    snapshot,
                    reason: "copy-on-write space overflowed by the revert (injected)".into(),
                })
                .collect(),
        })
    }
    async fn flatten_volume(&self, _v: &Volume, _p: ProgressHandle) -> Result<()> {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let data = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        let extents = if data.is_empty() {
            vec![]
        } else {
            vec![Extent {
                offset: 0,
                length: (data.len() as u64).min(s.size_bytes),
            }]
        };
        Ok(Box::new(VecReader {
            data,
            size: s.size_bytes,
            extents,
        }))
    }
    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        Ok(self
            .broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&s.id)
            .then(|| "copy-on-write space overflowed".to_string()))
    }
    async fn stats(&self) -> Result<BackendStats> {
        Ok(BackendStats::default())
    }
}
