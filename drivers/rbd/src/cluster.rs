//! The backend's one long-lived connection: a librados cluster handle and an I/O context on
//! the configured pool.
//!
//! The connection is built from the librados C functions (through [`crate::ffi`], which
//! loads the libraries on the first connect) because the timeouts below must be set between
//! `rados_conf_read_file` and `rados_connect`; the handles are freed exactly once, in
//! `Drop`.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};

use crate::config::RbdConfig;
use crate::errno::{CallResult, RbdCallError, check};
use crate::ffi::{self as r, rados_ioctx_t, rados_t};

/// Bound on every monitor and OSD request made over the connection (pool ops such as
/// snapshot-id allocation, reads, writes). Without it librados waits forever for a cluster
/// that went away, pinning a worker thread; with it the call fails with ETIMEDOUT and the
/// operation can be retried. Generous, because a flatten is many such requests in a row and
/// a busy cluster can stall one for a while.
pub const OP_TIMEOUT_SECS: u64 = 120;

/// Owns a `rados_t`; `rados_shutdown` on drop.
struct RadosHandle(rados_t);

impl Drop for RadosHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle came from rados_create, is shut down exactly once, and every
            // ioctx made from it has been destroyed before (see `Cluster`'s field order).
            unsafe { r::rados_shutdown(self.0) }
        }
    }
}

/// Owns a `rados_ioctx_t`; `rados_ioctx_destroy` on drop.
struct IoctxHandle(rados_ioctx_t);

impl Drop for IoctxHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by rados_ioctx_create on a live cluster handle, destroyed once.
            unsafe { r::rados_ioctx_destroy(self.0) }
        }
    }
}

/// A connected cluster with an I/O context on the backend's pool.
///
/// Shared as `Arc<Cluster>` by every operation and every open image; images hold that `Arc`,
/// so the connection outlives them (drop order: image, then ioctx, then cluster handle).
pub struct Cluster {
    // Field order is drop order: the ioctx must be destroyed before the cluster is shut down.
    ioctx: IoctxHandle,
    rados: RadosHandle,
    /// `ceph:<fsid>:<address>` of this client, if librados told it.
    fence_handle: Option<String>,
    pool: String,
    conf: String,
    client_name: String,
    keyring: Option<String>,
    image_opens: AtomicU64,
}

// SAFETY: librados documents `rados_t` and `rados_ioctx_t` as safe to share between threads
// (the C API is used concurrently by QEMU, rbd-nbd and the rbd CLI's worker threads); this
// type only hands the raw pointers to librados/librbd calls and never mutates them after
// construction. The handles are freed only in Drop, when no other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: see `Send`: every use of the handles goes through librados/librbd, which lock
// internally.
unsafe impl Sync for Cluster {}

/// Prefix of a fence handle (see [`kiln_core::node::publish_fence`]) naming a Ceph client.
const FENCE_PREFIX: &str = "ceph:";

