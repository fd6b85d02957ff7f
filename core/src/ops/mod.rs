//! Journaled operations, one file each, and the executor they all run on.
//!
//! Each operation module holds its forward steps (`run`) **and** its recovery (`recover`)
//! together — the idea of Cinder's taskflow `execute`/`revert` pairs — so what an
//! operation journals and how a crash in it is resolved are read side by side.
//!
//! The protocol every mutation follows, owned by [`Ctx`] and written once:
//! 1. take the locks of every object involved ([`Ctx::lock`]);
//! 2. one guarded store batch: compare-and-set of statuses + the journal entry, all or
//!    nothing ([`Ctx::begin`]); a failed guard becomes a one-line `NotFound`/`WrongState`;
//! 3. the driver call between two crash points ([`Ctx::drive`]);
//! 4. one store batch with the result that also removes the journal entry ([`Ctx::finish`]).
//!
//! A crash between 2 and 4 leaves a journal entry whose locks are free; [`recovery`] finds
//! it and hands it to its operation's `recover`, which finishes or rolls back by asking the
//! backend what exists. A backend that cannot answer now (an [`ErrorKind::Unavailable`]
//! error) leaves the entry journaled for the next try.

pub mod backup;
pub mod clone;
pub mod create_snapshot;
pub mod create_volume;
pub mod delete_snapshot;
pub mod delete_volume;
pub mod flatten;
pub mod group_snapshot;
pub mod image_delete;
pub mod image_restore;
pub mod instance_snapshot;
pub mod recovery;
pub mod reset_state;
pub mod restore;
pub mod revert;

use std::sync::Arc;

use crate::backends::Backends;
use crate::crash::crash_point_async;
use crate::driver::VolumeDriver;
use crate::error::{Error, ErrorKind, Result};
use crate::locks::{LockKey, LockManager, LockSet};
use crate::store::{AsyncStore, Batch, Conflict, NewOp, OpId, Step};
use crate::types::{Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId};

/// Everything an operation needs: the store, the backends and the locks.
pub(crate) struct Ctx {
    pub(crate) store: AsyncStore,
    pub(crate) backends: Backends,
    pub(crate) locks: Arc<dyn LockManager>,
    /// Guest-agent access (freeze/thaw), when the process has it.
    pub(crate) agents: Option<Arc<dyn crate::agent::GuestAgents>>,
}

/// Whether a driver error means the backend refused *before changing anything*: dependents
/// exist (`Busy`), or it cannot answer now (`Unavailable`). Such an operation leaves every
/// object in the status it had before it began.
pub(crate) fn refused(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Busy | ErrorKind::Unavailable)
}

/// The one-line error for a failed guard: the object is missing, or in the wrong status.
pub(crate) fn conflict_error(c: &Conflict, action: &str, needed: &str) -> Error {
    if c.what == "quota" {
        return Error::new(
            ErrorKind::OverLimit,
            format!(
                "cannot {action}: quota exceeded for {} ({} in use)",
                c.id,
                c.found.as_deref().unwrap_or("?")
            ),
        );
    }
    match &c.found {
        None => Error::not_found(c.what, &c.id),
        Some(found) => Error::wrong_state(format!(
            "cannot {action}: {} {} is {found}; it must be {needed}",
            c.what, c.id
        )),
    }
}

/// What a record looked like before an operation changed it, kept in the journal payload
/// so that a refusal found by recovery can put it back exactly (status, reason and
/// `updated_at`).
pub(crate) struct Before<S> {
    pub(crate) status: S,
    pub(crate) reason: Option<String>,
    pub(crate) updated_at: chrono::DateTime<chrono::Utc>,
}

impl<S: std::str::FromStr + std::fmt::Display> Before<S> {
    /// The journal payload recording it.
    pub(crate) fn payload(&self) -> serde_json::Value {
        serde_json::json!({
            "prev_status": self.status.to_string(),
            "prev_reason": self.reason,
            "prev_updated_at": self.updated_at,
        })
    }

    /// Reads it back from `payload`. Journals written before kiln recorded it give
    /// `default` (the old rule) and keep `updated_at` as the record has it now.
    pub(crate) fn read(
        payload: &serde_json::Value,
        default: S,
        updated_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Before {
            status: payload["prev_status"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or(default),
            reason: payload["prev_reason"].as_str().map(str::to_string),
            updated_at: payload["prev_updated_at"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(updated_at),
        }
    }
}

impl NewOp {
    /// A top-level journal entry of `kind` about `volume` (and `snapshot`).
    pub(crate) fn of(kind: &'static str, volume: VolumeId, snapshot: Option<SnapshotId>) -> Self {
        NewOp {
            kind,
            parent: None,
            volume_id: volume,
            snapshot_id: snapshot,
            payload: serde_json::Value::Null,
        }
    }

    /// With operation-specific data for its recovery.
    pub(crate) fn payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = payload;
        self
    }
}

impl Ctx {
    /// The backend's driver (opened on first use).
    pub(crate) async fn driver(&self, backend: &str) -> Result<Arc<dyn VolumeDriver>> {
        self.backends.driver(backend).await
    }

