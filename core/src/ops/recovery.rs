//! Crash recovery: finds journaled operations whose owner is gone (their locks are free,
//! and on a shared store its node's heartbeat has stopped) and hands each to its own
//! operation's `recover`. Children of a multi-volume operation
//! are never recovered alone: their parent resolves them as one unit.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    Ctx, backup, clone, create_snapshot, create_volume, delete_snapshot, delete_volume, flatten,
    group_snapshot, image_restore, instance_snapshot, restore, revert,
};
use crate::error::{Error, Result};
use crate::locks::LockKey;
use crate::store::{OpId, Operation};

/// What recovery did with one unfinished operation.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryAction {
    /// The operation found in the journal.
    pub operation: Operation,
    /// Its child steps, for a multi-volume operation.
    pub children: Vec<Operation>,
    /// What was done about it.
    pub outcome: String,
}

/// The locks a journaled operation's owner held (all of them must be free to recover it).
fn lock_keys(op: &Operation, children: &[Operation]) -> Vec<LockKey> {
    let mut keys = match op.kind.as_str() {
        group_snapshot::KIND => group_snapshot::lock_keys(op),
        instance_snapshot::KIND => instance_snapshot::lock_keys(op),
        image_restore::KIND => image_restore::lock_keys(op),
        _ => vec![LockKey::from(op.volume_id)],
    };
    keys.extend(children.iter().map(|c| LockKey::from(c.volume_id)));
    keys
}

/// The one dispatch from a journal kind to its operation's recovery.
async fn recover_one(ctx: &Ctx, op: &Operation, children: &[Operation]) -> Result<String> {
    match op.kind.as_str() {
        create_volume::KIND | clone::KIND => create_volume::recover(ctx, op).await,
        create_snapshot::KIND => create_snapshot::recover(ctx, op).await,
        delete_snapshot::KIND => delete_snapshot::recover(ctx, op).await,
        delete_volume::KIND => delete_volume::recover(ctx, op).await,
        revert::KIND => revert::recover(ctx, op).await,
        flatten::KIND => flatten::recover(ctx, op).await,
        restore::KIND => restore::recover(ctx, op).await,
        backup::CREATE => backup::recover_create(ctx, op).await,
        backup::DELETE => backup::recover_delete(ctx, op).await,
        group_snapshot::KIND => group_snapshot::recover(ctx, op, children).await,
        instance_snapshot::KIND => instance_snapshot::recover(ctx, op, children).await,
        image_restore::KIND => image_restore::recover(ctx, op, children).await,
        other => Err(Error::store(format!(
            "journal entry {} has unknown kind {other:?} (written by a newer kiln?); left as it is",
            op.id.0
        ))),
    }
}

/// Before taking over an operation of another (dead) incarnation: cuts that incarnation
/// off from the backends of the operation's volumes ([`VolumeDriver::fence`]), once per
/// incarnation and backend in this process. A dead process holds nothing there, but what
/// it left (a Ceph client's watches on the images it had open) would hold the recovery up
/// until the backend's own timeout; and one that is only stalled could otherwise write
/// again when it resumes. Best effort: a failure is logged and recovery goes on as it
/// would without it (the backend's own timeouts then apply).
async fn fence_owner(ctx: &Ctx, op: &Operation, kids: &[Operation]) {
    static FENCED: std::sync::Mutex<BTreeSet<(String, String)>> =
        std::sync::Mutex::new(BTreeSet::new());
    let Some(owner) = op
        .owner
        .as_deref()
        .filter(|o| *o != crate::node::incarnation())
    else {
        return;
    };
    let handles = match ctx.locks.fences_of(owner).await {
        Ok(h) if !h.is_empty() => h,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(owner, error = %e, "cannot read a dead owner's fence handles");
            return;
        }
    };
    let mut backends = BTreeSet::new();
    for v in std::iter::once(op).chain(kids).map(|o| o.volume_id) {
        if let Ok(Some(vol)) = ctx.store.volume(v).await {
            backends.insert(vol.backend);
        }
    }
    for backend in backends {
        let key = (owner.to_string(), backend.clone());
        if FENCED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            continue;
        }
        let fenced = match ctx.driver(&backend).await {
            Ok(d) => d.fence(&handles).await,
            Err(e) => Err(e),
        };
        match fenced {
            // Only a fence that cut something off is remembered: one that found nothing
            // to do (this node has no client there yet) is tried again next time.
            Ok(done) if !done.is_empty() => {
                tracing::warn!(owner, backend = %backend, fenced = ?done, "fenced a dead kiln process off the backend before taking its operations over");
                FENCED.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(owner, backend = %backend, error = %e, "cannot fence a dead kiln process off the backend; recovering without it")
            }
        }
    }
}

/// Recovers `op` (and its `kids`) once its owner's locks are held.
async fn recover_locked(
    ctx: &Ctx,
    op: Operation,
    kids: Vec<Operation>,
) -> Result<Option<RecoveryAction>> {
    // Re-check under the locks: the owner may have finished just before we took them.
    if !ctx.store.operations().await?.iter().any(|o| o.id == op.id) {
        return Ok(None);
    }
    fence_owner(ctx, &op, &kids).await;
    match recover_one(ctx, &op, &kids).await {
        Ok(outcome) => {
            tracing::warn!(op = %op.kind, volume = %op.volume_id, snapshot = ?op.snapshot_id, children = kids.len(), outcome = %outcome, "recovered an unfinished operation");
            Ok(Some(RecoveryAction {
                operation: op,
                children: kids,
                outcome,
            }))
        }
        // Keep the journal entry rather than guess, and let kiln serve other objects.
        Err(e) => {
            tracing::warn!(op = %op.kind, volume = %op.volume_id, error = %e, kind = e.kind().as_str(), "cannot recover this operation yet; it stays journaled for the next run");
            Ok(None)
        }
    }
}

/// Resolves every journaled operation whose owner is gone. Operations still held by a live
/// owner are left alone, and so are those whose backend or store cannot answer right now:
/// they stay journaled for the next run, and the error is logged.
pub(crate) async fn recover(ctx: &Ctx) -> Result<Vec<RecoveryAction>> {
    let ops = ctx.store.operations().await?;
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let known: Vec<OpId> = ops.iter().map(|o| o.id).collect();
    let mut children: BTreeMap<OpId, Vec<Operation>> = BTreeMap::new();
    let mut roots = Vec::new();
    for op in ops {
        match op.parent {
            // A child whose parent is gone cannot happen (they are written and removed in
            // the same transactions); recover it on its own rather than leave it forever.
            Some(p) if known.contains(&p) => children.entry(p).or_default().push(op),
            _ => roots.push(op),
        }
    }
    let mut actions = Vec::new();
    for op in roots {
        let kids = children.remove(&op.id).unwrap_or_default();
        // A live owner whose lock sessions were cut (a PostgreSQL restart) is still
        // working on it, or will find it in its own next recovery.
        if ctx.locks.owner_alive(op.owner.as_deref()).await? {
            continue;
        }
        let Some(locks) = ctx.locks.try_lock(&lock_keys(&op, &kids)).await? else {
            continue;
        };
        // Released before the next one is looked at, so a caller told what recovery did
        // finds those locks free on every node.
        if let Some(action) = Ctx::holding(locks, recover_locked(ctx, op, kids)).await? {
            actions.push(action);
        }
    }
    Ok(actions)
}