/// `ceph:<fsid>:<address>` of a connected client: which cluster, and the address (with its
/// nonce, unique to this client instance) that `osd blocklist add` takes.
fn fence_handle(rados: &RadosHandle) -> Option<String> {
    let mut fsid = [0 as libc::c_char; 64];
    // SAFETY: connected handle; the buffer's length is passed.
    let rc = unsafe { r::rados_cluster_fsid(rados.0, fsid.as_mut_ptr(), fsid.len()) };
    if rc < 0 {
        return None;
    }
    // SAFETY: rados_cluster_fsid wrote a NUL-terminated string into the buffer.
    let fsid = unsafe { std::ffi::CStr::from_ptr(fsid.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut addrs: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: connected handle, valid out-pointer; the string is freed below.
    let rc = unsafe { r::rados_getaddrs(rados.0, &mut addrs) };
    if rc < 0 || addrs.is_null() {
        return None;
    }
    // SAFETY: librados returned a NUL-terminated string it allocated.
    let text = unsafe { std::ffi::CStr::from_ptr(addrs) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated by librados, freed once.
    unsafe { r::rados_buffer_free(addrs) };
    Some(format!("{FENCE_PREFIX}{fsid}:{}", client_addr(&text)?))
}

/// The address `osd blocklist add` takes from what `rados_getaddrs` prints: the first
/// of a vector (`[v2:1.2.3.4:0/99,v1:…]`), without its protocol tag.
fn client_addr(addrs: &str) -> Option<String> {
    let first = addrs
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .next()?
        .trim();
    let addr = first
        .strip_prefix("v2:")
        .or_else(|| first.strip_prefix("v1:"))
        .or_else(|| first.strip_prefix("any:"))
        .unwrap_or(first);
    (!addr.is_empty() && addr.contains('/')).then(|| addr.to_string())
}

/// Whether `addr` (`ip:port/nonce`) names exactly one client instance: a non-zero nonce
/// and a real IP (not the unspecified address).
fn one_client(addr: &str) -> bool {
    let Some((ip_port, nonce)) = addr.rsplit_once('/') else {
        return false;
    };
    let nonce_ok = nonce.parse::<u64>().is_ok_and(|n| n != 0);
    let ip_ok = ip_port
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| !a.ip().is_unspecified());
    nonce_ok && ip_ok
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::config(format!("{what} {s:?} contains a NUL byte")))
}

impl Cluster {
    /// Connects (blocking) using `cfg`, bounded by `cfg.connect_timeout_secs` on librados'
    /// side (`client_mount_timeout`), and opens the pool. Call it off the async runtime;
    /// [`Cluster::connect`] wraps it with a hard deadline.
    pub fn connect_blocking(cfg: &RbdConfig) -> Result<Cluster> {
        let conf = cfg
            .ceph_conf
            .to_str()
            .ok_or_else(|| Error::config(format!("ceph_conf {:?} is not UTF-8", cfg.ceph_conf)))?
            .to_owned();
        let keyring = match &cfg.keyring {
            Some(k) => Some(
                k.to_str()
                    .ok_or_else(|| Error::config(format!("keyring {k:?} is not UTF-8")))?
                    .to_owned(),
            ),
            None => None,
        };
        let id = cstring("client_name", &cfg.client_name)?;
        let conf_c = cstring("ceph_conf", &conf)?;
        let pool_c = cstring("pool", &cfg.pool)?;

        // librbd and librados are not linked (see ffi.rs): the first connection maps them.
        r::load().map_err(|e| {
            Error::config(format!(
                "{e} (the RBD backend needs the librbd1 and librados2 packages at run time)"
            ))
        })?;
        let mut raw: rados_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated id.
        let rc = unsafe { r::rados_create(&mut raw, id.as_ptr()) };
        let rados = RadosHandle(raw);
        let backend = |op: &str, rc: i32| {
            Error::from(RbdCallError {
                op: op.to_string(),
                errno: -rc,
            })
        };
        if rc < 0 {
            return Err(backend("rados_create", rc));
        }
        // SAFETY: live handle, NUL-terminated path.
        let rc = unsafe { r::rados_conf_read_file(rados.0, conf_c.as_ptr()) };
        if rc < 0 {
            return Err(Error::config(format!(
                "cannot read ceph_conf {conf}: {}",
                std::io::Error::from_raw_os_error(-rc)
            )));
        }
        let timeout = cfg.connect_timeout_secs.to_string();
        let op_timeout = OP_TIMEOUT_SECS.to_string();
        let mut settings = vec![
            ("client_mount_timeout", timeout.as_str()),
            ("rados_mon_op_timeout", op_timeout.as_str()),
            ("rados_osd_op_timeout", op_timeout.as_str()),
        ];
        if let Some(k) = &keyring {
            settings.push(("keyring", k.as_str()));
        }
        for (key, value) in settings {
            let (k, v) = (cstring("option", key)?, cstring(key, value)?);
            // SAFETY: live, not yet connected handle; NUL-terminated strings.
            let rc = unsafe { r::rados_conf_set(rados.0, k.as_ptr(), v.as_ptr()) };
            if rc < 0 {
                return Err(backend(&format!("rados_conf_set {key}"), rc));
            }
        }
        // SAFETY: live, configured handle.
        let rc = unsafe { r::rados_connect(rados.0) };
        if rc < 0 {
            return Err(Error::unavailable(
                "rados_connect",
                format!(
                    "cannot connect to the Ceph cluster of {conf} as client.{}: {} — is the cluster up and reachable, and is the conf/keyring right?",
                    cfg.client_name,
                    std::io::Error::from_raw_os_error(-rc)
                ),
            ));
        }
        let mut io: rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer, NUL-terminated pool name.
        let rc = unsafe { r::rados_ioctx_create(rados.0, pool_c.as_ptr(), &mut io) };
        let ioctx = IoctxHandle(io);
        if rc == -libc::ENOENT {
            return Err(Error::config(format!(
                "pool {:?} does not exist in the cluster of {conf} (create it with `ceph osd pool create {} && rbd pool init {}`)",
                cfg.pool, cfg.pool, cfg.pool
            )));
        }
        if rc < 0 {
            return Err(backend(&format!("rados_ioctx_create {}", cfg.pool), rc));
        }
        let fence_handle = fence_handle(&rados);
        if let Some(h) = &fence_handle {
            // The heartbeat writes it at once (it is woken for it): a node that takes this
            // process's operations over after it died can then cut it off. An operation
            // journaled in the instant before that write lands is recovered without it.
            kiln_core::node::publish_fence(h);
        }
        Ok(Cluster {
            ioctx,
            rados,
            fence_handle,
            pool: cfg.pool.clone(),
            conf,
            client_name: cfg.client_name.clone(),
            keyring,
            image_opens: AtomicU64::new(0),
        })
    }

    /// Connects with a hard deadline of `cfg.connect_timeout_secs` (plus one second for
    /// librados to report its own timeout first). The connect runs on a detached thread: if
    /// librados hangs past the deadline, the caller gets a clear error at once and the
    /// thread cleans up after itself when librados gives up.
    pub async fn connect(cfg: &RbdConfig) -> Result<Cluster> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cfg2 = cfg.clone();
        std::thread::Builder::new()
            .name("kiln-rbd-connect".into())
            .spawn(move || {
                // A send error means the caller gave up; the Cluster is dropped here.
                let _ = tx.send(Cluster::connect_blocking(&cfg2));
            })
            .map_err(|e| Error::io("spawning the Ceph connect thread", e))?;
        let deadline = Duration::from_secs(cfg.connect_timeout_secs) + Duration::from_secs(1);
        let started = Instant::now();
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(Error::backend(
                "rados_connect",
                "the connect thread ended without a result",
            )),
            Err(_) => Err(Error::unavailable(
                "rados_connect",
                format!(
                    "no answer from the Ceph cluster of {} within {:.1}s (connect_timeout_secs = {}) — is the cluster up and reachable?",
                    cfg.ceph_conf.display(),
                    started.elapsed().as_secs_f64(),
                    cfg.connect_timeout_secs
                ),
            )),
        }
    }

    /// Blocklists, on this cluster, each client of `handles` (see
    /// [`kiln_core::node::publish_fence`]) that belongs to it: its OSD sessions and its
    /// watches end at once, and it can no longer write. Returns the addresses blocklisted.
    pub fn blocklist(&self, handles: &[String]) -> Result<Vec<String>> {
        let Some(mine) = &self.fence_handle else {
            return Ok(vec![]);
        };
        let Some((fsid, _)) = mine[FENCE_PREFIX.len()..].split_once(':') else {
            return Ok(vec![]);
        };
        let ours = format!("{FENCE_PREFIX}{fsid}:");
        let mut done = Vec::new();
        for h in handles {
            let Some(addr) = h.strip_prefix(&ours) else {
                continue;
            };
            if Some(h) == self.fence_handle.as_ref() {
                continue;
            }
            if !one_client(addr) {
                // Read from the store, so checked: `ip:0/0` would blocklist every client
                // of that host (this node's too), and anything unparsable is refused.
                return Err(Error::backend(
                    "rados_blocklist_add",
                    format!("refusing to blocklist {addr:?}: not the address of one client"),
                ));
            }
            let c = cstring("client address", addr)?;
            // SAFETY: connected handle; librados only reads the NUL-terminated address
            // (the C prototype lacks `const`).
            let rc = unsafe { r::rados_blocklist_add(self.rados.0, c.as_ptr().cast_mut(), 3600) };
            if rc < 0 {
                return Err(Error::from(RbdCallError {
                    op: format!("rados_blocklist_add {addr}"),
                    errno: -rc,
                }));
            }
            done.push(addr.to_string());
        }
        if !done.is_empty() {
            // The OSDs act on the new map: wait until this client has it too, so that the
            // operations recovered next see the dead client's watches gone.
            // SAFETY: connected handle.
            let rc = unsafe { r::rados_wait_for_latest_osdmap(self.rados.0) };
            if rc < 0 {
                return Err(Error::from(RbdCallError {
                    op: "rados_wait_for_latest_osdmap".into(),
                    errno: -rc,
                }));
            }
        }
        Ok(done)
    }

    /// The raw I/O context on the backend's pool, for librbd calls. Valid while `self` lives.
    pub fn ioctx(&self) -> rados_ioctx_t {
        self.ioctx.0
    }

    /// The pool this connection works in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The ceph.conf path the connection was made with.
    pub fn conf_path(&self) -> &str {
        &self.conf
    }

    /// The client id (without `client.`).
    pub fn client_name(&self) -> &str {
        &self.client_name
    }

    /// The keyring path, if one was configured.
    pub fn keyring(&self) -> Option<&str> {
        self.keyring.as_deref()
    }

    /// How many image opens (`rbd_open` or `rbd_open_read_only`, whether they succeeded or
    /// not) were made over this connection: each is a round trip to the cluster (and a
    /// read-write one a watch), which is what the handle cache saves. For tests and logs.
    pub fn image_opens(&self) -> u64 {
        self.image_opens.load(Ordering::Relaxed)
    }

    /// Counts one image open (see [`Cluster::image_opens`]).
    pub(crate) fn count_image_open(&self) {
        self.image_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// The value of configuration option `option` as this connection sees it (ceph.conf,
    /// the environment and the settings made at connect time, e.g. `cluster` or
    /// `auth_client_required`).
    pub fn conf_get(&self, option: &str) -> CallResult<String> {
        let op = || format!("rados_conf_get {option}");
        let key = CString::new(option).map_err(|_| RbdCallError {
            op: op(),
            errno: libc::EINVAL,
        })?;
        // Option values are short (paths, lists of monitor addresses); librados answers
        // ENAMETOOLONG when the buffer is too small, and the buffer grows then.
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: connected handle, NUL-terminated key, buffer of `len` writable bytes.
            let rc = unsafe {
                r::rados_conf_get(self.rados.0, key.as_ptr(), buf.as_mut_ptr().cast(), len)
            };
            if rc == -libc::ENAMETOOLONG && len < 1 << 20 {
                len *= 4;
                continue;
            }
            check(op, rc.into())?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(len);
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| RbdCallError {
                op: format!("{} (the value is not UTF-8)", op()),
                errno: libc::EINVAL,
            });
        }
    }

    /// Runs a monitor command (JSON) and returns its output buffer.
    pub fn mon_command(&self, cmd: &serde_json::Value) -> CallResult<Vec<u8>> {
        let cmd_s = cmd.to_string();
        let op = || format!("rados_mon_command {cmd_s}");
        let c = CString::new(cmd_s.clone()).map_err(|_| RbdCallError {
            op: op(),
            errno: libc::EINVAL,
        })?;
        let mut cmds = [c.as_ptr()];
        let mut outbuf: *mut libc::c_char = std::ptr::null_mut();
        let mut outbuf_len: libc::size_t = 0;
        let mut outs: *mut libc::c_char = std::ptr::null_mut();
        let mut outs_len: libc::size_t = 0;
        // SAFETY: connected handle; one NUL-terminated command; out-pointers are valid and
        // the returned buffers are freed with rados_buffer_free below.
        let rc = unsafe {
            r::rados_mon_command(
                self.rados.0,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut outbuf,
                &mut outbuf_len,
                &mut outs,
                &mut outs_len,
            )
        };
        let copy = |p: *mut libc::c_char, n: libc::size_t| -> Vec<u8> {
            if p.is_null() || n == 0 {
                Vec::new()
            } else {
                // SAFETY: librados returned a buffer of exactly n bytes.
                unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec()
            }
        };
        let out = copy(outbuf, outbuf_len);
        let status = copy(outs, outs_len);
        // SAFETY: buffers allocated by librados (or null, which rados_buffer_free accepts).
        unsafe {
            r::rados_buffer_free(outbuf);
            r::rados_buffer_free(outs);
        }
        if rc < 0 {
            return Err(RbdCallError {
                op: format!("{} ({})", op(), String::from_utf8_lossy(&status).trim()),
                errno: -rc,
            });
        }
        check(op, rc.into())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::client_addr;

    #[test]
    fn the_blocklist_address_is_the_first_one_without_its_protocol_tag() {
        assert_eq!(
            client_addr("[v2:127.0.0.1:0/3219238591,v1:127.0.0.1:0/3219238591]").as_deref(),
            Some("127.0.0.1:0/3219238591")
        );
        assert_eq!(
            client_addr("v2:10.0.0.5:0/42").as_deref(),
            Some("10.0.0.5:0/42")
        );
        assert_eq!(
            client_addr("10.0.0.5:0/42").as_deref(),
            Some("10.0.0.5:0/42")
        );
        assert_eq!(client_addr(""), None);
        assert_eq!(client_addr("[]"), None);
    }

    #[test]
    fn only_the_address_of_one_client_may_be_blocklisted() {
        use super::one_client;
        assert!(one_client("127.0.0.1:0/3219238591"));
        assert!(one_client("[::1]:6800/42"));
        assert!(!one_client("127.0.0.1:0/0"), "nonce 0 is the whole host");
        assert!(!one_client("0.0.0.0:0/42"));
        assert!(!one_client("127.0.0.1/42"));
        assert!(!one_client("garbage"));
    }
}
