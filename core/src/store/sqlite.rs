//! The embedded SQLite store: one file in the data directory, WAL mode, schema migrations.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use super::Conflict;
use super::sql::{Database, Row, Sql, SqlStore, Val, WriteFn};
use crate::error::{Error, Result};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: volumes, snapshots, attachments, lineage, operation journal.
    "CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT,
        size_bytes INTEGER NOT NULL,
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
        id TEXT PRIMARY KEY,
        volume_id TEXT NOT NULL REFERENCES volumes(id),
        name TEXT,
        size_bytes INTEGER NOT NULL,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        provider_location TEXT,
        forced INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX snapshots_volume ON snapshots(volume_id);
    CREATE TABLE attachments (
        volume_id TEXT PRIMARY KEY REFERENCES volumes(id),
        instance_id TEXT NOT NULL,
        device TEXT NOT NULL,
        attached_at TEXT NOT NULL
    );
    CREATE TABLE operations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        volume_id TEXT NOT NULL,
        snapshot_id TEXT,
        started_at TEXT NOT NULL,
        pid INTEGER NOT NULL
    );",
    // 2: an open journal (multi-volume parents with child steps, per-operation payload)
    //    and the status history admins' resets write.
    "ALTER TABLE operations ADD COLUMN parent_id INTEGER REFERENCES operations(id);
    ALTER TABLE operations ADD COLUMN payload TEXT NOT NULL DEFAULT 'null';
    CREATE INDEX operations_parent ON operations(parent_id);
    CREATE TABLE status_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        object TEXT NOT NULL,
        object_id TEXT NOT NULL,
        from_status TEXT NOT NULL,
        to_status TEXT NOT NULL,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX status_history_object ON status_history(object_id);",
    // 3: instances, images (instance snapshots), Nova's attachment fields, and each
    //    snapshot's image and consistency.
    "CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        name TEXT,
        agent TEXT,
        freeze_mountpoints TEXT NOT NULL,
        root_device TEXT NOT NULL,
        properties TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        min_disk INTEGER NOT NULL,
        consistency TEXT NOT NULL,
        properties TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    ALTER TABLE attachments ADD COLUMN boot_index INTEGER;
    ALTER TABLE attachments ADD COLUMN disk_bus TEXT;
    ALTER TABLE attachments ADD COLUMN device_type TEXT;
    ALTER TABLE attachments ADD COLUMN delete_on_termination INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX attachments_instance ON attachments(instance_id);
    ALTER TABLE snapshots ADD COLUMN image_id TEXT;
    ALTER TABLE snapshots ADD COLUMN consistency TEXT;
    CREATE INDEX snapshots_image ON snapshots(image_id);",
    // 4: the hypervisor's QMP monitor of an instance, and of each attachment its block node.
    "ALTER TABLE instances ADD COLUMN qmp TEXT;
    ALTER TABLE attachments ADD COLUMN qmp TEXT;
    ALTER TABLE attachments ADD COLUMN node TEXT;",
    // 5: backups (kept when their volume and snapshot are gone).
    "CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        volume_id TEXT NOT NULL,
        snapshot_id TEXT NOT NULL,
        parent_id TEXT REFERENCES backups(id),
        name TEXT,
        target TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        size_bytes INTEGER NOT NULL,
        stored_bytes INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX backups_volume ON backups(volume_id);
    CREATE INDEX backups_parent ON backups(parent_id);",
    // 6: API attributes (project, user, description, properties, bootable), one row per
    // object; an object without one belongs to the default project.
    "CREATE TABLE object_attrs (
        object_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        project_id TEXT NOT NULL,
        user_id TEXT,
        description TEXT,
        properties TEXT NOT NULL DEFAULT '{}',
        bootable INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX object_attrs_project ON object_attrs(project_id, kind);",
    // 7: the API's own bookkeeping per object (attachment lifecycles).
    "ALTER TABLE object_attrs ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';",
    // 8: which incarnation (node, process) journaled an operation.
    "ALTER TABLE operations ADD COLUMN owner TEXT;",
];

/// WAL pages after which a commit checkpoints (see `SqliteStore::open`): a command writes
/// a handful of pages, so this folds the WAL back every ~10 commands.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 64;

/// The embedded SQLite database under [`SqliteStore`]. Safe to share between threads and
/// between processes (SQLite's file locking plus `BEGIN IMMEDIATE` serializes writers).
pub struct Sqlite {
    conn: Mutex<Connection>,
    /// The connection's current `synchronous` setting: true = FULL, false = NORMAL
    /// (changed only while `conn` is locked).
    full_sync: std::sync::atomic::AtomicBool,
}

