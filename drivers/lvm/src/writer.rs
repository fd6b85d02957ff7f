//! Writing into a detached volume's LV, for restores and applied diff streams.
//!
//! Data goes through the page cache with pwrite and is made durable by one fsync at
//! [`VolumeWriter::finish`]. Zeroing depends on the LV:
//!
//! - **Thin.** Writing zeros would provision every chunk of the range in the pool. The whole
//!   pool chunks of the range are discarded instead (`BLKDISCARD`): dm-thin unmaps them, and an
//!   unmapped chunk reads as zeros. dm-thin ignores the partial chunks at a discard's edges,
//!   so those are cleared with `BLKZEROOUT`, which writes zeros (provisioning at most one
//!   chunk at each end).
//! - **Thick.** `BLKZEROOUT` over the range: the kernel writes zeros (or passes a write-zeroes
//!   request down), which is the only way to clear extents that hold whatever they held
//!   before.
//!
//! The bytes of a range outside whole 4 KiB blocks are written as zero bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use kiln_core::{Error, Result, Volume, VolumeWriter};

use crate::backend::LvmBackend;
use crate::blockdev;
use crate::command::{Retry, Runner};
use crate::names;

/// Granule of the ranges handed to the zeroing ioctls. They take multiples of the device's
/// logical block size (512 on dm devices, never more than 4096), and whole pages keep the
/// kernel's page-cache invalidation of the range simple: no cached page is half dropped.
const ZERO_ALIGN: u64 = 4096;

static ZEROS: [u8; ZERO_ALIGN as usize] = [0; ZERO_ALIGN as usize];

/// What a writer did, logged at debug when it finishes.
#[derive(Debug, Default, Clone, Copy)]
struct WriteStats {
    /// Bytes written as data.
    written: u64,
    /// Bytes cleared with `BLKZEROOUT`.
    zeroed: u64,
    /// Bytes unmapped with `BLKDISCARD` (thin only).
    discarded: u64,
    /// Bytes at unaligned range edges written as zero bytes.
    zero_bytes: u64,
}

/// Deactivates an LV when dropped. The writer undoes its own activation, as the snapshot
/// reader does, so an LV that was inactive (after a reboot, or `vgchange -an`) is left
/// inactive again, which is what the other operations found before.
struct Deactivate {
    runner: Runner,
    spec: String,
}

impl Drop for Deactivate {
    fn drop(&mut self) {
        // Nothing is lost when this fails: the data is on the device, and every operation
        // accepts an active LV.
        if let Err(e) = self.runner.lvm(
            "lvchange -an",
            &["lvchange", "-q", "-an", &self.spec],
            Retry::Transient,
        ) {
            tracing::info!(lv = %self.spec, error = %e, "could not deactivate after writing");
        }
    }
}

/// Writer into a volume's device node `/dev/mapper/<vg>-volume--<id>`, opened read-write and
/// exclusively. Writes and zeroing are bounded by the volume's `size_bytes` (the LV may be
/// larger: lvm rounds sizes up to whole extents, and that slack is not part of the volume).
/// Dropping it closes the device and deactivates the LV if the writer activated it, which
/// runs `lvchange -an`: drop it from a blocking context.
pub struct LvmVolumeWriter {
    // Declared before `_deactivate`: fields drop in order, and an open LV refuses
    // deactivation.
    file: File,
    path: PathBuf,
    size: u64,
    /// The thin pool's chunk size while discards are used to zero (thin volumes only).
    discard_chunk: Option<u64>,
    stats: WriteStats,
    writeback: kiln_core::writeback::Writeback,
    _deactivate: Option<Deactivate>,
}

impl LvmVolumeWriter {
    /// `InvalidInput` unless `len` bytes at `offset` lie inside the volume.
    fn check_range(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} of {len} bytes at {offset} is past the end of the volume ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// Writes zero bytes over `[start, end)` (less than [`ZERO_ALIGN`]).
    fn write_zero_bytes(&mut self, start: u64, end: u64) -> io::Result<()> {
        if start < end {
            self.file
                .write_all_at(&ZEROS[..(end - start) as usize], start)?;
            self.stats.zero_bytes += end - start;
        }
        Ok(())
    }

