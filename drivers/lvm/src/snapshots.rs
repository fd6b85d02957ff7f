//! Creating, deleting and inspecting snapshots, and the raw primitive benchmark.

use std::time::Instant;

use kiln_core::{Error, PrimitiveSample, ProviderUpdate, Result, Snapshot, SnapshotId, Volume};

use crate::backend::{Backend, Kind};
use crate::blockdev;
use crate::command::Retry;
use crate::names;
use crate::report::LvRow;

/// Bytes of COW metadata overhead allowed on top of a 100 % thick snapshot: one 16-byte
/// exception record per 4 KiB chunk is 1/256 of the origin; 1/64 leaves ample headroom, and
/// lvm trims any excess down to the maximum usable size itself.
const COW_OVERHEAD_DIVISOR: u64 = 64;

impl Backend {
    /// COW size for a thick snapshot of an origin of `origin_bytes`.
    pub fn cow_bytes(&self, origin_bytes: u64) -> u64 {
        let pct = u64::from(self.cfg.thick_snapshot_percent);
        let mut cow = (origin_bytes as u128 * pct as u128).div_ceil(100) as u64;
        if pct >= 100 {
            cow += origin_bytes / COW_OVERHEAD_DIVISOR;
        }
        cow.div_ceil(512) * 512
    }

    /// The origin LV of `v`, or `NotFound`.
    pub(crate) fn origin_row(&self, v: &Volume) -> Result<LvRow> {
        self.lv(&names::volume(&v.id))?
            .ok_or_else(|| Error::NotFound {
                what: "volume",
                id: v.id.to_string(),
            })
    }

    /// `lvcreate --snapshot` of the volume. Device-mapper suspends the origin (flushing
    /// in-flight I/O) while it switches tables, so the result is a crash-consistent point in
    /// time even while the volume is being written: the same call serves the forced snapshot.
    pub fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        let rows = self.lvs()?;
        let vol = names::volume(&v.id);
        let origin = rows
            .iter()
            .find(|r| r.lv_name == vol)
            .ok_or_else(|| Error::NotFound {
                what: "volume",
                id: v.id.to_string(),
            })?;
        let snap = names::snapshot(&s.id);
        if let Some(existing) = rows.iter().find(|r| r.lv_name == snap) {
            if existing.origin == origin.lv_name {
                return Ok(self.provider(&snap));
            }
            return Err(Error::backend(
                "lvcreate --snapshot",
                format!(
                    "{} already exists (origin {:?})",
                    self.spec(&snap),
                    existing.origin
                ),
            ));
        }
        self.lvcreate_snapshot(&snap, origin)?;
        Ok(self.provider(&snap))
    }

    /// The bare primitive: thin snapshots carry the activation-skip flag (so they stay out of
    /// the way of bulk activation); thick ones get their configured COW space.
    fn lvcreate_snapshot(&self, snap: &str, origin: &LvRow) -> Result<()> {
        let origin_spec = self.spec(&origin.lv_name);
        match self.kind {
            Kind::Thin => {
                self.runner.lvm(
                    "lvcreate --snapshot",
                    &["lvcreate", "-q", "-s", "-ky", "-n", snap, &origin_spec],
                    Retry::Never,
                )?;
            }
            Kind::Thick => {
                self.ensure_thick_active(origin)?;
                let cow = format!("{}b", self.cow_bytes(origin.size()?));
                self.runner.lvm(
                    "lvcreate --snapshot",
                    &["lvcreate", "-q", "-s", "-L", &cow, "-n", snap, &origin_spec],
                    Retry::Never,
                )?;
            }
        }
        Ok(())
    }

    /// Removes a snapshot; succeeds when it is already gone. Clones never depend on a snapshot
    /// here (thin clones are independent thin LVs, thick clones are copies), so this is never
    /// `Busy`. A thick snapshot's COW store is zeroed first when configured.
    pub fn delete_snapshot(&self, s: &Snapshot) -> Result<()> {
        let snap = names::snapshot(&s.id);
        let Some(row) = self.lv(&snap)? else {
            return Ok(());
        };
        if row.is_thick_snapshot() && self.cfg.zero_deleted_thick_snapshots {
            self.zero_cow(&row)?;
        }
        self.remove(&snap)
    }

    /// Zeroes the COW device (`<vg>-<lv>-cow`) of a thick snapshot: that is where copies of the
    /// origin's old blocks live. Zeroing the snapshot's own device instead would be wrong: it
    /// would copy every origin chunk into the COW and overflow it.
    fn zero_cow(&self, row: &LvRow) -> Result<()> {
        self.ensure_thick_active(row)?;
        let cow = std::path::PathBuf::from(format!(
            "/dev/mapper/{}-cow",
            names::dm_name(&self.vg, &row.lv_name)
        ));
        let f = blockdev::open_write(&cow)
            .map_err(|e| Error::io(format!("opening {} to zero it", cow.display()), e))?;
        blockdev::zero_all(&f, None).map_err(|e| Error::io(format!("zeroing {}", cow.display()), e))
    }

    /// Whether the snapshot LV exists (an invalid thick snapshot still exists).
    pub fn snapshot_exists(&self, s: &Snapshot) -> Result<bool> {
        Ok(self.lv(&names::snapshot(&s.id))?.is_some())
    }

    /// `Some(reason)` when the snapshot is unusable (a thick snapshot whose COW overflowed),
    /// `None` when it is healthy. `NotFound` when it does not exist.
    pub fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let snap = names::snapshot(&s.id);
        let mut row = self.lv(&snap)?.ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: s.id.to_string(),
        })?;
        if row.is_thick_snapshot() && !row.is_active() {
            // The kernel records invalidity in the COW header; it shows once the table is live.
            self.ensure_thick_active(&row)?;
            row = self.lv(&snap)?.ok_or_else(|| Error::NotFound {
                what: "snapshot",
                id: s.id.to_string(),
            })?;
        }
        Ok(self.invalid_reason(&row))
    }

    /// Times one bare `lvcreate --snapshot` and one `lvremove -f` of it on `v`'s LV.
    pub fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let origin = self.origin_row(v)?;
        if self.kind == Kind::Thick {
            self.ensure_thick_active(&origin)?;
        }
        let snap = names::snapshot(&SnapshotId::new());
        let t = Instant::now();
        self.lvcreate_snapshot(&snap, &origin)?;
        let create = t.elapsed();
        let t = Instant::now();
        self.remove(&snap)?;
        let delete = t.elapsed();
        let name = match self.kind {
            Kind::Thin => "lvcreate --snapshot (thin) + lvremove -f",
            Kind::Thick => "lvcreate --snapshot -L (thick COW) + lvremove -f",
        };
        Ok(vec![PrimitiveSample {
            name: name.to_string(),
            create,
            delete,
        }])
    }
}
