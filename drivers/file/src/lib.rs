//! kiln's file backend: volumes as files in one directory.
//!
//! Two on-disk formats (see `docs/file-backend.md`):
//! - **raw**: one sparse file per volume and per snapshot; snapshots, clones and reverts are
//!   FICLONE reflinks, O(1) in the volume size and atomic against a concurrent writer (so
//!   online snapshots are supported). Without reflink, full sparse copies if the admin
//!   allowed them.
//! - **qcow2**: one directory per volume holding a tree of qcow2 files built with `qemu-img`
//!   (external snapshots), recorded in `chain.json`.
//!
//! `format = "auto"` (the default) picks raw where the directory's filesystem supports
//! reflink, else qcow2, and where there is neither reflink nor `qemu-img` (found through
//! `PATH`), raw full copies with one warning. The choice is recorded in the directory
//! (`kiln-file-backend.json`) so a backend never reinterprets existing volumes.
//!
//! The backend is plain blocking code ([`FileBackend`], a [`kiln_core::BlockingDriver`])
//! behind kiln's one blocking adapter ([`FileDriver`]). Every `qemu-img` it starts dies
//! with kiln. It offers the bench primitive and, for the qcow2 chain record, the volume
//! check ([`kiln_core::VolumeCheck`]).

#![warn(missing_docs)]

mod config;
mod fiemap;
mod qcow2;
mod raw;
mod reader;
mod sys;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{
    Attachment, BackendStats, BenchPrimitives, BlockingDriver, Capabilities, CheckReport,
    ConnectionInfo, DeleteAction, Error, PrimitiveSample, ProgressHandle, ProviderUpdate, Result,
    Snapshot, SnapshotDelta, SnapshotReader, Volume, VolumeCheck, VolumeWriter,
};
use serde::{Deserialize, Serialize};

pub use config::{FileConfig, Format, Mode};
pub use qcow2::chain::MAX_CHAIN_DEPTH;

/// Name of the marker file recording a backend directory's format.
const MARKER_FILE: &str = "kiln-file-backend.json";

/// The Debian package that provides `qemu-img`, named in messages.
const QEMU_PACKAGE: &str = "qemu-utils";

/// What a backend directory records about itself.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// "raw" or "qcow2".
    format: String,
    /// Set when `format = "auto"` found neither reflink nor `qemu-img` and settled on raw
    /// full copies: `auto` keeps that mode for this directory even once `qemu-img` is
    /// installed, so existing volumes are never reinterpreted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    full_copy: bool,
    /// The device (`st_dev`) of the directory's filesystem when reflink was last proven to
    /// work there. While it is the same, opening skips the reflink probe: the probe writes,
    /// fsyncs and clones a scratch file, the most expensive part of every command's
    /// start-up. A moved directory (another device) is probed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reflink_dev: Option<u64>,
}

/// The device of `dir`'s filesystem.
fn device_of(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| m.dev())
        .map_err(|e| Error::io(format!("stat {}", dir.display()), e))
}

/// The file backend as plain blocking code: one opened backend directory. It runs behind
/// [`kiln_core::Blocking`] (see [`FileDriver`]), which puts every call on tokio's blocking
/// pool; its own methods ([`FileBackend::active_image`], the [`BlockingDriver`] methods)
/// block.
pub struct FileBackend {
    /// Configured backend name (for logs and messages).
    pub(crate) name: String,
    /// Absolute, canonical backend directory.
    pub(crate) dir: PathBuf,
    /// The mode in use.
    pub(crate) mode: Mode,
}

/// The module-internal name the raw and qcow2 code use for an opened backend.
pub(crate) type Backend = FileBackend;

