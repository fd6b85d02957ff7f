//! Creating, deleting and inspecting snapshots, and the raw primitive benchmark.
//!
//! Create and delete run their one lvm command first and inspect the VG only when it fails:
//! the common path then costs one lvm process, like the bare primitive, while a re-run after
//! a crash still finds out that its work was already done.

use std::time::Instant;

use kiln_core::{
    DeleteAction, Error, PrimitiveSample, ProviderUpdate, Result, Snapshot, SnapshotId, Volume,
};

use crate::backend::{Kind, LvmBackend};
use crate::blockdev;
use crate::command::Retry;
use crate::names;
use crate::report::{self, LvRow};

/// Bytes of COW metadata overhead allowed on top of a 100 % thick snapshot: one 16-byte
/// exception record per 4 KiB chunk is 1/256 of the origin; 1/64 leaves ample headroom, and
/// lvm trims any excess down to the maximum usable size itself.
const COW_OVERHEAD_DIVISOR: u64 = 64;

impl LvmBackend {
    /// COW size for a thick snapshot of an origin LV of `origin_bytes`.
    pub(crate) fn cow_bytes(&self, origin_bytes: u64) -> u64 {
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
            .ok_or_else(|| Error::not_found("volume", v.id.to_string()))
    }

    /// `lvcreate --snapshot` of the volume. Device-mapper suspends the origin (flushing
    /// in-flight I/O) while it switches tables, so the result is a crash-consistent point in
    /// time even while the volume is being written: the same call serves the forced snapshot.
    ///
    /// Runs `lvcreate` straight away; only when it fails does one `lvs` tell a re-run that
    /// finds its snapshot already made (success, same origin), a half-made one left by a
    /// failed thick lvcreate (an origin-less LV under the snapshot's name: removed, and the
    /// lvcreate run once more), a missing volume (`NotFound`) and a name clash with another
    /// origin from lvm's own failure.
    pub(crate) fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        let vol = names::volume(&v.id);
        let snap = names::snapshot(&s.id);
        let failed = match self.lvcreate_snapshot(&snap, &vol, v.size_bytes) {
            Ok(()) => return Ok(self.provider(&snap)),
            Err(e) => e,
        };
        let rows = match self.lvs_named(&[&snap, &vol]) {
            Ok(rows) => rows,
            Err(probe) => {
                // Cannot tell what happened: lvcreate's own words are the better report.
                tracing::debug!(error = %probe, "lvs after a failed lvcreate failed too");
                return Err(failed);
            }
        };
        if let Some(existing) = rows.iter().find(|r| r.lv_name == snap) {
            if existing.origin == vol {
                return Ok(self.provider(&snap));
            }
            if existing.origin.is_empty() {
                // A thick lvcreate that failed part-way (after allocating the COW LV, before
                // making it a snapshot) leaves a plain LV under this snapshot's own name. Its
                // name is this snapshot's id, so it is nobody else's: remove it and try once
                // more, instead of reporting "already exists" for ever.
                tracing::warn!(lv = %self.spec(&snap), "removing a half-made snapshot LV");
                self.remove(&snap)?;
                self.lvcreate_snapshot(&snap, &vol, v.size_bytes)?;
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
        if !rows.iter().any(|r| r.lv_name == vol) {
            return Err(Error::not_found("volume", v.id.to_string()));
        }
        Err(failed)
    }

    /// The bare primitive on origin LV `origin` of a volume of `size_bytes`: thin snapshots
    /// carry the activation-skip flag (so they stay out of the way of bulk activation); thick
    /// ones get their configured COW space, computed from the origin's LV size (`size_bytes`
    /// rounded up to whole extents, as lvm made it) so that no report is needed. A thick
    /// snapshot of an inactive origin is created inactive (nothing can write to it then).
    fn lvcreate_snapshot(&self, snap: &str, origin: &str, size_bytes: u64) -> Result<()> {
        let origin_spec = self.spec(origin);
        match self.kind {
            Kind::Thin => {
                self.runner.lvm(
                    "lvcreate --snapshot",
                    &["lvcreate", "-q", "-s", "-ky", "-n", snap, &origin_spec],
                    Retry::Never,
                )?;
            }
            Kind::Thick => {
                let cow = format!("{}b", self.cow_bytes(self.lv_bytes(size_bytes)));
                self.runner.lvm(
                    "lvcreate --snapshot",
                    &["lvcreate", "-q", "-s", "-L", &cow, "-n", snap, &origin_spec],
                    Retry::Never,
                )?;
            }
        }
        Ok(())
    }

    /// Removes a snapshot: [`DeleteAction::Deleted`], or [`DeleteAction::AlreadyGone`] when it
    /// did not exist. Clones never depend on a snapshot here (thin clones are independent thin
    /// LVs, thick clones are copies), so this is never `Busy`. A thick snapshot's COW store is
    /// zeroed first when configured.
    ///
    /// Runs `lvremove -f` straight away; only when it fails does one `lvs` tell "already
    /// gone" from lvm's own failure.
    pub(crate) fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction> {
        let snap = names::snapshot(&s.id);
        if self.kind == Kind::Thick
            && self.cfg.zero_deleted_thick_snapshots
            && !self.zero_cow_of(&snap)?
        {
            return Ok(DeleteAction::AlreadyGone);
        }
        let failed = match self.remove(&snap) {
            Ok(()) => return Ok(DeleteAction::Deleted),
            Err(e) => e,
        };
        match self.lv(&snap) {
            Ok(None) => Ok(DeleteAction::AlreadyGone),
            Ok(Some(_)) => Err(failed),
            Err(probe) => {
                tracing::debug!(error = %probe, "lvs after a failed lvremove failed too");
                Err(failed)
            }
        }
    }

    /// Zeroes the COW store of thick snapshot `snap` before its removal; `false` when the
    /// snapshot does not exist. The COW device exists exactly while the snapshot is active,
    /// so it is opened directly; only when it is missing does an `lvs` say whether the
    /// snapshot is gone or inactive (then its origin is activated) — or not a thick snapshot
    /// at all (a thin one left from an earlier `type = "thin"`: nothing to zero).
    fn zero_cow_of(&self, snap: &str) -> Result<bool> {
        match self.zero_cow(snap) {
            Ok(()) => return Ok(true),
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        let Some(row) = self.lv(snap)? else {
            return Ok(false);
        };
        if row.is_thick_snapshot() {
            self.ensure_thick_active(&row)?;
            self.zero_cow(snap)?;
        }
        Ok(true)
    }

    /// Zeroes the COW device (`<vg>-<lv>-cow`) of a thick snapshot: that is where copies of the
    /// origin's old blocks live. Zeroing the snapshot's own device instead would be wrong: it
    /// would copy every origin chunk into the COW and overflow it.
    fn zero_cow(&self, snap: &str) -> Result<()> {
        let cow = std::path::PathBuf::from(format!(
            "/dev/mapper/{}-cow",
            names::dm_name(&self.vg, snap)
        ));
        let f = blockdev::open_write(&cow)
            .map_err(|e| Error::io(format!("opening {} to zero it", cow.display()), e))?;
        blockdev::zero_all(&f, None).map_err(|e| Error::io(format!("zeroing {}", cow.display()), e))
    }

    /// The snapshot's location when its LV exists (an invalid thick snapshot still exists).
    pub(crate) fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        let snap = names::snapshot(&s.id);
        Ok(self.lv(&snap)?.map(|_| self.provider(&snap)))
    }

    /// `Some(reason)` when the snapshot is unusable (a thick snapshot whose COW overflowed),
    /// `None` when it is healthy or cannot be judged. `NotFound` when it does not exist.
    ///
    /// One `lvs` of that LV with the few fields the check reads; it never activates
    /// anything. The kernel records an overflow in the COW header, which shows only while the
    /// snapshot's table is live: an inactive thick snapshot (its origin is inactive, so
    /// nothing writes to it) reads as `None` here, and reading, reverting or cloning it —
    /// which activate it — refuse it if it turns out invalid.
    pub(crate) fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let snap = names::snapshot(&s.id);
        let row = self
            .lvs_where(&format!("lv_name=\"{snap}\""), report::HEALTH_FIELDS)?
            .into_iter()
            .find(|r| r.lv_name == snap)
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        Ok(self.invalid_reason(&row))
    }

    /// Times one bare `lvcreate --snapshot` and one `lvremove -f` of it on `v`'s LV.
    pub(crate) fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let origin = self.origin_row(v)?;
        if self.kind == Kind::Thick {
            self.ensure_thick_active(&origin)?;
        }
        let snap = names::snapshot(&SnapshotId::new());
        let t = Instant::now();
        self.lvcreate_snapshot(&snap, &origin.lv_name, v.size_bytes)?;
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
