//! Snapshot several volumes as one unit (the base of instance snapshots): all or nothing.
//!
//! Journal shape: one *parent* entry (kind `group_snapshot`) that names every member
//! (volume, planned snapshot id) and the rule its recovery follows, written in the same
//! transaction as every member's `creating` record; then one *child* entry per member
//! (kind `create_snapshot`, `parent` set) just before that member's driver call, so recovery
//! knows which members may have reached the backend.
//!
//! Members are grouped per backend and the backends work concurrently; each backend gets
//! its members in one `create_group_snapshot` call (a backend with a native group
//! primitive takes them at one instant). If any member fails, the members that succeeded
//! are deleted again and no record is left: the caller gets the first failure.
//!
//! Recovery rule: **roll back**. A group interrupted by a crash is not a consistent set
//! (some members may be missing), so every member the backend made is deleted and every
//! record removed; the outcome says, per member, what was found.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Ctx, conflict_error, create_snapshot};
use std::sync::Arc;

use crate::driver::{GroupMember, GroupOutcome, WindowedSnapshots};
use crate::error::{Error, Result};
use crate::locks::LockKey;
use crate::store::{NewOp, OpId, Operation, Step};
use crate::types::{
    DeleteAction, ProviderUpdate, Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeId,
    VolumeStatus,
};
use crate::validate::validate_label;

/// Journal kind of the parent.
pub(crate) const KIND: &str = "group_snapshot";

/// Most volumes in one group: far more than any server attaches (Nova's limit is 26 per
/// bus), small enough that one journal entry and one freeze window stay bounded.
pub const MAX_MEMBERS: usize = 256;

/// How recovery resolves an interrupted group (stored in the parent's payload, so a
/// later kiln applies the rule the writer declared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Rule {
    /// Delete every member that was made; remove every record.
    RollBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    volume: VolumeId,
    snapshot: SnapshotId,
}

/// The parent's journal payload. Operations built on a group (instance snapshots) add
/// their own fields beside these.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    rule: Rule,
    members: Vec<Member>,
}

/// A group whose parent is journaled and whose members are recorded `creating`.
pub(crate) struct Planned {
    /// The parent journal entry.
    pub(crate) parent: OpId,
    /// Each member's new snapshot record and its volume.
    pub(crate) members: Vec<(Snapshot, Volume)>,
}

/// What taking the members gave: the snapshots made, and the first failure if any.
pub(crate) struct Taken {
    /// Members the backend made, with their locations.
    pub(crate) made: Vec<(Snapshot, ProviderUpdate)>,
    /// The first failure (naming the volume and backend).
    pub(crate) error: Option<Error>,
    /// Whether every member was cut by one native group primitive (one backend that has it).
    pub(crate) one_instant: bool,
}

/// Checks a group's volume list: 1 to [`MAX_MEMBERS`] distinct volumes.
pub(crate) fn check_members(volumes: &[VolumeId]) -> Result<Vec<VolumeId>> {
    let mut ids = volumes.to_vec();
    ids.sort();
    ids.dedup();
    if ids.is_empty() || ids.len() > MAX_MEMBERS || ids.len() != volumes.len() {
        return Err(Error::invalid(
            "volumes",
            format!("a group needs 1 to {MAX_MEMBERS} distinct volumes"),
        ));
    }
    Ok(ids)
}

/// Records every member `creating` and journals the parent (`kind`, with `extra` fields in
/// its payload) in one batch; the caller holds every member's lock.
pub(crate) async fn begin(
    ctx: &Ctx,
    kind: &'static str,
    vols: Vec<Volume>,
    name: Option<String>,
    force: bool,
    extra: serde_json::Map<String, serde_json::Value>,
    owner: Option<&crate::attrs::Owner>,
) -> Result<Planned> {
    let (allowed, needed) = if force {
        (
            vec![VolumeStatus::Available, VolumeStatus::InUse],
            "available or in-use",
        )
    } else {
        (
            vec![VolumeStatus::Available],
            "available (use --force for attached volumes)",
        )
    };
    let members: Vec<(Snapshot, Volume)> = vols
        .into_iter()
        .map(|v| (create_snapshot::new_record(&v, name.clone()), v))
        .collect();
    let Some(first) = members.first().map(|(_, v)| v.id) else {
        return Err(Error::invalid(
            "volumes",
            "a group needs at least one volume",
        ));
    };
    let payload = Payload {
        rule: Rule::RollBack,
        members: members
            .iter()
            .map(|(s, v)| Member {
                volume: v.id,
                snapshot: s.id,
            })
            .collect(),
    };
    let mut payload = serde_json::to_value(&payload).map_err(Error::store)?;
    if let serde_json::Value::Object(m) = &mut payload {
        m.extend(extra);
    }
    let mut steps = Vec::new();
    for (s, v) in &members {
        steps.push(Step::VolumeIn {
            id: v.id,
            any_of: allowed.clone(),
        });
        // With an owner: each member's quota guard, insert and attributes, in order, so
        // every guard counts the members inserted before it.
        steps.extend(crate::attrs::Owner::insert_steps(
            owner,
            crate::attrs::ObjectKind::Snapshot,
            s.id.to_string(),
            s.size_bytes,
            Step::InsertSnapshot(s.clone()),
        ));
    }
    let parent = ctx
        .begin(steps, NewOp::of(kind, first, None).payload(payload), |c| {
            conflict_error(c, "snapshot the group", needed)
        })
        .await?;
    Ok(Planned { parent, members })
}

