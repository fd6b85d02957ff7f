//! Guest agents: the bounded freeze an instance snapshot takes, and the thaw that must
//! happen whatever becomes of kiln.
//!
//! The freeze is held by a **guard process**, not by kiln: kiln starts the guard (its own
//! process group, so a Ctrl-C aimed at kiln does not reach it) with a pipe on its stdin; the
//! guard connects to the agent, freezes, reports, and then thaws on the first of
//! - kiln asking for it (`thaw` on the pipe),
//! - the pipe closing — kiln died, even by SIGKILL or the OOM killer,
//! - the freeze deadline.
//!
//! The guard is the channel's only client for the whole window (a hypervisor's agent
//! channel serves one client at a time), and it keeps the deadline even if kiln hangs.
//! After a thaw it says which of the three it was, so kiln knows whether its snapshots
//! were cut inside the window. Recovery at the next start also asks the agent and thaws a
//! guest it finds frozen (see [`GuestAgents::thaw_if_frozen`]).

pub mod qga;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use qga::Qga;

/// What a freeze needs.
#[derive(Debug, Clone)]
pub struct FreezeRequest {
    /// Host-side unix socket of the agent channel.
    pub agent: String,
    /// Mountpoints to freeze (`guest-fsfreeze-freeze-list`); empty = every filesystem.
    pub mountpoints: Vec<String>,
    /// Longest time the guest stays frozen: the guard thaws at this deadline whatever
    /// kiln is doing.
    pub deadline: Duration,
    /// Longest wait for any one answer of the agent.
    pub timeout: Duration,
}

/// How a freeze ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thawed {
    /// The guard thawed at the deadline, before kiln asked: what was cut after it is not
    /// inside the window.
    pub by_deadline: bool,
    /// From the freeze request to the thaw reply, as the guard measured it (ms).
    pub window_ms: f64,
    /// The thaw request's own round trip (ms), part of the window.
    pub thaw_ms: f64,
}

/// A guest held frozen; dropping it without [`Frozen::thaw`] thaws too (the guard sees its
/// pipe close).
#[async_trait]
pub trait Frozen: Send {
    /// How many filesystems the agent froze.
    fn count(&self) -> u64;
    /// The freeze request's own round trip (ms): the guest syncing and freezing its
    /// filesystems, the first part of the window.
    fn freeze_ms(&self) -> f64;
    /// Thaws (or learns that the deadline already did) and reports how.
    async fn thaw(self: Box<Self>) -> Result<Thawed>;
}

/// Access to guest agents.
#[async_trait]
pub trait GuestAgents: Send + Sync {
    /// Freezes the guest behind `req.agent` under a guard (see the module docs). An agent
    /// that cannot be reached or does not answer is [`ErrorKind::Unavailable`].
    async fn freeze(&self, req: FreezeRequest) -> Result<Box<dyn Frozen>>;
    /// Asks the agent whether the guest is frozen and thaws it if so (recovery after a
    /// crash). `Ok(true)` when it was frozen.
    async fn thaw_if_frozen(&self, agent: &str, timeout: Duration) -> Result<bool>;
}

/// [`GuestAgents`] whose guards are child processes running `program args...` — the kiln
/// binary's hidden `agent-guard` command, which calls [`run_guard`].
pub struct ProcessAgents {
    program: PathBuf,
    args: Vec<String>,
}

impl ProcessAgents {
    /// Guards run as `program args... --agent A [--mountpoint M]... --deadline-ms D
    /// --timeout-ms T`.
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        ProcessAgents { program, args }
    }
}

struct GuardProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    count: u64,
    freeze_ms: f64,
}

fn guard_failed(what: impl std::fmt::Display) -> Error {
    Error::backend("guest agent", format!("freeze guard: {what}"))
}

fn read_line(r: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(guard_failed)?;
    if line.is_empty() {
        return Err(guard_failed("exited without an answer"));
    }
    Ok(line.trim_end().to_string())
}

/// Parses a number of the guard's line `line`.
fn number<T: std::str::FromStr>(line: &str, field: Option<&str>) -> Result<T> {
    field
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| guard_failed(format!("bad line {line:?}")))
}

/// Parses `thawed request|deadline <window ms> <thaw ms>`.
fn parse_thawed(line: &str) -> Result<Thawed> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("thawed"), Some(how)) => Ok(Thawed {
            by_deadline: how == "deadline",
            window_ms: number(line, parts.next())?,
            thaw_ms: number(line, parts.next())?,
        }),
        _ => Err(guard_failed(format!("unexpected answer {line:?}"))),
    }
}

#[async_trait]
impl Frozen for GuardProcess {
    fn count(&self) -> u64 {
        self.count
    }

    fn freeze_ms(&self) -> f64 {
        self.freeze_ms
    }

    async fn thaw(mut self: Box<Self>) -> Result<Thawed> {
        tokio::task::spawn_blocking(move || {
            if let Some(mut stdin) = self.stdin.take() {
                // A write error means the guard already exited after a deadline thaw; its
                // answer is still in the pipe.
                let _ = stdin.write_all(b"thaw\n").and_then(|()| stdin.flush());
            }
            let line = read_line(&mut self.stdout);
            let _ = self.child.wait();
            parse_thawed(&line?)
        })
        .await
        .map_err(guard_failed)?
    }
}

impl Drop for GuardProcess {
    fn drop(&mut self) {
        // Closing stdin tells the guard to thaw now; reap it so no zombie is left.
        self.stdin.take();
        let _ = self.child.wait();
    }
}

