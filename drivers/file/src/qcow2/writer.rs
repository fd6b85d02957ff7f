//! Writing a detached qcow2 volume's data (restores, applied diff streams).
//!
//! The data goes into the volume's active layer with qcow2's own semantics (copy-on-write of
//! partial clusters above the backing files, zero clusters for zeroed ranges), so kiln never
//! interprets the format itself: a `qemu-nbd` serves the active file over a unix socket and
//! the writer speaks NBD to it ([`super::nbd`]). qemu opens the backing chain read-only, as
//! it always does, so no snapshot's frozen file can change.
//!
//! The writer holds the volume's flock from open to finish (or drop), like every other
//! qcow2 operation, so no snapshot, revert or delete switches or merges the chain under it.
//!
//! `qemu-nbd` is started from a thread of the writer's own that lives exactly as long as the
//! process: the child dies with kiln ([`sys::dies_with_parent`]) and that death signal fires
//! when the *thread* that forked it exits. A writer is opened on one blocking-pool thread and
//! used from others, and an idle pool thread exits after a while; forking from it would kill
//! qemu-nbd in the middle of a restore.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{Error, Result, Volume, VolumeWriter};

use super::nbd::NbdClient;
use super::{Locked, lock_required, volume_dir};
use crate::Backend;
use crate::sys::{self, io_ctx};

/// The program, looked up through `PATH` (Debian package qemu-utils, like qemu-img).
const QEMU_NBD: &str = "qemu-nbd";

/// How long qemu-nbd may take to start listening. It opens the image chain and binds the
/// socket in milliseconds; this only bounds a qemu-nbd that hangs (an unreachable
/// filesystem) so the open fails instead of hanging the caller.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How long qemu-nbd may take to exit once its only client has left (it closes the image,
/// writing back qcow2 metadata caches). Past it, it is killed and the finish fails.
const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// Poll interval while waiting for the socket to accept connections.
const POLL: Duration = Duration::from_millis(5);

/// Longest unix socket path: `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Prefix of the sockets in the backend directory: `.nbd-<pid>-<random>.sock`. The pid
/// lets a later open remove the socket of a kiln that was killed (qemu-nbd, killed with
/// it, could not unlink it).
const SOCKET_PREFIX: &str = ".nbd-";

/// Prefix of the private directories in the system temp directory used when the backend
/// directory's path is too long for a socket path.
const PRIVATE_DIR_PREFIX: &str = "kiln-nbd-";

/// Volume directories that have an open writer in this process. The volume's flock is
/// blocking (every other operation waits for it), which would make a second writer wait
/// until the first one finishes, possibly forever; a second writer is refused instead.
static OPEN_WRITERS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// This process's claim on writing a volume, released when dropped.
struct Claim(PathBuf);

impl Claim {
    fn take(vdir: &Path, v: &Volume) -> Result<Claim> {
        let mut open = OPEN_WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        if !open.insert(vdir.to_path_buf()) {
            return Err(busy(v));
        }
        Ok(Claim(vdir.to_path_buf()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut open = OPEN_WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&self.0);
    }
}

fn busy(v: &Volume) -> Error {
    Error::unavailable(
        "open volume writer",
        format!(
            "volume {} is locked by another operation (a writer may be open on it); retry \
             once it is done",
            v.id
        ),
    )
}

/// Whether another open file description holds the flock of `vdir` right now (another kiln
/// process's operation or writer). Asked without blocking, and the probe lock is released
/// at once: the real lock is then taken the usual way.
fn flock_held(vdir: &Path) -> Result<bool> {
    let f = match File::open(vdir) {
        Ok(f) => f,
        // Let the real lock report a missing volume.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("open lock {}", vdir.display()), e)),
    };
    // SAFETY: plain syscall on an fd owned by `f`, which stays open for the call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(false); // closing `f` releases it
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(true)
    } else {
        Err(Error::io(format!("flock {}", vdir.display()), e))
    }
}

