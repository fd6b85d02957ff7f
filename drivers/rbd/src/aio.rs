//! Several librbd requests in flight on one image handle, completed in the order they were
//! issued.
//!
//! One synchronous 4 MiB `rbd_read`/`rbd_write` waits a whole round trip to an OSD, so a
//! bulk copy that issues them one at a time runs at a fraction of what the cluster can take;
//! `rbd export` and `rbd import` keep `rbd_concurrent_management_ops` (10) requests in flight.
//! [`Queue`] does the same for kiln's restores ([`crate::writer`]) and snapshot reads
//! ([`crate::reader`]). Each request owns its buffer until it completes, and a request is
//! always waited for before its buffer or completion is freed, also when the queue is dropped
//! after an error.

use std::collections::VecDeque;

use libc::c_char;

use crate::errno::{CallResult, RbdCallError, check};
use crate::ffi;
use crate::image::Image;

/// Requests in flight, as `rbd export`/`rbd import` keep by default
/// (`rbd_concurrent_management_ops`).
pub const DEPTH: usize = 10;

/// One librbd completion, released by the [`Request`] that owns it.
struct Completion(ffi::rbd_completion_t);

// SAFETY: a completion is a heap object of librbd's, waited on and released from whichever
// thread owns the queue; librbd completes it from its own threads under its own lock.
unsafe impl Send for Completion {}

impl Completion {
    fn new(what: &dyn Fn() -> String) -> CallResult<Completion> {
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; no callback, so no argument is ever dereferenced.
        let rc = unsafe { ffi::rbd_aio_create_completion(std::ptr::null_mut(), None, &mut c) };
        check(
            || format!("rbd_aio_create_completion for {}", what()),
            rc.into(),
        )?;
        Ok(Completion(c))
    }

    /// Waits for the request and returns its result (bytes, or a negative errno).
    fn wait(&self) -> i64 {
        // SAFETY: a live completion that was handed to a request.
        unsafe {
            ffi::rbd_aio_wait_for_complete(self.0);
            ffi::rbd_aio_get_return_value(self.0) as i64
        }
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zero,
}

impl Kind {
    fn call(self) -> &'static str {
        match self {
            Kind::Read => "rbd_aio_read",
            Kind::Write => "rbd_aio_write",
            Kind::Zero => "rbd_aio_write_zeroes",
        }
    }
}

/// A request in flight (or completed, `result` set) with the buffer it reads into or writes
/// from.
struct Request {
    kind: Kind,
    offset: u64,
    len: u64,
    buf: Vec<u8>,
    completion: Completion,
    result: Option<i64>,
    /// The image and call, for errors.
    op: String,
}

impl Request {
    fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Waits for completion; an error names the call, the image and the offset.
    fn complete(&mut self) -> CallResult<()> {
        let rc = *self.result.get_or_insert_with(|| self.completion.wait());
        let n = check(|| format!("{} at {}", self.op, self.offset), rc)?;
        // A write's completion returns 0 (some librbd releases: the length); only a read
        // returns its byte count, and must have filled the whole range.
        if self.kind == Kind::Read && u64::try_from(n).ok() != Some(self.len) {
            return Err(RbdCallError {
                op: format!("{} at {}: {n} of {} bytes", self.op, self.offset, self.len),
                errno: libc::EIO,
            });
        }
        Ok(())
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // librbd may still write into (or read from) `buf`: wait before either is freed.
        if self.result.is_none() {
            self.completion.wait();
        }
        // SAFETY: the request completed; the completion is released exactly once.
        unsafe { ffi::rbd_aio_release(self.completion.0) };
    }
}

/// Up to [`DEPTH`] requests in flight on one image, oldest first.
#[derive(Default)]
pub struct Queue {
    requests: VecDeque<Request>,
    /// Buffers of completed requests, reused so that each request does not fault in fresh
    /// memory.
    spare: Vec<Vec<u8>>,
}

