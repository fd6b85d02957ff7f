//! The synchronous core of the driver: one volume group (and optionally its thin pool), the
//! LV queries and the activation helpers every operation shares. Everything here blocks; the
//! async [`crate::LvmDriver`] calls it from `spawn_blocking`.

use std::path::PathBuf;
use std::time::Duration;

use kiln_core::{Error, Result};

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

/// One opened LVM backend.
#[derive(Debug)]
pub(crate) struct Backend {
    pub vg: String,
    pub pool: String,
    pub kind: Kind,
    pub cfg: LvmConfig,
    pub runner: Runner,
}

impl Backend {
    /// Validates the configuration against the real VG and resolves `auto`.
    pub fn open(cfg: LvmConfig) -> Result<Backend> {
        names::check_config_name("volume_group", &cfg.volume_group)?;
        names::check_config_name("thin_pool", &cfg.thin_pool)?;
        if !(1..=100).contains(&cfg.thick_snapshot_percent) {
            return Err(Error::Config(format!(
                "thick_snapshot_percent must be between 1 and 100, not {}",
                cfg.thick_snapshot_percent
            )));
        }
        if cfg.command_timeout_secs == 0 {
            return Err(Error::Config(
                "command_timeout_secs must be at least 1".into(),
            ));
        }
        let runner = Runner::new(Duration::from_secs(cfg.command_timeout_secs));
        let mut b = Backend {
            vg: cfg.volume_group.clone(),
            pool: cfg.thin_pool.clone(),
            kind: Kind::Thick,
            cfg,
            runner,
        };
        b.vg_row().map_err(|e| match e {
            Error::Backend { message, .. } if message.contains("not found") => {
                Error::Config(format!("volume group {:?} not found: {message}", b.vg))
            }
            other => other,
        })?;
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
                return Err(Error::Config(format!(
                    "{}/{} exists but is not a thin pool",
                    b.vg, b.pool
                )));
            }
            (LvmType::Thin, None) => {
                return Err(Error::Config(format!(
                    "thin pool {}/{} not found (create it with `lvcreate --type thin-pool -L SIZE \
                     -n {} {}`, or set type = \"thick\")",
                    b.vg, b.pool, b.pool, b.vg
                )));
            }
            (LvmType::Auto, None) => Kind::Thick,
        };
        Ok(b)
    }

    /// `vg/lv`, the form lvm commands take.
    pub fn spec(&self, lv: &str) -> String {
        format!("{}/{}", self.vg, lv)
    }

    /// The device node of an active LV (libdm creates it even without udev).
    pub fn device(&self, lv: &str) -> PathBuf {
        PathBuf::from(format!("/dev/mapper/{}", names::dm_name(&self.vg, lv)))
    }

    /// The VG as `vgs` reports it.
    pub fn vg_row(&self) -> Result<VgRow> {
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
    pub fn lvs(&self) -> Result<Vec<LvRow>> {
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

    /// One LV by name, or `None` when it does not exist.
    pub fn lv(&self, name: &str) -> Result<Option<LvRow>> {
        Ok(self.lvs()?.into_iter().find(|r| r.lv_name == name))
    }

    /// Activates an LV; `ignore_skip` adds `-K` for LVs carrying the activation-skip flag.
    /// Activation races with a pool or origin briefly suspended by another command, hence
    /// the retry.
    pub fn activate(&self, lv: &str, ignore_skip: bool) -> Result<()> {
        let spec = self.spec(lv);
        let mut args = vec!["lvchange", "-q", "-ay"];
        if ignore_skip {
            args.push("-K");
        }
        args.push(&spec);
        self.runner.lvm("lvchange -ay", &args, Retry::Transient)?;
        Ok(())
    }

    /// Removes an LV (`lvremove -f`; for a thick origin this would take its snapshots along,
    /// so callers check for snapshots first).
    pub fn remove(&self, lv: &str) -> Result<()> {
        let spec = self.spec(lv);
        self.runner.lvm(
            "lvremove",
            &["lvremove", "-q", "-f", &spec],
            Retry::Transient,
        )?;
        Ok(())
    }

    /// Renames an LV within the VG (atomic in the VG metadata).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.runner.lvm(
            "lvrename",
            &["lvrename", "-q", &self.vg, from, to],
            Retry::Transient,
        )?;
        Ok(())
    }

    /// Grows an LV to at least `bytes`.
    pub fn extend_to(&self, lv: &str, bytes: u64) -> Result<()> {
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
    pub fn ensure_thick_active(&self, row: &LvRow) -> Result<()> {
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
    pub fn snapshot_image_size(&self, row: &LvRow) -> Result<u64> {
        if row.is_thick_snapshot() {
            report::parse_u64("origin_size", &row.origin_size)
        } else {
            row.size()
        }
    }

    /// Why a snapshot cannot be read, if it cannot: a thick snapshot whose COW overflowed.
    pub fn invalid_reason(&self, row: &LvRow) -> Option<String> {
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
