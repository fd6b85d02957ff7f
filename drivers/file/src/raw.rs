//! Raw mode: one sparse file per volume (`volume-<uuid>`) and per snapshot (`snapshot-<uuid>`)
//! in the backend directory. Snapshots, clones and reverts are FICLONE reflinks (O(1) in the
//! volume size), or full sparse copies when the filesystem has no reflink and the admin
//! allowed that.
//!
//! Crash safety: every new file is built under a deterministic temp name (`.<name>.tmp`),
//! fsync'ed, then renamed into place and the directory fsync'ed. A crash leaves the old state
//! plus a stale temp file that the next run of the same operation overwrites, so every
//! operation can simply be re-run.
//!
//! That is two fsyncs per snapshot, clone or revert, and no more (a snapshot is FICLONE,
//! fsync, rename, fsync of the directory):
//! 1. the new file, before the rename: the rename must never reach the disk before the
//!    file's contents (for a reflink, its extent map and size). POSIX orders neither, and
//!    not every reflink filesystem orders them by itself (XFS's log happens to; btrfs's
//!    does not), so without it a crash could leave the final name on an empty file.
//! 2. the directory, after the rename: the caller records the object as existing as soon as
//!    this returns; without it a crash could lose the rename (the name) after that.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_core::{
    CheckReport, DeleteAction, Error, PrimitiveSample, ProgressHandle, ProviderUpdate, Result,
    Snapshot, SnapshotDelta, SnapshotId, SnapshotReader, Volume, VolumeId, VolumeWriter,
};

use crate::Backend;
use crate::config::Mode;
use crate::fiemap;
use crate::reader::FileReader;
use crate::sys::{self, Flock, io_ctx};

/// Where volume `id`'s data lives.
pub(crate) fn volume_path(dir: &Path, id: &VolumeId) -> PathBuf {
    dir.join(format!("volume-{id}"))
}

/// Where snapshot `id`'s data lives.
pub(crate) fn snapshot_path(dir: &Path, id: &SnapshotId) -> PathBuf {
    dir.join(format!("snapshot-{id}"))
}

/// Temp name a new file is built under before it is renamed to `final_path`.
fn building(final_path: &Path) -> PathBuf {
    sys::tmp_sibling(final_path)
}

/// Temp name a revert builds the volume's new content under.
fn revert_tmp(dir: &Path, id: &VolumeId) -> PathBuf {
    dir.join(format!(".volume-{id}.revert.tmp"))
}

/// Per-volume lock, so two kiln processes never build the same temp file at once. Lock files
/// live in `.locks/` and are never removed: removing a lock file races with a process that
/// is about to lock it.
fn lock_volume(dir: &Path, id: &VolumeId) -> Result<Flock> {
    let locks = dir.join(".locks");
    fs::create_dir_all(&locks).map_err(io_ctx("create", &locks))?;
    Flock::exclusive(&locks.join(format!("volume-{id}.lock")), true)
}

fn location(p: &Path) -> ProviderUpdate {
    ProviderUpdate {
        provider_location: Some(p.display().to_string()),
    }
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p).map_err(io_ctx("stat", p))?.len())
}

/// Makes `dst` an exact copy of `src` (reflink or sparse copy, per mode). Not yet fsync'ed:
/// the caller fsyncs once, after any other change to the new file.
fn clone_file(b: &Backend, src: &Path, dst: &Path, progress: &ProgressHandle) -> Result<File> {
    let f = match b.mode {
        Mode::RawReflink => {
            let len = file_len(src)?;
            progress.set_total(len);
            let f = sys::reflink(src, dst).map_err(|e| {
                Error::backend(
                    "FICLONE",
                    format!("{} -> {}: {e}", src.display(), dst.display()),
                )
            })?;
            // O(1): the whole file is "done" at once.
            progress.advance(len);
            f
        }
        Mode::RawFullCopy => {
            let len = file_len(src)?;
            progress.set_total(len);
            let copied = std::cell::Cell::new(0u64);
            let f = sys::sparse_copy(src, dst, &|n| {
                copied.set(copied.get() + n);
                progress.advance(n)
            })
            .map_err(|e| {
                Error::backend(
                    "sparse copy",
                    format!("{} -> {}: {e}", src.display(), dst.display()),
                )
            })?;
            // Holes cost nothing but are part of the work: count them as done.
            progress.advance(len.saturating_sub(copied.get()));
            f
        }
        Mode::Qcow2 => {
            return Err(Error::backend(
                "raw clone",
                "internal error: raw operation on a qcow2 backend",
            ));
        }
    };
    Ok(f)
}

