//! The synchronous core of the driver: one volume group (and optionally its thin pool), the
//! LV queries and the activation helpers every operation shares. Everything here blocks;
//! [`crate::LvmDriver`] (kiln-core's one blocking adapter) runs it on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kiln_core::{Error, ErrorKind, Result};

use crate::command::{Retry, Runner};
use crate::config::{LvmConfig, LvmType};
use crate::names;
use crate::report::{self, LvRow, VgRow};

/// The kind of LVs this backend manages, resolved from `type` at open time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Thin LVs in the configured pool.
    Thin,
    /// Classic LVs with COW snapshots.
    Thick,
}

/// One opened LVM backend: a volume group, and for thin its pool. It implements
/// [`kiln_core::BlockingDriver`]; [`crate::LvmDriver`] wraps it. Blocking throughout.
#[derive(Debug)]
pub struct LvmBackend {
    pub(crate) vg: String,
    pub(crate) pool: String,
    pub(crate) kind: Kind,
    pub(crate) cfg: LvmConfig,
    pub(crate) runner: Runner,
    /// The VG's extent size in bytes: every LV size is rounded up to a multiple of it.
    pub(crate) extent: u64,
    /// Held while a pool's metadata snapshot is reserved: a pool has at most one, so calls of
    /// this process take turns instead of failing each other (see
    /// [`LvmBackend::with_metadata_snap`]).
    metadata_snap: Mutex<()>,
    /// Whether the installed `thin_delta` can be trusted, found out on first use (see
    /// `crate::diff`).
    pub(crate) thin_delta: std::sync::OnceLock<std::result::Result<(), String>>,
}

impl LvmBackend {
    /// Validates the configuration against the real VG and resolves `auto`. Fails with an
    /// `InvalidInput` (configuration) error naming what is missing or wrong.
    pub(crate) fn open(cfg: LvmConfig) -> Result<LvmBackend> {
        names::check_config_name("volume_group", &cfg.volume_group)?;
        names::check_config_name("thin_pool", &cfg.thin_pool)?;
        if !(1..=100).contains(&cfg.thick_snapshot_percent) {
            return Err(Error::config(format!(
                "thick_snapshot_percent must be between 1 and 100, not {}",
                cfg.thick_snapshot_percent
            )));
        }
        if cfg.command_timeout_secs == 0 {
            return Err(Error::config("command_timeout_secs must be at least 1"));
        }
        let runner = Runner::new(Duration::from_secs(cfg.command_timeout_secs));
        let mut b = LvmBackend {
            vg: cfg.volume_group.clone(),
            pool: cfg.thin_pool.clone(),
            kind: Kind::Thick,
            cfg,
            runner,
            extent: 0,
            metadata_snap: Mutex::new(()),
            thin_delta: std::sync::OnceLock::new(),
        };
        let vg = b.vg_row().map_err(|e| match e {
            e if e.kind() == ErrorKind::Backend && e.message().contains("not found") => {
                Error::config(format!("volume group {:?} not found: {e}", b.vg)).with_source(e)
            }
            other => other,
        })?;
        b.extent = report::parse_u64("vg_extent_size", &vg.vg_extent_size)?;
        if b.extent == 0 {
            return Err(Error::backend(
                "vgs",
                format!("volume group {:?} reports an extent size of 0", b.vg),
            ));
        }
        let pool = b.lv(&b.pool)?;
        b.kind = match (b.cfg.lvm_type, pool) {
            (LvmType::Thick, _) => Kind::Thick,
            (LvmType::Thin | LvmType::Auto, Some(p)) if p.is_thin_pool() => {
                if p.zero != "zero" {
                    // Without zeroing, a partial write to a newly provisioned block exposes
                    // the rest of that block's previous contents to the new owner.
                    tracing::warn!(
                        vg = %b.vg,
                        pool = %b.pool,
                        "thin pool does not zero new blocks; data of deleted volumes can leak \
                         into new ones (lvchange -Zy {}/{})",
                        b.vg,
                        b.pool
                    );
                }
                Kind::Thin
            }
            (LvmType::Thin | LvmType::Auto, Some(_)) => {
                return Err(Error::config(format!(
                    "{}/{} exists but is not a thin pool",
                    b.vg, b.pool
                )));
            }
            (LvmType::Thin, None) => {
                return Err(Error::config(format!(
                    "thin pool {}/{} not found (create it with `lvcreate --type thin-pool -L SIZE \
                     -n {} {}`, or set type = \"thick\")",
                    b.vg, b.pool, b.pool, b.vg
                )));
            }
            (LvmType::Auto, None) => Kind::Thick,
        };
        Ok(b)
    }

    /// Whether this backend creates thin LVs (after resolving `auto`).
    pub fn is_thin(&self) -> bool {
        self.kind == Kind::Thin
    }

    /// The volume group this backend manages.
    pub fn volume_group(&self) -> &str {
        &self.vg
    }

