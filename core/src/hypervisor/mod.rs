//! The hypervisor side of attached volumes: kiln talks to the QEMU monitor (QMP) of the
//! process that has an instance's qcow2 volumes open, so that the hypervisor itself switches
//! a running disk onto a new overlay (a file in use must never be modified by another
//! process).

pub mod qmp;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use crate::error::{ErrorKind, Result};
use qmp::Qmp;

/// How long kiln waits for a monitor's greeting and for each reply. A transaction drains
/// the guest's I/O and flushes the old top layer, which takes milliseconds; this bounds a
/// hung daemon, not a slow one.
pub const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// One lock per monitor socket path: a monitor serves one client at a time, and a second
/// client that connects meanwhile is not served at all, so this process never holds two
/// connections to one monitor.
static MONITORS: LazyLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// What connecting to a monitor found.
pub enum Monitor {
    /// Connected, capabilities negotiated.
    Up(Qmp),
    /// Nothing listens on the socket (no such file, or connection refused): the daemon is
    /// gone, so nothing has its files open through it.
    Gone(crate::error::Error),
}

/// Runs `f` with a fresh connection to the monitor at `path`, holding this process's lock
/// on that monitor for the whole call (so that a multi-command sequence is not interleaved
/// with another thread's). The connection is closed afterwards: another kiln process may
/// need the monitor next.
pub fn with_monitor<T>(path: &str, f: impl FnOnce(Monitor) -> Result<T>) -> Result<T> {
    let slot = {
        let mut map = MONITORS.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(path.to_string()).or_default().clone()
    };
    let _held = slot.lock().unwrap_or_else(|p| p.into_inner());
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => f(Monitor::Up(Qmp::handshake(stream, path, MONITOR_TIMEOUT)?)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            f(Monitor::Gone(crate::error::Error::unavailable(
                "hypervisor monitor",
                format!("QMP monitor {path}: {e} (the hypervisor is not running)"),
            )))
        }
        Err(e) => Err(crate::error::Error::unavailable(
            "hypervisor monitor",
            format!("QMP monitor {path}: {e}"),
        )),
    }
}

/// Like [`with_monitor`] for callers that need a live monitor: a gone one is an error.
pub fn with_live_monitor<T>(path: &str, f: impl FnOnce(&mut Qmp) -> Result<T>) -> Result<T> {
    with_monitor(path, |m| match m {
        Monitor::Up(mut q) => f(&mut q),
        Monitor::Gone(e) => Err(e),
    })
}

/// Whether `e` says a monitor could not be reached (as opposed to QEMU refusing a command).
pub fn is_unreachable(e: &crate::error::Error) -> bool {
    e.kind() == ErrorKind::Unavailable
}
