//! Domain types: volumes, snapshots, attachments, backend capabilities and statistics.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use crate::error::Error;

macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Always the hyphenated lower-case form: backend names are derived from it.
                write!(f, "{}", self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| Error::invalid(concat!($what, " id"), format!("{s:?} is not a UUID")))
            }
        }
    };
}

uuid_id!(
    /// Identifies a volume; backend object names derive from it (`volume-<uuid>`).
    VolumeId,
    "volume"
);
uuid_id!(
    /// Identifies a snapshot; backend object names derive from it (`snapshot-<uuid>`, LVM `_snapshot-<uuid>`).
    SnapshotId,
    "snapshot"
);
uuid_id!(
    /// Identifies an instance (server) a volume is attached to.
    InstanceId,
    "instance"
);
uuid_id!(
    /// Identifies an image: the metadata-only record of an instance snapshot.
    ImageId,
    "image"
);
uuid_id!(
    /// Identifies a backup; its files on a target are named by it.
    BackupId,
    "backup"
);

/// Cinder's volume statuses. Serialized exactly as stored and printed (`in-use`,
/// `error_deleting`: Cinder's own, mixed spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeStatus {
    /// The backend object is being created.
    Creating,
    /// Ready and detached.
    Available,
    /// Attached to an instance.
    InUse,
    /// The backend object is being removed.
    Deleting,
    /// Something failed; `status_reason` says what.
    Error,
    /// Deleting failed; `status_reason` says what.
    ErrorDeleting,
    /// Being reverted to one of its snapshots.
    Reverting,
    /// Data is being written into it from a stream or a backup (Cinder's
    /// `restoring-backup`).
    RestoringBackup,
}

/// Cinder's snapshot statuses, serialized as stored and printed (`error_deleting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotStatus {
    /// The backend object is being created.
    Creating,
    /// Ready.
    Available,
    /// The backend object is being removed.
    Deleting,
    /// Something failed; `status_reason` says what.
    Error,
    /// Deleting failed; `status_reason` says what.
    ErrorDeleting,
    /// Its volume is being reverted to it.
    Restoring,
}

macro_rules! status_strings {
    ($ty:ident { $($variant:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            /// The status as stored and printed (Cinder's spelling).
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $s),* }
            }
            /// Every status, for validation and documentation.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, $crate::error::Error> {
                match s {
                    $($s => Ok($ty::$variant),)*
                    _ => Err($crate::error::Error::invalid(
                        stringify!($ty),
                        format!("unknown status {s:?}; one of: {}", [$($s),*].join(", ")),
                    )),
                }
            }
        }
        // One spelling everywhere: JSON output uses the stored form, never serde's renaming.
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(de)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use status_strings;

status_strings!(VolumeStatus {
    Creating => "creating",
    Available => "available",
    InUse => "in-use",
    Deleting => "deleting",
    Error => "error",
    ErrorDeleting => "error_deleting",
    Reverting => "reverting",
    RestoringBackup => "restoring-backup",
});

/// A backup's status, as Cinder names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackupStatus {
    /// Being written to its target.
    Creating,
    /// Complete on its target.
    Available,
    /// Being removed from its target.
    Deleting,
    /// Something failed; `status_reason` says what.
    Error,
    /// Being read back into a volume.
    Restoring,
}

status_strings!(BackupStatus {
    Creating => "creating",
    Available => "available",
    Deleting => "deleting",
    Error => "error",
    Restoring => "restoring",
});

/// One backup of a volume: the data of one of its snapshots, whole or as the changes since
/// the snapshot of the backup it builds on, stored on a target outside the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// Its id.
    pub id: BackupId,
    /// The volume it was taken of (the volume may be gone since).
    pub volume_id: VolumeId,
    /// The snapshot its data was read from.
    pub snapshot_id: SnapshotId,
    /// The backup it builds on (an incremental holds only the changes since that one's
    /// snapshot); `None` for a full backup.
    pub parent_id: Option<BackupId>,
    /// A label.
    pub name: Option<String>,
    /// Where it is stored, e.g. `dir:/srv/backups`.
    pub target: String,
    /// Status.
    pub status: BackupStatus,
    /// Why it is in `error`.
    pub status_reason: Option<String>,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// Bytes it occupies on the target.
    pub stored_bytes: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

status_strings!(SnapshotStatus {
    Creating => "creating",
    Available => "available",
    Deleting => "deleting",
    Error => "error",
    ErrorDeleting => "error_deleting",
    Restoring => "restoring",
});