    /// The size of the LV lvm makes for `bytes`: rounded up to whole extents. kiln makes
    /// every origin LV with its volume's `size_bytes`, so this is the origin's LV size.
    pub(crate) fn lv_bytes(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.extent).saturating_mul(self.extent)
    }

    /// `vg/lv`, the form lvm commands take.
    pub(crate) fn spec(&self, lv: &str) -> String {
        format!("{}/{}", self.vg, lv)
    }

    /// The device node of an active LV (libdm creates it even without udev).
    pub(crate) fn device(&self, lv: &str) -> PathBuf {
        PathBuf::from(format!("/dev/mapper/{}", names::dm_name(&self.vg, lv)))
    }

    /// The VG as `vgs` reports it.
    pub(crate) fn vg_row(&self) -> Result<VgRow> {
        let out = self.runner.lvm(
            "vgs",
            &[
                "vgs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                report::VG_FIELDS,
                &self.vg,
            ],
            Retry::Transient,
        )?;
        report::parse_vgs(&out.stdout)?
            .into_iter()
            .find(|r| r.vg_name == self.vg)
            .ok_or_else(|| Error::backend("vgs", format!("volume group {:?} not found", self.vg)))
    }

    /// Every LV of the VG, hidden ones included.
    pub(crate) fn lvs(&self) -> Result<Vec<LvRow>> {
        let out = self.runner.lvm(
            "lvs",
            &[
                "lvs",
                "-a",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                report::LV_FIELDS,
                &self.vg,
            ],
            Retry::Transient,
        )?;
        report::parse_lvs(&out.stdout)
    }

    /// The LVs of the VG matching the lvm selection `select`, with the report `fields`
    /// (which must include `lv_name`, `lv_attr` and `lv_size`). One `lvs` process; lvm
    /// evaluates the selection before it gathers an LV's status, so unselected LVs cost
    /// next to nothing. Never activates anything.
    pub(crate) fn lvs_where(&self, select: &str, fields: &str) -> Result<Vec<LvRow>> {
        let out = self.runner.lvm(
            "lvs",
            &[
                "lvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                fields,
                "-S",
                select,
                &self.vg,
            ],
            Retry::Transient,
        )?;
        report::parse_lvs(&out.stdout)
    }

    /// The LVs called `names` (those that exist), with every field kiln uses.
    pub(crate) fn lvs_named(&self, names: &[&str]) -> Result<Vec<LvRow>> {
        // Names are kiln's own (UUID-derived) or checked config names: no quote can occur.
        let select = names
            .iter()
            .map(|n| format!("lv_name=\"{n}\""))
            .collect::<Vec<_>>()
            .join(" || ");
        let rows = self.lvs_where(&select, report::LV_FIELDS)?;
        Ok(rows
            .into_iter()
            .filter(|r| names.contains(&r.lv_name.as_str()))
            .collect())
    }

    /// One LV by name, or `None` when it does not exist (one `lvs` of that LV only).
    pub(crate) fn lv(&self, name: &str) -> Result<Option<LvRow>> {
        Ok(self.lvs_named(&[name])?.into_iter().next())
    }

    /// Activates an LV; `ignore_skip` adds `-K` for LVs carrying the activation-skip flag.
    /// Activation races with a pool or origin briefly suspended by another command, hence
    /// the retry.
    pub(crate) fn activate(&self, lv: &str, ignore_skip: bool) -> Result<()> {
        let spec = self.spec(lv);
        let mut args = vec!["lvchange", "-q", "-ay"];
        if ignore_skip {
            args.push("-K");
        }
        args.push(&spec);
        self.runner.lvm("lvchange -ay", &args, Retry::Transient)?;
        Ok(())
    }

    /// Runs `f` with the path of thin pool `pool_lv`'s metadata device while a metadata
    /// snapshot of the pool is reserved (`dmsetup message <pool>-tpool 0
    /// reserve_metadata_snap`), then releases it, also when `f` panics. The live metadata
    /// changes under a reader's feet; the reserved snapshot is a stable copy that `thin_dump
    /// -m` and `thin_delta --metadata-snap` read (reserving also commits outstanding
    /// mappings). A pool holds at most one: calls of this backend take turns, and a
    /// snapshot another process holds is waited for a little (the busy reply is retried),
    /// then reported as `Unavailable`. A pool that is not active (no thin LV of it is) is
    /// activated for the call and deactivated again after it.
    pub(crate) fn with_metadata_snap<T>(
        &self,
        pool_lv: &str,
        f: impl FnOnce(&str) -> T,
    ) -> Result<T> {
        let _turn = self
            .metadata_snap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tpool = format!("{}-tpool", names::dm_name(&self.vg, pool_lv));
        let tmeta = format!(
            "/dev/mapper/{}",
            names::dm_name(&self.vg, &format!("{pool_lv}_tmeta"))
        );
        // The guard deactivates what it activated and releases what it reserved.
        let mut held = HeldMetadataSnap {
            runner: &self.runner,
            tpool: &tpool,
            reserved: false,
            deactivate: None,
        };
        if !Path::new("/dev/mapper").join(&tpool).exists() {
            self.activate(pool_lv, false)?;
            held.deactivate = Some(self.spec(pool_lv));
        }
        self.runner
            .run(
                "dmsetup message reserve_metadata_snap",
                "dmsetup",
                &["message", &tpool, "0", "reserve_metadata_snap"],
                Retry::Transient,
            )
            .map_err(|e| {
                if crate::command::is_transient(e.message()) {
                    Error::unavailable(
                        "dmsetup message reserve_metadata_snap",
                        format!(
                            "the metadata snapshot of thin pool {} is held by another process; \
                             try again later",
                            self.spec(pool_lv)
                        ),
                    )
                    .with_source(e)
                } else {
                    e
                }
            })?;
        held.reserved = true;
        Ok(f(&tmeta))
    }

    /// Removes an LV (`lvremove -f`; for a thick origin this would take its snapshots along,
    /// so callers check for snapshots first). Fails when the LV does not exist.
    pub(crate) fn remove(&self, lv: &str) -> Result<()> {
        let spec = self.spec(lv);
        self.runner.lvm(
            "lvremove",
            &["lvremove", "-q", "-f", &spec],
            Retry::Transient,
        )?;
        Ok(())
    }

    /// Renames an LV within the VG (atomic in the VG metadata).
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.runner.lvm(
            "lvrename",
            &["lvrename", "-q", &self.vg, from, to],
            Retry::Transient,
        )?;
        Ok(())
    }

    /// Grows an LV to at least `bytes`.
    pub(crate) fn extend_to(&self, lv: &str, bytes: u64) -> Result<()> {
        let spec = self.spec(lv);
        let size = format!("{bytes}b");
        self.runner.lvm(
            "lvextend",
            &["lvextend", "-q", "-L", &size, &spec],
            Retry::Never,
        )?;
        Ok(())
    }

    /// Makes sure a thick snapshot's dm devices exist: they are live exactly when its origin
    /// is, and `lvchange` refuses to act on the snapshot alone.
    pub(crate) fn ensure_thick_active(&self, row: &LvRow) -> Result<()> {
        if row.is_active() {
            return Ok(());
        }
        let origin = if row.is_thick_snapshot() {
            &row.origin
        } else {
            &row.lv_name
        };
        self.activate(origin, false)
    }

    /// The image size of a snapshot: a thin snapshot's own size, a thick snapshot's origin size
    /// (a thick snapshot's `lv_size` is its COW space).
    pub(crate) fn snapshot_image_size(&self, row: &LvRow) -> Result<u64> {
        if row.is_thick_snapshot() {
            report::parse_u64("origin_size", &row.origin_size)
        } else {
            row.size()
        }
    }

    /// Checks that snapshot `row` holds at least `image` bytes (its record's `size_bytes`):
    /// anything else means the LV is not the snapshot kiln recorded.
    pub(crate) fn check_image_covers(&self, row: &LvRow, image: u64) -> Result<()> {
        let have = self.snapshot_image_size(row)?;
        if have < image {
            return Err(Error::backend(
                "lvs",
                format!(
                    "{} holds {have} bytes, less than the snapshot's recorded {image} bytes",
                    self.spec(&row.lv_name)
                ),
            ));
        }
        Ok(())
    }

    /// Why a snapshot cannot be read, if it cannot: a thick snapshot whose COW overflowed.
    pub(crate) fn invalid_reason(&self, row: &LvRow) -> Option<String> {
        row.is_invalid_snapshot().then(|| {
            format!(
                "snapshot {} is invalid: its copy-on-write space ({} bytes) overflowed after \
                 more of volume {} was rewritten than it could hold; its data is lost and it \
                 can only be deleted",
                self.spec(&row.lv_name),
                row.lv_size,
                row.origin
            )
        })
    }
}

/// A reserved metadata snapshot (and maybe a pool activated for it): released (deactivated)
/// on drop, failures logged. Release failing would leave the snapshot reserved and every
/// later reservation of the pool refused, hence a warning.
struct HeldMetadataSnap<'a> {
    runner: &'a Runner,
    tpool: &'a str,
    reserved: bool,
    deactivate: Option<String>,
}

impl Drop for HeldMetadataSnap<'_> {
    fn drop(&mut self) {
        if self.reserved
            && let Err(e) = self.runner.run(
                "dmsetup message release_metadata_snap",
                "dmsetup",
                &["message", self.tpool, "0", "release_metadata_snap"],
                Retry::Transient,
            )
        {
            tracing::warn!(pool = %self.tpool, error = %e, "could not release the metadata snapshot");
        }
        if let Some(spec) = self.deactivate.take() {
            // A thin LV activated meanwhile keeps the pool's devices: harmless.
            if let Err(e) = self.runner.lvm(
                "lvchange -an",
                &["lvchange", "-q", "-an", &spec],
                Retry::Transient,
            ) {
                tracing::info!(lv = %spec, error = %e, "could not deactivate the thin pool");
            }
        }
    }
}
