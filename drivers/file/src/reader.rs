//! The snapshot reader both modes hand out: an open raw file plus its data extents.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kiln_core::{Extent, SnapshotReader};

/// Reads a raw image from an open file. The file may already be unlinked (qcow2 mode reads a
/// converted temp copy); the open descriptor keeps it alive until the reader is dropped.
pub(crate) struct FileReader {
    file: File,
    size: u64,
    extents: Vec<Extent>,
}

impl FileReader {
    /// A reader over `file`, whose first `size` bytes are the image.
    pub(crate) fn new(file: File, size: u64, extents: Vec<Extent>) -> Self {
        FileReader {
            file,
            size,
            extents,
        }
    }
}

impl SnapshotReader for FileReader {
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
        let left = self.size - offset;
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            // The backing file is shorter than the image (a sparse tail that was never
            // extended): the rest of the image reads as zeros.
            buf[..want].fill(0);
            return Ok(want);
        }
        Ok(n)
    }
}
