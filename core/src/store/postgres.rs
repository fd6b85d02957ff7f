//! The PostgreSQL store: the state several kiln nodes share (`[store] url` in kiln.toml).
//!
//! Every [`SqlStore`] call runs here on a pooled connection (r2d2 over the `postgres`
//! client, the blocking face of `tokio-postgres`: the [`Store`](super::Store) trait is
//! synchronous and always called on the blocking pool). A write is one transaction in which
//! every guard first locks what it reads — the row (`SELECT ... FOR UPDATE`), or for a set
//! of rows a transaction-level advisory lock named after it (a project's quota, an
//! instance's attachments) — so the guards a batch reads cannot change before its writes
//! land, whatever other nodes commit meanwhile: the guarantee SQLite's `BEGIN IMMEDIATE`
//! gives, without serializing unrelated writes. Two batches that lock the same rows in
//! opposite orders deadlock; PostgreSQL aborts one before anything of it is committed, and
//! it is simply run again.
//!
//! The schema is SQLite's, column for column (ids and timestamps as text, flags 0/1) plus a
//! `seq` column where SQLite has its implicit `rowid`, and it is versioned in
//! `kiln_schema`. Unlike SQLite's file, it is never migrated implicitly: several nodes of
//! different versions may share it, so `kiln store migrate` upgrades it, and a node refuses
//! to start on a schema older or newer than its own.

use std::collections::HashMap;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use postgres::{IsolationLevel, NoTls, Statement};

use super::Conflict;
use super::sql::{Database, Row, Sql, SqlStore, Val, WriteFn};
use crate::error::{Error, ErrorKind, Result};

