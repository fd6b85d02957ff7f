//! Locks that serialize operations on one object across tasks, processes and (later) nodes.
//!
//! [`LockManager`] is the contract: `lock` waits, `try_lock` probes. Its meaning is what
//! crash recovery relies on: **a lock that is free has no living owner**, so a journaled
//! operation whose locks can be taken was left by a process that died. The host-local
//! implementation is [`FlockLocks`] (the kernel drops a `flock` when its holder dies);
//! [`PgLocks`] satisfies the same contract across nodes with PostgreSQL session advisory
//! locks (the server drops them when a node's connection dies).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::types::{InstanceId, VolumeId};

mod postgres;

pub(crate) use postgres::stable_id;

pub use postgres::{FENCED_EXIT, Liveness, PgLocks, advisory_id};

/// What can be locked. Ordered, so every caller takes a set of locks in the same order and
/// two callers locking overlapping sets can never deadlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockKey {
    /// A volume (and its snapshots).
    Volume(VolumeId),
    /// An instance (its attachments and instance-level operations).
    Instance(InstanceId),
}

impl std::fmt::Display for LockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockKey::Volume(id) => write!(f, "volume-{id}"),
            LockKey::Instance(id) => write!(f, "instance-{id}"),
        }
    }
}

impl From<VolumeId> for LockKey {
    fn from(id: VolumeId) -> Self {
        LockKey::Volume(id)
    }
}

/// Held locks; dropping it releases them, and [`LockSet::release`] releases them and
/// returns once they are free for every node. Opaque so each manager can hold what it needs.
pub struct LockSet {
    _guards: Vec<Box<dyn Send + Sync>>,
    /// The guard of a manager whose locks can end under a live holder.
    watched: Option<Box<dyn Held>>,
    held: usize,
}

/// A guard whose locks can end without being released while their holder lives on (a
/// PostgreSQL session the server ended).
pub trait Held: Send + Sync {
    /// Why the locks are no longer held, if they are not.
    fn lost(&self) -> Option<String>;
    /// Releases the locks and resolves once they are free everywhere (dropping the guard
    /// releases them too, but in the background: another node could still find them
    /// held for a round trip after the holder moved on).
    fn release(self: Box<Self>) -> futures::future::BoxFuture<'static, ()>;
}

impl LockSet {
    /// A set holding `guards`, one lock each (each released when dropped).
    pub fn new(guards: Vec<Box<dyn Send + Sync>>) -> Self {
        let held = guards.len();
        LockSet {
            _guards: guards,
            watched: None,
            held,
        }
    }

    /// A set whose one `guard` holds `held` locks and can tell when they ended under it.
    pub fn one(guard: Box<dyn Held>, held: usize) -> Self {
        LockSet {
            _guards: vec![],
            watched: Some(guard),
            held,
        }
    }

    /// `Ok` while every lock of the set is still held; an `unavailable` error saying why
    /// once one ended under its holder. Long reads check it as they go: what they read
    /// after that was no longer protected from a change by another node.
    pub fn intact(&self) -> Result<()> {
        match self.watched.as_ref().and_then(|g| g.lost()) {
            None => Ok(()),
            Some(why) => Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                format!(
                    "the lock was lost while held: {why}; stopped so that nothing changed by another node is read"
                ),
            )),
        }
    }

    /// Releases every lock of the set and returns once each is free for every node (a
    /// PostgreSQL unlock has landed), so whatever the holder reports next can be followed
    /// by another node's `try_lock` without a spurious "busy". Dropping the set releases
    /// the same locks, only without waiting for it.
    pub async fn release(mut self) {
        if let Some(g) = self.watched.take() {
            g.release().await;
        }
    }

    /// Number of locks held.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Whether no lock is held.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }
}

/// The lock contract the service and recovery rely on (see the module docs).
#[async_trait]
pub trait LockManager: Send + Sync {
    /// Waits until every key in `keys` is held by the caller. Keys are taken in sorted
    /// order (deduplicated).
    async fn lock(&self, keys: &[LockKey]) -> Result<LockSet>;
    /// Takes every key in `keys` without waiting, or none of them (`None`: someone holds
    /// at least one — a live owner).
    async fn try_lock(&self, keys: &[LockKey]) -> Result<Option<LockSet>>;
    /// Whether the incarnation that journaled an operation ([`crate::node::incarnation`])
    /// is still alive even though its locks are free. Host-local locks never outlive their
    /// holder, so the default is `false`; PostgreSQL sessions can (a server restart drops
    /// every session of every live node), so [`PgLocks`] answers from heartbeats.
    async fn owner_alive(&self, owner: Option<&str>) -> Result<bool> {
        let _ = owner;
        Ok(false)
    }
    /// The fence handles a (dead) incarnation published ([`crate::node::publish_fence`]),
    /// for recovery to hand to the drivers before it takes that incarnation's operations
    /// over. Host-local locks: none (a process of this host that died holds nothing).
    async fn fences_of(&self, owner: &str) -> Result<Vec<String>> {
        let _ = owner;
        Ok(vec![])
    }
}

