//! The embedded SQLite store: one file in the data directory, WAL mode, schema migrations.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{Batch, Conflict, HistoryEntry, NewOp, OpId, Operation, Step, Store};
use crate::attrs::{DEFAULT_PROJECT, ObjectAttrs, ObjectKind, Usage};
use crate::error::{Error, Result};
use crate::instance::{Image, ImageStatus, Instance};
use crate::types::{
    Attachment, Backup, BackupId, ImageId, InstanceId, Snapshot, SnapshotId, Volume, VolumeId,
};

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
];

/// WAL pages after which a commit checkpoints (see `SqliteStore::open`): a command writes
/// a handful of pages, so this folds the WAL back every ~10 commands.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 64;

/// SQLite implementation of [`Store`]. Safe to share between threads and between processes
/// (SQLite's file locking plus `BEGIN IMMEDIATE` serializes writers).
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The connection's current `synchronous` setting: true = FULL, false = NORMAL
    /// (changed only while `conn` is locked).
    full_sync: std::sync::atomic::AtomicBool,
}

impl SqliteStore {
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
        let store = SqliteStore {
            conn: Mutex::new(conn),
            full_sync: std::sync::atomic::AtomicBool::new(true),
        };
        store.migrate()?;
        Ok(store)
    }

    /// An in-memory store, for unit tests of the service.
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            full_sync: std::sync::atomic::AtomicBool::new(true),
        };
        store.migrate()?;
        Ok(store)
    }

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

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
}

fn parse_col<T: std::str::FromStr>(s: &str) -> rusqlite::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse::<T>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn size_col(v: i64) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Integer, Box::new(e))
    })
}

fn size_param(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("size", "too large for the store"))
}

const VOLUME_COLS: &str = "id, name, size_bytes, backend, status, status_reason, provider_location, source_snapshot_id, created_at, updated_at";
const SNAPSHOT_COLS: &str = "id, volume_id, name, size_bytes, backend, status, status_reason, provider_location, forced, created_at, updated_at, image_id, consistency";
const INSTANCE_COLS: &str =
    "id, name, agent, freeze_mountpoints, root_device, properties, created_at, updated_at, qmp";
const IMAGE_COLS: &str =
    "id, name, status, instance_id, min_disk, consistency, properties, created_at, updated_at";

fn volume_row(r: &Row<'_>) -> rusqlite::Result<Volume> {
    let source: Option<String> = r.get(7)?;
    Ok(Volume {
        id: parse_col(&r.get::<_, String>(0)?)?,
        name: r.get(1)?,
        size_bytes: size_col(r.get(2)?)?,
        backend: r.get(3)?,
        status: parse_col(&r.get::<_, String>(4)?)?,
        status_reason: r.get(5)?,
        provider_location: r.get(6)?,
        source_snapshot_id: source.as_deref().map(parse_col).transpose()?,
        attachments: Vec::new(),
        created_at: parse_ts(&r.get::<_, String>(8)?)?,
        updated_at: parse_ts(&r.get::<_, String>(9)?)?,
    })
}

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: parse_col(&r.get::<_, String>(0)?)?,
        volume_id: parse_col(&r.get::<_, String>(1)?)?,
        name: r.get(2)?,
        size_bytes: size_col(r.get(3)?)?,
        backend: r.get(4)?,
        status: parse_col(&r.get::<_, String>(5)?)?,
        status_reason: r.get(6)?,
        provider_location: r.get(7)?,
        forced: r.get::<_, i64>(8)? != 0,
        created_at: parse_ts(&r.get::<_, String>(9)?)?,
        updated_at: parse_ts(&r.get::<_, String>(10)?)?,
        image_id: r
            .get::<_, Option<String>>(11)?
            .as_deref()
            .map(parse_col)
            .transpose()?,
        consistency: r
            .get::<_, Option<String>>(12)?
            .as_deref()
            .map(parse_col)
            .transpose()?,
    })
}

fn json_col<T: serde::de::DeserializeOwned>(i: usize, s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn json_param<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(Error::store)
}

