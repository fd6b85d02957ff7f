//! Locks across kiln nodes: PostgreSQL session advisory locks.
//!
//! A held [`LockSet`] is one pooled PostgreSQL session holding `pg_advisory_lock(k)` for each
//! of its keys. The server releases a session's advisory locks when the session ends, so
//! the contract recovery relies on holds across nodes: a node that dies (SIGKILL, power,
//! its network to PostgreSQL cut long enough for the connection to drop) frees its locks,
//! and a free lock means no living owner. In front of the sessions sits the same in-process
//! table as [`super::FlockLocks`]: tasks of one node queue there, so a waiting task holds
//! no connection and only one per key waits in PostgreSQL.
//!
//! Releasing runs `pg_advisory_unlock_all()` and returns the session to the pool. A session
//! that might still hold a lock — its unlock failed, or a lock call was abandoned half-way
//! (a cancelled future) — is never pooled again: it is closed, which releases everything.
//!
//! A free lock alone does not prove its owner dead here: restarting PostgreSQL ends the
//! sessions of every live node. So each process also keeps a heartbeat row in `kiln_nodes`
//! (written every `node_timeout / 15`, timed by the server's clock), and recovery leaves an
//! operation alone while its incarnation's heartbeat is younger than `node_timeout`
//! ([`LockManager::owner_alive`]). The other half of that lease: a process that could not
//! write its heartbeat for `node_timeout / 3` exits (with `fence`), so by the time another
//! node may take its operations over, it has stopped touching the backends — a node cut off
//! from PostgreSQL never runs on beside the node that recovers its work.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::OwnedMutexGuard;

use std::time::Duration;

use super::{LocalLocks, LockKey, LockManager, LockSet, sorted};
use crate::error::{Error, ErrorKind, Result, chain};
use crate::store::PgOptions;

/// Advisory locks in PostgreSQL (see the module docs). Cheap to share behind an `Arc`.
pub struct PgLocks {
    pool: Pool,
    /// One connection for reading heartbeats, apart from the lock sessions.
    reads: Pool,
    local: LocalLocks,
    /// Keys whose set was dropped and whose unlock is on its way (one round trip).
    releasing: Releasing,
    /// Ends the heartbeat task when the lock manager goes.
    heartbeat: tokio_util::sync::CancellationToken,
}

/// How nodes tell a live owner from a dead one (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// An incarnation whose last heartbeat is older than this is dead; every node of one
    /// store should use the same value.
    pub node_timeout: Duration,
    /// Exit the process when its heartbeat could not be written for `node_timeout / 3`.
    pub fence: bool,
}

impl Default for Liveness {
    /// 15 s, fencing on.
    fn default() -> Self {
        Liveness {
            node_timeout: Duration::from_secs(15),
            fence: true,
        }
    }
}

impl Liveness {
    /// The lease this process declares in its heartbeat row: other nodes count it alive
    /// while its heartbeat is younger than this.
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.node_timeout.as_millis()).unwrap_or(i64::MAX)
    }

    fn fence_after(&self) -> Duration {
        self.node_timeout / 3
    }

    fn period(&self) -> Duration {
        (self.node_timeout / 15).max(Duration::from_millis(100))
    }
}

/// Exit status of a fenced process (EX_TEMPFAIL: a supervisor restarts it).
pub const FENCED_EXIT: i32 = 75;

/// How long [`PgLocks::try_lock`] waits for a key this node is releasing: the unlock is one
/// round trip, so only a server that stopped answering reaches it.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

type Releasing = Arc<std::sync::Mutex<HashSet<LockKey>>>;

fn releasing(set: &Releasing) -> std::sync::MutexGuard<'_, HashSet<LockKey>> {
    // The set holds plain keys: one a panic left behind is still valid.
    set.lock().unwrap_or_else(|p| p.into_inner())
}

