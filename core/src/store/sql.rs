//! The store's logic written once over SQL, for every database kiln runs on.
//!
//! [`SqlStore`] implements [`Store`] on any [`Database`]: each guarded [`Step`], each read,
//! and each row's decoding live here, in one SQL text. A database contributes only how to
//! run a statement ([`Sql`]), how to run reads and a write transaction, and
//! its schema migrations, and the locks its guards take ([`Sql::lock_row`]). The text is
//! written in the dialect SQLite and PostgreSQL share
//! (`?N` placeholders, which the PostgreSQL connection spells `$N`; the insertion order
//! SQLite calls `rowid`, an explicit `seq` column there), so both stores answer every call
//! with the same rows by construction.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::{Batch, Conflict, HistoryEntry, NewOp, OpId, Operation, Step, Store};
use crate::attrs::{DEFAULT_PROJECT, ObjectAttrs, ObjectKind, Usage};
use crate::error::{Error, Result};
use crate::instance::{Image, ImageStatus, Instance};
use crate::types::{
    Attachment, Backup, BackupId, ImageId, InstanceId, Snapshot, SnapshotId, Volume, VolumeId,
};

/// One SQL value, as kiln stores them: integers, text and NULL (timestamps are RFC 3339
/// text in UTC with microseconds, so they sort as text; flags are 0/1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// Text.
    Text(String),
}

impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}
impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<i32> for Val {
    fn from(v: i32) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Int(i64::from(v))
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}
impl<T: Clone + Into<Val>> From<&Option<T>> for Val {
    fn from(v: &Option<T>) -> Self {
        v.clone().map_or(Val::Null, Into::into)
    }
}

/// Parameters of one statement: `params![a, b]` converts each into a [`Val`].
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$(Val::from($v)),*] as &[Val] };
}

/// One result row, read by column index with the conversion each column needs; a value of
/// the wrong type is a store error naming the column, never a panic.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Val>);

impl Row {
    fn get(&self, i: usize) -> Result<&Val> {
        self.0
            .get(i)
            .ok_or_else(|| Error::store(format!("row has no column {i}")))
    }

    fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        match self.get(i)? {
            Val::Null => Ok(None),
            Val::Text(s) => Ok(Some(s)),
            Val::Int(n) => Err(Error::store(format!(
                "column {i}: expected text, found {n}"
            ))),
        }
    }

    fn text(&self, i: usize) -> Result<&str> {
        self.opt_text(i)?
            .ok_or_else(|| Error::store(format!("column {i}: unexpected NULL")))
    }

    fn opt_string(&self, i: usize) -> Result<Option<String>> {
        Ok(self.opt_text(i)?.map(str::to_string))
    }

    pub(crate) fn string(&self, i: usize) -> Result<String> {
        Ok(self.text(i)?.to_string())
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.get(i)? {
            Val::Null => Ok(None),
            Val::Int(n) => Ok(Some(*n)),
            Val::Text(s) => Err(Error::store(format!(
                "column {i}: expected an integer, found {s:?}"
            ))),
        }
    }

    fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| Error::store(format!("column {i}: unexpected NULL")))
    }

    fn size(&self, i: usize) -> Result<u64> {
        let n = self.int(i)?;
        u64::try_from(n).map_err(|_| Error::store(format!("column {i}: negative size {n}")))
    }

    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.int(i)? != 0)
    }

    fn opt_parse<T: FromStr>(&self, i: usize) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.opt_text(i)?
            .map(|s| {
                s.parse::<T>()
                    .map_err(|e| Error::store(format!("column {i}: {s:?}: {e}")))
            })
            .transpose()
    }

    fn parse<T: FromStr>(&self, i: usize) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.opt_parse(i)?
            .ok_or_else(|| Error::store(format!("column {i}: unexpected NULL")))
    }

    fn ts(&self, i: usize) -> Result<DateTime<Utc>> {
        let s = self.text(i)?;
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| Error::store(format!("column {i}: timestamp {s:?}: {e}")))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T> {
        let s = self.text(i)?;
        serde_json::from_str(s).map_err(|e| Error::store(format!("column {i}: bad JSON: {e}")))
    }
}

/// A connection (or an open transaction) statements run on.
pub trait Sql {
    /// Runs a statement; returns how many rows it changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64>;
    /// Runs a query; returns every row.
    fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>>;
    /// Runs a query; returns its first row, if any.
    fn row(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }
    /// Within a write transaction: the row `id` of `table` cannot change (nor be deleted)
    /// until this transaction ends, and what this transaction reads of it next is its
    /// latest committed state. A guard takes it before it reads what it checks. A no-op
    /// where every write transaction is serialized anyway (SQLite).
    fn lock_row(&mut self, table: &str, id: &str) -> Result<()> {
        let _ = (table, id);
        Ok(())
    }
    /// Within a write transaction: serializes it with every other transaction that locks
    /// `name` (a set of rows no one row stands for: a project's quota, an instance's
    /// attachments, an object's attributes). A no-op where writes are serialized anyway.
    fn lock_name(&mut self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }
    /// Within a write transaction about to journal an operation on `volume`: the other
    /// incarnations, still alive by their heartbeat, with an operation journaled on it —
    /// serialized with every other such check of the volume until this transaction ends.
    /// Holding the volume's lock normally means there is none; there can be one only
    /// where a lock can end while its holder lives on (a PostgreSQL session). Empty where
    /// that cannot happen (SQLite: a `flock` ends only with its process).
    fn live_owners_elsewhere(&mut self, volume: &str) -> Result<Vec<String>> {
        let _ = volume;
        Ok(vec![])
    }
}

/// The body of a write transaction: `Ok(Err(conflict))` rolls it back.
pub type WriteFn<'a, T> = dyn FnMut(&mut dyn Sql) -> Result<std::result::Result<T, Conflict>> + 'a;

