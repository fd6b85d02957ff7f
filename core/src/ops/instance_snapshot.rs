//! Snapshot a whole instance: every attached volume inside one bounded freeze window, then
//! a metadata-only image whose `block_device_mapping` lists the snapshots (Nova's
//! `snapshot_volume_backed`, without its defects).
//!
//! 1. journal the parent (a group over every attached volume, plus the instance and its
//!    agent) with every member `creating`;
//! 2. freeze through the guest agent under a guard process ([`crate::agent`]) — unless
//!    `--quiesce off`, or `auto` and no agent answers;
//! 3. take every member concurrently (per backend; a backend's native group primitive
//!    takes its members at one instant);
//! 4. thaw — always; the guard also thaws at the deadline and when kiln dies. A member
//!    finishing after a deadline thaw is not inside the window: the whole operation rolls
//!    back;
//! 5. all or nothing: any failure deletes every member made and records no image;
//! 6. one batch records the snapshots `available`, their image and consistency, and the
//!    image.
//!
//! Recovery rule: thaw the guest if the agent says it is frozen, then roll the group back
//! (a crash leaves no image — the image is written only by step 6's single batch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::{Ctx, group_snapshot};
use crate::agent::{FreezeRequest, Frozen, GuestAgents};
use crate::crash::{crash_point, crash_point_async};
use crate::error::{Error, ErrorKind, Result};
use crate::instance::{Image, ImageStatus, Instance, bdm_entry, image_properties, size_gib};
use crate::locks::LockKey;
use crate::store::{Operation, Step};
use crate::types::{Consistency, ImageId, InstanceId, Volume};
use crate::validate::{validate_label, validate_properties};

/// Journal kind of the parent.
pub(crate) const KIND: &str = "instance_snapshot";

/// Shortest and longest freeze deadline accepted. Windows VSS gives up after 10 s, the
/// default; minutes of frozen filesystems stall guest applications, so more is refused.
pub const MIN_FREEZE_TIMEOUT: Duration = Duration::from_millis(10);
/// See [`MIN_FREEZE_TIMEOUT`].
pub const MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default freeze deadline.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for one answer of a guest agent (sync, freeze) before it counts as down.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether to freeze the guest's filesystems first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesce {
    /// Freeze when the instance has an agent that answers; otherwise crash-consistent.
    Auto,
    /// Freeze, or fail.
    Required,
    /// Never freeze.
    Off,
}

/// What `instance snapshot` needs.
#[derive(Debug, Clone)]
pub struct InstanceSnapshotRequest {
    /// The instance.
    pub instance: InstanceId,
    /// Image name.
    pub name: String,
    /// Freeze policy.
    pub quiesce: Quiesce,
    /// The freeze deadline.
    pub freeze_timeout: Duration,
    /// Extra image properties (beside the instance's own).
    pub properties: BTreeMap<String, String>,
    /// The project the image and its snapshots belong to (recorded in the batch that
    /// records the image); `None`: the default project.
    pub owner: Option<crate::attrs::Owner>,
}

