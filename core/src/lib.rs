//! kiln-core: domain types, the [`VolumeDriver`] trait, the metadata store and the snapshot
//! service that owns every status transition.
//!
//! Data flows one way: CLI -> [`service::Service`] -> [`VolumeDriver`] -> backend. The store
//! sits beside the service; drivers never touch it.

pub mod agent;
pub mod attrs;
pub mod backends;
pub mod background;
pub mod backup;
pub mod bench;
pub mod blocking;
pub mod crash;
pub mod delta;
pub mod diff_apply;
pub mod diff_stream;
pub mod driver;
pub mod error;
pub mod hypervisor;
pub mod instance;
pub mod locks;
pub mod memory;
pub mod node;
pub mod ops;
pub mod progress;
pub mod service;
pub mod store;
pub mod types;
pub mod validate;
pub mod writeback;

#[doc(hidden)]
pub use fail as __fail;

pub use backends::{BackendInfo, Backends};
pub use blocking::{Blocking, BlockingDriver};
pub use driver::{
    BenchPrimitives, CheckReport, GroupMember, GroupOutcome, SnapshotDelta, SnapshotReader,
    VolumeCheck, VolumeDriver, VolumeWriter, WindowedSnapshots,
};
pub use error::{Error, ErrorKind, Result};
pub use instance::{Image, ImageStatus, Instance};
pub use progress::{NoProgress, Progress, ProgressHandle, no_progress};
pub use service::{CreateVolume, Service};
pub use types::*;