/// The one fsync of a new file before it is renamed into place (see the module docs).
fn fsync_new(f: &File, path: &Path) -> Result<()> {
    f.sync_all().map_err(io_ctx("fsync", path))
}

pub(crate) fn create_volume(b: &Backend, v: &Volume) -> Result<ProviderUpdate> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let path = volume_path(&b.dir, &v.id);
    if sys::exists(&path)? {
        // A re-run after a crash that happened after the rename: already done.
        let len = file_len(&path)?;
        if len != v.size_bytes {
            return Err(Error::wrong_state(format!(
                "{} already exists with {len} bytes, not {}",
                path.display(),
                v.size_bytes
            )));
        }
        return Ok(location(&path));
    }
    let tmp = building(&path);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_ctx("create", &tmp))?;
    f.set_len(v.size_bytes).map_err(io_ctx("size", &tmp))?;
    fsync_new(&f, &tmp)?;
    sys::durable_rename(&tmp, &path)?;
    Ok(location(&path))
}

pub(crate) fn delete_volume(b: &Backend, v: &Volume) -> Result<DeleteAction> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let path = volume_path(&b.dir, &v.id);
    // Snapshots are independent files (reflinks share blocks, not names), so nothing
    // depends on the volume file.
    let removed = sys::remove_if_exists(&path)?;
    sys::remove_if_exists(&building(&path))?;
    sys::remove_if_exists(&revert_tmp(&b.dir, &v.id))?;
    sys::fsync_dir(&b.dir)?;
    Ok(deleted_if(removed))
}

fn deleted_if(removed: bool) -> DeleteAction {
    if removed {
        DeleteAction::Deleted
    } else {
        DeleteAction::AlreadyGone
    }
}

/// The volume file's location if it exists (the same `provider_location` as
/// [`create_volume`]).
pub(crate) fn lookup_volume(b: &Backend, v: &Volume) -> Result<Option<ProviderUpdate>> {
    let path = volume_path(&b.dir, &v.id);
    Ok(sys::exists(&path)?.then(|| location(&path)))
}

/// The snapshot file's location if it exists (the same `provider_location` as
/// [`create_snapshot`]).
pub(crate) fn lookup_snapshot(b: &Backend, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
    let path = snapshot_path(&b.dir, &s.id);
    Ok(sys::exists(&path)?.then(|| location(&path)))
}

/// Snapshot = reflink of the volume under a temp name, renamed into place. FICLONE takes the
/// inode locks of both files and flushes the source first, so it is atomic against a
/// concurrent writer: the callers use this for online (force) snapshots too.
pub(crate) fn create_snapshot(b: &Backend, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let snap = snapshot_path(&b.dir, &s.id);
    if sys::exists(&snap)? {
        return Ok(location(&snap));
    }
    let vol = volume_path(&b.dir, &v.id);
    if !sys::exists(&vol)? {
        return Err(Error::not_found("volume", v.id.to_string()));
    }
    let tmp = building(&snap);
    let f = clone_file(b, &vol, &tmp, &kiln_core::no_progress())?;
    fsync_new(&f, &tmp)?;
    sys::durable_rename(&tmp, &snap)?;
    Ok(location(&snap))
}

