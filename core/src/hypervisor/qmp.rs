//! A client of the QEMU Machine Protocol (QMP) over the unix socket of a QEMU or
//! `qemu-storage-daemon` monitor: the hypervisor that has an instance's qcow2 volumes open.
//! Synchronous, with a timeout on every read and write.
//!
//! Protocol (verified against qemu-storage-daemon 10.0): the server greets with
//! `{"QMP": {...}}`; every command fails until `qmp_capabilities`; then one JSON object per
//! line each way. Events (`{"event": ...}`) can arrive between a command and its reply, so
//! each command carries a fresh `id` and replies are matched by it; events are queued for
//! [`Qmp::take_events`].
//!
//! A monitor socket serves one client at a time: a second client that connects meanwhile
//! gets no greeting (and was seen not to be served even after the first left). A greeting
//! that does not come within the timeout is therefore reported as a busy or unresponsive
//! monitor, not as a dead one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// How long a job may stay paused before [`Qmp::finish_job`] gives up on it.
const PAUSED_LIMIT: Duration = Duration::from_secs(60);

/// Longest line accepted (`query-named-block-nodes` of a deep chain is a few hundred KiB).
const MAX_LINE: usize = 16 << 20;

/// One connection to a QMP monitor, past capabilities negotiation.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    path: String,
    next_id: u64,
    events: Vec<Value>,
}

/// How a monitor could not be reached.
fn unavailable(path: &str, what: impl std::fmt::Display) -> Error {
    Error::unavailable("hypervisor monitor", format!("QMP monitor {path}: {what}"))
}

/// One block node as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    /// The node's name.
    pub node_name: String,
    /// Its block driver (`qcow2`, `file`, `raw`, ...).
    pub driver: String,
    /// The filename it has open (for a format node, its protocol child's file).
    pub file: String,
    /// Its backing file's name, as the image header (or the graph) names it.
    pub backing_file: Option<String>,
    /// Whether it is open read-only.
    pub read_only: bool,
}

/// One block job as `query-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// `created`, `running`, `ready`, `waiting`, `pending`, `concluded`, ...
    pub status: String,
    /// Work done, in the job's own unit (bytes for commit and stream).
    pub current: u64,
    /// Work in all (an estimate that may grow).
    pub total: u64,
    /// Why it failed, once concluded.
    pub error: Option<String>,
}

impl BlockNode {
    /// The image file this node reads and writes: [`BlockNode::file`], unless QEMU reports
    /// that as a `json:{...}` pseudo-filename (it does for a node whose backing was set by
    /// the graph rather than by its header, such as an overlay put on top by
    /// `blockdev-snapshot`); then the protocol child's `file.filename` inside it.
    pub fn image_file(&self) -> String {
        self.file
            .strip_prefix("json:")
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
            .and_then(|v| {
                v.pointer("/file/filename")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| self.file.clone())
    }
}

impl Qmp {
    /// Connects to the monitor socket at `path`, reads the greeting and negotiates
    /// capabilities; every later read or write waits at most `timeout`. Anything that is not
    /// a QMP monitor answering within `timeout` is `Unavailable`.
    pub fn connect(path: &str, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(Path::new(path)).map_err(|e| unavailable(path, e))?;
        Qmp::handshake(stream, path, timeout)
    }