/// The 64-bit advisory-lock id of a key: FNV-1a of its name (`volume-<uuid>`), so every
/// kiln version on every node derives the same id. Non-negative, which leaves the negative
/// ids to kiln's own bookkeeping locks (schema migration).
pub fn advisory_id(key: LockKey) -> i64 {
    stable_id(&key.to_string())
}

/// FNV-1a of `name`, as a non-negative `i64`: the same on every node and kiln version
/// (std's hasher promises neither).
pub(crate) fn stable_id(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h & (i64::MAX as u64)) as i64
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("locks: PostgreSQL {what}: {e}"),
    )
}

/// A pooled session that goes back to the pool only through [`Session::release`]; dropped
/// any other way, it is closed (and PostgreSQL frees whatever it held).
struct Session(Option<Object>);

impl Session {
    fn client(&self) -> Result<&Object> {
        self.0
            .as_ref()
            .ok_or_else(|| Error::store("lock session already released"))
    }

    /// Unlocks everything and returns the session to the pool; if the unlock fails the
    /// session is closed instead.
    async fn release(mut self) {
        if let Some(obj) = self.0.take() {
            if obj
                .execute("SELECT pg_advisory_unlock_all()", &[])
                .await
                .is_ok()
            {
                drop(obj);
            } else {
                drop(Object::take(obj));
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            // Detached from the pool: dropping the client closes the connection.
            drop(Object::take(obj));
        }
    }
}

/// What a held [`LockSet`] keeps: the session and the in-process guards, released in that
/// order on drop.
struct PgGuard {
    session: Option<Session>,
    local: Vec<OwnedMutexGuard<()>>,
    keys: Vec<LockKey>,
    releasing: Releasing,
    runtime: tokio::runtime::Handle,
}

impl PgGuard {
    /// The release of what this guard holds, once (`None` after the first call): the
    /// unlock round trip, then the node's own waiters are let in (they would otherwise
    /// just wait in PostgreSQL).
    fn releaser(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let session = self.session.take()?;
        let local = std::mem::take(&mut self.local);
        let keys = std::mem::take(&mut self.keys);
        let set = self.releasing.clone();
        releasing(&set).extend(keys.iter().copied());
        Some(async move {
            session.release().await;
            // The in-process guards go while the set is held (see `try_lock`).
            let mut r = releasing(&set);
            drop(local);
            for k in &keys {
                r.remove(k);
            }
        })
    }
}

impl super::Held for PgGuard {
    fn lost(&self) -> Option<String> {
        let closed = self
            .session
            .as_ref()
            .and_then(|s| s.0.as_ref())
            .is_none_or(|c| c.is_closed());
        closed.then(|| {
            "its PostgreSQL session ended (a server restart or a lost connection)".to_string()
        })
    }

    fn release(mut self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        match self.releaser() {
            Some(f) => Box::pin(f),
            None => Box::pin(std::future::ready(())),
        }
    }
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        let Some(release) = self.releaser() else {
            return;
        };
        // Unlocking is a round trip: done on the runtime. If the runtime is gone the
        // future is dropped, which closes the session: released all the same.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn(release)),
            Err(_) => drop(self.runtime.spawn(release)),
        }
    }
}

