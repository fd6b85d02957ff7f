//! Safe wrappers over the librbd calls the driver makes: pool-level image operations and an
//! open image handle that closes itself.
//!
//! Every function here blocks (librbd talks to the cluster); call them from
//! `tokio::task::spawn_blocking`. Errors carry the C function and the object names.

use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Extent, merge_extents};
use libc::{c_char, c_int, c_void, size_t};

use crate::cluster::Cluster;
use crate::errno::{CallResult, RbdCallError, check};
use crate::ffi;
use crate::progress::{ProgressBridge, progress_callback};

/// Features of every image kiln creates: copy-on-write clones (layering), a single writer at a
/// time whose I/O librbd quiesces for snapshots (exclusive-lock), cheap extent maps
/// (object-map, fast-diff) and snapshots that survive flattening (deep-flatten).
pub const KILN_FEATURES: u64 = ffi::RBD_FEATURE_LAYERING
    | ffi::RBD_FEATURE_EXCLUSIVE_LOCK
    | ffi::RBD_FEATURE_OBJECT_MAP
    | ffi::RBD_FEATURE_FAST_DIFF
    | ffi::RBD_FEATURE_DEEP_FLATTEN;

/// Object size 2^22 = 4 MiB, librbd's default, stated explicitly so images do not depend on
/// the client's `rbd_default_order`.
pub const KILN_ORDER: c_int = 22;

fn c(op: &str, s: &str) -> CallResult<CString> {
    CString::new(s).map_err(|_| RbdCallError {
        op: format!("{op} {s:?} (NUL in name)"),
        errno: libc::EINVAL,
    })
}

fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: librbd returns NUL-terminated strings valid until its cleanup call.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Creates image `name` of `size` bytes with [`KILN_FEATURES`] in the cluster's pool.
pub fn create(cluster: &Cluster, name: &str, size: u64) -> CallResult<()> {
    let n = c("rbd_create2", name)?;
    let mut order = KILN_ORDER;
    // SAFETY: live ioctx, NUL-terminated name, valid out-pointer.
    let rc =
        unsafe { ffi::rbd_create2(cluster.ioctx(), n.as_ptr(), size, KILN_FEATURES, &mut order) };
    check(|| format!("rbd_create2 {name}"), rc.into()).map(drop)
}

/// Removes image `name` (data objects, then header). `ENOENT` if it does not exist,
/// `ENOTEMPTY` while it has snapshots, `EBUSY` while another client has it open.
pub fn remove(cluster: &Cluster, name: &str) -> CallResult<()> {
    let n = c("rbd_remove", name)?;
    // SAFETY: live ioctx, NUL-terminated name.
    let rc = unsafe { ffi::rbd_remove(cluster.ioctx(), n.as_ptr()) };
    check(|| format!("rbd_remove {name}"), rc.into()).map(drop)
}

/// Clones `parent@snap` into a new image `child` (same pool) with [`KILN_FEATURES`].
/// With clone format 1 the snapshot must be protected first.
pub fn clone(cluster: &Cluster, parent: &str, snap: &str, child: &str) -> CallResult<()> {
    let op = || format!("rbd_clone3 {parent}@{snap} -> {child}");
    let (p, s, ch) = (
        c("rbd_clone3", parent)?,
        c("rbd_clone3", snap)?,
        c("rbd_clone3", child)?,
    );
    let mut opts: ffi::rbd_image_options_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer; destroyed below on every path.
    unsafe { ffi::rbd_image_options_create(&mut opts) };
    // SAFETY: opts is live until rbd_image_options_destroy.
    let rc = unsafe {
        let mut rc =
            ffi::rbd_image_options_set_uint64(opts, ffi::RBD_IMAGE_OPTION_FEATURES, KILN_FEATURES);
        if rc == 0 {
            rc = ffi::rbd_clone3(
                cluster.ioctx(),
                p.as_ptr(),
                s.as_ptr(),
                cluster.ioctx(),
                ch.as_ptr(),
                opts,
            );
        }
        ffi::rbd_image_options_destroy(opts);
        rc
    };
    check(op, rc.into()).map(drop)
}