/// The store on SQLite: one file in the data directory (see [`SqlStore`]).
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| Error::store(format!("open {}: {e}", path.display())))?;
        // Several kiln processes may share the file: wait for a writer instead of failing.
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // WAL lets readers proceed during a write; FULL sync because the journal is what
        // crash recovery trusts.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Every kiln command is a short-lived process: checkpointing the WAL into the
        // database on every close cost two fsyncs per command, and deleting the WAL made the
        // next command re-create it (a header and a directory fsync more). The WAL is durable
        // on its own; SQLite's automatic checkpoint (every 1000 pages) folds it back in.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        // ... but every new process rebuilds its WAL index by reading and checksumming the
        // whole WAL (up to 4 MiB at the default 1000 pages): keep the WAL short, so that
        // costs ~0.1 ms, and pay the checkpoint's fsyncs once every few commands instead.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Self::with(conn)
    }

    /// An in-memory store, for unit tests of the service.
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Self::with(conn)
    }

    fn with(conn: Connection) -> Result<Self> {
        let db = Sqlite {
            conn: Mutex::new(conn),
            full_sync: std::sync::atomic::AtomicBool::new(true),
        };
        db.migrate()?;
        Ok(SqlStore(db))
    }
}

impl Sqlite {
    /// The schema version this kiln's SQLite migrations reach.
    pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

    fn migrate(&self) -> Result<()> {
        let mut conn = self.lock()?;
        // The common case, an up-to-date schema, needs no write lock: every command opens
        // the store, and taking the write lock would serialize them all for nothing.
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if usize::try_from(current).ok() == Some(MIGRATIONS.len()) {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let applied = usize::try_from(applied).unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Err(Error::store(format!(
                "the database has schema version {applied}, newer than this kiln ({}); upgrade kiln",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::store("store connection poisoned by an earlier panic"))
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// A statement runner on one SQLite connection (or transaction).
struct Conn<'a>(&'a Connection);

impl Sql for Conn<'_> {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }

    fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let mut st = self.0.prepare_cached(sql)?;
        let width = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut vals = Vec::with_capacity(width);
            for i in 0..width {
                vals.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(n) => Val::Int(n),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(_) | ValueRef::Blob(_) => {
                        return Err(Error::store(format!(
                            "column {i} of {sql:?} holds a type kiln never writes"
                        )));
                    }
                });
            }
            out.push(Row(vals));
        }
        Ok(out)
    }
}

impl Database for Sqlite {
    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        let conn = self.lock()?;
        f(&mut Conn(&conn))
    }

    fn write<T>(
        &self,
        durable: bool,
        f: &mut WriteFn<'_, T>,
    ) -> Result<std::result::Result<T, Conflict>> {
        let mut conn = self.lock()?;
        // FULL for what recovery trusts; NORMAL (durable at the next sync) for a batch that
        // only finishes journaled work: see `Batch::needs_sync`.
        if self.full_sync.load(std::sync::atomic::Ordering::Relaxed) != durable {
            conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
            self.full_sync
                .store(durable, std::sync::atomic::Ordering::Relaxed);
        }
        // IMMEDIATE takes the write lock up front, so the guards we read cannot change
        // under us before our writes land, even with other kiln processes on the same file.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let outcome = f(&mut Conn(&tx))?;
        if outcome.is_ok() {
            tx.commit()?;
        }
        // Otherwise dropping the transaction rolls back every step applied so far.
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::checks;
    use crate::store::{Batch, Step, Store};
    use crate::types::{Attachment, InstanceId, VolumeStatus};

    #[test]
    fn attributes_live_and_die_with_their_object_and_quotas_count_the_default_project() {
        checks::attributes_and_quotas(&SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn compare_and_set_applies_all_or_nothing() {
        checks::compare_and_set_is_all_or_nothing(&SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn guards_over_sets_of_rows_hold_under_contention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        SqliteStore::open(&path).unwrap();
        checks::set_guards_hold_under_contention(move || {
            Box::new(SqliteStore::open(&path).unwrap())
        });
        drop(dir);
    }

    /// A store handle factory on one fresh database file (each call: a new connection).
    fn shared_file() -> (tempfile::TempDir, impl Fn() -> Box<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        SqliteStore::open(&path).unwrap();
        (dir, move || Box::new(SqliteStore::open(&path).unwrap()))
    }

    #[test]
    fn deleting_an_instance_racing_attaches_never_leaves_a_volume_attached_to_it() {
        let (_dir, open) = shared_file();
        checks::instance_delete_holds_against_attaches(open);
    }

    #[test]
    fn deleting_a_backup_racing_incremental_children_never_leaves_a_child_without_it() {
        let (_dir, open) = shared_file();
        checks::backup_delete_holds_against_children(open);
    }

    #[test]
    fn racing_attribute_compare_and_sets_from_one_value_let_exactly_one_land() {
        let (_dir, open) = shared_file();
        checks::attrs_compare_and_set_has_one_winner(open);
    }

    #[test]
    fn round_trips_rows_and_migrates_a_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let v = checks::volume(VolumeStatus::InUse);
        {
            let store = SqliteStore::open(&path).unwrap();
            let mut v = v.clone();
            v.attachments
                .push(Attachment::new(InstanceId::new(), "/dev/vdb"));
            store
                .commit(Batch::new(vec![Step::InsertVolume(v)]))
                .unwrap()
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let got = store.volume(v.id).unwrap().unwrap();
        assert_eq!(got.status, VolumeStatus::InUse);
        assert_eq!(got.attachments.len(), 1);
        assert_eq!(got.attachments[0].device, "/dev/vdb");
        assert_eq!(
            got.created_at.timestamp_micros(),
            v.created_at.timestamp_micros()
        );
    }
}