/// The file backend driver: [`FileBackend`] behind kiln's one blocking adapter. Cheap to
/// clone; derefs to [`FileBackend`] for [`FileBackend::mode`], [`FileBackend::path`] and
/// [`FileBackend::active_image`].
pub type FileDriver = kiln_core::Blocking<FileBackend>;

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Opens (creating the directory if missing) and validates a file backend: decides the mode,
/// probes reflink by cloning a scratch file in the directory, checks `qemu-img` in qcow2
/// mode. Fails with an `InvalidInput` (configuration) error and a message saying what to
/// change when the configuration cannot work (e.g. `format = "raw"` on a filesystem without
/// reflink and without `allow_full_copy`, or `format = "qcow2"` without `qemu-img`), or when
/// the directory already holds the other format. With `format = "auto"`, a directory with
/// neither reflink nor `qemu-img` (found through `PATH`) runs in raw full-copy mode, with one
/// warning naming what would give copy-on-write snapshots.
pub async fn open(backend_name: &str, cfg: FileConfig) -> Result<FileDriver> {
    let name = backend_name.to_string();
    let backend = tokio::task::spawn_blocking(move || FileBackend::open(name, cfg))
        .await
        .map_err(|e| Error::backend("open file backend", format!("worker failed: {e}")))??;
    tracing::info!(
        backend = %backend.name,
        dir = %backend.dir.display(),
        mode = backend.mode.as_str(),
        "file backend opened"
    );
    Ok(kiln_core::Blocking::new(backend_name, backend))
}

impl FileBackend {
    /// [`open`] without the runtime: blocks while it probes the directory and `qemu-img`.
    pub fn open(backend_name: impl Into<String>, cfg: FileConfig) -> Result<FileBackend> {
        open_blocking(backend_name.into(), cfg)
    }

    /// The mode this backend runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The backend directory (absolute).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file a hypervisor should open for volume `v` right now: the raw file, or the
    /// active qcow2 layer (which changes with every snapshot and revert), as
    /// [`BlockingDriver::connection_info`] reports it but without checking that the file
    /// exists. qcow2: reads the volume's record under its flock, so it blocks while another
    /// operation on the volume runs; `NotFound` when the volume has no record.
    pub fn active_image(&self, v: &Volume) -> Result<PathBuf> {
        match self.mode {
            Mode::Qcow2 => qcow2::active_layer(self, v),
            _ => Ok(raw::volume_path(&self.dir, &v.id)),
        }
    }
}

