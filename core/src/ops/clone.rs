//! Create a volume from a snapshot (a clone). Lineage is recorded on the new volume; the
//! source volume is locked too, so its snapshot cannot be deleted or reverted to while it
//! is copied. Recovery is [`super::create_volume::recover`]: redo from scratch.

use super::conflict_error;
use super::create_volume::{at_least, conclude, new_record};
use crate::attrs::{ObjectKind, Owner};
use crate::error::{Error, Result};
use crate::progress::ProgressHandle;
use crate::store::{NewOp, Step};
use crate::types::{SnapshotId, SnapshotStatus, Volume};
use crate::validate::check_size;

/// Journal kind (recovered by `create_volume::recover`).
pub(crate) const KIND: &str = "create_volume_from_snapshot";

/// Crash points keep the name of the user-facing command, `create_volume`.
const CRASH_OP: &str = "create_volume";

/// Creates a volume holding snapshot `sid`'s data, of `size_bytes` (default: the
/// snapshot's size), on the snapshot's backend (`backend` must match when given).
pub(crate) async fn run(
    ctx: &super::Ctx,
    sid: SnapshotId,
    size_bytes: Option<u64>,
    backend: Option<String>,
    name: Option<String>,
    owner: Option<&Owner>,
    progress: ProgressHandle,
) -> Result<Volume> {
    let source = ctx.checked_snapshot(sid).await?;
    if let Some(b) = &backend
        && *b != source.backend
    {
        return Err(Error::invalid(
            "backend",
            format!(
                "snapshot {} lives on backend {:?}; clones stay on their snapshot's backend",
                source.id, source.backend
            ),
        ));
    }
    let size_bytes = match size_bytes {
        Some(size) => at_least(
            check_size(size)?,
            source.size_bytes,
            format_args!("snapshot {}", source.id),
        )?,
        None => source.size_bytes,
    };
    let driver = ctx.driver(&source.backend).await?;
    let volume = new_record(size_bytes, source.backend.clone(), name, Some(source.id));
    ctx.locked([volume.id.into(), source.volume_id.into()], async {
        let op = ctx
            .begin(
                Owner::insert_steps(
                    owner,
                    ObjectKind::Volume,
                    volume.id.to_string(),
                    volume.size_bytes,
                    Step::InsertVolume(volume.clone()),
                )
                .into_iter()
                .chain([Step::SnapshotIn {
                    id: source.id,
                    any_of: vec![SnapshotStatus::Available],
                }])
                .collect(),
                NewOp::of(KIND, volume.id, Some(source.id)),
                |c| conflict_error(c, "create a volume from it", "available"),
            )
            .await?;
        let result = ctx
            .drive(
                CRASH_OP,
                driver.create_volume_from_snapshot(&volume, &source, progress),
            )
            .await;
        conclude(ctx, &driver, &volume, op, result).await
    })
    .await
}