/// PostgreSQL schema migrations, applied in order by `kiln store migrate`; `kiln_schema`
/// records how many ran. Never edit a released entry: append a new one. Entry 1 is the
/// schema SQLite reached in its 8 migrations, plus the node heartbeats only a shared store
/// needs.
const MIGRATIONS: &[&str] = &[
    // 1: everything SQLite's migrations 1-8 built, and `kiln_nodes`: each incarnation's
    //    last heartbeat, in the server's clock (see `crate::locks::PgLocks`).
    "CREATE TABLE volumes (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        name TEXT,
        size_bytes BIGINT NOT NULL,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        provider_location TEXT,
        source_snapshot_id TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX volumes_source ON volumes(source_snapshot_id);
    CREATE TABLE snapshots (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        volume_id TEXT NOT NULL REFERENCES volumes(id),
        name TEXT,
        size_bytes BIGINT NOT NULL,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        provider_location TEXT,
        forced BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        image_id TEXT,
        consistency TEXT
    );
    CREATE INDEX snapshots_volume ON snapshots(volume_id);
    CREATE INDEX snapshots_image ON snapshots(image_id);
    CREATE TABLE attachments (
        volume_id TEXT PRIMARY KEY REFERENCES volumes(id),
        instance_id TEXT NOT NULL,
        device TEXT NOT NULL,
        attached_at TEXT NOT NULL,
        boot_index BIGINT,
        disk_bus TEXT,
        device_type TEXT,
        delete_on_termination BIGINT NOT NULL DEFAULT 0,
        qmp TEXT,
        node TEXT
    );
    CREATE INDEX attachments_instance ON attachments(instance_id);
    CREATE TABLE operations (
        id BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        parent_id BIGINT REFERENCES operations(id),
        volume_id TEXT NOT NULL,
        snapshot_id TEXT,
        payload TEXT NOT NULL DEFAULT 'null',
        started_at TEXT NOT NULL,
        pid BIGINT NOT NULL,
        owner TEXT
    );
    CREATE INDEX operations_parent ON operations(parent_id);
    CREATE TABLE status_history (
        seq BIGSERIAL PRIMARY KEY,
        object TEXT NOT NULL,
        object_id TEXT NOT NULL,
        from_status TEXT NOT NULL,
        to_status TEXT NOT NULL,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX status_history_object ON status_history(object_id);
    CREATE TABLE instances (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        name TEXT,
        agent TEXT,
        freeze_mountpoints TEXT NOT NULL,
        root_device TEXT NOT NULL,
        properties TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        qmp TEXT
    );
    CREATE TABLE images (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        min_disk BIGINT NOT NULL,
        consistency TEXT NOT NULL,
        properties TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE backups (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        volume_id TEXT NOT NULL,
        snapshot_id TEXT NOT NULL,
        parent_id TEXT REFERENCES backups(id),
        name TEXT,
        target TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        size_bytes BIGINT NOT NULL,
        stored_bytes BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX backups_volume ON backups(volume_id);
    CREATE INDEX backups_parent ON backups(parent_id);
    CREATE TABLE object_attrs (
        object_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        project_id TEXT NOT NULL,
        user_id TEXT,
        description TEXT,
        properties TEXT NOT NULL DEFAULT '{}',
        bootable BIGINT NOT NULL DEFAULT 0,
        extra TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX object_attrs_project ON object_attrs(project_id, kind);
    CREATE TABLE kiln_nodes (
        incarnation TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        pid BIGINT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );",
    // 2: each incarnation's own lease (its node timeout): it counts as alive while its
    //    heartbeat is younger than this, by the server's clock.
    //    And what other nodes may use to fence it once it is dead (a JSON array of
    //    `crate::node::publish_fence` handles).
    "ALTER TABLE kiln_nodes ADD COLUMN lease_ms BIGINT NOT NULL DEFAULT 15000;
     ALTER TABLE kiln_nodes ADD COLUMN fences TEXT NOT NULL DEFAULT '[]';",
];

/// The transaction-level advisory-lock id of a [`Sql::lock_name`] name: the same stable
/// hash as operations' locks, made negative so that it never meets one of them (theirs are
/// never negative).
fn store_lock_id(name: &str) -> i64 {
    -crate::locks::stable_id(name) - 1
}

/// Advisory-lock key that serializes `kiln store migrate` runs (outside the range
/// [`crate::locks::PgLocks`] hashes object keys into: it is negative).
const MIGRATE_LOCK: i64 = -0x6b69_6c6e; // "kiln"

/// How many times a write is run again after a deadlock (or serialization failure) before
/// the error is reported (each retry waits a little longer, with jitter).
const MAX_RETRIES: u32 = 100;

/// Connection settings of the PostgreSQL store (`[store]` in kiln.toml).
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgresql://user@host:port/db` (libpq-style key=value strings work too).
    pub url: String,
    /// Most connections this process opens for the store (lock sessions are separate).
    pub max_connections: u32,
    /// How long a call waits for a connection (PostgreSQL unreachable: it then fails with
    /// an "unavailable" error instead of hanging).
    pub connect_timeout: Duration,
}

impl PgOptions {
    /// Defaults for `url`: 16 connections, 5 s to connect.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The parsed client configuration, with keepalives and a TCP user timeout so that a
    /// path to the server that died silently (a cut network, an expired NAT entry) is
    /// noticed within about 11 s — before the server, with the keepalives docs/multi-node.md
    /// recommends (about 25 s), frees the locks of the session on it: a node learns it
    /// lost a lock before another node can take it.
    pub(crate) fn async_config(&self) -> Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| Error::config(format!("[store] url: {e}")))?;
        config
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(11))
            .application_name("kiln");
        Ok(config)
    }

    /// [`PgOptions::async_config`] for the blocking client.
    pub(crate) fn client_config(&self) -> Result<postgres::Config> {
        Ok(postgres::Config::from(self.async_config()?))
    }
}

/// The PostgreSQL database under [`PostgresStore`].
pub struct Postgres {
    pool: r2d2::Pool<Manager>,
}

/// The store on PostgreSQL (see [`SqlStore`] and the module docs).
pub type PostgresStore = SqlStore<Postgres>;

/// Opens pooled connections, each with its own prepared-statement cache.
struct Manager(postgres::Config);