/// Journals one child entry per member, all in one durable commit, before any member's
/// driver call: recovery then treats every member as possibly made (a member that was not
/// is reported "not made" by its idempotent delete). Done before a freeze, so the window
/// holds no store commit of the members.
pub(crate) async fn journal_children(ctx: &Ctx, p: &Planned) -> Result<()> {
    let mut children = p.members.iter().map(|(s, v)| NewOp {
        parent: Some(p.parent),
        ..NewOp::of(create_snapshot::KIND, v.id, Some(s.id))
    });
    let Some(first) = children.next() else {
        return Ok(());
    };
    let mut batch = crate::store::Batch::with_op(vec![], first);
    batch.also = children.collect();
    ctx.store
        .commit(batch)
        .await?
        .map(drop)
        .map_err(|c| conflict_error(&c, "snapshot the group", "available or in-use"))
}

/// Members cut inside a window, waiting for their backend's [`WindowedSnapshots::finish`].
pub(crate) struct Cut {
    /// Members the backend made in full (backends without the two-step capability).
    made: Vec<(Snapshot, ProviderUpdate)>,
    /// Per backend: its two-step capability and its members that were cut.
    pending: Vec<(Arc<dyn WindowedSnapshots>, Vec<GroupMember>)>,
    /// The first failure.
    error: Option<Error>,
    one_instant: bool,
}

/// The part of taking every member that must happen inside a freeze window (their children
/// must be journaled, see [`journal_children`]): per backend concurrently, a backend with
/// the two-step capability only *cuts* its members ([`WindowedSnapshots::cut`]); any other
/// takes them whole, in one `create_group_snapshot` call.
pub(crate) async fn cut(ctx: &Ctx, p: &Planned) -> Cut {
    let mut by_backend: BTreeMap<String, Vec<GroupMember>> = BTreeMap::new();
    for (s, v) in &p.members {
        let a = (v.status == VolumeStatus::InUse)
            .then(|| v.attachments.first().cloned())
            .flatten();
        by_backend
            .entry(v.backend.clone())
            .or_default()
            .push((s.clone(), v.clone(), a));
    }
    let backends = by_backend.len();
    let per_backend = by_backend.into_iter().map(|(backend, group)| async move {
        let r: Result<Phase> = async {
            let driver = ctx.driver(&backend).await?;
            if let Some(w) = driver.windowed() {
                let (w2, g) = (w.clone(), group.clone());
                let results = ctx
                    .drive(KIND, async {
                        tokio::task::spawn_blocking(move || w2.cut(&g))
                            .await
                            .map_err(|e| Error::backend("snapshot", format!("worker failed: {e}")))
                    })
                    .await?;
                return Ok(Phase::Cut(w, results));
            }
            let group_primitive = driver.capabilities().group_snapshot;
            let results = ctx
                .drive(KIND, driver.create_group_snapshot(&group))
                .await?;
            Ok(Phase::Made(results, group_primitive))
        }
        .await
        .map_err(|e: Error| {
            let vols: Vec<String> = group.iter().map(|(_, v, _)| v.id.to_string()).collect();
            e.with_backend(backend.clone())
                .about(format!("volume {} (backend {backend})", vols.join(", ")))
        });
        (group, r)
    });
    let mut out = Cut {
        made: Vec::new(),
        pending: Vec::new(),
        error: None,
        one_instant: backends == 1,
    };
    for (group, r) in futures::future::join_all(per_backend).await {
        match r {
            Ok(Phase::Made(results, group_primitive)) => {
                out.one_instant &= group_primitive;
                for ((s, v, _), r) in group.into_iter().zip(results) {
                    match r {
                        Ok(u) => out.made.push((s, u)),
                        Err(e) => out.fail(e, &v),
                    }
                }
            }
            Ok(Phase::Cut(w, results)) => {
                out.one_instant = false;
                let mut cut = Vec::new();
                for (m, r) in group.into_iter().zip(results) {
                    match r {
                        Ok(()) => cut.push(m),
                        Err(e) => out.fail(e, &m.1),
                    }
                }
                out.pending.push((w, cut));
            }
            Err(e) => {
                out.error.get_or_insert(e);
            }
        }
    }
    out
}

