//! Reading a snapshot's image from its activated device.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kiln_core::{Error, Extent, Result, Snapshot, SnapshotReader};

use crate::backend::LvmBackend;
use crate::command::{Retry, Runner};
use crate::names;
use crate::report::LvRow;
use crate::thin_map;

/// Raw reader over `/dev/mapper/<vg>-<snapshot>`. Deactivates, when dropped, what it had to
/// activate (a thin snapshot skipped at activation, or a thick origin that was inactive).
/// Dropping runs `lvchange -an`: drop it from a blocking context.
pub struct LvmSnapshotReader {
    // An Option only so Drop can close the device before deactivating it (an open LV
    // refuses deactivation).
    file: Option<File>,
    size: u64,
    extents: Vec<Extent>,
    deactivate: Option<(Runner, String)>,
}

impl SnapshotReader for LvmSnapshotReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = ((self.size - offset).min(buf.len() as u64)) as usize;
        match &self.file {
            Some(f) => f.read_at(&mut buf[..n], offset),
            None => Ok(0),
        }
    }
}

impl Drop for LvmSnapshotReader {
    fn drop(&mut self) {
        drop(self.file.take());
        if let Some((runner, spec)) = self.deactivate.take() {
            // An LV another reader still holds open refuses deactivation: harmless, it stays
            // active until that reader drops.
            if let Err(e) = runner.lvm(
                "lvchange -an",
                &["lvchange", "-q", "-an", &spec],
                Retry::Transient,
            ) {
                tracing::info!(lv = %spec, error = %e, "could not deactivate after reading");
            }
        }
    }
}

impl LvmBackend {
    /// Activates the snapshot (`-K` for thin ones), opens its device, and lists its extents.
    /// The image is exactly the snapshot's `size_bytes` long.
    pub(crate) fn open_snapshot_reader(&self, s: &Snapshot) -> Result<LvmSnapshotReader> {
        let snap = names::snapshot(&s.id);
        let not_found = || Error::not_found("snapshot", s.id.to_string());
        let row = self.lv(&snap)?.ok_or_else(not_found)?;
        let mut deactivate = None;
        let row = if row.is_thick_snapshot() {
            if !row.is_active() {
                self.ensure_thick_active(&row)?;
                deactivate = Some((self.runner.clone(), self.spec(&row.origin)));
            }
            let row = self.lv(&snap)?.ok_or_else(not_found)?;
            if let Some(reason) = self.invalid_reason(&row) {
                return Err(Error::wrong_state(reason));
            }
            row
        } else {
            if !row.is_active() {
                self.activate(&snap, true)?;
                deactivate = Some((self.runner.clone(), self.spec(&snap)));
            }
            row
        };
        // From here on the reader (or this guard) owns the activation.
        let mut reader = LvmSnapshotReader {
            file: None,
            size: 0,
            extents: Vec::new(),
            deactivate,
        };
        let dev = self.device(&snap);
        let file =
            File::open(&dev).map_err(|e| Error::io(format!("opening {}", dev.display()), e))?;
        let device_size = crate::blockdev::size(&file)
            .map_err(|e| Error::io(format!("sizing {}", dev.display()), e))?;
        // The image is the snapshot's recorded size: lvm rounds LV sizes up to whole
        // extents, and that slack is not part of the volume (an export must have exactly
        // `size_bytes`).
        if device_size < s.size_bytes {
            return Err(Error::backend(
                "open_snapshot_reader",
                format!(
                    "{} has {device_size} bytes, less than the snapshot's recorded {} bytes",
                    dev.display(),
                    s.size_bytes
                ),
            ));
        }
        reader.size = s.size_bytes;
        reader.file = Some(file);
        let whole = vec![Extent {
            offset: 0,
            length: reader.size,
        }];
        reader.extents = if row.is_thin_volume() {
            self.thin_extents(&row, reader.size).unwrap_or(whole)
        } else {
            whole
        };
        Ok(reader)
    }

    /// Mapped extents of a thin LV from a metadata snapshot of its pool, or `None` (logged at
    /// info: the result stays correct, only slower) when they cannot be read — the caller
    /// then reads everything.
    fn thin_extents(&self, row: &LvRow, size: u64) -> Option<Vec<Extent>> {
        let dev_id = row.thin_id()?.to_string();
        let dump = self
            .with_metadata_snap(&row.pool_lv, |tmeta| {
                self.runner.run(
                    "thin_dump",
                    "thin_dump",
                    &["-m", "--dev-id", &dev_id, tmeta],
                    Retry::Never,
                )
            })
            .and_then(|dump| dump);
        match dump {
            Ok(out) => {
                let e = thin_map::extents_from_dump(&out.stdout, size);
                if e.is_none() {
                    tracing::info!(pool = %row.pool_lv, "thin_dump output not understood; reading all extents");
                }
                e
            }
            Err(e) => {
                tracing::info!(pool = %row.pool_lv, error = %e, "no thin mappings; reading all extents");
                None
            }
        }
    }
}