/// A volume's attachment to an instance (kiln records it; the hypervisor does the attaching).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The instance the volume is attached to.
    pub instance_id: InstanceId,
    /// Guest device name, e.g. `/dev/vdb`.
    pub device: String,
    /// When the attachment was recorded.
    pub attached_at: DateTime<Utc>,
    /// Boot order (Nova's `boot_index`): 0 is the root device, `None` not bootable.
    #[serde(default)]
    pub boot_index: Option<i32>,
    /// Guest bus (`virtio`, `scsi`, `ide`, ...), as Nova records it; `None` = hypervisor default.
    #[serde(default)]
    pub disk_bus: Option<String>,
    /// Device type (`disk`, `cdrom`, ...); `None` = `disk`.
    #[serde(default)]
    pub device_type: Option<String>,
    /// Whether deleting the instance should delete the volume (recorded for images).
    #[serde(default)]
    pub delete_on_termination: bool,
    /// Host-side unix socket of the QMP monitor of the hypervisor that has the volume open
    /// (the instance's `--qmp`, copied at attach time); `None` = no hypervisor kiln can ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
    /// The hypervisor's block node that served the volume when it was attached (given with
    /// `--node`, or found by the volume's active file). Online snapshots find the current top
    /// node by the active file and fall back to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Attachment {
    /// An attachment of `instance` at `device`, now, with Nova's defaults for the rest
    /// (not bootable, default bus, `disk`, kept on termination).
    pub fn new(instance: InstanceId, device: impl Into<String>) -> Self {
        Attachment {
            instance_id: instance,
            device: device.into(),
            attached_at: Utc::now(),
            boot_index: None,
            disk_bus: None,
            device_type: None,
            delete_on_termination: false,
            qmp: None,
            node: None,
        }
    }
}

/// A block volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Unique id; backend names derive from it.
    pub id: VolumeId,
    /// Optional user label; never used in a path, object name or command line.
    pub name: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Name of the configured backend holding it.
    pub backend: String,
    /// Current status.
    pub status: VolumeStatus,
    /// Why the status is `error`/`error_deleting`, when it is.
    pub status_reason: Option<String>,
    /// Backend path or spec an admin can use (file path, `vg/lv`, `pool/image`).
    pub provider_location: Option<String>,
    /// Snapshot this volume was created from (lineage).
    pub source_snapshot_id: Option<SnapshotId>,
    /// Current attachments (kiln allows at most one).
    pub attachments: Vec<Attachment>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last status change.
    pub updated_at: DateTime<Utc>,
}

impl Volume {
    /// Cinder's backend name for this volume: `volume-<uuid>`.
    pub fn backend_name(&self) -> String {
        format!("volume-{}", self.id)
    }
}

/// A point-in-time snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Unique id; backend names derive from it.
    pub id: SnapshotId,
    /// The volume it was taken of.
    pub volume_id: VolumeId,
    /// Optional user label; never used in a path, object name or command line.
    pub name: Option<String>,
    /// Size of the volume when the snapshot was taken, in bytes.
    pub size_bytes: u64,
    /// Backend name (same as the volume's).
    pub backend: String,
    /// Current status.
    pub status: SnapshotStatus,
    /// Why the status is `error`/`error_deleting`, when it is.
    pub status_reason: Option<String>,
    /// Backend path or spec of the snapshot.
    pub provider_location: Option<String>,
    /// Whether the volume was attached (taken with force) when the snapshot was made.
    pub forced: bool,
    /// The image (instance snapshot) this snapshot belongs to, if any: such a snapshot
    /// cannot be deleted on its own.
    #[serde(default)]
    pub image_id: Option<ImageId>,
    /// How consistent the data is, for a snapshot taken as part of an instance snapshot.
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last status change.
    pub updated_at: DateTime<Utc>,
}

impl Snapshot {
    /// Cinder's generic backend name: `snapshot-<uuid>` (LVM uses `_snapshot-<uuid>`).
    pub fn backend_name(&self) -> String {
        format!("snapshot-{}", self.id)
    }
}

/// How consistent an instance snapshot (and each of its snapshots) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Every filesystem was frozen through the guest agent while the snapshots were taken.
    Quiesced,
    /// No freeze, but every volume was cut at one instant by one group primitive.
    CrashConsistentGroup,
    /// No freeze; each volume was cut on its own (as after a power cut, per volume).
    CrashConsistent,
}

status_strings!(Consistency {
    Quiesced => "quiesced",
    CrashConsistentGroup => "crash-consistent-group",
    CrashConsistent => "crash-consistent",
});

/// A snapshot a revert made unusable as a side effect (an LVM thick snapshot whose
/// copy-on-write space the revert's writes through the origin overflowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidated {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Why it is unusable now (the backend's words).
    pub reason: String,
}

/// What a successful revert did besides making the volume equal to the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertOutcome {
    /// Other snapshots of the volume the revert invalidated (their data is lost; they can
    /// only be deleted). Empty on every backend but LVM thick.
    pub invalidated: Vec<Invalidated>,
}

/// What a delete did (stratisd's `DeleteAction`): deletes are idempotent, and the result
/// says honestly whether this call removed something or found it already gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteAction {
    /// This call removed the object.
    Deleted,
    /// Nothing to do: the object did not exist.
    AlreadyGone,
}

