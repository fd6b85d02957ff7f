//! A small NBD client (fixed newstyle handshake, simple replies) over a unix socket: how the
//! qcow2 volume writer talks to the `qemu-nbd` that serves a volume's active layer.
//!
//! Only what a writer needs: `NBD_OPT_GO` (with a fallback to `NBD_OPT_EXPORT_NAME` for a
//! server that does not know it), `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_FLUSH`
//! and `NBD_CMD_DISC`, one request in flight at a time. Every byte that comes from the
//! socket is checked before it is trusted: a malformed or unexpected answer is an error,
//! never a panic, and after a transport error the connection refuses further requests (its
//! framing is lost).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
const INFO_EXPORT: u16 = 0;

/// Transmission flags (what the export supports).
const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;

/// Largest payload sent in one request. The NBD protocol's default maximum when the
/// client does not negotiate block sizes, and qemu-nbd's own buffer limit: a larger
/// `NBD_CMD_WRITE` is refused (or drops the connection), so writes are split.
pub(crate) const MAX_PAYLOAD: u64 = 32 << 20;

/// Largest `NBD_CMD_WRITE_ZEROES` sent in one request: it carries no payload, so the
/// buffer limit does not bind it, but the length field is 32 bits; 1 GiB keeps each request
/// far below that and aligned to every qcow2 cluster size, so that whole clusters stay
/// whole (and become zero clusters) across the split.
const MAX_ZEROES: u64 = 1 << 30;

/// How long the handshake may take: qemu-nbd answers at once, and a server that says
/// nothing must not hang the writer's open forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest option reply accepted during the handshake (replies are a few bytes; a huge
/// length means the stream is not what we think it is).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// An error the NBD server answered a request with. NBD error values are Linux errno
/// values, so the `io::Error` that carries it has the matching kind; the code itself is
/// kept here for whoever needs it (`get_ref()` + `downcast_ref`).
#[derive(Debug)]
pub(crate) struct NbdError {
    /// The NBD error code of the reply.
    pub(crate) code: u32,
    /// The request that failed, for the message.
    what: String,
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errno = i32::try_from(self.code).unwrap_or(i32::MAX);
        write!(
            f,
            "{} failed: {} (NBD error {})",
            self.what,
            io::Error::from_raw_os_error(errno),
            self.code
        )
    }
}

impl std::error::Error for NbdError {}

fn nbd_error(code: u32, what: String) -> io::Error {
    let kind = i32::try_from(code)
        .map(|c| io::Error::from_raw_os_error(c).kind())
        .unwrap_or(io::ErrorKind::Other);
    io::Error::new(kind, NbdError { code, what })
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD protocol error: {}", msg.into()),
    )
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// One NBD connection to one export, in the transmission phase.
#[derive(Debug)]
pub(crate) struct NbdClient {
    sock: UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
    /// Set after a transport error: the request/reply framing can no longer be trusted.
    broken: bool,
}

