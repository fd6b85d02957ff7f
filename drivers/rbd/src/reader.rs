//! Raw sequential access to an RBD snapshot for kiln's exporters.

use std::collections::VecDeque;

use kiln_core::{Extent, SnapshotReader};

use crate::aio::{DEPTH, Queue};
use crate::errno::RbdCallError;
use crate::image::Image;

/// Bytes per read-ahead request: one object of kiln's images.
const PIECE: u64 = 1 << crate::image::KILN_ORDER;

/// Reads a snapshot through librbd (an image opened read-only at the snapshot).
/// The extents come from `rbd_diff_iterate2` over the whole history, parent included, so
/// holes (never-written objects) can be skipped by the caller.
///
/// Once told which ranges come next ([`SnapshotReader::will_read`]), it keeps up to
/// [`DEPTH`] object-sized `rbd_aio_read`s of them in flight, as `rbd export` does; a read
/// anywhere else is a plain synchronous `rbd_read`.
pub struct RbdSnapshotReader {
    // Declared before `image`: requests in flight complete before the handle closes.
    ahead: Queue,
    /// Pieces of the announced ranges not yet issued.
    plan: VecDeque<(u64, u64)>,
    image: Image,
    size: u64,
    extents: Vec<Extent>,
}

impl RbdSnapshotReader {
    /// Wraps an image opened at a snapshot, with its size and allocated extents.
    pub fn new(image: Image, size: u64, extents: Vec<Extent>) -> Self {
        RbdSnapshotReader {
            ahead: Queue::default(),
            plan: VecDeque::new(),
            image,
            size,
            extents,
        }
    }

    /// Issues planned pieces until [`DEPTH`] are in flight.
    fn top_up(&mut self) -> Result<(), RbdCallError> {
        while self.ahead.in_flight() < DEPTH {
            let Some((a, b)) = self.plan.pop_front() else {
                break;
            };
            // `b - a` is at most PIECE (4 MiB).
            self.ahead.read(&self.image, a, (b - a) as usize)?;
        }
        Ok(())
    }

    /// Serves a read at `offset` from the read-ahead when a piece covers it: pieces wholly
    /// before it are dropped (the caller skipped them), the covering one is waited for.
    fn serve_from_queue(
        &mut self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<usize>, RbdCallError> {
        while self.plan.front().is_some_and(|p| p.1 <= offset) {
            self.plan.pop_front();
        }
        loop {
            match self.ahead.front() {
                Some((_, end)) if end <= offset => self.ahead.pop()?,
                Some((start, end)) if start <= offset => {
                    let Some((at, data)) = self.ahead.front_read()? else {
                        return Ok(None);
                    };
                    let from = (offset - at) as usize;
                    let n = buf.len().min(data.len() - from);
                    buf[..n].copy_from_slice(&data[from..from + n]);
                    if offset + n as u64 == end {
                        self.ahead.pop()?;
                    }
                    self.top_up()?;
                    return Ok(Some(n));
                }
                _ => return Ok(None),
            }
            self.top_up()?;
        }
    }
}

fn io_error(e: RbdCallError) -> std::io::Error {
    std::io::Error::new(
        std::io::Error::from_raw_os_error(e.errno).kind(),
        e.to_string(),
    )
}

impl SnapshotReader for RbdSnapshotReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn will_read(&mut self, ranges: &[(u64, u64)]) {
        for &(a, b) in ranges {
            let b = b.min(self.size);
            let mut at = a;
            while at < b {
                // Pieces end on object boundaries, so each request stays inside one object.
                let end = (at / PIECE + 1).saturating_mul(PIECE).min(b);
                self.plan.push_back((at, end));
                at = end;
            }
        }
        // An error here shows again on the read that needs the piece.
        let _ = self.top_up();
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if let Some(n) = self.serve_from_queue(offset, buf).map_err(io_error)? {
            return Ok(n);
        }
        // librbd refuses reads past the end; clip to the image.
        let len = usize::try_from(self.size - offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.image.read(offset, &mut buf[..len]).map_err(io_error)
    }
}
