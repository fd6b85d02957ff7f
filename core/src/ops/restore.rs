//! Write data into a detached volume — a diff stream applied, a backup restored — as one
//! journaled operation.
//!
//! Status: volume `restoring-backup` while the data is written; `available` once every write
//! is durable. A failure before the first write puts the volume back as it was; a failure
//! after it leaves the volume `error` with the reason (its data is partly written, never
//! silently). Recovery cannot re-run a write whose source is gone: an interrupted restore
//! leaves the volume `error`, saying so.

use super::{Ctx, conflict_error};
use crate::crash::crash_point;
use crate::driver::VolumeWriter;
use crate::error::{Error, Result};
use crate::store::{NewOp, Operation, Step};
use crate::types::{Volume, VolumeId, VolumeStatus};

/// Journal kind.
pub(crate) const KIND: &str = "restore";

/// A writer that remembers whether anything was written through it.
struct Tracked {
    inner: Box<dyn VolumeWriter>,
    wrote: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl VolumeWriter for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.write_at(offset, data)
    }
    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.zero(offset, len)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.inner.finish()
    }
}

/// Writes into volume `id` (which must be `available`) with `fill`, run on a blocking
/// thread with the volume's writer; `what` names the source in the error reason.
pub(crate) async fn run<T, F>(ctx: &Ctx, id: VolumeId, what: String, fill: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn VolumeWriter) -> Result<T> + Send + 'static,
{
    ctx.volume(id).await?;
    ctx.locked([id.into()], async {
        let v = ctx.volume(id).await?;
        let driver = ctx.driver(&v.backend).await?;
        let op = ctx
            .begin(
                vec![Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![VolumeStatus::Available],
                    to: VolumeStatus::RestoringBackup,
                    reason: None,
                }],
                NewOp::of(KIND, v.id, None),
                |c| conflict_error(c, "write data into volume", "available (detached)"),
            )
            .await?;
        let wrote = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let result = match driver.open_volume_writer(&v).await {
            Err(e) => Err(e),
            Ok(inner) => {
                let mut w = Box::new(Tracked {
                    inner,
                    wrote: wrote.clone(),
                });
                tokio::task::spawn_blocking(move || {
                    let r = fill(&mut *w);
                    crash_point(KIND, "before_finish");
                    let done = w.finish();
                    r.and_then(|t| done.map(|()| t))
                })
                .await
                .map_err(|e| Error::backend("restore", format!("restore task failed: {e}")))
                .and_then(|r| r)
            }
        };
        let wrote = wrote.load(std::sync::atomic::Ordering::Relaxed);
        ctx.finish(conclude(&v, op, &what, &result, wrote)).await?;
        result
    })
    .await
}

fn conclude<T>(
    v: &Volume,
    op: crate::store::OpId,
    what: &str,
    r: &Result<T>,
    wrote: bool,
) -> Vec<Step> {
    let status = match r {
        Ok(_) => Step::SetVolumeStatus {
            id: v.id,
            from: vec![],
            to: VolumeStatus::Available,
            reason: None,
        },
        // Nothing was written: the volume is exactly as it was.
        Err(_) if !wrote => Step::RestoreVolumeStatus {
            id: v.id,
            status: v.status,
            reason: v.status_reason.clone(),
            updated_at: v.updated_at,
        },
        Err(e) => Step::SetVolumeStatus {
            id: v.id,
            from: vec![],
            to: VolumeStatus::Error,
            reason: Some(format!(
                "writing {what} failed part-way (the volume holds part of it): {e}"
            )),
        },
    };
    vec![status, Step::FinishOp(op)]
}

/// Recovery: the source of the interrupted write is gone, so the volume cannot be finished
/// or rolled back; it is marked `error` with the reason.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation) -> Result<String> {
    let Some(v) = ctx.store.volume(op.volume_id).await? else {
        ctx.finish(vec![Step::FinishOp(op.id)]).await?;
        return Ok("volume record already gone".into());
    };
    let reason = "a data restore into this volume was interrupted (it may hold part of the \
                  data); restore again or delete it";
    ctx.finish(vec![
        Step::SetVolumeStatus {
            id: v.id,
            from: vec![],
            to: VolumeStatus::Error,
            reason: Some(reason.into()),
        },
        Step::FinishOp(op.id),
    ])
    .await?;
    Ok(format!("volume marked error: {reason}"))
}
