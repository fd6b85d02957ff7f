//! Per-volume locks that serialize operations on one volume across tasks and processes.
//!
//! Each lock is an in-process async mutex (so waiting tasks do not park runtime threads)
//! plus an exclusive `flock` on `<lock-dir>/volume-<uuid>.lock` (so two kiln processes on the
//! same data directory serialize too). The kernel drops a flock when its holder dies, which
//! is how crash recovery tells a dead operation from a running one: if it can take the lock,
//! nobody is working on that volume.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::types::VolumeId;

/// Lock table for volumes; cheap to share behind an `Arc`.
pub struct VolumeLocks {
    dir: PathBuf,
    local: Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one volume's lock until dropped.
pub struct VolumeGuard {
    // Field order matters: release the flock before letting other local tasks in.
    _file: File,
    _local: OwnedMutexGuard<()>,
}

impl VolumeLocks {
    /// Lock files live in `dir` (created if missing).
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create lock directory {}", dir.display()), e))?;
        Ok(VolumeLocks {
            dir,
            local: Mutex::new(HashMap::new()),
        })
    }

    fn local(&self, id: VolumeId) -> Result<Arc<tokio::sync::Mutex<()>>> {
        let mut map = self
            .local
            .lock()
            .map_err(|_| Error::Store("lock table poisoned by an earlier panic".into()))?;
        // Drop entries nobody holds or waits for, so a long-running process does not grow.
        map.retain(|_, m| Arc::strong_count(m) > 1);
        Ok(map.entry(id).or_default().clone())
    }

    fn open(&self, id: VolumeId) -> Result<File> {
        let path = self.dir.join(format!("volume-{id}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))
    }

    /// Waits for the locks of all `ids`, taken in sorted order so two callers locking the
    /// same pair can never deadlock.
    pub async fn lock(&self, ids: &[VolumeId]) -> Result<Vec<VolumeGuard>> {
        let mut ids = ids.to_vec();
        ids.sort();
        ids.dedup();
        let mut guards = Vec::with_capacity(ids.len());
        for id in ids {
            let local = self.local(id)?.lock_owned().await;
            let file = self.open(id)?;
            // flock blocks the thread: wait on the blocking pool, not on a runtime thread.
            let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                .await
                .map_err(|e| Error::Store(format!("lock task failed: {e}")))?
                .map_err(|e| Error::io(format!("lock volume {id}"), e))?;
            guards.push(VolumeGuard {
                _file: file,
                _local: local,
            });
        }
        Ok(guards)
    }

    /// Takes the volume's lock if nobody holds it, without waiting.
    pub fn try_lock(&self, id: VolumeId) -> Result<Option<VolumeGuard>> {
        let Ok(local) = self.local(id)?.try_lock_owned() else {
            return Ok(None);
        };
        let file = self.open(id)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(VolumeGuard {
                _file: file,
                _local: local,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(format!("lock volume {id}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_is_visible_to_another_lock_table() {
        let dir = tempfile::tempdir().unwrap();
        let a = VolumeLocks::new(dir.path().to_path_buf()).unwrap();
        // A second table on the same directory stands in for a second process: flocks on
        // separate open file descriptions conflict exactly as across processes.
        let b = VolumeLocks::new(dir.path().to_path_buf()).unwrap();
        let id = VolumeId::new();
        let g = a.lock(&[id]).await.unwrap();
        assert!(b.try_lock(id).unwrap().is_none());
        assert!(a.try_lock(id).unwrap().is_none());
        drop(g);
        assert!(b.try_lock(id).unwrap().is_some());
    }
}
