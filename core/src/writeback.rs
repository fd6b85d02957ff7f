//! Starting the kernel's writeback of written data early, so that a long sequential write
//! (a restore, a backup's chunks) overlaps its disk writes with whatever produces the data,
//! and the one fsync at the end finds little left to do.
//!
//! Without it, buffered writes sit in the page cache until the dirty limits (a tenth of RAM
//! before background writeback starts) or the final fsync: on a machine with plenty of RAM a
//! whole multi-GiB restore waits for the disk only at the very end. `sync_file_range(WRITE)`
//! only *starts* I/O; durability still comes from the fsync, so nothing here changes what is
//! durable when.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Written bytes gathered before their writeback is started: large enough that the disk sees
/// big requests, small next to the dirty limits.
pub const KICK_BYTES: u64 = 32 << 20;

/// Asks the kernel to start writing `len` bytes of `f` at `offset` back now (`len` 0: to the
/// end of the file). Best effort: a file that does not support it just waits for its fsync.
pub fn start(f: &File, offset: u64, len: u64) {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: plain syscall on an fd owned by `f`; it only starts I/O on its pages.
    let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Tracks the range written since the last kick and starts its writeback every
/// [`KICK_BYTES`]. Writes may come in any order; the range kicked is their hull.
#[derive(Debug, Default)]
pub struct Writeback {
    lo: u64,
    hi: u64,
    pending: u64,
}

impl Writeback {
    /// Records that `len` bytes at `offset` of `f` were written; starts writeback of the
    /// hull of the writes since the last kick once they add up to [`KICK_BYTES`].
    pub fn wrote(&mut self, f: &File, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if self.pending == 0 {
            (self.lo, self.hi) = (offset, end);
        } else {
            self.lo = self.lo.min(offset);
            self.hi = self.hi.max(end);
        }
        self.pending += len;
        if self.pending >= KICK_BYTES {
            start(f, self.lo, self.hi - self.lo);
            self.pending = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_kicked_is_the_hull_of_the_writes_since_the_last_kick() {
        let f = match tempfile::tempfile() {
            Ok(f) => f,
            Err(e) => panic!("tempfile: {e}"),
        };
        let mut wb = Writeback::default();
        wb.wrote(&f, 100 << 20, 1 << 20);
        wb.wrote(&f, 10 << 20, 1 << 20);
        assert_eq!((wb.lo, wb.hi, wb.pending), (10 << 20, 101 << 20, 2 << 20));
        wb.wrote(&f, 0, KICK_BYTES);
        assert_eq!(wb.pending, 0, "a kick resets the count");
        wb.wrote(&f, 5, 7);
        assert_eq!((wb.lo, wb.hi, wb.pending), (5, 12, 7));
    }
}