struct Conn {
    /// Always `Some` until the connection is dropped (see `Drop for Conn`).
    client: Option<postgres::Client>,
    /// Statements prepared on this connection, by kiln's SQL text.
    prepared: HashMap<String, Statement>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Conn, postgres::Error> {
        Ok(Conn {
            client: Some(self.0.connect(NoTls)?),
            prepared: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        // A pooled connection may have been cut (server restart) while idle: find out
        // before a transaction starts on it, when a retry is still safe.
        match conn.client.as_mut() {
            Some(c) => c.simple_query("").map(|_| ()),
            None => Ok(()),
        }
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.as_ref().is_none_or(|c| c.is_closed())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the blocking client runs a small runtime of its own, which tokio refuses
        // on a thread that drives one (a pool dropped in async code, e.g. at shutdown):
        // close it on a thread of its own then.
        if let Some(client) = self.client.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            std::thread::spawn(move || drop(client));
        }
    }
}

impl Conn {
    fn parts(&mut self) -> Result<(&mut postgres::Client, &mut HashMap<String, Statement>)> {
        match self.client.as_mut() {
            Some(c) => Ok((c, &mut self.prepared)),
            None => Err(Error::store("PostgreSQL connection already closed")),
        }
    }
}

/// How a PostgreSQL error is reported: unreachable server → `Unavailable` (recovery and
/// callers retry later); anything else → a store error. The server's own words are kept.
pub(crate) fn pg_error(context: &str, e: postgres::Error) -> Error {
    describe(context, &e).with_source(e)
}

/// [`pg_error`] without keeping the cause (the caller keeps the typed error).
fn describe(context: &str, e: &postgres::Error) -> Error {
    let unreachable = closed(e)
        || e.code().is_some_and(|c| {
            matches!(
                c,
                &SqlState::ADMIN_SHUTDOWN
                    | &SqlState::CRASH_SHUTDOWN
                    | &SqlState::CANNOT_CONNECT_NOW
                    | &SqlState::TOO_MANY_CONNECTIONS
            )
        });
    let detail = match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => crate::error::chain(e),
    };
    let kind = if unreachable {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Store
    };
    Error::new(kind, format!("store: PostgreSQL {context}: {detail}"))
}

/// The connection is gone (closed by the server, or the network failed).
fn closed(e: &postgres::Error) -> bool {
    e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

fn retryable(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        matches!(
            c,
            &SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED
        )
    })
}

impl SqlStore<Postgres> {
    /// Connects to the store at `options.url`. Fails with a one-line error when the server
    /// is unreachable or its schema is not this kiln's (`kiln store migrate` upgrades it).
    pub fn connect(options: &PgOptions) -> Result<Self> {
        off_runtime(|| Self::connect_here(options))
    }

    fn connect_here(options: &PgOptions) -> Result<Self> {
        let config = options.client_config()?;
        let pool = r2d2::Pool::builder()
            .max_size(options.max_connections.max(1))
            // No idle connections up front: a CLI command needs one, a server grows to
            // what its load needs.
            .min_idle(Some(0))
            // No round trip to test a connection each time it is handed out (it was one of
            // every four statements kiln sent): a connection the server closed is noticed
            // by the client (`has_broken`), and a call that fails on one before anything
            // was committed is run again on the next (up to the pool's size).
            .test_on_check_out(false)
            .connection_timeout(options.connect_timeout)
            .error_handler(Box::new(r2d2::LoggingErrorHandler))
            .build(Manager(config))
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("store: PostgreSQL: {e}")))?;
        let db = Postgres { pool };
        let version = db.schema_version()?;
        if version < MIGRATIONS.len() {
            return Err(Error::config(format!(
                "the PostgreSQL store has schema version {version}, this kiln needs {}: run `kiln store migrate`",
                MIGRATIONS.len()
            )));
        }
        if version > MIGRATIONS.len() {
            return Err(Error::config(format!(
                "the PostgreSQL store has schema version {version}, newer than this kiln ({}); upgrade kiln",
                MIGRATIONS.len()
            )));
        }
        Ok(SqlStore(db))
    }

    /// Creates or upgrades the schema at `options.url` (concurrent runs wait for each
    /// other). Returns the versions before and after.
    pub fn migrate(options: &PgOptions) -> Result<(usize, usize)> {
        off_runtime(|| Self::migrate_here(options))
    }

    fn migrate_here(options: &PgOptions) -> Result<(usize, usize)> {
        let mut client = options
            .client_config()?
            .connect(NoTls)
            .map_err(|e| pg_error("connect", e))?;
        let mut tx = client.transaction().map_err(|e| pg_error("migrate", e))?;
        let run = |tx: &mut postgres::Transaction<'_>| -> std::result::Result<(usize, usize), postgres::Error> {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS kiln_schema (version BIGINT NOT NULL);
                 INSERT INTO kiln_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM kiln_schema);",
            )?;
            let before: i64 = tx.query_one("SELECT version FROM kiln_schema", &[])?.get(0);
            let before = usize::try_from(before).unwrap_or(0);
            for sql in MIGRATIONS.iter().skip(before) {
                tx.batch_execute(sql)?;
            }
            let after = before.max(MIGRATIONS.len());
            tx.execute("UPDATE kiln_schema SET version = $1", &[&(after as i64)])?;
            Ok((before, after))
        };
        let versions = run(&mut tx).map_err(|e| pg_error("migrate", e))?;
        if versions.0 > MIGRATIONS.len() {
            return Err(Error::config(format!(
                "the PostgreSQL store has schema version {}, newer than this kiln ({}); upgrade kiln",
                versions.0,
                MIGRATIONS.len()
            )));
        }
        tx.commit().map_err(|e| pg_error("migrate", e))?;
        Ok(versions)
    }
}

