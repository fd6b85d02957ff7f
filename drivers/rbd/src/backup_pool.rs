//! `rbd:POOL` backup targets: each volume's backups are snapshots of one image
//! `kiln-backup-<volume>` in POOL (a connection of its own to that pool, same cluster and
//! identity as the backend). Its head only ever changes between `begin` and `seal` (or
//! `abandon`), so an incremental finds it exactly as its parent's snapshot left it, unless a
//! later backup of another chain moved it — then it is rolled back to the parent first.

use std::sync::Arc;

use kiln_core::backup::PoolBackups;
use kiln_core::{BackupId, Error, Result, SnapshotReader, VolumeId, VolumeWriter, no_progress};

use crate::cluster::Cluster;
use crate::config::RbdConfig;
use crate::image::{self, Image};
use crate::progress::ProgressBridge;
use crate::reader::RbdSnapshotReader;
use crate::writer::RbdWriter;

/// The backups in one pool.
pub struct RbdPoolBackups {
    cluster: Arc<Cluster>,
}

fn image_name(v: VolumeId) -> String {
    format!("kiln-backup-{v}")
}

fn snap_name(id: BackupId) -> String {
    format!("backup-{id}")
}

impl RbdPoolBackups {
    /// Connects to `pool` with the backend's cluster settings; a pool that does not exist is
    /// refused with one line.
    pub fn connect(cfg: &RbdConfig, pool: &str) -> Result<RbdPoolBackups> {
        let mut c = cfg.clone();
        c.pool = pool.to_string();
        let cluster = Cluster::connect_blocking(&c).map_err(|e| {
            Error::invalid(
                "target",
                format!("rbd:{pool}: cannot open the pool ({})", e.message()),
            )
        })?;
        Ok(RbdPoolBackups {
            cluster: Arc::new(cluster),
        })
    }

    fn open(&self, v: VolumeId) -> Result<Option<Image>> {
        match Image::open(&self.cluster, &image_name(v), None) {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl PoolBackups for RbdPoolBackups {
    fn pool(&self) -> &str {
        self.cluster.pool()
    }

    fn begin(
        &self,
        volume: VolumeId,
        size: u64,
        parent: Option<BackupId>,
    ) -> Result<Box<dyn VolumeWriter>> {
        let name = image_name(volume);
        let img = match (self.open(volume)?, parent) {
            (Some(img), Some(p)) => {
                let snaps = img.snap_names()?;
                let want = snap_name(p);
                if !snaps.contains(&want) {
                    return Err(Error::backend(
                        "backup",
                        format!("rbd:{}/{name} has no snapshot {want}", self.pool()),
                    ));
                }
                if snaps.last() != Some(&want) {
                    let bridge = ProgressBridge::new(no_progress(), size, "rollback");
                    img.snap_rollback(&want, &bridge)?;
                }
                img
            }
            (None, Some(_)) => {
                return Err(Error::backend(
                    "backup",
                    format!(
                        "rbd:{}/{name} (the parent backup's image) is gone",
                        self.pool()
                    ),
                ));
            }
            (Some(img), None) => {
                // A full backup starts from zeros whatever older chains left in the head.
                img.write_zeroes(0, img.size()?)?;
                img
            }
            (None, None) => {
                image::create(&self.cluster, &name, size)?;
                Image::open(&self.cluster, &name, None)?
            }
        };
        if img.size()? != size {
            img.resize(size)?;
        }
        Ok(Box::new(RbdWriter::new(img, size)))
    }

    fn seal(&self, volume: VolumeId, id: BackupId) -> Result<()> {
        let img = self
            .open(volume)?
            .ok_or_else(|| Error::backend("backup", "the backup image is gone"))?;
        img.snap_create(&snap_name(id))?;
        Ok(())
    }

    fn has(&self, volume: VolumeId, id: BackupId) -> Result<bool> {
        match self.open(volume)? {
            Some(img) => Ok(img.snap_exists(&snap_name(id))?),
            None => Ok(false),
        }
    }

    fn reader(&self, volume: VolumeId, id: BackupId) -> Result<Box<dyn SnapshotReader>> {
        let img = Image::open_read_only(&self.cluster, &image_name(volume), Some(&snap_name(id)))
            .map_err(|e| {
            if e.is_not_found() {
                Error::backend(
                    "read backup",
                    format!(
                        "backup {id} is damaged: rbd:{}/{}@{} is gone",
                        self.pool(),
                        image_name(volume),
                        snap_name(id)
                    ),
                )
            } else {
                e.into()
            }
        })?;
        let size = img.size()?;
        let extents = img.allocated_extents(size)?;
        Ok(Box::new(RbdSnapshotReader::new(img, size, extents)))
    }

    fn delete(&self, volume: VolumeId, id: BackupId) -> Result<()> {
        let Some(img) = self.open(volume)? else {
            return Ok(());
        };
        let snap = snap_name(id);
        if img.snap_exists(&snap)? {
            img.snap_remove(&snap)?;
        }
        if img.snap_names()?.is_empty() {
            drop(img);
            match image::remove(&self.cluster, &image_name(volume)) {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn abandon(&self, volume: VolumeId) -> Result<()> {
        let Some(img) = self.open(volume)? else {
            return Ok(());
        };
        match img.snap_names()?.last() {
            Some(newest) => {
                let size = img.size()?;
                let bridge = ProgressBridge::new(no_progress(), size, "rollback");
                img.snap_rollback(newest, &bridge)?;
            }
            None => {
                drop(img);
                image::remove(&self.cluster, &image_name(volume))?;
            }
        }
        Ok(())
    }
}