    /// `BLKZEROOUT` of `[start, end)`, both multiples of [`ZERO_ALIGN`].
    fn zeroout(&mut self, start: u64, end: u64) -> io::Result<()> {
        if start < end {
            blockdev::zero_range(&self.file, start, end - start).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "BLKZEROOUT of {} bytes at {start} on {}: {e}",
                        end - start,
                        self.path.display()
                    ),
                )
            })?;
            self.stats.zeroed += end - start;
        }
        Ok(())
    }

    /// Clears `[start, end)`, both multiples of [`ZERO_ALIGN`]: on thin, the whole pool chunks
    /// are discarded and the partial ones at the edges zeroed; otherwise all of it is zeroed.
    fn zero_blocks(&mut self, start: u64, end: u64) -> io::Result<()> {
        let Some(chunk) = self.discard_chunk else {
            return self.zeroout(start, end);
        };
        let (first, last) = (start.next_multiple_of(chunk), end - end % chunk);
        if first >= last {
            return self.zeroout(start, end);
        }
        self.zeroout(start, first)?;
        match blockdev::discard_range(&self.file, first, last - first) {
            Ok(()) => self.stats.discarded += last - first,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // A pool with `discards = ignore` gives its thin LVs no discard support at
                // all. Writing zeros is still correct, but provisions the range in the pool.
                tracing::info!(
                    device = %self.path.display(),
                    "the thin pool ignores discards: zeroing writes zeros, which allocates \
                     pool space (lvchange --discards passdown on the pool avoids that)"
                );
                self.discard_chunk = None;
                self.zeroout(first, last)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "BLKDISCARD of {} bytes at {first} on {}: {e}",
                        last - first,
                        self.path.display()
                    ),
                ));
            }
        }
        self.zeroout(last, end)
    }
}

impl VolumeWriter for LvmVolumeWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range("a write", offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        self.writeback.wrote(&self.file, offset, data.len() as u64);
        self.stats.written += data.len() as u64;
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("zeroing", offset, len)?;
        let end = offset + len;
        // Whole 4 KiB blocks go to the ioctls, the edges around them are written.
        let first = offset.next_multiple_of(ZERO_ALIGN).min(end);
        let last = (end - end % ZERO_ALIGN).max(first);
        self.write_zero_bytes(offset, first)?;
        self.zero_blocks(first, last)?;
        self.write_zero_bytes(last, end)
    }

    /// fsync of the block device writes its page cache back and sends a cache flush down
    /// the device stack; dm-thin commits the pool's metadata on that flush, so discards are
    /// durable too. The fd has been open since before the first write, so a write-back
    /// error of any of them is reported here.
    fn finish(self: Box<Self>) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("flushing {}", self.path.display()), e))?;
        tracing::debug!(
            device = %self.path.display(),
            written = self.stats.written,
            zeroed = self.stats.zeroed,
            discarded = self.stats.discarded,
            zero_bytes = self.stats.zero_bytes,
            "volume writer finished"
        );
        Ok(())
    }
}

impl LvmBackend {
    /// Opens volume `v`'s LV for writing: one `lvs` (of the volume and the thin pool), an
    /// activation when the LV is inactive (undone when the writer is dropped), then the device
    /// node, read-write with `O_EXCL`. `NotFound` when the LV does not exist; `WrongState`
    /// when its device is open or held by someone else (writing under a user would corrupt
    /// what they see).
    pub(crate) fn open_volume_writer(&self, v: &Volume) -> Result<LvmVolumeWriter> {
        let name = names::volume(&v.id);
        let rows = self.lvs_named(&[&name, &self.pool])?;
        let row = rows
            .iter()
            .find(|r| r.lv_name == name)
            .ok_or_else(|| Error::not_found("volume", v.id))?;
        if row.is_open() {
            return Err(Error::wrong_state(format!(
                "{} is open (attached or in use); detach it before writing into it",
                self.spec(&name)
            )));
        }
        let discard_chunk = if row.is_thin_volume() {
            let chunk = rows
                .iter()
                .find(|r| r.lv_name == row.pool_lv && r.is_thin_pool())
                .and_then(|p| p.chunk_size())
                .filter(|c| c.is_multiple_of(ZERO_ALIGN));
            if chunk.is_none() {
                // Correct without discards, only the pool fills up.
                tracing::info!(
                    lv = %self.spec(&name),
                    pool = %row.pool_lv,
                    "no usable chunk size for the thin pool: zeroing writes zeros"
                );
            }
            chunk
        } else {
            None
        };
        // Made before anything can fail, so an early return undoes the activation.
        let mut deactivate = None;
        if !row.is_active() {
            if row.is_thin_volume() {
                self.activate(&name, row.skips_activation())?;
            } else {
                self.ensure_thick_active(row)?;
            }
            deactivate = Some(Deactivate {
                runner: self.runner.clone(),
                spec: self.spec(&name),
            });
        }
        let path = self.device(&name);
        // O_EXCL on a block device fails with EBUSY while it is mounted or claimed by another
        // exclusive opener, and keeps them out while the writer holds it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    Error::wrong_state(format!(
                        "{} is in use (mounted, or held by another program); release it before \
                         writing into it",
                        self.spec(&name)
                    ))
                } else {
                    Error::io(format!("opening {}", path.display()), e)
                }
            })?;
        let device_size = blockdev::size(&file)
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        if device_size < v.size_bytes {
            return Err(Error::backend(
                "open_volume_writer",
                format!(
                    "{} has {device_size} bytes, less than the volume's recorded {} bytes",
                    path.display(),
                    v.size_bytes
                ),
            ));
        }
        Ok(LvmVolumeWriter {
            file,
            path,
            size: v.size_bytes,
            discard_chunk,
            stats: WriteStats::default(),
            writeback: Default::default(),
            _deactivate: deactivate,
        })
    }
}