impl Postgres {
    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>> {
        self.pool.get().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("store: PostgreSQL unreachable: {e}"),
            )
        })
    }

    fn schema_version(&self) -> Result<usize> {
        let mut conn = self.conn()?;
        let (client, _) = conn.parts()?;
        let exists: bool = client
            .query_one("SELECT to_regclass('kiln_schema') IS NOT NULL", &[])
            .map_err(|e| pg_error("schema", e))?
            .get(0);
        if !exists {
            return Ok(0);
        }
        let v: i64 = client
            .query_one("SELECT version FROM kiln_schema", &[])
            .map_err(|e| pg_error("schema", e))?
            .get(0);
        Ok(usize::try_from(v).unwrap_or(0))
    }
}

/// Runs `f` where the blocking client may run: on a thread of its own when the caller is
/// on an async runtime (start-up code is), else right here. Only for one-off calls; the
/// store's own calls always come from the blocking pool.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// kiln's SQL text in PostgreSQL's spelling: `?N` placeholders become `$N`, and `rowid`
/// (SQLite's implicit insertion order) the explicit `seq` column.
fn spelled(sql: &str) -> String {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find(['?', 'r']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let at_word_start = !out.chars().last().is_some_and(word);
        if let Some(after) = tail.strip_prefix('?') {
            out.push('$');
            rest = after;
        } else if let Some(after) = tail
            .strip_prefix("rowid")
            .filter(|after| at_word_start && !after.chars().next().is_some_and(word))
        {
            out.push_str("seq");
            rest = after;
        } else {
            out.push('r');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                _ => Err(format!("integer parameter for a {ty} column").into()),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::INT4 | Type::INT2 | Type::TEXT | Type::VARCHAR | Type::BPCHAR
        )
    }

    to_sql_checked!();
}

fn row_of(r: &postgres::Row) -> std::result::Result<Row, postgres::Error> {
    fn get<'a, T: FromSql<'a>>(
        r: &'a postgres::Row,
        i: usize,
    ) -> std::result::Result<Option<T>, postgres::Error> {
        r.try_get::<_, Option<T>>(i)
    }
    let mut vals = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => get::<i64>(r, i)?.map(Val::Int),
            Type::INT4 => get::<i32>(r, i)?.map(|n| Val::Int(n.into())),
            Type::INT2 => get::<i16>(r, i)?.map(|n| Val::Int(n.into())),
            Type::BOOL => get::<bool>(r, i)?.map(|b| Val::Int(b.into())),
            _ => get::<String>(r, i)?.map(Val::Text),
        };
        vals.push(v.unwrap_or(Val::Null));
    }
    Ok(Row(vals))
}

/// Statements on a pooled connection, inside a transaction or not.
struct Runner<'a, C: postgres::GenericClient> {
    client: &'a mut C,
    prepared: &'a mut HashMap<String, Statement>,
    /// The first PostgreSQL error, kept typed so the transaction can tell a serialization
    /// failure (retry) from anything else.
    failed: &'a mut Option<postgres::Error>,
}

impl<C: postgres::GenericClient> Runner<'_, C> {
    fn statement(&mut self, sql: &str) -> std::result::Result<Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&spelled(sql))?;
        self.prepared.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn params(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
    }

    fn fail(&mut self, e: postgres::Error) -> Error {
        let err = describe("query", &e);
        self.failed.get_or_insert(e);
        err
    }
}

