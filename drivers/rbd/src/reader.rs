//! Raw sequential access to an RBD snapshot for kiln's exporters.

use kiln_core::{Extent, SnapshotReader};

use crate::image::Image;

/// Reads a snapshot through librbd (`rbd_read` on an image opened read-only at the snapshot).
/// The extents come from `rbd_diff_iterate2` over the whole history, parent included, so
/// holes (never-written objects) can be skipped by the caller.
pub struct RbdSnapshotReader {
    image: Image,
    size: u64,
    extents: Vec<Extent>,
}

impl RbdSnapshotReader {
    /// Wraps an image opened at a snapshot, with its size and allocated extents.
    pub fn new(image: Image, size: u64, extents: Vec<Extent>) -> Self {
        RbdSnapshotReader {
            image,
            size,
            extents,
        }
    }
}

impl SnapshotReader for RbdSnapshotReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        // librbd refuses reads past the end; clip to the image.
        let len = usize::try_from(self.size - offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.image.read(offset, &mut buf[..len]).map_err(|e| {
            std::io::Error::new(
                std::io::Error::from_raw_os_error(e.errno).kind(),
                e.to_string(),
            )
        })?;
        Ok(n)
    }
}
