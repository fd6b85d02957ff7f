//! An in-memory driver for unit tests of the service's logic (status machine, races,
//! recovery). Never used to test a backend: drivers are tested against the real thing.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::driver::{SnapshotReader, VolumeDriver};
use crate::error::{Error, Result};
use crate::progress::ProgressHandle;
use crate::types::*;

/// Volumes and snapshots as byte vectors; `fail_next` makes the next mutating call fail.
#[derive(Default)]
pub struct FakeDriver {
    pub volumes: Mutex<HashMap<VolumeId, Vec<u8>>>,
    pub snapshots: Mutex<HashMap<SnapshotId, Vec<u8>>>,
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
}

impl FakeDriver {
    fn check_fail(&self, op: &str) -> Result<()> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable(op.to_string(), "cluster unreachable"));
        }
        let mut f = self.fail_next.lock().unwrap();
        if f.is_some_and(|o| o == op) {
            *f = None;
            return Err(Error::backend(op.to_string(), "injected failure"));
        }
        Ok(())
    }

    pub fn write(&self, v: VolumeId, data: &[u8]) {
        self.volumes.lock().unwrap().insert(v, data.to_vec());
    }

    pub fn data(&self, v: VolumeId) -> Option<Vec<u8>> {
        self.volumes.lock().unwrap().get(&v).cloned()
    }
}

struct VecReader(Vec<u8>, Vec<Extent>);

impl SnapshotReader for VecReader {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn extents(&self) -> &[Extent] {
        &self.1
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let off = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - off);
        buf[..n].copy_from_slice(&self.0[off..off + n]);
        Ok(n)
    }
}

#[async_trait]
impl VolumeDriver for FakeDriver {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            thin: true,
            online_snapshot: true,
            revert_any: true,
            clone: true,
            snapshot_method: "in-memory copy".into(),
            ..Default::default()
        }
    }
    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        self.check_fail("create_volume")?;
        self.volumes.lock().unwrap().insert(v.id, vec![0; 16]);
        Ok(ProviderUpdate {
            provider_location: Some(format!("mem:{}", v.backend_name())),
        })
    }
    async fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        self.check_fail("delete_volume")?;
        Ok(match self.volumes.lock().unwrap().remove(&v.id) {
            Some(_) => DeleteAction::Deleted,
            None => DeleteAction::AlreadyGone,
        })
    }
    async fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        self.check_fail("lookup_volume")?;
        Ok(self
            .volumes
            .lock()
            .unwrap()
            .contains_key(&v.id)
            .then(|| ProviderUpdate {
                provider_location: Some(format!("mem:{}", v.backend_name())),
            }))
    }
    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        self.check_fail("create_snapshot")?;
        let data = self
            .data(v.id)
            .ok_or_else(|| Error::not_found("volume", v.id.to_string()))?;
        // Yield so concurrent tasks really interleave in the race tests.
        tokio::task::yield_now().await;
        if self.hang.lock().unwrap().contains(&v.id) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        self.snapshots.lock().unwrap().insert(s.id, data);
        Ok(ProviderUpdate {
            provider_location: Some(format!("mem:{}", s.backend_name())),
        })
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
        if self.busy.lock().unwrap().contains(&s.id) {
            return Err(Error::busy(
                format!("snapshot {} has dependent clones", s.id),
                vec![],
            ));
        }
        tokio::task::yield_now().await;
        Ok(match self.snapshots.lock().unwrap().remove(&s.id) {
            Some(_) => DeleteAction::Deleted,
            None => DeleteAction::AlreadyGone,
        })
    }
    async fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        self.check_fail("lookup_snapshot")?;
        Ok(self
            .snapshots
            .lock()
            .unwrap()
            .contains_key(&s.id)
            .then(|| ProviderUpdate {
                provider_location: Some(format!("mem:{}", s.backend_name())),
            }))
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
            .unwrap()
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        self.volumes.lock().unwrap().insert(v.id, data);
        Ok(ProviderUpdate {
            provider_location: Some(format!("mem:{}", v.backend_name())),
        })
    }
    async fn revert_to_snapshot(&self, v: &Volume, s: &Snapshot, _p: ProgressHandle) -> Result<()> {
        self.check_fail("revert_to_snapshot")?;
        let data = self
            .snapshots
            .lock()
            .unwrap()
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        self.volumes.lock().unwrap().insert(v.id, data);
        Ok(())
    }
    async fn flatten_volume(&self, _v: &Volume, _p: ProgressHandle) -> Result<()> {
        self.busy.lock().unwrap().clear();
        Ok(())
    }
    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let data = self
            .snapshots
            .lock()
            .unwrap()
            .get(&s.id)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        let ext = vec![Extent {
            offset: 0,
            length: data.len() as u64,
        }];
        Ok(Box::new(VecReader(data, ext)))
    }
    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        Ok(self
            .broken
            .lock()
            .unwrap()
            .contains(&s.id)
            .then(|| "copy-on-write space overflowed".to_string()))
    }
    async fn stats(&self) -> Result<BackendStats> {
        Ok(BackendStats::default())
    }
}
