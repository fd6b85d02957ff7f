//! The directory backup target (`dir:PATH`): each backup is one directory holding its diff
//! stream cut into chunk files and a manifest with every chunk's SHA-256.
//!
//! A backup is written under a hidden partial name and renamed into place only after every
//! chunk and the manifest are durable, so a backup on the target is either whole or absent
//! (never half-visible). Chunks are read whole and checked before their bytes are handed
//! out, so a damaged chunk is never applied.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use super::chunk_reader::ChunkReader;
use crate::error::{Error, Result};
use crate::types::BackupId;

/// Bytes per chunk file.
pub const CHUNK_BYTES: usize = 16 << 20;
/// The manifest's format tag.
pub const FORMAT: &str = "kiln-backup v1";
const MANIFEST: &str = "manifest.json";

/// One chunk file of a backup's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// File name inside the backup's directory.
    pub file: String,
    /// Its length.
    pub bytes: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// What a backup directory holds, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The backup.
    pub backup_id: String,
    /// The volume it was taken of.
    pub volume_id: String,
    /// The snapshot it was read from (the stream's end snapshot).
    pub snapshot_id: String,
    /// The backup it builds on.
    pub parent_id: Option<String>,
    /// The snapshot its stream starts from (the parent's snapshot).
    pub from_snapshot_id: Option<String>,
    /// The volume's size.
    pub size_bytes: u64,
    /// Length of the whole stream.
    pub stream_bytes: u64,
    /// The chunk files, in stream order.
    pub chunks: Vec<Chunk>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

/// A directory that holds backups.
#[derive(Debug, Clone)]
pub struct DirTarget {
    root: PathBuf,
}

fn io_at(what: &str, p: &Path) -> impl FnOnce(io::Error) -> Error {
    let ctx = format!("{what} {}", p.display());
    move |e| Error::io(ctx, e)
}

fn fsync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .map_err(io_at("fsync", p))
}

impl DirTarget {
    /// The target at `root`, which must be an existing directory kiln can write (checked
    /// now, so a bad target is refused before anything is done).
    pub fn open(root: &Path) -> Result<DirTarget> {
        let meta = fs::metadata(root).map_err(|e| {
            Error::invalid(
                "target",
                format!("dir:{}: {}", root.display(), io::Error::from(e.kind())),
            )
        })?;
        if !meta.is_dir() {
            return Err(Error::invalid(
                "target",
                format!("dir:{} is not a directory", root.display()),
            ));
        }
        // Permission bits do not tell (root, ACLs, read-only mounts): try.
        let probe = root.join(format!(".kiln-probe-{}", uuid::Uuid::new_v4()));
        match File::create_new(&probe) {
            Ok(_) => {
                let _ = fs::remove_file(&probe);
            }
            Err(e) => {
                return Err(Error::invalid(
                    "target",
                    format!("dir:{} is not writable: {e}", root.display()),
                ));
            }
        }
        Ok(DirTarget {
            root: root.to_path_buf(),
        })
    }

    /// The target at `root` for reading and deleting (no write probe).
    pub fn at(root: &Path) -> DirTarget {
        DirTarget {
            root: root.to_path_buf(),
        }
    }

    /// Where backup `id` lives once complete.
    pub fn path(&self, id: BackupId) -> PathBuf {
        self.root.join(format!("kiln-backup-{id}"))
    }

    fn partial(&self, id: BackupId) -> PathBuf {
        self.root.join(format!(".kiln-backup-{id}.partial"))
    }

    fn deleting(&self, id: BackupId) -> PathBuf {
        self.root.join(format!(".kiln-backup-{id}.deleting"))
    }