fn instance_row(r: &Row<'_>) -> rusqlite::Result<Instance> {
    Ok(Instance {
        id: parse_col(&r.get::<_, String>(0)?)?,
        name: r.get(1)?,
        agent: r.get(2)?,
        freeze_mountpoints: json_col(3, &r.get::<_, String>(3)?)?,
        root_device: r.get(4)?,
        properties: json_col(5, &r.get::<_, String>(5)?)?,
        created_at: parse_ts(&r.get::<_, String>(6)?)?,
        updated_at: parse_ts(&r.get::<_, String>(7)?)?,
        qmp: r.get(8)?,
    })
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: parse_col(&r.get::<_, String>(0)?)?,
        name: r.get(1)?,
        status: parse_col(&r.get::<_, String>(2)?)?,
        instance_id: parse_col(&r.get::<_, String>(3)?)?,
        min_disk: size_col(r.get(4)?)?,
        consistency: parse_col(&r.get::<_, String>(5)?)?,
        properties: json_col(6, &r.get::<_, String>(6)?)?,
        snapshots: Vec::new(),
        created_at: parse_ts(&r.get::<_, String>(7)?)?,
        updated_at: parse_ts(&r.get::<_, String>(8)?)?,
    })
}

const BACKUP_COLS: &str = "id, volume_id, snapshot_id, parent_id, name, target, status, status_reason, size_bytes, stored_bytes, created_at, updated_at";

fn backup_row(r: &Row<'_>) -> rusqlite::Result<Backup> {
    Ok(Backup {
        id: parse_col(&r.get::<_, String>(0)?)?,
        volume_id: parse_col(&r.get::<_, String>(1)?)?,
        snapshot_id: parse_col(&r.get::<_, String>(2)?)?,
        parent_id: r
            .get::<_, Option<String>>(3)?
            .map(|p| parse_col(&p))
            .transpose()?,
        name: r.get(4)?,
        target: r.get(5)?,
        status: parse_col(&r.get::<_, String>(6)?)?,
        status_reason: r.get(7)?,
        size_bytes: size_col(r.get(8)?)?,
        stored_bytes: size_col(r.get(9)?)?,
        created_at: parse_ts(&r.get::<_, String>(10)?)?,
        updated_at: parse_ts(&r.get::<_, String>(11)?)?,
    })
}

fn load_images(conn: &Connection, sql: &str, arg: Option<String>) -> Result<Vec<Image>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = match arg {
        Some(a) => st
            .query_map([a], image_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => st
            .query_map([], image_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    let mut snaps =
        conn.prepare_cached("SELECT id FROM snapshots WHERE image_id = ?1 ORDER BY rowid")?;
    rows.into_iter()
        .map(|mut i| {
            i.snapshots = snaps
                .query_map([i.id.to_string()], |r| parse_col(&r.get::<_, String>(0)?))?
                .collect::<rusqlite::Result<Vec<SnapshotId>>>()?;
            Ok(i)
        })
        .collect()
}

fn attachments_of(conn: &Connection, id: VolumeId) -> rusqlite::Result<Vec<Attachment>> {
    let mut st = conn.prepare_cached(
        "SELECT instance_id, device, attached_at, boot_index, disk_bus, device_type, delete_on_termination, qmp, node FROM attachments WHERE volume_id = ?1",
    )?;
    st.query_map([id.to_string()], |r| {
        Ok(Attachment {
            instance_id: parse_col::<InstanceId>(&r.get::<_, String>(0)?)?,
            device: r.get(1)?,
            attached_at: parse_ts(&r.get::<_, String>(2)?)?,
            boot_index: r.get(3)?,
            disk_bus: r.get(4)?,
            device_type: r.get(5)?,
            delete_on_termination: r.get::<_, i64>(6)? != 0,
            qmp: r.get(7)?,
            node: r.get(8)?,
        })
    })?
    .collect()
}

fn load_volumes(conn: &Connection, sql: &str, arg: Option<String>) -> Result<Vec<Volume>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = match arg {
        Some(a) => st
            .query_map([a], volume_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => st
            .query_map([], volume_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    rows.into_iter()
        .map(|mut v| {
            v.attachments = attachments_of(conn, v.id)?;
            Ok(v)
        })
        .collect()
}

fn volume_status(conn: &Connection, id: VolumeId) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT status FROM volumes WHERE id = ?1",
        [id.to_string()],
        |r| r.get(0),
    )
    .optional()
}

fn snapshot_status(conn: &Connection, id: SnapshotId) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT status FROM snapshots WHERE id = ?1",
        [id.to_string()],
        |r| r.get(0),
    )
    .optional()
}

/// Whether the object exists and its status is one of `allowed` (any status when
/// `allowed` is empty and `empty_is_any`).
fn status_ok<'a>(
    found: &Option<String>,
    allowed: impl ExactSizeIterator<Item = &'a str>,
    empty_is_any: bool,
) -> bool {
    let any = empty_is_any && allowed.len() == 0;
    let mut allowed = allowed;
    found
        .as_deref()
        .is_some_and(|f| any || allowed.any(|s| s == f))
}