impl PgLocks {
    /// Lock sessions to the server at `options.url`, at most `sessions` at once (each held
    /// lock set uses one; more wait for one to be released). Writes this incarnation's
    /// first heartbeat before it returns — no operation of it can be journaled before other
    /// nodes can see it alive — then keeps it fresh on the current runtime.
    pub async fn connect(options: &PgOptions, sessions: usize, liveness: Liveness) -> Result<Self> {
        let pool = |size: usize| {
            let manager = Manager::from_config(
                options.async_config()?,
                tokio_postgres::NoTls,
                ManagerConfig {
                    // No round trip to check a session each time it is handed out: one the
                    // server closed while idle (a restart) fails its first call, before it
                    // holds anything, and the operation fails cleanly as unavailable.
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(options.connect_timeout))
                .recycle_timeout(Some(options.connect_timeout))
                .build()
                .map_err(|e| unavailable("lock pool", chain(&e)))
        };
        let (reads, pool) = (pool(1)?, pool(sessions.max(1))?);
        let mut beat = Heartbeat::new(options.async_config()?, liveness);
        beat.write().await?;
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(beat.run(token.clone()));
        Ok(PgLocks {
            pool,
            reads,
            local: LocalLocks::default(),
            releasing: Releasing::default(),
            heartbeat: token,
        })
    }

    async fn session(&self) -> Result<Session> {
        let obj = self
            .pool
            .get()
            .await
            .map_err(|e| unavailable("unreachable", chain(&e)))?;
        Ok(Session(Some(obj)))
    }
}

impl Drop for PgLocks {
    fn drop(&mut self) {
        self.heartbeat.cancel();
    }
}

/// This incarnation's heartbeat, on a connection of its own (a pool busy with lock waits
/// must never delay it into a false fence).
struct Heartbeat {
    config: tokio_postgres::Config,
    liveness: Liveness,
    client: Option<tokio_postgres::Client>,
    /// When the last heartbeat was written, on the clock that keeps counting while the
    /// machine (or VM) is suspended (`CLOCK_BOOTTIME`): a stall must show as silence.
    last_ok: Duration,
    /// Whether this incarnation's row exists (the first write creates it).
    registered: bool,
}

/// `CLOCK_BOOTTIME`: monotonic, and unlike `Instant` it advances while the system sleeps.
fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// This process's fence handles ([`crate::node::publish_fence`]) as the JSON array the
/// heartbeat row keeps.
fn fences_json() -> String {
    serde_json::Value::from(crate::node::fences()).to_string()
}

/// A heartbeat the server refused: this incarnation's lease had already run out there, so
/// other nodes may be taking its work over.
struct LeaseExpired;

impl Heartbeat {
    fn new(config: tokio_postgres::Config, liveness: Liveness) -> Self {
        Heartbeat {
            config,
            liveness,
            client: None,
            last_ok: boottime(),
            registered: false,
        }
    }

    /// Writes the heartbeat once (reconnecting if needed), bounded by one period.
    async fn write(&mut self) -> Result<()> {
        let limit = self.liveness.period().max(Duration::from_secs(1));
        match tokio::time::timeout(limit, self.try_write()).await {
            Ok(Ok(Ok(()))) => {
                self.last_ok = boottime();
                Ok(())
            }
            Ok(Ok(Err(LeaseExpired))) => {
                self.fence("PostgreSQL says this process's heartbeat had expired");
                Ok(())
            }
            Ok(Err(e)) => {
                self.client = None;
                Err(unavailable("heartbeat", chain(&e)))
            }
            Err(_) => {
                self.client = None;
                Err(unavailable(
                    "heartbeat",
                    format!("no answer within {limit:?}"),
                ))
            }
        }
    }