/// The first half of [`create_snapshot`] for a freeze window: the reflink into the temp
/// name, which alone fixes the point in time (FICLONE flushes the source and locks both
/// inodes). No fsync, no rename: [`finish_snapshots`] does those after the thaw. A cut that
/// is never finished is removed by [`delete_snapshot`] (it removes the temp name too).
pub(crate) fn cut_snapshot(b: &Backend, s: &Snapshot, v: &Volume) -> Result<()> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let snap = snapshot_path(&b.dir, &s.id);
    if sys::exists(&snap)? {
        return Ok(());
    }
    let vol = volume_path(&b.dir, &v.id);
    if !sys::exists(&vol)? {
        return Err(Error::not_found("volume", v.id.to_string()));
    }
    clone_file(b, &vol, &building(&snap), &kiln_core::no_progress()).map(drop)
}

/// The second half: for each cut member, fsync its temp file and rename it into place;
/// then one directory fsync makes every rename durable (a group commit: N snapshots cost
/// N + 1 fsyncs instead of 2N). A member with no cut fails with `NotFound`.
pub(crate) fn finish_snapshots(
    b: &Backend,
    members: &[kiln_core::GroupMember],
) -> Vec<Result<ProviderUpdate>> {
    let mut out: Vec<Result<ProviderUpdate>> = members
        .iter()
        .map(|(s, v, _)| {
            let _lock = lock_volume(&b.dir, &v.id)?;
            let snap = snapshot_path(&b.dir, &s.id);
            if sys::exists(&snap)? {
                return Ok(location(&snap));
            }
            let tmp = building(&snap);
            let f = File::open(&tmp).map_err(io_ctx("open", &tmp))?;
            fsync_new(&f, &tmp)?;
            fs::rename(&tmp, &snap).map_err(io_ctx("rename", &tmp))?;
            Ok(location(&snap))
        })
        .collect();
    if let Err(e) = sys::fsync_dir(&b.dir) {
        // Without the directory fsync no rename is durable: none of them counts as made.
        let msg = e.to_string();
        for r in out.iter_mut().filter(|r| r.is_ok()) {
            *r = Err(Error::backend("snapshot", msg.clone()));
        }
    }
    out
}

pub(crate) fn delete_snapshot(b: &Backend, s: &Snapshot) -> Result<DeleteAction> {
    let _lock = lock_volume(&b.dir, &s.volume_id)?;
    let snap = snapshot_path(&b.dir, &s.id);
    // Clones are reflinked or copied, never backed by the snapshot file: never busy.
    let removed = sys::remove_if_exists(&snap)?;
    sys::remove_if_exists(&building(&snap))?;
    sys::fsync_dir(&b.dir)?;
    Ok(deleted_if(removed))
}

/// Clone = reflink of the snapshot, extended to the new volume's size if that is larger.
pub(crate) fn create_volume_from_snapshot(
    b: &Backend,
    v: &Volume,
    s: &Snapshot,
    progress: &ProgressHandle,
) -> Result<ProviderUpdate> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let path = volume_path(&b.dir, &v.id);
    if sys::exists(&path)? {
        return Ok(location(&path));
    }
    let snap = snapshot_path(&b.dir, &s.id);
    if !sys::exists(&snap)? {
        return Err(Error::not_found("snapshot", s.id.to_string()));
    }
    let snap_len = file_len(&snap)?;
    if v.size_bytes < snap_len {
        return Err(Error::invalid(
            "size",
            format!(
                "{} bytes is smaller than the snapshot ({snap_len} bytes)",
                v.size_bytes
            ),
        ));
    }
    let tmp = building(&path);
    let f = clone_file(b, &snap, &tmp, progress)?;
    if v.size_bytes > snap_len {
        f.set_len(v.size_bytes).map_err(io_ctx("extend", &tmp))?;
    }
    fsync_new(&f, &tmp)?;
    sys::durable_rename(&tmp, &path)?;
    Ok(location(&path))
}