    /// [`Qmp::connect`] on a stream already connected to `path`.
    pub fn handshake(stream: UnixStream, path: &str, timeout: Duration) -> Result<Qmp> {
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| unavailable(path, e))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| unavailable(path, e))?);
        let mut q = Qmp {
            writer: stream,
            reader,
            path: path.to_string(),
            next_id: 1,
            events: Vec::new(),
        };
        // A peer that starts with anything but a JSON object is no monitor: say so at once
        // rather than wait for a line that may never end (an NBD server's greeting has no
        // newline).
        let buf = q.reader.fill_buf().map_err(|e| {
            unavailable(
                path,
                format!(
                    "no QMP greeting ({e}); the socket is not a QMP monitor, or another client \
                     is connected to it (a monitor serves one client at a time)"
                ),
            )
        })?;
        if let Some(&first) = buf.first()
            && first != b'{'
        {
            let shown: String = String::from_utf8_lossy(&buf[..buf.len().min(16)])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            return Err(unavailable(
                path,
                format!("not a QMP monitor (it sent {shown:?} instead of a QMP greeting)"),
            ));
        }
        let greeting = q.read_line().map_err(|e| {
            unavailable(
                path,
                format!(
                    "no QMP greeting ({e}); the socket is not a QMP monitor, or another client \
                     is connected to it (a monitor serves one client at a time)"
                ),
            )
        })?;
        if greeting.get("QMP").is_none() {
            return Err(unavailable(
                path,
                format!("not a QMP monitor (it greeted with {greeting})"),
            ));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The socket path this connection was made to.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn read_line(&mut self) -> Result<Value> {
        self.read_message().map_err(|e| match e {
            ReadFailure::TimedOut(e) => unavailable(&self.path, format!("no answer ({e})")),
            ReadFailure::Failed(e) => e,
        })
    }

    /// One message; a read that timed out is told apart from a broken connection.
    fn read_message(&mut self) -> std::result::Result<Value, ReadFailure> {
        let mut line = Vec::new();
        if let Err(e) = self
            .reader
            .by_ref()
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            return Err(
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && line.is_empty()
                {
                    ReadFailure::TimedOut(e)
                } else {
                    ReadFailure::Failed(unavailable(&self.path, format!("no answer ({e})")))
                },
            );
        }
        if line.is_empty() {
            return Err(ReadFailure::Failed(unavailable(
                &self.path,
                "the monitor closed the connection",
            )));
        }
        let text = String::from_utf8_lossy(&line);
        serde_json::from_str(text.trim()).map_err(|e| {
            ReadFailure::Failed(unavailable(
                &self.path,
                format!("unreadable message {:?}: {e}", text.trim()),
            ))
        })
    }

    /// Runs one command and returns its `return` value. A QMP error is a backend error naming
    /// the command and QEMU's description; events that arrive meanwhile are queued.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| unavailable(&self.path, format!("{command}: {e}")))?;
        tracing::trace!(monitor = %self.path, command = %line.trim_end(), "QMP command sent");
        loop {
            let reply = self.read_line()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to a command of an earlier connection's client: not ours.
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            let desc = reply
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("no description");
            return Err(Error::backend(
                "hypervisor monitor",
                format!("QMP {command} on {}: {desc}", self.path),
            ));
        }
    }

    /// The events received so far (oldest first), emptying the queue.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Waits until an event satisfying `pred` arrives (queued ones count), at most `limit`;
    /// returns it. Other events stay queued.
    pub fn wait_event(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.events.iter().position(&mut pred) {
                return Ok(self.events.remove(i));
            }
            if start.elapsed() >= limit {
                return Err(unavailable(
                    &self.path,
                    format!("the awaited event did not come within {limit:?}"),
                ));
            }
            // A read times out after the connection's timeout; a quiet monitor is not an
            // error while the limit lasts.
            match self.read_message() {
                Ok(msg) if msg.get("event").is_some() => self.events.push(msg),
                Ok(_) => {}
                Err(ReadFailure::TimedOut(_)) => {}
                Err(ReadFailure::Failed(e)) => return Err(e),
            }
        }
    }

    /// Waits up to `wait` for the next event (queued for [`Qmp::take_events`]), returning as
    /// soon as one arrives; a quiet monitor is not an error. The connection's own timeout
    /// is restored afterwards.
    pub fn pump_events(&mut self, wait: Duration) -> Result<()> {
        let normal = self.writer.read_timeout().ok().flatten();
        let path = self.path.clone();
        let set = move |s: &UnixStream, t: Option<Duration>| {
            s.set_read_timeout(t).map_err(|e| unavailable(&path, e))
        };
        set(
            self.reader.get_ref(),
            Some(wait.max(Duration::from_millis(1))),
        )?;
        let start = Instant::now();
        let r = loop {
            match self.read_message() {
                Ok(msg) if msg.get("event").is_some() => {
                    self.events.push(msg);
                    break Ok(());
                }
                Ok(_) => {}
                Err(ReadFailure::TimedOut(_)) => break Ok(()),
                Err(ReadFailure::Failed(e)) => break Err(e),
            }
            if start.elapsed() >= wait {
                break Ok(());
            }
        };
        set(self.reader.get_ref(), normal)?;
        r
    }

    /// Every job the monitor knows (`query-jobs`).
    pub fn jobs(&mut self) -> Result<Vec<Job>> {
        let r = self.execute("query-jobs", None)?;
        Ok(r.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| {
                        Some(Job {
                            id: j.get("id")?.as_str()?.to_string(),
                            status: j.get("status")?.as_str()?.to_string(),
                            current: j
                                .get("current-progress")
                                .and_then(Value::as_u64)
                                .unwrap_or(0),
                            total: j.get("total-progress").and_then(Value::as_u64).unwrap_or(0),
                            error: j.get("error").and_then(Value::as_str).map(String::from),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Drives job `id` until it concludes: completes it when it is ready (an active commit
    /// waits for that), reports `(done, total)` progress as it goes. Returns the concluded
    /// job, not yet dismissed (its `error` says whether it failed): the caller records the
    /// outcome first, then calls [`Qmp::dismiss_job`], so that a crash in between still finds
    /// the job's verdict. A job the monitor does not know is `NotFound`.
    pub fn finish_job(&mut self, id: &str, mut progress: impl FnMut(u64, u64)) -> Result<Job> {
        let mut paused_since: Option<Instant> = None;
        // job-complete once: the job may still show `ready` right after it.
        let mut completing = false;
        loop {
            let Some(job) = self.jobs()?.into_iter().find(|j| j.id == id) else {
                return Err(Error::not_found("hypervisor job", id));
            };
            progress(job.current, job.total);
            match job.status.as_str() {
                "ready" if !completing => {
                    self.execute("job-complete", Some(json!({ "id": id })))?;
                    completing = true;
                }
                "concluded" => return Ok(job),
                // Paused (briefly while a node drains; for good when someone paused it or it
                // stopped on an I/O error): a job paused for long would never end by itself.
                "paused" | "standby" => {
                    let since = *paused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > PAUSED_LIMIT {
                        return Err(unavailable(
                            &self.path,
                            format!(
                                "job {id} has been {} for {PAUSED_LIMIT:?} (paused by someone, \
                                 or stopped on an I/O error)",
                                job.status
                            ),
                        ));
                    }
                }
                _ => paused_since = None,
            }
            self.take_events();
            self.pump_events(Duration::from_millis(50))?;
        }
    }

    /// `job-dismiss` of a concluded job.
    pub fn dismiss_job(&mut self, id: &str) -> Result<()> {
        self.execute("job-dismiss", Some(json!({ "id": id })))?;
        Ok(())
    }

    /// Every named block node (`query-named-block-nodes`, flat).
    pub fn block_nodes(&mut self) -> Result<Vec<BlockNode>> {
        let r = self.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
        let nodes = r
            .as_array()
            .ok_or_else(|| unavailable(&self.path, "query-named-block-nodes returned no list"))?;
        Ok(nodes
            .iter()
            .filter_map(|n| {
                Some(BlockNode {
                    node_name: n.get("node-name")?.as_str()?.to_string(),
                    driver: n.get("drv")?.as_str()?.to_string(),
                    file: n.get("file")?.as_str()?.to_string(),
                    backing_file: n
                        .get("backing_file")
                        .and_then(Value::as_str)
                        .map(String::from),
                    read_only: n.get("ro").and_then(Value::as_bool).unwrap_or(false),
                })
            })
            .collect())
    }

    /// Opens the qcow2 file `path` as node `node` with no backing (`backing: null`: the
    /// transaction's `blockdev-snapshot` attaches it on top of the current top node).
    pub fn add_overlay(&mut self, node: &str, path: &Path) -> Result<()> {
        self.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": node,
                "backing": null,
                "file": {"driver": "file", "filename": path.to_string_lossy()},
            })),
        )?;
        Ok(())
    }

    /// One `transaction` of `blockdev-snapshot` actions, one per `(top node, overlay node)`:
    /// every overlay goes on top of its node at one instant (QEMU drains all of them
    /// together), or none does.
    pub fn snapshot_transaction(&mut self, pairs: &[(String, String)]) -> Result<()> {
        let actions: Vec<Value> = pairs
            .iter()
            .map(|(node, overlay)| {
                json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}})
            })
            .collect();
        self.execute("transaction", Some(json!({ "actions": actions })))?;
        Ok(())
    }

    /// `blockdev-del` of a node kiln added.
    pub fn delete_node(&mut self, node: &str) -> Result<()> {
        self.execute("blockdev-del", Some(json!({ "node-name": node })))?;
        Ok(())
    }
}