/// Opens volume `v`'s active layer for writing through a private `qemu-nbd`. Refused
/// (`Unavailable`) while another writer of this process has the volume open, or while
/// another process holds the volume's lock; `Unavailable` as well when qemu refuses the
/// image lock (a hypervisor has the active file open).
pub(crate) fn open_volume_writer(b: &Backend, v: &Volume) -> Result<Box<dyn VolumeWriter>> {
    let vdir = volume_dir(&b.dir, &v.id);
    let claim = Claim::take(&vdir, v)?;
    if flock_held(&vdir)? {
        return Err(busy(v));
    }
    let lock = lock_required(&b.dir, &v.id)?;
    let active = lock.path(&lock.chain.active);
    let size = lock.chain.size_bytes;
    let (mut server, client) = QemuNbd::start(&b.dir, &lock.dir, &lock.chain.active)?;
    if client.size() < size {
        let msg = format!(
            "qemu-nbd exports {} as {} bytes, but the volume has {size}",
            active.display(),
            client.size()
        );
        drop(client.disconnect());
        drop(server.wait_exit());
        return Err(Error::backend("open volume writer", msg));
    }
    tracing::debug!(volume = %v.id, active = %active.display(), socket = %server.socket.display(), pid = server.pid, "qcow2 volume writer open");
    Ok(Box::new(Qcow2Writer {
        client: Some(client),
        server: Some(server),
        active,
        size,
        failed: None,
        lock: Some(lock),
        _claim: claim,
    }))
}

/// Writes into a qcow2 volume's active layer through `qemu-nbd`.
struct Qcow2Writer {
    client: Option<NbdClient>,
    server: Option<QemuNbd>,
    active: PathBuf,
    size: u64,
    /// The first write or zero that failed: `finish` must not report success after it,
    /// even if the caller went on.
    failed: Option<String>,
    /// Released after the server is gone (fields drop after `Drop::drop`), before the
    /// claim.
    lock: Option<Locked>,
    _claim: Claim,
}

