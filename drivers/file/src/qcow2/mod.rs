//! qcow2 mode: each volume is a directory `volume-<uuid>/` holding a tree of qcow2 files and
//! the record `chain.json` (see [`chain`]). A snapshot freezes the active file and the volume
//! continues in a new overlay backed by it; a revert starts a new overlay on the snapshot's
//! frozen file; deleting a snapshot whose file has one child commits that child into the
//! snapshot's file and renames the result over the child (O(data in the child)), otherwise it
//! rebases the children onto its parent in qemu-img's safe mode (O(virtual size)).
//!
//! Every operation holds an exclusive flock on the volume directory, builds new files first,
//! commits by replacing `chain.json`, and only then removes files the new record no longer
//! names. A crash at any step leaves the old or the new record; files the record does not
//! name are removed by the next operation on the volume, and re-running the interrupted
//! operation completes it.

pub(crate) mod chain;
pub(crate) mod check;
mod nbd;
mod online;
mod qemu;
mod writer;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_core::{
    DeleteAction, Error, PrimitiveSample, ProgressHandle, ProviderUpdate, Result, Snapshot,
    SnapshotDelta, SnapshotReader, Volume, VolumeId,
};

use crate::Backend;
use crate::reader::FileReader;
use crate::sys::{self, Flock, io_ctx};
use chain::{CHAIN_FILE, Chain, Layer, MAX_CHAIN_DEPTH, SnapshotEntry, new_layer_name};

/// The directory of volume `id`.
pub(crate) fn volume_dir(dir: &Path, id: &VolumeId) -> PathBuf {
    dir.join(format!("volume-{id}"))
}

/// Where a new volume directory is assembled before it is renamed into place.
fn creating_dir(dir: &Path, id: &VolumeId) -> PathBuf {
    dir.join(format!(".creating-volume-{id}"))
}

/// Where a volume directory is moved to be removed (so a half-removed directory never looks
/// like a volume).
fn deleting_dir(dir: &Path, id: &VolumeId) -> PathBuf {
    dir.join(format!(".deleting-volume-{id}"))
}

/// Prefix of the temp raw images readers convert snapshots into (in the backend directory).
const READER_PREFIX: &str = ".reader-";

/// Whether a `qemu-img` program is found through `PATH`.
pub(crate) fn qemu_img_installed() -> bool {
    sys::find_in_path(qemu::QEMU_IMG).is_some()
}

/// Checks that `qemu-img` runs; called when the backend opens so a missing tool is a
/// start-up (configuration) error, not a failure of the first snapshot.
pub(crate) fn probe(dir: &Path) -> Result<String> {
    if !qemu_img_installed() {
        return Err(Error::config(
            "qcow2 mode needs qemu-img (Debian package qemu-utils), which is not in PATH; \
             install it, or use format = \"raw\" on a reflink filesystem such as XFS",
        ));
    }
    qemu::version(dir).map_err(|e| {
        Error::config(format!(
            "qcow2 mode needs a working qemu-img (Debian package qemu-utils): {e}"
        ))
    })
}

/// Removes reader temp files left by kiln processes that died (a live process's files stay).
pub(crate) fn remove_stale_reader_files(dir: &Path) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(io_ctx("list", dir))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(READER_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| !sys::pid_alive(p)) {
            tracing::info!(file = %name, "removing reader temp file of a dead process");
            sys::remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// What a volume directory holds beside the record and the files it names.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    /// Layer files (`layer-<uuid>.qcow2`) the record does not name.
    pub layers: Vec<String>,
    /// Temp files of interrupted operations (`.chain.json.tmp`, `.bench-*`, `.*.tmp`).
    pub temps: Vec<String>,
    /// Anything else kiln never creates there.
    pub unknown: Vec<String>,
}

