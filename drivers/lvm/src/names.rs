//! LV names kiln uses. All derive from UUIDs only, in Cinder's spelling, so a volume group
//! that Cinder populated can be read; the temporary names of the multi-step operations add a
//! fixed suffix that LVM does not reserve.

use kiln_core::{Error, Result, SnapshotId, VolumeId};

/// `volume-<uuid>`: Cinder's volume LV name.
pub fn volume(id: &VolumeId) -> String {
    format!("volume-{id}")
}

/// `_snapshot-<uuid>`: Cinder's snapshot LV name (LVM reserves names starting "snapshot").
pub fn snapshot(id: &SnapshotId) -> String {
    format!("_snapshot-{id}")
}

/// Thick clone being copied; renamed to [`volume`] only once the copy is complete, so a
/// half-copied LV never looks like a finished volume to crash recovery.
pub fn partial_clone(id: &VolumeId) -> String {
    format!("volume-{id}-partial")
}

/// Thin revert: the new origin (a snapshot of the chosen snapshot) before it takes the name.
pub fn revert_new(id: &VolumeId) -> String {
    format!("volume-{id}-revert-new")
}

/// Thin revert: the replaced origin between the two renames, removed at the end.
pub fn revert_old(id: &VolumeId) -> String {
    format!("volume-{id}-revert-old")
}

/// Device-mapper's name for `vg/lv`: each `-` inside a name is doubled, the two joined by `-`.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The snapshot id encoded in an LV name of ours, if it is one.
pub fn parse_snapshot(lv: &str) -> Option<SnapshotId> {
    lv.strip_prefix("_snapshot-")?.parse().ok()
}

/// Checks that a configured VG or pool name is a plain LVM name, so it cannot smuggle an
/// option or a path into an argv (`-…`, `/`, `..`).
pub fn check_config_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} {name:?} is not a valid LVM name (letters, digits and +_.- only, no leading -)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_cinder() {
        let v: VolumeId = "0b8e7a4c-1111-4222-8333-944445555666".parse().unwrap();
        let s: SnapshotId = "1b8e7a4c-1111-4222-8333-944445555666".parse().unwrap();
        assert_eq!(volume(&v), "volume-0b8e7a4c-1111-4222-8333-944445555666");
        assert_eq!(
            snapshot(&s),
            "_snapshot-1b8e7a4c-1111-4222-8333-944445555666"
        );
        assert_eq!(parse_snapshot(&snapshot(&s)), Some(s));
        assert_eq!(parse_snapshot("volume-x"), None);
        assert_eq!(dm_name("kiln-vg", "_snapshot-ab"), "kiln--vg-_snapshot--ab");
    }

    #[test]
    fn config_names_are_checked() {
        check_config_name("vg", "kiln-vg_1.x").unwrap();
        for bad in ["", "-x", "a/b", "..", "a b", "a;b"] {
            assert!(check_config_name("vg", bad).is_err(), "{bad:?}");
        }
    }
}
