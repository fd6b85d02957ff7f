//! Hand-written bindings for exactly the librbd functions this driver calls.
//!
//! The `ceph` crate binds librados only; librbd gets this small `extern "C"` block instead of a
//! bindgen build step, so building needs nothing but `librbd-dev`. Every signature and struct
//! layout is copied from `/usr/include/rbd/librbd.h` (Ceph 16.2, LIBRBD_VER 1.16); the
//! layouts are checked at run time against the real library by the integration tests (every
//! struct here is read back from librbd by at least one test).

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, size_t, ssize_t};

pub use ceph::rados::{rados_ioctx_t, rados_t};

/// `rbd_image_t`: an open image handle.
pub type rbd_image_t = *mut c_void;
/// `rbd_image_options_t`: an options bag for create/clone.
pub type rbd_image_options_t = *mut c_void;
/// `librbd_progress_fn_t`: return non-zero to cancel.
pub type librbd_progress_fn_t =
    Option<unsafe extern "C" fn(offset: u64, total: u64, ptr: *mut c_void) -> c_int>;
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

#[link(name = "rbd")]
unsafe extern "C" {
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
    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut c_int,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
}
