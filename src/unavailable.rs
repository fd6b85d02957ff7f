//! Stand-in for a backend that could not be opened (cluster down, volume group missing):
//! kiln still starts, `backend list` shows why, and every operation on that backend fails
//! with the reason instead of taking the other backends down.

use async_trait::async_trait;
use kiln_core::{
    Attachment, BackendStats, Capabilities, Error, ProgressHandle, ProviderUpdate, Result,
    Snapshot, SnapshotReader, Volume, VolumeDriver,
};

/// A backend that failed to open; holds the reason.
pub struct Unavailable(pub String);

impl Unavailable {
    fn err(&self) -> Error {
        Error::backend("open backend", format!("backend unavailable: {}", self.0))
    }
}

#[async_trait]
impl VolumeDriver for Unavailable {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot_method: "unavailable".into(),
            ..Default::default()
        }
    }
    async fn create_volume(&self, _v: &Volume) -> Result<ProviderUpdate> {
        Err(self.err())
    }
    async fn delete_volume(&self, _v: &Volume) -> Result<()> {
        Err(self.err())
    }
    async fn volume_exists(&self, _v: &Volume) -> Result<bool> {
        Err(self.err())
    }
    async fn create_snapshot(&self, _s: &Snapshot, _v: &Volume) -> Result<ProviderUpdate> {
        Err(self.err())
    }
    async fn create_snapshot_force(
        &self,
        _s: &Snapshot,
        _v: &Volume,
        _a: &Attachment,
    ) -> Result<ProviderUpdate> {
        Err(self.err())
    }
    async fn delete_snapshot(&self, _s: &Snapshot) -> Result<()> {
        Err(self.err())
    }
    async fn snapshot_exists(&self, _s: &Snapshot) -> Result<bool> {
        Err(self.err())
    }
    async fn create_volume_from_snapshot(
        &self,
        _v: &Volume,
        _s: &Snapshot,
        _p: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        Err(self.err())
    }
    async fn revert_to_snapshot(
        &self,
        _v: &Volume,
        _s: &Snapshot,
        _p: ProgressHandle,
    ) -> Result<()> {
        Err(self.err())
    }
    async fn flatten_volume(&self, _v: &Volume, _p: ProgressHandle) -> Result<()> {
        Err(self.err())
    }
    async fn open_snapshot_reader(&self, _s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        Err(self.err())
    }
    async fn stats(&self) -> Result<BackendStats> {
        Err(self.err())
    }
}
