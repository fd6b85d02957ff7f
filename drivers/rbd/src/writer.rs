//! Writes into a volume's image, for restores and applied diff streams: asynchronous librbd
//! writes on a read-write handle of the image's head, up to [`crate::aio::DEPTH`] in flight
//! (as `rbd import` keeps), all completed and flushed at the end.

use kiln_core::{Error, Result, VolumeWriter};

use crate::aio::Queue;
use crate::image::Image;

/// A read-write handle of one volume's image.
pub struct RbdWriter {
    // Declared before `image`: fields drop in order, and requests in flight must complete
    // before the handle closes.
    queue: Queue,
    image: Image,
    size: u64,
}

impl RbdWriter {
    /// Wraps an image opened read-write at its head.
    pub fn new(image: Image, size: u64) -> Self {
        RbdWriter {
            queue: Queue::default(),
            image,
            size,
        }
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
        self.queue
            .write(&self.image, offset, data)
            .map_err(std::io::Error::from)
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.bounded(offset, len)?;
        self.queue
            .write_zeroes(&self.image, offset, len)
            .map_err(std::io::Error::from)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.queue.drain().map_err(Error::from)?;
        self.image.flush().map_err(Error::from)
    }
}
