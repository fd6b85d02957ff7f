//! The service's backup face: create, list, show, delete, verify and restore backups
//! (operations in [`crate::ops::backup`] and [`crate::ops::restore`]).

use super::{CreateVolume, Service};
use crate::diff_apply::{StreamInfo, apply, check};
use crate::error::{Error, Result};
use crate::ops::backup::{self, BackupCreated, BackupRequest, Place, Stored, as_damaged, damaged};
use crate::progress::ProgressHandle;
use crate::types::{Backup, BackupId, Volume, VolumeId, VolumeStatus};

/// What `backup verify` found: every chunk matched its checksum and the stream is whole.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupVerified {
    /// The backup.
    pub backup_id: BackupId,
    /// Chunk files checked.
    pub chunks: usize,
    /// Length of its stream.
    pub stream_bytes: u64,
    /// Bytes of data the stream carries.
    pub data_bytes: u64,
    /// Bytes of zeros the stream declares.
    pub zero_bytes: u64,
}

/// What `backup prune` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pruned {
    /// Nothing was deleted: this is the plan.
    pub dry_run: bool,
    /// Kept, newest first, each with why.
    pub kept: Vec<crate::backup::retention::Kept>,
    /// Deleted (or to delete), newest first.
    pub removed: Vec<BackupId>,
}

/// Where `backup restore` writes.
#[derive(Debug, Clone, Default)]
pub struct RestoreTarget {
    /// Over this existing, detached volume of the backup's size.
    pub volume: Option<VolumeId>,
    /// Into a new volume on this backend (default: the default backend).
    pub backend: Option<String>,
}

/// Reads one stored backup's stream, checking chunks as it goes. Not wrapped in a
/// `BufReader`: the chunk reader serves from memory already, and a second buffer would copy
/// every byte once more.
fn stream_of(s: &Stored) -> crate::backup::dir::ChunkReader {
    s.dir.reader(s.backup.id, &s.manifest)
}