impl<C: postgres::GenericClient> Sql for Runner<'_, C> {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let st = self.statement(sql).map_err(|e| self.fail(e))?;
        self.client
            .execute(&st, &Self::params(params))
            .map_err(|e| self.fail(e))
    }

    fn lock_row(&mut self, table: &str, id: &str) -> Result<()> {
        self.rows(
            &format!("SELECT 1 FROM {table} WHERE id = ?1 FOR UPDATE"),
            &[Val::Text(id.to_string())],
        )
        .map(drop)
    }

    fn lock_name(&mut self, name: &str) -> Result<()> {
        self.rows(
            "SELECT 1 FROM pg_advisory_xact_lock(?1)",
            &[Val::Int(store_lock_id(name))],
        )
        .map(drop)
    }

    fn live_owners_elsewhere(&mut self, volume: &str) -> Result<Vec<String>> {
        // Two journal entries on one volume serialize here, so the second one sees the
        // first (READ COMMITTED reads what committed before each statement).
        self.lock_name(&format!("journal-of-{volume}"))?;
        self.rows(
            "SELECT DISTINCT o.owner FROM operations o JOIN kiln_nodes n ON n.incarnation = o.owner
             WHERE o.volume_id = ?1 AND o.owner <> ?2
             AND n.heartbeat_at > now() - n.lease_ms * interval '1 millisecond'",
            &[
                Val::Text(volume.to_string()),
                Val::Text(crate::node::incarnation().to_string()),
            ],
        )?
        .iter()
        .map(|r| r.string(0))
        .collect()
    }

    fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let st = self.statement(sql).map_err(|e| self.fail(e))?;
        let rows = self
            .client
            .query(&st, &Self::params(params))
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(row_of)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.fail(e))
    }
}

