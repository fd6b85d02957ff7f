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
//! reflink, else qcow2. The choice is recorded in the directory (`kiln-file-backend.json`) so
//! a backend never reinterprets existing volumes in the other format.

#![warn(missing_docs)]

mod config;
mod qcow2;
mod raw;
mod reader;
mod sys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kiln_core::{
    Attachment, BackendStats, Capabilities, Error, PrimitiveSample, ProgressHandle, ProviderUpdate,
    Result, Snapshot, SnapshotReader, Volume, VolumeDriver,
};
use serde::{Deserialize, Serialize};

pub use config::{FileConfig, Format, Mode};
pub use qcow2::chain::MAX_CHAIN_DEPTH;

/// Name of the marker file recording a backend directory's format.
const MARKER_FILE: &str = "kiln-file-backend.json";

/// What a backend directory records about itself.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// "raw" or "qcow2".
    format: String,
}

/// Shared state of an opened backend, handed to the blocking workers.
pub(crate) struct Backend {
    /// Configured backend name (for logs and messages).
    pub(crate) name: String,
    /// Absolute, canonical backend directory.
    pub(crate) dir: PathBuf,
    /// The mode in use.
    pub(crate) mode: Mode,
}

/// The file backend driver. Cheap to clone; every operation runs its file I/O and `qemu-img`
/// calls on tokio's blocking pool.
#[derive(Clone)]
pub struct FileDriver {
    inner: Arc<Backend>,
}

impl std::fmt::Debug for FileDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDriver")
            .field("name", &self.inner.name)
            .field("dir", &self.inner.dir)
            .field("mode", &self.inner.mode)
            .finish()
    }
}

impl FileDriver {
    /// Opens (creating the directory if missing) and validates a file backend: decides the
    /// mode, probes reflink by cloning a scratch file in the directory, checks `qemu-img` in
    /// qcow2 mode. Fails with [`Error::Config`] and a message saying what to change when the
    /// configuration cannot work (e.g. `format = "raw"` on a filesystem without reflink and
    /// without `allow_full_copy`), or when the directory already holds the other format.
    pub async fn open(backend_name: &str, cfg: FileConfig) -> Result<FileDriver> {
        let name = backend_name.to_string();
        let backend = tokio::task::spawn_blocking(move || open_blocking(name, cfg))
            .await
            .map_err(|e| Error::backend("open file backend", format!("worker failed: {e}")))??;
        tracing::info!(
            backend = %backend.name,
            dir = %backend.dir.display(),
            mode = backend.mode.as_str(),
            "file backend opened"
        );
        Ok(FileDriver {
            inner: Arc::new(backend),
        })
    }

    /// The mode this backend runs in.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// The backend directory (absolute).
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// The file a hypervisor should open for volume `v` right now: the raw file, or the
    /// active qcow2 overlay (which changes with every snapshot and revert).
    pub async fn active_image(&self, v: &Volume) -> Result<PathBuf> {
        let v = v.clone();
        self.run("active_image", tracing::Span::current(), move |b| {
            match b.mode {
                Mode::Qcow2 => {
                    let dir = qcow2::volume_dir(&b.dir, &v.id);
                    let chain =
                        qcow2::chain::Chain::load(&dir)?.ok_or_else(|| Error::NotFound {
                            what: "volume",
                            id: v.id.to_string(),
                        })?;
                    Ok(dir.join(chain.active))
                }
                _ => Ok(raw::volume_path(&b.dir, &v.id)),
            }
        })
        .await
    }

    /// Runs `f` on the blocking pool inside `span`, logging its outcome and elapsed time.
    async fn run<T, F>(&self, op: &'static str, span: tracing::Span, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Backend) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let start = Instant::now();
            let r = f(&inner);
            let elapsed_ms = start.elapsed().as_millis() as u64;
            match &r {
                Ok(_) => tracing::info!(op, elapsed_ms, "done"),
                Err(e) => tracing::warn!(op, elapsed_ms, error = %e, "failed"),
            }
            r
        })
        .await
        .map_err(|e| Error::backend(op, format!("worker failed: {e}")))?
    }

    fn span(&self, op: &'static str) -> tracing::Span {
        tracing::info_span!("file", backend = %self.inner.name, op)
    }
}

