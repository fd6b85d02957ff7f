//! Progress reporting for long copies (thick clones, flattens, reverts, exports).

use std::sync::Arc;

/// Receives progress of a long operation. Implementations must be cheap and thread-safe:
/// drivers call them from blocking worker threads.
pub trait Progress: Send + Sync {
    /// The total amount of work, in bytes; may be called again if the estimate changes.
    fn set_total(&self, bytes: u64);
    /// `bytes` more of the work are done.
    fn advance(&self, bytes: u64);
    /// A short phase description (e.g. "flattening volume-…").
    fn set_message(&self, _msg: &str) {}
}

/// Shared handle to a progress sink, cloneable into worker threads.
pub type ProgressHandle = Arc<dyn Progress>;

/// A progress sink that ignores everything (tests, scripts, `--format json`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// A handle to [`NoProgress`].
pub fn no_progress() -> ProgressHandle {
    Arc::new(NoProgress)
}