/// What one backend did inside the window.
enum Phase {
    Made(GroupOutcome, bool),
    Cut(Arc<dyn WindowedSnapshots>, Vec<Result<()>>),
}

impl Cut {
    fn fail(&mut self, e: Error, v: &Volume) {
        self.error.get_or_insert(
            e.with_object(format!("volume {}", v.id))
                .with_backend(v.backend.clone())
                .about(format!("volume {} (backend {})", v.id, v.backend)),
        );
    }
}

/// After the window: finishes every cut member (durability, renames) and returns what was
/// made. Cut members are finished even when another member failed, so the rollback finds
/// ordinary snapshots to delete.
pub(crate) async fn finish(mut cut: Cut) -> Taken {
    for (w, members) in std::mem::take(&mut cut.pending) {
        let m2 = members.clone();
        let results = tokio::task::spawn_blocking(move || w.finish(&m2))
            .await
            .map_err(|e| Error::backend("snapshot", format!("worker failed: {e}")));
        match results {
            Ok(results) => {
                for ((s, v, _), r) in members.into_iter().zip(results) {
                    match r {
                        Ok(u) => cut.made.push((s, u)),
                        Err(e) => cut.fail(e, &v),
                    }
                }
            }
            Err(e) => {
                cut.error.get_or_insert(e);
            }
        }
    }
    Taken {
        made: cut.made,
        error: cut.error,
        one_instant: cut.one_instant,
    }
}

/// Takes every member with no window to respect: [`cut`] then [`finish`].
pub(crate) async fn take(ctx: &Ctx, p: &Planned) -> Taken {
    finish(cut(ctx, p).await).await
}

/// The steps that mark every made member `available` at its location and finish the
/// parent and its children (the caller adds its own steps to the same batch).
pub(crate) fn success_steps(p: &Planned, made: &[(Snapshot, ProviderUpdate)]) -> Vec<Step> {
    let mut steps = Vec::new();
    for (s, u) in made {
        steps.push(Step::SetSnapshotStatus {
            id: s.id,
            from: vec![SnapshotStatus::Creating],
            to: SnapshotStatus::Available,
            reason: None,
        });
        steps.push(Step::SetSnapshotLocation(s.id, u.provider_location.clone()));
    }
    steps.push(Step::FinishChildren(p.parent));
    steps.push(Step::FinishOp(p.parent));
    steps
}

/// All or nothing: deletes every made member again and removes every record, finishing
/// the parent. A member whose removal fails stays recorded in `error`, so nothing is left
/// untracked.
pub(crate) async fn roll_back(
    ctx: &Ctx,
    p: &Planned,
    made: &[(Snapshot, ProviderUpdate)],
    why: &str,
) -> Result<()> {
    let mut steps = Vec::new();
    for (s, _) in made {
        if let Err(cleanup) = async { ctx.driver(&s.backend).await?.delete_snapshot(s).await }.await
        {
            steps.push(Step::SetSnapshotStatus {
                id: s.id,
                from: vec![],
                to: SnapshotStatus::Error,
                reason: Some(format!(
                    "{why}; removing this member failed too ({cleanup})"
                )),
            });
        }
    }
    for (s, _) in &p.members {
        if !steps
            .iter()
            .any(|st| matches!(st, Step::SetSnapshotStatus { id, .. } if *id == s.id))
        {
            steps.push(Step::DeleteSnapshot(s.id));
        }
    }
    steps.push(Step::FinishChildren(p.parent));
    steps.push(Step::FinishOp(p.parent));
    ctx.finish(steps).await
}

