//! Revert a volume to any of its snapshots, keeping that snapshot and all others.
//!
//! Thin: the origin is replaced by a fresh snapshot of the chosen snapshot through two
//! renames (`volume` -> `-revert-old`, `-revert-new` -> `volume`). Every intermediate state
//! is recognisable from the LV names alone, so a re-run after a crash first finishes (or
//! rolls back) the interrupted dance and then reverts afresh.
//!
//! Thick: `lvconvert --merge` would consume the snapshot and could not be resumed safely, so
//! the snapshot's image is copied back into the origin, writing only the chunks that differ.
//! The writes go through the origin, so every other snapshot copies-on-write the data it needs
//! and keeps its own point in time; the chosen snapshot needs no new COW space, because every
//! chunk that differs from it is one it already holds.

use kiln_core::{Error, ProgressHandle, Result, Snapshot, Volume};

use crate::backend::{Backend, Kind};
use crate::blockdev;
use crate::names;
use crate::report::LvRow;

/// Default COW chunk size of thick snapshots, used when lvm does not report one.
const DEFAULT_CHUNK: u64 = 4096;

impl Backend {
    /// See the module documentation.
    pub fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: &ProgressHandle,
    ) -> Result<()> {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        let snap = names::snapshot(&s.id);
        let rows = self.lvs()?;
        let snap_row = rows
            .iter()
            .find(|r| r.lv_name == snap)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: "snapshot",
                id: s.id.to_string(),
            })?;
        match self.kind {
            Kind::Thin => self.revert_thin(v, &snap_row, &rows),
            Kind::Thick => self.revert_thick(v, &snap_row, progress),
        }
    }

    fn revert_thin(&self, v: &Volume, snap: &LvRow, rows: &[LvRow]) -> Result<()> {
        let vol = names::volume(&v.id);
        let new = names::revert_new(&v.id);
        let old = names::revert_old(&v.id);
        let has = |n: &str| rows.iter().any(|r| r.lv_name == n);
        if !has(&vol) && !has(&old) {
            return Err(Error::NotFound {
                what: "volume",
                id: v.id.to_string(),
            });
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.lv_name == vol)
            .filter(|r| r.is_open())
        {
            return Err(Error::WrongState(format!(
                "{} is open (attached or in use); detach it before reverting",
                self.spec(&r.lv_name)
            )));
        }
        // 1. Finish whatever an interrupted run left behind.
        let mut stale_new = has(&new);
        if has(&old) {
            if has(&vol) {
                // Both renames happened; only the removal of the old origin is missing.
                tracing::info!(volume = %v.id, "completing an interrupted revert");
                self.remove(&old)?;
            } else if has(&new) {
                tracing::info!(volume = %v.id, "completing an interrupted revert (second rename)");
                self.rename(&new, &vol)?;
                self.remove(&old)?;
                stale_new = false;
            } else {
                tracing::warn!(volume = %v.id, "rolling back an interrupted revert");
                self.rename(&old, &vol)?;
            }
        }
        if stale_new {
            // Made before the first rename of an interrupted run; its source may differ.
            self.remove(&new)?;
        }
        // 2. The revert proper.
        self.thin_snapshot_as_volume(snap, &new, v.size_bytes)?;
        self.rename(&vol, &old)?;
        self.rename(&new, &vol)?;
        self.remove(&old)?;
        tracing::info!(volume = %v.id, snapshot = %snap.lv_name, "thin revert done");
        Ok(())
    }

    fn revert_thick(&self, v: &Volume, snap: &LvRow, progress: &ProgressHandle) -> Result<()> {
        let vol = names::volume(&v.id);
        if snap.origin != vol {
            return Err(Error::invalid(
                "snapshot",
                format!("{} is not a snapshot of {}", snap.lv_name, self.spec(&vol)),
            ));
        }
        let origin = self.lv(&vol)?.ok_or_else(|| Error::NotFound {
            what: "volume",
            id: v.id.to_string(),
        })?;
        if origin.is_open() {
            return Err(Error::WrongState(format!(
                "{} is open (attached or in use); detach it before reverting",
                self.spec(&vol)
            )));
        }
        self.ensure_thick_active(&origin)?;
        // Re-read: invalidity is only visible while the table is live.
        let snap = self.lv(&snap.lv_name)?.ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: snap.lv_name.clone(),
        })?;
        if let Some(reason) = self.invalid_reason(&snap) {
            return Err(Error::WrongState(reason));
        }
        let image = self.snapshot_image_size(&snap)?;
        let src_path = self.device(&snap.lv_name);
        let dst_path = self.device(&vol);
        let src = blockdev::open_read(&src_path)
            .map_err(|e| Error::io(format!("opening {}", src_path.display()), e))?;
        let dst = blockdev::open_write(&dst_path)
            .map_err(|e| Error::io(format!("opening {}", dst_path.display()), e))?;
        progress.set_total(image);
        progress.set_message(&format!("reverting {vol} to {}", snap.lv_name));
        let granule = snap.chunk_size().unwrap_or(DEFAULT_CHUNK) as usize;
        let written = blockdev::copy_differences(&src, &dst, image, granule, progress)
            .map_err(|e| Error::io(format!("copying {} back into {vol}", snap.lv_name), e))?;
        drop(dst);
        // The copy must not have pushed the chosen snapshot over its COW limit (it cannot,
        // see the module docs); if it did, say so instead of claiming success.
        if let Some(reason) = self
            .lv(&snap.lv_name)?
            .and_then(|r| self.invalid_reason(&r))
        {
            return Err(Error::backend("revert", reason));
        }
        tracing::info!(volume = %v.id, snapshot = %snap.lv_name, written, "thick revert done");
        Ok(())
    }
}