impl NbdClient {
    /// Negotiates `export` on a connected socket (fixed newstyle; `NBD_OPT_GO`, or
    /// `NBD_OPT_EXPORT_NAME` when the server does not support it). Refuses a read-only
    /// export: the only user writes.
    pub(crate) fn handshake(sock: UnixStream, export: &str) -> io::Result<NbdClient> {
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut c = NbdClient {
            sock,
            size: 0,
            flags: 0,
            cookie: 0,
            broken: false,
        };
        let (size, flags) = c.negotiate(export)?;
        // Requests may legitimately take long (a 32 MiB write to a slow disk): from here
        // the server's own liveness, not a clock, ends a wait (it closes the socket).
        c.sock.set_read_timeout(None)?;
        c.sock.set_write_timeout(None)?;
        if flags & TF_HAS_FLAGS == 0 {
            return Err(protocol("the server sent no transmission flags"));
        }
        if flags & TF_READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the NBD export is read-only",
            ));
        }
        c.size = size;
        c.flags = flags;
        Ok(c)
    }

    fn negotiate(&mut self, export: &str) -> io::Result<(u64, u16)> {
        let mut hello = [0u8; 18];
        self.sock.read_exact(&mut hello)?;
        if be_u64(&hello[0..8]) != NBDMAGIC || be_u64(&hello[8..16]) != IHAVEOPT {
            return Err(protocol("not a newstyle NBD server"));
        }
        let server_flags = be_u16(&hello[16..18]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak fixed newstyle"));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let client_flags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
        self.sock.write_all(&client_flags.to_be_bytes())?;
        let name_len = u32::try_from(export.len()).map_err(|_| protocol("export name too long"))?;

        // NBD_OPT_GO: name length, name, no information requests (asking for block sizes
        // would make qemu-nbd enforce its alignment on every request; without it, qemu
        // handles unaligned requests itself).
        let mut go = Vec::with_capacity(4 + export.len() + 2);
        go.extend_from_slice(&name_len.to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &go)?;
        let mut export_info = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO => {
                    if data.len() >= 2 && be_u16(&data) == INFO_EXPORT {
                        if data.len() < 12 {
                            return Err(protocol("short NBD_INFO_EXPORT"));
                        }
                        export_info = Some((be_u64(&data[2..10]), be_u16(&data[10..12])));
                    }
                    // Other information (block sizes, names) is not needed.
                }
                REP_ACK => {
                    return export_info
                        .ok_or_else(|| protocol("NBD_OPT_GO succeeded without export info"));
                }
                REP_ERR_UNSUP => break,
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "the NBD server refused export {export:?} (reply {:#x}): {}",
                            k,
                            String::from_utf8_lossy(&data)
                        ),
                    ));
                }
                k => return Err(protocol(format!("unexpected option reply {k:#x}"))),
            }
        }

        // A server without NBD_OPT_GO: the old way, which answers with size and flags (or
        // closes the connection when it has no such export).
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut info = [0u8; 10];
        self.sock.read_exact(&mut info)?;
        if !no_zeroes {
            let mut pad = [0u8; 124];
            self.sock.read_exact(&mut pad)?;
        }
        Ok((be_u64(&info[0..8]), be_u16(&info[8..10])))
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("option too long"))?;
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&opt.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.sock.write_all(&msg)
    }

    /// One option reply to `opt`: (reply type, data).
    fn option_reply(&mut self, opt: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut head = [0u8; 20];
        self.sock.read_exact(&mut head)?;
        if be_u64(&head[0..8]) != OPT_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        if be_u32(&head[8..12]) != opt {
            return Err(protocol("option reply to another option"));
        }
        let kind = be_u32(&head[12..16]);
        let len = be_u32(&head[16..20]);
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data)?;
        Ok((kind, data))
    }

    /// The export's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server supports `NBD_CMD_WRITE_ZEROES`.
    pub(crate) fn can_write_zeroes(&self) -> bool {
        self.flags & TF_SEND_WRITE_ZEROES != 0
    }

    /// Sends one request and reads its simple reply. A transport error (or a reply that
    /// does not match) marks the connection broken; an error the server answered with
    /// leaves it usable.
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the NBD connection failed earlier",
            ));
        }
        self.cookie = self.cookie.wrapping_add(1);
        let cookie = self.cookie;
        let result = (|| {
            self.send_header(cmd, flags, cookie, offset, len)?;
            self.sock.write_all(payload)?;
            let mut reply = [0u8; 16];
            self.sock.read_exact(&mut reply)?;
            if be_u32(&reply[0..4]) != SIMPLE_REPLY_MAGIC {
                return Err(protocol("bad reply magic"));
            }
            if be_u64(&reply[8..16]) != cookie {
                return Err(protocol("reply to another request"));
            }
            Ok(be_u32(&reply[4..8]))
        })();
        match result {
            Ok(0) => Ok(()),
            Ok(code) => Err(nbd_error(
                code,
                format!("{} of {len} bytes at {offset}", command_name(cmd)),
            )),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    fn send_header(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.sock.write_all(&h)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of the NBD export ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`, in requests of at most [`MAX_PAYLOAD`] bytes that
    /// end on multiples of it (so a split of an aligned write stays aligned).
    pub(crate) fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0usize;
        for (off, len) in pieces(offset, data.len() as u64, MAX_PAYLOAD) {
            let n = len as usize; // at most MAX_PAYLOAD
            self.request(CMD_WRITE, 0, off, len as u32, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros with `NBD_CMD_WRITE_ZEROES`, without
    /// `NBD_CMD_FLAG_NO_HOLE`: the server may deallocate (qcow2 writes zero clusters).
    /// When the server cannot write zeroes, zero-filled writes do the same job.
    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if self.can_write_zeroes() {
            for (off, n) in pieces(offset, len, MAX_ZEROES) {
                self.request(CMD_WRITE_ZEROES, 0, off, n as u32, &[])?;
            }
            return Ok(());
        }
        let zeros = vec![0u8; len.min(MAX_PAYLOAD) as usize];
        for (off, n) in pieces(offset, len, MAX_PAYLOAD) {
            self.request(CMD_WRITE, 0, off, n as u32, &zeros[..n as usize])?;
        }
        Ok(())
    }

    /// Asks the server to make every completed write durable (`NBD_CMD_FLUSH`). A server
    /// that does not advertise flush has nothing to flush from its side: a no-op.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Ends the session politely (`NBD_CMD_DISC`, which has no reply) and closes the
    /// socket, so the server sees a clean disconnect rather than a vanished client.
    pub(crate) fn disconnect(mut self) -> io::Result<()> {
        let sent = if self.broken {
            Ok(())
        } else {
            self.cookie = self.cookie.wrapping_add(1);
            let cookie = self.cookie;
            self.send_header(CMD_DISC, 0, cookie, 0, 0)
        };
        let shut = self.sock.shutdown(std::net::Shutdown::Both);
        sent.and(shut.or_else(|e| {
            // The server may already have closed its end.
            if e.kind() == io::ErrorKind::NotConnected {
                Ok(())
            } else {
                Err(e)
            }
        }))
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_WRITE => "NBD write",
        CMD_WRITE_ZEROES => "NBD write-zeroes",
        CMD_FLUSH => "NBD flush",
        CMD_DISC => "NBD disconnect",
        _ => "NBD request",
    }
}

/// Splits `len` bytes at `offset` into (offset, length) pieces of at most `max` bytes, each
/// ending at a multiple of `max` or at the end.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut off = offset;
    std::iter::from_fn(move || {
        if off >= end {
            return None;
        }
        let next = ((off / max) + 1).saturating_mul(max).min(end);
        let piece = (off, next - off);
        off = next;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// One request as the fake server saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        zero_payload: bool,
    }

    /// A fake NBD server on the other end of a socket pair: fixed newstyle, answers
    /// `NBD_OPT_GO` (or refuses it), serves requests, answers `fail_code` to writes at
    /// `fail_at`, and reports every request it saw.
    fn fake_server(
        mut s: UnixStream,
        flags: u16,
        go: bool,
        fail_at: Option<(u64, u32)>,
        seen: mpsc::Sender<Seen>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let size: u64 = 256 << 20;
            let mut hello = Vec::new();
            hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&hello).unwrap();
            let mut cf = [0u8; 4];
            s.read_exact(&mut cf).unwrap();
            loop {
                let mut h = [0u8; 16];
                s.read_exact(&mut h).unwrap();
                let opt = be_u32(&h[8..12]);
                let mut data = vec![0u8; be_u32(&h[12..16]) as usize];
                s.read_exact(&mut data).unwrap();
                let reply = |s: &mut UnixStream, kind: u32, d: &[u8]| {
                    let mut r = Vec::new();
                    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
                    r.extend_from_slice(&opt.to_be_bytes());
                    r.extend_from_slice(&kind.to_be_bytes());
                    r.extend_from_slice(&(d.len() as u32).to_be_bytes());
                    r.extend_from_slice(d);
                    s.write_all(&r).unwrap();
                };
                match opt {
                    OPT_GO if go => {
                        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                        info.extend_from_slice(&size.to_be_bytes());
                        info.extend_from_slice(&flags.to_be_bytes());
                        reply(&mut s, REP_INFO, &info);
                        reply(&mut s, REP_ACK, &[]);
                        break;
                    }
                    OPT_GO => reply(&mut s, REP_ERR_UNSUP, b"no"),
                    OPT_EXPORT_NAME => {
                        s.write_all(&size.to_be_bytes()).unwrap();
                        s.write_all(&flags.to_be_bytes()).unwrap();
                        break;
                    }
                    _ => panic!("unexpected option {opt}"),
                }
            }
            loop {
                let mut h = [0u8; 28];
                if s.read_exact(&mut h).is_err() {
                    return;
                }
                let (flags, cmd) = (be_u16(&h[4..6]), be_u16(&h[6..8]));
                let (offset, len) = (be_u64(&h[16..24]), be_u32(&h[24..28]));
                let mut zero_payload = false;
                if cmd == CMD_WRITE {
                    let mut p = vec![0u8; len as usize];
                    s.read_exact(&mut p).unwrap();
                    zero_payload = p.iter().all(|b| *b == 0);
                }
                let _ = seen.send(Seen {
                    cmd,
                    flags,
                    offset,
                    len,
                    zero_payload,
                });
                if cmd == CMD_DISC {
                    return;
                }
                let code = match fail_at {
                    Some((o, c)) if o == offset => c,
                    _ => 0,
                };
                let mut r = Vec::new();
                r.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                r.extend_from_slice(&code.to_be_bytes());
                r.extend_from_slice(&h[8..16]);
                s.write_all(&r).unwrap();
            }
        })
    }

    const ALL: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_WRITE_ZEROES;

    #[test]
    fn pieces_end_on_multiples_of_the_limit() {
        let p: Vec<_> = pieces(10, 100, 32).collect();
        assert_eq!(p, vec![(10, 22), (32, 32), (64, 32), (96, 14)]);
        assert_eq!(pieces(5, 0, 32).count(), 0);
        assert_eq!(
            pieces(0, 64, 32).collect::<Vec<_>>(),
            vec![(0, 32), (32, 32)]
        );
    }

    #[test]
    fn large_writes_are_split_and_zeroes_may_unmap() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let server = fake_server(b, ALL, true, None, tx);
        let mut c = NbdClient::handshake(a, "").unwrap();
        assert_eq!(c.size(), 256 << 20);
        let data = vec![7u8; (70 << 20) + 5];
        c.write_at(3, &data).unwrap();
        c.write_zeroes(1 << 20, 3 << 20).unwrap();
        c.flush().unwrap();
        c.disconnect().unwrap();
        server.join().unwrap();
        let seen: Vec<Seen> = rx.iter().collect();
        let writes: Vec<(u64, u32)> = seen
            .iter()
            .filter(|s| s.cmd == CMD_WRITE)
            .map(|s| (s.offset, s.len))
            .collect();
        let m = MAX_PAYLOAD;
        assert_eq!(
            writes,
            vec![
                (3, (m - 3) as u32),
                (m, m as u32),
                (2 * m, ((70 << 20) + 8 - 2 * m) as u32)
            ]
        );
        let zeroes: Vec<&Seen> = seen.iter().filter(|s| s.cmd == CMD_WRITE_ZEROES).collect();
        assert_eq!(zeroes.len(), 1);
        assert_eq!((zeroes[0].offset, zeroes[0].len), (1 << 20, 3 << 20));
        assert_eq!(zeroes[0].flags, 0, "NO_HOLE must stay unset");
        let tail: Vec<u16> = seen.iter().rev().take(2).map(|s| s.cmd).collect();
        assert_eq!(tail, vec![CMD_DISC, CMD_FLUSH]);
    }

    #[test]
    fn zeroes_fall_back_to_writes_and_export_name_to_old_servers() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let server = fake_server(b, TF_HAS_FLAGS, false, None, tx);
        let mut c = NbdClient::handshake(a, "").unwrap();
        assert!(!c.can_write_zeroes());
        c.write_zeroes(0, (32 << 20) + 4096).unwrap();
        // No flush advertised: nothing sent.
        c.flush().unwrap();
        c.disconnect().unwrap();
        server.join().unwrap();
        let seen: Vec<Seen> = rx.iter().collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[..2]
                .iter()
                .all(|s| s.cmd == CMD_WRITE && s.zero_payload)
        );
        assert_eq!(seen[1].len, 4096);
        assert_eq!(seen[2].cmd, CMD_DISC);
    }

    #[test]
    fn server_errors_carry_the_nbd_code_and_range_errors_send_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let server = fake_server(b, ALL, true, Some((4096, 28)), tx);
        let mut c = NbdClient::handshake(a, "").unwrap();
        let e = c.write_at(4096, &[1u8; 512]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<NbdError>());
        assert_eq!(inner.map(|n| n.code), Some(28), "{e}");
        assert!(e.to_string().contains("NBD error 28"), "{e}");
        // The connection is still usable after an error reply.
        c.write_at(0, &[1u8; 512]).unwrap();
        let e = c.write_at((256 << 20) - 100, &[1u8; 512]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        c.disconnect().unwrap();
        server.join().unwrap();
        assert_eq!(
            rx.iter().count(),
            3,
            "the out-of-range write reached the server"
        );
    }

    #[test]
    fn a_read_only_export_or_a_non_nbd_peer_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, _rx) = mpsc::channel();
        let server = fake_server(b, TF_HAS_FLAGS | TF_READ_ONLY, true, None, tx);
        let e = NbdClient::handshake(a, "").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        server.join().unwrap();

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[0x55u8; 18]).unwrap();
        let e = NbdClient::handshake(a, "").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
