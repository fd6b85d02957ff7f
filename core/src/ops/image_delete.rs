//! Delete an image and, unless asked to keep them, its snapshots (Nova leaves them behind;
//! kiln does not).
//!
//! The image is marked `pending_delete` first, which releases its snapshots for deletion;
//! then each snapshot is deleted as its own journaled operation; then the record goes. An
//! interruption leaves the image `pending_delete` with the snapshots not yet deleted:
//! `image delete` again finishes the job. With `keep_snapshots` the record goes at once
//! and its snapshots become ordinary snapshots.

use serde::Serialize;

use super::{Ctx, delete_snapshot};
use crate::error::{Error, ErrorKind, Result};
use crate::instance::ImageStatus;
use crate::locks::LockKey;
use crate::store::Step;
use crate::types::{ImageId, SnapshotId};

/// What `image delete` did.
#[derive(Debug, Clone, Serialize)]
pub struct ImageDeleted {
    /// The image.
    pub id: ImageId,
    /// Snapshots deleted with it.
    pub snapshots_deleted: Vec<SnapshotId>,
    /// Snapshots kept (released from the image).
    pub snapshots_kept: Vec<SnapshotId>,
}

/// Deletes image `id` (see the module docs).
pub(crate) async fn run(ctx: &Ctx, id: ImageId, keep_snapshots: bool) -> Result<ImageDeleted> {
    let img = ctx
        .store
        .image(id)
        .await?
        .ok_or_else(|| Error::not_found("image", id))?;
    // One image operation per instance at a time (snapshots and restores lock it too).
    // Every lock the snapshot deletes need is taken here, in the same set: a second set
    // taken while this one is held would need a second lock session, and enough
    // concurrent image deletes could then hold every session while waiting for one.
    let mut keys = vec![LockKey::Instance(img.instance_id)];
    if !keep_snapshots {
        for sid in &img.snapshots {
            let Some(s) = ctx.store.snapshot(*sid).await? else {
                continue;
            };
            keys.push(s.volume_id.into());
            keys.extend(
                ctx.store
                    .volumes_from_snapshot(*sid)
                    .await?
                    .iter()
                    .map(|c| LockKey::from(c.id)),
            );
        }
    }
    ctx.locked(keys, async {
        let missing = |c: &crate::store::Conflict| Error::not_found(c.what, &c.id);
        if keep_snapshots {
            ctx.guarded(
                vec![
                    Step::SetImageStatus {
                        id,
                        from: vec![],
                        to: ImageStatus::PendingDelete,
                    },
                    Step::DeleteImage(id),
                ],
                missing,
            )
            .await?;
            return Ok(ImageDeleted {
                id,
                snapshots_deleted: vec![],
                snapshots_kept: img.snapshots,
            });
        }
        ctx.guarded(
            vec![Step::SetImageStatus {
                id,
                from: vec![],
                to: ImageStatus::PendingDelete,
            }],
            missing,
        )
        .await?;
        let mut deleted = Vec::new();
        for sid in &img.snapshots {
            let one = async {
                let s = ctx.snapshot(*sid).await?;
                let driver = ctx.driver(&s.backend).await?;
                delete_snapshot::run_locked(ctx, &driver, s, false, crate::progress::no_progress())
                    .await
            };
            match one.await {
                Ok(_) => deleted.push(*sid),
                Err(e) if e.kind() == ErrorKind::NotFound => deleted.push(*sid),
                Err(e) => {
                    return Err(e.about(format!(
                        "image {id} is pending_delete; its snapshot {sid} could not be deleted \
                     (run image delete again once fixed)"
                    )));
                }
            }
        }
        ctx.finish(vec![Step::DeleteImage(id)]).await?;
        Ok(ImageDeleted {
            id,
            snapshots_deleted: deleted,
            snapshots_kept: vec![],
        })
    })
    .await
}