/// The in-process layer every lock manager puts in front of its shared one: an async mutex
/// per key, so tasks of one process queue here (without parking runtime threads or holding
/// a database connection while they wait) and only one per key asks the shared layer.
#[derive(Default)]
struct LocalLocks(Mutex<HashMap<LockKey, Arc<tokio::sync::Mutex<()>>>>);

impl LocalLocks {
    fn get(&self, key: LockKey) -> Result<Arc<tokio::sync::Mutex<()>>> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| Error::store("lock table poisoned by an earlier panic"))?;
        // Drop entries nobody holds or waits for, so a long-running process does not grow.
        map.retain(|_, m| Arc::strong_count(m) > 1);
        Ok(map.entry(key).or_default().clone())
    }
}

/// `keys` sorted and deduplicated: the one order every caller takes locks in.
fn sorted(keys: &[LockKey]) -> Vec<LockKey> {
    let mut keys = keys.to_vec();
    keys.sort();
    keys.dedup();
    keys
}

/// Host-local locks: an in-process async mutex per key (waiting tasks do not park runtime
/// threads) plus an exclusive `flock` on `<dir>/<key>.lock` (other kiln processes on the
/// same data directory serialize too). Cheap to share behind an `Arc`.
pub struct FlockLocks {
    dir: PathBuf,
    local: LocalLocks,
}

struct FlockGuard {
    // Field order matters: release the flock before letting other local tasks in.
    _file: File,
    _local: OwnedMutexGuard<()>,
}

impl FlockLocks {
    /// Lock files live in `dir` (created if missing).
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create lock directory {}", dir.display()), e))?;
        Ok(FlockLocks {
            dir,
            local: LocalLocks::default(),
        })
    }

    fn open(&self, key: LockKey) -> Result<File> {
        let path = self.dir.join(format!("{key}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))
    }
}

#[async_trait]
impl LockManager for FlockLocks {
    async fn lock(&self, keys: &[LockKey]) -> Result<LockSet> {
        let mut guards: Vec<Box<dyn Send + Sync>> = Vec::with_capacity(keys.len());
        for key in sorted(keys) {
            let local = self.local.get(key)?.lock_owned().await;
            let file = self.open(key)?;
            // flock blocks the thread: wait on the blocking pool, not on a runtime thread.
            let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                .await
                .map_err(|e| Error::store(format!("lock task failed: {e}")))?
                .map_err(|e| Error::io(format!("lock {key}"), e))?;
            guards.push(Box::new(FlockGuard {
                _file: file,
                _local: local,
            }));
        }
        Ok(LockSet::new(guards))
    }

    async fn try_lock(&self, keys: &[LockKey]) -> Result<Option<LockSet>> {
        let mut guards: Vec<Box<dyn Send + Sync>> = Vec::with_capacity(keys.len());
        for key in sorted(keys) {
            // Any failure drops the guards taken so far: all or none.
            let Ok(local) = self.local.get(key)?.try_lock_owned() else {
                return Ok(None);
            };
            let file = self.open(key)?;
            match file.try_lock() {
                Ok(()) => guards.push(Box::new(FlockGuard {
                    _file: file,
                    _local: local,
                })),
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("lock {key}"), e));
                }
            }
        }
        Ok(Some(LockSet::new(guards)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_is_visible_to_another_lock_table() {
        let dir = tempfile::tempdir().unwrap();
        let a = FlockLocks::new(dir.path().to_path_buf()).unwrap();
        // A second table on the same directory stands in for a second process: flocks on
        // separate open file descriptions conflict exactly as across processes.
        let b = FlockLocks::new(dir.path().to_path_buf()).unwrap();
        let id = LockKey::Volume(VolumeId::new());
        let g = a.lock(&[id]).await.unwrap();
        assert!(b.try_lock(&[id]).await.unwrap().is_none());
        assert!(a.try_lock(&[id]).await.unwrap().is_none());
        drop(g);
        assert!(b.try_lock(&[id]).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn try_lock_takes_all_keys_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let a = FlockLocks::new(dir.path().to_path_buf()).unwrap();
        let b = FlockLocks::new(dir.path().to_path_buf()).unwrap();
        let (k1, k2) = (
            LockKey::Volume(VolumeId::new()),
            LockKey::Instance(InstanceId::new()),
        );
        let held = a.lock(&[k2]).await.unwrap();
        assert!(b.try_lock(&[k1, k2]).await.unwrap().is_none());
        // k1 was not left held by the failed attempt.
        assert!(a.try_lock(&[k1]).await.unwrap().is_some());
        drop(held);
        let both = b.try_lock(&[k2, k1]).await.unwrap().unwrap();
        assert_eq!(both.len(), 2);
    }
}