impl Queue {
    /// Requests issued and not yet popped.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.reserve(len);
        b
    }

    /// Waits for every request whose range meets `[offset, offset + len)` (and those issued
    /// before it), so that a request never races an earlier one over the same bytes.
    fn order_after(&mut self, offset: u64, len: u64) -> CallResult<()> {
        let end = offset.saturating_add(len);
        if let Some(last) = self
            .requests
            .iter()
            .rposition(|r| r.offset < end && offset < r.end())
        {
            for _ in 0..=last {
                self.pop_done()?;
            }
        }
        Ok(())
    }

    /// Makes room for one more request.
    fn room(&mut self) -> CallResult<()> {
        while self.requests.len() >= DEPTH {
            self.pop_done()?;
        }
        Ok(())
    }

    /// Completes and drops the oldest request, keeping its buffer.
    fn pop_done(&mut self) -> CallResult<()> {
        let Some(mut r) = self.requests.pop_front() else {
            return Ok(());
        };
        let res = r.complete();
        self.spare.push(std::mem::take(&mut r.buf));
        res
    }

    fn issue(
        &mut self,
        image: &Image,
        kind: Kind,
        offset: u64,
        buf: Vec<u8>,
        len: u64,
    ) -> CallResult<()> {
        let op = image.op(kind.call());
        let completion = Completion::new(&|| format!("{op} at {offset}"))?;
        let len_c = usize::try_from(len).map_err(|_| RbdCallError {
            op: format!("{op} at {offset}: length {len}"),
            errno: libc::EINVAL,
        })?;
        let mut r = Request {
            kind,
            offset,
            len,
            buf,
            completion,
            result: None,
            op,
        };
        // SAFETY: open handle; `r.buf` is a heap buffer of at least `len` bytes (reads: its
        // capacity, set to `len` only once the read completed) that `r` owns and keeps alive,
        // unmoved, until the completion reports done (`Request::drop` waits).
        let rc = unsafe {
            match kind {
                Kind::Write => ffi::rbd_aio_write(
                    image.handle(),
                    offset,
                    len_c,
                    r.buf.as_ptr().cast::<c_char>(),
                    r.completion.0,
                ),
                Kind::Read => ffi::rbd_aio_read(
                    image.handle(),
                    offset,
                    len_c,
                    r.buf.as_mut_ptr().cast::<c_char>(),
                    r.completion.0,
                ),
                Kind::Zero => {
                    ffi::rbd_aio_write_zeroes(image.handle(), offset, len_c, r.completion.0, 0, 0)
                }
            }
        };
        if rc < 0 {
            // Never issued: nothing to wait for.
            r.result = Some(rc.into());
            return r.complete();
        }
        self.requests.push_back(r);
        Ok(())
    }

    /// Issues a write of a copy of `data` at `offset`, after earlier requests over the same
    /// bytes completed; an error of an earlier request may surface here.
    pub fn write(&mut self, image: &Image, offset: u64, data: &[u8]) -> CallResult<()> {
        self.order_after(offset, data.len() as u64)?;
        self.room()?;
        let mut buf = self.buffer(data.len());
        buf.extend_from_slice(data);
        self.issue(image, Kind::Write, offset, buf, data.len() as u64)
    }

    /// Issues a zeroing of `len` bytes at `offset` (as `rbd_write_zeroes`).
    pub fn write_zeroes(&mut self, image: &Image, offset: u64, len: u64) -> CallResult<()> {
        self.order_after(offset, len)?;
        self.room()?;
        self.issue(image, Kind::Zero, offset, Vec::new(), len)
    }

    /// Issues a read of `len` bytes at `offset` (inside the image), fetched with
    /// [`Queue::front_read`].
    pub fn read(&mut self, image: &Image, offset: u64, len: usize) -> CallResult<()> {
        self.room()?;
        let buf = self.buffer(len);
        self.issue(image, Kind::Read, offset, buf, len as u64)
    }

    /// The range of the oldest request.
    pub fn front(&self) -> Option<(u64, u64)> {
        self.requests.front().map(|r| (r.offset, r.end()))
    }

    /// Waits for the oldest request, a read, and returns its offset and bytes (it stays
    /// queued until [`Queue::pop`]).
    pub fn front_read(&mut self) -> CallResult<Option<(u64, &[u8])>> {
        let Some(r) = self.requests.front_mut() else {
            return Ok(None);
        };
        if r.result.is_none() {
            r.complete()?;
            // SAFETY: the read completed and filled all `len` bytes (checked above), which
            // lie within the capacity reserved for it.
            unsafe { r.buf.set_len(r.len as usize) };
        } else {
            r.complete()?;
        }
        Ok(Some((r.offset, &r.buf)))
    }

    /// Completes and drops the oldest request (its error, if it failed).
    pub fn pop(&mut self) -> CallResult<()> {
        self.pop_done()
    }

    /// Waits for every request; the first error, if any, after all completed.
    pub fn drain(&mut self) -> CallResult<()> {
        let mut first = Ok(());
        while !self.requests.is_empty() {
            let r = self.pop_done();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
