//! Hand-written bindings for exactly the librados and librbd functions this driver calls,
//! resolved with `dlopen`/`dlsym` on first use instead of linked.
//!
//! Linking librbd made every kiln command of a `--features rbd` build load librbd,
//! librados, libceph-common and 24 more shared objects before `main` (≈ 17 ms of CPU, see
//! docs/benchmarks.md), an RBD backend configured or not. Now nothing links them: [`load`]
//! (called when the first RBD connection is made) maps `librbd.so.1` and its dependencies
//! and resolves every function below, so only commands that use an RBD backend pay, and a
//! missing library is that backend's error instead of every command's loader failure.
//!
//! Every signature and struct layout is copied from `/usr/include/rbd/librbd.h` and
//! `/usr/include/rados/librados.h` (Ceph 16.2, LIBRBD_VER 1.16); the layouts are checked at
//! run time against the real library by the integration tests (every struct here is read
//! back from librbd by at least one test).

#![allow(non_camel_case_types)]
// The C structs' fields mirror librbd.h one to one, under the header's names; the header
// documents them.
#![allow(missing_docs)]

use std::ffi::CString;
use std::sync::OnceLock;

use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// `rados_t`: a cluster handle.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context on one pool.
pub type rados_ioctx_t = *mut c_void;

/// `rbd_image_t`: an open image handle.
pub type rbd_image_t = *mut c_void;
/// `rbd_image_options_t`: an options bag for create/clone.
pub type rbd_image_options_t = *mut c_void;
/// `librbd_progress_fn_t`: return non-zero to cancel.
pub type librbd_progress_fn_t =
    Option<unsafe extern "C" fn(offset: u64, total: u64, ptr: *mut c_void) -> c_int>;
/// `rbd_completion_t`: one asynchronous request's completion.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: called when an asynchronous request completes.
pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;
/// Callback of `rbd_diff_iterate2`: (offset, length, exists, arg).
pub type rbd_diff_cb_t = Option<
    unsafe extern "C" fn(offset: u64, len: size_t, exists: c_int, arg: *mut c_void) -> c_int,
>;

/// `RBD_FEATURE_LAYERING`
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_OBJECT_MAP`
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `RBD_FEATURE_FAST_DIFF`
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FEATURE_DEEP_FLATTEN`
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;

/// `RBD_OPERATION_FEATURE_CLONE_PARENT` (rbd/features.h): the image has clone-v2 children.
pub const RBD_OPERATION_FEATURE_CLONE_PARENT: u64 = 1 << 0;
/// `RBD_SNAP_CREATE_SKIP_QUIESCE`: `rbd_snap_create2` sends no quiesce/unquiesce
/// notifications to the image's watchers.
pub const RBD_SNAP_CREATE_SKIP_QUIESCE: u32 = 1 << 0;

/// `RBD_IMAGE_OPTION_FEATURES`
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
/// `RBD_IMAGE_OPTION_ORDER`
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;

/// `rbd_linked_image_spec_t` (children and parent listings).
#[repr(C)]
#[derive(Debug)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_snap_spec_t` (a parent's snapshot). `namespace_type` is a C enum (int-sized).
#[repr(C)]
#[derive(Debug)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t` (snapshot listing).
#[repr(C)]
#[derive(Debug)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// The shared object mapped by [`load`]; its dependencies (librados, libceph-common, …)
/// come with it, and `dlsym` on its handle finds their symbols too.
pub const LIBRBD: &str = "librbd.so.1";

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// Maps librbd (once per process) and resolves every function of this module; later calls
/// return the first result. `Err` names the library or the symbol that is missing.
pub fn load() -> Result<(), String> {
    match API.get_or_init(open) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    }
}

fn open() -> Result<Api, String> {
    let name = CString::new(LIBRBD).map_err(|_| format!("{LIBRBD:?} contains a NUL byte"))?;
    // RTLD_NOW: a symbol librbd itself lacks fails here, not in the middle of an operation.
    // The handle is never closed: the functions stay in use until the process exits.
    // SAFETY: NUL-terminated name; loading librbd runs its constructors, as linking did.
    let lib = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return Err(format!("cannot load {LIBRBD}: {}", dlerror()));
    }
    // SAFETY: live handle; every name below is the C function with the signature copied
    // from the header.
    unsafe { Api::resolve(lib) }
}

/// The loader's last error message (for a failed `dlopen`).
fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the loader, copied
    // at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: see above.
        unsafe { std::ffi::CStr::from_ptr(e) }
            .to_string_lossy()
            .into_owned()
    }
}