/// Checks that each stream of a chain starts where the previous one ended (the first from
/// nothing) and that all describe `size` bytes.
fn accept_in_chain(prev: Option<String>, size: u64) -> impl Fn(&StreamInfo) -> Result<()> {
    move |info: &StreamInfo| {
        if info.from != prev {
            return Err(Error::invalid(
                "backup chain",
                format!(
                    "a stream starts from {:?} where the chain is at {prev:?}",
                    info.from
                ),
            ));
        }
        if info.size_bytes != size {
            return Err(Error::invalid(
                "backup",
                format!(
                    "its stream describes {} bytes; the target volume has {size}",
                    info.size_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl Service {
    /// Backs up a volume's snapshot to a target (see [`crate::ops::backup`]).
    pub async fn create_backup(
        &self,
        req: BackupRequest,
        progress: ProgressHandle,
    ) -> Result<BackupCreated> {
        backup::create(&self.ctx, req, progress).await
    }

    /// Every backup (of one volume), oldest first.
    pub async fn list_backups(&self, volume: Option<VolumeId>) -> Result<Vec<Backup>> {
        self.ctx.store.backups(volume).await
    }

    /// One backup, or `NotFound`.
    pub async fn backup(&self, id: BackupId) -> Result<Backup> {
        self.ctx
            .store
            .backup(id)
            .await?
            .ok_or_else(|| Error::not_found("backup", id))
    }

    /// Deletes a backup from its target and the store; refused while another builds on it.
    pub async fn delete_backup(&self, id: BackupId) -> Result<Backup> {
        backup::delete(&self.ctx, id).await
    }

    /// Applies a retention policy (Benji's syntax, see [`crate::backup::retention`]) to the
    /// available backups of `volume`: deletes what it does not keep, newest first, never a
    /// backup a kept one builds on. With `dry_run` nothing is deleted. A delete that fails
    /// stops the prune with an error naming what was already removed.
    pub async fn prune_backups(
        &self,
        volume: VolumeId,
        keep: &str,
        dry_run: bool,
    ) -> Result<Pruned> {
        let policy = crate::backup::retention::Policy::parse(keep)?;
        let all = self.list_backups(Some(volume)).await?;
        if all.is_empty() {
            // An unknown volume id says so rather than pruning nothing.
            self.ctx.volume(volume).await?;
        }
        let available: Vec<Backup> = all
            .into_iter()
            .filter(|b| b.status == crate::types::BackupStatus::Available)
            .collect();
        let plan = policy.plan(&available, chrono::Utc::now());
        if !dry_run {
            for (i, id) in plan.remove.iter().enumerate() {
                if let Err(e) = self.delete_backup(*id).await {
                    let done: Vec<String> =
                        plan.remove[..i].iter().map(|b| b.to_string()).collect();
                    return Err(Error::new(
                        e.kind(),
                        format!(
                            "prune stopped at backup {id}: {e} (already removed: {})",
                            if done.is_empty() {
                                "none".into()
                            } else {
                                done.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
        Ok(Pruned {
            dry_run,
            kept: plan.keep,
            removed: plan.remove,
        })
    }

    /// Reads a backup back whole: every chunk against its checksum, and the stream's
    /// records. A damaged backup is an error naming the chunk.
    pub async fn verify_backup(&self, id: BackupId) -> Result<BackupVerified> {
        let b = self.backup(id).await?;
        if let Place::Pool(pool) = backup::stored_at(&self.ctx, &b.target).await? {
            // Ceph checksums what it stores; kiln reads the backup back whole.
            let (volume, size) = (b.volume_id, b.size_bytes);
            return tokio::task::spawn_blocking(move || {
                let mut r = pool.reader(volume, id)?;
                if r.size() != size {
                    return Err(damaged(id, format!("its image holds {} bytes", r.size())));
                }
                let data = copy_image(&mut *r, None, &|_| {})?;
                Ok(BackupVerified {
                    backup_id: id,
                    chunks: 0,
                    stream_bytes: 0,
                    data_bytes: data,
                    zero_bytes: size - data.min(size),
                })
            })
            .await
            .map_err(|e| Error::backend("verify backup", format!("verify task failed: {e}")))?;
        }
        let stored = backup::open_chain(vec![b]).map_err(as_damaged(id))?;
        tokio::task::spawn_blocking(move || {
            let s = &stored[0];
            let (info, stats) = check(stream_of(s)).map_err(as_damaged(id))?;
            if info.to.as_deref() != Some(s.manifest.snapshot_id.as_str())
                || info.from != s.manifest.from_snapshot_id
            {
                return Err(damaged(
                    id,
                    "its stream names other snapshots than its manifest",
                ));
            }
            Ok(BackupVerified {
                backup_id: id,
                chunks: s.manifest.chunks.len(),
                stream_bytes: stats.stream_bytes,
                data_bytes: stats.data_bytes,
                zero_bytes: stats.zero_bytes,
            })
        })
        .await
        .map_err(|e| Error::backend("verify backup", format!("verify task failed: {e}")))?
    }

    /// Restores a backup (its chain: the full backup, then each incremental) into a new
    /// volume on any backend, or over an existing detached volume of its size. Into a new
    /// volume, a failure removes the volume (nothing restored); over an existing one, the
    /// whole chain is checked before the first write, and a failure after it leaves the
    /// volume `error` with the reason.
    pub async fn restore_backup(
        &self,
        id: BackupId,
        to: RestoreTarget,
        progress: ProgressHandle,
    ) -> Result<Volume> {
        let chain = backup::chain(&self.ctx, id).await?;
        let size = chain
            .last()
            .map(|b| b.size_bytes)
            .ok_or_else(|| Error::not_found("backup", id))?;
        let last = chain
            .last()
            .cloned()
            .ok_or_else(|| Error::not_found("backup", id))?;
        let source = match backup::stored_at(&self.ctx, &last.target).await? {
            // A pool backup's snapshot holds its whole data: no chain to apply.
            Place::Pool(pool) => Source::Pool(pool, last.volume_id),
            Place::Dir(_) => Source::Chain(backup::open_chain(chain).map_err(as_damaged(id))?),
        };
        let (vid, new) = match to.volume {
            Some(vid) => {
                let v = self.ctx.volume(vid).await?;
                if v.status != VolumeStatus::Available {
                    return Err(Error::wrong_state(format!(
                        "cannot restore into volume {vid}: it is {}; it must be available \
                         (detached)",
                        v.status
                    )));
                }
                if v.size_bytes != size {
                    return Err(Error::invalid(
                        "--volume",
                        format!(
                            "volume {vid} has {} bytes; backup {id} has {size}",
                            v.size_bytes
                        ),
                    ));
                }
                // Over existing data nothing may be written before the whole chain is
                // known good.
                let source =
                    match source {
                        Source::Chain(stored) => {
                            let stored = std::sync::Arc::new(stored);
                            let check_all = stored.clone();
                            tokio::task::spawn_blocking(move || {
                                for s in check_all.iter() {
                                    check(stream_of(s)).map_err(as_damaged(s.backup.id))?;
                                }
                                Ok::<(), Error>(())
                            })
                            .await
                            .map_err(|e| {
                                Error::backend("restore", format!("check task failed: {e}"))
                            })??;
                            Source::Chain(std::sync::Arc::try_unwrap(stored).map_err(|_| {
                                Error::backend("restore", "the chain is still shared")
                            })?)
                        }
                        pool => pool,
                    };
                return self
                    .write_chain(vid, source, true, id, progress)
                    .await
                    .and(self.ctx.volume(vid).await);
            }
            None => {
                let v = self
                    .create_volume(CreateVolume {
                        owner: None,
                        size_bytes: Some(size),
                        backend: to.backend,
                        name: None,
                        source_snapshot: None,
                    })
                    .await?;
                (v.id, v)
            }
        };
        let thin = self.ctx.driver(&new.backend).await?.capabilities().thin;
        match self.write_chain(vid, source, !thin, id, progress).await {
            Ok(()) => self.ctx.volume(vid).await,
            Err(e) => {
                if let Err(d) = self.delete_volume(vid, false).await {
                    tracing::warn!(volume = %vid, error = %d, "could not remove the volume of a failed restore");
                }
                Err(e)
            }
        }
    }

    /// Writes a backup's data into volume `vid` — a chain's streams in order, or a pool
    /// backup's image — zeroing the volume first when `zero_first` (its old data, or a new
    /// volume that may not read as zeros).
    async fn write_chain(
        &self,
        vid: VolumeId,
        source: Source,
        zero_first: bool,
        id: BackupId,
        progress: ProgressHandle,
    ) -> Result<()> {
        crate::ops::restore::run(&self.ctx, vid, format!("backup {id}"), move |w| {
            let size = w.size();
            if zero_first {
                w.zero(0, size)
                    .map_err(|e| Error::io("zero the volume before the restore", e))?;
            }
            match source {
                Source::Chain(stored) => {
                    progress.set_total(stored.iter().map(|s| s.manifest.stream_bytes).sum());
                    let mut prev: Option<String> = None;
                    for s in &stored {
                        let (info, _) = apply(
                            stream_of(s),
                            w,
                            &accept_in_chain(prev.clone(), size),
                            &|n| progress.advance(n),
                        )
                        .map_err(as_damaged(s.backup.id))?;
                        prev = info.to;
                    }
                }
                Source::Pool(pool, volume) => {
                    let mut r = pool.reader(volume, id)?;
                    if r.size() != size {
                        return Err(Error::invalid(
                            "backup",
                            format!("it holds {} bytes; the volume has {size}", r.size()),
                        ));
                    }
                    progress.set_total(r.extents().iter().map(|e| e.length).sum());
                    copy_image(&mut *r, Some(w), &|n| progress.advance(n))?;
                }
            }
            Ok(())
        })
        .await
    }
}

/// Where a restore reads from.
enum Source {
    /// A directory backup's chain: its streams, base first.
    Chain(Vec<Stored>),
    /// A pool backup: its image snapshot holds the whole data.
    Pool(std::sync::Arc<dyn crate::backup::PoolBackups>, VolumeId),
}

/// Reads every data extent of `r` (4 MiB at a time) and, given a writer, writes the pieces
/// that are not all zero into it. Returns the bytes read.
fn copy_image(
    r: &mut dyn crate::driver::SnapshotReader,
    mut w: Option<&mut dyn crate::driver::VolumeWriter>,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    let mut buf = vec![0u8; crate::diff_stream::MAX_WRITE];
    let extents = r.extents().to_vec();
    let size = r.size();
    let ranges: Vec<(u64, u64)> = extents
        .iter()
        .map(|e| (e.offset, e.offset.saturating_add(e.length).min(size)))
        .filter(|(a, b)| a < b)
        .collect();
    r.will_read(&ranges);
    let mut read = 0u64;
    for e in extents {
        let end = e.offset.saturating_add(e.length).min(size);
        let mut at = e.offset;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            crate::delta::read_full(r, at, &mut buf[..n])?;
            read += n as u64;
            if let Some(w) = w.as_deref_mut()
                && buf[..n].iter().any(|b| *b != 0)
            {
                w.write_at(at, &buf[..n])
                    .map_err(|e| Error::io("write the volume", e))?;
            }
            at += n as u64;
            progress(n as u64);
        }
    }
    Ok(read)
}
