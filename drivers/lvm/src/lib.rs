//! kiln's LVM backend: thin or thick logical volumes of one volume group, driven through lvm2
//! commands (argv vectors, `LC_ALL=C`, JSON reports, bounded by a timeout).
//!
//! Names are Cinder's (`volume-<uuid>`, `_snapshot-<uuid>`), so a volume group populated by
//! Cinder can be read. See `docs/lvm-backend.md` for the commands behind each operation.
//!
//! The driver is plain blocking code ([`LvmBackend`], a [`kiln_core::BlockingDriver`]);
//! [`open`] wraps it in kiln-core's one blocking adapter as an [`LvmDriver`].

mod backend;
mod blockdev;
mod command;
mod config;
mod diff;
mod driver;
mod names;
mod reader;
mod report;
mod revert;
mod snapshots;
mod thin_map;
mod volumes;
mod writer;

use kiln_core::{Error, Result};

pub use backend::LvmBackend;
pub use config::{LvmConfig, LvmType};
pub use reader::LvmSnapshotReader;
pub use writer::LvmVolumeWriter;

/// The LVM backend as a `kiln_core::VolumeDriver`: [`LvmBackend`] behind kiln-core's
/// blocking adapter. It derefs to [`LvmBackend`], so [`LvmBackend::is_thin`] and
/// [`LvmBackend::volume_group`] are reachable on it.
pub type LvmDriver = kiln_core::Blocking<LvmBackend>;

/// Opens backend `backend_name`: checks that the volume group (and, for thin, the pool)
/// exists and resolves `type = "auto"`. Fails with an `InvalidInput` (configuration) error
/// naming what is missing or wrong; every lvm command is bounded by `command_timeout_secs`,
/// so this cannot hang. The lvm commands run on tokio's blocking pool.
pub async fn open(backend_name: &str, cfg: LvmConfig) -> Result<LvmDriver> {
    let span = tracing::info_span!("lvm.open", backend = %backend_name, vg = %cfg.volume_group);
    let backend = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        LvmBackend::open(cfg)
    })
    .await
    .map_err(|e| Error::backend("open", format!("worker thread failed: {e}")))?
    .map_err(|e| e.with_backend(backend_name))?;
    tracing::info!(
        backend = %backend_name,
        vg = %backend.vg,
        kind = ?backend.kind,
        "lvm backend opened"
    );
    Ok(kiln_core::Blocking::new(backend_name, backend))
}