#[async_trait]
impl GuestAgents for ProcessAgents {
    async fn freeze(&self, req: FreezeRequest) -> Result<Box<dyn Frozen>> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg("--agent")
            .arg(&req.agent)
            .arg("--deadline-ms")
            .arg(req.deadline.as_millis().to_string())
            .arg("--timeout-ms")
            .arg(req.timeout.as_millis().to_string());
        for m in &req.mountpoints {
            cmd.arg("--mountpoint").arg(m);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // Its own process group: a terminal's Ctrl-C stops kiln, never the guard.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().map_err(guard_failed)?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(guard_failed("no pipes"));
            };
            let mut g = GuardProcess {
                child,
                stdin: Some(stdin),
                stdout: BufReader::new(stdout),
                count: 0,
                freeze_ms: 0.0,
            };
            let line = read_line(&mut g.stdout)?;
            if let Some(rest) = line.strip_prefix("frozen ") {
                let mut parts = rest.split(' ');
                g.count = number(&line, parts.next())?;
                g.freeze_ms = number(&line, parts.next())?;
                return Ok(Box::new(g) as Box<dyn Frozen>);
            }
            Err(error_line(&line))
        })
        .await
        .map_err(guard_failed)?
    }

    async fn thaw_if_frozen(&self, agent: &str, timeout: Duration) -> Result<bool> {
        let agent = agent.to_string();
        tokio::task::spawn_blocking(move || {
            let mut q = Qga::connect(&agent, timeout)?;
            if q.status()? == "frozen" {
                q.thaw()?;
                Ok(true)
            } else {
                Ok(false)
            }
        })
        .await
        .map_err(guard_failed)?
    }
}

/// `error <kind> <message>` from the guard, back into an error of that kind.
fn error_line(line: &str) -> Error {
    let rest = line.strip_prefix("error ").unwrap_or(line);
    let (kind, msg) = rest.split_once(' ').unwrap_or(("backend", rest));
    match kind {
        "unavailable" => Error::unavailable("guest agent", msg.to_string()),
        _ => Error::backend("guest agent", msg.to_string()),
    }
}

/// How long the guard keeps retrying a thaw that fails (the agent restarting, the channel
/// briefly gone): a guest must not stay frozen because one thaw call failed.
const THAW_RETRY_FOR: Duration = Duration::from_secs(30);

/// Thaws, reconnecting and retrying for a while if the connection broke.
fn thaw_hard(q: &mut Option<Qga>, req: &FreezeRequest) -> bool {
    let until = Instant::now() + THAW_RETRY_FOR;
    loop {
        if let Some(c) = q.as_mut()
            && c.thaw().is_ok()
        {
            return true;
        }
        *q = None;
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
        *q = Qga::connect(&req.agent, req.timeout).ok();
    }
}

/// The guard's body (the kiln binary's hidden `agent-guard` command): freeze, report
/// `frozen <count> <freeze ms>` on `out`, then thaw on `thaw` from `input`, on `input`
/// closing, or at the deadline, and report `thawed request|deadline <window ms> <thaw ms>`. A failure before the freeze is
/// reported as `error <kind> <message>`. Returns the process exit code.
pub fn run_guard(
    req: &FreezeRequest,
    input: impl std::io::Read + Send + 'static,
    mut out: impl Write,
) -> i32 {
    // The window (and the deadline) start at the freeze request, not at the connection.
    let mut started = Instant::now();
    let frozen = Qga::connect(&req.agent, req.timeout).and_then(|mut q| {
        started = Instant::now();
        let n = q.freeze(&req.mountpoints)?;
        Ok((q, n))
    });
    let (q, n) = match frozen {
        Ok(v) => v,
        Err(e) => {
            let kind = if e.kind() == ErrorKind::Unavailable {
                "unavailable"
            } else {
                "backend"
            };
            let _ = writeln!(out, "error {kind} {}", e.to_string().replace('\n', " "));
            return 1;
        }
    };
    let freeze_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut q = Some(q);
    if writeln!(out, "frozen {n} {freeze_ms:.3}")
        .and_then(|()| out.flush())
        .is_err()
    {
        // Nobody to report to: kiln is gone.
        thaw_hard(&mut q, req);
        return 1;
    }
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(input).lines();
        while let Some(Ok(l)) = lines.next() {
            if tx.send(l).is_err() {
                return;
            }
        }
        // EOF: dropping `tx` tells the guard.
    });
    let remaining = req.deadline.saturating_sub(started.elapsed());
    let how = match rx.recv_timeout(remaining) {
        Ok(_) => "request",
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            thaw_hard(&mut q, req);
            return 0;
        }
        Err(mpsc::RecvTimeoutError::Timeout) => "deadline",
    };
    let thaw_started = Instant::now();
    let ok = thaw_hard(&mut q, req);
    let window_ms = started.elapsed().as_secs_f64() * 1e3;
    let thaw_ms = thaw_started.elapsed().as_secs_f64() * 1e3;
    if how == "deadline" {
        // Wait for kiln to ask (or to die) before answering, so the answer is the one it reads.
        let _ = rx.recv();
    }
    if !ok {
        let _ = writeln!(
            out,
            "error backend agent {}: thaw failed for 30 s",
            req.agent
        );
        return 1;
    }
    let _ = writeln!(out, "thawed {how} {window_ms:.3} {thaw_ms:.3}").and_then(|()| out.flush());
    0
}