fn open_blocking(name: String, cfg: FileConfig) -> Result<Backend> {
    let wanted = &cfg.path;
    std::fs::create_dir_all(wanted).map_err(|e| {
        Error::Config(format!(
            "backend {name}: cannot create directory {}: {e}",
            wanted.display()
        ))
    })?;
    let dir = std::fs::canonicalize(wanted).map_err(|e| {
        Error::Config(format!(
            "backend {name}: cannot resolve {}: {e}",
            wanted.display()
        ))
    })?;
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "backend {name}: {} is not a directory",
            dir.display()
        )));
    }
    let marker_path = dir.join(MARKER_FILE);
    let recorded = match sys::read_small(&marker_path) {
        Ok(b) => Some(
            serde_json::from_slice::<Marker>(&b)
                .map_err(|e| {
                    Error::Config(format!(
                        "backend {name}: {} is corrupt: {e}",
                        marker_path.display()
                    ))
                })?
                .format,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("read {}", marker_path.display()), e)),
    };
    let raw_mode = |dir: &Path| -> Result<Mode> {
        match probe_reflink(dir)? {
            None => Ok(Mode::RawReflink),
            Some(_) if cfg.allow_full_copy => Ok(Mode::RawFullCopy),
            Some(why) => Err(Error::Config(format!(
                "backend {name}: format = \"raw\" needs a filesystem with reflink (XFS with \
                 reflink=1, btrfs) but {} does not support it ({why}); put the directory on \
                 such a filesystem, set format = \"qcow2\", or set allow_full_copy = true to \
                 accept full-copy snapshots (slow, no online snapshots)",
                dir.display()
            ))),
        }
    };
    let mode = match (cfg.format, recorded.as_deref()) {
        (Format::Raw, _) | (Format::Auto, Some("raw")) => raw_mode(&dir)?,
        (Format::Qcow2, _) | (Format::Auto, Some("qcow2")) => Mode::Qcow2,
        (Format::Auto, None) => match probe_reflink(&dir)? {
            None => Mode::RawReflink,
            Some(why) => {
                tracing::info!(backend = %name, dir = %dir.display(), %why, "no reflink: using qcow2");
                Mode::Qcow2
            }
        },
        (Format::Auto, Some(other)) => {
            return Err(Error::Config(format!(
                "backend {name}: {} records unknown format {other:?}",
                marker_path.display()
            )));
        }
    };
    match recorded {
        Some(f) if f != mode.format_name() => {
            return Err(Error::Config(format!(
                "backend {name}: {} already holds {f} volumes (see {}); it cannot be opened as {}",
                dir.display(),
                marker_path.display(),
                mode.format_name()
            )));
        }
        Some(_) => {}
        None => {
            let m = Marker {
                format: mode.format_name().to_string(),
            };
            let bytes = serde_json::to_vec_pretty(&m)
                .map_err(|e| Error::backend("write marker", e.to_string()))?;
            sys::atomic_write(&marker_path, &bytes).map_err(|e| {
                Error::Config(format!("backend {name}: directory is not writable: {e}"))
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
        return Err(Error::Config(format!(
            "{} is not writable: {e}",
            dir.display()
        )));
    }
    let cloned = sys::reflink(&src, &dst);
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    Ok(cloned.err().map(|e| format!("FICLONE failed: {e}")))
}

#[async_trait]
impl VolumeDriver for FileDriver {
    fn capabilities(&self) -> Capabilities {
        match self.inner.mode {
            Mode::RawReflink => Capabilities {
                thin: true,
                online_snapshot: true,
                revert_any: true,
                clone: true,
                clone_cow: true,
                diff: false,
                group_snapshot: false,
                snapshot_method: "reflink (FICLONE)".into(),
            },
            Mode::RawFullCopy => Capabilities {
                thin: false,
                online_snapshot: false,
                revert_any: true,
                clone: true,
                clone_cow: false,
                diff: false,
                group_snapshot: false,
                snapshot_method: "full sparse copy (no reflink on this filesystem)".into(),
            },
            Mode::Qcow2 => Capabilities {
                thin: true,
                online_snapshot: false,
                revert_any: true,
                clone: true,
                clone_cow: false,
                diff: false,
                group_snapshot: false,
                snapshot_method: "qcow2 external overlay (qemu-img create -b)".into(),
            },
        }
    }

    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        let v = v.clone();
        let span = tracing::info_span!(parent: &self.span("create_volume"), "volume", id = %v.id, size = v.size_bytes);
        self.run("create_volume", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::create_volume(b, &v),
            _ => raw::create_volume(b, &v),
        })
        .await
    }

    async fn delete_volume(&self, v: &Volume) -> Result<()> {
        let v = v.clone();
        let span = tracing::info_span!(parent: &self.span("delete_volume"), "volume", id = %v.id);
        self.run("delete_volume", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::delete_volume(b, &v),
            _ => raw::delete_volume(b, &v),
        })
        .await
    }

    async fn volume_exists(&self, v: &Volume) -> Result<bool> {
        let v = v.clone();
        let span = tracing::info_span!(parent: &self.span("volume_exists"), "volume", id = %v.id);
        self.run("volume_exists", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::volume_exists(b, &v),
            _ => raw::volume_exists(b, &v),
        })
        .await
    }

    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        let (s, v) = (s.clone(), v.clone());
        let span = tracing::info_span!(parent: &self.span("create_snapshot"), "snapshot", id = %s.id, volume = %v.id);
        self.run("create_snapshot", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::create_snapshot(b, &s, &v),
            _ => raw::create_snapshot(b, &s, &v),
        })
        .await
    }

    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        match self.inner.mode {
            // FICLONE locks both inodes and flushes the source: a point-in-time image even
            // while another process writes.
            Mode::RawReflink => {
                tracing::info!(snapshot = %s.id, volume = %v.id, instance = %a.instance_id, "online snapshot by reflink");
                self.create_snapshot(s, v).await
            }
            Mode::RawFullCopy => Err(Error::Unsupported(format!(
                "backend {} makes snapshots by full copy (no reflink), which is not atomic \
                 against a writer; detach volume {} or move the backend to a reflink filesystem",
                self.inner.name, v.id
            ))),
            Mode::Qcow2 => Err(Error::Unsupported(format!(
                "volume {} is attached to instance {}: a qcow2 snapshot of an attached volume \
                 needs the hypervisor to switch to the new overlay (QMP blockdev-snapshot-sync), \
                 which this backend does not do yet; detach the volume or snapshot it offline",
                v.id, a.instance_id
            ))),
        }
    }

    async fn delete_snapshot(&self, s: &Snapshot) -> Result<()> {
        let s = s.clone();
        let span = tracing::info_span!(parent: &self.span("delete_snapshot"), "snapshot", id = %s.id, volume = %s.volume_id);
        self.run("delete_snapshot", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::delete_snapshot(b, &s),
            _ => raw::delete_snapshot(b, &s),
        })
        .await
    }

    async fn snapshot_exists(&self, s: &Snapshot) -> Result<bool> {
        let s = s.clone();
        let span = tracing::info_span!(parent: &self.span("snapshot_exists"), "snapshot", id = %s.id, volume = %s.volume_id);
        self.run("snapshot_exists", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::snapshot_exists(b, &s),
            _ => raw::snapshot_exists(b, &s),
        })
        .await
    }

    async fn snapshot_health(&self, s: &Snapshot) -> Result<Option<String>> {
        let s = s.clone();
        let span = tracing::info_span!(parent: &self.span("snapshot_health"), "snapshot", id = %s.id, volume = %s.volume_id);
        self.run("snapshot_health", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::snapshot_health(b, &s),
            // A raw snapshot is one self-contained file: present (healthy) or absent.
            _ => Ok(None),
        })
        .await
    }

    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        let (v, s) = (v.clone(), s.clone());
        let span = tracing::info_span!(parent: &self.span("create_volume_from_snapshot"), "volume", id = %v.id, snapshot = %s.id, size = v.size_bytes);
        self.run("create_volume_from_snapshot", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::create_volume_from_snapshot(b, &v, &s, &progress),
            _ => raw::create_volume_from_snapshot(b, &v, &s, &progress),
        })
        .await
    }

    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<()> {
        let (v, s) = (v.clone(), s.clone());
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        let span = tracing::info_span!(parent: &self.span("revert_to_snapshot"), "volume", id = %v.id, snapshot = %s.id);
        self.run("revert_to_snapshot", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::revert_to_snapshot(b, &v, &s),
            _ => raw::revert_to_snapshot(b, &v, &s, &progress),
        })
        .await
    }

    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let s = s.clone();
        let span = tracing::info_span!(parent: &self.span("open_snapshot_reader"), "snapshot", id = %s.id, volume = %s.volume_id);
        self.run("open_snapshot_reader", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::open_snapshot_reader(b, &s),
            _ => raw::open_snapshot_reader(b, &s),
        })
        .await
    }

    async fn stats(&self) -> Result<BackendStats> {
        self.run("stats", self.span("stats"), |b| {
            let (total, free) = sys::statvfs(&b.dir)?;
            let mut details = std::collections::BTreeMap::new();
            details.insert("mode".to_string(), serde_json::json!(b.mode.as_str()));
            details.insert(
                "path".to_string(),
                serde_json::json!(b.dir.display().to_string()),
            );
            if b.mode == Mode::Qcow2 {
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
        })
        .await
    }

    async fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let v = v.clone();
        let span =
            tracing::info_span!(parent: &self.span("bench_primitives"), "volume", id = %v.id);
        self.run("bench_primitives", span, move |b| match b.mode {
            Mode::Qcow2 => qcow2::bench_primitives(b, &v),
            _ => raw::bench_primitives(b, &v),
        })
        .await
    }
}
