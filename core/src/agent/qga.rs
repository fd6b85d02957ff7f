//! A client of qemu-guest-agent (QGA) over the host-side unix socket of the agent's
//! channel, as a hypervisor exposes it. Synchronous, with a timeout on every read and write.
//!
//! Protocol (verified against qemu-ga 7.2): no greeting and no capabilities step; one JSON
//! object per line each way. The byte stream has no session boundaries — replies meant for
//! a client that went away can still arrive — so every connection starts with
//! `guest-sync-delimited`: a leading 0xFF resets the agent's parser (it answers that with
//! one parse error), and the agent writes 0xFF before the reply, so everything up to the
//! 0xFF is discarded and the reply must carry the same random id.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Longest reply line accepted (a freeze reply is a few bytes; this bounds a confused peer).
const MAX_LINE: usize = 64 << 10;

/// One connection to a guest agent.
pub struct Qga {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    path: String,
}

fn unavailable(path: &str, what: impl std::fmt::Display) -> Error {
    Error::unavailable("guest agent", format!("agent {path}: {what}"))
}

impl Qga {
    /// Connects to the agent socket at `path` and synchronises the stream; every later read
    /// or write waits at most `timeout`. An agent that does not answer within it is
    /// `Unavailable`.
    pub fn connect(path: &str, timeout: Duration) -> Result<Qga> {
        let stream = UnixStream::connect(Path::new(path)).map_err(|e| unavailable(path, e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| unavailable(path, e))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| unavailable(path, e))?);
        let mut q = Qga {
            writer: stream,
            reader,
            path: path.to_string(),
        };
        q.sync()?;
        Ok(q)
    }

    /// `guest-sync-delimited` with a fresh random id (see the module docs).
    fn sync(&mut self) -> Result<()> {
        let id = u64::from(rand_u32());
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.writer
            .write_all(&msg)
            .map_err(|e| unavailable(&self.path, format!("sync: {e}")))?;
        // Discard everything up to the agent's 0xFF, then read replies until ours.
        let mut skipped = Vec::new();
        self.reader
            .by_ref()
            .take(MAX_LINE as u64)
            .read_until(0xFF, &mut skipped)
            .map_err(|e| unavailable(&self.path, format!("sync: no answer ({e})")))?;
        if skipped.last() != Some(&0xFF) {
            return Err(unavailable(
                &self.path,
                "sync: the agent closed the channel",
            ));
        }
        for _ in 0..16 {
            let reply = self.read_reply()?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
        Err(unavailable(&self.path, "sync: no reply with our id"))
    }

    fn read_reply(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        self.reader
            .by_ref()
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| unavailable(&self.path, format!("no answer ({e})")))?;
        if line.is_empty() {
            return Err(unavailable(&self.path, "the agent closed the channel"));
        }
        // A stray 0xFF may precede a line after a resync.
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_start_matches('\u{FFFD}').trim();
        serde_json::from_str(text)
            .map_err(|e| unavailable(&self.path, format!("unreadable reply {text:?}: {e}")))
    }

    /// Runs one command and returns its `return` value; an agent error is a backend error
    /// naming the command and the agent's description.
    pub fn call(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| unavailable(&self.path, format!("{command}: {e}")))?;
        loop {
            let reply = self.read_reply()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(Error::backend(
                    "guest agent",
                    format!("agent {}: {command}: {desc}", self.path),
                ));
            }
            // Anything else (an event, a late reply) is not ours: read on.
        }
    }

    /// Freezes the guest's filesystems: the listed mountpoints with
    /// `guest-fsfreeze-freeze-list`, or every filesystem with `guest-fsfreeze-freeze` when
    /// `mountpoints` is empty. Returns how many were frozen. A list whose count does not
    /// match (the agent silently skips unknown or misspelled mountpoints) is thawed again
    /// and refused, as is a freeze that froze nothing.
    pub fn freeze(&mut self, mountpoints: &[String]) -> Result<u64> {
        let r = if mountpoints.is_empty() {
            self.call("guest-fsfreeze-freeze", None)?
        } else {
            self.call(
                "guest-fsfreeze-freeze-list",
                Some(json!({ "mountpoints": mountpoints })),
            )?
        };
        let n = r.as_u64().unwrap_or(0);
        let expected = if mountpoints.is_empty() {
            None
        } else {
            Some(mountpoints.len() as u64)
        };
        if n == 0 || expected.is_some_and(|e| e != n) {
            let _ = self.thaw();
            return Err(Error::backend(
                "guest agent",
                match expected {
                    Some(e) => format!(
                        "agent {} froze {n} of the {e} mountpoint(s) {mountpoints:?}: a mountpoint is \
                         unknown to the guest or not spelled exactly as mounted (no trailing '/'); thawed",
                        self.path
                    ),
                    None => format!("agent {} froze no filesystem", self.path),
                },
            ));
        }
        Ok(n)
    }

    /// `guest-fsfreeze-thaw`: how many filesystems were thawed (0 when none was frozen).
    pub fn thaw(&mut self) -> Result<u64> {
        Ok(self
            .call("guest-fsfreeze-thaw", None)?
            .as_u64()
            .unwrap_or(0))
    }

    /// `guest-fsfreeze-status`: `"frozen"` or `"thawed"`.
    pub fn status(&mut self) -> Result<String> {
        Ok(self
            .call("guest-fsfreeze-status", None)?
            .as_str()
            .unwrap_or("unknown")
            .to_string())
    }
}

/// A random id for `guest-sync-delimited` (the agent echoes it; uniqueness per connection
/// is all that matters).
fn rand_u32() -> u32 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
}
