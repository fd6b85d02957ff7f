//! The service's instance and image face: instance records, instance snapshots, images and
//! restores (operations in [`crate::ops::instance_snapshot`], [`crate::ops::image_delete`]
//! and [`crate::ops::image_restore`]).

use std::collections::BTreeMap;

use chrono::Utc;

use super::Service;
use crate::error::{Error, Result};
use crate::instance::{Image, Instance};
use crate::locks::LockKey;
use crate::ops::image_delete::{self, ImageDeleted};
use crate::ops::image_restore::{self, RestoreRequest};
use crate::ops::instance_snapshot::{self, InstanceSnapshotReport, InstanceSnapshotRequest};
use crate::store::Step;
use crate::types::{ImageId, InstanceId, Volume};
use crate::validate::{validate_device, validate_host_path, validate_label, validate_properties};

/// What `instance create` needs.
#[derive(Debug, Clone, Default)]
pub struct InstanceSpec {
    /// Its id (default: a new one).
    pub id: Option<InstanceId>,
    /// Label.
    pub name: Option<String>,
    /// Host-side unix socket of its guest agent.
    pub agent: Option<String>,
    /// Host-side unix socket of the QMP monitor of its hypervisor.
    pub qmp: Option<String>,
    /// Guest mountpoints to freeze (empty: all).
    pub freeze_mountpoints: Vec<String>,
    /// Root device (default `/dev/vda`).
    pub root_device: Option<String>,
    /// Properties its images inherit.
    pub properties: BTreeMap<String, String>,
    /// The project it belongs to for the API (recorded with it); `None`: the default
    /// project.
    pub project: Option<String>,
}

/// Checks a guest mountpoint for `guest-fsfreeze-freeze-list`: absolute, spelled as the
/// guest mounts it (no trailing `/` except the root), no `..`, no control characters.
fn validate_mountpoint(m: &str) -> Result<()> {
    validate_host_path("freeze mountpoint", m)?;
    if m.len() > 1 && m.ends_with('/') {
        return Err(Error::invalid(
            "freeze mountpoint",
            format!("{m:?}: no trailing '/' (the agent matches mountpoints exactly)"),
        ));
    }
    Ok(())
}

impl Service {
    /// Records an instance (see [`InstanceSpec`]); an id that exists is refused.
    pub async fn create_instance(&self, spec: InstanceSpec) -> Result<Instance> {
        if let Some(n) = &spec.name {
            validate_label(n)?;
        }
        if let Some(a) = &spec.agent {
            validate_host_path("agent", a)?;
        }
        if let Some(q) = &spec.qmp {
            validate_host_path("qmp", q)?;
        }
        for m in &spec.freeze_mountpoints {
            validate_mountpoint(m)?;
        }
        let root = spec.root_device.unwrap_or_else(|| "/dev/vda".into());
        validate_device(&root)?;
        validate_properties(&spec.properties)?;
        let id = spec.id.unwrap_or_default();
        self.ctx
            .locked([LockKey::Instance(id)], async {
                if self.ctx.store.instance(id).await?.is_some() {
                    return Err(Error::wrong_state(format!("instance {id} already exists")));
                }
                let now = Utc::now();
                let inst = Instance {
                    id,
                    name: spec.name,
                    agent: spec.agent,
                    qmp: spec.qmp,
                    freeze_mountpoints: spec.freeze_mountpoints,
                    root_device: root,
                    properties: spec.properties,
                    created_at: now,
                    updated_at: now,
                };
                let mut steps = vec![Step::InsertInstance(inst.clone())];
                if let Some(p) = &spec.project {
                    let attrs = crate::attrs::ObjectAttrs::owned_by(p, None);
                    attrs.validate()?;
                    steps.push(Step::PutAttrs {
                        kind: crate::attrs::ObjectKind::Instance,
                        id: inst.id.to_string(),
                        attrs,
                    });
                }
                self.ctx
                    .guarded(steps, |c| {
                        Error::wrong_state(format!("instance {} already exists", c.id))
                    })
                    .await?;
                self.instance(id).await.map(|(i, _)| i)
            })
            .await
    }

    /// One instance and its attached volumes.
    pub async fn instance(&self, id: InstanceId) -> Result<(Instance, Vec<Volume>)> {
        let i = self
            .ctx
            .store
            .instance(id)
            .await?
            .ok_or_else(|| Error::not_found("instance", id))?;
        let vols = self.ctx.store.instance_volumes(id).await?;
        Ok((i, vols))
    }

    /// Every instance, oldest first.
    pub async fn instances(&self) -> Result<Vec<Instance>> {
        self.ctx.store.instances().await
    }

    /// Deletes an instance record; refused (busy) while volumes are attached to it.
    pub async fn delete_instance(&self, id: InstanceId) -> Result<()> {
        self.ctx
            .locked([LockKey::Instance(id)], async {
                self.ctx
                    .guarded(
                        vec![Step::InstanceHasNoVolumes(id), Step::DeleteInstance(id)],
                        |c| match &c.found {
                            Some(n) => Error::busy(
                                format!(
                                    "instance {id} has {n} volume(s) attached; detach them first"
                                ),
                                vec![],
                            ),
                            None => Error::not_found("instance", id),
                        },
                    )
                    .await
            })
            .await
    }

    /// Snapshots every volume of an instance at one instant and records the image; the
    /// report also gives the freeze window and the members' time.
    pub async fn snapshot_instance(
        &self,
        req: InstanceSnapshotRequest,
    ) -> Result<InstanceSnapshotReport> {
        instance_snapshot::run(&self.ctx, req).await
    }

    /// One image.
    pub async fn image(&self, id: ImageId) -> Result<Image> {
        self.ctx
            .store
            .image(id)
            .await?
            .ok_or_else(|| Error::not_found("image", id))
    }

    /// Every image, oldest first.
    pub async fn images(&self) -> Result<Vec<Image>> {
        self.ctx.store.images().await
    }

    /// Deletes an image and (unless `keep_snapshots`) its snapshots.
    pub async fn delete_image(&self, id: ImageId, keep_snapshots: bool) -> Result<ImageDeleted> {
        image_delete::run(&self.ctx, id, keep_snapshots).await
    }

    /// Recreates every volume of an image from its snapshot and attaches it to an instance.
    pub async fn restore_image(&self, req: RestoreRequest) -> Result<(Instance, Vec<Volume>)> {
        image_restore::run(&self.ctx, req).await
    }
}
