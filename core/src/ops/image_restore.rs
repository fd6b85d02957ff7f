//! Restore (boot) an image: every volume of its `block_device_mapping` is created from its
//! snapshot — concurrently, all or nothing — and attached to an instance at the recorded
//! device with the recorded boot index, as Nova does when it boots from such an image.
//!
//! Journal shape: one parent entry (kind `image_restore`) naming the instance and every
//! planned volume, written with the `creating` records (already carrying their
//! attachments) in one batch; one child per member before its driver call.
//!
//! Recovery rule: **roll back** — every planned volume that exists is deleted from its
//! backend and the store, and an instance this restore created is removed.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::{Ctx, clone, conflict_error, create_volume};
use crate::error::{Error, Result};
use crate::instance::{Image, ImageStatus, Instance, image_bdm, size_gib};
use crate::locks::LockKey;
use crate::progress::no_progress;
use crate::store::{NewOp, Operation, Step};
use crate::types::{
    Attachment, ImageId, InstanceId, ProviderUpdate, Snapshot, SnapshotId, SnapshotStatus, Volume,
    VolumeId, VolumeStatus,
};
use crate::validate::{validate_device, validate_label};

/// Journal kind of the parent.
pub(crate) const KIND: &str = "image_restore";

/// What `image restore` needs.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The image.
    pub image: ImageId,
    /// Attach to this instance (created if kiln has no record of it); default a new one.
    pub instance: Option<InstanceId>,
    /// Label of a new instance record (and of the new volumes).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    instance: InstanceId,
    created_instance: bool,
    volumes: Vec<VolumeId>,
}

/// One BDM entry, checked.
struct Entry {
    snapshot: Snapshot,
    size_bytes: u64,
    attachment: Attachment,
}

fn bad_bdm(img: &Image, what: impl std::fmt::Display) -> Error {
    Error::invalid(
        "image",
        format!("image {}: block_device_mapping: {what}", img.id),
    )
}

async fn entries(ctx: &Ctx, img: &Image, instance: InstanceId) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in image_bdm(img)? {
        let sid: SnapshotId = e["snapshot_id"]
            .as_str()
            .ok_or_else(|| bad_bdm(img, "an entry has no snapshot_id"))?
            .parse()?;
        let snapshot = ctx.checked_snapshot(sid).await?;
        if snapshot.status != SnapshotStatus::Available {
            return Err(Error::wrong_state(format!(
                "cannot restore image {}: its snapshot {sid} is {}",
                img.id, snapshot.status
            )));
        }
        let device = e["device_name"]
            .as_str()
            .ok_or_else(|| bad_bdm(img, "an entry has no device_name"))?;
        validate_device(device)?;
        let gib = e["volume_size"]
            .as_u64()
            .ok_or_else(|| bad_bdm(img, "an entry has no volume_size"))?;
        // `volume_size` is whole GiB, rounded up from the snapshot: restore the exact size
        // when it is just that rounding, the asked size when an image asks for more.
        let size_bytes = if size_gib(snapshot.size_bytes) == gib {
            snapshot.size_bytes
        } else {
            gib.checked_mul(1 << 30)
                .ok_or_else(|| bad_bdm(img, "volume_size too large"))?
        };
        let mut a = Attachment::new(instance, device);
        a.boot_index = e["boot_index"].as_i64().and_then(|b| i32::try_from(b).ok());
        a.disk_bus = e["disk_bus"].as_str().map(str::to_string);
        a.device_type = e["device_type"].as_str().map(str::to_string);
        a.delete_on_termination = e["delete_on_termination"].as_bool().unwrap_or(false);
        out.push(Entry {
            snapshot,
            size_bytes,
            attachment: a,
        });
    }
    if out.is_empty() {
        return Err(bad_bdm(img, "no entries"));
    }
    Ok(out)
}

