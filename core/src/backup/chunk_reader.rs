//! Reading a directory backup's chunk files back, each checked against its SHA-256 before
//! any of its bytes are handed out.
//!
//! Two ways to load a chunk, chosen once per reader:
//!
//! - **Direct** (where the backup is not in the page cache and its filesystem allows
//!   `O_DIRECT`: a backup restored some time after it was made): a loader thread reads
//!   the next chunk file with `O_DIRECT` into one of two aligned buffers while the caller
//!   checks and consumes the current one. The page cache is skipped: no copy out of it, and
//!   no cache pages allocated and evicted for data that is read once. The loader only
//!   issues the reads; the bytes arrive from the device (or the loop driver), so handing a
//!   buffer to the caller does not move cache lines between CPUs, and the caller's SHA-256
//!   and the copy into the volume find the buffer in its own cache. In a one-CPU
//!   user-mode-Linux guest, reading 2 GiB this way took 0.15 s of CPU against 1.1 s
//!   through the page cache (docs/benchmarks.md, "Backups").
//! - **Buffered** (where the backup is in the page cache, e.g. just made, or `O_DIRECT` is
//!   refused): reads on the caller's thread into one reused buffer, with
//!   `POSIX_FADV_WILLNEED` on the next chunk file. Data already in memory is cheapest to
//!   copy from there; `O_DIRECT` would read it from the device again. A thread here would
//!   copy each chunk out of the page cache on another CPU, and every later copy of its
//!   bytes would then miss the cache (measured: it cost more than it overlapped).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::dir::Chunk;
use crate::types::BackupId;

/// Alignment of `O_DIRECT` buffers, offsets and lengths: a page, which covers the 512- and
/// 4096-byte logical blocks of the devices kiln writes backups to.
const ALIGN: usize = 4096;

/// A byte buffer whose data starts at an `ALIGN`-aligned address.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        AlignedBuf {
            raw: Vec::new(),
            off: 0,
            len: 0,
        }
    }

    /// Room for at least `cap` bytes (rounded up to `ALIGN`), aligned; the data is cleared.
    fn space(&mut self, cap: usize) -> &mut [u8] {
        let cap = cap.div_ceil(ALIGN) * ALIGN;
        if self.raw.len().saturating_sub(self.off) < cap {
            self.raw = vec![0; cap + ALIGN];
            self.off = self.raw.as_ptr().align_offset(ALIGN);
        }
        self.len = 0;
        &mut self.raw[self.off..self.off + cap]
    }

    fn data(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

/// How a reader loads its chunk files (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loading {
    /// `O_DIRECT` reads on a loader thread, one chunk ahead.
    Direct,
    /// Buffered reads on the caller's thread, the next file advised ahead.
    Buffered,
}

/// Opens `path` for `O_DIRECT` reading; `None` when the filesystem refuses the flag.
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether most of the file at `path` is in the page cache: `mincore` of a read-only mapping
/// of it, which reads nothing and starts no I/O. Where the kernel will not tell (a file the
/// caller neither owns nor may write), it reports every page resident, and the reader keeps
/// to the page cache, as before `O_DIRECT` was used.
fn cached(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(path) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    // SAFETY: a fresh shared read-only mapping of `len` bytes of an open file; only its
    // residency is queried, nothing is read through it, and it is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: plain query of a system constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(ALIGN);
    let mut pages = vec![0u8; len.div_ceil(page.max(1))];
    // SAFETY: `addr` maps `len` bytes; `pages` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr, len, pages.as_mut_ptr()) };
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(addr, len) };
    rc == 0 && pages.iter().filter(|p| *p & 1 == 1).count() * 2 >= pages.len()
}