/// Revert = reflink the snapshot to a temp file, fsync, rename over the volume. The snapshot
/// is only read, so every snapshot survives, and re-running after a crash at any step
/// rebuilds the temp file and completes the rename.
pub(crate) fn revert_to_snapshot(
    b: &Backend,
    v: &Volume,
    s: &Snapshot,
    progress: &ProgressHandle,
) -> Result<()> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let snap = snapshot_path(&b.dir, &s.id);
    if !sys::exists(&snap)? {
        return Err(Error::not_found("snapshot", s.id.to_string()));
    }
    let tmp = revert_tmp(&b.dir, &v.id);
    let f = clone_file(b, &snap, &tmp, progress)?;
    fsync_new(&f, &tmp)?;
    sys::durable_rename(&tmp, &volume_path(&b.dir, &v.id))
}

pub(crate) fn open_snapshot_reader(b: &Backend, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
    let snap = snapshot_path(&b.dir, &s.id);
    let f = match File::open(&snap) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found("snapshot", s.id.to_string()));
        }
        Err(e) => return Err(Error::io(format!("open {}", snap.display()), e)),
    };
    let size = f.metadata().map_err(io_ctx("stat", &snap))?.len();
    let extents = sys::data_extents(&f, size).map_err(io_ctx("SEEK_DATA/SEEK_HOLE", &snap))?;
    Ok(Box::new(FileReader::new(f, size, extents)))
}

/// Writes into a raw volume file, holding the volume's lock until it is finished or dropped.
struct RawWriter {
    file: File,
    path: PathBuf,
    size: u64,
    writeback: kiln_core::writeback::Writeback,
    _lock: Flock,
}

impl VolumeWriter for RawWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset.saturating_add(data.len() as u64) > self.size {
            return Err(std::io::Error::other(format!(
                "a write at {offset} of {} bytes is past the end of the volume ({} bytes)",
                data.len(),
                self.size
            )));
        }
        self.file.write_all_at(data, offset)?;
        self.writeback.wrote(&self.file, offset, data.len() as u64);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.saturating_add(len) > self.size {
            return Err(std::io::Error::other(format!(
                "zeroing {len} bytes at {offset} is past the end of the volume ({} bytes)",
                self.size
            )));
        }
        sys::zero_range(&self.file, offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(io_ctx("fsync", &self.path))
    }
}

/// Opens the volume's file for writing, under the volume's lock.
pub(crate) fn open_volume_writer(b: &Backend, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
    let lock = lock_volume(&b.dir, &v.id)?;
    let path = volume_path(&b.dir, &v.id);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found("volume", v.id.to_string()));
        }
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    let size = file.metadata().map_err(io_ctx("stat", &path))?.len();
    Ok(Box::new(RawWriter {
        file,
        path,
        size,
        writeback: Default::default(),
        _lock: lock,
    }))
}

/// The ranges where the two snapshot files do not share physical blocks (FIEMAP); a
/// filesystem without block maps answers `Untracked`.
pub(crate) fn diff_snapshots(b: &Backend, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
    let open = |s: &Snapshot| {
        let p = snapshot_path(&b.dir, &s.id);
        match File::open(&p) {
            Ok(f) => Ok((f, p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::not_found("snapshot", s.id.to_string()))
            }
            Err(e) => Err(Error::io(format!("open {}", p.display()), e)),
        }
    };
    let ((fa, pa), (fb, pb)) = (open(from)?, open(to)?);
    let size = fb.metadata().map_err(io_ctx("stat", &pb))?.len();
    let (Some(ma), Some(mb)) = (
        fiemap::map(&fa).map_err(io_ctx("FIEMAP", &pa))?,
        fiemap::map(&fb).map_err(io_ctx("FIEMAP", &pb))?,
    ) else {
        return Ok(SnapshotDelta::Untracked);
    };
    Ok(SnapshotDelta::Changed(fiemap::differing(&ma, &mb, size)))
}

