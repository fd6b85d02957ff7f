//! [`LvmBackend`] as a [`BlockingDriver`]: the contract of `kiln_core::VolumeDriver` in
//! plain blocking code. kiln-core's [`kiln_core::Blocking`] adapter runs each call on tokio's
//! blocking pool, in a span, timed and logged once ([`crate::LvmDriver`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_core::{
    Attachment, BackendStats, BenchPrimitives, BlockingDriver, Capabilities, DeleteAction,
    PrimitiveSample, ProgressHandle, ProviderUpdate, Result, Snapshot, SnapshotDelta,
    SnapshotReader, Volume, VolumeWriter,
};
use serde_json::json;

use crate::backend::{Kind, LvmBackend};
use crate::report;

impl LvmBackend {
    /// VG size and free space; for thin, the pool's size and data/metadata usage; and every
    /// thick snapshot that overflowed, under `invalid_snapshots`.
    pub(crate) fn stats(&self) -> Result<BackendStats> {
        let vg = self.vg_row()?;
        let rows = self.lvs()?;
        let mut details = BTreeMap::new();
        details.insert("volume_group".into(), json!(self.vg));
        details.insert(
            "type".into(),
            json!(if self.kind == Kind::Thin {
                "thin"
            } else {
                "thick"
            }),
        );
        let pool = rows.iter().find(|r| r.lv_name == self.pool);
        if let (Kind::Thin, Some(pool)) = (self.kind, pool) {
            details.insert("thin_pool".into(), json!(self.pool));
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
    }
}

impl BlockingDriver for LvmBackend {
    fn capabilities(&self) -> Capabilities {
        let thin = self.is_thin();
        Capabilities {
            thin,
            online_snapshot: true,
            hypervisor_snapshot: false,
            revert_any: true,
            clone: true,
            clone_cow: thin,
            // Thin snapshots: the pool's mappings (thin_delta); thick COW keeps no record.
            diff: thin,
            group_snapshot: false,
            snapshot_method: if thin {
                "lvcreate --snapshot (thin)".into()
            } else {
                "lvcreate --snapshot -L (thick COW)".into()
            },
        }
    }

    fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        LvmBackend::create_volume(self, v)
    }

    fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        LvmBackend::delete_volume(self, v)
    }

    fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        LvmBackend::lookup_volume(self, v)
    }

    fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        LvmBackend::create_snapshot(self, s, v)
    }

    /// The same primitive as `create_snapshot`: device-mapper suspends the origin while it
    /// loads the snapshot tables, completing in-flight writes and holding new ones, so the
    /// snapshot is a crash-consistent point in time of an attached volume.
    fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        tracing::debug!(instance = %a.instance_id, "snapshot of an attached volume");
        LvmBackend::create_snapshot(self, s, v)
    }

    fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction> {
        LvmBackend::delete_snapshot(self, s)
    }

    fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        LvmBackend::lookup_snapshot(self, s)
    }

    fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        LvmBackend::create_volume_from_snapshot(self, v, s, &progress)
    }

    fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<kiln_core::RevertOutcome> {
        LvmBackend::revert_to_snapshot(self, v, s, &progress)
    }

    fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        Ok(Box::new(LvmBackend::open_snapshot_reader(self, s)?))
    }

    fn stats(&self) -> Result<BackendStats> {
        LvmBackend::stats(self)
    }

    /// The volume's LV, opened read-write; on thin, zeroing unmaps whole pool chunks.
    fn open_volume_writer(&self, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
        Ok(Box::new(LvmBackend::open_volume_writer(self, v)?))
    }

    fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        LvmBackend::diff_snapshots(self, from, to)
    }

    fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        LvmBackend::snapshot_health(self, s)
    }

    /// Cinder's LVM shape for a local attach: `local` with the device node. The node is
    /// device-mapper's (`/dev/mapper/<vg>-<lv>`, dashes doubled), which exists whenever the
    /// LV is active, unlike the udev-made `/dev/<vg>/<lv>` link.
    fn connection_info(&self, v: &Volume) -> Result<kiln_core::ConnectionInfo> {
        if LvmBackend::lookup_volume(self, v)?.is_none() {
            return Err(kiln_core::Error::not_found("volume", v.id));
        }
        let dev = format!(
            "/dev/mapper/{}",
            crate::names::dm_name(&self.vg, &crate::names::volume(&v.id))
        );
        let mut data = serde_json::Map::new();
        data.insert("device_path".into(), dev.into());
        Ok(kiln_core::ConnectionInfo {
            driver_volume_type: "local".into(),
            data,
        })
    }

    fn bench(self: Arc<Self>) -> Option<Arc<dyn BenchPrimitives>> {
        Some(self)
    }
}

impl BenchPrimitives for LvmBackend {
    /// One sample: a bare `lvcreate --snapshot` (thick: with `-L <cow>`) and `lvremove -f` of
    /// it on `v`'s LV, each timed, with no report before or after.
    fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        LvmBackend::bench_primitives(self, v)
    }
}