fn open_blocking(name: String, cfg: FileConfig) -> Result<Backend> {
    let wanted = &cfg.path;
    std::fs::create_dir_all(wanted).map_err(|e| {
        Error::config(format!(
            "backend {name}: cannot create directory {}: {e}",
            wanted.display()
        ))
    })?;
    let dir = std::fs::canonicalize(wanted).map_err(|e| {
        Error::config(format!(
            "backend {name}: cannot resolve {}: {e}",
            wanted.display()
        ))
    })?;
    if !dir.is_dir() {
        return Err(Error::config(format!(
            "backend {name}: {} is not a directory",
            dir.display()
        )));
    }
    let marker_path = dir.join(MARKER_FILE);
    let recorded = match sys::read_small(&marker_path) {
        Ok(b) => Some(serde_json::from_slice::<Marker>(&b).map_err(|e| {
            Error::config(format!(
                "backend {name}: {} is corrupt: {e}",
                marker_path.display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("read {}", marker_path.display()), e)),
    };
    let raw_mode = |dir: &Path| -> Result<Mode> {
        match probe_reflink(dir)? {
            None => Ok(Mode::RawReflink),
            Some(_) if cfg.allow_full_copy => Ok(Mode::RawFullCopy),
            Some(why) => Err(Error::config(format!(
                "backend {name}: format = \"raw\" needs a filesystem with reflink (XFS with \
                 reflink=1, btrfs) but {} does not support it ({why}); put the directory on \
                 such a filesystem, set format = \"qcow2\", or set allow_full_copy = true to \
                 accept full-copy snapshots (slow, no online snapshots)",
                dir.display()
            ))),
        }
    };
    let recorded_format = recorded.as_ref().map(|m| m.format.as_str());
    let recorded_full_copy = recorded.as_ref().is_some_and(|m| m.full_copy);
    let dev = device_of(&dir)?;
    let reflink_proven = recorded.as_ref().and_then(|m| m.reflink_dev) == Some(dev);
    let mode = match (cfg.format, recorded_format) {
        // `auto` settled on full copies here before: keep them (the volumes are raw files;
        // a reflink filesystem or qemu-img appearing later does not change what they are).
        (Format::Auto, Some("raw")) if recorded_full_copy => match probe_reflink(&dir)? {
            None => Mode::RawReflink,
            Some(_) => {
                tracing::info!(backend = %name, dir = %dir.display(), "raw full-copy mode, as recorded in {MARKER_FILE}");
                Mode::RawFullCopy
            }
        },
        (Format::Raw, _) | (Format::Auto, Some("raw")) if reflink_proven => Mode::RawReflink,
        (Format::Raw, _) | (Format::Auto, Some("raw")) => raw_mode(&dir)?,
        (Format::Qcow2, _) | (Format::Auto, Some("qcow2")) => Mode::Qcow2,
        (Format::Auto, None) => match probe_reflink(&dir)? {
            None => Mode::RawReflink,
            Some(why) if qcow2::qemu_img_installed() => {
                tracing::info!(backend = %name, dir = %dir.display(), %why, "no reflink: using qcow2");
                Mode::Qcow2
            }
            Some(why) => {
                // The embedded default backend must work on a machine with only Rust
                // installed: full copies are slow but correct.
                tracing::warn!(
                    backend = %name,
                    dir = %dir.display(),
                    "{} has no reflink ({why}) and qemu-img is not installed: snapshots are \
                     full copies; install {QEMU_PACKAGE} (or use a reflink filesystem such as \
                     XFS) for copy-on-write snapshots",
                    dir.display()
                );
                Mode::RawFullCopy
            }
        },
        (Format::Auto, Some(other)) => {
            return Err(Error::config(format!(
                "backend {name}: {} records unknown format {other:?}",
                marker_path.display()
            )));
        }
    };
    // Record where reflink was proven, so the next open can skip the probe.
    let prove = mode == Mode::RawReflink && !reflink_proven;
    match recorded_format {
        Some(f) if f != mode.format_name() => {
            return Err(Error::config(format!(
                "backend {name}: {} already holds {f} volumes (see {}); it cannot be opened as {}",
                dir.display(),
                marker_path.display(),
                mode.format_name()
            )));
        }
        Some(_) if !prove => {}
        _ => {
            let m = Marker {
                format: mode.format_name().to_string(),
                full_copy: match &recorded {
                    Some(r) => r.full_copy,
                    None => cfg.format == Format::Auto && mode == Mode::RawFullCopy,
                },
                reflink_dev: (mode == Mode::RawReflink).then_some(dev),
            };
            let bytes = serde_json::to_vec_pretty(&m)
                .map_err(|e| Error::backend("write marker", e.to_string()))?;
            sys::atomic_write(&marker_path, &bytes).map_err(|e| {
                Error::config(format!("backend {name}: directory is not writable: {e}"))
            })?;
        }
    }
    if mode == Mode::Qcow2 {
        let version = qcow2::probe(&dir)?;
        tracing::debug!(backend = %name, %version, "qemu-img found");
        qcow2::remove_stale_reader_files(&dir)?;
    }
    Ok(Backend { name, dir, mode })
}

/// Reflinks a scratch file inside `dir`. `Ok(None)`: reflink works; `Ok(Some(why))`: the
/// filesystem refuses it; `Err`: the directory itself is unusable (not writable, ...).
fn probe_reflink(dir: &Path) -> Result<Option<String>> {
    use std::io::Write;
    let stem = format!(
        ".reflink-probe-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    );
    let src = dir.join(format!("{stem}.src"));
    let dst = dir.join(format!("{stem}.dst"));
    let made = std::fs::File::create(&src)
        .and_then(|mut f| f.write_all(&[0x5a; 65536]).and_then(|_| f.sync_all()));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&src);
        return Err(Error::config(format!(
            "{} is not writable: {e}",
            dir.display()
        )));
    }
    let cloned = sys::reflink(&src, &dst);
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    Ok(cloned.err().map(|e| format!("FICLONE failed: {e}")))
}

/// The QMP monitor of the hypervisor that has attached qcow2 volume `v` open, or why it
/// cannot be snapshotted while attached.
fn qmp_of<'a>(v: &Volume, a: &'a Attachment) -> Result<&'a str> {
    a.qmp.as_deref().ok_or_else(|| {
        Error::unsupported(format!(
            "volume {} is attached to instance {}, which has no QMP monitor: a qcow2 file in \
             use may only be switched to a new overlay by its hypervisor; record the \
             hypervisor's monitor (`instance create --qmp`), or detach the volume",
            v.id, a.instance_id
        ))
    })
}