impl Database for Postgres {
    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        let mut stale = 0;
        loop {
            let mut conn = self.conn()?;
            let (client, prepared) = conn.parts()?;
            let mut failed = None;
            let r = f(&mut Runner {
                client,
                prepared,
                failed: &mut failed,
            });
            match failed {
                // A pooled connection the server closed while it was idle (a restart):
                // reads change nothing, so once more on a new connection.
                Some(pg) if closed(&pg) && stale < self.pool.max_size() => stale += 1,
                _ => return r,
            }
        }
    }

    fn write<T>(
        &self,
        durable: bool,
        f: &mut WriteFn<'_, T>,
    ) -> Result<std::result::Result<T, Conflict>> {
        let mut attempt = 0;
        // Connections found closed before anything was committed: after a server restart
        // every idle one is, and each is only found out when used.
        let mut stale = 0;
        loop {
            let mut conn = self.conn()?;
            let (client, prepared) = conn.parts()?;
            // READ COMMITTED, with the rows (and named sets) each guard reads locked before
            // it reads them (`Sql::lock_row`, `Sql::lock_name`): SERIALIZABLE gave the same
            // guarantee, but its predicate locks are page- or table-wide on kiln's small
            // tables, so concurrent batches of unrelated volumes failed and ran again —
            // half of them under a 32-client load (docs/benchmarks.md).
            let begun = client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .and_then(|mut tx| {
                    if !durable {
                        // Only finishes journaled work: durable at the next synchronous
                        // commit (see `Batch::needs_sync`).
                        tx.batch_execute("SET LOCAL synchronous_commit = off")?;
                    }
                    Ok(tx)
                });
            let mut tx = match begun {
                Ok(tx) => tx,
                // A pooled connection the server closed while idle: nothing was sent.
                Err(e) if closed(&e) && stale < self.pool.max_size() => {
                    stale += 1;
                    continue;
                }
                Err(e) => return Err(pg_error("begin", e)),
            };
            let mut failed = None;
            let outcome = f(&mut Runner {
                client: &mut tx,
                prepared,
                failed: &mut failed,
            });
            let committed = match outcome {
                Ok(Ok(v)) => tx.commit().map(|()| Ok(Ok(v))),
                // A failed guard or an error: dropping the transaction rolls it back.
                Ok(Err(c)) => Ok(Ok(Err(c))),
                Err(e) => Ok(Err(e)),
            };
            let retry = match committed {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(e)) => match failed {
                    Some(pg) if retryable(&pg) => pg,
                    // The connection broke before COMMIT was sent: nothing was committed.
                    Some(pg) if closed(&pg) && stale < self.pool.max_size() => {
                        stale += 1;
                        drop(pg);
                        continue;
                    }
                    _ => return Err(e),
                },
                // COMMIT itself failed: retry only a serialization failure, which
                // PostgreSQL reports before anything is written.
                Err(pg) if retryable(&pg) => pg,
                Err(pg) => return Err(pg_error("commit", pg)),
            };
            attempt += 1;
            tracing::debug!(attempt, error = %crate::error::chain(&retry), "store: deadlock or serialization failure; running the transaction again");
            if attempt > MAX_RETRIES {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "store: PostgreSQL: gave up after {MAX_RETRIES} serialization failures: {retry}"
                    ),
                ));
            }
            // Back off a little, with jitter, so the transactions that collided do not
            // collide again in lock step.
            let jitter = u64::from(std::process::id() ^ attempt.wrapping_mul(2_654_435_761)) % 1000;
            std::thread::sleep(Duration::from_micros(
                200 * u64::from(attempt.min(20)) + jitter,
            ));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::sql::checks;
    use crate::store::{Batch, Step, Store};
    use crate::types::VolumeStatus;
    use chrono::DurationRound;
    use kiln_testpg::PgServer;

    /// A migrated store on a fresh database of the test process's PostgreSQL.
    pub(crate) fn fresh_store() -> PostgresStore {
        let options = PgOptions::new(PgServer::shared().create_database());
        PostgresStore::migrate(&options).unwrap();
        PostgresStore::connect(&options).unwrap()
    }

    #[test]
    fn attributes_live_and_die_with_their_object_and_quotas_count_the_default_project() {
        checks::attributes_and_quotas(&fresh_store());
    }

    #[test]
    fn compare_and_set_applies_all_or_nothing() {
        checks::compare_and_set_is_all_or_nothing(&fresh_store());
    }

    #[test]
    fn guards_over_sets_of_rows_hold_under_contention() {
        let options = PgOptions::new(PgServer::shared().create_database());
        PostgresStore::migrate(&options).unwrap();
        checks::set_guards_hold_under_contention(move || {
            Box::new(PostgresStore::connect(&options).unwrap())
        });
    }

    /// A store handle factory on one fresh, migrated database (each call: a new pool).
    fn shared_database() -> impl Fn() -> Box<dyn Store> {
        let options = PgOptions::new(PgServer::shared().create_database());
        PostgresStore::migrate(&options).unwrap();
        move || Box::new(PostgresStore::connect(&options).unwrap())
    }

    #[test]
    fn deleting_an_instance_racing_attaches_never_leaves_a_volume_attached_to_it() {
        checks::instance_delete_holds_against_attaches(shared_database());
    }

    #[test]
    fn deleting_a_backup_racing_incremental_children_never_leaves_a_child_without_it() {
        checks::backup_delete_holds_against_children(shared_database());
    }

    #[test]
    fn racing_attribute_compare_and_sets_from_one_value_let_exactly_one_land() {
        checks::attrs_compare_and_set_has_one_winner(shared_database());
    }

    #[test]
    fn a_store_refuses_an_unmigrated_schema_and_migrate_is_idempotent() {
        let options = PgOptions::new(PgServer::shared().create_database());
        let e = PostgresStore::connect(&options).err().unwrap();
        assert!(e.to_string().contains("kiln store migrate"), "{e}");
        assert_eq!(
            PostgresStore::migrate(&options).unwrap(),
            (0, MIGRATIONS.len())
        );
        assert_eq!(
            PostgresStore::migrate(&options).unwrap(),
            (MIGRATIONS.len(), MIGRATIONS.len())
        );
        let store = PostgresStore::connect(&options).unwrap();
        // Timestamps are kept to the microsecond, as in SQLite.
        let mut v = checks::volume(VolumeStatus::Available);
        v.created_at = v
            .created_at
            .duration_trunc(chrono::TimeDelta::microseconds(1))
            .unwrap();
        v.updated_at = v.created_at;
        store
            .commit(Batch::new(vec![Step::InsertVolume(v.clone())]))
            .unwrap()
            .unwrap();
        assert_eq!(store.volume(v.id).unwrap().unwrap(), v);
    }

    #[test]
    fn an_unreachable_server_is_an_unavailable_error_within_the_timeout() {
        // A loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut options = PgOptions::new(format!("postgresql://kiln@127.0.0.1:{port}/x"));
        options.connect_timeout = Duration::from_secs(1);
        let t = std::time::Instant::now();
        let e = PostgresStore::connect(&options).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn sqlite_spelling_becomes_postgres_spelling() {
        assert_eq!(
            spelled("SELECT id FROM t WHERE a = ?1 AND b = ?12 ORDER BY rowid"),
            "SELECT id FROM t WHERE a = $1 AND b = $12 ORDER BY seq"
        );
        // Only the whole word.
        assert_eq!(
            spelled("SELECT rowids, xrowid, r FROM t"),
            "SELECT rowids, xrowid, r FROM t"
        );
        assert_eq!(
            spelled("ORDER BY created_at, rowid"),
            "ORDER BY created_at, seq"
        );
    }
}