/// What an instance snapshot produced, and how long its parts took.
#[derive(Debug, Clone)]
pub struct InstanceSnapshotReport {
    /// The recorded image.
    pub image: Image,
    /// Freeze to thaw as the guard measured it (ms), when the guest was frozen.
    pub window_ms: Option<f64>,
    /// Taking (or, on backends with two-step snapshots, cutting) every member inside the
    /// window, first start to last end (ms): the part of the window the backends take.
    pub members_ms: f64,
    /// The freeze request's round trip (ms), when the guest was frozen.
    pub freeze_ms: Option<f64>,
    /// The thaw request's round trip (ms), when the guest was frozen.
    pub thaw_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Extra {
    instance: InstanceId,
    agent: Option<String>,
}

/// The instance record, or — for an id only attachments know (volumes attached to an
/// instance never created with `instance create`) — a bare one without an agent.
pub(crate) async fn instance_or_bare(ctx: &Ctx, id: InstanceId) -> Result<(Instance, bool)> {
    if let Some(i) = ctx.store.instance(id).await? {
        return Ok((i, true));
    }
    let now = Utc::now();
    Ok((
        Instance {
            id,
            name: None,
            agent: None,
            qmp: None,
            freeze_mountpoints: vec![],
            root_device: "/dev/vda".into(),
            properties: BTreeMap::new(),
            created_at: now,
            updated_at: now,
        },
        false,
    ))
}

/// Checks the volumes of an instance: at least one, no device name twice.
fn check_volumes(id: InstanceId, vols: &[Volume], known: bool) -> Result<()> {
    if vols.is_empty() {
        return Err(if known {
            Error::invalid(
                "instance",
                format!("instance {id} has no volumes attached; nothing to snapshot"),
            )
        } else {
            Error::not_found("instance", id)
        });
    }
    let mut devices: Vec<&str> = vols
        .iter()
        .filter_map(|v| v.attachments.first().map(|a| a.device.as_str()))
        .collect();
    devices.sort();
    if let Some(w) = devices.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::invalid(
            "instance",
            format!(
                "instance {id} has two volumes at {}; detach one first",
                w[0]
            ),
        ));
    }
    Ok(())
}

/// Checks a request before anything is opened: name, properties, freeze deadline range.
pub fn check_request(req: &InstanceSnapshotRequest) -> Result<()> {
    validate_label(&req.name)?;
    validate_properties(&req.properties)?;
    if req.freeze_timeout < MIN_FREEZE_TIMEOUT || req.freeze_timeout > MAX_FREEZE_TIMEOUT {
        return Err(Error::invalid(
            "freeze timeout",
            format!(
                "{:?} is outside {:?}..={:?}",
                req.freeze_timeout, MIN_FREEZE_TIMEOUT, MAX_FREEZE_TIMEOUT
            ),
        ));
    }
    Ok(())
}

