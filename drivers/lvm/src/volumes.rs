//! Creating, deleting and cloning volumes.

use kiln_core::{DeleteAction, Error, ProgressHandle, ProviderUpdate, Result, Snapshot, Volume};

use crate::backend::{Kind, LvmBackend};
use crate::blockdev;
use crate::command::Retry;
use crate::names;

impl LvmBackend {
    /// The location kiln records for LV `lv`: `vg/lv`.
    pub(crate) fn provider(&self, lv: &str) -> ProviderUpdate {
        ProviderUpdate {
            provider_location: Some(self.spec(lv)),
        }
    }

    /// `lvcreate` of an empty volume; a re-run finding the LV already there succeeds.
    ///
    /// `lvcreate` comes first and the LV is looked up only when it fails (as snapshot
    /// creation does): a create is then one lvm command instead of two, and each costs a
    /// device scan (0.5-0.7 s under user-mode Linux; see docs/benchmarks.md, "Backups").
    pub(crate) fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        let name = names::volume(&v.id);
        let failed = match self.lvcreate_plain(&name, v.size_bytes) {
            Ok(()) => return Ok(self.provider(&name)),
            Err(e) => e,
        };
        let row = match self.lv(&name) {
            Ok(Some(row)) => row,
            // No such LV: lvcreate's own words say why it failed.
            Ok(None) => return Err(failed),
            Err(probe) => {
                tracing::debug!(error = %probe, "lvs after a failed lvcreate failed too");
                return Err(failed);
            }
        };
        // The LV's name is this volume's id, so an existing one is a retried create's.
        if row.size()? >= v.size_bytes {
            return Ok(self.provider(&name));
        }
        Err(Error::backend(
            "lvcreate",
            format!(
                "{} already exists with {} bytes, smaller than the requested {}",
                self.spec(&name),
                row.lv_size,
                v.size_bytes
            ),
        ))
    }

    /// Creates a new (not snapshot) LV of `bytes` of this backend's kind.
    fn lvcreate_plain(&self, name: &str, bytes: u64) -> Result<()> {
        let size = format!("{bytes}b");
        match self.kind {
            Kind::Thin => {
                let pool = self.spec(&self.pool);
                self.runner.lvm(
                    "lvcreate",
                    &[
                        "lvcreate", "-q", "--yes", "-T", &pool, "-V", &size, "-n", name,
                    ],
                    Retry::Never,
                )?;
            }
            Kind::Thick => {
                self.runner.lvm(
                    "lvcreate",
                    &["lvcreate", "-q", "--yes", "-L", &size, "-n", name, &self.vg],
                    Retry::Never,
                )?;
            }
        }
        Ok(())
    }

    /// Removes a volume and any leftovers of an interrupted revert or clone of it:
    /// [`DeleteAction::Deleted`] when this call removed any of those LVs,
    /// [`DeleteAction::AlreadyGone`] when none existed. A thick origin with snapshots is
    /// `Busy` (lvremove would silently take the snapshots along).
    pub(crate) fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        let name = names::volume(&v.id);
        let rows = self.lvs()?;
        let snaps: Vec<&str> = rows
            .iter()
            .filter(|r| r.is_thick_snapshot() && r.origin == name)
            .map(|r| r.lv_name.as_str())
            .collect();
        if !snaps.is_empty() {
            return Err(Error::busy(
                format!(
                    "thick volume {} still has {} snapshot(s) ({}); delete them first",
                    self.spec(&name),
                    snaps.len(),
                    snaps.join(", ")
                ),
                snaps
                    .iter()
                    .map(|s| names::parse_snapshot(s).map_or(s.to_string(), |id| id.to_string()))
                    .collect(),
            ));
        }
        let candidates = [
            name.clone(),
            names::revert_new(&v.id),
            names::revert_old(&v.id),
            names::partial_clone(&v.id),
        ];
        let mut action = DeleteAction::AlreadyGone;
        for lv in candidates {
            let Some(row) = rows.iter().find(|r| r.lv_name == lv) else {
                continue;
            };
            if row.is_open() {
                return Err(Error::wrong_state(format!(
                    "{} is open (attached or in use); detach it before deleting",
                    self.spec(&lv)
                )));
            }
            if self.kind == Kind::Thick
                && !row.is_thin_volume()
                && self.cfg.zero_deleted_thick_volumes
            {
                self.ensure_thick_active(row)?;
                let dev = self.device(&lv);
                let f = blockdev::open_write(&dev)
                    .map_err(|e| Error::io(format!("opening {} to zero it", dev.display()), e))?;
                blockdev::zero_all(&f, None)
                    .map_err(|e| Error::io(format!("zeroing {}", dev.display()), e))?;
            }
            self.remove(&lv)?;
            action = DeleteAction::Deleted;
        }
        Ok(action)
    }

    /// The volume's location (`vg/volume-<id>`, as [`LvmBackend::create_volume`] returns it)
    /// when it exists — also in the middle of an interrupted thin revert, when it briefly
    /// carries the `-revert-old` name (the revert's re-run restores the name). A half-copied
    /// thick clone (`-partial`) is not a volume yet: `None`.
    pub(crate) fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        let name = names::volume(&v.id);
        let old = names::revert_old(&v.id);
        let rows = self.lvs_named(&[&name, &old])?;
        Ok((!rows.is_empty()).then(|| self.provider(&name)))
    }

    /// Creates volume `v` holding snapshot `s`'s data. Thin: a writable, normally activating
    /// snapshot of the snapshot (O(1), independent of it in the pool). Thick: a new LV filled
    /// by a block copy under a temporary name, renamed when complete.
    pub(crate) fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: &ProgressHandle,
    ) -> Result<ProviderUpdate> {
        let snap = names::snapshot(&s.id);
        let rows = self.lvs()?;
        let row = rows
            .iter()
            .find(|r| r.lv_name == snap)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        // The user-visible size is the snapshot's `size_bytes`; its LV may be larger (lvm
        // rounds sizes up to whole extents), and that slack is not part of the snapshot.
        let image = s.size_bytes;
        if v.size_bytes < image {
            return Err(Error::invalid(
                "size",
                format!(
                    "{} bytes is smaller than snapshot {} ({} bytes)",
                    v.size_bytes, s.id, image
                ),
            ));
        }
        self.check_image_covers(&row, image)?;
        let name = names::volume(&v.id);
        match self.kind {
            Kind::Thin => {
                if rows.iter().any(|r| r.lv_name == name) {
                    // A re-run: whatever step was interrupted, bring the LV into shape.
                    self.finish_thin_volume(&name, v.size_bytes)?;
                } else {
                    self.thin_snapshot_as_volume(&row, &name, v.size_bytes)?;
                }
            }
            Kind::Thick => {
                if rows.iter().any(|r| r.lv_name == name) {
                    // Only a finished copy carries the final name.
                    return Ok(self.provider(&name));
                }
                if let Some(reason) = self.invalid_reason(&row) {
                    return Err(Error::wrong_state(reason));
                }
                let partial = names::partial_clone(&v.id);
                if rows.iter().any(|r| r.lv_name == partial) {
                    self.remove(&partial)?;
                }
                self.lvcreate_plain(&partial, v.size_bytes)?;
                if let Err(e) = self.fill_thick_clone(&row, &partial, image, progress) {
                    if let Err(cleanup) = self.remove(&partial) {
                        // The clone's own error is what the caller reports; this is a detail.
                        tracing::info!(lv = %partial, error = %cleanup, "could not remove a failed clone");
                    }
                    return Err(e);
                }
                self.rename(&partial, &name)?;
            }
        }
        Ok(self.provider(&name))
    }

    /// Creates `name` as a writable, normally activating thin snapshot of `snap` (`-kn`:
    /// lvcreate then activates it), grown to `bytes` when that is larger than the snapshot.
    pub(crate) fn thin_snapshot_as_volume(
        &self,
        snap: &crate::report::LvRow,
        name: &str,
        bytes: u64,
    ) -> Result<()> {
        let origin = self.spec(&snap.lv_name);
        self.runner.lvm(
            "lvcreate --snapshot",
            &[
                "lvcreate", "-q", "-s", "-kn", "-p", "rw", "-n", name, &origin,
            ],
            Retry::Never,
        )?;
        if snap.size()? < bytes {
            self.extend_to(name, bytes)?;
        }
        Ok(())
    }

    /// Makes a thin LV made by snapshotting behave like a volume: activation-skip off (also
    /// when an earlier run was interrupted), grown to `bytes`, active.
    pub(crate) fn finish_thin_volume(&self, name: &str, bytes: u64) -> Result<()> {
        let row = self
            .lv(name)?
            .ok_or_else(|| Error::backend("lvcreate", format!("{} vanished", self.spec(name))))?;
        if row.skips_activation() {
            let spec = self.spec(name);
            self.runner.lvm(
                "lvchange --setactivationskip n",
                &["lvchange", "-q", "-kn", &spec],
                Retry::Transient,
            )?;
        }
        if row.size()? < bytes {
            self.extend_to(name, bytes)?;
        }
        if row.skips_activation() || !row.is_active() {
            self.activate(name, false)?;
        }
        Ok(())
    }

    /// Copies the first `image` bytes (the snapshot's `size_bytes`) of thick snapshot `snap`
    /// into `target` and zeroes the rest of `target`.
    fn fill_thick_clone(
        &self,
        snap: &crate::report::LvRow,
        target: &str,
        image: u64,
        progress: &ProgressHandle,
    ) -> Result<()> {
        self.ensure_thick_active(snap)?;
        let src_path = self.device(&snap.lv_name);
        let dst_path = self.device(target);
        let src = blockdev::open_read(&src_path)
            .map_err(|e| Error::io(format!("opening {}", src_path.display()), e))?;
        let dst = blockdev::open_write(&dst_path)
            .map_err(|e| Error::io(format!("opening {}", dst_path.display()), e))?;
        let dst_size = blockdev::size(&dst)
            .map_err(|e| Error::io(format!("sizing {}", dst_path.display()), e))?;
        if dst_size < image {
            return Err(Error::backend(
                "lvcreate",
                format!(
                    "{target} has {dst_size} bytes, less than the {image} bytes to copy into it"
                ),
            ));
        }
        progress.set_total(dst_size);
        progress.set_message(&format!("copying {} to {}", snap.lv_name, target));
        let stats = blockdev::copy(&src, &dst, image, progress)
            .map_err(|e| Error::io(format!("copying {} to {}", snap.lv_name, target), e))?;
        // The LV may be larger than the image (bigger target, extent rounding, the source's
        // own rounding slack not copied): the tail must not show what those extents held.
        blockdev::zero_range(&dst, image, dst_size - image)
            .and_then(|()| dst.sync_all())
            .map_err(|e| Error::io(format!("zeroing the tail of {target}"), e))?;
        progress.advance(dst_size - image);
        tracing::info!(
            from = %snap.lv_name,
            to = %target,
            written = stats.written,
            zeroed = stats.zeroed,
            "thick clone copied"
        );
        Ok(())
    }
}