/// A failed read: a timeout (the monitor is quiet) or anything else.
enum ReadFailure {
    TimedOut(std::io::Error),
    Failed(Error),
}

/// Whether `name` is a valid QMP node name: starts with a letter, then letters, digits,
/// `-`, `.` and `_`, at most 31 characters (QEMU refuses anything else).
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= 31
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_pseudo_filename_names_its_protocol_file() {
        let n = |file: &str| BlockNode {
            node_name: "o".into(),
            driver: "qcow2".into(),
            file: file.into(),
            backing_file: None,
            read_only: false,
        };
        let json = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/v/base.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/v/ov.qcow2"}}"#;
        assert_eq!(n(json).image_file(), "/v/ov.qcow2");
        assert_eq!(n("/v/base.qcow2").image_file(), "/v/base.qcow2");
        assert_eq!(n("json:{broken").image_file(), "json:{broken");
    }

    #[test]
    fn node_names_follow_qemus_rules() {
        assert!(valid_node_name("vol1"));
        assert!(valid_node_name("kiln-0123456789abcdef01234567"));
        assert!(valid_node_name(&"a".repeat(31)));
        assert!(!valid_node_name(&"a".repeat(32)));
        assert!(!valid_node_name("1abc"));
        assert!(!valid_node_name("with space"));
        assert!(!valid_node_name("#block1"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("a;rm"));
    }
}
