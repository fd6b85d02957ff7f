//! Running an operation in the background once it has *begun*: an API answers `202
//! Accepted` only when the operation is journaled (its first status change is committed),
//! so a client that polls right after sees the new status, and a request refused before
//! anything changed (bad input, wrong status, unknown id) still gets its error at once.
//!
//! [`Ctx::begin`](crate::ops) fires the signal of the task it runs in; [`start`] wraps an
//! operation's future with one and waits for the first of "begun" and "finished".

use std::cell::RefCell;
use std::future::Future;

use tokio::sync::oneshot;

tokio::task_local! {
    static BEGUN: RefCell<Option<oneshot::Sender<Begun>>>;
}

/// What the first journaled step of an operation was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    /// Its volume (for a creation or clone: the new volume).
    pub volume_id: crate::types::VolumeId,
    /// Its snapshot (for a snapshot creation: the new snapshot).
    pub snapshot_id: Option<crate::types::SnapshotId>,
}

/// Tells the task's waiter (if any) that its operation is journaled; later calls do
/// nothing. Called by the operation executor after its first journaling commit.
pub(crate) fn signal_begun(begun: Begun) {
    let _ = BEGUN.try_with(|cell| {
        if let Some(tx) = cell.borrow_mut().take() {
            let _ = tx.send(begun);
        }
    });
}

/// How [`start`] ended.
pub enum Started<T> {
    /// The operation finished (or failed) before — or without — journaling anything.
    Finished(T),
    /// The operation is journaled (`Begun` says what about) and goes on in the task.
    Running(Begun, tokio::task::JoinHandle<T>),
}

/// Spawns `op` on `tracker`'s runtime and waits until it has begun (then
/// [`Started::Running`]) or ended ([`Started::Finished`] with its result). A panicking
/// operation is reported as `Finished` with `on_panic`'s value.
pub async fn start<T, F>(
    tracker: &tokio_util::task::TaskTracker,
    op: F,
    on_panic: impl FnOnce(String) -> T,
) -> Started<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let mut handle = tracker.spawn(BEGUN.scope(RefCell::new(Some(tx)), op));
    tokio::select! {
        biased;
        begun = rx => {
            if let Ok(begun) = begun {
                return Started::Running(begun, handle);
            }
            // The sender was dropped: the operation ended without journaling.
            match handle.await {
                Ok(v) => Started::Finished(v),
                Err(e) => Started::Finished(on_panic(e.to_string())),
            }
        }
        done = &mut handle => match done {
            Ok(v) => Started::Finished(v),
            Err(e) => Started::Finished(on_panic(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_before_begin_is_finished_and_begun_is_running() {
        let tracker = tokio_util::task::TaskTracker::new();
        let r = start(&tracker, async { Err::<(), _>("refused") }, |_| Ok(())).await;
        assert!(matches!(r, Started::Finished(Err("refused"))));

        let (go_tx, go_rx) = oneshot::channel::<()>();
        let id = crate::types::VolumeId::new();
        let r = start(
            &tracker,
            async move {
                signal_begun(Begun {
                    volume_id: id,
                    snapshot_id: None,
                });
                let _ = go_rx.await;
                7
            },
            |_| 0,
        )
        .await;
        let Started::Running(begun, handle) = r else {
            panic!("an operation that signalled begun and waits must be running");
        };
        assert_eq!(begun.volume_id, id);
        assert!(!handle.is_finished());
        let _ = go_tx.send(());
        assert_eq!(handle.await.ok(), Some(7));
    }

    #[tokio::test]
    async fn signal_outside_a_started_task_is_harmless() {
        let b = || Begun {
            volume_id: crate::types::VolumeId::new(),
            snapshot_id: None,
        };
        signal_begun(b());
        signal_begun(b());
    }
}