impl Qcow2Writer {
    fn bounded(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of the volume ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn client(&mut self) -> io::Result<&mut NbdClient> {
        self.client
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the writer is closed"))
    }

    fn note(&mut self, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r
            && self.failed.is_none()
        {
            self.failed = Some(e.to_string());
        }
        r
    }
}

impl VolumeWriter for Qcow2Writer {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.bounded(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let r = self.client().and_then(|c| c.write_at(offset, data));
        self.note(r)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.bounded(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let r = self.client().and_then(|c| c.write_zeroes(offset, len));
        self.note(r)
    }

    /// NBD flush, disconnect, qemu-nbd's exit (bounded, then killed), fsync of the active
    /// file; the first failure of any step is returned, after every step has run (the
    /// server is stopped and the lock released either way).
    fn finish(mut self: Box<Self>) -> Result<()> {
        let mut first: Option<Error> = self.failed.take().map(|m| {
            Error::backend(
                "finish volume writer",
                format!("an earlier write failed: {m}"),
            )
        });
        let mut keep = |e: Error| {
            if first.is_none() {
                first = Some(e);
            }
        };
        if let Some(mut c) = self.client.take() {
            if let Err(e) = c.flush() {
                keep(Error::io("NBD flush", e));
            }
            if let Err(e) = c.disconnect() {
                keep(Error::io("NBD disconnect", e));
            }
        }
        if let Some(mut s) = self.server.take()
            && let Err(e) = s.wait_exit()
        {
            keep(e);
        }
        // qemu's flush made the data durable already; this also covers what qemu wrote
        // while closing the image (qcow2 metadata), whatever its cache mode.
        if let Err(e) = File::open(&self.active)
            .and_then(|f| f.sync_all())
            .map_err(io_ctx("fsync", &self.active))
        {
            keep(e);
        }
        drop(self.lock.take());
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Qcow2Writer {
    /// Without `finish`: disconnect so qemu-nbd closes the image cleanly, then make sure it
    /// is gone (killed past the limit) and its socket removed, before the lock is released.
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.disconnect();
        }
        if let Some(mut s) = self.server.take()
            && let Err(e) = s.wait_exit()
        {
            tracing::info!(active = %self.active.display(), error = %e, "qemu-nbd of a dropped volume writer");
        }
    }
}

/// A running `qemu-nbd` serving one active layer on a unix socket.
struct QemuNbd {
    handle: Arc<duct::Handle>,
    /// Signalled by the keeper thread once qemu-nbd has exited.
    exited: Receiver<()>,
    keeper: Option<JoinHandle<()>>,
    socket: PathBuf,
    /// The private directory holding `socket`, when the backend directory's path was too
    /// long for one; removed with the server.
    private_dir: Option<PathBuf>,
    pid: u32,
    /// Whether qemu-nbd's exit has been seen (and reaped).
    done: bool,
}

impl QemuNbd {
    /// Starts `qemu-nbd` on `active` (a file name in `vdir`) and connects to it. Fails with
    /// qemu-nbd's stderr when it exits before listening, and kills it when it does not
    /// listen within [`START_LIMIT`].
    fn start(backend_dir: &Path, vdir: &Path, active: &str) -> Result<(QemuNbd, NbdClient)> {
        remove_stale_sockets(backend_dir);
        let (socket, private_dir) = socket_path(backend_dir)?;
        let args: Vec<OsString> = vec![
            OsString::from(format!("--socket={}", socket.display())),
            "--format=qcow2".into(),
            // One client, and exit when it leaves (no --persistent): the server's life
            // is exactly the writer's connection.
            "--shared=1".into(),
            // Lets NBD_CMD_WRITE_ZEROES without NO_HOLE deallocate: zero clusters.
            "--discard=unmap".into(),
            "--cache=writeback".into(),
            "--aio=threads".into(),
            active.into(),
        ];
        let expr = sys::dies_with_parent(
            duct::cmd(QEMU_NBD, &args)
                .dir(vdir)
                .stdin_null()
                .stdout_null()
                .stderr_capture()
                .unchecked(),
        );
        let (started_tx, started_rx) = mpsc::channel();
        let (exited_tx, exited) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name("qemu-nbd".into())
            .spawn(move || match expr.start() {
                Ok(h) => {
                    let h = Arc::new(h);
                    let _ = started_tx.send(Ok(h.clone()));
                    // Blocks for qemu-nbd's whole life, which keeps this thread (the one
                    // that forked it) alive as long as the child: see the module docs.
                    let _ = h.wait();
                    let _ = exited_tx.send(());
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::io("start the qemu-nbd thread", e))?;
        let started = started_rx.recv().map_err(|_| {
            Error::backend(
                "qemu-nbd",
                "the thread starting qemu-nbd ended unexpectedly",
            )
        });
        let handle = match started {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let _ = keeper.join();
                remove_private_dir(private_dir.as_deref());
                return Err(Error::backend(
                    "qemu-nbd",
                    format!("cannot run {QEMU_NBD}: {e} (is qemu-utils installed?)"),
                )
                .with_source(e));
            }
            Err(e) => {
                let _ = keeper.join();
                remove_private_dir(private_dir.as_deref());
                return Err(e);
            }
        };
        let pid = handle.pids().first().copied().unwrap_or(0);
        let mut server = QemuNbd {
            handle,
            exited,
            keeper: Some(keeper),
            socket,
            private_dir,
            pid,
            done: false,
        };
        tracing::debug!(?args, pid, "qemu-nbd started");
        // On any error below, dropping `server` kills qemu-nbd and removes the socket.
        let sock = server.wait_listening(active)?;
        let client = NbdClient::handshake(sock, "")
            .map_err(|e| Error::io(format!("NBD handshake with qemu-nbd serving {active}"), e))?;
        Ok((server, client))
    }

    /// Connects to the socket once qemu-nbd listens on it.
    fn wait_listening(&mut self, active: &str) -> Result<UnixStream> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => return Ok(s),
                // Not bound yet, or bound but not yet listening.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("connect to {}", self.socket.display()),
                        e,
                    ));
                }
            }
            match self.exited.try_recv() {
                Ok(()) | Err(TryRecvError::Disconnected) => {
                    self.done = true;
                    return Err(self.early_exit(active));
                }
                Err(TryRecvError::Empty) => {}
            }
            if start.elapsed() > START_LIMIT {
                self.kill();
                return Err(Error::backend(
                    "qemu-nbd",
                    format!(
                        "qemu-nbd serving {active} did not listen on {} within {} s{}",
                        self.socket.display(),
                        START_LIMIT.as_secs(),
                        self.stderr_suffix()
                    ),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The error for a qemu-nbd that exited before it listened: its stderr, and qemu's
    /// image-lock refusal as `Unavailable` (another process has the image open; nothing
    /// was written, qemu locks while opening).
    fn early_exit(&self, active: &str) -> Error {
        let (status, msg) = match self.handle.try_wait() {
            Ok(Some(out)) => (
                out.status.to_string(),
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; "),
            ),
            Ok(None) => ("still running".into(), String::new()),
            Err(e) => (format!("unknown ({e})"), String::new()),
        };
        if msg.contains("Failed to get") && msg.contains("lock") {
            return Error::unavailable(
                "qemu-nbd",
                format!("{msg} (another process holds the image; retry later)"),
            );
        }
        Error::backend(
            "qemu-nbd",
            format!(
                "qemu-nbd serving {active} exited before it listened ({status}): {}",
                if msg.is_empty() { "no message" } else { &msg }
            ),
        )
    }

    /// `: <stderr>` of an exited qemu-nbd, or nothing.
    fn stderr_suffix(&self) -> String {
        match self.handle.try_wait() {
            Ok(Some(out)) if !out.stderr.is_empty() => format!(
                ": {}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; ")
            ),
            _ => String::new(),
        }
    }

    /// Waits (at most [`EXIT_LIMIT`]) for qemu-nbd to exit after its client left; kills it
    /// past that. An exit other than status 0 is an error carrying its stderr.
    fn wait_exit(&mut self) -> Result<()> {
        let r = match self.exited.recv_timeout(EXIT_LIMIT) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                self.done = true;
                match self.handle.try_wait() {
                    Ok(Some(out)) if out.status.success() => Ok(()),
                    Ok(Some(out)) => Err(Error::backend(
                        "qemu-nbd",
                        format!(
                            "qemu-nbd exited with {}{}",
                            out.status,
                            self.stderr_suffix()
                        ),
                    )),
                    Ok(None) => Err(Error::backend("qemu-nbd", "qemu-nbd did not exit")),
                    Err(e) => Err(Error::io("wait for qemu-nbd", e)),
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                Err(Error::backend(
                    "qemu-nbd",
                    format!(
                        "qemu-nbd did not exit within {} s after its client left; killed it \
                         (the last writes may not be durable)",
                        EXIT_LIMIT.as_secs()
                    ),
                ))
            }
        };
        self.cleanup();
        r
    }

    /// Kills qemu-nbd and reaps it (duct's kill waits).
    fn kill(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.handle.kill() {
            tracing::info!(pid = self.pid, error = %e, "killing qemu-nbd");
        }
        self.done = true;
    }

    /// After the process is gone: joins the keeper thread and removes the socket (qemu-nbd
    /// unlinks it on a clean exit, not when killed) and the private directory.
    fn cleanup(&mut self) {
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        if let Err(e) = sys::remove_if_exists(&self.socket) {
            tracing::info!(socket = %self.socket.display(), error = %e, "removing qemu-nbd's socket");
        }
        remove_private_dir(self.private_dir.take().as_deref());
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
        self.cleanup();
    }
}