/// Freezes per the policy: `Ok(None)` when the snapshot goes ahead unfrozen.
async fn freeze(
    agents: Option<&Arc<dyn GuestAgents>>,
    inst: &Instance,
    req: &InstanceSnapshotRequest,
) -> Result<Option<Box<dyn Frozen>>> {
    if req.quiesce == Quiesce::Off {
        return Ok(None);
    }
    let (Some(agent), Some(agents)) = (&inst.agent, agents) else {
        return match req.quiesce {
            Quiesce::Required => Err(Error::wrong_state(format!(
                "cannot quiesce instance {}: it has no guest agent (instance create --agent)",
                inst.id
            ))),
            _ => Ok(None),
        };
    };
    let r = agents
        .freeze(FreezeRequest {
            agent: agent.clone(),
            mountpoints: inst.freeze_mountpoints.clone(),
            deadline: req.freeze_timeout,
            timeout: AGENT_TIMEOUT.min(req.freeze_timeout.max(Duration::from_secs(1))),
        })
        .await;
    match r {
        Ok(f) => Ok(Some(f)),
        Err(e) if req.quiesce == Quiesce::Auto && e.kind() == ErrorKind::Unavailable => {
            tracing::warn!(instance = %inst.id, error = %e, "guest agent not answering; taking a crash-consistent snapshot");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The snapshot of an instance (see the module docs); returns the image.
pub(crate) async fn run(ctx: &Ctx, req: InstanceSnapshotRequest) -> Result<InstanceSnapshotReport> {
    check_request(&req)?;
    let (inst, known) = instance_or_bare(ctx, req.instance).await?;
    let vols = ctx.store.instance_volumes(inst.id).await?;
    check_volumes(inst.id, &vols, known)?;
    let mut keys = vec![LockKey::Instance(inst.id)];
    keys.extend(vols.iter().map(|v| LockKey::from(v.id)));
    ctx.locked(keys.clone(), async {
    // Under the locks: the attachments may have changed meanwhile.
    let vols = ctx.store.instance_volumes(inst.id).await?;
    check_volumes(inst.id, &vols, known)?;
    if vols.iter().any(|v| !keys.contains(&LockKey::from(v.id))) {
        return Err(Error::busy(
            format!(
                "instance {}: its volumes changed while kiln waited for them; try again",
                inst.id
            ),
            vec![],
        ));
    }
    let extra = serde_json::to_value(Extra {
        instance: inst.id,
        agent: inst.agent.clone(),
    })
    .map_err(Error::store)?;
    let serde_json::Value::Object(extra) = extra else {
        return Err(Error::store("instance snapshot payload is not an object"));
    };
    // The members belong to the owner (and count against its quota) from the start.
    let p = group_snapshot::begin(
        ctx,
        KIND,
        vols,
        Some(req.name.clone()),
        true,
        extra,
        req.owner.as_ref(),
    )
    .await?;
    // Every member's journal entry before the freeze: the window holds no store commit.
    if let Err(e) = group_snapshot::journal_children(ctx, &p).await {
        group_snapshot::roll_back(ctx, &p, &[], "the members could not be journaled").await?;
        return Err(e);
    }
    // Open every backend and let each prepare its members before the freeze (backends
    // open lazily; an RBD image handle opens on first use): the window holds only the
    // members' own snapshot calls.
    let prepared = futures::future::join_all(p.members.iter().map(|(_, v)| async move {
        ctx.driver(&v.backend)
            .await?
            .prepare_snapshot(v)
            .await
            .map_err(|e| e.about(format!("volume {} (backend {})", v.id, v.backend)))
    }))
    .await;
    if let Some(e) = prepared.into_iter().find_map(Result::err) {
        group_snapshot::roll_back(ctx, &p, &[], "a member could not be prepared").await?;
        return Err(e);
    }
    let frozen = match freeze(ctx.agents.as_ref(), &inst, &req).await {
        Ok(f) => f,
        Err(e) => {
            group_snapshot::roll_back(ctx, &p, &[], "the guest could not be frozen").await?;
            return Err(e);
        }
    };
    if let Some(f) = &frozen {
        // Tests read these two lines' timestamps to check that the cut is inside the window.
        tracing::info!(instance = %inst.id, filesystems = f.count(), "guest frozen");
    }
    crash_point(KIND, "after_freeze");
    let started = Instant::now();
    let cut = group_snapshot::cut(ctx, &p).await;
    let took_ms = started.elapsed().as_secs_f64() * 1e3;
    crash_point_async(KIND, "after_members").await;
    let quiesced = frozen.is_some();
    let freeze_ms = frozen.as_ref().map(|f| f.freeze_ms());
    let mut thaw_ms = None;
    let thawed = match frozen {
        Some(f) => {
            tracing::info!(instance = %inst.id, "guest thawing");
            Some(f.thaw().await)
        }
        None => None,
    };
    let window = match thawed {
        Some(t) => match t {
            Ok(t) if t.by_deadline => Err(Error::backend(
                "instance snapshot",
                format!(
                    "the snapshots took {took_ms:.0} ms, past the {} ms freeze deadline: the guest \
                     was thawed at the deadline, so they are not consistent; they were deleted",
                    req.freeze_timeout.as_millis()
                ),
            )),
            Ok(t) => {
                thaw_ms = Some(t.thaw_ms);
                Ok(Some(t.window_ms))
            }
            Err(e) => Err(e),
        },
        None => Ok(None),
    };
    crash_point(KIND, "after_thaw");
    // Durability (fsyncs, renames) of the members cut inside the window, after the thaw.
    let taken = group_snapshot::finish(cut).await;
    let window = match (taken.error, window) {
        (None, Ok(w)) => w,
        (Some(e), _) | (None, Err(e)) => {
            group_snapshot::roll_back(
                ctx,
                &p,
                &taken.made,
                &format!("instance snapshot failed ({e})"),
            )
            .await?;
            return Err(e);
        }
    };
    let consistency = if quiesced {
        Consistency::Quiesced
    } else if taken.one_instant {
        Consistency::CrashConsistentGroup
    } else {
        Consistency::CrashConsistent
    };
    crash_point(KIND, "before_image");
    let image = build_image(&inst, &req, &p.members, consistency, window)?;
    let mut steps = vec![Step::InsertImage(image.clone())];
    for (s, _) in &p.members {
        steps.push(Step::SetSnapshotImage {
            id: s.id,
            image: Some(image.id),
            consistency: Some(consistency),
        });
    }
    steps.extend(group_snapshot::success_steps(&p, &taken.made));
    if let Some(owner) = &req.owner {
        steps.push(Step::PutAttrs {
            kind: crate::attrs::ObjectKind::Image,
            id: image.id.to_string(),
            attrs: owner.attrs.clone(),
        });
    }
    ctx.finish(steps).await?;
    let image = ctx.store.image(image.id).await?.ok_or_else(|| {
        Error::store(format!("image {} vanished after it was recorded", image.id))
    })?;
    Ok(InstanceSnapshotReport {
        image,
        window_ms: window,
        members_ms: took_ms,
        freeze_ms,
        thaw_ms,
    })
    })
    .await
}

/// The image record: Nova's fields and properties, entries ordered by boot index (root
/// first) then device.
fn build_image(
    inst: &Instance,
    req: &InstanceSnapshotRequest,
    members: &[(crate::types::Snapshot, Volume)],
    consistency: Consistency,
    window_ms: Option<f64>,
) -> Result<Image> {
    let mut attached: Vec<(&crate::types::Snapshot, crate::types::Attachment)> = members
        .iter()
        .map(|(s, v)| {
            let a = v
                .attachments
                .first()
                .cloned()
                .unwrap_or_else(|| crate::types::Attachment::new(inst.id, "/dev/vda"));
            (s, a)
        })
        .collect();
    attached.sort_by(|(_, a), (_, b)| {
        (a.boot_index.is_none(), a.boot_index, &a.device).cmp(&(
            b.boot_index.is_none(),
            b.boot_index,
            &b.device,
        ))
    });
    let entries: Vec<serde_json::Value> = attached.iter().map(|(s, a)| bdm_entry(s, a)).collect();
    let min_disk = attached
        .iter()
        .find(|(_, a)| a.boot_index == Some(0) || a.device == inst.root_device)
        .map(|(s, _)| size_gib(s.size_bytes))
        .unwrap_or(0);
    let mut extra = req.properties.clone();
    if let Some(w) = window_ms {
        extra.insert("kiln_freeze_window_ms".into(), format!("{w:.3}"));
    }
    let now = Utc::now();
    Ok(Image {
        id: ImageId::new(),
        name: req.name.clone(),
        status: ImageStatus::Active,
        instance_id: inst.id,
        min_disk,
        consistency,
        properties: image_properties(inst, &entries, consistency, &extra)?,
        snapshots: members.iter().map(|(s, _)| s.id).collect(),
        created_at: now,
        updated_at: now,
    })
}

/// What recovery must lock: the instance and every member volume.
pub(crate) fn lock_keys(op: &Operation) -> Vec<LockKey> {
    let mut keys = group_snapshot::lock_keys(op);
    if let Ok(x) = serde_json::from_value::<Extra>(op.payload.clone()) {
        keys.push(LockKey::Instance(x.instance));
    }
    keys
}

/// Recovery: thaw the guest if the agent says it is frozen (the guard normally did already),
/// then roll the group back. An agent that cannot be reached does not keep the snapshots:
/// they are not part of any image, and the guard thaws on its own.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation, children: &[Operation]) -> Result<String> {
    let x: Option<Extra> = serde_json::from_value(op.payload.clone()).ok();
    let thaw = match (x.and_then(|x| x.agent), ctx.agents.as_ref()) {
        (Some(agent), Some(agents)) => match agents.thaw_if_frozen(&agent, AGENT_TIMEOUT).await {
            Ok(true) => "guest was frozen: thawed".to_string(),
            Ok(false) => "guest not frozen".to_string(),
            Err(e) => format!("guest agent not reachable ({e})"),
        },
        (Some(_), None) => "no guest-agent access in this process".to_string(),
        (None, _) => "no guest agent".to_string(),
    };
    let (mut steps, report) = group_snapshot::roll_back_recovered(ctx, op, children).await?;
    steps.push(Step::FinishChildren(op.id));
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(format!(
        "instance snapshot {report}; {thaw}; no image recorded"
    ))
}
