//! kiln's Ceph RBD backend.
//!
//! One persistent librados connection per backend ([`cluster::Cluster`]), librados and librbd
//! through a small hand-written FFI module ([`ffi`]) that loads them on first use, and
//! [`RbdBackend`] implementing [`kiln_core::BlockingDriver`] on top: volumes are
//! `volume-<uuid>` images, snapshots are `snapshot-<uuid>` RBD snapshots, volumes from
//! snapshots are copy-on-write clones (flattened by policy), reverts are `rbd_snap_rollback`.
//!
//! Every librbd call blocks; [`open`] wraps the backend in [`kiln_core::Blocking`]
//! ([`RbdDriver`]), which runs each call on tokio's blocking pool.

mod aio;
mod backup_pool;
mod bench;
pub mod cluster;
mod config;
mod connection;
mod driver;
mod errno;
pub mod ffi;
pub mod handles;
pub mod image;
mod names;
mod progress;
mod reader;
mod stats;
mod writer;

pub use config::{MAX_CONNECT_TIMEOUT_SECS, RbdConfig};
pub use driver::{RbdBackend, RbdDriver, open};
pub use errno::RbdCallError;
pub use names::{snapshot_name, volume_image};
pub use reader::RbdSnapshotReader;
