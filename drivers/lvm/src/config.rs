//! `[backends.NAME]` settings of an LVM backend.

use serde::Deserialize;

/// Which kind of logical volumes the backend creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LvmType {
    /// Thin volumes in `thin_pool`: O(1) snapshots and clones, revert to any snapshot.
    Thin,
    /// Classic ("thick") LVs with copy-on-write snapshots of a fixed COW size.
    Thick,
    /// Thin when `thin_pool` exists in the volume group, thick otherwise.
    #[default]
    Auto,
}

/// Configuration of one LVM backend. Unknown keys are refused so typos surface at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LvmConfig {
    /// The volume group holding kiln's volumes; must exist when the backend opens.
    pub volume_group: String,
    /// `thin`, `thick` or `auto` (default: auto).
    #[serde(default, rename = "type")]
    pub lvm_type: LvmType,
    /// The thin pool LV inside `volume_group` (default "kiln-pool"); must exist for `thin`.
    #[serde(default = "default_thin_pool")]
    pub thin_pool: String,
    /// COW space of a thick snapshot, in percent of the origin's size (default 100, like
    /// Cinder: the snapshot can never overflow). Smaller values save space but a snapshot
    /// becomes invalid once more than that share of the origin has been rewritten.
    #[serde(default = "default_snapshot_percent")]
    pub thick_snapshot_percent: u32,
    /// Zero the COW store of a thick snapshot before removing it (default true). The COW holds
    /// copies of the origin's old blocks; freed extents are handed to later LVs unwiped, so
    /// without this a later volume could read another tenant's data (Cinder's `volume_clear`).
    #[serde(default = "default_true")]
    pub zero_deleted_thick_snapshots: bool,
    /// Zero a thick volume before removing it (default true), for the same reason as
    /// `zero_deleted_thick_snapshots`. Thin volumes need no zeroing: the pool hands out only
    /// zeroed or fully overwritten blocks (kiln warns at start-up if the pool's zeroing is off).
    #[serde(default = "default_true")]
    pub zero_deleted_thick_volumes: bool,
    /// Seconds after which a single lvm command is killed and reported as failed (default 120).
    #[serde(default = "default_timeout")]
    pub command_timeout_secs: u64,
}

fn default_thin_pool() -> String {
    "kiln-pool".to_string()
}
fn default_snapshot_percent() -> u32 {
    100
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> u64 {
    120
}

impl LvmConfig {
    /// A configuration for `volume_group` with every other key at its default.
    pub fn new(volume_group: impl Into<String>) -> Self {
        LvmConfig {
            volume_group: volume_group.into(),
            lvm_type: LvmType::Auto,
            thin_pool: default_thin_pool(),
            thick_snapshot_percent: default_snapshot_percent(),
            zero_deleted_thick_snapshots: true,
            zero_deleted_thick_volumes: true,
            command_timeout_secs: default_timeout(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c: LvmConfig = serde_json::from_str(r#"{"volume_group":"vg0"}"#).unwrap();
        assert_eq!(c, LvmConfig::new("vg0"));
        let c: LvmConfig = serde_json::from_str(
            r#"{"volume_group":"vg0","type":"thick","thick_snapshot_percent":20}"#,
        )
        .unwrap();
        assert_eq!(c.lvm_type, LvmType::Thick);
        assert_eq!(c.thick_snapshot_percent, 20);
        assert!(serde_json::from_str::<LvmConfig>(r#"{"volume_group":"v","pool":"x"}"#).is_err());
        assert!(serde_json::from_str::<LvmConfig>(r#"{"volume_group":"v","type":"fat"}"#).is_err());
    }
}