/// What a database provides to [`SqlStore`]: transactions over [`Sql`].
pub trait Database: Send + Sync + 'static {
    /// Runs `f`'s reads. Each statement sees committed data; a read of several statements
    /// (a volume, then its attachments) may see a commit land between them, as with
    /// SQLite's autocommit reads.
    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Sql) -> Result<T>) -> Result<T>;
    /// Runs `f` in one write transaction whose guards cannot change before it commits
    /// (serialized writers on SQLite; on PostgreSQL the rows and named sets each guard locks
    /// with [`Sql::lock_row`] / [`Sql::lock_name`]): committed when `f` returns
    /// `Ok(Ok(_))`, rolled back otherwise. `durable`: the commit must be on stable storage
    /// before this returns (see [`Batch::needs_sync`]). A database may run `f` more than once
    /// (a serialization failure is retried), so `f` must only touch the transaction.
    fn write<T>(
        &self,
        durable: bool,
        f: &mut WriteFn<'_, T>,
    ) -> Result<std::result::Result<T, Conflict>>;
}

/// [`Store`] on a [`Database`] (see the module docs).
pub struct SqlStore<D>(pub(super) D);

impl<D: Database> SqlStore<D> {
    /// The database underneath.
    pub fn database(&self) -> &D {
        &self.0
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn size_param(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("size", "too large for the store"))
}

fn json_param<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(Error::store)
}

const VOLUME_COLS: &str = "id, name, size_bytes, backend, status, status_reason, provider_location, source_snapshot_id, created_at, updated_at";
const SNAPSHOT_COLS: &str = "id, volume_id, name, size_bytes, backend, status, status_reason, provider_location, forced, created_at, updated_at, image_id, consistency";
const INSTANCE_COLS: &str =
    "id, name, agent, freeze_mountpoints, root_device, properties, created_at, updated_at, qmp";
const IMAGE_COLS: &str =
    "id, name, status, instance_id, min_disk, consistency, properties, created_at, updated_at";
const BACKUP_COLS: &str = "id, volume_id, snapshot_id, parent_id, name, target, status, status_reason, size_bytes, stored_bytes, created_at, updated_at";
const OPERATION_COLS: &str =
    "id, kind, parent_id, volume_id, snapshot_id, payload, started_at, pid, owner";
const ATTACHMENT_COLS: &str = "instance_id, device, attached_at, boot_index, disk_bus, device_type, delete_on_termination, qmp, node";

fn volume_row(r: &Row) -> Result<Volume> {
    Ok(Volume {
        id: r.parse(0)?,
        name: r.opt_string(1)?,
        size_bytes: r.size(2)?,
        backend: r.string(3)?,
        status: r.parse(4)?,
        status_reason: r.opt_string(5)?,
        provider_location: r.opt_string(6)?,
        source_snapshot_id: r.opt_parse(7)?,
        attachments: Vec::new(),
        created_at: r.ts(8)?,
        updated_at: r.ts(9)?,
    })
}

fn snapshot_row(r: &Row) -> Result<Snapshot> {
    Ok(Snapshot {
        id: r.parse(0)?,
        volume_id: r.parse(1)?,
        name: r.opt_string(2)?,
        size_bytes: r.size(3)?,
        backend: r.string(4)?,
        status: r.parse(5)?,
        status_reason: r.opt_string(6)?,
        provider_location: r.opt_string(7)?,
        forced: r.flag(8)?,
        created_at: r.ts(9)?,
        updated_at: r.ts(10)?,
        image_id: r.opt_parse(11)?,
        consistency: r.opt_parse(12)?,
    })
}

fn instance_row(r: &Row) -> Result<Instance> {
    Ok(Instance {
        id: r.parse(0)?,
        name: r.opt_string(1)?,
        agent: r.opt_string(2)?,
        freeze_mountpoints: r.json(3)?,
        root_device: r.string(4)?,
        properties: r.json(5)?,
        created_at: r.ts(6)?,
        updated_at: r.ts(7)?,
        qmp: r.opt_string(8)?,
    })
}

fn image_row(r: &Row) -> Result<Image> {
    Ok(Image {
        id: r.parse(0)?,
        name: r.string(1)?,
        status: r.parse(2)?,
        instance_id: r.parse(3)?,
        min_disk: r.size(4)?,
        consistency: r.parse(5)?,
        properties: r.json(6)?,
        snapshots: Vec::new(),
        created_at: r.ts(7)?,
        updated_at: r.ts(8)?,
    })
}

fn backup_row(r: &Row) -> Result<Backup> {
    Ok(Backup {
        id: r.parse(0)?,
        volume_id: r.parse(1)?,
        snapshot_id: r.parse(2)?,
        parent_id: r.opt_parse(3)?,
        name: r.opt_string(4)?,
        target: r.string(5)?,
        status: r.parse(6)?,
        status_reason: r.opt_string(7)?,
        size_bytes: r.size(8)?,
        stored_bytes: r.size(9)?,
        created_at: r.ts(10)?,
        updated_at: r.ts(11)?,
    })
}

fn operation_row(r: &Row) -> Result<Operation> {
    Ok(Operation {
        id: OpId(r.int(0)?),
        kind: r.string(1)?,
        parent: r.opt_int(2)?.map(OpId),
        volume_id: r.parse(3)?,
        snapshot_id: r.opt_parse(4)?,
        payload: r.json(5)?,
        started_at: r.ts(6)?,
        pid: u32::try_from(r.int(7)?).unwrap_or(0),
        owner: r.opt_string(8)?,
    })
}

fn attachment_row(r: &Row) -> Result<Attachment> {
    Ok(Attachment {
        instance_id: r.parse::<InstanceId>(0)?,
        device: r.string(1)?,
        attached_at: r.ts(2)?,
        boot_index: r
            .opt_int(3)?
            .map(|b| i32::try_from(b).map_err(|_| Error::store(format!("boot_index {b}"))))
            .transpose()?,
        disk_bus: r.opt_string(4)?,
        device_type: r.opt_string(5)?,
        delete_on_termination: r.flag(6)?,
        qmp: r.opt_string(7)?,
        node: r.opt_string(8)?,
    })
}

fn history_row(r: &Row) -> Result<HistoryEntry> {
    Ok(HistoryEntry {
        object: r.string(0)?,
        object_id: r.string(1)?,
        from_status: r.string(2)?,
        to_status: r.string(3)?,
        reason: r.string(4)?,
        at: r.ts(5)?,
    })
}

fn rows_as<T>(
    c: &mut dyn Sql,
    sql: &str,
    params: &[Val],
    decode: fn(&Row) -> Result<T>,
) -> Result<Vec<T>> {
    c.rows(sql, params)?.iter().map(decode).collect()
}