/// What a wrapper returns if [`load`] never succeeded. Unreachable in practice: every
/// handle the wrappers take comes from a [`crate::cluster::Cluster`], which loads first.
trait Unloaded {
    fn unloaded() -> Self;
}
impl Unloaded for c_int {
    fn unloaded() -> Self {
        -libc::ENOSYS
    }
}
impl Unloaded for ssize_t {
    fn unloaded() -> Self {
        -(libc::ENOSYS as ssize_t)
    }
}
impl Unloaded for () {
    fn unloaded() -> Self {}
}

/// Declares each C function as a field of `Api` (its address, from `dlsym`) and as a
/// `pub unsafe fn` of the same name and signature that calls through it, so call sites read
/// as with an `extern "C"` block.
macro_rules! dynamic_fns {
    ($( pub fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? ; )*) => {
        /// The address of every function, resolved by [`load`].
        struct Api {
            $( $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
        }

        impl Api {
            /// # Safety
            /// `lib` is a live `dlopen` handle of librbd.
            unsafe fn resolve(lib: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let sym = concat!(stringify!($name), "\0");
                        // SAFETY: live handle, NUL-terminated name.
                        let p = unsafe { libc::dlsym(lib, sym.as_ptr().cast()) };
                        if p.is_null() {
                            return Err(format!(
                                "{LIBRBD} (or a library it loads) has no function {}",
                                stringify!($name)
                            ));
                        }
                        // SAFETY: the symbol is the C function of that name; the signature
                        // is the header's.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(p)
                        }
                    }, )*
                })
            }
        }

        $(
            #[doc = concat!("`", stringify!($name), "` of librados/librbd.")]
            ///
            /// # Safety
            /// As the C function's: valid handles and pointers, as its header documents.
            // The C signatures decide the argument count.
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                match API.get() {
                    // SAFETY: the caller upholds the C function's contract.
                    Some(Ok(api)) => unsafe { (api.$name)($($arg),*) },
                    _ => Unloaded::unloaded(),
                }
            }
        )*
    };
}

dynamic_fns! {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: size_t,
        inbuf: *const c_char,
        inbuflen: size_t,
        outbuf: *mut *mut c_char,
        outbuflen: *mut size_t,
        outs: *mut *mut c_char,
        outslen: *mut size_t,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: size_t) -> c_int;
    pub fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    pub fn rados_wait_for_latest_osdmap(cluster: rados_t) -> c_int;
    pub fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;

    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;

    pub fn rbd_create2(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    pub fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;

    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;

    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_get_op_features(image: rbd_image_t, op_features: *mut u64) -> c_int;
    pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: size_t) -> c_int;
    pub fn rbd_get_parent(
        image: rbd_image_t,
        parent_image: *mut rbd_linked_image_spec_t,
        parent_snap: *mut rbd_snap_spec_t,
    ) -> c_int;
    pub fn rbd_linked_image_spec_cleanup(image: *mut rbd_linked_image_spec_t);
    pub fn rbd_linked_image_spec_list_cleanup(
        images: *mut rbd_linked_image_spec_t,
        num_images: size_t,
    );
    pub fn rbd_snap_spec_cleanup(snap: *mut rbd_snap_spec_t);

    pub fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    pub fn rbd_snap_exists(image: rbd_image_t, snapname: *const c_char, exists: *mut bool)
    -> c_int;
    pub fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_create2(
        image: rbd_image_t,
        snap_name: *const c_char,
        flags: u32,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_rollback_with_progress(
        image: rbd_image_t,
        snapname: *const c_char,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_snap_protect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    pub fn rbd_snap_unprotect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    pub fn rbd_snap_is_protected(
        image: rbd_image_t,
        snap_name: *const c_char,
        is_protected: *mut c_int,
    ) -> c_int;
    pub fn rbd_snap_set(image: rbd_image_t, snapname: *const c_char) -> c_int;

    pub fn rbd_flatten_with_progress(
        image: rbd_image_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_list_children3(
        image: rbd_image_t,
        images: *mut rbd_linked_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;

    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_read(image: rbd_image_t, ofs: u64, len: size_t, buf: *mut c_char) -> ssize_t;
    pub fn rbd_write(image: rbd_image_t, ofs: u64, len: size_t, buf: *const c_char) -> ssize_t;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_write_zeroes(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> ssize_t;
    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut c_int,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
}