/// A fresh socket path: in the backend directory when it fits in a socket address, else in
/// a new private (0700) directory under the system temp directory.
fn socket_path(backend_dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{SOCKET_PREFIX}{}-{}.sock", std::process::id(), &tag[..12]);
    let here = backend_dir.join(&name);
    if here.as_os_str().as_bytes().len() <= MAX_SOCKET_PATH {
        return Ok((here, None));
    }
    use std::os::unix::fs::DirBuilderExt;
    let private =
        std::env::temp_dir().join(format!("{PRIVATE_DIR_PREFIX}{}-{tag}", std::process::id()));
    let sock = private.join("s");
    if sock.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
        return Err(Error::config(format!(
            "neither {} nor the temp directory {} is short enough for a unix socket path \
             ({MAX_SOCKET_PATH} bytes); set TMPDIR to a shorter directory",
            backend_dir.display(),
            std::env::temp_dir().display()
        )));
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_ctx("create", &private))?;
    Ok((sock, Some(private)))
}

fn remove_private_dir(dir: Option<&Path>) {
    if let Some(d) = dir
        && let Err(e) = sys::remove_dir_if_exists(d)
    {
        tracing::info!(dir = %d.display(), error = %e, "removing qemu-nbd's socket directory");
    }
}

/// Removes sockets in the backend directory left by kiln processes that died (their
/// qemu-nbd died with them and could not unlink the socket). Best effort: a failure here
/// must not stop a writer from opening.
fn remove_stale_sockets(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(SOCKET_PREFIX)
            .filter(|_| name.ends_with(".sock"))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| !sys::pid_alive(p)) {
            tracing::info!(file = %name, "removing qemu-nbd socket of a dead process");
            let _ = sys::remove_if_exists(&entry.path());
        }
    }
}
