//! Runs lvm2 and device-mapper tools as argv vectors: `LC_ALL=C`, a timeout, the stderr of
//! successful commands logged at debug, known transient failures retried with backoff, every
//! other failure surfaced in the tool's own words as a `Backend` error.

use std::time::{Duration, Instant};

use kiln_core::{Error, Result};

/// How often a running command is polled for completion; short against lvm's 0.2-0.6 s runtimes.
const POLL: Duration = Duration::from_millis(10);

/// Attempts for a command marked [`Retry::Transient`] (first try included).
const ATTEMPTS: u32 = 4;

/// First backoff delay; doubled after every failed attempt.
const BACKOFF: Duration = Duration::from_millis(250);

/// Phrases lvm or the kernel print for conditions that clear on their own: a thin pool or
/// origin briefly suspended by another lvm command, a device still held open for a moment
/// after its last user closed it, or the VG lock taken by a concurrent lvm process.
const TRANSIENT: &[&str] = &[
    "suspended",
    "failed to suspend",
    "device or resource busy",
    "resource temporarily unavailable",
    "can't get lock",
    "failed to lock",
    "is locked by another",
];

/// Whether a failing command may be re-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// The command is idempotent or failed before changing anything on these messages: re-run
    /// it after a backoff when its error names a transient condition.
    Transient,
    /// Run once; any failure is final (commands that create objects, whose partial effects the
    /// caller must inspect instead of blindly repeating).
    Never,
}

/// Successful command output.
#[derive(Debug)]
pub(crate) struct Output {
    /// Standard output, lossily decoded.
    pub stdout: String,
}

/// Runs commands with one timeout; cheap to clone into blocking tasks.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    timeout: Duration,
}

impl Runner {
    /// A runner that kills any command still running after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Runner { timeout }
    }

    /// Runs `lvm <args…>`. `op` names the operation in errors and logs (e.g. "lvcreate").
    pub fn lvm(&self, op: &str, args: &[&str], retry: Retry) -> Result<Output> {
        self.run(op, "lvm", args, retry)
    }

    /// Runs `program <args…>` (dmsetup, thin_dump, …) under the same rules as [`Runner::lvm`].
    pub fn run(&self, op: &str, program: &str, args: &[&str], retry: Retry) -> Result<Output> {
        let mut delay = BACKOFF;
        let mut attempt = 1;
        loop {
            match self.run_once(op, program, args) {
                Ok(out) => return Ok(out),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Transient(e)) if retry == Retry::Transient && attempt < ATTEMPTS => {
                    tracing::info!(op, attempt, error = %e, "transient lvm failure; retrying");
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                Err(Failure::Transient(e)) => return Err(e),
            }
        }
    }

    fn run_once(&self, op: &str, program: &str, args: &[&str]) -> Result<Output, Failure> {
        let started = Instant::now();
        let handle = duct::cmd(program, args)
            .env("LC_ALL", "C")
            // lvm complains about every inherited descriptor; kiln's are close-on-exec anyway.
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin_null()
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .start()
            .map_err(|e| {
                Failure::Final(Error::backend(
                    op.to_string(),
                    format!("cannot run {program}: {e} (is lvm2 installed?)"),
                ))
            })?;
        let output = loop {
            match handle.try_wait() {
                Ok(Some(out)) => break out.clone(),
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = handle.kill();
                    tracing::error!(op, ?args, "command timed out");
                    return Err(Failure::Final(Error::backend(
                        op.to_string(),
                        format!(
                            "{program} {} did not finish within {} s and was killed",
                            args.join(" "),
                            self.timeout.as_secs()
                        ),
                    )));
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => {
                    return Err(Failure::Final(Error::backend(
                        op.to_string(),
                        format!("waiting for {program}: {e}"),
                    )));
                }
            }
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            tracing::debug!(op, ?args, elapsed_ms, "command ok");
            // Successful commands print notes on stderr ("Rounding up size to full physical
            // extent", thin over-provisioning): never a failure, and not worth a line on the
            // CLI's stderr at the default level (which promises one line, on failure only).
            for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
                tracing::debug!(op, "{program}: {line}");
            }
            return Ok(Output { stdout });
        }
        let code = output
            .status
            .code()
            .map_or("a signal".to_string(), |c| c.to_string());
        let message = if stderr.is_empty() {
            format!("{program} exited with {code}: {}", stdout.trim())
        } else {
            format!("{} (exit {code})", one_line(&stderr))
        };
        // (`error`, not `message`: a field called `message` would replace the event's own.)
        tracing::debug!(op, ?args, elapsed_ms, error = %message, "command failed");
        let e = Error::backend(op.to_string(), message);
        if is_transient(&stderr) {
            Err(Failure::Transient(e))
        } else {
            Err(Failure::Final(e))
        }
    }
}

enum Failure {
    Transient(Error),
    Final(Error),
}

/// Whether lvm's error text names a condition that is expected to clear by itself.
pub(crate) fn is_transient(stderr: &str) -> bool {
    let lower = stderr.to_ascii_lowercase();
    TRANSIENT.iter().any(|t| lower.contains(t))
}

/// Joins lvm's indented multi-line messages into one line for a `Backend` error.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_messages_are_recognised() {
        assert!(is_transient(
            "  Failed to suspend kiln/kiln-pool.\n  device-mapper: reload ioctl failed"
        ));
        assert!(is_transient(
            "  Logical volume vg/x in use: Device or resource busy"
        ));
        assert!(!is_transient("  Volume group \"vg\" not found"));
        assert!(!is_transient(
            "  Insufficient free space: 10 extents needed"
        ));
    }

    #[test]
    fn messages_become_one_line() {
        assert_eq!(one_line("  a\n\n  b  \n"), "a; b");
    }

    #[test]
    fn failures_carry_the_tools_own_words_and_timeouts_kill() {
        let r = Runner::new(Duration::from_secs(5));
        let e = r
            .run("ls", "ls", &["/definitely/not/here"], Retry::Never)
            .unwrap_err();
        assert!(e.to_string().contains("/definitely/not/here"), "{e}");
        let r = Runner::new(Duration::from_millis(200));
        let t = Instant::now();
        let e = r.run("sleep", "sleep", &["5"], Retry::Never).unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        let e = r
            .run("x", "no-such-program-kiln", &[], Retry::Never)
            .unwrap_err();
        assert!(e.to_string().contains("cannot run"), "{e}");
    }
}
