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
//! chunk that differs from it is one it already holds. Another snapshot with less COW space
//! than the revert writes overflows like under any other write to the origin: the revert
//! then still completes (the volume holds the chosen snapshot's data) and its outcome names
//! the snapshots it invalidated, which the service marks `error` with the reason.

use kiln_core::{Error, Invalidated, ProgressHandle, Result, RevertOutcome, Snapshot, Volume};

use crate::backend::{Kind, LvmBackend};
use crate::blockdev;
use crate::names;
use crate::report::{self, LvRow};

/// Default COW chunk size of thick snapshots, used when lvm does not report one.
const DEFAULT_CHUNK: u64 = 4096;

impl LvmBackend {
    /// See the module documentation.
    pub(crate) fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: &ProgressHandle,
    ) -> Result<RevertOutcome> {
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
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        match self.kind {
            Kind::Thin => self
                .revert_thin(v, &snap_row, &rows)
                .map(|()| RevertOutcome::default()),
            Kind::Thick => self.revert_thick(v, s, &snap_row, progress),
        }
    }

    fn revert_thin(&self, v: &Volume, snap: &LvRow, rows: &[LvRow]) -> Result<()> {
        let vol = names::volume(&v.id);
        let new = names::revert_new(&v.id);
        let old = names::revert_old(&v.id);
        let has = |n: &str| rows.iter().any(|r| r.lv_name == n);
        if !has(&vol) && !has(&old) {
            return Err(Error::not_found("volume", v.id.to_string()));
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.lv_name == vol)
            .filter(|r| r.is_open())
        {
            return Err(Error::wrong_state(format!(
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
                tracing::info!(volume = %v.id, "rolling back an interrupted revert");
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

    fn revert_thick(
        &self,
        v: &Volume,
        s: &Snapshot,
        snap: &LvRow,
        progress: &ProgressHandle,
    ) -> Result<RevertOutcome> {
        let vol = names::volume(&v.id);
        if snap.origin != vol {
            return Err(Error::invalid(
                "snapshot",
                format!("{} is not a snapshot of {}", snap.lv_name, self.spec(&vol)),
            ));
        }
        let origin = self
            .lv(&vol)?
            .ok_or_else(|| Error::not_found("volume", v.id.to_string()))?;
        if origin.is_open() {
            return Err(Error::wrong_state(format!(
                "{} is open (attached or in use); detach it before reverting",
                self.spec(&vol)
            )));
        }
        self.ensure_thick_active(&origin)?;
        // Re-read every snapshot of the volume now that their tables are live (invalidity
        // only shows then): the chosen one must be valid, and the check after the copy must
        // blame the revert only for snapshots it invalidated.
        let before = self.lvs_where(&format!("origin=\"{vol}\""), report::LV_FIELDS)?;
        let snap = before
            .iter()
            .find(|r| r.lv_name == snap.lv_name)
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", s.id.to_string()))?;
        let invalid_before: Vec<&str> = before
            .iter()
            .filter(|r| r.is_invalid_snapshot())
            .map(|r| r.lv_name.as_str())
            .collect();
        if let Some(reason) = self.invalid_reason(&snap) {
            return Err(Error::wrong_state(reason));
        }
        // Exactly the snapshot's recorded size: the LVs' extent-rounding slack beyond it is
        // not part of the volume's data.
        let image = s.size_bytes;
        self.check_image_covers(&snap, image)?;
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
        let invalidated = self.check_snapshots_after_revert(v, &snap.lv_name, &invalid_before)?;
        tracing::info!(volume = %v.id, snapshot = %snap.lv_name, written, invalidated = invalidated.len(), "thick revert done");
        Ok(RevertOutcome { invalidated })
    }

    /// After a thick revert, one `lvs` of every snapshot of the volume. The chosen snapshot
    /// cannot have overflowed (see the module docs); if it did anyway, say so instead of
    /// claiming success. Any other snapshot may have: its COW space took the origin's old
    /// data for every chunk the revert rewrote. The volume's data is reverted either way, so
    /// this returns the snapshots that became invalid (those already invalid before,
    /// `invalid_before`, are not the revert's doing) for the service to mark `error`.
    fn check_snapshots_after_revert(
        &self,
        v: &Volume,
        chosen: &str,
        invalid_before: &[&str],
    ) -> Result<Vec<Invalidated>> {
        let vol = names::volume(&v.id);
        let rows = self.lvs_where(&format!("origin=\"{vol}\""), report::HEALTH_FIELDS)?;
        if let Some(reason) = rows
            .iter()
            .find(|r| r.lv_name == chosen)
            .and_then(|r| self.invalid_reason(r))
        {
            return Err(Error::backend("revert", reason));
        }
        let chosen_id =
            names::parse_snapshot(chosen).map_or(chosen.to_string(), |id| id.to_string());
        Ok(rows
            .iter()
            .filter(|r| {
                r.lv_name != chosen
                    && r.is_invalid_snapshot()
                    && !invalid_before.contains(&r.lv_name.as_str())
            })
            .filter_map(|r| {
                names::parse_snapshot(&r.lv_name).map(|id| Invalidated {
                    snapshot: id,
                    reason: format!(
                        "reverting volume {} to snapshot {chosen_id} overflowed this snapshot's \
                         copy-on-write space: its data is lost and it can only be deleted",
                        v.id
                    ),
                })
            })
            .collect())
    }
}