/// The properties a restored instance inherits: the image's, without what Nova and kiln
/// derive per snapshot.
fn inherited(img: &Image) -> BTreeMap<String, String> {
    img.properties
        .iter()
        .filter(|(k, _)| {
            !crate::validate::RESERVED_PROPERTIES.contains(&k.as_str()) && !k.starts_with("kiln_")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Restores image `req.image` (see the module docs); returns the instance and its volumes.
pub(crate) async fn run(ctx: &Ctx, req: RestoreRequest) -> Result<(Instance, Vec<Volume>)> {
    if let Some(n) = &req.name {
        validate_label(n)?;
    }
    let img = ctx
        .store
        .image(req.image)
        .await?
        .ok_or_else(|| Error::not_found("image", req.image))?;
    if img.status != ImageStatus::Active {
        return Err(Error::wrong_state(format!(
            "cannot restore image {}: it is {}",
            img.id, img.status
        )));
    }
    let instance_id = req.instance.unwrap_or_default();
    let existing = ctx.store.instance(instance_id).await?;
    let members = entries(ctx, &img, instance_id).await?;
    let now = Utc::now();
    let instance = existing.clone().unwrap_or_else(|| Instance {
        id: instance_id,
        name: req.name.clone(),
        agent: None,
        qmp: None,
        freeze_mountpoints: vec![],
        root_device: img
            .properties
            .get("root_device_name")
            .cloned()
            .unwrap_or_else(|| "/dev/vda".into()),
        properties: inherited(&img),
        created_at: now,
        updated_at: now,
    });
    let planned: Vec<(Volume, Snapshot)> = members
        .into_iter()
        .map(|m| {
            let mut v = create_volume::new_record(
                m.size_bytes,
                m.snapshot.backend.clone(),
                req.name.clone(),
                Some(m.snapshot.id),
            );
            v.attachments = vec![m.attachment];
            (v, m.snapshot)
        })
        .collect();
    let mut keys = vec![LockKey::Instance(instance_id)];
    for (v, s) in &planned {
        keys.push(v.id.into());
        keys.push(s.volume_id.into());
    }
    ctx.locked(keys, async {
        // Under the lock: the devices must be free on that instance.
        let taken: Vec<String> = ctx
            .store
            .instance_volumes(instance_id)
            .await?
            .iter()
            .filter_map(|v| v.attachments.first().map(|a| a.device.clone()))
            .collect();
        if let Some((v, _)) = planned
            .iter()
            .find(|(v, _)| taken.contains(&v.attachments[0].device))
        {
            return Err(Error::wrong_state(format!(
                "instance {instance_id} already has a volume at {}",
                v.attachments[0].device
            )));
        }
        let payload = Payload {
            instance: instance_id,
            created_instance: existing.is_none(),
            volumes: planned.iter().map(|(v, _)| v.id).collect(),
        };
        let mut steps = Vec::new();
        if existing.is_none() {
            steps.push(Step::InsertInstance(instance.clone()));
        }
        for (v, s) in &planned {
            steps.push(Step::SnapshotIn {
                id: s.id,
                any_of: vec![SnapshotStatus::Available],
            });
            steps.push(Step::InsertVolume(v.clone()));
        }
        let parent = ctx
            .begin(
                steps,
                NewOp::of(KIND, planned[0].0.id, None)
                    .payload(serde_json::to_value(&payload).map_err(Error::store)?),
                |c| conflict_error(c, "restore the image", "available"),
            )
            .await?;
        let work = planned.iter().map(|(v, s)| async move {
            let r = async {
                let driver = ctx.driver(&s.backend).await?;
                ctx.begin(
                    vec![],
                    NewOp {
                        parent: Some(parent),
                        ..NewOp::of(clone::KIND, v.id, Some(s.id))
                    },
                    |c| conflict_error(c, "restore the image", "available"),
                )
                .await?;
                ctx.drive(
                    KIND,
                    driver.create_volume_from_snapshot(v, s, no_progress()),
                )
                .await
            }
            .await
            .map_err(|e| {
                e.about(format!(
                    "volume for {} from snapshot {} (backend {})",
                    v.attachments[0].device, s.id, s.backend
                ))
            });
            (v, r)
        });
        let results: Vec<(&Volume, Result<ProviderUpdate>)> = futures::future::join_all(work).await;
        if results.iter().all(|(_, r)| r.is_ok()) {
            let mut steps = Vec::new();
            for (v, r) in &results {
                steps.push(Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![VolumeStatus::Creating],
                    to: VolumeStatus::InUse,
                    reason: None,
                });
                if let Ok(u) = r {
                    steps.push(Step::SetVolumeLocation(v.id, u.provider_location.clone()));
                }
            }
            steps.push(Step::FinishChildren(parent));
            steps.push(Step::FinishOp(parent));
            ctx.finish(steps).await?;
            let mut vols = Vec::new();
            for (v, _) in &planned {
                vols.push(ctx.volume(v.id).await?);
            }
            let instance = ctx.store.instance(instance_id).await?.unwrap_or(instance);
            return Ok((instance, vols));
        }
        // All or nothing: remove every member (a failed clone may have left a partial one).
        let mut first = None;
        let mut steps = Vec::new();
        for (v, r) in results {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
            steps.push(remove_step(ctx, v).await);
        }
        if existing.is_none() {
            steps.push(Step::DeleteInstance(instance_id));
        }
        steps.push(Step::FinishChildren(parent));
        steps.push(Step::FinishOp(parent));
        ctx.finish(steps).await?;
        Err(first.unwrap_or_else(|| Error::store("restore failed without an error")))
    })
    .await
}

/// Deletes a member from its backend: the step dropping its record, or — if the backend
/// refuses — keeping it in `error` so nothing is left untracked.
async fn remove_step(ctx: &Ctx, v: &Volume) -> Step {
    match async { ctx.driver(&v.backend).await?.delete_volume(v).await }.await {
        Ok(_) => Step::DeleteVolume(v.id),
        Err(e) => Step::SetVolumeStatus {
            id: v.id,
            from: vec![],
            to: VolumeStatus::Error,
            reason: Some(format!(
                "image restore rolled back; removing this volume failed: {e}"
            )),
        },
    }
}

/// What recovery must lock: the instance and every planned volume.
pub(crate) fn lock_keys(op: &Operation) -> Vec<LockKey> {
    match serde_json::from_value::<Payload>(op.payload.clone()) {
        Ok(p) => {
            let mut k = vec![LockKey::Instance(p.instance)];
            k.extend(p.volumes.iter().map(|v| LockKey::from(*v)));
            k
        }
        Err(_) => vec![LockKey::from(op.volume_id)],
    }
}

/// Recovery: roll back (see the module docs). A backend that cannot answer now leaves the
/// whole restore journaled.
pub(crate) async fn recover(ctx: &Ctx, op: &Operation, _children: &[Operation]) -> Result<String> {
    let p: Payload = serde_json::from_value(op.payload.clone())
        .map_err(|e| Error::store(format!("image restore journal entry {}: {e}", op.id.0)))?;
    let mut steps = Vec::new();
    let mut removed = 0;
    for id in &p.volumes {
        let Some(v) = ctx.store.volume(*id).await? else {
            continue;
        };
        match ctx.driver(&v.backend).await?.delete_volume(&v).await {
            Ok(_) => steps.push(Step::DeleteVolume(v.id)),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => steps.push(Step::SetVolumeStatus {
                id: v.id,
                from: vec![],
                to: VolumeStatus::Error,
                reason: Some(format!(
                    "image restore interrupted by a crash; removing this volume failed: {e}"
                )),
            }),
        }
        removed += 1;
    }
    if p.created_instance && ctx.store.instance(p.instance).await?.is_some() {
        steps.push(Step::DeleteInstance(p.instance));
    }
    steps.push(Step::FinishChildren(op.id));
    steps.push(Step::FinishOp(op.id));
    ctx.finish(steps).await?;
    Ok(format!(
        "image restore rolled back: {removed} of {} volume(s) removed",
        p.volumes.len()
    ))
}
