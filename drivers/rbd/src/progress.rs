//! Bridges librbd's progress callbacks (`offset` of `total` work units, usually objects) to
//! kiln's byte-based [`ProgressHandle`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_core::ProgressHandle;
use libc::{c_int, c_void};

/// Scales librbd's unit counts to `total_bytes` and forwards only increases, so the sink sees
/// a monotonic byte count whatever unit and thread librbd reports from.
pub struct ProgressBridge {
    sink: ProgressHandle,
    total_bytes: u64,
    reported: AtomicU64,
}

impl ProgressBridge {
    /// Announces `total_bytes` of work to `sink` (with `message`) and returns the bridge.
    pub fn new(sink: ProgressHandle, total_bytes: u64, message: &str) -> Self {
        sink.set_message(message);
        sink.set_total(total_bytes);
        ProgressBridge {
            sink,
            total_bytes,
            reported: AtomicU64::new(0),
        }
    }

    /// librbd reported `offset` of `total` units done.
    pub fn update(&self, offset: u64, total: u64) {
        let done = if total == 0 {
            self.total_bytes
        } else {
            let scaled =
                u128::from(offset.min(total)) * u128::from(self.total_bytes) / u128::from(total);
            u64::try_from(scaled).unwrap_or(self.total_bytes)
        };
        self.advance_to(done);
    }

    /// The operation completed: report whatever librbd did not.
    pub fn finish(&self) {
        self.advance_to(self.total_bytes);
    }

    fn advance_to(&self, done: u64) {
        let before = self.reported.fetch_max(done, Ordering::AcqRel);
        if done > before {
            self.sink.advance(done - before);
        }
    }

    /// The `void *` to pass as librbd's `cbdata` together with [`progress_callback`].
    pub fn as_cbdata(&self) -> *mut c_void {
        std::ptr::from_ref(self).cast_mut().cast()
    }
}

/// `librbd_progress_fn_t` for a [`ProgressBridge`] passed as `cbdata`. Never cancels.
///
/// # Safety
/// `ptr` must come from [`ProgressBridge::as_cbdata`] on a bridge that outlives the librbd call.
pub unsafe extern "C" fn progress_callback(offset: u64, total: u64, ptr: *mut c_void) -> c_int {
    // SAFETY: per the contract above, ptr points to a live ProgressBridge (shared access only).
    let bridge = unsafe { &*ptr.cast::<ProgressBridge>() };
    // A panicking sink must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(|| bridge.update(offset, total)));
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Rec {
        total: Mutex<u64>,
        done: Mutex<u64>,
        calls: Mutex<u32>,
    }
    impl kiln_core::Progress for Rec {
        fn set_total(&self, b: u64) {
            *self.total.lock().unwrap() = b;
        }
        fn advance(&self, b: u64) {
            *self.done.lock().unwrap() += b;
            *self.calls.lock().unwrap() += 1;
        }
    }

    #[test]
    fn units_are_scaled_to_bytes_and_never_go_backwards() {
        let rec = Arc::new(Rec::default());
        let b = ProgressBridge::new(rec.clone(), 64 << 20, "x");
        assert_eq!(*rec.total.lock().unwrap(), 64 << 20);
        unsafe {
            progress_callback(4, 16, b.as_cbdata());
            progress_callback(2, 16, b.as_cbdata()); // out of order: ignored
            progress_callback(8, 16, b.as_cbdata());
        }
        assert_eq!(*rec.done.lock().unwrap(), 32 << 20);
        b.finish();
        b.finish();
        assert_eq!(*rec.done.lock().unwrap(), 64 << 20);
        assert_eq!(*rec.calls.lock().unwrap(), 3);
    }
}