impl BlockingDriver for FileBackend {
    fn capabilities(&self) -> Capabilities {
        match self.mode {
            Mode::RawReflink => Capabilities {
                thin: true,
                online_snapshot: true,
                hypervisor_snapshot: false,
                revert_any: true,
                clone: true,
                clone_cow: true,
                // Snapshots share unchanged blocks; FIEMAP tells which.
                diff: true,
                group_snapshot: false,
                snapshot_method: "reflink (FICLONE)".into(),
            },
            Mode::RawFullCopy => Capabilities {
                thin: false,
                online_snapshot: false,
                hypervisor_snapshot: false,
                revert_any: true,
                clone: true,
                clone_cow: false,
                diff: false,
                group_snapshot: false,
                snapshot_method: "full sparse copy (no reflink on this filesystem)".into(),
            },
            // Attached volumes are snapshotted by their hypervisor, through its QMP monitor
            // (an instance's --qmp); all the attached members of a group that one monitor
            // serves switch in one QMP transaction.
            Mode::Qcow2 => Capabilities {
                thin: true,
                online_snapshot: false,
                hypervisor_snapshot: true,
                revert_any: true,
                clone: true,
                clone_cow: false,
                // The layers between two snapshots hold exactly what changed.
                diff: true,
                group_snapshot: true,
                snapshot_method: "qcow2 external overlay (qemu-img create -b)".into(),
            },
        }
    }

    fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        match self.mode {
            Mode::Qcow2 => qcow2::create_volume(self, v),
            _ => raw::create_volume(self, v),
        }
    }

    fn delete_volume(&self, v: &Volume) -> Result<DeleteAction> {
        match self.mode {
            Mode::Qcow2 => qcow2::delete_volume(self, v),
            _ => raw::delete_volume(self, v),
        }
    }

    fn lookup_volume(&self, v: &Volume) -> Result<Option<ProviderUpdate>> {
        match self.mode {
            Mode::Qcow2 => qcow2::lookup_volume(self, v),
            _ => raw::lookup_volume(self, v),
        }
    }

    fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        match self.mode {
            Mode::Qcow2 => qcow2::create_snapshot(self, s, v),
            _ => raw::create_snapshot(self, s, v),
        }
    }

    fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        match self.mode {
            // FICLONE locks both inodes and flushes the source: a point-in-time image even
            // while another process writes.
            Mode::RawReflink => {
                tracing::debug!(snapshot = %s.id, volume = %v.id, instance = %a.instance_id, "online snapshot by reflink");
                raw::create_snapshot(self, s, v)
            }
            Mode::RawFullCopy => Err(Error::unsupported(format!(
                "backend {} makes snapshots by full copy (no reflink), which is not atomic \
                 against a writer; detach volume {} or move the backend to a reflink filesystem",
                self.name, v.id
            ))),
            Mode::Qcow2 => {
                let qmp = qmp_of(v, a)?;
                let member: qcow2::OnlineMember<'_> = (s, v, a);
                qcow2::create_online_snapshots(self, qmp, &[member])
                    .pop()
                    .unwrap_or_else(|| Err(Error::backend("online snapshot", "no result")))
            }
        }
    }

    /// qcow2: detached members are snapshotted one by one (nothing writes them); the attached
    /// ones switch in one QMP transaction per hypervisor monitor, so all the attached volumes
    /// of one instance are cut at one instant. Other modes take their members one by one.
    fn create_group_snapshot(
        &self,
        members: &[kiln_core::GroupMember],
    ) -> Result<kiln_core::GroupOutcome> {
        if self.mode != Mode::Qcow2 {
            return Ok(members
                .iter()
                .map(|(s, v, a)| match a {
                    Some(a) => self.create_snapshot_force(s, v, a),
                    None => self.create_snapshot(s, v),
                })
                .collect());
        }
        let mut out: Vec<Option<Result<ProviderUpdate>>> = members.iter().map(|_| None).collect();
        let mut by_monitor: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (i, (s, v, a)) in members.iter().enumerate() {
            match a {
                None => out[i] = Some(self.create_snapshot(s, v)),
                Some(a) => match qmp_of(v, a) {
                    Ok(q) => by_monitor.entry(q).or_default().push(i),
                    Err(e) => out[i] = Some(Err(e)),
                },
            }
        }
        for (qmp, idx) in by_monitor {
            let group: Vec<qcow2::OnlineMember<'_>> = idx
                .iter()
                .filter_map(|&i| {
                    let (s, v, a) = &members[i];
                    a.as_ref().map(|a| (s, v, a))
                })
                .collect();
            for (i, r) in idx
                .iter()
                .zip(qcow2::create_online_snapshots(self, qmp, &group))
            {
                out[*i] = Some(r);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::backend("group snapshot", "no result"))))
            .collect())
    }

    fn delete_snapshot(&self, s: &Snapshot) -> Result<DeleteAction> {
        self.delete_snapshot_with_progress(s, kiln_core::no_progress())
    }

    /// qcow2: a snapshot of a volume the hypervisor has open is merged by its block job,
    /// whose progress (bytes) goes to `progress`.
    fn delete_snapshot_with_progress(
        &self,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<DeleteAction> {
        match self.mode {
            Mode::Qcow2 => qcow2::delete_snapshot(self, s, progress),
            _ => raw::delete_snapshot(self, s),
        }
    }

    fn lookup_snapshot(&self, s: &Snapshot) -> Result<Option<ProviderUpdate>> {
        match self.mode {
            Mode::Qcow2 => qcow2::lookup_snapshot(self, s),
            _ => raw::lookup_snapshot(self, s),
        }
    }

    fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        match self.mode {
            Mode::Qcow2 => qcow2::create_volume_from_snapshot(self, v, s, &progress),
            _ => raw::create_volume_from_snapshot(self, v, s, &progress),
        }
    }

    fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<kiln_core::RevertOutcome> {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        match self.mode {
            Mode::Qcow2 => qcow2::revert_to_snapshot(self, v, s),
            _ => raw::revert_to_snapshot(self, v, s, &progress),
        }?;
        // A file revert never touches another snapshot's file.
        Ok(kiln_core::RevertOutcome::default())
    }

    fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        match self.mode {
            Mode::Qcow2 => qcow2::open_snapshot_reader(self, s),
            _ => raw::open_snapshot_reader(self, s),
        }
    }

    fn open_volume_writer(&self, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
        match self.mode {
            Mode::Qcow2 => qcow2::open_volume_writer(self, v),
            _ => raw::open_volume_writer(self, v),
        }
    }

    fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        kiln_core::driver::same_volume(from, to)?;
        match self.mode {
            Mode::Qcow2 => qcow2::diff_snapshots(self, from, to),
            Mode::RawReflink => raw::diff_snapshots(self, from, to),
            // Full copies share no blocks: only their data can tell.
            Mode::RawFullCopy => Ok(SnapshotDelta::Untracked),
        }
    }

    fn stats(&self) -> Result<BackendStats> {
        let (total, free) = sys::statvfs(&self.dir)?;
        let mut details = std::collections::BTreeMap::new();
        details.insert("mode".to_string(), serde_json::json!(self.mode.as_str()));
        details.insert(
            "path".to_string(),
            serde_json::json!(self.dir.display().to_string()),
        );
        if self.mode == Mode::Qcow2 {
            details.insert(
                "max_chain_depth".to_string(),
                serde_json::json!(MAX_CHAIN_DEPTH),
            );
        }
        Ok(BackendStats {
            total_bytes: Some(total),
            free_bytes: Some(free),
            details,
        })
    }

    fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        match self.mode {
            Mode::Qcow2 => qcow2::snapshot_health(self, s),
            // A raw snapshot is one self-contained file: present (healthy) or absent.
            _ => Ok(None),
        }
    }

    /// `{"driver_volume_type": "file", "data": {"path": <image>, "format": "raw"|"qcow2"}}`:
    /// the raw volume file, or the qcow2 volume's active layer (not `chain.json`: that is
    /// kiln's record, not an image), which a snapshot or revert replaces, so callers ask
    /// again after either. `NotFound` when the volume does not exist; a qcow2 record naming
    /// an active layer that is missing is a backend error (the volume check reports it).
    fn connection_info(&self, v: &Volume) -> Result<ConnectionInfo> {
        let image = self.active_image(v)?;
        if !sys::exists(&image)? {
            return Err(match self.mode {
                Mode::Qcow2 => Error::backend(
                    "connection info",
                    format!(
                        "the record of volume {} names active layer {}, which does not exist; \
                         run the volume check",
                        v.id,
                        image.display()
                    ),
                ),
                _ => Error::not_found("volume", v.id),
            });
        }
        // A lossy rendering would hand the hypervisor a path that names another file.
        let path = image.to_str().ok_or_else(|| {
            Error::backend(
                "connection info",
                format!("{} is not valid UTF-8", image.display()),
            )
        })?;
        let mut data = serde_json::Map::new();
        data.insert("path".into(), serde_json::json!(path));
        data.insert("format".into(), serde_json::json!(self.mode.format_name()));
        Ok(ConnectionInfo {
            driver_volume_type: "file".into(),
            data,
        })
    }

    fn bench(self: Arc<Self>) -> Option<Arc<dyn BenchPrimitives>> {
        Some(self)
    }

    fn check(self: Arc<Self>) -> Option<Arc<dyn VolumeCheck>> {
        Some(self)
    }

    fn windowed(self: Arc<Self>) -> Option<Arc<dyn kiln_core::WindowedSnapshots>> {
        // Only a reflink is a cut in itself; a full copy or a qcow2 overlay is not.
        (self.mode == Mode::RawReflink).then_some(self as Arc<dyn kiln_core::WindowedSnapshots>)
    }
}

