//! Which ranges of two reflinked files differ, from their physical block maps (FIEMAP): a
//! range both files map to the same physical blocks is shared, so it reads the same in both;
//! everything else may differ. No data is read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use kiln_core::Extent;

/// `FS_IOC_FIEMAP`, `_IOWR('f', 11, struct fiemap)` (linux/fs.h).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data first, so delayed allocations have their blocks (linux/fiemap.h).
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Where the data lives is unknown, being allocated, encoded, packed or inline: the physical
/// address cannot prove two ranges share blocks.
const UNPROVABLE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;
/// Allocated but reads as zeros.
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// Extents asked for per ioctl.
const BATCH: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Request {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [RawExtent; BATCH],
}

/// One mapped range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// The file's block map, sorted by logical offset. `Ok(None)` when the filesystem does not
/// report one (tmpfs, some FUSE filesystems).
pub(crate) fn map(file: &File) -> io::Result<Option<Vec<Mapped>>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut req = Request {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
            fm_extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `req` is a properly laid out `struct fiemap` with room for BATCH extents,
        // alive for the call; the fd is owned by `file`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(e),
            };
        }
        let n = (req.fm_mapped_extents as usize).min(BATCH);
        if n == 0 {
            return Ok(Some(out));
        }
        for e in &req.fm_extents[..n] {
            out.push(Mapped {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
        }
        let last = req.fm_extents[n - 1];
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(Some(out));
        }
        let next = last.fe_logical.saturating_add(last.fe_length);
        if next <= start {
            return Err(io::Error::other("FIEMAP did not advance"));
        }
        start = next;
    }
}

/// What one file holds at a logical offset: a hole, or a block at a physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Hole,
    Block { physical: u64, unwritten: bool },
    Unprovable,
}

/// The mapping of `m` (sorted) over `[pos, …)`: what is at `pos` and where that state ends
/// (`u64::MAX` past the last extent). `i` is a cursor kept between calls.
fn at(m: &[Mapped], i: &mut usize, pos: u64) -> (At, u64) {
    while *i < m.len() && m[*i].logical.saturating_add(m[*i].length) <= pos {
        *i += 1;
    }
    match m.get(*i) {
        None => (At::Hole, u64::MAX),
        Some(e) if e.logical > pos => (At::Hole, e.logical),
        Some(e) => {
            let end = e.logical.saturating_add(e.length);
            let state = if e.flags & UNPROVABLE != 0 {
                At::Unprovable
            } else {
                At::Block {
                    physical: e.physical + (pos - e.logical),
                    unwritten: e.flags & FIEMAP_EXTENT_UNWRITTEN != 0,
                }
            };
            (state, end)
        }
    }
}

/// Ranges of `[0, size)` where `a` and `b` are not provably the same: both holes, or both
/// the same physical blocks in the same written state, is the same; anything else differs.
/// Sorted, merged.
pub(crate) fn differing(a: &[Mapped], b: &[Mapped], size: u64) -> Vec<Extent> {
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let (sa, ea) = at(a, &mut ia, pos);
        let (sb, eb) = at(b, &mut ib, pos);
        let end = ea.min(eb).min(size);
        let same = match (sa, sb) {
            (At::Hole, At::Hole) => true,
            (At::Block { .. }, At::Block { .. }) => sa == sb,
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(l) if l.offset + l.length == pos => l.length += end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: end - pos,
                }),
            }
        }
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(logical: u64, physical: u64, length: u64, flags: u32) -> Mapped {
        Mapped {
            logical,
            physical,
            length,
            flags,
        }
    }

    fn ex(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn shared_blocks_are_the_same_and_everything_else_differs() {
        // a: [0,8) at 100, [16,24) at 200. b: [0,4) shared, [4,8) rewritten elsewhere,
        // [16,24) gone (a hole now), [30,32) new.
        let a = [m(0, 100, 8, 0), m(16, 200, 8, FIEMAP_EXTENT_LAST)];
        let b = [
            m(0, 100, 4, 0),
            m(4, 900, 4, 0),
            m(30, 950, 2, FIEMAP_EXTENT_LAST),
        ];
        assert_eq!(differing(&a, &b, 40), vec![ex(4, 4), ex(16, 8), ex(30, 2)]);
        assert_eq!(differing(&a, &a, 40), vec![]);
    }

    #[test]
    fn an_extent_split_differently_in_each_file_is_still_shared() {
        let a = [m(0, 100, 16, 0)];
        let b = [m(0, 100, 4, 0), m(4, 104, 12, 0)];
        assert_eq!(differing(&a, &b, 16), vec![]);
        // b starts 4 bytes later on the device: all of it differs.
        let c = [m(0, 104, 16, 0)];
        assert_eq!(differing(&a, &c, 16), vec![ex(0, 16)]);
    }

    #[test]
    fn unwritten_and_unprovable_extents_count_as_changed() {
        let a = [m(0, 100, 8, 0)];
        let unwritten = [m(0, 100, 8, FIEMAP_EXTENT_UNWRITTEN)];
        assert_eq!(differing(&a, &unwritten, 8), vec![ex(0, 8)]);
        let delalloc = [m(0, 0, 8, 0x4)];
        assert_eq!(differing(&delalloc, &delalloc, 8), vec![ex(0, 8)]);
    }

    #[test]
    fn the_result_is_clipped_to_the_size() {
        let a = [];
        let b = [m(0, 100, 64, 0)];
        assert_eq!(differing(&a, &b, 10), vec![ex(0, 10)]);
        assert_eq!(differing(&a, &b, 0), vec![]);
    }
}
