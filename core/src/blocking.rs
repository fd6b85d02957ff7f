//! The one blocking adapter: backends written as plain synchronous code run behind it.
//!
//! Model: crosvm's `disk/src/asynchronous.rs` (`AsyncDiskFileWrapper`), one wrapper that runs
//! any synchronous disk on a blocking pool. Every kiln backend blocks (lvm and qemu-img
//! commands, FICLONE, librbd calls), so each used to carry its own `spawn_blocking` + span +
//! timing + logging helper. Now a driver implements [`BlockingDriver`] and [`Blocking`]
//! does those four things once, the same way for every backend:
//!
//! - the call runs on tokio's blocking pool, never on a runtime worker;
//! - inside a `driver` span naming the backend, the operation and the object;
//! - its elapsed time is logged at `debug` on success and at `info` on failure (the caller
//!   reports the error; `info` keeps the CLI's one-line stderr promise at the default level);
//! - an error leaves with the operation, object and backend in its context.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::driver::{
    BenchPrimitives, GroupMember, GroupOutcome, SnapshotDelta, SnapshotReader, VolumeCheck,
    VolumeDriver, VolumeWriter, WindowedSnapshots,
};
use crate::error::{Error, Result};
use crate::progress::ProgressHandle;
use crate::types::{
    Attachment, BackendStats, Capabilities, ConnectionInfo, DeleteAction, ProviderUpdate, Snapshot,
    Volume,
};

/// A backend written as blocking code: the same contract as [`VolumeDriver`] (see its docs
/// for each method's promise), without `async`. Every method may block for as long as its
/// backend needs.
pub trait BlockingDriver: Send + Sync + 'static {
    /// See [`VolumeDriver::capabilities`].
    fn capabilities(&self) -> Capabilities;
    /// See [`VolumeDriver::create_volume`].
    fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate>;
    /// See [`VolumeDriver::delete_volume`].
    fn delete_volume(&self, v: &Volume) -> Result<DeleteAction>;
    /// See [`VolumeDriver::lookup_volume`].
    fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>>;
    /// See [`VolumeDriver::create_snapshot`].
    fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate>;
    /// See [`VolumeDriver::create_snapshot_force`].
    fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate>;
    /// See [`VolumeDriver::create_group_snapshot`]. The default takes the members one by
    /// one on one blocking thread.
    fn create_group_snapshot(&self, members: &[GroupMember]) -> Result<GroupOutcome> {
        Ok(members
            .iter()
            .map(|(s, v, a)| match a {
                Some(a) => self.create_snapshot_force(s, v, a),
                None => self.create_snapshot(s, v),
            })
            .collect())
    }
    /// See [`VolumeDriver::delete_snapshot`].
    fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction>;
    /// See [`VolumeDriver::delete_snapshot_with_progress`].
    fn delete_snapshot_with_progress(
        &self,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<DeleteAction> {
        let _ = progress;
        self.delete_snapshot(s)
    }
    /// See [`VolumeDriver::lookup_snapshot`].
    fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>>;
    /// See [`VolumeDriver::create_volume_from_snapshot`].
    fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate>;
    /// See [`VolumeDriver::revert_to_snapshot`].
    fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<crate::types::RevertOutcome>;
    /// See [`VolumeDriver::flatten_volume`].
    fn flatten_volume(&self, v: &Volume, progress: ProgressHandle) -> Result<()> {
        let _ = (v, progress);
        Ok(())
    }
    /// See [`VolumeDriver::open_snapshot_reader`].
    fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>>;
    /// See [`VolumeDriver::stats`].
    fn stats(&self) -> Result<BackendStats>;
    /// See [`VolumeDriver::open_volume_writer`]. The default: `Unsupported`.
    fn open_volume_writer(&self, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
        let _ = v;
        Err(Error::unsupported(
            "this backend cannot write a volume's data",
        ))
    }
    /// See [`VolumeDriver::backup_pool`]. The default: `Unsupported`.
    fn backup_pool(&self, pool: &str) -> Result<Arc<dyn crate::backup::PoolBackups>> {
        let _ = pool;
        Err(Error::unsupported("this backend keeps no backup pools"))
    }
    /// See [`VolumeDriver::diff_snapshots`]. The default: [`SnapshotDelta::Untracked`].
    fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        let _ = (from, to);
        Ok(SnapshotDelta::Untracked)
    }
    /// See [`VolumeDriver::snapshot_health`].
    fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let _ = s;
        Ok(None)
    }
    /// See [`VolumeDriver::connection_info`].
    fn connection_info(&self, v: &Volume) -> Result<ConnectionInfo> {
        let _ = v;
        Err(crate::error::Error::unsupported(
            "this backend does not report connection info yet",
        ))
    }
    /// See [`VolumeDriver::prepare_snapshot`]. The default does nothing.
    fn prepare_snapshot(&self, v: &Volume) -> Result<()> {
        let _ = v;
        Ok(())
    }
    /// See [`VolumeDriver::fence`]. The default fences nothing.
    fn fence(&self, handles: &[String]) -> Result<Vec<String>> {
        let _ = handles;
        Ok(vec![])
    }
    /// See [`VolumeDriver::bench`]. A driver with a primitive returns `Some(self)`.
    fn bench(self: Arc<Self>) -> Option<Arc<dyn BenchPrimitives>> {
        None
    }
    /// See [`VolumeDriver::check`]. A driver with a check returns `Some(self)`.
    fn check(self: Arc<Self>) -> Option<Arc<dyn VolumeCheck>> {
        None
    }
    /// See [`VolumeDriver::windowed`]. A driver with two-step snapshots returns `Some(self)`.
    fn windowed(self: Arc<Self>) -> Option<Arc<dyn WindowedSnapshots>> {
        None
    }
}

