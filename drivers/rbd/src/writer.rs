//! Writes into a volume's image, for restores and applied diff streams: librbd writes on a
//! read-write handle of the image's head, flushed at the end.

use kiln_core::{Error, Result, VolumeWriter};

use crate::image::Image;

/// A read-write handle of one volume's image.
pub struct RbdWriter {
    image: Image,
    size: u64,
}

impl RbdWriter {
    /// Wraps an image opened read-write at its head.
    pub fn new(image: Image, size: u64) -> Self {
        RbdWriter { image, size }
    }

    fn bounded(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.saturating_add(len) > self.size {
            return Err(std::io::Error::other(format!(
                "{len} bytes at {offset} are past the end of the image ({} bytes)",
                self.size
            )));
        }
        Ok(())
    }
}

impl VolumeWriter for RbdWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.bounded(offset, data.len() as u64)?;
        self.image.write(offset, data).map_err(std::io::Error::from)
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.bounded(offset, len)?;
        self.image
            .write_zeroes(offset, len)
            .map_err(std::io::Error::from)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.image.flush().map_err(Error::from)
    }
}