    /// Starts writing backup `id` (under its partial name; an older partial is replaced).
    pub fn create(&self, id: BackupId) -> Result<ChunkWriter> {
        let dir = self.partial(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_at("remove", &dir))?;
        }
        fs::create_dir(&dir).map_err(io_at("create", &dir))?;
        Ok(ChunkWriter::start(dir))
    }

    /// Makes a finished backup visible: writes its manifest, then renames its directory into
    /// place, each step durable. Returns the bytes it occupies.
    pub fn commit(&self, id: BackupId, manifest: &Manifest) -> Result<u64> {
        let dir = self.partial(id);
        let body = serde_json::to_vec_pretty(manifest)
            .map_err(|e| Error::backend("write manifest", e.to_string()))?;
        let path = dir.join(MANIFEST);
        let mut f = File::create_new(&path).map_err(io_at("create", &path))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(io_at("write", &path))?;
        fsync_dir(&dir)?;
        crate::crash::crash_point("backup_create", "before_rename");
        let final_dir = self.path(id);
        fs::rename(&dir, &final_dir).map_err(io_at("rename", &dir))?;
        fsync_dir(&self.root)?;
        Ok(manifest.chunks.iter().map(|c| c.bytes).sum::<u64>() + body.len() as u64)
    }

    /// Removes whatever an unfinished write of backup `id` left.
    pub fn abandon(&self, id: BackupId) -> Result<()> {
        let dir = self.partial(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_at("remove", &dir))?;
        }
        Ok(())
    }

    /// Removes backup `id` (first renamed out of sight, so a crash never leaves a visible
    /// half-removed backup); removing one that is gone succeeds.
    pub fn delete(&self, id: BackupId) -> Result<()> {
        let (dir, gone) = (self.path(id), self.deleting(id));
        if dir.exists() {
            fs::rename(&dir, &gone).map_err(io_at("rename", &dir))?;
            fsync_dir(&self.root)?;
        }
        if gone.exists() {
            fs::remove_dir_all(&gone).map_err(io_at("remove", &gone))?;
        }
        self.abandon(id)
    }

    /// Backup `id`'s manifest, checked against what the record says it is.
    pub fn manifest(&self, id: BackupId) -> Result<Manifest> {
        let path = self.path(id).join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| {
            Error::backend(
                "read backup",
                format!("backup {id}: cannot read {}: {e}", path.display()),
            )
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::backend(
                "read backup",
                format!(
                    "backup {id}: {} is not a kiln manifest: {e}",
                    path.display()
                ),
            )
        })?;
        if m.format != FORMAT || m.backup_id != id.to_string() {
            return Err(Error::backend(
                "read backup",
                format!(
                    "backup {id}: {} describes {:?} of format {:?}",
                    path.display(),
                    m.backup_id,
                    m.format
                ),
            ));
        }
        Ok(m)
    }

    /// Reads backup `id`'s stream, checking each chunk before handing out its bytes.
    pub fn reader(&self, id: BackupId, manifest: &Manifest) -> ChunkReader {
        ChunkReader::start(self.path(id), id, manifest.chunks.clone())
    }
}

/// Writes a stream into chunk files. The caller's thread only gathers bytes; a worker
/// thread hashes and writes each full chunk (so reading the source overlaps with hashing and
/// writing) and starts its writeback at once; every chunk is fsynced once at the end.
pub struct ChunkWriter {
    dir: PathBuf,
    buf: Vec<u8>,
    bytes: u64,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Chunk buffers the worker is done with, reused so that each chunk does not fault in
    /// 16 MiB of fresh memory.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    worker: Option<std::thread::JoinHandle<io::Result<Vec<Chunk>>>>,
}

/// Chunks queued between the gathering thread and the worker (memory: this many plus two
/// chunks).
const QUEUED_CHUNKS: usize = 2;

