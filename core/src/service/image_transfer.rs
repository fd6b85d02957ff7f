//! Images with their data: `image export` writes an image record and a full backup of every
//! snapshot its `block_device_mapping` lists into a new directory; `image import` recreates
//! those snapshots on any backend and records a new image whose mapping points at them. An
//! instance snapshot taken on one backend can so be booted (`image restore`) from another.
//!
//! The directory: `image.json` (written last, atomically: an export without it is
//! incomplete) and one `kiln-backup-<id>/` per snapshot in the backup directory format
//! ([`crate::backup::dir`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::{CreateVolume, Service};
use crate::backup::dir::{DirTarget, FORMAT as BACKUP_FORMAT, Manifest};
use crate::diff_apply::apply;
use crate::error::{Error, Result};
use crate::instance::{Image, ImageStatus, image_bdm};
use crate::ops::backup::{as_damaged, damaged};
use crate::progress::ProgressHandle;
use crate::store::Step;
use crate::types::{BackupId, ImageId, SnapshotId, VolumeId};

/// The export's format tag.
pub const IMAGE_FORMAT: &str = "kiln-image v1";
const IMAGE_FILE: &str = "image.json";

/// One snapshot of an exported image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedSnapshot {
    /// The snapshot's id where it was exported.
    pub snapshot_id: SnapshotId,
    /// Its label.
    pub name: Option<String>,
    /// Its size.
    pub size_bytes: u64,
    /// The directory `kiln-backup-<backup_id>` holding its data.
    pub backup_id: BackupId,
}

/// `image.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageExport {
    /// [`IMAGE_FORMAT`].
    pub format: String,
    /// The image record as it was.
    pub image: Image,
    /// Its snapshots, with where their data is.
    pub snapshots: Vec<ExportedSnapshot>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImageExported {
    /// The directory.
    pub output: PathBuf,
    /// The image.
    pub image_id: ImageId,
    /// Its snapshots.
    pub snapshots: Vec<ExportedSnapshot>,
    /// Bytes written in all.
    pub stored_bytes: u64,
}

fn io_at(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let ctx = format!("{what} {}", p.display());
    move |e| Error::io(ctx, e)
}