    async fn try_write(
        &mut self,
    ) -> std::result::Result<std::result::Result<(), LeaseExpired>, tokio_postgres::Error> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            self.client = Some(client);
        }
        let Some(client) = &self.client else {
            return Ok(Ok(()));
        };
        if !self.registered || !self.liveness.fence {
            client
                .execute(
                    "INSERT INTO kiln_nodes (incarnation, node, pid, lease_ms, fences) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (incarnation) DO UPDATE SET heartbeat_at = now(), fences = $5",
                    &[
                        &crate::node::incarnation(),
                        &crate::node::name(),
                        &i64::from(std::process::id()),
                        &self.liveness.lease_ms(),
                        &fences_json(),
                    ],
                )
                .await?;
            if !self.registered {
                // Rows of incarnations dead for a day and owning no journal entry go.
                client
                    .execute(
                        "DELETE FROM kiln_nodes WHERE heartbeat_at < now() - interval '1 day'
                         AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.owner = kiln_nodes.incarnation)",
                        &[],
                    )
                    .await?;
            }
            self.registered = true;
            return Ok(Ok(()));
        }
        // The lease is renewed only while the server still counts it alive, by the server's
        // clock: a process whose own clock stood still (a paused VM) cannot renew a lease
        // the other nodes have seen expire.
        let renewed = client
            .execute(
                "UPDATE kiln_nodes SET heartbeat_at = now(), fences = $3
                 WHERE incarnation = $1 AND heartbeat_at > now() - make_interval(secs => $2)",
                &[
                    &crate::node::incarnation(),
                    &self.liveness.node_timeout.as_secs_f64(),
                    &fences_json(),
                ],
            )
            .await?;
        Ok(if renewed == 1 {
            Ok(())
        } else {
            Err(LeaseExpired)
        })
    }

    async fn run(mut self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.liveness.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                // A new fence handle: into the row now, not at the next beat.
                () = crate::node::FENCE_PUBLISHED.notified() => {}
            }
            // The lease is checked before it is renewed: a process that was stopped or
            // starved for longer than the fence (SIGSTOP, a stalled VM) may already count
            // as dead to the other nodes, so a heartbeat written now would come too late.
            self.fence_if_silent();
            match self.write().await {
                Ok(()) if warned => {
                    tracing::warn!("heartbeat to PostgreSQL written again");
                    warned = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot write this node's heartbeat");
                        warned = true;
                    }
                    self.fence_if_silent();
                }
            }
        }
    }

    /// Fences (with `fence`) once no heartbeat has been written for the fence time.
    fn fence_if_silent(&self) {
        let silent = boottime().saturating_sub(self.last_ok);
        if silent >= self.liveness.fence_after() {
            self.fence(&format!(
                "no heartbeat reached PostgreSQL for {:.1} s (fence after {:?})",
                silent.as_secs_f64(),
                self.liveness.fence_after()
            ));
        }
    }

    /// Ends the process at once, if fencing is on: `_exit`, so that no other thread runs
    /// on and no exit handler (of librbd, say) can hang it. The line goes to stderr
    /// directly — no logging layer may be able to flush it after `_exit`.
    fn fence(&self, why: &str) {
        if !self.liveness.fence {
            tracing::warn!(reason = why, "lease lost (fencing is off in this process)");
            return;
        }
        eprintln!(
            "kiln: error: {why}: exiting (status {FENCED_EXIT}), so that the nodes that take over this process's operations never run beside it (incarnation {})",
            crate::node::incarnation()
        );
        // SAFETY: _exit ends the process without running any Rust or C cleanup.
        unsafe { libc::_exit(FENCED_EXIT) };
    }
}

/// How often a lock waiting for another incarnation's running operation looks again.
const OWNER_POLL: Duration = Duration::from_millis(200);

impl PgLocks {
    /// `column` (an SQL expression) of `owner`'s heartbeat row, if it has one. On a
    /// connection of its own: the lock sessions may all be held by running operations, and
    /// recovery must not wait for them to end.
    async fn node_row(
        &self,
        owner: &str,
        what: &str,
        column: &str,
    ) -> Result<Option<tokio_postgres::Row>> {
        let client = self
            .reads
            .get()
            .await
            .map_err(|e| unavailable("unreachable", chain(&e)))?;
        client
            .query_opt(
                &format!("SELECT {column} FROM kiln_nodes WHERE incarnation = $1"),
                &[&owner],
            )
            .await
            .map_err(|e| unavailable(&format!("read {what}"), chain(&e)))
    }