    /// One volume, or `NotFound`.
    pub(crate) async fn volume(&self, id: VolumeId) -> Result<Volume> {
        self.store
            .volume(id)
            .await?
            .ok_or_else(|| Error::not_found("volume", id))
    }

    /// One snapshot, or `NotFound`.
    pub(crate) async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        self.store
            .snapshot(id)
            .await?
            .ok_or_else(|| Error::not_found("snapshot", id))
    }

    /// Takes the locks of `keys` (step 1).
    pub(crate) async fn lock(&self, keys: impl IntoIterator<Item = LockKey>) -> Result<LockSet> {
        let keys: Vec<LockKey> = keys.into_iter().collect();
        self.locks.lock(&keys).await
    }

    /// Runs `body` under the locks of `keys` and returns once they are free again for
    /// every node ([`LockSet::release`]): an operation holds its locks for exactly its
    /// lifetime, so a client told it ended can go on through any node at once.
    pub(crate) async fn locked<T>(
        &self,
        keys: impl IntoIterator<Item = LockKey>,
        body: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let locks = self.lock(keys).await?;
        Self::holding(locks, body).await
    }

    /// Runs `body` while `locks` are held, then releases them as [`Ctx::locked`] does.
    pub(crate) async fn holding<T>(locks: LockSet, body: impl Future<Output = T>) -> T {
        let result = body.await;
        locks.release().await;
        result
    }

    /// Applies a guarded batch that journals nothing (e.g. attach); a failed guard becomes
    /// the error `on_conflict` makes.
    pub(crate) async fn guarded(
        &self,
        steps: Vec<Step>,
        on_conflict: impl FnOnce(&Conflict) -> Error,
    ) -> Result<()> {
        self.store
            .commit(Batch::new(steps))
            .await?
            .map(drop)
            .map_err(|c| on_conflict(&c))
    }

    /// Step 2: the guarded batch that starts an operation and journals it.
    pub(crate) async fn begin(
        &self,
        steps: Vec<Step>,
        op: NewOp,
        on_conflict: impl FnOnce(&Conflict) -> Error,
    ) -> Result<OpId> {
        let kind = op.kind;
        let begun = crate::background::Begun {
            volume_id: op.volume_id,
            snapshot_id: op.snapshot_id,
        };
        match self.store.commit(Batch::with_op(steps, op)).await? {
            Ok(Some(id)) => {
                tracing::debug!(op = kind, id = id.0, "operation journaled");
                crate::background::signal_begun(begun);
                Ok(id)
            }
            Ok(None) => Err(Error::store(format!(
                "the store journaled no operation for {kind}"
            ))),
            Err(c) => Err(on_conflict(&c)),
        }
    }

    /// Step 3: the driver call `fut` of operation `op`, between its two crash points.
    pub(crate) async fn drive<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        // Timing and logging of the call itself belong to the driver adapter (once).
        crash_point_async(op, "before_driver").await;
        let r = fut.await;
        crash_point_async(op, "after_driver").await;
        r
    }

    /// Step 4: applies a batch whose guards must hold (the caller holds the locks). A
    /// failed guard here means someone changed the object without its lock: a store error.
    pub(crate) async fn finish(&self, steps: Vec<Step>) -> Result<()> {
        self.store
            .commit(Batch::new(steps))
            .await?
            .map(drop)
            .map_err(|c| {
                Error::store(format!(
                    "unexpected concurrent change of {} {} (now {:?})",
                    c.what, c.id, c.found
                ))
            })
    }

    /// An `available` snapshot, after asking its backend whether its data is still usable:
    /// one the backend reports broken (e.g. an overflowed LVM thick snapshot) is marked
    /// `error` with the backend's reason first. Called before a snapshot's data is *used*
    /// (revert, clone, read) — never by listings, which stay read-only.
    pub(crate) async fn checked_snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        let s = self.snapshot(id).await?;
        if s.status != SnapshotStatus::Available {
            return Ok(s);
        }
        // An unavailable backend cannot say anything about its snapshots: keep the record.
        let Ok(driver) = self.driver(&s.backend).await else {
            return Ok(s);
        };
        match driver.snapshot_health(&s).await {
            Ok(None) => Ok(s),
            Ok(Some(reason)) => {
                // info: the caller reports the refusal; the CLI keeps its one line on stderr.
                tracing::info!(snapshot = %s.id, %reason, "backend reports the snapshot unusable; marking it error");
                // Compare-and-set: if someone else changed it meanwhile, their status stands.
                let _ = self
                    .store
                    .commit(Batch::new(vec![Step::SetSnapshotStatus {
                        id: s.id,
                        from: vec![SnapshotStatus::Available],
                        to: SnapshotStatus::Error,
                        reason: Some(reason),
                    }]))
                    .await?;
                self.snapshot(s.id).await
            }
            // A failed probe says nothing about the snapshot; keep what the store knows.
            Err(e) => {
                tracing::info!(snapshot = %s.id, error = %e, "snapshot health probe failed");
                Ok(s)
            }
        }
    }
}