/// The RADOS id of the image named `name` right now, read from its directory object
/// `rbd_id.<name>` (one small read; the image is not opened). `ENOENT` when no image has
/// that name (removed, renamed, moved to the trash); `EINVAL` for old format-1 images.
pub fn id_of(cluster: &Cluster, name: &str) -> CallResult<String> {
    let op = || format!("rados_read rbd_id.{name}");
    let oid = c("rados_read", &format!("rbd_id.{name}"))?;
    // The object holds the id as an encoded string: little-endian u32 length, then the
    // bytes. Ids are short (12-16 characters); 256 bytes is ample.
    let mut buf = vec![0u8; 256];
    // SAFETY: live ioctx, NUL-terminated object name, buf writable for its length.
    let rc = unsafe {
        ffi::rados_read(
            cluster.ioctx(),
            oid.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
        )
    };
    let n = usize::try_from(check(op, rc.into())?).unwrap_or(0);
    decode_id(&buf[..n.min(buf.len())]).ok_or_else(|| RbdCallError {
        op: format!("{} (not an encoded image id)", op()),
        errno: libc::EINVAL,
    })
}

/// Decodes the content of an `rbd_id.<name>` object (u32 LE length + id bytes).
fn decode_id(data: &[u8]) -> Option<String> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let id = data.get(4..4 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

/// Where a clone's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// Pool id of the parent image.
    pub pool_id: i64,
    /// Pool name of the parent image.
    pub pool_name: String,
    /// RADOS namespace of the parent image ("" for the default).
    pub pool_namespace: String,
    /// Parent image name.
    pub image_name: String,
    /// Parent snapshot name.
    pub snap_name: String,
}

/// An image that depends on a snapshot (a clone of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// Pool of the clone.
    pub pool_name: String,
    /// Image name of the clone.
    pub image_name: String,
    /// Whether the clone sits in the RBD trash (deleted but not yet purged).
    pub trash: bool,
}

/// A handle younger than this is not closed at once: its drop waits until it is this old.
///
/// librbd 16.2 completes an `rbd_open` on one of librados' I/O threads, which wakes the
/// caller first and takes the image's state lock once more afterwards. If that thread is
/// preempted in between and the caller closes at once, the close can run to its end on the
/// other I/O thread and free the image, lock included; the first thread's lock call then
/// throws (`std::system_error: Invalid argument`) and the process aborts. Waiting before
/// the close gives the stalled thread this long to finish; a handle in use for longer (every
/// cached one, every reader of a real export) pays nothing. One I/O thread instead of two
/// would close the window outright but deadlocks librbd (its snapshot-unprotect path waits
/// for a librados reply on that thread). Measured in docs/rbd-backend.md ("Known librbd
/// 16.2 abort").
pub const MIN_HANDLE_AGE: Duration = Duration::from_millis(20);

/// An open librbd image. Closed on drop; keeps its connection alive until then.
pub struct Image {
    handle: ffi::rbd_image_t,
    name: String,
    at: String,
    opened: Instant,
    // Dropped after `handle` is closed in Drop::drop: the ioctx must outlive the image.
    _cluster: Arc<Cluster>,
}

// SAFETY: an rbd_image_t may be used from any thread (librbd serialises access internally;
// QEMU calls it from its I/O threads). `Image` is only moved between threads, never shared
// without `&mut`/ownership, so no concurrent calls on one handle arise from safe code.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(wait) = MIN_HANDLE_AGE.checked_sub(self.opened.elapsed()) {
            std::thread::sleep(wait);
        }
        // SAFETY: the handle is open and closed exactly once, before the ioctx goes away.
        let rc = unsafe { ffi::rbd_close(self.handle) };
        if rc < 0 {
            tracing::warn!(image = %self.name, errno = -rc, "rbd_close failed");
        }
    }
}

impl Image {
    /// Opens `name` read-write at its head (`snap` None) or at snapshot `snap` (read-only).
    pub fn open(cluster: &Arc<Cluster>, name: &str, snap: Option<&str>) -> CallResult<Image> {
        Self::open_impl(cluster, name, snap, false)
    }