/// Reads up to `limit` bytes of `path` into `buf`, with `O_DIRECT` when `direct` and the
/// filesystem takes it (a read it refuses is redone through the page cache from there on).
fn read_file(path: &Path, limit: usize, direct: bool, buf: &mut AlignedBuf) -> io::Result<()> {
    let space = buf.space(limit);
    let mut filled = 0;
    // From where the page cache takes over: at once without O_DIRECT, or where a direct
    // read was refused.
    let mut buffered = true;
    if direct && let Some(f) = open_direct(path)? {
        buffered = false;
        // Whole aligned blocks from aligned offsets; a short read is the end of the file.
        while filled < limit {
            match f.read_at(&mut space[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    if n % ALIGN != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    buffered = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if buffered {
        let f = File::open(path)?;
        while filled < limit {
            match f.read_at(&mut space[filled..limit], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    buf.len = filled.min(limit);
    Ok(())
}

/// Reads chunk `c`'s file in `dir` into `buf`: one byte more than the manifest says, so
/// that a longer file shows up in the check.
fn read_chunk(dir: &Path, c: &Chunk, direct: bool, buf: &mut AlignedBuf) -> io::Result<()> {
    let limit = usize::try_from(c.bytes)
        .ok()
        .and_then(|b| b.checked_add(1))
        .ok_or_else(|| io::Error::other(format!("{} bytes do not fit in memory", c.bytes)))?;
    read_file(&dir.join(&c.file), limit, direct, buf)
}

/// Checks that `data` is chunk `c` of `backup`: its length and SHA-256 as the manifest says.
fn check(backup: BackupId, c: &Chunk, data: &[u8]) -> io::Result<()> {
    let sum = hex::encode(Sha256::digest(data));
    if data.len() as u64 != c.bytes || sum != c.sha256 {
        return Err(io::Error::other(format!(
            "backup {backup}: chunk {} is damaged ({} bytes, sha256 {sum}; the manifest says {} \
             bytes, sha256 {})",
            c.file,
            data.len(),
            c.bytes,
            c.sha256
        )));
    }
    Ok(())
}

/// Asks the kernel to read the file at `path` ahead (`POSIX_FADV_WILLNEED`). Best effort.
fn read_ahead(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = File::open(path) {
        // SAFETY: plain syscall on an fd owned by `f`; it only starts reads into the cache.
        let _ = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// The loader thread of a direct reader and its two channels: buffers to fill go out,
/// filled ones (or the error reading them) come back, in chunk order.
struct Loader {
    empty: Option<SyncSender<AlignedBuf>>,
    full: Option<Receiver<io::Result<AlignedBuf>>>,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    fn start(dir: PathBuf, chunks: Vec<Chunk>) -> io::Result<Loader> {
        let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(2);
        let (full_tx, full_rx) = sync_channel(2);
        let thread = std::thread::Builder::new()
            .name("kiln-chunk-load".into())
            .spawn(move || {
                for c in &chunks {
                    // The reader went away: stop.
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let r = read_chunk(&dir, c, true, &mut buf).map(|()| buf);
                    if full_tx.send(r).is_err() {
                        return;
                    }
                }
            })?;
        // Two buffers: the loader fills one while the caller consumes the other.
        for _ in 0..2 {
            // Cannot fail: the channel holds two and the loader only takes.
            let _ = empty_tx.send(AlignedBuf::new());
        }
        Ok(Loader {
            empty: Some(empty_tx),
            full: Some(full_rx),
            thread: Some(thread),
        })
    }

    /// The next chunk's bytes, as read (not yet checked).
    fn next(&mut self) -> io::Result<AlignedBuf> {
        match self.full.as_ref().map(Receiver::recv) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::other("the chunk loader thread ended early")),
        }
    }

    /// Hands a consumed buffer back for a later chunk.
    fn recycle(&mut self, buf: AlignedBuf) {
        if let Some(tx) = &self.empty {
            // The loader has finished every chunk: nothing left to fill.
            let _ = tx.send(buf);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing both channels ends the loader after at most the read it is doing.
        self.empty.take();
        self.full.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a backup's stream chunk by chunk; each chunk is read whole and its SHA-256 checked
/// before any of its bytes are returned. A damaged or missing chunk is an error naming it,
/// and the reader returns that error from then on.
pub struct ChunkReader {
    dir: PathBuf,
    backup: BackupId,
    chunks: Vec<Chunk>,
    /// Index of the next chunk to load.
    next: usize,
    /// Set for direct loading.
    loader: Option<Loader>,
    buf: AlignedBuf,
    at: usize,
    failed: Option<io::Error>,
}

impl ChunkReader {
    /// A reader of `chunks` in `dir`, loading directly when the first non-empty chunk is not
    /// in the page cache and its filesystem takes `O_DIRECT` (see the module docs).
    pub(crate) fn start(dir: PathBuf, backup: BackupId, chunks: Vec<Chunk>) -> ChunkReader {
        let direct = chunks.iter().find(|c| c.bytes > 0).is_some_and(|c| {
            let path = dir.join(&c.file);
            !cached(&path) && matches!(open_direct(&path), Ok(Some(_)))
        });
        let loading = if direct {
            Loading::Direct
        } else {
            Loading::Buffered
        };
        Self::with_loading(dir, backup, chunks, loading)
    }

    /// A reader that loads its chunks as `loading` says.
    pub(crate) fn with_loading(
        dir: PathBuf,
        backup: BackupId,
        chunks: Vec<Chunk>,
        loading: Loading,
    ) -> ChunkReader {
        let loader = match loading {
            Loading::Direct => match Loader::start(dir.clone(), chunks.clone()) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::debug!(error = %e, "no chunk loader thread; reading on the caller's");
                    None
                }
            },
            Loading::Buffered => None,
        };
        if loader.is_none()
            && let Some(first) = chunks.first()
        {
            read_ahead(&dir.join(&first.file));
        }
        ChunkReader {
            dir,
            backup,
            chunks,
            next: 0,
            loader,
            buf: AlignedBuf::new(),
            at: 0,
            failed: None,
        }
    }

    /// How this reader loads its chunks.
    #[cfg(test)]
    pub(crate) fn loading(&self) -> Loading {
        if self.loader.is_some() {
            Loading::Direct
        } else {
            Loading::Buffered
        }
    }

    /// Loads chunk `self.next` into `self.buf` and checks it.
    fn load_next(&mut self, c: &Chunk) -> io::Result<()> {
        let named = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("backup {}: chunk {}: {e}", self.backup, c.file),
            )
        };
        match &mut self.loader {
            Some(loader) => {
                let done = std::mem::replace(&mut self.buf, AlignedBuf::new());
                // The first call has no buffer to give back (two circulate, not three).
                if !done.raw.is_empty() {
                    loader.recycle(done);
                }
                self.buf = loader.next().map_err(named)?;
            }
            None => {
                if let Some(n) = self.chunks.get(self.next + 1) {
                    read_ahead(&self.dir.join(&n.file));
                }
                read_chunk(&self.dir, c, false, &mut self.buf).map_err(named)?;
            }
        }
        check(self.backup, c, self.buf.data())
    }
}

impl io::BufRead for ChunkReader {
    /// The rest of the current chunk, after loading and checking the next one when this one
    /// is used up; empty at the end of the stream.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at >= self.buf.len {
            if let Some(e) = &self.failed {
                return Err(io::Error::new(e.kind(), e.to_string()));
            }
            let Some(c) = self.chunks.get(self.next).cloned() else {
                // Every chunk delivered: the end of the stream.
                return Ok(&[]);
            };
            if let Err(e) = self.load_next(&c) {
                self.buf.len = 0;
                self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                return Err(e);
            }
            self.next += 1;
            self.at = 0;
        }
        Ok(&self.buf.data()[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.buf.len);
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use io::BufRead;
        let data = self.fill_buf()?;
        let n = out.len().min(data.len());
        out[..n].copy_from_slice(&data[..n]);
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// Writes `parts` as chunk files in `dir` and returns their manifest entries.
    fn chunks(dir: &Path, parts: &[Vec<u8>]) -> Vec<Chunk> {
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let file = format!("{i:08}.chunk");
                std::fs::write(dir.join(&file), p).unwrap();
                Chunk {
                    file,
                    bytes: p.len() as u64,
                    sha256: hex::encode(Sha256::digest(p)),
                }
            })
            .collect()
    }

    /// Sizes around the alignment: empty, one byte, a block minus one, a block, a block plus
    /// one, several blocks and an odd tail, and more than the buffer held before.
    fn parts() -> Vec<Vec<u8>> {
        [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            5 * ALIGN + 17,
            3 << 20,
            77,
        ]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7) as u8).collect())
        .collect()
    }

    fn read_all(r: &mut ChunkReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let data = r.fill_buf()?;
            if data.is_empty() {
                return Ok(out);
            }
            // Consume in odd steps so chunk boundaries fall anywhere.
            let n = data.len().min(4099);
            out.extend_from_slice(&data[..n]);
            r.consume(n);
        }
    }

    #[test]
    fn both_ways_of_loading_return_every_chunk_in_order() {
        let d = tempfile::tempdir().unwrap();
        let parts = parts();
        let cs = chunks(d.path(), &parts);
        let want: Vec<u8> = parts.concat();
        for loading in [Loading::Direct, Loading::Buffered] {
            let mut r =
                ChunkReader::with_loading(d.path().into(), BackupId::new(), cs.clone(), loading);
            assert_eq!(r.loading(), loading);
            assert!(read_all(&mut r).unwrap() == want, "{loading:?}");
        }
        // Just written, the chunks are in the page cache: read from there.
        let r = ChunkReader::start(d.path().into(), BackupId::new(), cs.clone());
        assert_eq!(r.loading(), Loading::Buffered);
        // Written out and dropped from the cache, they are read directly (this test's
        // directory, under the temp dir, takes O_DIRECT: ext4 or XFS).
        for c in &cs {
            evict(&d.path().join(&c.file));
        }
        let mut r = ChunkReader::start(d.path().into(), BackupId::new(), cs);
        assert_eq!(r.loading(), Loading::Direct);
        assert!(read_all(&mut r).unwrap() == want);
    }

    /// Writes `path` out and drops it from the page cache (`POSIX_FADV_DONTNEED` drops
    /// clean pages; a page the kernel is still busy with stays, so it is asked again, a
    /// bounded number of times, until `mincore` shows the file gone).
    fn evict(path: &Path) {
        use std::os::fd::AsRawFd;
        let f = File::open(path).unwrap();
        f.sync_all().unwrap();
        for _ in 0..100 {
            // SAFETY: plain syscall on an fd owned by `f`.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
            if !cached(path) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{} stays in the page cache", path.display());
    }

    #[test]
    fn a_file_is_cached_after_writing_and_not_after_eviction() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![5u8; 3 * ALIGN + 7]).unwrap();
        assert!(cached(&p));
        evict(&p);
        assert!(!cached(&p));
        // Reading it brings it back.
        std::fs::read(&p).unwrap();
        assert!(cached(&p));
    }

    #[test]
    fn a_damaged_longer_shorter_or_missing_chunk_is_named_both_ways() {
        for loading in [Loading::Direct, Loading::Buffered] {
            for damage in ["flip", "longer", "shorter", "missing"] {
                let d = tempfile::tempdir().unwrap();
                let parts = vec![vec![1u8; ALIGN * 2], vec![2u8; ALIGN * 3 + 5], vec![3; 9]];
                let cs = chunks(d.path(), &parts);
                let victim = d.path().join(&cs[1].file);
                let mut bytes = parts[1].clone();
                match damage {
                    "flip" => bytes[ALIGN + 1] ^= 1,
                    "longer" => bytes.extend_from_slice(&[0; ALIGN]),
                    "shorter" => bytes.truncate(ALIGN),
                    _ => {}
                }
                if damage == "missing" {
                    std::fs::remove_file(&victim).unwrap();
                } else {
                    std::fs::write(&victim, &bytes).unwrap();
                }
                let id = BackupId::new();
                let mut r = ChunkReader::with_loading(d.path().into(), id, cs.clone(), loading);
                let e = read_all(&mut r).unwrap_err().to_string();
                assert!(
                    e.contains(&format!("backup {id}")) && e.contains(&cs[1].file),
                    "{loading:?} {damage}: {e}"
                );
                // And it stays failed.
                assert!(r.fill_buf().is_err(), "{loading:?} {damage}");
            }
        }
    }

    #[test]
    fn dropping_a_direct_reader_part_way_ends_its_loader() {
        let d = tempfile::tempdir().unwrap();
        let parts: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8; 1 << 20]).collect();
        let cs = chunks(d.path(), &parts);
        let mut r =
            ChunkReader::with_loading(d.path().into(), BackupId::new(), cs, Loading::Direct);
        assert_eq!(r.fill_buf().unwrap()[0], 0);
        // Drop joins the loader thread: returning at all is the check (a loader stuck on a
        // full channel would hang here).
        drop(r);
    }
}