/// Runs a [`BlockingDriver`] as a [`VolumeDriver`]. Cheap to clone.
pub struct Blocking<D> {
    backend: Arc<str>,
    driver: Arc<D>,
}

impl<D> Clone for Blocking<D> {
    fn clone(&self) -> Self {
        Blocking {
            backend: self.backend.clone(),
            driver: self.driver.clone(),
        }
    }
}

impl<D: std::fmt::Debug> std::fmt::Debug for Blocking<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocking")
            .field("backend", &self.backend)
            .field("driver", &self.driver)
            .finish()
    }
}

impl<D> std::ops::Deref for Blocking<D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.driver
    }
}

impl<D: BlockingDriver> Blocking<D> {
    /// Wraps `driver`, the backend configured as `backend` (named in spans and errors).
    pub fn new(backend: &str, driver: D) -> Self {
        Blocking {
            backend: backend.into(),
            driver: Arc::new(driver),
        }
    }

    /// The wrapped driver, shared (for tools that need its own API on a blocking thread).
    pub fn shared(&self) -> Arc<D> {
        self.driver.clone()
    }

    /// Runs `f` on the blocking pool with the driver, inside a span naming the backend,
    /// `op` and `object`; logs the elapsed time and puts the context into an error.
    pub async fn call<T, F>(&self, op: &'static str, object: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&D) -> Result<T> + Send + 'static,
    {
        let driver = self.driver.clone();
        let backend = self.backend.clone();
        let span = tracing::info_span!("driver", backend = %backend, op, object = %object);
        let worker_span = span.clone();
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = worker_span.enter();
            f(&driver)
        })
        .await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        let _entered = span.enter();
        let r = joined.map_err(|e| Error::backend(op, format!("worker thread failed: {e}")))?;
        match r {
            Ok(v) => {
                tracing::debug!(elapsed_ms, "done");
                Ok(v)
            }
            Err(e) => {
                tracing::info!(elapsed_ms, error = %e, kind = e.kind().as_str(), "failed");
                Err(e
                    .with_op(op)
                    .with_object(object)
                    .with_backend(backend.to_string()))
            }
        }
    }
}

