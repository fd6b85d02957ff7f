//! Backend object names, derived only from kiln's UUIDs (Cinder's scheme), and back.

use kiln_core::{SnapshotId, VolumeId};

/// Image name of a volume: `volume-<uuid>`.
pub fn volume_image(id: &VolumeId) -> String {
    format!("volume-{id}")
}

/// RBD snapshot name of a snapshot: `snapshot-<uuid>`.
pub fn snapshot_name(id: &SnapshotId) -> String {
    format!("snapshot-{id}")
}

/// The volume UUID an image name encodes (`volume-<uuid>`), if it is one of kiln's.
pub fn volume_id_of_image(image: &str) -> Option<VolumeId> {
    image.strip_prefix("volume-")?.parse().ok()
}

/// The snapshot UUID an RBD snapshot name encodes (`snapshot-<uuid>`), if it is one of kiln's.
pub fn snapshot_id_of_name(snap: &str) -> Option<SnapshotId> {
    snap.strip_prefix("snapshot-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ids() {
        let v = VolumeId::new();
        let s = SnapshotId::new();
        assert_eq!(volume_id_of_image(&volume_image(&v)), Some(v));
        assert_eq!(snapshot_id_of_name(&snapshot_name(&s)), Some(s));
        assert_eq!(volume_id_of_image("volume-nope"), None);
        assert_eq!(volume_id_of_image("other-image"), None);
        assert_eq!(snapshot_id_of_name("snap1"), None);
    }
}
