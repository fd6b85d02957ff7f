//! kiln's LVM backend: thin or thick logical volumes of one volume group, driven through lvm2
//! commands (argv vectors, `LC_ALL=C`, JSON reports, bounded by a timeout).
//!
//! Names are Cinder's (`volume-<uuid>`, `_snapshot-<uuid>`), so a volume group populated by
//! Cinder can be read. See `docs/lvm-backend.md` for the commands behind each operation.

mod backend;
mod blockdev;
mod command;
mod config;
mod driver;
mod names;
mod reader;
mod report;
mod revert;
mod snapshots;
mod thin_map;
mod volumes;

pub use config::{LvmConfig, LvmType};
pub use driver::LvmDriver;
pub use reader::LvmSnapshotReader;