/// Snapshots every volume in `volumes` as one unit (see the module docs). `force` allows
/// attached members (taken as forced snapshots).
pub(crate) async fn run(
    ctx: &Ctx,
    volumes: &[VolumeId],
    name: Option<String>,
    force: bool,
) -> Result<Vec<Snapshot>> {
    if let Some(n) = &name {
        validate_label(n)?;
    }
    let ids = check_members(volumes)?;
    for id in &ids {
        ctx.volume(*id).await?;
    }
    ctx.locked(ids.iter().map(|id| LockKey::from(*id)), async {
        let mut vols = Vec::with_capacity(volumes.len());
        for id in volumes {
            vols.push(ctx.volume(*id).await?);
        }
        let p = begin(ctx, KIND, vols, name, force, serde_json::Map::new(), None).await?;
        if let Err(e) = journal_children(ctx, &p).await {
            roll_back(ctx, &p, &[], &format!("group snapshot failed ({e})")).await?;
            return Err(e);
        }
        let taken = take(ctx, &p).await;
        match taken.error {
            None => {
                ctx.finish(success_steps(&p, &taken.made)).await?;
                let mut out = Vec::with_capacity(p.members.len());
                for (s, _) in &p.members {
                    out.push(ctx.snapshot(s.id).await?);
                }
                Ok(out)
            }
            Some(e) => {
                roll_back(
                    ctx,
                    &p,
                    &taken.made,
                    &format!("group snapshot failed ({e})"),
                )
                .await?;
                Err(e)
            }
        }
    })
    .await
}

/// The volumes a group's recovery must lock (every member's).
pub(crate) fn lock_keys(op: &Operation) -> Vec<LockKey> {
    serde_json::from_value::<Payload>(op.payload.clone())
        .map(|p| p.members.iter().map(|m| LockKey::from(m.volume)).collect())
        .unwrap_or_else(|_| vec![LockKey::from(op.volume_id)])
}

/// Recovery: applies the parent's rule to the group as one unit. A backend that cannot
/// answer now leaves the whole group journaled (nothing is half-resolved: the store
/// changes in one batch at the end).
pub(crate) async fn recover(ctx: &Ctx, op: &Operation, children: &[Operation]) -> Result<String> {
    let (mut steps, report) = roll_back_recovered(ctx, op, children).await?;
    steps.push(Step::FinishChildren(op.id));
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(format!("group snapshot {report}"))
}

/// The rollback of an interrupted group (the steps, without finishing the parent) and a
/// report of what was found per member.
pub(crate) async fn roll_back_recovered(
    ctx: &Ctx,
    op: &Operation,
    children: &[Operation],
) -> Result<(Vec<Step>, String)> {
    let payload: Payload = serde_json::from_value(op.payload.clone())
        .map_err(|e| Error::store(format!("group snapshot journal entry {}: {e}", op.id.0)))?;
    let Rule::RollBack = payload.rule;
    let mut steps = Vec::new();
    let mut report = Vec::new();
    for m in &payload.members {
        let started = children.iter().any(|c| c.snapshot_id == Some(m.snapshot));
        let Some(s) = ctx.store.snapshot(m.snapshot).await? else {
            report.push(format!("{}: no record", m.snapshot));
            continue;
        };
        if !started {
            // Its driver call never began: nothing can exist on the backend.
            report.push(format!("{}: never started", m.snapshot));
            steps.push(Step::DeleteSnapshot(s.id));
            continue;
        }
        let driver = ctx.driver(&s.backend).await?;
        match driver.delete_snapshot(&s).await {
            Ok(DeleteAction::Deleted) => {
                report.push(format!("{}: made, deleted", m.snapshot));
                steps.push(Step::DeleteSnapshot(s.id));
            }
            Ok(DeleteAction::AlreadyGone) => {
                report.push(format!("{}: not made", m.snapshot));
                steps.push(Step::DeleteSnapshot(s.id));
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                report.push(format!("{}: could not be deleted ({e})", m.snapshot));
                steps.push(Step::SetSnapshotStatus {
                    id: s.id,
                    from: vec![],
                    to: SnapshotStatus::Error,
                    reason: Some(format!(
                        "group snapshot interrupted by a crash; removing this member failed: {e}"
                    )),
                });
            }
        }
    }
    Ok((
        steps,
        format!(
            "of {} volume(s) rolled back: {}",
            payload.members.len(),
            report.join("; ")
        ),
    ))
}
