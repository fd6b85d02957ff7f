//! `kiln instance ...` and `kiln image ...`: validated jobs and their output.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_core::instance::glance_view;
use kiln_core::ops::image_restore::RestoreRequest;
use kiln_core::ops::instance_snapshot::{InstanceSnapshotRequest, Quiesce};
use kiln_core::service::{InstanceSpec, Service};
use kiln_core::validate::{validate_device, validate_properties};
use kiln_core::{Error, Image, ImageId, Instance, InstanceId, Result, Volume};
use serde::Serialize;

use crate::cli::{Format, ImageCmd, InstanceCmd, QuiesceArg};
use crate::job::{id, label};
use crate::output::{emit, table};

/// A validated instance or image command.
pub enum InstanceJob {
    Create(InstanceSpec),
    List,
    Show(InstanceId),
    Delete(InstanceId),
    Snapshot(InstanceSnapshotRequest),
    ImageList,
    ImageShow(ImageId),
    ImageDelete(ImageId, bool),
    ImageRestore(RestoreRequest),
    ImageExport(ImageId, std::path::PathBuf),
    ImageImport(std::path::PathBuf, Option<String>),
}

/// A path argument (used as a path only, never in a command line): not empty.
fn non_empty(what: &str, p: String) -> Result<std::path::PathBuf> {
    if p.is_empty() {
        return Err(Error::invalid(what, "empty path"));
    }
    Ok(p.into())
}

/// Parses `KEY=VALUE` properties.
fn properties(raw: Vec<String>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in raw {
        let Some((k, v)) = p.split_once('=') else {
            return Err(Error::invalid(
                "property",
                format!("{p:?}: expected KEY=VALUE"),
            ));
        };
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Error::invalid("property", format!("{k:?} given twice")));
        }
    }
    validate_properties(&out)?;
    Ok(out)
}