impl fmt::Display for DeleteAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeleteAction::Deleted => "deleted",
            DeleteAction::AlreadyGone => "already gone",
        })
    }
}

/// What a hypervisor needs to open a volume right now, in the shape of Cinder's
/// `initialize_connection` result: `{"driver_volume_type": "file"|"rbd"|"local", "data": {..}}`.
/// For files `data` has `path` (the active image: for qcow2 the active layer, not the chain
/// record) and `format`; for RBD `name` (`pool/image`), `hosts`/`ports` (monitors) and
/// `auth_username`; for LVM `device_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Cinder's connector kind: "file", "rbd" or "local".
    pub driver_volume_type: String,
    /// Connector-specific fields.
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// What a driver reports back after creating something; the service stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderUpdate {
    /// Backend path or spec an admin can use.
    pub provider_location: Option<String>,
}

/// What a backend can do, so callers can ask before acting (Proxmox's `volume_has_feature`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Snapshots share blocks with their origin: creating one costs O(1) in the volume size.
    pub thin: bool,
    /// `create_snapshot_force` gives a crash-consistent image of an attached volume.
    pub online_snapshot: bool,
    /// Attached volumes are snapshotted by the hypervisor that has them open, through its
    /// QMP monitor: `create_snapshot_force` works when the attachment names the monitor
    /// (`Attachment::qmp`) and is refused as unsupported when it does not.
    #[serde(default)]
    pub hypervisor_snapshot: bool,
    /// Revert to any snapshot, keeping every other snapshot.
    pub revert_any: bool,
    /// Volumes can be created from snapshots.
    pub clone: bool,
    /// Clones share blocks with their snapshot (copy-on-write) instead of a full copy.
    pub clone_cow: bool,
    /// The backend tracks what changed between two snapshots (`diff_snapshots` answers
    /// `Changed`: shared blocks, layers, object maps), so an incremental stream reads only
    /// that; without it, both snapshots are read and compared.
    pub diff: bool,
    /// One instant across several volumes (native group snapshot).
    pub group_snapshot: bool,
    /// How a snapshot is made, e.g. "reflink (FICLONE)", "qcow2 external overlay".
    pub snapshot_method: String,
}

/// Capacity and usage of a backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    /// Total capacity in bytes, when the backend knows it.
    pub total_bytes: Option<u64>,
    /// Free capacity in bytes, when the backend knows it.
    pub free_bytes: Option<u64>,
    /// Backend-specific figures (e.g. thin pool data/metadata percent).
    pub details: BTreeMap<String, serde_json::Value>,
}

/// A byte range of a volume or snapshot that holds data (anything outside reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
}

/// Sorts extents and merges touching/overlapping ones.
pub fn merge_extents(v: &mut [Extent]) -> Vec<Extent> {
    v.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v.iter().filter(|e| e.length > 0) {
        match out.last_mut() {
            Some(last) if e.offset <= last.offset + last.length => {
                let end = (e.offset + e.length).max(last.offset + last.length);
                last.length = end - last.offset;
            }
            _ => out.push(*e),
        }
    }
    out
}

/// One timed run of a backend's raw snapshot primitive, with no kiln bookkeeping around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimitiveSample {
    /// What was timed, e.g. "FICLONE + unlink" or "rbd_snap_create + rbd_snap_remove".
    pub name: String,
    /// Time to create the snapshot.
    pub create: std::time::Duration,
    /// Time to remove it again.
    pub delete: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_sorted_and_merged() {
        let x = |offset, length| Extent { offset, length };
        let mut v = vec![x(8, 4), x(0, 4), x(4, 4), x(20, 0), x(30, 5), x(32, 1)];
        assert_eq!(merge_extents(&mut v), vec![x(0, 12), x(30, 5)]);
    }

    #[test]
    fn statuses_serialize_as_stored() {
        // Found in review: serde's kebab-case printed "error-deleting" while the store,
        // the tables and the README say "error_deleting".
        for s in VolumeStatus::ALL {
            let json = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(json, serde_json::Value::from(s.as_str()));
            assert_eq!(serde_json::from_value::<VolumeStatus>(json).ok(), Some(*s));
        }
        for s in SnapshotStatus::ALL {
            let json = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(json, serde_json::Value::from(s.as_str()));
            assert_eq!(
                serde_json::from_value::<SnapshotStatus>(json).ok(),
                Some(*s)
            );
        }
        assert_eq!(
            serde_json::to_value(SnapshotStatus::ErrorDeleting).ok(),
            Some(serde_json::Value::from("error_deleting"))
        );
        assert_eq!(
            serde_json::to_value(VolumeStatus::InUse).ok(),
            Some(serde_json::Value::from("in-use"))
        );
    }
}