#[async_trait]
impl<D: BlockingDriver> VolumeDriver for Blocking<D> {
    fn capabilities(&self) -> Capabilities {
        self.driver.capabilities()
    }

    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        let v = v.clone();
        self.call("create_volume", v.id.to_string(), move |d| {
            d.create_volume(&v)
        })
        .await
    }

    async fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        let v = v.clone();
        self.call("delete_volume", v.id.to_string(), move |d| {
            d.delete_volume(&v)
        })
        .await
    }

    async fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        let v = v.clone();
        self.call("lookup_volume", v.id.to_string(), move |d| {
            d.lookup_volume(&v)
        })
        .await
    }

    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        let (s, v) = (s.clone(), v.clone());
        self.call("create_snapshot", s.id.to_string(), move |d| {
            d.create_snapshot(&s, &v)
        })
        .await
    }

    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        let (s, v, a) = (s.clone(), v.clone(), a.clone());
        self.call("create_snapshot_force", s.id.to_string(), move |d| {
            d.create_snapshot_force(&s, &v, &a)
        })
        .await
    }

    async fn create_group_snapshot(&self, members: &[GroupMember]) -> Result<GroupOutcome> {
        if !self.driver.capabilities().group_snapshot {
            // No native group primitive: the members are independent calls, so take them
            // concurrently, each on its own blocking thread. One by one, an instance's
            // freeze window would grow with every volume.
            let each = members.iter().map(|(s, v, a)| async move {
                match a {
                    Some(a) => self.create_snapshot_force(s, v, a).await,
                    None => self.create_snapshot(s, v).await,
                }
            });
            return Ok(futures::future::join_all(each).await);
        }
        let members = members.to_vec();
        let object = members
            .iter()
            .map(|(s, _, _)| s.id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.call("create_group_snapshot", object, move |d| {
            d.create_group_snapshot(&members)
        })
        .await
    }

    async fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction> {
        let s = s.clone();
        self.call("delete_snapshot", s.id.to_string(), move |d| {
            d.delete_snapshot(&s)
        })
        .await
    }

    async fn delete_snapshot_with_progress(
        &self,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<DeleteAction> {
        let s = s.clone();
        self.call("delete_snapshot", s.id.to_string(), move |d| {
            d.delete_snapshot_with_progress(&s, progress)
        })
        .await
    }

    async fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        let s = s.clone();
        self.call("lookup_snapshot", s.id.to_string(), move |d| {
            d.lookup_snapshot(&s)
        })
        .await
    }

    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        let (v, s) = (v.clone(), s.clone());
        self.call("create_volume_from_snapshot", v.id.to_string(), move |d| {
            d.create_volume_from_snapshot(&v, &s, progress)
        })
        .await
    }

    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<crate::types::RevertOutcome> {
        let (v, s) = (v.clone(), s.clone());
        self.call("revert_to_snapshot", v.id.to_string(), move |d| {
            d.revert_to_snapshot(&v, &s, progress)
        })
        .await
    }

    async fn flatten_volume(&self, v: &Volume, progress: ProgressHandle) -> Result<()> {
        let v = v.clone();
        self.call("flatten_volume", v.id.to_string(), move |d| {
            d.flatten_volume(&v, progress)
        })
        .await
    }

    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let s = s.clone();
        self.call("open_snapshot_reader", s.id.to_string(), move |d| {
            d.open_snapshot_reader(&s)
        })
        .await
    }

    async fn stats(&self) -> Result<BackendStats> {
        self.call("stats", String::new(), |d| d.stats()).await
    }

    async fn open_volume_writer(&self, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
        let v = v.clone();
        self.call("open_volume_writer", v.id.to_string(), move |d| {
            d.open_volume_writer(&v)
        })
        .await
    }

    async fn backup_pool(&self, pool: &str) -> Result<Arc<dyn crate::backup::PoolBackups>> {
        let pool = pool.to_string();
        self.call("backup_pool", pool.clone(), move |d| d.backup_pool(&pool))
            .await
    }

    async fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        let (from, to) = (from.clone(), to.clone());
        self.call("diff_snapshots", to.id.to_string(), move |d| {
            d.diff_snapshots(&from, &to)
        })
        .await
    }

    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let s = s.clone();
        self.call("snapshot_health", s.id.to_string(), move |d| {
            d.snapshot_health(&s)
        })
        .await
    }

    async fn connection_info(&self, v: &Volume) -> Result<ConnectionInfo> {
        let v = v.clone();
        self.call("connection_info", v.id.to_string(), move |d| {
            d.connection_info(&v)
        })
        .await
    }

    async fn prepare_snapshot(&self, v: &Volume) -> Result<()> {
        let v = v.clone();
        self.call("prepare_snapshot", v.id.to_string(), move |d| {
            d.prepare_snapshot(&v)
        })
        .await
    }

    async fn fence(&self, handles: &[String]) -> Result<Vec<String>> {
        let handles = handles.to_vec();
        self.call("fence", format!("{} handle(s)", handles.len()), move |d| {
            d.fence(&handles)
        })
        .await
    }

    fn bench(&self) -> Option<Arc<dyn BenchPrimitives>> {
        self.driver.clone().bench()
    }

    fn check(&self) -> Option<Arc<dyn VolumeCheck>> {
        self.driver.clone().check()
    }

    fn windowed(&self) -> Option<Arc<dyn WindowedSnapshots>> {
        self.driver.clone().windowed()
    }
}
