//! [`LvmDriver`]: the async `VolumeDriver` face of [`Backend`]. Every call runs its lvm
//! commands and block I/O on tokio's blocking pool, inside a span naming the objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kiln_core::{
    Attachment, BackendStats, Capabilities, Error, PrimitiveSample, ProgressHandle, ProviderUpdate,
    Result, Snapshot, SnapshotReader, Volume, VolumeDriver,
};
use serde_json::json;

use crate::backend::{Backend, Kind};
use crate::config::LvmConfig;
use crate::report;

/// The LVM backend: thin or thick logical volumes of one volume group.
#[derive(Debug, Clone)]
pub struct LvmDriver {
    name: String,
    inner: Arc<Backend>,
}

impl LvmDriver {
    /// Opens backend `backend_name`: checks that the volume group (and, for thin, the pool)
    /// exists and resolves `type = "auto"`. Fails with [`Error::Config`] naming what is
    /// missing; every lvm command is bounded by `command_timeout_secs`, so this cannot hang.
    pub async fn open(backend_name: &str, cfg: LvmConfig) -> Result<LvmDriver> {
        let name = backend_name.to_string();
        let span = tracing::info_span!("lvm.open", backend = %name, vg = %cfg.volume_group);
        let inner = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            Backend::open(cfg)
        })
        .await
        .map_err(|e| Error::backend("open", format!("worker failed: {e}")))??;
        tracing::info!(backend = %name, vg = %inner.vg, kind = ?inner.kind, "lvm backend opened");
        Ok(LvmDriver {
            name,
            inner: Arc::new(inner),
        })
    }

    /// Whether this backend creates thin LVs (after resolving `auto`).
    pub fn is_thin(&self) -> bool {
        self.inner.kind == Kind::Thin
    }

    /// The volume group.
    pub fn volume_group(&self) -> &str {
        &self.inner.vg
    }

    async fn blocking<T, F>(&self, op: &'static str, object: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Backend) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let span = tracing::info_span!("lvm", backend = %self.name, op, object = %object);
        let span2 = span.clone();
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let _g = span2.enter();
            f(&inner)
        })
        .await
        .map_err(|e| Error::backend(op, format!("worker failed: {e}")))?;
        let _g = span.enter();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &r {
            Ok(_) => tracing::info!(elapsed_ms, "done"),
            Err(e) => tracing::warn!(elapsed_ms, error = %e, "failed"),
        }
        r
    }
}

#[async_trait]
impl VolumeDriver for LvmDriver {
    fn capabilities(&self) -> Capabilities {
        let thin = self.is_thin();
        Capabilities {
            thin,
            online_snapshot: true,
            revert_any: true,
            clone: true,
            clone_cow: thin,
            diff: false,
            group_snapshot: false,
            snapshot_method: if thin {
                "lvcreate --snapshot (thin)".into()
            } else {
                "lvcreate --snapshot -L (thick COW)".into()
            },
        }
    }

    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        let v = v.clone();
        self.blocking("create_volume", v.id.to_string(), move |b| {
            b.create_volume(&v)
        })
        .await
    }

    async fn delete_volume(&self, v: &Volume) -> Result<()> {
        let v = v.clone();
        self.blocking("delete_volume", v.id.to_string(), move |b| {
            b.delete_volume(&v)
        })
        .await
    }

    async fn volume_exists(&self, v: &Volume) -> Result<bool> {
        let v = v.clone();
        self.blocking("volume_exists", v.id.to_string(), move |b| {
            b.volume_exists(&v)
        })
        .await
    }

    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        let (s, v) = (s.clone(), v.clone());
        self.blocking("create_snapshot", s.id.to_string(), move |b| {
            b.create_snapshot(&s, &v)
        })
        .await
    }

    /// The same primitive as [`VolumeDriver::create_snapshot`]: device-mapper suspends the
    /// origin while it loads the snapshot tables, completing in-flight writes and holding new
    /// ones, so the snapshot is a crash-consistent point in time of an attached volume.
    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        let (s, v) = (s.clone(), v.clone());
        let instance = a.instance_id;
        self.blocking("create_snapshot_force", s.id.to_string(), move |b| {
            tracing::info!(%instance, "snapshot of an attached volume");
            b.create_snapshot(&s, &v)
        })
        .await
    }

    async fn delete_snapshot(&self, s: &Snapshot) -> Result<()> {
        let s = s.clone();
        self.blocking("delete_snapshot", s.id.to_string(), move |b| {
            b.delete_snapshot(&s)
        })
        .await
    }

    async fn snapshot_exists(&self, s: &Snapshot) -> Result<bool> {
        let s = s.clone();
        self.blocking("snapshot_exists", s.id.to_string(), move |b| {
            b.snapshot_exists(&s)
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
        self.blocking("create_volume_from_snapshot", v.id.to_string(), move |b| {
            b.create_volume_from_snapshot(&v, &s, &progress)
        })
        .await
    }

    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<()> {
        let (v, s) = (v.clone(), s.clone());
        self.blocking(
            "revert_to_snapshot",
            format!("{}@{}", v.id, s.id),
            move |b| b.revert_to_snapshot(&v, &s, &progress),
        )
        .await
    }

    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let s = s.clone();
        let r = self
            .blocking("open_snapshot_reader", s.id.to_string(), move |b| {
                b.open_snapshot_reader(&s)
            })
            .await?;
        Ok(Box::new(r))
    }

    /// VG size and free space; for thin, the pool's size and data/metadata usage; and every
    /// thick snapshot that overflowed, under `invalid_snapshots`.
    async fn stats(&self) -> Result<BackendStats> {
        self.blocking("stats", self.inner.vg.clone(), |b| {
            let vg = b.vg_row()?;
            let rows = b.lvs()?;
            let mut details = BTreeMap::new();
            details.insert("volume_group".into(), json!(b.vg));
            details.insert(
                "type".into(),
                json!(if b.kind == Kind::Thin {
                    "thin"
                } else {
                    "thick"
                }),
            );
            let pool = rows.iter().find(|r| r.lv_name == b.pool);
            if let (Kind::Thin, Some(pool)) = (b.kind, pool) {
                {
                    details.insert("thin_pool".into(), json!(b.pool));
                    details.insert("pool_size_bytes".into(), json!(pool.size()?));
                    details.insert(
                        "pool_data_percent".into(),
                        json!(report::parse_percent(&pool.data_percent)),
                    );
                    details.insert(
                        "pool_metadata_percent".into(),
                        json!(report::parse_percent(&pool.metadata_percent)),
                    );
                }
            }
            let invalid: Vec<_> = rows
                .iter()
                .filter(|r| r.is_invalid_snapshot())
                .map(|r| json!({"lv": r.lv_name, "origin": r.origin}))
                .collect();
            details.insert("invalid_snapshots".into(), json!(invalid));
            Ok(BackendStats {
                total_bytes: Some(report::parse_u64("vg_size", &vg.vg_size)?),
                free_bytes: Some(report::parse_u64("vg_free", &vg.vg_free)?),
                details,
            })
        })
        .await
    }

    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let s = s.clone();
        self.blocking("snapshot_health", s.id.to_string(), move |b| {
            b.snapshot_health(&s)
        })
        .await
    }

    async fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let v = v.clone();
        self.blocking("bench_primitives", v.id.to_string(), move |b| {
            b.bench_primitives(&v)
        })
        .await
    }
}