/// Sorts the names in volume directory `dir` that `chain` does not account for.
fn leftovers_of(dir: &Path, chain: &Chain) -> Result<Leftovers> {
    let mut out = Leftovers::default();
    let rd = fs::read_dir(dir).map_err(io_ctx("list", dir))?;
    for entry in rd {
        let entry = entry.map_err(io_ctx("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == CHAIN_FILE
            || chain.files.contains_key(&name)
            || chain.online.as_ref().is_some_and(|o| o.overlay == name)
        {
            continue;
        }
        if chain::is_layer_name(&name) {
            out.layers.push(name);
        } else if name.starts_with('.') && (name.ends_with(".tmp") || name.starts_with(".bench-")) {
            out.temps.push(name);
        } else {
            out.unknown.push(name);
        }
    }
    out.layers.sort();
    out.temps.sort();
    out.unknown.sort();
    Ok(out)
}

/// (unrecorded layers, temp files) of volume directory `dir`.
fn leftovers(dir: &Path, chain: &Chain) -> Result<(Vec<String>, Vec<String>)> {
    let l = leftovers_of(dir, chain)?;
    Ok((l.layers, l.temps))
}

/// A volume directory, locked, with its record loaded.
struct Locked {
    dir: PathBuf,
    chain: Chain,
    _lock: Flock,
}

impl Locked {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Removes files the record does not name: layers of an interrupted snapshot or revert,
    /// layers whose removal was interrupted after the commit, temp files, bench overlays.
    ///
    /// A layer the record does not name is only removed when no recorded file's header names
    /// it as its backing file: after a crash that never happens (an unrecorded layer is a
    /// leaf, or was unlinked from the chain before the record dropped it), but a record that
    /// lies must not cost data. Those headers are only read when there is such a layer.
    fn remove_orphans(&self) -> Result<()> {
        let (layers, temps) = leftovers(&self.dir, &self.chain)?;
        for name in temps {
            tracing::info!(volume = %self.chain.volume_id, file = %name, "removing temp file of an interrupted operation");
            sys::remove_if_exists(&self.path(&name))?;
        }
        if layers.is_empty() {
            return Ok(());
        }
        let referenced = match self.referenced_by_headers() {
            Ok(r) => r,
            Err(e) => {
                // Cannot tell: keep them (the check reports them).
                tracing::info!(volume = %self.chain.volume_id, error = %e, "cannot read the headers; keeping unrecorded layers");
                return Ok(());
            }
        };
        for name in layers {
            if referenced.contains(&name) {
                tracing::info!(volume = %self.chain.volume_id, file = %name, "keeping an unrecorded layer that a header references");
                continue;
            }
            tracing::info!(volume = %self.chain.volume_id, file = %name, "removing layer of an interrupted operation");
            sys::remove_if_exists(&self.path(&name))?;
        }
        Ok(())
    }

    /// Backing file names in the headers of the recorded files that exist.
    fn referenced_by_headers(&self) -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        for name in self.chain.files.keys() {
            if sys::exists(&self.path(name))? {
                out.extend(qemu::backing_of(&self.dir, name)?);
            }
        }
        Ok(out)
    }

    /// The backing file `child`'s own header names.
    fn header_backing(&self, child: &str) -> Result<Option<String>> {
        qemu::backing_of(&self.dir, child)
    }

    fn commit(&self) -> Result<()> {
        self.chain.save(&self.dir)
    }

    /// Records that the delete of snapshot `id` stopped after rebasing `rebased` onto
    /// `parent` (or, on the commit path, before writing anything): those now hang off the
    /// parent, the snapshot stays, the intent is cleared. If this commit fails the intent
    /// stays set (in memory as on disk), so the next operation retries the delete.
    fn abandon_delete(
        &mut self,
        id: &str,
        rebased: &[String],
        parent: Option<&String>,
    ) -> Result<()> {
        for child in rebased {
            if let Some(layer) = self.chain.files.get_mut(child) {
                layer.backing = parent.cloned();
            }
        }
        let mut commit_child = None;
        if let Some(e) = self.chain.snapshots.get_mut(id) {
            e.deleting = false;
            commit_child = e.commit_child.take();
        }
        let committed = self.commit();
        if let (Err(_), Some(e)) = (&committed, self.chain.snapshots.get_mut(id)) {
            e.deleting = true;
            e.commit_child = commit_child;
        }
        committed
    }

    /// Brings the volume back to a state some operation committed: removes unrecorded files
    /// and finishes snapshot deletes a crash interrupted.
    fn recover(&mut self) -> Result<()> {
        online::recover(self)?;
        self.remove_orphans()?;
        let pending: Vec<String> = self
            .chain
            .snapshots
            .iter()
            .filter(|(_, e)| e.deleting)
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            tracing::info!(volume = %self.chain.volume_id, snapshot = %id, "finishing an interrupted snapshot delete");
            let online = self
                .chain
                .snapshots
                .get(&id)
                .is_some_and(|e| e.online_delete.is_some());
            if online {
                // The hypervisor's job: wait for it (or run it again); never abandoned here.
                online::resume_delete(self, &id, &kiln_core::no_progress())?;
                continue;
            }
            if let Err(e) = self.delete_snapshot(&id) {
                if self.chain.snapshots.get(&id).is_some_and(|e| e.deleting) {
                    // The record could not be made true again: nothing may trust it.
                    return Err(e);
                }
                // Abandoned cleanly (the snapshot stays); the delete can be retried. Logged
                // at info: the operation that ran recovery goes on and reports its own result.
                tracing::info!(volume = %self.chain.volume_id, snapshot = %id, error = %e, "interrupted snapshot delete could not be finished; the snapshot stays");
            }
        }
        Ok(())
    }

    /// Removes snapshot `id` and merges its file `F` away. The intent (`deleting`, and which
    /// path it takes) is committed first, so a delete a crash interrupted is finished the
    /// same way by whichever operation locks the volume next, before anything else trusts
    /// the record.
    ///
    /// - `F` has exactly one child `C` (the usual case: the newest snapshot, whose child is
    ///   the active file, or any snapshot with one later layer): [`Self::delete_by_commit`],
    ///   O(data allocated in `C`).
    /// - `F` has several children (branches after reverts) or none:
    ///   [`Self::delete_by_rebase`], O(virtual size) per child.
    ///
    /// Before choosing the path, the children's own headers are read (`qemu-img info`) and
    /// compared with the record (see [`Self::verify_children`]): the record alone must not
    /// decide, since a child may have been rebased behind its back.
    fn delete_snapshot(&mut self, id: &str) -> Result<()> {
        let Some(entry) = self.chain.snapshots.get(id) else {
            return Ok(());
        };
        let file = entry.file.clone();
        let fresh = !entry.deleting;
        if fresh {
            let parent = self.chain.files.get(&file).and_then(|l| l.backing.clone());
            let (still, moved) = self.verify_children(&file, parent.as_ref())?;
            let mut next = self.chain.clone();
            for child in &moved {
                tracing::info!(volume = %self.chain.volume_id, file = %child, "recording a rebase its header proves already happened");
                if let Some(layer) = next.files.get_mut(child) {
                    layer.backing = parent.clone();
                }
            }
            let commit_child = match still.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            };
            if let Some(e) = next.snapshots.get_mut(id) {
                e.deleting = true;
                e.commit_child = commit_child;
            }
            next.save(&self.dir)?;
            self.chain = next;
        }
        let commit_child = self
            .chain
            .snapshots
            .get(id)
            .and_then(|e| e.commit_child.clone());
        match commit_child {
            Some(child) => self.delete_by_commit(id, &file, &child, fresh),
            None => self.delete_by_rebase(id, &file, fresh),
        }
    }

    /// Reads the header of every child the record lists for `file` and sorts them into
    /// (still backed by `file`, already backed by `parent`). A child whose header names
    /// `parent` was rebased behind the record's back (e.g. a `qemu-img rebase` of an earlier
    /// kiln that outlived it and finished after that kiln's successor recorded the chain): a
    /// safe rebase switches the header last, after copying the data, so the header proves
    /// the rebase finished and the caller records it. Any other backing is refused with an
    /// error naming the file: the record and the image no longer describe the same chain,
    /// and no guess is safe (`check` with repair reconciles them).
    fn verify_children(
        &self,
        file: &str,
        parent: Option<&String>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let (mut still, mut moved) = (Vec::new(), Vec::new());
        for child in self.chain.children(file) {
            let h = self.header_backing(&child)?;
            if h.as_deref() == Some(file) {
                still.push(child);
            } else if h.as_ref() == parent {
                moved.push(child);
            } else {
                return Err(self.disagreement(&child, h.as_deref(), file, parent));
            }
        }
        Ok((still, moved))
    }

    /// The refusal for a child whose header names neither `file` (what the record says) nor
    /// `parent` (what a finished step would leave).
    fn disagreement(
        &self,
        child: &str,
        header: Option<&str>,
        file: &str,
        parent: Option<&String>,
    ) -> Error {
        Error::backend(
            "delete snapshot",
            format!(
                "the chain of volume {} is inconsistent: the qcow2 header of {} names backing \
                 file {} but the record says {file} (or {} after the merge); refusing to \
                 guess, run the volume check",
                self.chain.volume_id,
                self.path(child).display(),
                header.unwrap_or("<none>"),
                parent.map_or("<none>", String::as_str),
            ),
        )
    }

    /// The single-child merge: `qemu-img commit` writes the clusters the child `C` allocates
    /// into the snapshot's file `F`, so `F` (still backed by `F`'s parent) then shows exactly
    /// what `C` shows; `F` is fsync'ed and renamed over `C`, and the record drops the
    /// snapshot and `F` and backs `C` by `F`'s parent. `C` keeps its name, so the active
    /// file, the snapshot that froze `C` and the headers of `C`'s children (which name `C`)
    /// stay as they are.
    ///
    /// Crash points, each finished by a re-run (the intent names this path):
    /// - during or after the commit, before the rename: `C` is unchanged and still shows the
    ///   same data (its own clusters hide whatever the commit wrote into `F` under them), only
    ///   the snapshot's own image is gone, so the delete rolls forward: the commit runs
    ///   again (idempotent), then the rename.
    /// - after the rename, before the record: `F` no longer exists and `C`'s header is backed
    ///   by `F`'s parent, which this checks, then commits the record.
    ///
    /// `fresh` says this call recorded the intent itself, so no earlier attempt can have
    /// written into `F`: only then may a commit that qemu-img refused for an image lock (a
    /// hypervisor holds the chain open; nothing was written) be abandoned, leaving the
    /// snapshot in place as the rebase path does. Any other failure keeps the intent, and
    /// the volume's operations report it until the delete can be finished.
    fn delete_by_commit(&mut self, id: &str, file: &str, child: &str, fresh: bool) -> Result<()> {
        let parent = self.chain.files.get(file).and_then(|l| l.backing.clone());
        let file_path = self.path(file);
        // A fresh delete has just read this header (`verify_children`) under the same lock.
        let backing = if fresh {
            Some(file.to_string())
        } else {
            self.header_backing(child)?
        };
        let mut drop_file = false;
        if sys::exists(&file_path)? {
            if backing.as_deref() == Some(file) {
                if let Err(e) = qemu::commit(&self.dir, child, file) {
                    if fresh && qemu::is_lock_refusal(&e) {
                        self.abandon_delete(id, &[], parent.as_ref())?;
                    }
                    return Err(e);
                }
                fsync_file(&file_path)?;
                sys::durable_rename(&file_path, &self.path(child))?;
            } else if backing == parent {
                // The child no longer reads from F (rebased behind the record's back): F,
                // whatever an earlier commit attempt left in it, is read by nothing any more.
                // Drop it after the record.
                drop_file = true;
            } else {
                return Err(self.disagreement(child, backing.as_deref(), file, parent.as_ref()));
            }
        } else if backing != parent {
            // F is gone, so the rename happened, and then the child (the renamed F) must be
            // backed by F's parent.
            return Err(Error::backend(
                "delete snapshot",
                format!(
                    "{} is missing but {} is backed by {:?}, not by {:?}: the chain of \
                     volume {} is inconsistent",
                    file_path.display(),
                    self.path(child).display(),
                    backing,
                    parent,
                    self.chain.volume_id
                ),
            ));
        }
        if let Some(layer) = self.chain.files.get_mut(child) {
            layer.backing = parent;
        }
        self.chain.files.remove(file);
        self.chain.snapshots.remove(id);
        self.commit()?;
        if drop_file {
            sys::remove_if_exists(&file_path)?;
            sys::fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The general merge: each child file of the snapshot's file `F` is rebased (safe mode)
    /// onto `F`'s parent, or made standalone when there is none; then the record drops the
    /// snapshot and `F` is removed.
    ///
    /// A safe rebase copies the differing clusters into the child before it switches the
    /// backing pointer, so a crash during the rebases leaves every child showing the same
    /// data as before; a re-run reads each child's header and rebases only the children
    /// still backed by `F` (one whose header already names the parent is done). A failed
    /// rebase (typically qemu's image lock: a hypervisor holds the child), or a header that
    /// names neither `F` nor its parent, abandons the delete with the record kept true.
    fn delete_by_rebase(&mut self, id: &str, file: &str, fresh: bool) -> Result<()> {
        let parent = self.chain.files.get(file).and_then(|x| x.backing.clone());
        let children = self.chain.children(file);
        for (n, child) in children.iter().enumerate() {
            let rebased = (|| {
                // A fresh delete has just read every child's header under the same lock.
                if !fresh {
                    let h = self.header_backing(child)?;
                    if h == parent {
                        return Ok(());
                    }
                    if h.as_deref() != Some(file) {
                        return Err(self.disagreement(child, h.as_deref(), file, parent.as_ref()));
                    }
                }
                qemu::rebase(&self.dir, child, parent.as_deref())?;
                fsync_file(&self.path(child))
            })();
            if let Err(e) = rebased {
                // Give up the delete but keep the record true: the children already rebased
                // now hang off the parent (showing the same data), the snapshot stays.
                self.abandon_delete(id, &children[..n], parent.as_ref())?;
                return Err(e);
            }
        }
        for child in &children {
            if let Some(layer) = self.chain.files.get_mut(child) {
                layer.backing = parent.clone();
            }
        }
        self.chain.snapshots.remove(id);
        let drop_file = file != self.chain.active;
        if drop_file {
            self.chain.files.remove(file);
        }
        self.commit()?;
        if drop_file {
            sys::remove_if_exists(&self.path(file))?;
            sys::fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Locks volume `id` and loads its record, then brings it to a committed state (see
/// [`Locked::recover`]); `None` if the volume does not exist.
fn lock(dir: &Path, id: &VolumeId) -> Result<Option<Locked>> {
    let Some(mut l) = lock_as_is(dir, id)? else {
        return Ok(None);
    };
    l.recover()?;
    Ok(Some(l))
}

/// Locks volume `id` and loads its record as it is, without recovery (for the check, which
/// must see what a crash left, and for callers that look before recovering).
fn lock_as_is(dir: &Path, id: &VolumeId) -> Result<Option<Locked>> {
    let vdir = volume_dir(dir, id);
    if !sys::exists(&vdir)? {
        return Ok(None);
    }
    let lock = match Flock::exclusive(&vdir, false) {
        Ok(l) => l,
        // Removed by a concurrent delete between the check and the open.
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // Loaded after locking: a concurrent operation may have replaced it meanwhile.
    let Some(chain) = Chain::load(&vdir)? else {
        return Ok(None);
    };
    Ok(Some(Locked {
        dir: vdir,
        chain,
        _lock: lock,
    }))
}

fn lock_required(dir: &Path, id: &VolumeId) -> Result<Locked> {
    lock(dir, id)?.ok_or_else(|| Error::not_found("volume", id.to_string()))
}

fn location(p: &Path) -> ProviderUpdate {
    ProviderUpdate {
        provider_location: Some(p.display().to_string()),
    }
}

fn snapshot_not_found(s: &Snapshot) -> Error {
    Error::not_found("snapshot", s.id.to_string())
}

fn fsync_file(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io_ctx("fsync", p))
}

/// Builds a complete volume directory for `v` in a temp directory with `fill` (which creates
/// the base file under the given name), then renames it into place. Already existing: done.
fn build_volume(
    b: &Backend,
    v: &Volume,
    fill: impl FnOnce(&Path, &str) -> Result<()>,
) -> Result<ProviderUpdate> {
    let vdir = volume_dir(&b.dir, &v.id);
    if let Some(existing) = lock(&b.dir, &v.id)? {
        // A re-run after a crash that happened after the rename: already done.
        if existing.chain.size_bytes != v.size_bytes {
            return Err(Error::wrong_state(format!(
                "{} already exists with {} bytes, not {}",
                vdir.display(),
                existing.chain.size_bytes,
                v.size_bytes
            )));
        }
        return Ok(location(&vdir.join(CHAIN_FILE)));
    }
    let tmp = creating_dir(&b.dir, &v.id);
    sys::remove_dir_if_exists(&tmp)?;
    fs::create_dir(&tmp).map_err(io_ctx("create", &tmp))?;
    let base = new_layer_name();
    let built = (|| {
        fill(&tmp, &base)?;
        fsync_file(&tmp.join(&base))?;
        Chain::new(v.id.to_string(), v.size_bytes, base.clone()).save(&tmp)?;
        sys::durable_rename(&tmp, &vdir)
    })();
    if built.is_err() {
        let _ = sys::remove_dir_if_exists(&tmp);
    }
    built?;
    Ok(location(&vdir.join(CHAIN_FILE)))
}

pub(crate) fn create_volume(b: &Backend, v: &Volume) -> Result<ProviderUpdate> {
    build_volume(b, v, |dir, base| {
        qemu::create_empty(dir, base, v.size_bytes)
    })
}

/// Removes the volume's directory; `Busy` (naming the snapshots) while its chain still holds
/// snapshots. `AlreadyGone` when there was no volume directory (a re-run may still clean up
/// what an interrupted delete left past its point of no return).
pub(crate) fn delete_volume(b: &Backend, v: &Volume) -> Result<DeleteAction> {
    let gone = deleting_dir(&b.dir, &v.id);
    let mut removed = false;
    if let Some(l) = lock(&b.dir, &v.id)? {
        if !l.chain.snapshots.is_empty() {
            let dependents: Vec<String> = l.chain.snapshots.keys().cloned().collect();
            return Err(Error::busy(
                format!(
                    "volume {} still has {} snapshot(s) in its qcow2 chain ({}); delete them first",
                    v.id,
                    dependents.len(),
                    dependents.join(", ")
                ),
                dependents,
            ));
        }
        sys::remove_dir_if_exists(&gone)?;
        // The rename is the point of no return: from here the volume no longer exists.
        sys::durable_rename(&l.dir, &gone)?;
        removed = true;
    } else if sys::exists(&volume_dir(&b.dir, &v.id))? {
        // A directory without a record: a volume nothing can use; remove it as well.
        sys::durable_rename(&volume_dir(&b.dir, &v.id), &gone)?;
        removed = true;
    }
    sys::remove_dir_if_exists(&gone)?;
    sys::remove_dir_if_exists(&creating_dir(&b.dir, &v.id))?;
    sys::fsync_dir(&b.dir)?;
    Ok(if removed {
        DeleteAction::Deleted
    } else {
        DeleteAction::AlreadyGone
    })
}

/// The volume's location (its record, as [`create_volume`] returns it) when its record
/// exists and names an active file that exists.
pub(crate) fn lookup_volume(b: &Backend, v: &Volume) -> Result<Option<ProviderUpdate>> {
    let vdir = volume_dir(&b.dir, &v.id);
    match Chain::load(&vdir)? {
        Some(c) if sys::exists(&vdir.join(&c.active))? => {
            Ok(Some(location(&vdir.join(CHAIN_FILE))))
        }
        _ => Ok(None),
    }
}

/// The volume's active layer (the file a hypervisor opens for it now), named by its record
/// read under the volume's flock, so it is never a record a concurrent snapshot or revert
/// is replacing. No recovery runs: this is a read and must not merge or remove anything
/// (nor fail because a pending merge cannot run while a hypervisor holds the chain), and
/// no interrupted step changes which file is active (a commit-path delete renames the
/// merged file over the active file, keeping its name; a snapshot or revert switches
/// `active` only with the record, after the new overlay is durable). `NotFound` when the
/// volume does not exist.
pub(crate) fn active_layer(b: &Backend, v: &Volume) -> Result<PathBuf> {
    let mut l = lock_as_is(&b.dir, &v.id)?.ok_or_else(|| Error::not_found("volume", v.id))?;
    if l.chain.online.is_some() {
        // An online switch was interrupted: which file the hypervisor writes is exactly
        // what is uncertain, so settle it (ask the monitor) before naming one.
        online::recover(&mut l)?;
    }
    Ok(l.path(&l.chain.active))
}

/// The snapshot's location (its frozen file, as [`create_snapshot`] returns it) when the
/// record holds the snapshot and that file exists. Files keep their names through every
/// later operation (a commit-path delete renames the merged file over the child, keeping the
/// child's name), so the location stays the one `create_snapshot` reported.
pub(crate) fn lookup_snapshot(b: &Backend, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
    let vdir = volume_dir(&b.dir, &s.volume_id);
    let mut chain = Chain::load(&vdir)?;
    if chain.as_ref().is_some_and(|c| c.online.is_some()) {
        // An online snapshot was interrupted: only the hypervisor can say whether it was
        // taken, and locking the volume asks it (see `online::recover`).
        chain = lock(&b.dir, &s.volume_id)?.map(|l| l.chain);
    }
    match chain.and_then(|c| c.snapshots.get(&s.id.to_string()).cloned()) {
        Some(e) if sys::exists(&vdir.join(&e.file))? => Ok(Some(location(&vdir.join(e.file)))),
        _ => Ok(None),
    }
}

/// `Some(reason)` when the snapshot is recorded but a file of its backing chain is missing
/// (deleted by hand, lost with a disk), so its data cannot be read; `None` when every layer
/// is there or the snapshot does not exist (that is `lookup_snapshot`'s question).
pub(crate) fn snapshot_health(b: &Backend, s: &Snapshot) -> Result<Option<String>> {
    let vdir = volume_dir(&b.dir, &s.volume_id);
    let Some(chain) = Chain::load(&vdir)? else {
        return Ok(None);
    };
    let Some(entry) = chain.snapshots.get(&s.id.to_string()) else {
        return Ok(None);
    };
    let mut cur = Some(entry.file.clone());
    while let Some(f) = cur {
        let p = vdir.join(&f);
        if !sys::exists(&p)? {
            return Ok(Some(format!(
                "{} (a layer of snapshot {}'s qcow2 chain) is missing",
                p.display(),
                s.id
            )));
        }
        cur = chain.files.get(&f).and_then(|l| l.backing.clone());
    }
    Ok(None)
}

/// Freezes the active file as the snapshot's image and moves the volume onto a new overlay.
///
/// Steps: create the overlay (not yet recorded) -> fsync -> commit the record (snapshot
/// names the old active file, active = overlay). A crash before the commit leaves an
/// unrecorded overlay that the next operation removes; the snapshot does not exist yet.
pub(crate) fn create_snapshot(b: &Backend, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
    let mut l = lock_required(&b.dir, &v.id)?;
    let sid = s.id.to_string();
    if let Some(e) = l.chain.snapshots.get(&sid) {
        return Ok(location(&l.path(&e.file)));
    }
    check_depth(&l.chain, v)?;
    let frozen = l.chain.active.clone();
    let overlay = new_layer_name();
    qemu::create_overlay(&l.dir, &frozen, &overlay)?;
    fsync_file(&l.path(&overlay))?;
    sys::fsync_dir(&l.dir)?;
    l.chain.files.insert(
        overlay.clone(),
        Layer {
            backing: Some(frozen.clone()),
        },
    );
    l.chain.snapshots.insert(
        sid,
        SnapshotEntry {
            file: frozen.clone(),
            size_bytes: l.chain.size_bytes,
            deleting: false,
            commit_child: None,
            online_delete: None,
        },
    );
    l.chain.active = overlay;
    l.commit()?;
    Ok(location(&l.path(&frozen)))
}

/// Refuses a snapshot that would make the volume's chain deeper than [`MAX_CHAIN_DEPTH`].
fn check_depth(chain: &Chain, v: &Volume) -> Result<()> {
    let depth = chain.depth(&chain.active);
    if depth >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(format!(
            "volume {} already has a backing chain of {depth} qcow2 files, the limit is \
             {MAX_CHAIN_DEPTH} (every layer slows every read); delete older snapshots of it \
             first, or create a new volume from a snapshot",
            v.id
        )));
    }
    Ok(())
}

/// Writes a detached volume's active layer through qemu-nbd (see [`writer`]).
pub(crate) use writer::open_volume_writer;

/// Snapshots attached qcow2 volumes through their hypervisor (see [`online`]).
pub(crate) use online::{Member as OnlineMember, create_snapshots as create_online_snapshots};

/// Removes a snapshot and merges its file away (see [`Locked::delete_snapshot`]).
/// `AlreadyGone` if neither the record nor the volume held it when this call started
/// (`Deleted` when this call's recovery finished an interrupted delete of it).
pub(crate) fn delete_snapshot(
    b: &Backend,
    s: &Snapshot,
    progress: ProgressHandle,
) -> Result<DeleteAction> {
    let Some(mut l) = lock_as_is(&b.dir, &s.volume_id)? else {
        return Ok(DeleteAction::AlreadyGone); // the whole volume is gone, so is the snapshot
    };
    let id = s.id.to_string();
    let recorded = l.chain.snapshots.contains_key(&id);
    l.recover()?;
    if l.chain.snapshots.contains_key(&id)
        && let Some(qmp) = online::serving_monitor(&l)?
    {
        online::delete_snapshot(&mut l, &id, &qmp, &progress)?;
    } else {
        l.delete_snapshot(&id)?;
    }
    Ok(if recorded {
        DeleteAction::Deleted
    } else {
        DeleteAction::AlreadyGone
    })
}

/// Points the volume at a new empty overlay on the snapshot's frozen file. The previous
/// active file is dropped unless a snapshot froze it (it cannot have children: it was
/// active). Re-running after a crash builds another overlay on the same snapshot, with the
/// same result.
pub(crate) fn revert_to_snapshot(b: &Backend, v: &Volume, s: &Snapshot) -> Result<()> {
    let mut l = lock_required(&b.dir, &v.id)?;
    let entry = l
        .chain
        .snapshots
        .get(&s.id.to_string())
        .cloned()
        .ok_or_else(|| snapshot_not_found(s))?;
    let overlay = new_layer_name();
    qemu::create_overlay(&l.dir, &entry.file, &overlay)?;
    fsync_file(&l.path(&overlay))?;
    sys::fsync_dir(&l.dir)?;
    let old = std::mem::replace(&mut l.chain.active, overlay.clone());
    l.chain.files.insert(
        overlay,
        Layer {
            backing: Some(entry.file.clone()),
        },
    );
    l.chain.size_bytes = entry.size_bytes;
    let drop_old = !l.chain.is_snapshot_file(&old) && l.chain.children(&old).is_empty();
    if drop_old {
        l.chain.files.remove(&old);
    }
    l.commit()?;
    if drop_old {
        sys::remove_if_exists(&l.path(&old))?;
        sys::fsync_dir(&l.dir)?;
    }
    Ok(())
}

/// A new independent volume: `qemu-img convert -O qcow2` of the snapshot's whole chain,
/// grown to the requested size if that is larger.
pub(crate) fn create_volume_from_snapshot(
    b: &Backend,
    v: &Volume,
    s: &Snapshot,
    progress: &ProgressHandle,
) -> Result<ProviderUpdate> {
    let src = lock_required(&b.dir, &s.volume_id)?;
    let entry = src
        .chain
        .snapshots
        .get(&s.id.to_string())
        .cloned()
        .ok_or_else(|| snapshot_not_found(s))?;
    if v.size_bytes < entry.size_bytes {
        return Err(Error::invalid(
            "size",
            format!(
                "{} bytes is smaller than the snapshot ({} bytes)",
                v.size_bytes, entry.size_bytes
            ),
        ));
    }
    progress.set_total(entry.size_bytes);
    let src_file = src.path(&entry.file);
    let out = build_volume(b, v, |dir, base| {
        let dst = dir.join(base);
        qemu::convert_with_progress(dir, &src_file, "qcow2", &dst, entry.size_bytes, &|n| {
            progress.advance(n)
        })?;
        if v.size_bytes > entry.size_bytes {
            qemu::resize(dir, &dst, v.size_bytes)?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Converts the snapshot's chain into a sparse raw temp file in the backend directory, opens
/// it and unlinks it, so the reader owns the only reference. Costs disk space for the
/// allocated data of the snapshot while the reader is open.
/// The clusters allocated in the layers that separate the two snapshots' files: from each
/// file down to the newest file both chains share (after a revert the two can sit on
/// different branches; then both sides' layers count). `qemu-img map` reads only metadata.
pub(crate) fn diff_snapshots(b: &Backend, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
    let src = lock_required(&b.dir, &to.volume_id)?;
    let file_of = |s: &Snapshot| {
        src.chain
            .snapshots
            .get(&s.id.to_string())
            .map(|e| e.file.clone())
            .ok_or_else(|| snapshot_not_found(s))
    };
    let (fa, fb) = (file_of(from)?, file_of(to)?);
    let ancestors = |file: &str| {
        let mut out = Vec::new();
        let mut cur = Some(file.to_string());
        while let Some(f) = cur {
            if out.contains(&f) || out.len() > src.chain.files.len() {
                break; // a loop; `check` reports it
            }
            cur = src.chain.files.get(&f).and_then(|l| l.backing.clone());
            out.push(f);
        }
        out
    };
    let (la, lb) = (ancestors(&fa), ancestors(&fb));
    // How many files of each chain lie above the newest shared one (all of it when the
    // two share none).
    let above_shared = |mine: &[String], other: &[String]| {
        mine.iter()
            .position(|f| other.contains(f))
            .unwrap_or(mine.len()) as u64
    };
    let mut changed = qemu::allocated_in_top(&src.dir, &src.path(&fb), above_shared(&lb, &la))?;
    let from_side = above_shared(&la, &lb);
    if from_side > 0 {
        changed.extend(qemu::allocated_in_top(&src.dir, &src.path(&fa), from_side)?);
    }
    Ok(SnapshotDelta::Changed(kiln_core::merge_extents(
        &mut changed,
    )))
}

pub(crate) fn open_snapshot_reader(b: &Backend, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
    let src = lock_required(&b.dir, &s.volume_id)?;
    let entry = src
        .chain
        .snapshots
        .get(&s.id.to_string())
        .cloned()
        .ok_or_else(|| snapshot_not_found(s))?;
    let file = src.path(&entry.file);
    let extents = qemu::data_extents(&src.dir, &file)?;
    let tmp = b.dir.join(format!(
        "{READER_PREFIX}{}-snapshot-{}-{}.raw",
        std::process::id(),
        s.id,
        uuid::Uuid::new_v4().hyphenated()
    ));
    let opened = (|| {
        qemu::convert(&src.dir, &file, "raw", &tmp)?;
        File::open(&tmp).map_err(io_ctx("open", &tmp))
    })();
    let _ = sys::remove_if_exists(&tmp);
    let f = opened?;
    // A raw image is exactly as long as the virtual disk.
    let size = f.metadata().map_err(io_ctx("stat", &tmp))?.len();
    Ok(Box::new(FileReader::new(f, size, extents)))
}

/// Times one bare `qemu-img create -f qcow2 -b <active> -F qcow2 <tmp>` and its unlink.
pub(crate) fn bench_primitives(b: &Backend, v: &Volume) -> Result<Vec<PrimitiveSample>> {
    let mut l = lock_required(&b.dir, &v.id)?;
    if let Some(a) = v.attachments.first()
        && let Some(qmp) = &a.qmp
    {
        // Attached through a hypervisor: the bare QMP sequences (see `online::bench`).
        return online::bench(&mut l, qmp, a.node.as_deref());
    }
    let tmp = format!(".bench-{}.qcow2", uuid::Uuid::new_v4().hyphenated());
    let t = Instant::now();
    qemu::create_overlay(&l.dir, &l.chain.active, &tmp)?;
    let create = t.elapsed();
    let path = l.path(&tmp);
    // The same work as kiln's delete of a snapshot with one child (the commit path): a
    // `qemu-img commit` of the child into the snapshot's file, then one directory entry
    // changed durably. The overlay is empty, so the commit changes no data of the volume.
    let t = Instant::now();
    qemu::commit(&l.dir, &tmp, &l.chain.active)?;
    fs::remove_file(&path).map_err(io_ctx("unlink", &path))?;
    sys::fsync_dir(&l.dir)?;
    let delete = t.elapsed();
    Ok(vec![PrimitiveSample {
        name: "qemu-img create -b (overlay) / qemu-img commit + unlink + dir fsync".into(),
        create,
        delete,
    }])
}