    /// Opens `name` read-only (no watch on the header: cheap, for probes and readers).
    pub fn open_read_only(
        cluster: &Arc<Cluster>,
        name: &str,
        snap: Option<&str>,
    ) -> CallResult<Image> {
        Self::open_impl(cluster, name, snap, true)
    }

    fn open_impl(
        cluster: &Arc<Cluster>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> CallResult<Image> {
        let f = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let at = match snap {
            Some(s) => format!("{name}@{s}"),
            None => name.to_string(),
        };
        let n = c(f, name)?;
        let s = snap.map(|s| c(f, s)).transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut handle: ffi::rbd_image_t = std::ptr::null_mut();
        cluster.count_image_open();
        // SAFETY: live ioctx, NUL-terminated strings (or null snap), valid out-pointer.
        let rc = unsafe {
            if read_only {
                ffi::rbd_open_read_only(cluster.ioctx(), n.as_ptr(), &mut handle, sp)
            } else {
                ffi::rbd_open(cluster.ioctx(), n.as_ptr(), &mut handle, sp)
            }
        };
        check(|| format!("{f} {}/{at}", cluster.pool()), rc.into())?;
        Ok(Image {
            handle,
            name: name.to_string(),
            at,
            opened: Instant::now(),
            _cluster: Arc::clone(cluster),
        })
    }

    /// The image name (without snapshot).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn op(&self, f: &str) -> String {
        format!("{f} {}", self.at)
    }

    /// The raw handle, for the asynchronous requests of [`crate::aio`] (which keep their
    /// buffers alive until each request completes).
    pub(crate) fn handle(&self) -> ffi::rbd_image_t {
        self.handle
    }

    fn snap_op(&self, f: &str, snap: &str) -> String {
        format!("{f} {}@{snap}", self.name)
    }

    /// Size in bytes of the image (or of the snapshot it was opened at).
    pub fn size(&self) -> CallResult<u64> {
        let mut size = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let rc = unsafe { ffi::rbd_get_size(self.handle, &mut size) };
        check(|| self.op("rbd_get_size"), rc.into())?;
        Ok(size)
    }

    /// Feature bits of the image.
    pub fn features(&self) -> CallResult<u64> {
        let mut f = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let rc = unsafe { ffi::rbd_get_features(self.handle, &mut f) };
        check(|| self.op("rbd_get_features"), rc.into())?;
        Ok(f)
    }

    /// Operation-feature bits of the image (`RBD_OPERATION_FEATURE_*`), e.g. whether clone-v2
    /// children depend on one of its snapshots.
    pub fn op_features(&self) -> CallResult<u64> {
        let mut f = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let rc = unsafe { ffi::rbd_get_op_features(self.handle, &mut f) };
        check(|| self.op("rbd_get_op_features"), rc.into())?;
        Ok(f)
    }

    /// The image's RADOS id (what its header object is named after; stays the same across
    /// renames, differs for a new image of the same name). `EINVAL` for old format-1 images,
    /// which have none.
    pub fn id(&self) -> CallResult<String> {
        let mut len: usize = 64;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: open handle; buf is writable for len bytes; librbd NUL-terminates.
            let rc = unsafe { ffi::rbd_get_id(self.handle, buf.as_mut_ptr().cast(), len) };
            if rc == -libc::ERANGE && len < 4096 {
                len *= 4;
                continue;
            }
            check(|| self.op("rbd_get_id"), rc.into())?;
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
    }

    /// Grows (or shrinks) the image to `size` bytes.
    pub fn resize(&self, size: u64) -> CallResult<()> {
        // SAFETY: open handle.
        let rc = unsafe { ffi::rbd_resize(self.handle, size) };
        check(|| format!("{} to {size}", self.op("rbd_resize")), rc.into()).map(drop)
    }

