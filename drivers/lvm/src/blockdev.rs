//! Raw block-device I/O: zeroing and discarding ranges, copying a snapshot into a new LV,
//! and copying only the differing chunks back into an origin.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use kiln_core::ProgressHandle;

/// Copy buffer: large enough to amortise UML's and dm's per-request cost, small enough to
/// keep progress updates frequent.
pub const COPY_CHUNK: usize = 1 << 20;

/// `BLKZEROOUT` = `_IO(0x12, 127)`: zero a byte range of a block device. The kernel uses the
/// device's write-zeroes/discard support where it has it and writes zero pages otherwise, and
/// drops the page cache of the range.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// `BLKDISCARD` = `_IO(0x12, 119)`: discard a byte range of a block device. What a discarded
/// range then reads is up to the device; dm-thin unmaps every whole pool chunk in it (those
/// read as zeros) and silently ignores the partial chunks at its edges. The kernel drops the
/// page cache of the range first.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Opens a block device read-only.
pub fn open_read(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Opens a block device for writing.
pub fn open_write(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// The size of an open block device in bytes.
pub fn size(f: &File) -> io::Result<u64> {
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

/// Zeroes `len` bytes at `offset` (both multiples of 512).
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads a `[u64; 2]` (start, length) from the pointer, which is valid
    // for the duration of the call; the fd is owned by `f`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Discards `len` bytes at `offset` (both multiples of 512). Fails with `EOPNOTSUPP` when
/// the device takes no discards (a thin pool with `discards = ignore`).
pub fn discard_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads a `[u64; 2]` (start, length) from the pointer, which is valid
    // for the duration of the call; the fd is owned by `f`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Zeroes the whole device, reporting progress, and flushes it.
pub fn zero_all(f: &File, progress: Option<&ProgressHandle>) -> io::Result<()> {
    let len = size(f)?;
    // In slices, so progress moves and a huge device does not hold one ioctl for minutes.
    let step = 256u64 << 20;
    let mut off = 0;
    while off < len {
        let n = step.min(len - off);
        zero_range(f, off, n)?;
        if let Some(p) = progress {
            p.advance(n);
        }
        off += n;
    }
    f.sync_all()
}

/// Whether every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middles.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// What a copy did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes written as data.
    pub written: u64,
    /// Bytes zeroed through BLKZEROOUT instead of written (all-zero source chunks).
    pub zeroed: u64,
}

/// Copies the first `len` bytes of `src` to `dst`. All-zero source chunks are not written as
/// data but zeroed with BLKZEROOUT: a new thick LV holds whatever its extents held before, so
/// "skipping" a hole must still clear it. Flushes `dst` at the end.
pub fn copy(src: &File, dst: &File, len: u64, progress: &ProgressHandle) -> io::Result<CopyStats> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut stats = CopyStats::default();
    let mut zero_run: Option<(u64, u64)> = None;
    let mut off = 0u64;
    while off < len {
        let n = (COPY_CHUNK as u64).min(len - off) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        if is_zero(&buf[..n]) {
            zero_run = match zero_run {
                Some((start, l)) => Some((start, l + n as u64)),
                None => Some((off, n as u64)),
            };
        } else {
            if let Some((start, l)) = zero_run.take() {
                zero_range(dst, start, l)?;
                stats.zeroed += l;
            }
            dst.write_all_at(&buf[..n], off)?;
            stats.written += n as u64;
        }
        progress.advance(n as u64);
        off += n as u64;
    }
    if let Some((start, l)) = zero_run {
        zero_range(dst, start, l)?;
        stats.zeroed += l;
    }
    dst.sync_all()?;
    Ok(stats)
}

/// Makes the first `len` bytes of `dst` equal to `src`, writing only the `granule`-sized
/// pieces that differ. Used for the thick revert (snapshot -> origin): a piece that differs
/// has necessarily been copied into the snapshot's COW already, so writing it adds nothing to
/// that snapshot, while every other snapshot receives the origin's old data through the normal
/// copy-on-write and keeps its own point in time. Idempotent: a re-run after a crash finds
/// fewer differences and converges. Returns the bytes written.
pub fn copy_differences(
    src: &File,
    dst: &File,
    len: u64,
    granule: usize,
    progress: &ProgressHandle,
) -> io::Result<u64> {
    let granule = granule.clamp(512, COPY_CHUNK);
    let chunk = COPY_CHUNK - COPY_CHUNK % granule;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    let mut written = 0u64;
    let mut off = 0u64;
    while off < len {
        let n = (chunk as u64).min(len - off) as usize;
        src.read_exact_at(&mut a[..n], off)?;
        dst.read_exact_at(&mut b[..n], off)?;
        for (start, end) in differing_runs(&a[..n], &b[..n], granule) {
            dst.write_all_at(&a[start..end], off + start as u64)?;
            written += (end - start) as u64;
        }
        progress.advance(n as u64);
        off += n as u64;
    }
    dst.sync_all()?;
    Ok(written)
}

/// Byte ranges `[start, end)` of runs of `granule`-sized pieces where `a` and `b` differ.
pub fn differing_runs(a: &[u8], b: &[u8], granule: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < a.len() {
        let end = (i + granule).min(a.len());
        if a[i..end] != b[i..end] {
            match runs.last_mut() {
                Some(last) if last.1 == i => last.1 = end,
                _ => runs.push((i, end)),
            }
        }
        i = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[3] = 1;
        assert!(!is_zero(&v[1..]));
    }

    #[test]
    fn runs_of_differences() {
        let a = vec![0u8; 16];
        let mut b = a.clone();
        assert!(differing_runs(&a, &b, 4).is_empty());
        b[1] = 1;
        b[5] = 1;
        b[13] = 1;
        assert_eq!(differing_runs(&a, &b, 4), vec![(0, 8), (12, 16)]);
        assert_eq!(
            differing_runs(&a[..14], &b[..14], 4),
            vec![(0, 8), (12, 14)]
        );
    }
}