/// Applies one step; `Ok(Some(conflict))` when its guard fails.
fn apply(tx: &Connection, index: usize, step: &Step, now: &str) -> Result<Option<Conflict>> {
    let conflict = |what: &'static str, id: String, found: Option<String>| {
        Ok(Some(Conflict {
            step: index,
            what,
            id,
            found,
        }))
    };
    match step {
        Step::InsertVolume(v) => {
            tx.execute(
                &format!("INSERT INTO volumes ({VOLUME_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    v.id.to_string(),
                    v.name,
                    size_param(v.size_bytes)?,
                    v.backend,
                    v.status.as_str(),
                    v.status_reason,
                    v.provider_location,
                    v.source_snapshot_id.map(|s| s.to_string()),
                    ts(&v.created_at),
                    ts(&v.updated_at),
                ],
            )?;
            for a in &v.attachments {
                insert_attachment(tx, v.id, a)?;
            }
        }
        Step::InsertSnapshot(s) => {
            tx.execute(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    s.id.to_string(),
                    s.volume_id.to_string(),
                    s.name,
                    size_param(s.size_bytes)?,
                    s.backend,
                    s.status.as_str(),
                    s.status_reason,
                    s.provider_location,
                    i64::from(s.forced),
                    ts(&s.created_at),
                    ts(&s.updated_at),
                    s.image_id.map(|i| i.to_string()),
                    s.consistency.map(|c| c.as_str()),
                ],
            )?;
        }
        Step::InsertInstance(i) => {
            tx.execute(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    i.id.to_string(),
                    i.name,
                    i.agent,
                    json_param(&i.freeze_mountpoints)?,
                    i.root_device,
                    json_param(&i.properties)?,
                    ts(&i.created_at),
                    ts(&i.updated_at),
                    i.qmp,
                ],
            )?;
        }
        Step::InstanceHasNoVolumes(id) => {
            let n: i64 = tx.query_row(
                "SELECT count(*) FROM attachments WHERE instance_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )?;
            if n > 0 {
                return conflict("instance", id.to_string(), Some(n.to_string()));
            }
        }
        Step::DeleteInstance(id) => {
            let n = tx.execute("DELETE FROM instances WHERE id = ?1", [id.to_string()])?;
            if n == 0 {
                return conflict("instance", id.to_string(), None);
            }
            delete_attrs(tx, &id.to_string())?;
        }
        Step::InsertImage(i) => {
            tx.execute(
                &format!(
                    "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ),
                params![
                    i.id.to_string(),
                    i.name,
                    i.status.as_str(),
                    i.instance_id.to_string(),
                    size_param(i.min_disk)?,
                    i.consistency.as_str(),
                    json_param(&i.properties)?,
                    ts(&i.created_at),
                    ts(&i.updated_at),
                ],
            )?;
        }
        Step::SetImageStatus { id, from, to } => {
            let found: Option<String> = tx
                .query_row(
                    "SELECT status FROM images WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("image", id.to_string(), found);
            }
            tx.execute(
                "UPDATE images SET status = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), to.as_str(), now],
            )?;
        }
        Step::DeleteImage(id) => {
            tx.execute(
                "UPDATE snapshots SET image_id = NULL WHERE image_id = ?1",
                [id.to_string()],
            )?;
            tx.execute("DELETE FROM images WHERE id = ?1", [id.to_string()])?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::InsertBackup(b) => {
            tx.execute(
                &format!(
                    "INSERT INTO backups ({BACKUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    b.id.to_string(),
                    b.volume_id.to_string(),
                    b.snapshot_id.to_string(),
                    b.parent_id.map(|p| p.to_string()),
                    b.name,
                    b.target,
                    b.status.as_str(),
                    b.status_reason,
                    size_param(b.size_bytes)?,
                    size_param(b.stored_bytes)?,
                    ts(&b.created_at),
                    ts(&b.updated_at),
                ],
            )?;
        }
        Step::SetBackupStatus {
            id,
            from,
            to,
            reason,
        } => {
            let found: Option<String> = tx
                .query_row(
                    "SELECT status FROM backups WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("backup", id.to_string(), found);
            }
            tx.execute(
                "UPDATE backups SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), to.as_str(), reason, now],
            )?;
        }
        Step::SetBackupStored(id, bytes) => {
            tx.execute(
                "UPDATE backups SET stored_bytes = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), size_param(*bytes)?, now],
            )?;
        }
        Step::BackupHasNoChildren(id) => {
            let child: Option<String> = tx
                .query_row(
                    "SELECT id FROM backups WHERE parent_id = ?1 LIMIT 1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(c) = child {
                return conflict("backup", c, Some("builds on it".into()));
            }
        }
        Step::DeleteBackup(id) => {
            let n = tx.execute("DELETE FROM backups WHERE id = ?1", [id.to_string()])?;
            if n == 0 {
                return conflict("backup", id.to_string(), None);
            }
        }
        Step::SetSnapshotImage {
            id,
            image,
            consistency,
        } => {
            tx.execute(
                "UPDATE snapshots SET image_id = ?2, consistency = ?3 WHERE id = ?1",
                params![
                    id.to_string(),
                    image.map(|i| i.to_string()),
                    consistency.map(|c| c.as_str())
                ],
            )?;
        }
        Step::SnapshotFreeOfImage(id) => {
            // Busy while an image that is not being deleted lists it.
            let found: Option<(String, String)> = tx
                .query_row(
                    "SELECT images.id, images.status FROM snapshots JOIN images ON images.id = snapshots.image_id WHERE snapshots.id = ?1",
                    [id.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((image, status)) = found
                && status != ImageStatus::PendingDelete.as_str()
            {
                return conflict("image", image, Some(status));
            }
        }
        Step::VolumeIn { id, any_of } => {
            let found = volume_status(tx, *id)?;
            if !status_ok(&found, any_of.iter().map(|s| s.as_str()), false) {
                return conflict("volume", id.to_string(), found);
            }
        }
        Step::SnapshotIn { id, any_of } => {
            let found = snapshot_status(tx, *id)?;
            if !status_ok(&found, any_of.iter().map(|s| s.as_str()), false) {
                return conflict("snapshot", id.to_string(), found);
            }
        }
        Step::VolumeHasNoSnapshots(id) => {
            let n: i64 = tx.query_row(
                "SELECT count(*) FROM snapshots WHERE volume_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )?;
            if n > 0 {
                return conflict("volume", id.to_string(), Some(n.to_string()));
            }
        }
        Step::SetVolumeStatus {
            id,
            from,
            to,
            reason,
        } => {
            let found = volume_status(tx, *id)?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("volume", id.to_string(), found);
            }
            tx.execute(
                "UPDATE volumes SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), to.as_str(), reason, now],
            )?;
        }
        Step::SetSnapshotStatus {
            id,
            from,
            to,
            reason,
        } => {
            let found = snapshot_status(tx, *id)?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("snapshot", id.to_string(), found);
            }
            tx.execute(
                "UPDATE snapshots SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), to.as_str(), reason, now],
            )?;
        }
        Step::RestoreVolumeStatus {
            id,
            status,
            reason,
            updated_at,
        } => {
            tx.execute(
                "UPDATE volumes SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), status.as_str(), reason, ts(updated_at)],
            )?;
        }
        Step::RestoreSnapshotStatus {
            id,
            status,
            reason,
            updated_at,
        } => {
            tx.execute(
                "UPDATE snapshots SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), status.as_str(), reason, ts(updated_at)],
            )?;
        }
        Step::SetVolumeLocation(id, loc) => {
            tx.execute(
                "UPDATE volumes SET provider_location = ?2 WHERE id = ?1",
                params![id.to_string(), loc],
            )?;
        }
        Step::SetSnapshotLocation(id, loc) => {
            tx.execute(
                "UPDATE snapshots SET provider_location = ?2 WHERE id = ?1",
                params![id.to_string(), loc],
            )?;
        }
        Step::Attach(id, a) => {
            tx.execute(
                "DELETE FROM attachments WHERE volume_id = ?1",
                [id.to_string()],
            )?;
            insert_attachment(tx, *id, a)?;
        }
        Step::Detach(id) => {
            tx.execute(
                "DELETE FROM attachments WHERE volume_id = ?1",
                [id.to_string()],
            )?;
        }
        Step::DeleteVolume(id) => {
            tx.execute(
                "DELETE FROM attachments WHERE volume_id = ?1",
                [id.to_string()],
            )?;
            tx.execute("DELETE FROM volumes WHERE id = ?1", [id.to_string()])?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::DeleteSnapshot(id) => {
            tx.execute("DELETE FROM snapshots WHERE id = ?1", [id.to_string()])?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::SetVolumeName(id, name) => {
            let n = tx.execute(
                "UPDATE volumes SET name = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), name, now],
            )?;
            if n == 0 {
                return conflict("volume", id.to_string(), None);
            }
        }
        Step::SetSnapshotName(id, name) => {
            let n = tx.execute(
                "UPDATE snapshots SET name = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), name, now],
            )?;
            if n == 0 {
                return conflict("snapshot", id.to_string(), None);
            }
        }
        Step::PutAttrs { kind, id, attrs } => {
            let table = match kind {
                ObjectKind::Volume => "volumes",
                ObjectKind::Snapshot => "snapshots",
                ObjectKind::Instance => "instances",
                ObjectKind::Image => "images",
            };
            let exists: Option<i64> = tx
                .query_row(&format!("SELECT 1 FROM {table} WHERE id = ?1"), [id], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_none() {
                return conflict(kind.as_str(), id.clone(), None);
            }
            tx.execute(
                "INSERT OR REPLACE INTO object_attrs (object_id, kind, project_id, user_id, description, properties, bootable, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    kind.as_str(),
                    attrs.project_id,
                    attrs.user_id,
                    attrs.description,
                    json_param(&attrs.properties)?,
                    i64::from(attrs.bootable),
                    json_param(&attrs.extra)?
                ],
            )?;
        }
        Step::AttrsAre { id, expected } => {
            let now = load_attrs(tx, "object_id", id)?.into_values().next();
            if now != *expected {
                return conflict("attributes", id.clone(), Some("changed".into()));
            }
        }
        Step::QuotaAllows {
            project,
            kind,
            limits,
            add_bytes,
        } => {
            let usage = project_usage(tx, project)?;
            let (count, max, name) = match kind {
                ObjectKind::Snapshot => (usage.snapshots, limits.snapshots, "snapshots"),
                _ => (usage.volumes, limits.volumes, "volumes"),
            };
            if max.is_some_and(|m| count >= m) {
                return conflict("quota", name.to_string(), Some(count.to_string()));
            }
            let gib = (usage.bytes.saturating_add(*add_bytes)).div_ceil(1 << 30);
            if limits.gigabytes.is_some_and(|m| gib > m) {
                return conflict(
                    "quota",
                    "gigabytes".to_string(),
                    Some(usage.bytes.div_ceil(1 << 30).to_string()),
                );
            }
        }
        Step::FinishOp(op) => {
            tx.execute("DELETE FROM operations WHERE id = ?1", [op.0])?;
        }
        Step::FinishChildren(op) => {
            tx.execute("DELETE FROM operations WHERE parent_id = ?1", [op.0])?;
        }
        Step::RecordHistory(h) => {
            tx.execute(
                "INSERT INTO status_history (object, object_id, from_status, to_status, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![h.object, h.object_id, h.from_status, h.to_status, h.reason, ts(&h.at)],
            )?;
        }
    }
    Ok(None)
}

fn delete_attrs(tx: &Connection, id: &str) -> Result<()> {
    tx.execute("DELETE FROM object_attrs WHERE object_id = ?1", [id])?;
    Ok(())
}

/// What `project` uses: objects without attributes belong to the default project.
fn project_usage(conn: &Connection, project: &str) -> Result<Usage> {
    let count = |table: &str| -> Result<(u64, u64)> {
        let (n, bytes): (i64, i64) = conn.query_row(
            &format!(
                "SELECT count(*), COALESCE(sum(t.size_bytes), 0) FROM {table} t LEFT JOIN object_attrs a ON a.object_id = t.id WHERE COALESCE(a.project_id, ?2) = ?1"
            ),
            params![project, DEFAULT_PROJECT],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, bytes.max(0) as u64))
    };
    let (volumes, vbytes) = count("volumes")?;
    let (snapshots, sbytes) = count("snapshots")?;
    Ok(Usage {
        volumes,
        snapshots,
        bytes: vbytes.saturating_add(sbytes),
    })
}

fn load_attrs(conn: &Connection, filter: &str, arg: &str) -> Result<BTreeMap<String, ObjectAttrs>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT object_id, project_id, user_id, description, properties, bootable, extra FROM object_attrs WHERE {filter} = ?1"
    ))?;
    let rows = stmt.query_map([arg], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (id, project_id, user_id, description, props, bootable, extra) = row?;
        let properties = serde_json::from_str(&props)
            .map_err(|e| Error::store(format!("attributes of {id}: bad properties: {e}")))?;
        let extra = serde_json::from_str(&extra)
            .map_err(|e| Error::store(format!("attributes of {id}: bad extra: {e}")))?;
        out.insert(
            id,
            ObjectAttrs {
                project_id,
                user_id,
                description,
                properties,
                bootable: bootable != 0,
                extra,
            },
        );
    }
    Ok(out)
}