fn load_images(c: &mut dyn Sql, sql: &str, params: &[Val]) -> Result<Vec<Image>> {
    let mut images = rows_as(c, sql, params, image_row)?;
    for i in &mut images {
        i.snapshots = c
            .rows(
                "SELECT id FROM snapshots WHERE image_id = ?1 ORDER BY rowid",
                params![i.id.to_string()],
            )?
            .iter()
            .map(|r| r.parse(0))
            .collect::<Result<_>>()?;
    }
    Ok(images)
}

fn load_volumes(c: &mut dyn Sql, sql: &str, params: &[Val]) -> Result<Vec<Volume>> {
    let mut volumes = rows_as(c, sql, params, volume_row)?;
    for v in &mut volumes {
        v.attachments = rows_as(
            c,
            &format!("SELECT {ATTACHMENT_COLS} FROM attachments WHERE volume_id = ?1"),
            params![v.id.to_string()],
            attachment_row,
        )?;
    }
    Ok(volumes)
}

fn status_of(c: &mut dyn Sql, table: &str, id: String) -> Result<Option<String>> {
    c.row(
        &format!("SELECT status FROM {table} WHERE id = ?1"),
        params![id],
    )?
    .map(|r| r.string(0))
    .transpose()
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
fn apply(tx: &mut dyn Sql, index: usize, step: &Step, now: &str) -> Result<Option<Conflict>> {
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
            tx.exec(
                &format!("INSERT INTO volumes ({VOLUME_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    v.id.to_string(),
                    &v.name,
                    size_param(v.size_bytes)?,
                    &v.backend,
                    v.status.as_str(),
                    &v.status_reason,
                    &v.provider_location,
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
            tx.exec(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    s.id.to_string(),
                    s.volume_id.to_string(),
                    &s.name,
                    size_param(s.size_bytes)?,
                    &s.backend,
                    s.status.as_str(),
                    &s.status_reason,
                    &s.provider_location,
                    s.forced,
                    ts(&s.created_at),
                    ts(&s.updated_at),
                    s.image_id.map(|i| i.to_string()),
                    s.consistency.map(|c| c.as_str()),
                ],
            )?;
        }
        Step::InsertInstance(i) => {
            tx.exec(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    i.id.to_string(),
                    &i.name,
                    &i.agent,
                    json_param(&i.freeze_mountpoints)?,
                    &i.root_device,
                    json_param(&i.properties)?,
                    ts(&i.created_at),
                    ts(&i.updated_at),
                    &i.qmp,
                ],
            )?;
        }
        Step::InstanceHasNoVolumes(id) => {
            tx.lock_name(&format!("attachments-of-{id}"))?;
            let n = count(
                tx,
                "SELECT count(*) FROM attachments WHERE instance_id = ?1",
                id.to_string(),
            )?;
            if n > 0 {
                return conflict("instance", id.to_string(), Some(n.to_string()));
            }
        }
        Step::DeleteInstance(id) => {
            let n = tx.exec(
                "DELETE FROM instances WHERE id = ?1",
                params![id.to_string()],
            )?;
            if n == 0 {
                return conflict("instance", id.to_string(), None);
            }
            delete_attrs(tx, &id.to_string())?;
        }
        Step::InsertImage(i) => {
            tx.exec(
                &format!(
                    "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ),
                params![
                    i.id.to_string(),
                    &i.name,
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
            tx.lock_row("images", &id.to_string())?;
            let found = status_of(tx, "images", id.to_string())?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("image", id.to_string(), found);
            }
            tx.exec(
                "UPDATE images SET status = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), to.as_str(), now],
            )?;
        }
        Step::DeleteImage(id) => {
            tx.exec(
                "UPDATE snapshots SET image_id = NULL WHERE image_id = ?1",
                params![id.to_string()],
            )?;
            tx.exec("DELETE FROM images WHERE id = ?1", params![id.to_string()])?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::InsertBackup(b) => {
            tx.exec(
                &format!(
                    "INSERT INTO backups ({BACKUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    b.id.to_string(),
                    b.volume_id.to_string(),
                    b.snapshot_id.to_string(),
                    b.parent_id.map(|p| p.to_string()),
                    &b.name,
                    &b.target,
                    b.status.as_str(),
                    &b.status_reason,
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
            tx.lock_row("backups", &id.to_string())?;
            let found = status_of(tx, "backups", id.to_string())?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("backup", id.to_string(), found);
            }
            tx.exec(
                "UPDATE backups SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), to.as_str(), reason, now],
            )?;
        }
        Step::SetBackupStored(id, bytes) => {
            tx.exec(
                "UPDATE backups SET stored_bytes = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), size_param(*bytes)?, now],
            )?;
        }
        Step::BackupHasNoChildren(id) => {
            tx.lock_row("backups", &id.to_string())?;
            let child = tx.row(
                "SELECT id FROM backups WHERE parent_id = ?1 LIMIT 1",
                params![id.to_string()],
            )?;
            if let Some(c) = child {
                return conflict("backup", c.string(0)?, Some("builds on it".into()));
            }
        }
        Step::DeleteBackup(id) => {
            let n = tx.exec("DELETE FROM backups WHERE id = ?1", params![id.to_string()])?;
            if n == 0 {
                return conflict("backup", id.to_string(), None);
            }
        }
        Step::SetSnapshotImage {
            id,
            image,
            consistency,
        } => {
            tx.exec(
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
            tx.lock_row("snapshots", &id.to_string())?;
            let found = tx.row(
                "SELECT images.id, images.status FROM snapshots JOIN images ON images.id = snapshots.image_id WHERE snapshots.id = ?1",
                params![id.to_string()],
            )?;
            if let Some(r) = found {
                let status = r.string(1)?;
                if status != ImageStatus::PendingDelete.as_str() {
                    return conflict("image", r.string(0)?, Some(status));
                }
            }
        }
        Step::VolumeIn { id, any_of } => {
            tx.lock_row("volumes", &id.to_string())?;
            let found = status_of(tx, "volumes", id.to_string())?;
            if !status_ok(&found, any_of.iter().map(|s| s.as_str()), false) {
                return conflict("volume", id.to_string(), found);
            }
        }
        Step::SnapshotIn { id, any_of } => {
            tx.lock_row("snapshots", &id.to_string())?;
            let found = status_of(tx, "snapshots", id.to_string())?;
            if !status_ok(&found, any_of.iter().map(|s| s.as_str()), false) {
                return conflict("snapshot", id.to_string(), found);
            }
        }
        Step::VolumeHasNoSnapshots(id) => {
            // A snapshot insert holds a key-share lock on its volume's row (the foreign
            // key): locking the row waits for one in flight, and keeps new ones out.
            tx.lock_row("volumes", &id.to_string())?;
            let n = count(
                tx,
                "SELECT count(*) FROM snapshots WHERE volume_id = ?1",
                id.to_string(),
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
            tx.lock_row("volumes", &id.to_string())?;
            let found = status_of(tx, "volumes", id.to_string())?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("volume", id.to_string(), found);
            }
            tx.exec(
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
            tx.lock_row("snapshots", &id.to_string())?;
            let found = status_of(tx, "snapshots", id.to_string())?;
            if !status_ok(&found, from.iter().map(|s| s.as_str()), true) {
                return conflict("snapshot", id.to_string(), found);
            }
            tx.exec(
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
            tx.exec(
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
            tx.exec(
                "UPDATE snapshots SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), status.as_str(), reason, ts(updated_at)],
            )?;
        }
        Step::SetVolumeLocation(id, loc) => {
            tx.exec(
                "UPDATE volumes SET provider_location = ?2 WHERE id = ?1",
                params![id.to_string(), loc],
            )?;
        }
        Step::SetSnapshotLocation(id, loc) => {
            tx.exec(
                "UPDATE snapshots SET provider_location = ?2 WHERE id = ?1",
                params![id.to_string(), loc],
            )?;
        }
        Step::Attach(id, a) => {
            tx.exec(
                "DELETE FROM attachments WHERE volume_id = ?1",
                params![id.to_string()],
            )?;
            insert_attachment(tx, *id, a)?;
        }
        Step::Detach(id) => {
            tx.exec(
                "DELETE FROM attachments WHERE volume_id = ?1",
                params![id.to_string()],
            )?;
        }
        Step::DeleteVolume(id) => {
            tx.exec(
                "DELETE FROM attachments WHERE volume_id = ?1",
                params![id.to_string()],
            )?;
            tx.exec("DELETE FROM volumes WHERE id = ?1", params![id.to_string()])?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::DeleteSnapshot(id) => {
            tx.exec(
                "DELETE FROM snapshots WHERE id = ?1",
                params![id.to_string()],
            )?;
            delete_attrs(tx, &id.to_string())?;
        }
        Step::SetVolumeName(id, name) => {
            let n = tx.exec(
                "UPDATE volumes SET name = ?2, updated_at = ?3 WHERE id = ?1",
                params![id.to_string(), name, now],
            )?;
            if n == 0 {
                return conflict("volume", id.to_string(), None);
            }
        }
        Step::SetSnapshotName(id, name) => {
            let n = tx.exec(
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
            tx.lock_name(&format!("attributes-of-{id}"))?;
            tx.lock_row(table, id)?;
            if status_exists(tx, table, id)?.is_none() {
                return conflict(kind.as_str(), id.clone(), None);
            }
            tx.exec(
                "INSERT INTO object_attrs (object_id, kind, project_id, user_id, description, properties, bootable, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (object_id) DO UPDATE SET kind = excluded.kind, project_id = excluded.project_id, user_id = excluded.user_id, description = excluded.description, properties = excluded.properties, bootable = excluded.bootable, extra = excluded.extra",
                params![
                    id,
                    kind.as_str(),
                    &attrs.project_id,
                    &attrs.user_id,
                    &attrs.description,
                    json_param(&attrs.properties)?,
                    attrs.bootable,
                    json_param(&attrs.extra)?
                ],
            )?;
        }
        Step::AttrsAre { id, expected } => {
            tx.lock_name(&format!("attributes-of-{id}"))?;
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
            if limits.volumes.is_none() && limits.snapshots.is_none() && limits.gigabytes.is_none()
            {
                // Unlimited: nothing to count, and nothing to serialize creates on.
                return Ok(None);
            }
            tx.lock_name(&format!("quota-of-{project}"))?;
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
            tx.exec("DELETE FROM operations WHERE id = ?1", params![op.0])?;
        }
        Step::FinishChildren(op) => {
            tx.exec("DELETE FROM operations WHERE parent_id = ?1", params![op.0])?;
        }
        Step::RecordHistory(h) => {
            tx.exec(
                "INSERT INTO status_history (object, object_id, from_status, to_status, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &h.object,
                    &h.object_id,
                    &h.from_status,
                    &h.to_status,
                    &h.reason,
                    ts(&h.at)
                ],
            )?;
        }
    }
    Ok(None)
}

/// `Some(())` when a row with this id exists in `table`.
fn status_exists(tx: &mut dyn Sql, table: &str, id: &str) -> Result<Option<()>> {
    Ok(tx
        .row(
            &format!("SELECT id FROM {table} WHERE id = ?1"),
            params![id],
        )?
        .map(|_| ()))
}

fn count(tx: &mut dyn Sql, sql: &str, id: String) -> Result<i64> {
    match tx.row(sql, params![id])? {
        Some(r) => r.int(0),
        None => Ok(0),
    }
}

fn delete_attrs(tx: &mut dyn Sql, id: &str) -> Result<()> {
    tx.exec("DELETE FROM object_attrs WHERE object_id = ?1", params![id])?;
    Ok(())
}

/// What `project` uses: objects without attributes belong to the default project.
fn project_usage(c: &mut dyn Sql, project: &str) -> Result<Usage> {
    let mut count = |table: &str| -> Result<(u64, u64)> {
        // The sum is cast: PostgreSQL sums bigints as numeric.
        let row = c.row(
            &format!(
                "SELECT count(*), CAST(COALESCE(sum(t.size_bytes), 0) AS BIGINT) FROM {table} t LEFT JOIN object_attrs a ON a.object_id = t.id WHERE COALESCE(a.project_id, ?2) = ?1"
            ),
            params![project, DEFAULT_PROJECT],
        )?;
        match row {
            Some(r) => Ok((r.int(0)?.max(0) as u64, r.int(1)?.max(0) as u64)),
            None => Ok((0, 0)),
        }
    };
    let (volumes, vbytes) = count("volumes")?;
    let (snapshots, sbytes) = count("snapshots")?;
    Ok(Usage {
        volumes,
        snapshots,
        bytes: vbytes.saturating_add(sbytes),
    })
}

fn load_attrs(c: &mut dyn Sql, filter: &str, arg: &str) -> Result<BTreeMap<String, ObjectAttrs>> {
    let rows = c.rows(
        &format!(
            "SELECT object_id, project_id, user_id, description, properties, bootable, extra FROM object_attrs WHERE {filter} = ?1"
        ),
        params![arg],
    )?;
    let mut out = BTreeMap::new();
    for r in rows {
        let id = r.string(0)?;
        let properties = serde_json::from_str(r.text(4)?)
            .map_err(|e| Error::store(format!("attributes of {id}: bad properties: {e}")))?;
        let extra = serde_json::from_str(r.text(6)?)
            .map_err(|e| Error::store(format!("attributes of {id}: bad extra: {e}")))?;
        out.insert(
            id,
            ObjectAttrs {
                project_id: r.string(1)?,
                user_id: r.opt_string(2)?,
                description: r.opt_string(3)?,
                properties,
                bootable: r.flag(5)?,
                extra,
            },
        );
    }
    Ok(out)
}

fn insert_attachment(tx: &mut dyn Sql, id: VolumeId, a: &Attachment) -> Result<()> {
    // Serialized with `InstanceHasNoVolumes` of the same instance.
    tx.lock_name(&format!("attachments-of-{}", a.instance_id))?;
    tx.exec(
        &format!("INSERT INTO attachments (volume_id, {ATTACHMENT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            id.to_string(),
            a.instance_id.to_string(),
            &a.device,
            ts(&a.attached_at),
            a.boot_index,
            &a.disk_bus,
            &a.device_type,
            a.delete_on_termination,
            &a.qmp,
            &a.node
        ],
    )?;
    Ok(())
}

fn journal(tx: &mut dyn Sql, op: &NewOp, now: &str) -> Result<OpId> {
    // The last fence against running beside another node: an operation whose lock session
    // ended under it (a PostgreSQL restart) while it lives on, and that this process's lock
    // did not wait for because its entry was not committed yet. Refused before anything
    // changed; the caller may retry once that operation is done.
    let volume = op.volume_id.to_string();
    if let Some(owner) = tx
        .live_owners_elsewhere(&volume)?
        .into_iter()
        .find(|o| !crate::node::gone_from_this_host(o))
    {
        return Err(Error::busy(
            format!(
                "volume {volume} has an operation of {owner} running, whose lock ended under it; try again once it is done"
            ),
            vec![],
        ));
    }
    let row = tx.row(
        "INSERT INTO operations (kind, parent_id, volume_id, snapshot_id, payload, started_at, pid, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        params![
            op.kind,
            op.parent.map(|p| p.0),
            op.volume_id.to_string(),
            op.snapshot_id.map(|s| s.to_string()),
            op.payload.to_string(),
            now,
            std::process::id(),
            crate::node::incarnation()
        ],
    )?;
    match row {
        Some(r) => Ok(OpId(r.int(0)?)),
        None => Err(Error::store("journaling returned no id")),
    }
}

impl<D: Database> SqlStore<D> {
    fn read<T>(&self, mut f: impl FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        self.0.read(&mut f)
    }
}

impl<D: Database> Store for SqlStore<D> {
    fn commit(&self, batch: Batch) -> Result<std::result::Result<Option<OpId>, Conflict>> {
        self.0.write(batch.needs_sync(), &mut |tx| {
            let now = ts(&Utc::now());
            for (i, step) in batch.steps.iter().enumerate() {
                if let Some(c) = apply(tx, i, step, &now)? {
                    // The database rolls back every step applied so far.
                    return Ok(Err(c));
                }
            }
            let op = batch
                .begin
                .as_ref()
                .map(|op| journal(tx, op, &now))
                .transpose()?;
            for extra in &batch.also {
                journal(tx, extra, &now)?;
            }
            Ok(Ok(op))
        })
    }

    fn attrs(&self, id: &str) -> Result<Option<ObjectAttrs>> {
        self.read(|c| Ok(load_attrs(c, "object_id", id)?.into_values().next()))
    }

    fn attrs_of(&self, kind: ObjectKind) -> Result<BTreeMap<String, ObjectAttrs>> {
        self.read(|c| load_attrs(c, "kind", kind.as_str()))
    }

    fn usage(&self, project: &str) -> Result<Usage> {
        self.read(|c| project_usage(c, project))
    }

    fn volume(&self, id: VolumeId) -> Result<Option<Volume>> {
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes WHERE id = ?1");
        self.read(|c| Ok(load_volumes(c, &sql, params![id.to_string()])?.pop()))
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY rowid");
        self.read(|c| load_volumes(c, &sql, &[]))
    }

    fn volumes_from_snapshot(&self, id: SnapshotId) -> Result<Vec<Volume>> {
        let sql = format!(
            "SELECT {VOLUME_COLS} FROM volumes WHERE source_snapshot_id = ?1 ORDER BY rowid"
        );
        self.read(|c| load_volumes(c, &sql, params![id.to_string()]))
    }

    fn snapshot(&self, id: SnapshotId) -> Result<Option<Snapshot>> {
        let sql = format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE id = ?1");
        self.read(|c| Ok(rows_as(c, &sql, params![id.to_string()], snapshot_row)?.pop()))
    }

    fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        self.read(|c| match volume {
            Some(v) => rows_as(
                c,
                &format!(
                    "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE volume_id = ?1 ORDER BY rowid"
                ),
                params![v.to_string()],
                snapshot_row,
            ),
            None => rows_as(
                c,
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY rowid"),
                &[],
                snapshot_row,
            ),
        })
    }

    fn operations(&self) -> Result<Vec<Operation>> {
        let sql = format!("SELECT {OPERATION_COLS} FROM operations ORDER BY id");
        self.read(|c| rows_as(c, &sql, &[], operation_row))
    }

    fn instance(&self, id: InstanceId) -> Result<Option<Instance>> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1");
        self.read(|c| Ok(rows_as(c, &sql, params![id.to_string()], instance_row)?.pop()))
    }

    fn instances(&self) -> Result<Vec<Instance>> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances ORDER BY rowid");
        self.read(|c| rows_as(c, &sql, &[], instance_row))
    }

    fn instance_volumes(&self, id: InstanceId) -> Result<Vec<Volume>> {
        let sql = format!(
            "SELECT {} FROM volumes v JOIN attachments a ON a.volume_id = v.id WHERE a.instance_id = ?1 ORDER BY a.device",
            VOLUME_COLS
                .split(", ")
                .map(|c| format!("v.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.read(|c| load_volumes(c, &sql, params![id.to_string()]))
    }

    fn image(&self, id: ImageId) -> Result<Option<Image>> {
        let sql = format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1");
        self.read(|c| Ok(load_images(c, &sql, params![id.to_string()])?.pop()))
    }

    fn images(&self) -> Result<Vec<Image>> {
        let sql = format!("SELECT {IMAGE_COLS} FROM images ORDER BY rowid");
        self.read(|c| load_images(c, &sql, &[]))
    }

    fn backup(&self, id: BackupId) -> Result<Option<Backup>> {
        let sql = format!("SELECT {BACKUP_COLS} FROM backups WHERE id = ?1");
        self.read(|c| Ok(rows_as(c, &sql, params![id.to_string()], backup_row)?.pop()))
    }

    fn backups(&self, volume: Option<VolumeId>) -> Result<Vec<Backup>> {
        self.read(|c| match volume {
            Some(v) => rows_as(
                c,
                &format!(
                    "SELECT {BACKUP_COLS} FROM backups WHERE volume_id = ?1 ORDER BY created_at, rowid"
                ),
                params![v.to_string()],
                backup_row,
            ),
            None => rows_as(
                c,
                &format!("SELECT {BACKUP_COLS} FROM backups ORDER BY created_at, rowid"),
                &[],
                backup_row,
            ),
        })
    }

    fn history(&self, object_id: &str) -> Result<Vec<HistoryEntry>> {
        self.read(|c| {
            rows_as(
                c,
                "SELECT object, object_id, from_status, to_status, reason, at FROM status_history WHERE object_id = ?1 ORDER BY seq",
                params![object_id],
                history_row,
            )
        })
    }
}

/// Checks every [`Database`] must pass, run on each one's own tests.
#[cfg(test)]
pub(crate) mod checks {
    use super::*;
    use crate::types::VolumeStatus;

    pub(crate) fn volume(status: VolumeStatus) -> Volume {
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

    /// Attributes live and die with their object, and quotas count the default project.
    pub(crate) fn attributes_and_quotas(store: &dyn Store) {
        use crate::attrs::QuotaLimits;
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

    /// A batch whose later guard fails leaves nothing of its earlier steps.
    pub(crate) fn compare_and_set_is_all_or_nothing(store: &dyn Store) {
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

    /// Guards that read sets of rows hold under real contention, each thread on its own
    /// connection (`open` gives a new one): 16 creates against a quota of 5 volumes land
    /// exactly 5, and a volume delete guarded by "no snapshots" racing 8 snapshot inserts
    /// on it either deletes it (and no insert lands) or is refused by what landed.
    pub(crate) fn set_guards_hold_under_contention(
        open: impl Fn() -> Box<dyn Store> + Send + Sync + 'static,
    ) {
        use crate::attrs::{ObjectAttrs, QuotaLimits};
        use crate::types::{Snapshot, SnapshotStatus};
        use std::sync::{Arc, Barrier};
        let open = Arc::new(open);
        let project = format!("p-{}", uuid::Uuid::new_v4().simple());
        let barrier = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (open, barrier, project) = (open.clone(), barrier.clone(), project.clone());
                std::thread::spawn(move || {
                    let store = open();
                    let v = volume(VolumeStatus::Available);
                    barrier.wait();
                    store
                        .commit(Batch::new(vec![
                            Step::QuotaAllows {
                                project: project.clone(),
                                kind: ObjectKind::Volume,
                                limits: QuotaLimits {
                                    volumes: Some(5),
                                    snapshots: None,
                                    gigabytes: None,
                                },
                                add_bytes: v.size_bytes,
                            },
                            Step::InsertVolume(v.clone()),
                            Step::PutAttrs {
                                kind: ObjectKind::Volume,
                                id: v.id.to_string(),
                                attrs: ObjectAttrs::owned_by(&project, None),
                            },
                        ]))
                        .unwrap()
                        .is_ok()
                })
            })
            .collect();
        let landed = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(landed, 5);
        assert_eq!(open().usage(&project).unwrap().volumes, 5);

        for _ in 0..5 {
            let store = open();
            let v = volume(VolumeStatus::Available);
            store
                .commit(Batch::new(vec![Step::InsertVolume(v.clone())]))
                .unwrap()
                .unwrap();
            let barrier = Arc::new(Barrier::new(9));
            let mut threads = Vec::new();
            for i in 0..9 {
                let (open, barrier, v) = (open.clone(), barrier.clone(), v.clone());
                threads.push(std::thread::spawn(move || {
                    let store = open();
                    let steps = if i == 0 {
                        vec![Step::VolumeHasNoSnapshots(v.id), Step::DeleteVolume(v.id)]
                    } else {
                        let now = Utc::now();
                        vec![
                            Step::VolumeIn {
                                id: v.id,
                                any_of: vec![VolumeStatus::Available],
                            },
                            Step::InsertSnapshot(Snapshot {
                                id: SnapshotId::new(),
                                volume_id: v.id,
                                name: None,
                                size_bytes: v.size_bytes,
                                backend: v.backend.clone(),
                                status: SnapshotStatus::Available,
                                status_reason: None,
                                provider_location: None,
                                forced: false,
                                created_at: now,
                                updated_at: now,
                                image_id: None,
                                consistency: None,
                            }),
                        ]
                    };
                    barrier.wait();
                    // A foreign-key refusal would be an error, not a conflict: none may occur.
                    store.commit(Batch::new(steps)).unwrap().is_ok()
                }));
            }
            let ok: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let snaps = store.snapshots(Some(v.id)).unwrap().len();
            if ok[0] {
                assert_eq!(snaps, 0, "deleted with snapshots landing: {ok:?}");
                assert!(store.volume(v.id).unwrap().is_none());
            } else {
                assert!(snaps > 0);
                assert_eq!(snaps, ok.iter().skip(1).filter(|o| **o).count());
            }
        }
    }

    /// `n` handles on one database, each with its own connection(s), opened before a race
    /// so that connecting does not stagger the threads a barrier releases at once.
    fn handles(open: &dyn Fn() -> Box<dyn Store>, n: usize) -> Vec<std::sync::Arc<dyn Store>> {
        (0..n).map(|_| std::sync::Arc::from(open())).collect()
    }

    /// Commits `batches[i]` on `stores[i]`, each on its own thread, all released at once by
    /// a barrier; whether each landed. A store error fails the test: a losing batch must be
    /// refused by a guard (a conflict), never reach a constraint of the schema.
    fn commit_at_once(stores: &[std::sync::Arc<dyn Store>], batches: Vec<Batch>) -> Vec<bool> {
        let batches = batches
            .into_iter()
            .map(|b| (std::time::Duration::ZERO, b))
            .collect();
        commit_staggered(stores, batches)
    }

    /// [`commit_at_once`], each batch started its own delay after the barrier.
    fn commit_staggered(
        stores: &[std::sync::Arc<dyn Store>],
        batches: Vec<(std::time::Duration, Batch)>,
    ) -> Vec<bool> {
        use std::sync::{Arc, Barrier};
        assert_eq!(stores.len(), batches.len());
        let barrier = Arc::new(Barrier::new(batches.len()));
        let threads: Vec<_> = batches
            .into_iter()
            .zip(stores)
            .map(|((delay, batch), store)| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    std::thread::sleep(delay);
                    store.commit(batch).map(|c| c.is_ok())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| match t.join().unwrap() {
                Ok(landed) => landed,
                Err(e) => panic!("a racing batch failed instead of conflicting: {e}"),
            })
            .collect()
    }

    /// Rounds each race is run for: enough that the interleavings a missing lock lets
    /// through come up on PostgreSQL.
    const RACE_ROUNDS: usize = 40;

    /// `InstanceHasNoVolumes` holds under contention: in each round 8 deletes of 8
    /// instances (the service's batch) race 8 attaches of a volume to each (the service's
    /// batch, plus recording the instance's attributes, which is refused once the instance
    /// is gone — the service may attach to instances kiln does not know, so its batch
    /// checks no instance of its own). A delete is over in two statements, an attach takes
    /// ten: each delete starts its own fraction of an attach's time after the barrier, so
    /// that some read the attachments just as their attach commits. Of each pair exactly
    /// one lands: the instance is deleted and no volume is attached to it, or it is kept
    /// with its volume attached.
    pub(crate) fn instance_delete_holds_against_attaches(open: impl Fn() -> Box<dyn Store>) {
        use crate::types::VolumeStatus;
        let stores = handles(&open, 16);
        let store = &stores[0];
        let instance = |round: usize| {
            let now = Utc::now();
            Instance {
                id: InstanceId::new(),
                name: Some(format!("race-{round}")),
                agent: None,
                qmp: None,
                freeze_mountpoints: vec![],
                root_device: "/dev/vda".into(),
                properties: BTreeMap::new(),
                created_at: now,
                updated_at: now,
            }
        };
        let attach = |i: InstanceId, v: VolumeId| {
            Batch::new(vec![
                Step::SetVolumeStatus {
                    id: v,
                    from: vec![VolumeStatus::Available],
                    to: VolumeStatus::InUse,
                    reason: None,
                },
                Step::Attach(v, Attachment::new(i, "/dev/vdb")),
                Step::PutAttrs {
                    kind: ObjectKind::Instance,
                    id: i.to_string(),
                    attrs: ObjectAttrs::owned_by(DEFAULT_PROJECT, None),
                },
            ])
        };
        // How long an attach takes here, alone.
        let span = {
            let (i, vols) = (instance(0), [0; 3].map(|_| volume(VolumeStatus::Available)));
            let mut setup = vec![Step::InsertInstance(i.clone())];
            setup.extend(vols.iter().cloned().map(Step::InsertVolume));
            store.commit(Batch::new(setup)).unwrap().unwrap();
            let t = std::time::Instant::now();
            for v in &vols {
                store.commit(attach(i.id, v.id)).unwrap().unwrap();
            }
            t.elapsed() / 3
        };
        for round in 0..RACE_ROUNDS {
            let pairs: Vec<(Instance, Volume)> = (0..8)
                .map(|_| (instance(round), volume(VolumeStatus::Available)))
                .collect();
            let mut setup = Vec::new();
            for (i, v) in &pairs {
                setup.push(Step::InsertInstance(i.clone()));
                setup.push(Step::InsertVolume(v.clone()));
            }
            store.commit(Batch::new(setup)).unwrap().unwrap();
            // From none to two attaches' time, in 32 steps over 4 rounds.
            let delays: Vec<_> = (0..8)
                .map(|j| span * (4 * j + round % 4) as u32 / 16)
                .collect();
            let mut batches = Vec::new();
            for ((i, v), delay) in pairs.iter().zip(&delays) {
                batches.push((
                    *delay,
                    Batch::new(vec![
                        Step::InstanceHasNoVolumes(i.id),
                        Step::DeleteInstance(i.id),
                    ]),
                ));
                batches.push((std::time::Duration::ZERO, attach(i.id, v.id)));
            }
            let ok = commit_staggered(&stores, batches);
            for (j, (i, v)) in pairs.iter().enumerate() {
                let (deleted, attached) = (ok[2 * j], ok[2 * j + 1]);
                let on = store.instance_volumes(i.id).unwrap().len();
                let got = store.volume(v.id).unwrap().unwrap();
                let at = format!("round {round}, delete {:?} after the attach", delays[j]);
                assert!(
                    !(deleted && attached),
                    "{at}: instance deleted with {on} volume(s) attached to it"
                );
                assert!(deleted || attached, "{at}: neither landed");
                assert_eq!(store.instance(i.id).unwrap().is_none(), deleted, "{at}");
                if deleted {
                    assert_eq!(on, 0, "{at}");
                    assert_eq!(got.status, VolumeStatus::Available, "{at}");
                    assert!(got.attachments.is_empty(), "{at}");
                } else {
                    assert_eq!(on, 1, "{at}");
                    assert_eq!(got.status, VolumeStatus::InUse, "{at}");
                    assert_eq!(got.attachments.len(), 1, "{at}");
                    assert_eq!(got.attachments[0].instance_id, i.id, "{at}");
                }
            }
        }
    }

    /// `BackupHasNoChildren` holds under contention: 8 deletes of a backup (the batch the
    /// service's delete begins with: the guard, and `available` -> `deleting`) race 8
    /// creates of incremental backups built on it (each guarded by the base being
    /// `available`, so one that comes after the delete began is refused rather than
    /// reaching the foreign key). Either one delete begins, with no child there (nothing
    /// builds on what it will remove) — and its removal of the row then lands — or every
    /// delete is refused and exactly the children that landed are there. Never is a child
    /// left whose parent is gone.
    pub(crate) fn backup_delete_holds_against_children(open: impl Fn() -> Box<dyn Store>) {
        use crate::types::BackupStatus;
        let stores = handles(&open, 16);
        let store = &stores[0];
        let volume_id = VolumeId::new();
        let backup = |parent: Option<BackupId>| {
            let now = Utc::now();
            Backup {
                id: BackupId::new(),
                volume_id,
                snapshot_id: SnapshotId::new(),
                parent_id: parent,
                name: None,
                target: "dir:/nowhere".into(),
                status: if parent.is_some() {
                    BackupStatus::Creating
                } else {
                    BackupStatus::Available
                },
                status_reason: None,
                size_bytes: 1 << 30,
                stored_bytes: 0,
                created_at: now,
                updated_at: now,
            }
        };
        for round in 0..RACE_ROUNDS {
            let parent = backup(None);
            let p = parent.id;
            store
                .commit(Batch::new(vec![Step::InsertBackup(parent)]))
                .unwrap()
                .unwrap();
            let batches = (0..16)
                .map(|k| {
                    if k % 2 == 0 {
                        Batch::new(vec![
                            Step::BackupHasNoChildren(p),
                            Step::SetBackupStatus {
                                id: p,
                                from: vec![BackupStatus::Available, BackupStatus::Error],
                                to: BackupStatus::Deleting,
                                reason: None,
                            },
                        ])
                    } else {
                        Batch::new(vec![
                            Step::SetBackupStatus {
                                id: p,
                                from: vec![BackupStatus::Available],
                                to: BackupStatus::Available,
                                reason: None,
                            },
                            Step::InsertBackup(backup(Some(p))),
                        ])
                    }
                })
                .collect();
            let ok = commit_at_once(&stores, batches);
            let deletes = ok.iter().step_by(2).filter(|o| **o).count();
            let landed = ok.iter().skip(1).step_by(2).filter(|o| **o).count();
            assert!(
                deletes <= 1,
                "round {round}: {deletes} deletes began: {ok:?}"
            );
            let children = |store: &dyn Store| {
                store
                    .backups(Some(volume_id))
                    .unwrap()
                    .iter()
                    .filter(|b| b.parent_id == Some(p))
                    .count()
            };
            let n = children(store.as_ref());
            let status = store.backup(p).unwrap().unwrap().status;
            if deletes == 1 {
                assert_eq!(status, BackupStatus::Deleting, "round {round}: {ok:?}");
                assert_eq!(
                    n, 0,
                    "round {round}: delete of a backup began with {n} child(ren) built on it: {ok:?}"
                );
                assert_eq!(landed, 0, "round {round}: {ok:?}");
                // The delete's end (the service's, once the data is gone): the row goes.
                store
                    .commit(Batch::new(vec![Step::DeleteBackup(p)]))
                    .unwrap()
                    .unwrap();
                assert!(store.backup(p).unwrap().is_none());
            } else {
                assert_eq!(status, BackupStatus::Available, "round {round}: {ok:?}");
                // The deletes were refused because children had landed.
                assert!(landed > 0, "round {round}: nothing landed: {ok:?}");
                assert_eq!(n, landed, "round {round}: {ok:?}");
            }
            // And of every round so far: no backup builds on one that is gone.
            let all = store.backups(Some(volume_id)).unwrap();
            for b in &all {
                if let Some(parent) = b.parent_id {
                    assert!(
                        all.iter().any(|x| x.id == parent),
                        "round {round}: backup {} builds on {parent}, which is gone",
                        b.id
                    );
                }
            }
        }
    }

    /// `AttrsAre` holds under contention: in each round 16 read-modify-writes of one
    /// object's attributes (the service's `update_attrs` batch) all compare against the
    /// same value, the one read before the round (no row at all in the first): exactly one
    /// lands, and the attributes are then exactly what it wrote.
    pub(crate) fn attrs_compare_and_set_has_one_winner(open: impl Fn() -> Box<dyn Store>) {
        use crate::types::VolumeStatus;
        let stores = handles(&open, 16);
        let store = &stores[0];
        let v = volume(VolumeStatus::Available);
        let id = v.id.to_string();
        store
            .commit(Batch::new(vec![Step::InsertVolume(v)]))
            .unwrap()
            .unwrap();
        for round in 0..RACE_ROUNDS {
            let before = store.attrs(&id).unwrap();
            assert_eq!(before.is_none(), round == 0);
            let written: Vec<ObjectAttrs> = (0..16)
                .map(|k| {
                    let mut a = before.clone().unwrap_or_default();
                    a.properties.insert("writer".into(), format!("{round}-{k}"));
                    a
                })
                .collect();
            let batches = written
                .iter()
                .map(|attrs| {
                    Batch::new(vec![
                        Step::AttrsAre {
                            id: id.clone(),
                            expected: before.clone(),
                        },
                        Step::PutAttrs {
                            kind: ObjectKind::Volume,
                            id: id.clone(),
                            attrs: attrs.clone(),
                        },
                    ])
                })
                .collect();
            let ok = commit_at_once(&stores, batches);
            let winners: Vec<usize> = (0..16).filter(|k| ok[*k]).collect();
            assert_eq!(
                winners.len(),
                1,
                "round {round}: {} compare-and-sets from one value landed: {ok:?}",
                winners.len()
            );
            assert_eq!(
                store.attrs(&id).unwrap().as_ref(),
                Some(&written[winners[0]]),
                "round {round}"
            );
        }
    }
}
