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

/// One slot per monitor socket path: this process's connection to that monitor (kept open
/// and reused: a monitor serves one client at a time, and a client that connects right
/// after another left was seen to be refused or never served, so this process never makes
/// two connections to one monitor, nor a new one per step), and the lock that serialises
/// its users.
static MONITORS: LazyLock<Mutex<HashMap<String, Slot>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// One monitor's connection (when open), behind the lock its users take in turn.
type Slot = Arc<Mutex<Option<Qmp>>>;

/// What asking for a monitor found.
pub enum Monitor<'a> {
    /// Connected (capabilities negotiated), for the caller's exclusive use meanwhile.
    Up(&'a mut Qmp),
    /// Nothing listens on the socket (no such file, or connection refused): the daemon is
    /// gone, or at least not serving through this socket.
    Gone(crate::error::Error),
}

/// Runs `f` with this process's connection to the monitor at `path` (made now, or reused
/// when it still answers), holding it for the whole call so that a multi-command sequence is
/// not interleaved with another thread's. A connection that failed to answer is dropped, so
/// the next call reconnects.
pub fn with_monitor<T>(path: &str, f: impl FnOnce(Monitor<'_>) -> Result<T>) -> Result<T> {
    let slot = {
        let mut map = MONITORS.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(path.to_string()).or_default().clone()
    };
    let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(q) = held.as_mut()
        && q.execute("query-version", None).is_err()
    {
        // The daemon restarted or went away since: start over.
        *held = None;
    }
    if held.is_none() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => *held = Some(Qmp::handshake(stream, path, MONITOR_TIMEOUT)?),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return f(Monitor::Gone(crate::error::Error::unavailable(
                    "hypervisor monitor",
                    format!("QMP monitor {path}: {e} (the hypervisor is not running)"),
                )));
            }
            Err(e) => {
                return Err(crate::error::Error::unavailable(
                    "hypervisor monitor",
                    format!("QMP monitor {path}: {e}"),
                ));
            }
        }
    }
    let Some(q) = held.as_mut() else {
        return Err(crate::error::Error::unavailable(
            "hypervisor monitor",
            format!("QMP monitor {path}: no connection"),
        ));
    };
    q.take_events();
    let r = f(Monitor::Up(q));
    if let Err(e) = &r
        && is_unreachable(e)
    {
        *held = None;
    }
    r
}

/// Like [`with_monitor`] for callers that need a live monitor: a gone one is an error.
pub fn with_live_monitor<T>(path: &str, f: impl FnOnce(&mut Qmp) -> Result<T>) -> Result<T> {
    with_monitor(path, |m| match m {
        Monitor::Up(q) => f(q),
        Monitor::Gone(e) => Err(e),
    })
}

/// Whether `e` says a monitor could not be reached (as opposed to QEMU refusing a command).
pub fn is_unreachable(e: &crate::error::Error) -> bool {
    e.kind() == ErrorKind::Unavailable
}