    /// The snapshot this image (at the opened head or snapshot) was cloned from, if any.
    pub fn parent(&self) -> CallResult<Option<ParentSpec>> {
        // SAFETY: all-zero is a valid "empty" value for these plain C structs (null pointers).
        let mut img: ffi::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: ffi::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open handle, valid out-pointers; on success the strings are freed by the
        // cleanup calls below.
        let rc = unsafe { ffi::rbd_get_parent(self.handle, &mut img, &mut snap) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(|| self.op("rbd_get_parent"), rc.into())?;
        let spec = ParentSpec {
            pool_id: img.pool_id,
            pool_name: owned(img.pool_name),
            pool_namespace: owned(img.pool_namespace),
            image_name: owned(img.image_name),
            snap_name: owned(snap.name),
        };
        // SAFETY: filled by a successful rbd_get_parent, freed once.
        unsafe {
            ffi::rbd_linked_image_spec_cleanup(&mut img);
            ffi::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(spec))
    }

    /// Names of the image's (user) snapshots.
    pub fn snap_names(&self) -> CallResult<Vec<String>> {
        Ok(self.snaps()?.into_iter().map(|(name, _)| name).collect())
    }

    /// Size in bytes of the image at snapshot `snap` (what a rollback restores), from the
    /// snapshot listing of this handle: no second handle on the image is opened for it.
    /// `ENOENT` if there is no such snapshot.
    pub fn snap_size(&self, snap: &str) -> CallResult<u64> {
        self.snaps()?
            .into_iter()
            .find(|(name, _)| name == snap)
            .map(|(_, size)| size)
            .ok_or_else(|| RbdCallError {
                op: self.snap_op("rbd_snap_list", snap),
                errno: libc::ENOENT,
            })
    }

    /// The image's (user) snapshots with their sizes.
    fn snaps(&self) -> CallResult<Vec<(String, u64)>> {
        let mut max: c_int = 16;
        loop {
            let cap = usize::try_from(max).unwrap_or(16).max(1) + 1;
            // SAFETY: zeroed rbd_snap_info_t (null name) is a valid initial value.
            let mut buf: Vec<ffi::rbd_snap_info_t> =
                (0..cap).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut n = c_int::try_from(cap).unwrap_or(c_int::MAX);
            // SAFETY: buf has room for n entries (librbd writes n-1 plus an end marker).
            let rc = unsafe { ffi::rbd_snap_list(self.handle, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                max = n.max(max.saturating_mul(2));
                continue;
            }
            let count = check(|| self.op("rbd_snap_list"), rc.into())?;
            let snaps = buf
                .iter()
                .take(usize::try_from(count).unwrap_or(0))
                .map(|s| (owned(s.name), s.size))
                .collect();
            // SAFETY: frees the names librbd allocated in this successful call.
            unsafe { ffi::rbd_snap_list_end(buf.as_mut_ptr()) };
            return Ok(snaps);
        }
    }

    /// Whether snapshot `snap` exists.
    pub fn snap_exists(&self, snap: &str) -> CallResult<bool> {
        let s = c("rbd_snap_exists", snap)?;
        let mut exists = false;
        // SAFETY: open handle, NUL-terminated name, valid out-pointer.
        let rc = unsafe { ffi::rbd_snap_exists(self.handle, s.as_ptr(), &mut exists) };
        check(|| self.snap_op("rbd_snap_exists", snap), rc.into())?;
        Ok(exists)
    }

    /// Creates snapshot `snap`. If another client holds the exclusive lock, librbd asks that
    /// owner to take it (it blocks and drains its writes first), so the result is a
    /// crash-consistent point in time.
    pub fn snap_create(&self, snap: &str) -> CallResult<()> {
        let s = c("rbd_snap_create", snap)?;
        // SAFETY: open handle, NUL-terminated name.
        let rc = unsafe { ffi::rbd_snap_create(self.handle, s.as_ptr()) };
        check(|| self.snap_op("rbd_snap_create", snap), rc.into()).map(drop)
    }

    /// [`Image::snap_create`] without librbd's quiesce round: no quiesce / unquiesce
    /// notification goes to the image's watchers (librbd's default, as `rbd snap create`
    /// without `--skip-quiesce`, notifies every watcher before and after the snapshot so
    /// that a client with quiesce hooks, such as `rbd-nbd --quiesce`, can freeze its
    /// filesystem). For a volume nobody has attached there is nobody to quiesce, and the
    /// two notifications are two round trips through the header object's watchers.
    pub fn snap_create_skip_quiesce(&self, snap: &str) -> CallResult<()> {
        /// librbd calls the progress function without a null check, so one is passed.
        unsafe extern "C" fn ignore_progress(_: u64, _: u64, _: *mut libc::c_void) -> c_int {
            0
        }
        let s = c("rbd_snap_create2", snap)?;
        // SAFETY: open handle, NUL-terminated name; the progress function ignores its data
        // pointer, so null is fine.
        let rc = unsafe {
            ffi::rbd_snap_create2(
                self.handle,
                s.as_ptr(),
                ffi::RBD_SNAP_CREATE_SKIP_QUIESCE,
                Some(ignore_progress),
                std::ptr::null_mut(),
            )
        };
        check(|| self.snap_op("rbd_snap_create2", snap), rc.into()).map(drop)
    }

    /// Removes snapshot `snap` (must be unprotected).
    pub fn snap_remove(&self, snap: &str) -> CallResult<()> {
        let s = c("rbd_snap_remove", snap)?;
        // SAFETY: open handle, NUL-terminated name.
        let rc = unsafe { ffi::rbd_snap_remove(self.handle, s.as_ptr()) };
        check(|| self.snap_op("rbd_snap_remove", snap), rc.into()).map(drop)
    }

    /// Whether snapshot `snap` is protected (clone format 1 needs that before cloning).
    pub fn snap_is_protected(&self, snap: &str) -> CallResult<bool> {
        let s = c("rbd_snap_is_protected", snap)?;
        let mut p: c_int = 0;
        // SAFETY: open handle, NUL-terminated name, valid out-pointer.
        let rc = unsafe { ffi::rbd_snap_is_protected(self.handle, s.as_ptr(), &mut p) };
        check(|| self.snap_op("rbd_snap_is_protected", snap), rc.into())?;
        Ok(p != 0)
    }

    /// Protects snapshot `snap` against removal.
    pub fn snap_protect(&self, snap: &str) -> CallResult<()> {
        let s = c("rbd_snap_protect", snap)?;
        // SAFETY: open handle, NUL-terminated name.
        let rc = unsafe { ffi::rbd_snap_protect(self.handle, s.as_ptr()) };
        check(|| self.snap_op("rbd_snap_protect", snap), rc.into()).map(drop)
    }

    /// Unprotects snapshot `snap`; `EBUSY` while clones of it exist.
    pub fn snap_unprotect(&self, snap: &str) -> CallResult<()> {
        let s = c("rbd_snap_unprotect", snap)?;
        // SAFETY: open handle, NUL-terminated name.
        let rc = unsafe { ffi::rbd_snap_unprotect(self.handle, s.as_ptr()) };
        check(|| self.snap_op("rbd_snap_unprotect", snap), rc.into()).map(drop)
    }

    /// Rolls the image head back to snapshot `snap` (data and size), reporting progress.
    /// Idempotent: re-running after an interruption completes the rollback.
    pub fn snap_rollback(&self, snap: &str, progress: &ProgressBridge) -> CallResult<()> {
        let s = c("rbd_snap_rollback_with_progress", snap)?;
        // SAFETY: open handle, NUL-terminated name; the bridge outlives this synchronous call.
        let rc = unsafe {
            ffi::rbd_snap_rollback_with_progress(
                self.handle,
                s.as_ptr(),
                Some(progress_callback),
                progress.as_cbdata(),
            )
        };
        check(
            || self.snap_op("rbd_snap_rollback_with_progress", snap),
            rc.into(),
        )?;
        progress.finish();
        Ok(())
    }

    /// Copies all data still shared with the parent into this image and detaches it.
    pub fn flatten(&self, progress: &ProgressBridge) -> CallResult<()> {
        // SAFETY: open handle; the bridge outlives this synchronous call.
        let rc = unsafe {
            ffi::rbd_flatten_with_progress(
                self.handle,
                Some(progress_callback),
                progress.as_cbdata(),
            )
        };
        check(|| self.op("rbd_flatten_with_progress"), rc.into())?;
        progress.finish();
        Ok(())
    }

    /// Images cloned from snapshot `snap` of this image (any pool, including trashed ones).
    pub fn children_of(&self, snap: &str) -> CallResult<Vec<ChildSpec>> {
        let s = c("rbd_snap_set", snap)?;
        // SAFETY: open handle, NUL-terminated name.
        let rc = unsafe { ffi::rbd_snap_set(self.handle, s.as_ptr()) };
        check(|| self.snap_op("rbd_snap_set", snap), rc.into())?;
        let listed = self.list_children();
        // Back to the head whatever happened, so the handle stays usable for writes/removal.
        // SAFETY: open handle; null selects the head.
        let rc = unsafe { ffi::rbd_snap_set(self.handle, std::ptr::null()) };
        let children = listed?;
        check(|| self.op("rbd_snap_set (head)"), rc.into())?;
        Ok(children)
    }

    fn list_children(&self) -> CallResult<Vec<ChildSpec>> {
        let mut max: size_t = 8;
        loop {
            // SAFETY: zeroed specs (null pointers) are valid initial values.
            let mut buf: Vec<ffi::rbd_linked_image_spec_t> =
                (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut n = max;
            // SAFETY: buf has room for n entries; on success n is set to the count and the
            // entries are freed with rbd_linked_image_spec_list_cleanup.
            let rc = unsafe { ffi::rbd_list_children3(self.handle, buf.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check(|| self.op("rbd_list_children3"), rc.into())?;
            let count = n.min(buf.len());
            let out = buf[..count]
                .iter()
                .map(|s| ChildSpec {
                    pool_name: owned(s.pool_name),
                    image_name: owned(s.image_name),
                    trash: s.trash,
                })
                .collect();
            // SAFETY: frees exactly the entries librbd filled.
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(buf.as_mut_ptr(), count) };
            return Ok(out);
        }
    }

    /// Byte ranges of the opened image/snapshot that may hold data, including data inherited
    /// from a parent, at object granularity (uses the fast-diff object map when valid).
    /// Adjacent ranges are merged.
    pub fn allocated_extents(&self, size: u64) -> CallResult<Vec<Extent>> {
        self.diff_extents(None, size, true)
    }

    /// Byte ranges of the opened snapshot that may differ from the older snapshot `from` of
    /// the same image — written or discarded since — as the extents written, not whole
    /// objects: a backup reads these, and a 4 KiB rewrite must not cost a 4 MiB read.
    /// Adjacent ranges are merged.
    pub fn changed_since(&self, from: &str, size: u64) -> CallResult<Vec<Extent>> {
        let from = c("rbd_diff_iterate2", from)?;
        self.diff_extents(Some(&from), size, false)
    }

    /// `rbd_diff_iterate2` over `[0, size)`: with no `from`, the ranges that hold data; with
    /// `from`, every range reported, discarded ones included (they changed to zeros).
    /// `whole_object` lets librbd answer from the fast-diff object map, in whole objects.
    fn diff_extents(
        &self,
        from: Option<&CStr>,
        size: u64,
        whole_object: bool,
    ) -> CallResult<Vec<Extent>> {
        struct Acc {
            holes_count: bool,
            out: Mutex<Vec<Extent>>,
        }
        let acc = Acc {
            holes_count: from.is_some(),
            out: Mutex::new(Vec::new()),
        };
        unsafe extern "C" fn cb(
            offset: u64,
            len: size_t,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: arg is the Acc passed below, alive for the whole iteration.
            let acc = unsafe { &*arg.cast::<Acc>() };
            if exists == 0 && !acc.holes_count {
                return 0;
            }
            if let Ok(mut v) = acc.out.lock() {
                v.push(Extent {
                    offset,
                    length: len as u64,
                });
            }
            0
        }
        // SAFETY: open handle; `acc` outlives the synchronous iteration; a null from-snap
        // means "everything since the image was created".
        let rc = unsafe {
            ffi::rbd_diff_iterate2(
                self.handle,
                from.map_or(std::ptr::null(), CStr::as_ptr),
                0,
                size,
                1,
                u8::from(whole_object),
                Some(cb),
                std::ptr::from_ref(&acc).cast_mut().cast(),
            )
        };
        check(|| self.op("rbd_diff_iterate2"), rc.into())?;
        let mut v = acc.out.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(merge_extents(&mut v))
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> CallResult<usize> {
        // SAFETY: open handle; buf is writable for buf.len() bytes.
        let rc = unsafe {
            ffi::rbd_read(
                self.handle,
                offset,
                buf.len(),
                buf.as_mut_ptr().cast::<c_char>(),
            )
        };
        let n = check(|| format!("{} at {offset}", self.op("rbd_read")), rc as i64)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Writes `data` at `offset` (all of it, or an error).
    pub fn write(&self, offset: u64, data: &[u8]) -> CallResult<()> {
        // SAFETY: open handle; data is readable for data.len() bytes.
        let rc = unsafe {
            ffi::rbd_write(
                self.handle,
                offset,
                data.len(),
                data.as_ptr().cast::<c_char>(),
            )
        };
        let n = check(
            || format!("{} at {offset}", self.op("rbd_write")),
            rc as i64,
        )?;
        if usize::try_from(n).ok() != Some(data.len()) {
            return Err(RbdCallError {
                op: format!("{} at {offset}: short write {n}", self.op("rbd_write")),
                errno: libc::EIO,
            });
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros (whole objects are removed, partial
    /// ones zeroed: unlike `rbd_discard`, never skipped).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> CallResult<()> {
        let len_c = size_t::try_from(len).map_err(|_| RbdCallError {
            op: format!("{} at {offset}: length {len}", self.op("rbd_write_zeroes")),
            errno: libc::EINVAL,
        })?;
        // SAFETY: open handle; no buffers.
        let rc = unsafe { ffi::rbd_write_zeroes(self.handle, offset, len_c, 0, 0) };
        check(
            || format!("{} at {offset}", self.op("rbd_write_zeroes")),
            rc as i64,
        )
        .map(drop)
    }

    /// Flushes librbd's cache for this handle.
    pub fn flush(&self) -> CallResult<()> {
        // SAFETY: open handle.
        let rc = unsafe { ffi::rbd_flush(self.handle) };
        check(|| self.op("rbd_flush"), rc.into()).map(drop)
    }

    /// Whether this handle currently owns the image's exclusive lock.
    pub fn is_exclusive_lock_owner(&self) -> CallResult<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open handle, valid out-pointer.
        let rc = unsafe { ffi::rbd_is_exclusive_lock_owner(self.handle, &mut owner) };
        check(|| self.op("rbd_is_exclusive_lock_owner"), rc.into())?;
        Ok(owner != 0)
    }
}

impl Image {
    /// Clients (`client.<gid>` addresses) holding the image's exclusive lock right now;
    /// empty when nobody does.
    pub fn lock_owners(&self) -> CallResult<Vec<String>> {
        let mut max: size_t = 4;
        loop {
            let mut buf: Vec<*mut c_char> = vec![std::ptr::null_mut(); max];
            let mut n = max;
            let mut mode: c_int = 0;
            // SAFETY: buf has room for n pointers; filled entries are freed by the cleanup.
            let rc = unsafe {
                ffi::rbd_lock_get_owners(self.handle, &mut mode, buf.as_mut_ptr(), &mut n)
            };
            if rc == -libc::ENOENT {
                return Ok(Vec::new());
            }
            if rc == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check(|| self.op("rbd_lock_get_owners"), rc.into())?;
            let count = n.min(buf.len());
            let owners = buf[..count].iter().map(|p| owned(*p)).collect();
            // SAFETY: frees exactly the strings librbd filled.
            unsafe { ffi::rbd_lock_get_owners_cleanup(buf.as_mut_ptr(), count) };
            return Ok(owners);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_ids_decode_and_garbage_does_not() {
        // What `rados get rbd_id.<name>` returns for an image whose `rbd info` id is
        // 113fa0e421bf.
        let mut raw = vec![12, 0, 0, 0];
        raw.extend_from_slice(b"113fa0e421bf");
        assert_eq!(decode_id(&raw).as_deref(), Some("113fa0e421bf"));
        assert_eq!(decode_id(&raw[..10]), None, "truncated");
        assert_eq!(decode_id(&[1, 0]), None, "no length");
    }

    #[test]
    fn feature_set_is_the_documented_one() {
        // layering(1) | exclusive-lock(4) | object-map(8) | fast-diff(16) | deep-flatten(32)
        assert_eq!(KILN_FEATURES, 61);
    }
}
