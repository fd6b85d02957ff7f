//! Instances (servers) and images (metadata-only records of instance snapshots), and the
//! Nova-shaped `block_device_mapping` an image carries.
//!
//! An image is what Nova's `snapshot_volume_backed` writes for a boot-from-volume server:
//! no data of its own (`size` 0), and a `block_device_mapping` property — a JSON *string*
//! of BDM v2 entries, one per volume, each `source_type: "snapshot"` naming the snapshot
//! that holds that volume's data. Booting from it recreates each volume from its snapshot.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::{Attachment, Consistency, ImageId, InstanceId, Snapshot, SnapshotId};

/// A server whose volumes kiln snapshots together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id (Nova's server UUID when kiln works beside Nova).
    pub id: InstanceId,
    /// Optional label.
    pub name: Option<String>,
    /// Host-side unix socket of the instance's guest-agent channel (qemu-guest-agent), as
    /// the hypervisor exposes it; `None` = no agent (crash-consistent snapshots only).
    pub agent: Option<String>,
    /// Host-side unix socket of the QMP monitor of the hypervisor (QEMU or
    /// qemu-storage-daemon) that has its qcow2 volumes open; `None` = none (a qcow2 volume
    /// attached to it cannot be snapshotted while attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
    /// Guest mountpoints to freeze with `guest-fsfreeze-freeze-list`; empty = freeze every
    /// filesystem the agent knows (`guest-fsfreeze-freeze`).
    pub freeze_mountpoints: Vec<String>,
    /// Guest device of the root disk (Nova's `root_device_name`), e.g. `/dev/vda`.
    pub root_device: String,
    /// Image metadata every snapshot of this instance inherits (`hw_*`, `os_*`, ...).
    pub properties: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Glance's image statuses that kiln uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageStatus {
    /// Recorded and usable.
    Active,
    /// Being deleted (its snapshots are being removed); `image delete` again finishes it.
    PendingDelete,
}

crate::types::status_strings!(ImageStatus {
    Active => "active",
    PendingDelete => "pending_delete",
});

/// The metadata-only image of an instance snapshot (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Its id.
    pub id: ImageId,
    /// Its name (a label).
    pub name: String,
    /// Status.
    pub status: ImageStatus,
    /// The instance it was taken of.
    pub instance_id: InstanceId,
    /// Smallest root disk it boots on, GiB (the root volume's size, as Nova records it).
    pub min_disk: u64,
    /// How consistent the set of snapshots is.
    pub consistency: Consistency,
    /// Glance properties: the instance's inherited properties plus `root_device_name`,
    /// `bdm_v2`, `block_device_mapping` (a JSON string) and `kiln_consistency`.
    pub properties: BTreeMap<String, String>,
    /// The snapshots it lists (filled from the store).
    pub snapshots: Vec<SnapshotId>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Bytes per GiB (Nova's `volume_size` unit).
const GIB: u64 = 1 << 30;

/// A volume size in whole GiB, rounded up (Nova's `volume_size` is an integer).
pub fn size_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// One BDM v2 entry for `snapshot`, taken of a volume attached as `a`, with every field
/// Nova writes (nulls included) in Nova's names.
pub fn bdm_entry(snapshot: &Snapshot, a: &Attachment) -> serde_json::Value {
    serde_json::json!({
        "source_type": "snapshot",
        "destination_type": "volume",
        "snapshot_id": snapshot.id.to_string(),
        "volume_size": size_gib(snapshot.size_bytes),
        "device_name": a.device,
        "boot_index": a.boot_index,
        "delete_on_termination": a.delete_on_termination,
        "disk_bus": a.disk_bus,
        "device_type": a.device_type.clone().unwrap_or_else(|| "disk".into()),
        "guest_format": null,
        "volume_id": null,
        "image_id": null,
        "no_device": null,
        "tag": null,
        "volume_type": null,
        "encrypted": null,
        "encryption_format": null,
        "encryption_secret_uuid": null,
        "encryption_options": null,
    })
}

/// The image properties of an instance snapshot: the instance's own properties, then
/// Nova's `root_device_name`, `bdm_v2` and `block_device_mapping` (a JSON string of
/// `entries`), then `kiln_consistency`.
pub fn image_properties(
    instance: &Instance,
    entries: &[serde_json::Value],
    consistency: Consistency,
    extra: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut p = instance.properties.clone();
    p.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    p.insert("root_device_name".into(), instance.root_device.clone());
    p.insert("bdm_v2".into(), "True".into());
    p.insert(
        "block_device_mapping".into(),
        serde_json::to_string(entries).map_err(Error::store)?,
    );
    p.insert("kiln_consistency".into(), consistency.to_string());
    Ok(p)
}

/// The BDM entries of an image (parsed back from its `block_device_mapping` property).
pub fn image_bdm(image: &Image) -> Result<Vec<serde_json::Value>> {
    let raw = image
        .properties
        .get("block_device_mapping")
        .ok_or_else(|| Error::store(format!("image {} has no block_device_mapping", image.id)))?;
    serde_json::from_str(raw)
        .map_err(|e| Error::store(format!("image {}: block_device_mapping: {e}", image.id)))
}

/// The image as Glance v2 serves it: the record's fields at the top level, every property
/// flattened beside them, plus kiln's `instance_id` and `snapshots`.
pub fn glance_view(image: &Image) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &image.properties {
        m.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let fields = serde_json::json!({
        "id": image.id.to_string(),
        "name": image.name,
        "status": image.status.as_str(),
        "size": 0,
        "disk_format": "raw",
        "container_format": "bare",
        "min_disk": image.min_disk,
        "min_ram": 0,
        "visibility": "private",
        "created_at": image.created_at,
        "updated_at": image.updated_at,
        "instance_id": image.instance_id.to_string(),
        "snapshots": image.snapshots.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    });
    if let serde_json::Value::Object(f) = fields {
        m.extend(f);
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{SnapshotStatus, VolumeId};

    #[test]
    fn a_bdm_entry_has_every_nova_field_with_nulls() {
        let now = Utc::now();
        let s = Snapshot {
            id: SnapshotId::new(),
            volume_id: VolumeId::new(),
            name: None,
            size_bytes: (1 << 30) + 1,
            backend: "b".into(),
            status: SnapshotStatus::Available,
            status_reason: None,
            provider_location: None,
            forced: true,
            image_id: None,
            consistency: None,
            created_at: now,
            updated_at: now,
        };
        let mut a = Attachment::new(InstanceId::new(), "/dev/vda");
        a.boot_index = Some(0);
        let e = bdm_entry(&s, &a);
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "source_type",
            "destination_type",
            "snapshot_id",
            "volume_size",
            "device_name",
            "boot_index",
            "delete_on_termination",
            "disk_bus",
            "device_type",
            "guest_format",
            "volume_id",
            "image_id",
            "no_device",
            "tag",
            "volume_type",
            "encrypted",
            "encryption_format",
            "encryption_secret_uuid",
            "encryption_options",
        ];
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
        assert_eq!(e["volume_size"], 2, "rounded up to whole GiB");
        assert_eq!(e["boot_index"], 0);
        assert!(e["volume_id"].is_null() && e["tag"].is_null());
        assert_eq!(e["device_type"], "disk");
    }
}