fn insert_attachment(tx: &Connection, id: VolumeId, a: &Attachment) -> Result<()> {
    tx.execute(
        "INSERT INTO attachments (volume_id, instance_id, device, attached_at, boot_index, disk_bus, device_type, delete_on_termination, qmp, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            id.to_string(),
            a.instance_id.to_string(),
            a.device,
            ts(&a.attached_at),
            a.boot_index,
            a.disk_bus,
            a.device_type,
            i64::from(a.delete_on_termination),
            a.qmp,
            a.node
        ],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn commit(&self, batch: Batch) -> Result<std::result::Result<Option<OpId>, Conflict>> {
        let mut conn = self.lock()?;
        // FULL for what recovery trusts; NORMAL (durable at the next sync) for a batch that
        // only finishes journaled work: see `Batch::needs_sync`.
        let full = batch.needs_sync();
        if self.full_sync.load(std::sync::atomic::Ordering::Relaxed) != full {
            conn.pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
            self.full_sync
                .store(full, std::sync::atomic::Ordering::Relaxed);
        }
        // IMMEDIATE takes the write lock up front, so the guards we read cannot change
        // under us before our writes land, even with other kiln processes on the same file.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = ts(&Utc::now());
        for (i, step) in batch.steps.iter().enumerate() {
            if let Some(c) = apply(&tx, i, step, &now)? {
                // Dropping the transaction rolls back every step applied so far.
                return Ok(Err(c));
            }
        }
        let journal = |op: &NewOp| -> Result<OpId> {
            tx.execute(
                "INSERT INTO operations (kind, parent_id, volume_id, snapshot_id, payload, started_at, pid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    op.kind,
                    op.parent.map(|p| p.0),
                    op.volume_id.to_string(),
                    op.snapshot_id.map(|s| s.to_string()),
                    op.payload.to_string(),
                    now,
                    std::process::id()
                ],
            )?;
            Ok(OpId(tx.last_insert_rowid()))
        };
        let op = batch.begin.as_ref().map(&journal).transpose()?;
        for extra in &batch.also {
            journal(extra)?;
        }
        tx.commit()?;
        Ok(Ok(op))
    }

    fn attrs(&self, id: &str) -> Result<Option<ObjectAttrs>> {
        let conn = self.lock()?;
        Ok(load_attrs(&conn, "object_id", id)?.into_values().next())
    }

    fn attrs_of(&self, kind: ObjectKind) -> Result<BTreeMap<String, ObjectAttrs>> {
        let conn = self.lock()?;
        load_attrs(&conn, "kind", kind.as_str())
    }

    fn usage(&self, project: &str) -> Result<Usage> {
        let conn = self.lock()?;
        project_usage(&conn, project)
    }

    fn volume(&self, id: VolumeId) -> Result<Option<Volume>> {
        let conn = self.lock()?;
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes WHERE id = ?1");
        Ok(load_volumes(&conn, &sql, Some(id.to_string()))?
            .into_iter()
            .next())
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        let conn = self.lock()?;
        load_volumes(
            &conn,
            &format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY rowid"),
            None,
        )
    }

    fn volumes_from_snapshot(&self, id: SnapshotId) -> Result<Vec<Volume>> {
        let conn = self.lock()?;
        let sql = format!(
            "SELECT {VOLUME_COLS} FROM volumes WHERE source_snapshot_id = ?1 ORDER BY rowid"
        );
        load_volumes(&conn, &sql, Some(id.to_string()))
    }

    fn snapshot(&self, id: SnapshotId) -> Result<Option<Snapshot>> {
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE id = ?1"),
                [id.to_string()],
                snapshot_row,
            )
            .optional()?)
    }

    fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        let conn = self.lock()?;
        let rows = match volume {
            Some(v) => conn
                .prepare_cached(&format!(
                    "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE volume_id = ?1 ORDER BY rowid"
                ))?
                .query_map([v.to_string()], snapshot_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            None => conn
                .prepare_cached(&format!(
                    "SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY rowid"
                ))?
                .query_map([], snapshot_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
        };
        Ok(rows)
    }

    fn operations(&self) -> Result<Vec<Operation>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT id, kind, parent_id, volume_id, snapshot_id, payload, started_at, pid FROM operations ORDER BY id",
        )?;
        let ops = st
            .query_map([], |r| {
                let snapshot: Option<String> = r.get(4)?;
                let payload: String = r.get(5)?;
                Ok(Operation {
                    id: OpId(r.get(0)?),
                    kind: r.get(1)?,
                    parent: r.get::<_, Option<i64>>(2)?.map(OpId),
                    volume_id: parse_col(&r.get::<_, String>(3)?)?,
                    snapshot_id: snapshot.as_deref().map(parse_col).transpose()?,
                    payload: serde_json::from_str(&payload).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            5,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                    started_at: parse_ts(&r.get::<_, String>(6)?)?,
                    pid: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(ops)
    }

    fn instance(&self, id: InstanceId) -> Result<Option<Instance>> {
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                &format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1"),
                [id.to_string()],
                instance_row,
            )
            .optional()?)
    }

    fn instances(&self) -> Result<Vec<Instance>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(&format!(
            "SELECT {INSTANCE_COLS} FROM instances ORDER BY rowid"
        ))?;
        Ok(st
            .query_map([], instance_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn instance_volumes(&self, id: InstanceId) -> Result<Vec<Volume>> {
        let conn = self.lock()?;
        let sql = format!(
            "SELECT {} FROM volumes v JOIN attachments a ON a.volume_id = v.id WHERE a.instance_id = ?1 ORDER BY a.device",
            VOLUME_COLS
                .split(", ")
                .map(|c| format!("v.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        load_volumes(&conn, &sql, Some(id.to_string()))
    }

    fn image(&self, id: ImageId) -> Result<Option<Image>> {
        let conn = self.lock()?;
        let sql = format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1");
        Ok(load_images(&conn, &sql, Some(id.to_string()))?
            .into_iter()
            .next())
    }

    fn images(&self) -> Result<Vec<Image>> {
        let conn = self.lock()?;
        load_images(
            &conn,
            &format!("SELECT {IMAGE_COLS} FROM images ORDER BY rowid"),
            None,
        )
    }

    fn backup(&self, id: BackupId) -> Result<Option<Backup>> {
        let conn = self.lock()?;
        Ok(conn
            .prepare_cached(&format!("SELECT {BACKUP_COLS} FROM backups WHERE id = ?1"))?
            .query_row([id.to_string()], backup_row)
            .optional()?)
    }

    fn backups(&self, volume: Option<VolumeId>) -> Result<Vec<Backup>> {
        let conn = self.lock()?;
        let rows = match volume {
            Some(v) => conn
                .prepare_cached(&format!(
                    "SELECT {BACKUP_COLS} FROM backups WHERE volume_id = ?1 ORDER BY created_at, rowid"
                ))?
                .query_map([v.to_string()], backup_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            None => conn
                .prepare_cached(&format!(
                    "SELECT {BACKUP_COLS} FROM backups ORDER BY created_at, rowid"
                ))?
                .query_map([], backup_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
        };
        Ok(rows)
    }

    fn history(&self, object_id: &str) -> Result<Vec<HistoryEntry>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT object, object_id, from_status, to_status, reason, at FROM status_history WHERE object_id = ?1 ORDER BY seq",
        )?;
        let rows = st
            .query_map([object_id], |r| {
                Ok(HistoryEntry {
                    object: r.get(0)?,
                    object_id: r.get(1)?,
                    from_status: r.get(2)?,
                    to_status: r.get(3)?,
                    reason: r.get(4)?,
                    at: parse_ts(&r.get::<_, String>(5)?)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewOp;
    use crate::types::VolumeStatus;

    fn volume(status: VolumeStatus) -> Volume {
        let now = Utc::now();
        Volume {
            id: VolumeId::new(),
            name: Some("v".into()),
            size_bytes: 1 << 30,
            backend: "default".into(),
            status,
            status_reason: None,
            provider_location: None,
            source_snapshot_id: None,
            attachments: vec![],
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn attributes_live_and_die_with_their_object_and_quotas_count_the_default_project() {
        use crate::attrs::{ObjectAttrs, ObjectKind, QuotaLimits};
        let store = SqliteStore::in_memory().unwrap();
        let cli = volume(VolumeStatus::Available);
        let api = volume(VolumeStatus::Available);
        let mut attrs = ObjectAttrs::owned_by("p1", Some("u1"));
        attrs.description = Some("d".into());
        attrs.properties.insert("k".into(), "v".into());
        attrs
            .extra
            .insert("attachment_status".into(), "reserved".into());
        let put = |id: VolumeId, attrs: &ObjectAttrs| Step::PutAttrs {
            kind: ObjectKind::Volume,
            id: id.to_string(),
            attrs: attrs.clone(),
        };
        // Attributes of a missing object are refused.
        let c = store.commit(Batch::new(vec![put(api.id, &attrs)])).unwrap();
        assert_eq!(c.unwrap_err().found, None);
        assert!(store.attrs(&api.id.to_string()).unwrap().is_none());
        store
            .commit(Batch::new(vec![Step::InsertVolume(cli.clone())]))
            .unwrap()
            .unwrap();
        store
            .commit(Batch::new(vec![
                Step::InsertVolume(api.clone()),
                put(api.id, &attrs),
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(
            store.attrs(&api.id.to_string()).unwrap(),
            Some(attrs.clone())
        );
        let all = store.attrs_of(ObjectKind::Volume).unwrap();
        assert_eq!(all.len(), 1);
        assert!(store.attrs_of(ObjectKind::Snapshot).unwrap().is_empty());
        // The CLI's volume (no attributes) counts for the default project.
        let d = store.usage(DEFAULT_PROJECT).unwrap();
        assert_eq!((d.volumes, d.snapshots, d.bytes), (1, 0, 1 << 30));
        let p1 = store.usage("p1").unwrap();
        assert_eq!((p1.volumes, p1.bytes), (1, 1 << 30));
        // Quota: one more volume does not fit a limit of one; 1 GiB more fits 2 GiB, not 1.
        let guard = |volumes, gigabytes, add_bytes| Step::QuotaAllows {
            project: "p1".into(),
            kind: ObjectKind::Volume,
            limits: QuotaLimits {
                volumes,
                snapshots: None,
                gigabytes,
            },
            add_bytes,
        };
        let c = store
            .commit(Batch::new(vec![guard(Some(1), None, 1)]))
            .unwrap();
        assert_eq!(c.unwrap_err().id, "volumes");
        assert!(
            store
                .commit(Batch::new(vec![guard(Some(2), Some(2), 1 << 30)]))
                .unwrap()
                .is_ok()
        );
        let c = store
            .commit(Batch::new(vec![guard(None, Some(1), 1)]))
            .unwrap();
        assert_eq!(c.unwrap_err().id, "gigabytes");
        // Deleting the volume deletes its attributes.
        store
            .commit(Batch::new(vec![Step::DeleteVolume(api.id)]))
            .unwrap()
            .unwrap();
        assert!(store.attrs(&api.id.to_string()).unwrap().is_none());
        assert_eq!(store.usage("p1").unwrap().volumes, 0);
    }

    #[test]
    fn compare_and_set_applies_all_or_nothing() {
        let store = SqliteStore::in_memory().unwrap();
        let v = volume(VolumeStatus::Available);
        store
            .commit(Batch::new(vec![Step::InsertVolume(v.clone())]))
            .unwrap()
            .unwrap();

        // Second step's guard fails: the first step's change must be rolled back.
        let c = store
            .commit(Batch::with_op(
                vec![
                    Step::SetVolumeStatus {
                        id: v.id,
                        from: vec![VolumeStatus::Available],
                        to: VolumeStatus::Deleting,
                        reason: None,
                    },
                    Step::VolumeIn {
                        id: v.id,
                        any_of: vec![VolumeStatus::InUse],
                    },
                ],
                NewOp {
                    kind: "delete_volume",
                    parent: None,
                    volume_id: v.id,
                    snapshot_id: None,
                    payload: serde_json::Value::Null,
                },
            ))
            .unwrap()
            .unwrap_err();
        assert_eq!(c.step, 1);
        assert_eq!(c.found.as_deref(), Some("deleting"));
        assert_eq!(
            store.volume(v.id).unwrap().unwrap().status,
            VolumeStatus::Available
        );
        assert!(store.operations().unwrap().is_empty());

        let op = store
            .commit(Batch::with_op(
                vec![Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![VolumeStatus::Available],
                    to: VolumeStatus::Deleting,
                    reason: None,
                }],
                NewOp {
                    kind: "delete_volume",
                    parent: None,
                    volume_id: v.id,
                    snapshot_id: None,
                    payload: serde_json::Value::Null,
                },
            ))
            .unwrap()
            .unwrap()
            .unwrap();
        let ops = store.operations().unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].id, op);
        assert_eq!(ops[0].kind, "delete_volume");
        store
            .commit(Batch::new(vec![
                Step::DeleteVolume(v.id),
                Step::FinishOp(op),
            ]))
            .unwrap()
            .unwrap();
        assert!(store.volume(v.id).unwrap().is_none());
        assert!(store.operations().unwrap().is_empty());
    }

    #[test]
    fn round_trips_rows_and_migrates_a_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let v = volume(VolumeStatus::InUse);
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