impl ChunkWriter {
    fn start(dir: PathBuf) -> ChunkWriter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED_CHUNKS);
        let (spare_tx, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let wdir = dir.clone();
        let worker = std::thread::spawn(move || -> io::Result<Vec<Chunk>> {
            let mut chunks = Vec::new();
            let mut files = Vec::new();
            for data in rx {
                let name = format!("stream.{:06}", chunks.len());
                let mut f = File::create_new(wdir.join(&name))?;
                f.write_all(&data)?;
                crate::writeback::start(&f, 0, 0);
                chunks.push(Chunk {
                    file: name,
                    bytes: data.len() as u64,
                    sha256: hex::encode(Sha256::digest(&data)),
                });
                files.push(f);
                // The gatherer may have finished: then the buffer is simply freed.
                let _ = spare_tx.send(data);
            }
            // Writeback has run behind the writes: these mostly wait for the last chunks.
            for f in &files {
                f.sync_all()?;
            }
            Ok(chunks)
        });
        ChunkWriter {
            dir,
            buf: Vec::with_capacity(CHUNK_BYTES),
            bytes: 0,
            tx: Some(tx),
            spare,
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let next = match self.spare.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => Vec::with_capacity(CHUNK_BYTES),
        };
        let full = std::mem::replace(&mut self.buf, next);
        match &self.tx {
            Some(tx) if tx.send(full).is_ok() => Ok(()),
            // The worker stopped: its error comes out of `finish`.
            _ => Err(io::Error::other("the chunk writer stopped")),
        }
    }

    /// Writes the last chunk and waits for every chunk to be durable; returns the chunks and
    /// the stream's length.
    pub fn finish(mut self) -> Result<(Vec<Chunk>, u64)> {
        let sent = if self.buf.is_empty() {
            Ok(())
        } else {
            self.send()
        };
        self.tx = None;
        let joined = match self.worker.take() {
            Some(w) => w
                .join()
                .map_err(|_| io::Error::other("the chunk writer panicked"))
                .and_then(|r| r),
            None => Err(io::Error::other("the chunk writer is gone")),
        };
        let chunks = joined.map_err(io_at("write", &self.dir))?;
        sent.map_err(io_at("write", &self.dir))?;
        Ok((chunks, self.bytes))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&buf[..take]);
        self.bytes += take as u64;
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        // Unfinished: stop the worker and wait for it, so no thread writes into a directory
        // the caller is about to remove.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn manifest(id: BackupId, chunks: Vec<Chunk>, bytes: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            backup_id: id.to_string(),
            volume_id: "v".into(),
            snapshot_id: "s".into(),
            parent_id: None,
            from_snapshot_id: None,
            size_bytes: 1,
            stream_bytes: bytes,
            chunks,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_backup_is_invisible_until_committed_and_reads_back_checked() {
        let root = tempfile::tempdir().unwrap();
        let t = DirTarget::open(root.path()).unwrap();
        let id = BackupId::new();
        let data: Vec<u8> = (0..CHUNK_BYTES * 2 + 123)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut w = t.create(id).unwrap();
        w.write_all(&data).unwrap();
        let (chunks, bytes) = w.finish().unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(bytes, data.len() as u64);
        assert!(!t.path(id).exists(), "visible before its manifest");
        let m = manifest(id, chunks, bytes);
        let stored = t.commit(id, &m).unwrap();
        assert!(stored > bytes);
        assert_eq!(t.manifest(id).unwrap(), m);
        let mut back = Vec::new();
        t.reader(id, &m).read_to_end(&mut back).unwrap();
        assert!(back == data);

        // One byte changed in the second chunk: reading fails naming it, after handing out
        // only the first chunk's bytes.
        let p = t.path(id).join("stream.000001");
        let mut c = fs::read(&p).unwrap();
        c[10] ^= 1;
        fs::write(&p, c).unwrap();
        let mut r = t.reader(id, &m);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert!(e.to_string().contains("stream.000001"), "{e}");
        assert_eq!(got.len(), CHUNK_BYTES);

        t.delete(id).unwrap();
        assert!(!t.path(id).exists());
        t.delete(id).unwrap();
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_or_unwritable_directory_is_refused() {
        assert!(DirTarget::open(Path::new("/nonexistent/kiln")).is_err());
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = DirTarget::open(f.path()).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