    /// Another live incarnation with a journaled operation on one of `keys`' volumes, if
    /// any. Normally there is none while the locks are held: its owner holds them. One
    /// shows up only when the owner's session ended under it while the owner lives on.
    async fn running_elsewhere(
        &self,
        session: &Session,
        keys: &[LockKey],
    ) -> Result<Option<String>> {
        let volumes: Vec<String> = keys
            .iter()
            .filter_map(|k| match k {
                LockKey::Volume(v) => Some(v.to_string()),
                LockKey::Instance(_) => None,
            })
            .collect();
        if volumes.is_empty() {
            return Ok(None);
        }
        let rows = session
            .client()?
            .query(
                "SELECT DISTINCT o.owner FROM operations o JOIN kiln_nodes n ON n.incarnation = o.owner
                 WHERE o.volume_id = ANY($1) AND o.owner <> $2
                 AND n.heartbeat_at > now() - n.lease_ms * interval '1 millisecond'",
                &[&volumes, &crate::node::incarnation()],
            )
            .await
            .map_err(|e| unavailable("read the journal", chain(&e)))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .find(|owner| !crate::node::gone_from_this_host(owner)))
    }
}

#[async_trait]
impl LockManager for PgLocks {
    async fn owner_alive(&self, owner: Option<&str>) -> Result<bool> {
        // This process's own operations are protected by its in-process table; one that
        // is journaled but not running here any more is this process's to recover.
        let Some(owner) = owner.filter(|o| *o != crate::node::incarnation()) else {
            return Ok(false);
        };
        // An earlier incarnation of this node whose process is gone is dead now, whatever
        // its last heartbeat says: a node restarted after a crash takes its own work back
        // at once instead of after the node timeout.
        if crate::node::gone_from_this_host(owner) {
            return Ok(false);
        }
        let row = self
            .node_row(
                owner,
                "heartbeats",
                "heartbeat_at > now() - lease_ms * interval '1 millisecond'",
            )
            .await?;
        // An incarnation without a row wrote its journal entry before heartbeats existed,
        // or was removed long after it died.
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn fences_of(&self, owner: &str) -> Result<Vec<String>> {
        let row = self.node_row(owner, "fence handles", "fences").await?;
        Ok(row
            .and_then(|r| serde_json::from_str::<Vec<String>>(&r.get::<_, String>(0)).ok())
            .unwrap_or_default())
    }

    async fn lock(&self, keys: &[LockKey]) -> Result<LockSet> {
        let keys = sorted(keys);
        let mut local = Vec::with_capacity(keys.len());
        for key in &keys {
            local.push(self.local.get(*key)?.lock_owned().await);
        }
        let session = loop {
            // Any error (or this future being dropped) from here on drops the session
            // unreleased: it is closed, and PostgreSQL frees what it took.
            let session = self.session().await?;
            for key in &keys {
                session
                    .client()?
                    .execute("SELECT pg_advisory_lock($1)", &[&advisory_id(*key)])
                    .await
                    .map_err(|e| unavailable(&format!("lock {key}"), chain(&e)))?;
            }
            // A free lock can still have a running owner: one whose session ended while it
            // ran (a server restart). Its journal entry and its heartbeat say so; wait
            // until it is done (or dead) instead of running beside it.
            match self.running_elsewhere(&session, &keys).await? {
                None => break session,
                Some(owner) => {
                    tracing::info!(owner = %owner, "waiting for an operation that lost its lock session to finish");
                    session.release().await;
                    tokio::time::sleep(OWNER_POLL).await;
                }
            }
        };
        let held = keys.len();
        Ok(LockSet::one(
            Box::new(PgGuard {
                session: Some(session),
                local,
                keys,
                releasing: self.releasing.clone(),
                runtime: tokio::runtime::Handle::current(),
            }),
            held,
        ))
    }

    async fn try_lock(&self, keys: &[LockKey]) -> Result<Option<LockSet>> {
        let keys = sorted(keys);
        let mut local = Vec::with_capacity(keys.len());
        for key in &keys {
            let slot = self.local.get(*key)?;
            // Looked at under the releasing set's mutex, under which a release lets its
            // guards go: a guard held here is either being released by this node (its key
            // is in the set) or held, never already free.
            let attempt = {
                let r = releasing(&self.releasing);
                slot.clone().try_lock_owned().map_err(|_| r.contains(key))
            };
            let g = match attempt {
                Ok(g) => g,
                // Held by a set this node just dropped: free as soon as its unlock lands,
                // and a dropped set is free by the contract.
                Err(true) => match tokio::time::timeout(RELEASE_WAIT, slot.lock_owned()).await {
                    Ok(g) => g,
                    Err(_) => return Ok(None),
                },
                Err(false) => return Ok(None),
            };
            local.push(g);
        }
        let session = self.session().await?;
        for key in &keys {
            let got: bool = session
                .client()?
                .query_one("SELECT pg_try_advisory_lock($1)", &[&advisory_id(*key)])
                .await
                .map_err(|e| unavailable(&format!("lock {key}"), chain(&e)))?
                .get(0);
            if !got {
                // All or none: give back what this attempt took.
                session.release().await;
                return Ok(None);
            }
        }
        let held = keys.len();
        Ok(Some(LockSet::one(
            Box::new(PgGuard {
                session: Some(session),
                local,
                keys,
                releasing: self.releasing.clone(),
                runtime: tokio::runtime::Handle::current(),
            }),
            held,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{InstanceId, VolumeId};
    use kiln_testpg::PgServer;
    use std::time::Instant;

    /// A migrated database of the test process's server (locks need its heartbeat table).
    fn database() -> PgOptions {
        let options = PgOptions::new(PgServer::shared().create_database());
        crate::store::PostgresStore::migrate(&options).unwrap();
        options
    }

    const TEST_LIVENESS: Liveness = Liveness {
        node_timeout: Duration::from_secs(15),
        fence: false,
    };

    /// A plain client of `url`, for a test to look at or change what the nodes see.
    async fn sql_client(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Two lock managers on one database: two nodes.
    async fn two_nodes() -> (PgLocks, PgLocks) {
        let o = database();
        (
            PgLocks::connect(&o, 8, TEST_LIVENESS).await.unwrap(),
            PgLocks::connect(&o, 8, TEST_LIVENESS).await.unwrap(),
        )
    }

    /// Polls `try_lock` until it succeeds: a release is one round trip behind the drop.
    async fn eventually_free(m: &PgLocks, keys: &[LockKey]) -> LockSet {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = m.try_lock(keys).await.unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "lock never became free");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn advisory_ids_are_stable_and_non_negative() {
        let id: VolumeId = "00000000-0000-4000-8000-000000000001".parse().unwrap();
        // Fixed: every node and every kiln version must derive the same id.
        assert_eq!(
            advisory_id(LockKey::Volume(id)),
            advisory_id(LockKey::Volume(id))
        );
        assert_eq!(advisory_id(LockKey::Volume(id)), 4_213_091_182_738_069_465);
        assert!(advisory_id(LockKey::Instance(InstanceId::new())) >= 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_lock_is_visible_to_another_node_and_freed_when_released() {
        // Two managers are two nodes: separate sessions, no shared in-process table.
        let (a, b) = two_nodes().await;
        let id = LockKey::Volume(VolumeId::new());
        let g = a.lock(&[id]).await.unwrap();
        assert_eq!(g.len(), 1);
        assert!(b.try_lock(&[id]).await.unwrap().is_none());
        assert!(a.try_lock(&[id]).await.unwrap().is_none());
        drop(g);
        drop(eventually_free(&b, &[id]).await);
    }

    /// Found by a flaky CI run: a set dropped on one node was still held in PostgreSQL
    /// when another node probed it right after (the unlock was still in flight). An
    /// operation now ends with `release`, which returns only once the unlock has landed.
    #[tokio::test]
    async fn a_released_set_is_free_for_another_node_when_release_returns() {
        let (a, b) = two_nodes().await;
        for _ in 0..50 {
            let id = LockKey::Volume(VolumeId::new());
            let g = a.lock(&[id]).await.unwrap();
            assert!(b.try_lock(&[id]).await.unwrap().is_none());
            g.release().await;
            let again = b.try_lock(&[id]).await.unwrap();
            assert!(again.is_some(), "released, yet another node found it held");
            if let Some(s) = again {
                s.release().await;
            }
            assert!(a.try_lock(&[id]).await.unwrap().is_some());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn try_lock_takes_all_keys_or_none() {
        let (a, b) = two_nodes().await;
        let (k1, k2) = (
            LockKey::Volume(VolumeId::new()),
            LockKey::Instance(InstanceId::new()),
        );
        let held = a.lock(&[k2]).await.unwrap();
        assert!(b.try_lock(&[k1, k2]).await.unwrap().is_none());
        // k1 was not left held by the failed attempt.
        drop(eventually_free(&a, &[k1]).await);
        drop(held);
        let both = eventually_free(&b, &[k2, k1]).await;
        assert_eq!(both.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_node_gets_the_lock_when_the_holder_releases_it() {
        let (a, b) = two_nodes().await;
        let id = LockKey::Volume(VolumeId::new());
        let g = a.lock(&[id]).await.unwrap();
        let waiter = tokio::spawn(async move { b.lock(&[id]).await.map(|s| s.len()) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "took a lock another node holds");
        drop(g);
        let n = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter never got the released lock")
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_session_dies_frees_its_locks() {
        let (a, b) = two_nodes().await;
        let id = LockKey::Volume(VolumeId::new());
        let g = a.lock(&[id]).await.unwrap();
        assert!(b.try_lock(&[id]).await.unwrap().is_none());
        // Another session ends a's lock session, as the server does when a node's
        // connection drops.
        let client = sql_client(&PgServer::shared().url("postgres")).await;
        let ended = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND objid = ($1::bigint & 4294967295)::oid AND classid = ($1::bigint >> 32)::oid AND granted",
                &[&advisory_id(id)],
            )
            .await
            .unwrap();
        assert_eq!(ended.get::<_, i64>(0), 1);
        drop(eventually_free(&b, &[id]).await);
        // The holder learns it: a long read checking `intact` stops instead of reading on
        // unprotected.
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.intact().is_ok() {
            assert!(
                Instant::now() < deadline,
                "the lost session was never noticed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = g.intact().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("PostgreSQL session ended"), "{e}");
        assert!(b.lock(&[id]).await.unwrap().intact().is_ok());
        drop(g);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owners_are_alive_while_their_heartbeat_is_fresh_and_this_process_never_is() {
        let o = database();
        let locks = PgLocks::connect(&o, 4, TEST_LIVENESS).await.unwrap();
        let client = sql_client(&o.url).await;
        client
            .batch_execute(
                "INSERT INTO kiln_nodes (incarnation, node, pid, heartbeat_at) VALUES
                 ('b:1:fresh', 'b', 1, now()), ('c:1:stale', 'c', 1, now() - interval '1 hour')",
            )
            .await
            .unwrap();
        assert!(locks.owner_alive(Some("b:1:fresh")).await.unwrap());
        assert!(!locks.owner_alive(Some("c:1:stale")).await.unwrap());
        assert!(!locks.owner_alive(Some("d:1:unknown")).await.unwrap());
        assert!(!locks.owner_alive(None).await.unwrap());
        // This process's own heartbeat is fresh, yet its journaled operations that no task
        // runs any more are its own to recover.
        let own: bool = client
            .query_one(
                "SELECT heartbeat_at > now() - interval '15 seconds' FROM kiln_nodes WHERE incarnation = $1",
                &[&crate::node::incarnation()],
            )
            .await
            .unwrap()
            .get(0);
        assert!(own);
        assert!(
            !locks
                .owner_alive(Some(crate::node::incarnation()))
                .await
                .unwrap()
        );
    }

    /// A lock whose previous holder's session ended while that holder lives on (a server
    /// restart) is not free for the taking: `lock` waits while a journaled operation on the
    /// volume belongs to another live incarnation, and goes ahead once it is finished — or
    /// at once when that incarnation's heartbeat is stale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_waits_for_a_live_owner_that_lost_its_session() {
        let o = database();
        let locks = Arc::new(PgLocks::connect(&o, 4, TEST_LIVENESS).await.unwrap());
        let client = sql_client(&o.url).await;
        let v = VolumeId::new();
        client
            .execute(
                "INSERT INTO kiln_nodes (incarnation, node, pid) VALUES ('b:1:running', 'b', 1)",
                &[],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO operations (kind, volume_id, payload, started_at, pid, owner)
                 VALUES ('create_snapshot', $1, 'null', '2026-01-01T00:00:00Z', 1, 'b:1:running')",
                &[&v.to_string()],
            )
            .await
            .unwrap();
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(&[LockKey::Volume(v)]).await.map(|s| s.len()) })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !waiter.is_finished(),
            "took the lock beside a live owner's operation"
        );
        // The owner finishes: its journal entry goes.
        client
            .execute("DELETE FROM operations WHERE owner = 'b:1:running'", &[])
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the lock never followed the finished operation")
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        // A dead owner (stale heartbeat) holds nothing back.
        let w = VolumeId::new();
        client
            .batch_execute(&format!(
                "UPDATE kiln_nodes SET heartbeat_at = now() - interval '1 hour' WHERE incarnation = 'b:1:running';
                 INSERT INTO operations (kind, volume_id, payload, started_at, pid, owner)
                 VALUES ('create_snapshot', '{w}', 'null', '2026-01-01T00:00:00Z', 1, 'b:1:running')"
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), locks.lock(&[LockKey::Volume(w)]))
            .await
            .expect("a dead owner's entry held the lock back")
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    /// The store's last fence: journaling an operation on a volume where another live
    /// incarnation has one journaled (its lock session ended under it, and this caller's
    /// lock did not wait because that entry had not committed yet) is refused as busy,
    /// with nothing written; once that owner's heartbeat is stale it goes ahead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaling_beside_a_live_owners_operation_on_the_volume_is_refused() {
        use crate::store::{Batch, NewOp, PostgresStore, Store};
        let o = database();
        let store = {
            let o = o.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || PostgresStore::connect(&o))
                    .await
                    .unwrap()
                    .unwrap(),
            )
        };
        let client = sql_client(&o.url).await;
        let v = VolumeId::new();
        client
            .batch_execute(&format!(
                "INSERT INTO kiln_nodes (incarnation, node, pid) VALUES ('b:h:1:running', 'b', 1);
                 INSERT INTO operations (kind, volume_id, payload, started_at, pid, owner)
                 VALUES ('create_snapshot', '{v}', 'null', '2026-01-01T00:00:00Z', 1, 'b:h:1:running')"
            ))
            .await
            .unwrap();
        let journal = |store: Arc<PostgresStore>| async move {
            tokio::task::spawn_blocking(move || {
                store.commit(Batch::with_op(vec![], NewOp::of("flatten", v, None)))
            })
            .await
            .unwrap()
        };
        let count = async || -> i64 {
            client
                .query_one("SELECT count(*) FROM operations", &[])
                .await
                .unwrap()
                .get(0)
        };
        let e = journal(store.clone()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
        assert!(e.to_string().contains("b:h:1:running"), "{e}");
        assert_eq!(count().await, 1, "the refused batch wrote its entry");
        // Another volume is not held back.
        let other = tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                store.commit(Batch::with_op(
                    vec![],
                    NewOp::of("flatten", VolumeId::new(), None),
                ))
            }
        })
        .await
        .unwrap();
        assert!(matches!(other, Ok(Ok(Some(_)))), "{other:?}");
        client
            .execute(
                "UPDATE kiln_nodes SET heartbeat_at = now() - interval '1 hour' WHERE incarnation = 'b:h:1:running'",
                &[],
            )
            .await
            .unwrap();
        assert!(matches!(journal(store).await, Ok(Ok(Some(_)))));
        assert_eq!(count().await, 3);
    }
}