impl kiln_core::WindowedSnapshots for FileBackend {
    /// FICLONE of each volume into its snapshot's temp name, nothing more.
    fn cut(&self, members: &[kiln_core::GroupMember]) -> Vec<Result<()>> {
        members
            .iter()
            .map(|(s, v, _)| raw::cut_snapshot(self, s, v))
            .collect()
    }

    /// fsync and rename of each cut, then one directory fsync for all of them.
    fn finish(&self, members: &[kiln_core::GroupMember]) -> Vec<Result<ProviderUpdate>> {
        raw::finish_snapshots(self, members)
    }
}

impl BenchPrimitives for FileBackend {
    /// Raw: one bare FICLONE (or sparse copy) of the volume into a temp name and its unlink;
    /// qcow2: one bare `qemu-img create -b` overlay and its unlink.
    fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        match self.mode {
            Mode::Qcow2 => qcow2::bench_primitives(self, v),
            _ => raw::bench_primitives(self, v),
        }
    }
}

impl VolumeCheck for FileBackend {
    /// qcow2: compares the volume's chain record with every file's qcow2 header (missing,
    /// extra and stray files, backing file, format, pending deletes); `repair` updates the
    /// record to what the headers prove, finishes pending deletes and removes leftovers that
    /// nothing references. Raw: the volume's file exists; `repair` removes its stale temp
    /// files.
    fn check_volume(&self, v: &Volume, repair: bool) -> Result<CheckReport> {
        match self.mode {
            Mode::Qcow2 => qcow2::check::check_volume(self, v, repair),
            _ => raw::check_volume(self, v, repair),
        }
    }
}