impl Service {
    /// Writes image `id` and a full backup of each of its snapshots into `out`, a new
    /// directory (never an existing one); on failure the directory is removed.
    pub async fn export_image(
        &self,
        id: ImageId,
        out: &Path,
        progress: ProgressHandle,
    ) -> Result<ImageExported> {
        let img = self.image(id).await?;
        if img.status != ImageStatus::Active {
            return Err(Error::wrong_state(format!(
                "cannot export image {id}: it is {}",
                img.status
            )));
        }
        std::fs::create_dir(out).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(
                "output",
                format!("{} exists; kiln never overwrites an output", out.display()),
            ),
            _ => Error::io(format!("create {}", out.display()), e),
        })?;
        let r = self.export_into(&img, out, progress).await;
        if r.is_err() {
            let _ = std::fs::remove_dir_all(out);
        }
        r
    }

    async fn export_into(
        &self,
        img: &Image,
        out: &Path,
        progress: ProgressHandle,
    ) -> Result<ImageExported> {
        let dir = DirTarget::open(out)?;
        let mut snaps = Vec::new();
        let mut stored = 0u64;
        for sid in &img.snapshots {
            let s = self.snapshot(*sid).await?;
            let mut src = self.open_delta(*sid, None).await?;
            progress.set_total(src.scan_bytes());
            let (bid, dir2, progress2) = (BackupId::new(), dir.clone(), progress.clone());
            let (volume, size) = (s.volume_id.to_string(), s.size_bytes);
            let sid_s = sid.to_string();
            stored += tokio::task::spawn_blocking(move || -> Result<u64> {
                let w = dir2.create(bid)?;
                let (_, w) = src.write_to(w, &|n| progress2.advance(n))?;
                let (chunks, stream_bytes) = w.finish()?;
                dir2.commit(
                    bid,
                    &Manifest {
                        format: BACKUP_FORMAT.into(),
                        backup_id: bid.to_string(),
                        volume_id: volume,
                        snapshot_id: sid_s,
                        parent_id: None,
                        from_snapshot_id: None,
                        size_bytes: size,
                        stream_bytes,
                        chunks,
                        created_at: Utc::now(),
                    },
                )
            })
            .await
            .map_err(|e| Error::backend("export", format!("export task failed: {e}")))??;
            snaps.push(ExportedSnapshot {
                snapshot_id: *sid,
                name: s.name.clone(),
                size_bytes: s.size_bytes,
                backup_id: bid,
            });
        }
        let record = ImageExport {
            format: IMAGE_FORMAT.into(),
            image: img.clone(),
            snapshots: snaps.clone(),
        };
        let body = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::backend("export", e.to_string()))?;
        let (tmp, path) = (out.join(".image.json.tmp"), out.join(IMAGE_FILE));
        let mut f = std::fs::File::create_new(&tmp).map_err(io_at("create", &tmp))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(io_at("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_at("rename", &tmp))?;
        std::fs::File::open(out)
            .and_then(|d| d.sync_all())
            .map_err(io_at("fsync", out))?;
        Ok(ImageExported {
            output: out.to_path_buf(),
            image_id: img.id,
            snapshots: snaps,
            stored_bytes: stored + body.len() as u64,
        })
    }

    /// Recreates an exported image from `dir` on `backend` (default: the default backend):
    /// one new volume per snapshot holding its data, a snapshot of it, and a new image whose
    /// `block_device_mapping` names those snapshots. All or nothing: on failure every volume
    /// it made is deleted. Prints the new image.
    pub async fn import_image(
        &self,
        dir: &Path,
        backend: Option<String>,
        progress: ProgressHandle,
    ) -> Result<Image> {
        let path = dir.join(IMAGE_FILE);
        let raw = std::fs::read(&path).map_err(|e| {
            Error::invalid(
                "image export",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let record: ImageExport = serde_json::from_slice(&raw).map_err(|e| {
            Error::invalid(
                "image export",
                format!("{} is not one: {e}", path.display()),
            )
        })?;
        if record.format != IMAGE_FORMAT {
            return Err(Error::invalid(
                "image export",
                format!("{} has format {:?}", path.display(), record.format),
            ));
        }
        let target = DirTarget::at(dir);
        let mut manifests = Vec::new();
        for s in &record.snapshots {
            let m = target.manifest(s.backup_id)?;
            if m.snapshot_id != s.snapshot_id.to_string() || m.size_bytes != s.size_bytes {
                return Err(damaged(
                    s.backup_id,
                    "its manifest does not match image.json",
                ));
            }
            manifests.push(m);
        }
        let mut created: Vec<VolumeId> = Vec::new();
        let r = self
            .import_into(&record, &target, manifests, backend, progress, &mut created)
            .await;
        if r.is_err() {
            for v in created {
                if let Err(e) = self.delete_volume(v, true).await {
                    tracing::warn!(volume = %v, error = %e, "could not remove a volume of a failed image import");
                }
            }
        }
        r
    }

    async fn import_into(
        &self,
        record: &ImageExport,
        target: &DirTarget,
        manifests: Vec<Manifest>,
        backend: Option<String>,
        progress: ProgressHandle,
        created: &mut Vec<VolumeId>,
    ) -> Result<Image> {
        let mut renamed: BTreeMap<String, SnapshotId> = BTreeMap::new();
        let mut new_snaps = Vec::new();
        for (s, m) in record.snapshots.iter().zip(manifests) {
            let v = self
                .create_volume(CreateVolume {
                    owner: None,
                    size_bytes: Some(s.size_bytes),
                    backend: backend.clone(),
                    name: None,
                    source_snapshot: None,
                })
                .await?;
            created.push(v.id);
            let zero_first = !self.ctx.driver(&v.backend).await?.capabilities().thin;
            let reader = target.reader(s.backup_id, &m);
            let (bid, size, progress) = (s.backup_id, s.size_bytes, progress.clone());
            progress.set_total(m.stream_bytes);
            crate::ops::restore::run(
                &self.ctx,
                v.id,
                format!("exported snapshot {}", s.snapshot_id),
                move |w| {
                    if zero_first {
                        w.zero(0, size)
                            .map_err(|e| Error::io("zero the volume before the import", e))?;
                    }
                    let accept = |info: &crate::diff_apply::StreamInfo| {
                        if info.from.is_some() || info.size_bytes != size {
                            return Err(Error::invalid(
                                "stream",
                                "not the full stream of this snapshot",
                            ));
                        }
                        Ok(())
                    };
                    apply(reader, w, &accept, &|n| progress.advance(n)).map_err(as_damaged(bid))?;
                    Ok(())
                },
            )
            .await?;
            let snap = self.create_snapshot(v.id, s.name.clone(), false).await?;
            renamed.insert(s.snapshot_id.to_string(), snap.id);
            new_snaps.push(snap.id);
        }
        let old = &record.image;
        let mut entries = image_bdm(old)?;
        for e in &mut entries {
            let new = e
                .get("snapshot_id")
                .and_then(|v| v.as_str())
                .and_then(|old| renamed.get(old))
                .ok_or_else(|| {
                    Error::invalid(
                        "image export",
                        "a block_device_mapping entry names a snapshot that was not exported",
                    )
                })?;
            e["snapshot_id"] = serde_json::Value::String(new.to_string());
        }
        let mut properties = old.properties.clone();
        properties.insert(
            "block_device_mapping".into(),
            serde_json::to_string(&entries).map_err(Error::store)?,
        );
        let now = Utc::now();
        let image = Image {
            id: ImageId::new(),
            name: old.name.clone(),
            status: ImageStatus::Active,
            instance_id: old.instance_id,
            min_disk: old.min_disk,
            consistency: old.consistency,
            properties,
            snapshots: new_snaps.clone(),
            created_at: now,
            updated_at: now,
        };
        let mut steps = vec![Step::InsertImage(image.clone())];
        for sid in &new_snaps {
            steps.push(Step::SetSnapshotImage {
                id: *sid,
                image: Some(image.id),
                consistency: Some(old.consistency),
            });
        }
        self.ctx
            .guarded(steps, |c| {
                Error::store(format!(
                    "could not record the imported image: {} {}",
                    c.what, c.id
                ))
            })
            .await?;
        self.image(image.id).await
    }
}