/// Times one bare FICLONE of the volume into a temp name and its unlink (or, without
/// reflink, one sparse copy), with no kiln bookkeeping.
/// Copies a file into a new one (FICLONE or a sparse copy), returning the new file.
type CopyFn = fn(&Path, &Path) -> std::io::Result<File>;

pub(crate) fn bench_primitives(b: &Backend, v: &Volume) -> Result<Vec<PrimitiveSample>> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let vol = volume_path(&b.dir, &v.id);
    if !sys::exists(&vol)? {
        return Err(Error::not_found("volume", v.id.to_string()));
    }
    let tmp = b.dir.join(format!(".bench-volume-{}.tmp", v.id));
    let dst = b.dir.join(format!(".bench-volume-{}", v.id));
    // The primitive is durable, as kiln's snapshot is: copy (FICLONE, or a sparse copy in
    // full-copy mode) into a temp file, fsync it, rename it into place, fsync the
    // directory; removal is unlink + directory fsync. Comparing kiln with a bare FICLONE
    // would count durability as overhead.
    let (name, copy): (&str, CopyFn) = match b.mode {
        Mode::RawFullCopy => (
            "durable sparse copy (copy + fsync + rename + dir fsync) / unlink + dir fsync",
            |a, b| sys::sparse_copy(a, b, &|_| {}),
        ),
        _ => (
            "durable FICLONE (FICLONE + fsync + rename + dir fsync) / unlink + dir fsync",
            |a, b| sys::reflink(a, b),
        ),
    };
    let t = Instant::now();
    let f = copy(&vol, &tmp).map_err(|e| Error::backend(name, e.to_string()))?;
    f.sync_all().map_err(io_ctx("fsync", &tmp))?;
    fs::rename(&tmp, &dst).map_err(io_ctx("rename", &tmp))?;
    sys::fsync_dir(&b.dir)?;
    let create = t.elapsed();
    let t = Instant::now();
    fs::remove_file(&dst).map_err(io_ctx("unlink", &dst))?;
    sys::fsync_dir(&b.dir)?;
    let delete = t.elapsed();
    // The bare clone, no durability: what the filesystem alone costs.
    let t = Instant::now();
    let bare = copy(&vol, &tmp).map_err(|e| Error::backend(name, e.to_string()));
    let bare_create = t.elapsed();
    drop(bare?);
    let t = Instant::now();
    fs::remove_file(&tmp).map_err(io_ctx("unlink", &tmp))?;
    let bare_delete = t.elapsed();
    Ok(vec![
        PrimitiveSample {
            name: name.to_string(),
            create,
            delete,
        },
        PrimitiveSample {
            name: "bare copy / unlink (not durable)".into(),
            create: bare_create,
            delete: bare_delete,
        },
    ])
}

/// Raw mode keeps no record beside the files: the volume's file must exist, and temp files
/// of its interrupted operations (`.volume-<id>.tmp`, `.volume-<id>.revert.tmp`) are
/// leftovers the next run of that operation would rebuild anyway; `repair` removes them.
pub(crate) fn check_volume(b: &Backend, v: &Volume, repair: bool) -> Result<CheckReport> {
    let _lock = lock_volume(&b.dir, &v.id)?;
    let mut report = CheckReport::default();
    let path = volume_path(&b.dir, &v.id);
    let missing = !sys::exists(&path)?;
    if missing {
        report
            .findings
            .push(format!("missing file: {} does not exist", path.display()));
    }
    let mut stray_left = false;
    for tmp in [building(&path), revert_tmp(&b.dir, &v.id)] {
        if !sys::exists(&tmp)? {
            continue;
        }
        report.findings.push(format!(
            "stray temp file: {} (left by an interrupted operation)",
            tmp.display()
        ));
        if repair {
            sys::remove_if_exists(&tmp)?;
            report.repaired.push(format!("removed {}", tmp.display()));
        } else {
            stray_left = true;
        }
    }
    if !report.repaired.is_empty() {
        sys::fsync_dir(&b.dir)?;
    }
    report.consistent = !missing && !stray_left;
    Ok(report)
}