/// Parses a duration: a whole number with `ms`, `s` or `m` (plain = seconds).
pub fn parse_duration(input: &str) -> Result<Duration> {
    let s = input.trim();
    let bad = || {
        Error::invalid(
            "duration",
            format!("{input:?}: expected e.g. 500ms, 10s or 1m"),
        )
    };
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Err(bad());
    }
    let n: u64 = s[..end].parse().map_err(|_| bad())?;
    let ms = match &s[end..] {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

impl InstanceJob {
    /// Validates an `instance` command.
    pub fn instance(c: InstanceCmd) -> Result<InstanceJob> {
        Ok(match c {
            InstanceCmd::Create(c) => {
                validate_device(&c.root_device)?;
                InstanceJob::Create(InstanceSpec {
                    project: c
                        .project
                        .map(|p| kiln_core::attrs::validate_id("project", &p).map(|()| p))
                        .transpose()?,
                    id: c.id.as_deref().map(id).transpose()?,
                    name: label(c.name)?,
                    agent: c.agent,
                    qmp: c.qmp,
                    freeze_mountpoints: c.freeze_mountpoints,
                    root_device: Some(c.root_device),
                    properties: properties(c.properties)?,
                })
            }
            InstanceCmd::List => InstanceJob::List,
            InstanceCmd::Show { id: i } => InstanceJob::Show(id(&i)?),
            InstanceCmd::Delete { id: i } => InstanceJob::Delete(id(&i)?),
            InstanceCmd::Snapshot(s) => {
                let freeze_timeout = parse_duration(&s.freeze_timeout)?;
                let req = InstanceSnapshotRequest {
                    owner: None,
                    instance: id(&s.id)?,
                    name: s.name,
                    quiesce: match s.quiesce {
                        QuiesceArg::Auto => Quiesce::Auto,
                        QuiesceArg::Required => Quiesce::Required,
                        QuiesceArg::Off => Quiesce::Off,
                    },
                    freeze_timeout,
                    properties: properties(s.properties)?,
                };
                kiln_core::ops::instance_snapshot::check_request(&req)?;
                InstanceJob::Snapshot(req)
            }
        })
    }

    /// Validates an `image` command.
    pub fn image(c: ImageCmd) -> Result<InstanceJob> {
        Ok(match c {
            ImageCmd::List => InstanceJob::ImageList,
            ImageCmd::Show { id: i } => InstanceJob::ImageShow(id(&i)?),
            ImageCmd::Delete {
                id: i,
                keep_snapshots,
            } => InstanceJob::ImageDelete(id(&i)?, keep_snapshots),
            ImageCmd::Restore {
                id: i,
                instance,
                name,
            } => InstanceJob::ImageRestore(RestoreRequest {
                image: id(&i)?,
                instance: instance.as_deref().map(id).transpose()?,
                name: label(name)?,
            }),
            ImageCmd::Export { id: i, output } => {
                InstanceJob::ImageExport(id(&i)?, non_empty("--output", output)?)
            }
            ImageCmd::Import { dir, backend } => {
                InstanceJob::ImageImport(non_empty("directory", dir)?, backend)
            }
        })
    }

    /// Runs it and prints the result.
    pub async fn run(self, service: &Service, fmt: Format) -> Result<()> {
        match self {
            InstanceJob::Create(spec) => {
                let i = service.create_instance(spec).await?;
                let view = InstanceView::of(service, i, vec![]).await;
                emit(fmt, &view, || instance_text(&view));
            }
            InstanceJob::List => {
                let is = service.instances().await?;
                emit(fmt, &is, || instances_table(&is));
            }
            InstanceJob::Show(id) => {
                let (i, vols) = service.instance(id).await?;
                let view = InstanceView::of(service, i, vols).await;
                emit(fmt, &view, || instance_text(&view));
            }
            InstanceJob::Delete(id) => {
                service.delete_instance(id).await?;
                emit(
                    fmt,
                    &serde_json::json!({"id": id.to_string(), "deleted": true}),
                    || format!("deleted instance {id}"),
                );
            }
            InstanceJob::Snapshot(req) => {
                let r = service.snapshot_instance(req).await?;
                show_image(fmt, &r.image);
            }
            InstanceJob::ImageList => {
                let is = service.images().await?;
                let views: Vec<serde_json::Value> = is.iter().map(glance_view).collect();
                emit(fmt, &views, || images_table(&is));
            }
            InstanceJob::ImageShow(id) => {
                let img = service.image(id).await?;
                show_image(fmt, &img);
            }
            InstanceJob::ImageDelete(id, keep) => {
                let r = service.delete_image(id, keep).await?;
                emit(fmt, &r, || {
                    format!(
                        "deleted image {id}: {} snapshot(s) deleted, {} kept",
                        r.snapshots_deleted.len(),
                        r.snapshots_kept.len()
                    )
                });
            }
            InstanceJob::ImageRestore(req) => {
                let (i, vols) = service.restore_image(req).await?;
                let view = InstanceView::of(service, i, vols).await;
                emit(fmt, &view, || instance_text(&view));
            }
            InstanceJob::ImageExport(id, out) => {
                let (p, pb) = crate::progress(fmt);
                let r = service.export_image(id, &out, p).await;
                pb.finish_and_clear();
                let r = r?;
                emit(fmt, &r, || {
                    format!(
                        "exported image {} and {} snapshot(s) to {} ({} written)",
                        r.image_id,
                        r.snapshots.len(),
                        r.output.display(),
                        crate::output::human(r.stored_bytes)
                    )
                });
            }
            InstanceJob::ImageImport(dir, backend) => {
                let (p, pb) = crate::progress(fmt);
                let img = service.import_image(&dir, backend, p).await;
                pb.finish_and_clear();
                show_image(fmt, &img?);
            }
        }
        Ok(())
    }
}

/// An instance as `instance show` prints it: the record, and each attached volume with
/// its connection info (what a hypervisor needs to open it).
#[derive(Serialize)]
struct InstanceView {
    #[serde(flatten)]
    instance: Instance,
    volumes: Vec<AttachedVolume>,
}

/// A volume as `volume show`/`volume attach` print it: the record and, while it is
/// attached, its connection info (Cinder's `initialize_connection` shape).
#[derive(Serialize)]
pub struct AttachedVolume {
    #[serde(flatten)]
    pub volume: Volume,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_info: Option<kiln_core::ConnectionInfo>,
}

impl AttachedVolume {
    /// `v`, with its connection info when it is attached (best effort: a backend that
    /// cannot say leaves it out rather than failing the command).
    pub async fn of(service: &Service, v: Volume) -> AttachedVolume {
        let connection_info = if v.attachments.is_empty() {
            None
        } else {
            service.connection_info(v.id).await.ok()
        };
        AttachedVolume {
            volume: v,
            connection_info,
        }
    }

    /// The table `volume show` prints.
    pub fn table(&self) -> String {
        let mut out = crate::output::volume_table(&self.volume);
        if let Some(ci) = &self.connection_info {
            let detail = ["path", "name", "device_path"]
                .iter()
                .find_map(|k| ci.data.get(*k).and_then(|v| v.as_str()))
                .unwrap_or("");
            out.push_str(&format!("\nconnection: {} {detail}", ci.driver_volume_type));
        }
        out
    }
}

impl InstanceView {
    async fn of(service: &Service, instance: Instance, vols: Vec<Volume>) -> InstanceView {
        let mut volumes = Vec::new();
        for v in vols {
            volumes.push(AttachedVolume::of(service, v).await);
        }
        InstanceView { instance, volumes }
    }
}

fn show_image(fmt: Format, img: &Image) {
    emit(fmt, &glance_view(img), || image_text(img));
}

fn instances_table(is: &[Instance]) -> String {
    let mut t = table(&["id", "name", "agent", "root device", "created"]);
    for i in is {
        t.add_row(vec![
            i.id.to_string(),
            i.name.clone().unwrap_or_default(),
            i.agent.clone().unwrap_or_else(|| "-".into()),
            i.root_device.clone(),
            i.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    t.to_string()
}

fn instance_text(v: &InstanceView) -> String {
    let i = &v.instance;
    let mut t = table(&["field", "value"]);
    t.add_row(vec!["id".to_string(), i.id.to_string()]);
    t.add_row(vec!["name".to_string(), i.name.clone().unwrap_or_default()]);
    t.add_row(vec![
        "agent".to_string(),
        i.agent
            .clone()
            .unwrap_or_else(|| "none (crash-consistent snapshots)".into()),
    ]);
    t.add_row(vec![
        "freeze".to_string(),
        if i.freeze_mountpoints.is_empty() {
            "all filesystems".to_string()
        } else {
            i.freeze_mountpoints.join(", ")
        },
    ]);
    t.add_row(vec!["root device".to_string(), i.root_device.clone()]);
    for (k, val) in &i.properties {
        t.add_row(vec![format!("property {k}"), val.clone()]);
    }
    let mut vt = table(&["device", "boot", "volume", "size", "backend", "status"]);
    for a in &v.volumes {
        let att = a.volume.attachments.first();
        vt.add_row(vec![
            att.map(|x| x.device.clone()).unwrap_or_default(),
            att.and_then(|x| x.boot_index)
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            a.volume.id.to_string(),
            crate::output::human(a.volume.size_bytes),
            a.volume.backend.clone(),
            a.volume.status.to_string(),
        ]);
    }
    format!("{t}\n{vt}")
}

fn images_table(is: &[Image]) -> String {
    let mut t = table(&[
        "id",
        "name",
        "status",
        "instance",
        "volumes",
        "consistency",
        "created",
    ]);
    for i in is {
        t.add_row(vec![
            i.id.to_string(),
            i.name.clone(),
            i.status.to_string(),
            i.instance_id.to_string(),
            i.snapshots.len().to_string(),
            i.consistency.to_string(),
            i.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    t.to_string()
}

fn image_text(i: &Image) -> String {
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("id", i.id.to_string()),
        ("name", i.name.clone()),
        ("status", i.status.to_string()),
        ("instance", i.instance_id.to_string()),
        ("consistency", i.consistency.to_string()),
        ("min_disk", format!("{} GiB", i.min_disk)),
        ("created", i.created_at.to_rfc3339()),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    let mut bt = table(&["device", "boot", "snapshot", "size (GiB)"]);
    if let Ok(entries) = kiln_core::instance::image_bdm(i) {
        for e in entries {
            bt.add_row(vec![
                e["device_name"].as_str().unwrap_or("").to_string(),
                e["boot_index"]
                    .as_i64()
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into()),
                e["snapshot_id"].as_str().unwrap_or("").to_string(),
                e["volume_size"].to_string(),
            ]);
        }
    }
    format!("{t}\n{bt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_absurd_ones_are_refused() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "s", "-1s", "1.5s", "10h", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            kiln_core::ops::instance_snapshot::DEFAULT_FREEZE_TIMEOUT,
            Duration::from_secs(10)
        );
    }
}
