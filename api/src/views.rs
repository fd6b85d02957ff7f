//! Cinder's JSON views of kiln's objects: every field the clients read, in Cinder's
//! formats (sizes in GiB, `bootable` as a string, timestamps without a zone).

use chrono::{DateTime, Utc};
use kiln_core::attrs::ObjectAttrs;
use kiln_core::{Snapshot, SnapshotStatus, Volume};
use serde_json::{Value, json};

use crate::context::Req;

/// Bytes per GiB.
pub const GIB: u64 = 1 << 30;

/// Cinder's timestamp format: `2026-11-28T02:40:00.000000`.
pub fn ts(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// A size in whole GiB, rounded up (Cinder's sizes are integers).
pub fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

fn links(req: &Req, collection: &str, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/v3/{}/{collection}/{id}", req.base_url, req.caller.project)},
        {"rel": "bookmark", "href": format!("{}/{collection}/{id}", req.base_url)},
    ])
}

/// The id Cinder gives a volume's attachment to `instance`: stable for the pair.
pub fn attachment_id(v: &Volume, instance: &kiln_core::InstanceId) -> uuid::Uuid {
    uuid::Uuid::new_v5(&v.id.0, instance.0.as_bytes())
}

/// A volume's status as the API shows it: `reserved` or `attaching` while its attachment
/// (made through the attachments API) is, else kiln's.
pub fn volume_status(v: &Volume, a: &ObjectAttrs) -> &'static str {
    match crate::attachments::status(v, a) {
        Some("reserved") => "reserved",
        Some("attaching") => "attaching",
        _ => v.status.as_str(),
    }
}

/// A volume's summary (list without `detail`).
pub fn volume_summary(req: &Req, v: &Volume) -> Value {
    let id = v.id.to_string();
    json!({"id": id, "name": v.name, "links": links(req, "volumes", &id)})
}

/// A volume's detail view.
pub fn volume(req: &Req, v: &Volume, a: &ObjectAttrs) -> Value {
    let id = v.id.to_string();
    let attachments: Vec<Value> = v
        .attachments
        .iter()
        .map(|x| {
            json!({
                "id": id,
                "attachment_id": attachment_id(v, &x.instance_id).to_string(),
                "volume_id": id,
                "server_id": x.instance_id.to_string(),
                "host_name": null,
                "device": x.device,
                "attached_at": ts(&x.attached_at),
            })
        })
        .collect();
    let mut view = json!({
        "id": id,
        "name": v.name,
        "description": a.description,
        "size": gib(v.size_bytes),
        "status": volume_status(v, a),
        "availability_zone": "nova",
        "created_at": ts(&v.created_at),
        "updated_at": ts(&v.updated_at),
        "attachments": attachments,
        "bootable": if a.bootable { "true" } else { "false" },
        "encrypted": false,
        "multiattach": false,
        "metadata": a.properties,
        "volume_type": v.backend,
        "snapshot_id": v.source_snapshot_id.map(|s| s.to_string()),
        "source_volid": null,
        "consistencygroup_id": null,
        "replication_status": null,
        "migration_status": null,
        "user_id": a.user_id,
        "os-vol-tenant-attr:tenant_id": a.project_id,
        "links": links(req, "volumes", &id),
    });
    if req.caller.admin {
        view["os-vol-host-attr:host"] = format!("kiln@{}#{}", v.backend, v.backend).into();
        view["os-vol-mig-status-attr:migstat"] = Value::Null;
        view["os-vol-mig-status-attr:name_id"] = Value::Null;
    }
    let v3 = req.version;
    if v3.at_least(3, 13) {
        view["group_id"] = Value::Null;
    }
    if v3.at_least(3, 21) {
        view["provider_id"] = Value::Null;
    }
    if v3.at_least(3, 48) {
        view["shared_targets"] = false.into();
        view["service_uuid"] = Value::Null;
    }
    if v3.at_least(3, 61) {
        view["cluster_name"] = Value::Null;
    }
    if v3.at_least(3, 63) {
        view["volume_type_id"] = v.backend.clone().into();
    }
    if v3.at_least(3, 65) {
        view["consumes_quota"] = true.into();
    }
    view
}

/// A snapshot's view (Cinder's list and detail differ only in the extended attributes).
pub fn snapshot(req: &Req, s: &Snapshot, a: &ObjectAttrs, detail: bool) -> Value {
    let mut view = json!({
        "id": s.id.to_string(),
        "name": s.name,
        "description": a.description,
        "volume_id": s.volume_id.to_string(),
        "status": s.status.as_str(),
        "size": gib(s.size_bytes),
        "created_at": ts(&s.created_at),
        "updated_at": ts(&s.updated_at),
        "metadata": a.properties,
    });
    if detail {
        let progress = if s.status == SnapshotStatus::Available {
            "100%"
        } else {
            "0%"
        };
        view["os-extended-snapshot-attributes:progress"] = progress.into();
        view["os-extended-snapshot-attributes:project_id"] = a.project_id.clone().into();
    }
    let v3 = req.version;
    if v3.at_least(3, 14) {
        view["group_snapshot_id"] = Value::Null;
    }
    if v3.at_least(3, 41) {
        view["user_id"] = a.user_id.clone().into();
    }
    if v3.at_least(3, 65) {
        view["consumes_quota"] = true.into();
    }
    view
}
