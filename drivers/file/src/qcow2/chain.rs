//! The per-volume chain record (`chain.json`): which qcow2 files exist, what each is backed
//! by, which file is the volume's active image and which file each snapshot froze.
//!
//! The record is the commit point of every qcow2 operation: it is replaced atomically (temp
//! file, fsync, rename, fsync directory) only after the files it names are complete, so a
//! crash leaves either the old or the new record. Files on disk that the record does not name
//! are leftovers of an interrupted operation and are removed under the volume lock.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Name of the record inside a volume directory.
pub(crate) const CHAIN_FILE: &str = "chain.json";

/// Deepest backing chain kiln builds. qemu opens every layer of a chain and a read that
/// misses the top layers walks down through each of them, so every snapshot kept on a volume
/// slows every read of it; past this depth a new snapshot is refused rather than letting the
/// volume degrade silently. Deleting older snapshots merges them and makes room.
pub const MAX_CHAIN_DEPTH: usize = 64;

const FORMAT_VERSION: u32 = 1;

/// One qcow2 file of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Layer {
    /// The file this one is backed by (a name in the same directory), `None` for a base.
    pub backing: Option<String>,
}

/// One snapshot: the file that was active when it was taken, frozen since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotEntry {
    /// The frozen file (top of the snapshot's chain).
    pub file: String,
    /// Volume size when the snapshot was taken.
    pub size_bytes: u64,
    /// Set (and committed) before a delete starts rebasing children, so that a delete a crash
    /// interrupted is finished by whichever operation locks the volume next, before anything
    /// else reads the children's backing from the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// Set together with `deleting` when the delete merges by commit: the snapshot's file
    /// has exactly this one child, which is committed into the snapshot's file (`qemu-img
    /// commit`), and the snapshot's file is then renamed over the child. Recorded before
    /// anything is written, so a re-run after a crash takes the same path: once the commit
    /// may have started, the snapshot's own image is no longer intact and the delete can
    /// only be rolled forward. `None` with `deleting` set: the rebase path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_child: Option<String>,
    /// Set together with `deleting` when a hypervisor merges the snapshot away while it has
    /// the volume open: the QMP job doing it, so that whoever locks the volume next can wait
    /// for it (or start it again) instead of touching files the hypervisor has open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_delete: Option<OnlineDelete>,
}

/// A snapshot delete that the hypervisor runs as a QMP block job (see
/// [`SnapshotEntry::online_delete`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OnlineDelete {
    /// The hypervisor's QMP monitor socket.
    pub qmp: String,
    /// The job's id.
    pub job: String,
    /// `commit`: the child (the active file) is committed into the snapshot's file, which
    /// becomes the active file; `stream`: the snapshot's file is streamed into the child,
    /// which is then backed by the snapshot's parent.
    pub mode: String,
    /// The snapshot file's one child.
    pub child: String,
}

/// The record. Invariant: `files` holds exactly the active file and one file per snapshot;
/// the active file is a leaf (nothing is backed by it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Chain {
    /// Record layout version.
    pub format_version: u32,
    /// The volume this directory holds.
    pub volume_id: String,
    /// Current size of the volume.
    pub size_bytes: u64,
    /// The file the volume's data is read from and written to now.
    pub active: String,
    /// Every file, by name.
    pub files: BTreeMap<String, Layer>,
    /// Every snapshot, by snapshot UUID.
    pub snapshots: BTreeMap<String, SnapshotEntry>,
    /// An online snapshot in flight: committed before kiln asks the hypervisor to switch the
    /// volume onto `overlay`, cleared when the record says which file is active again. While
    /// it is set, the overlay is not a leftover (the hypervisor may be writing into it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<OnlineSnapshot>,
    /// The QMP monitor of the hypervisor that had the volume open at its last online
    /// snapshot: a snapshot delete asks it whether it still has the chain open (then the
    /// hypervisor merges the layers) before touching any file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
}

/// An online snapshot in flight (see [`Chain::online`]): enough to ask the hypervisor, after
/// a crash, whether it switched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OnlineSnapshot {
    /// The snapshot being taken.
    pub snapshot: String,
    /// The new overlay file (not yet in `files`).
    pub overlay: String,
    /// The hypervisor's QMP monitor socket.
    pub qmp: String,
    /// The block node kiln adds for the overlay.
    pub overlay_node: String,
}

/// A fresh file name: `layer-<uuid>.qcow2`. Files are named from fresh UUIDs, not from the
/// snapshot that froze them, because a file is created (as the active overlay) before the
/// snapshot that will freeze it exists, and must keep its name while a hypervisor has it open.
pub(crate) fn new_layer_name() -> String {
    format!("layer-{}.qcow2", uuid::Uuid::new_v4().hyphenated())
}

/// Whether `name` is a layer file name kiln could have made (guards against a hand-edited or
/// corrupt record pointing outside the volume directory).
pub(crate) fn is_layer_name(name: &str) -> bool {
    name.strip_prefix("layer-")
        .and_then(|r| r.strip_suffix(".qcow2"))
        .is_some_and(|u| uuid::Uuid::try_parse(u).is_ok() && !u.contains('/'))
}

impl Chain {
    /// A volume made of one base file.
    pub(crate) fn new(volume_id: String, size_bytes: u64, base: String) -> Chain {
        let mut files = BTreeMap::new();
        files.insert(base.clone(), Layer { backing: None });
        Chain {
            format_version: FORMAT_VERSION,
            volume_id,
            size_bytes,
            active: base,
            files,
            snapshots: BTreeMap::new(),
            online: None,
            hypervisor: None,
        }
    }

    /// Loads the record of the volume directory `dir`; `None` if there is none.
    pub(crate) fn load(dir: &Path) -> Result<Option<Chain>> {
        let path = dir.join(CHAIN_FILE);
        let bytes = match sys::read_small(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let chain: Chain = serde_json::from_slice(&bytes).map_err(|e| {
            Error::backend("read chain", format!("{} is corrupt: {e}", path.display()))
        })?;
        chain
            .validate()
            .map_err(|m| Error::backend("read chain", format!("{}: {m}", path.display())))?;
        Ok(Some(chain))
    }

    /// Atomically replaces the record in `dir`.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::backend("write chain", e.to_string()))?;
        sys::atomic_write(&dir.join(CHAIN_FILE), &bytes)
    }

    /// Structural checks: known version, only layer names, every reference resolves, no loops.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!("unknown format_version {}", self.format_version));
        }
        for (name, l) in &self.files {
            if !is_layer_name(name) {
                return Err(format!("bad file name {name:?}"));
            }
            if let Some(b) = l.backing.as_ref().filter(|b| !self.files.contains_key(*b)) {
                return Err(format!("{name} is backed by unknown file {b}"));
            }
        }
        if !self.files.contains_key(&self.active) {
            return Err(format!("active file {} is not recorded", self.active));
        }
        for (id, s) in &self.snapshots {
            if !self.files.contains_key(&s.file) {
                return Err(format!("snapshot {id} names unknown file {}", s.file));
            }
            if let Some(od) = &s.online_delete {
                let child_of_file = self
                    .files
                    .get(&od.child)
                    .is_some_and(|l| l.backing.as_deref() == Some(s.file.as_str()));
                if !s.deleting || !child_of_file || !matches!(od.mode.as_str(), "commit" | "stream")
                {
                    return Err(format!(
                        "snapshot {id}: online_delete {od:?} is not a pending delete's merge \
                         of a child of {}",
                        s.file
                    ));
                }
            }
            if let Some(c) = &s.commit_child {
                let child_of_file = self
                    .files
                    .get(c)
                    .is_some_and(|l| l.backing.as_deref() == Some(s.file.as_str()));
                if !s.deleting || !child_of_file {
                    return Err(format!(
                        "snapshot {id}: commit_child {c} is not a pending delete's child of {}",
                        s.file
                    ));
                }
            }
        }
        if let Some(o) = &self.online
            && (!is_layer_name(&o.overlay) || self.files.contains_key(&o.overlay))
        {
            return Err(format!(
                "online snapshot overlay {:?} is not a new layer",
                o.overlay
            ));
        }
        for name in self.files.keys() {
            if self.depth(name) > self.files.len() {
                return Err(format!("backing loop through {name}"));
            }
        }
        Ok(())
    }

    /// Number of files in the chain from `file` down to its base (1 for a base file).
    pub(crate) fn depth(&self, file: &str) -> usize {
        let mut n = 0;
        let mut cur = Some(file);
        while let Some(f) = cur {
            n += 1;
            if n > self.files.len() + 1 {
                break; // a loop; `check` reports it
            }
            cur = self.files.get(f).and_then(|l| l.backing.as_deref());
        }
        n
    }

    /// Files backed directly by `file`.
    pub(crate) fn children(&self, file: &str) -> Vec<String> {
        self.files
            .iter()
            .filter(|(_, l)| l.backing.as_deref() == Some(file))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether some snapshot froze `file`.
    pub(crate) fn is_snapshot_file(&self, file: &str) -> bool {
        self.snapshots.values().any(|s| s.file == file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_depth() {
        let a = new_layer_name();
        assert!(is_layer_name(&a));
        assert!(!is_layer_name("../etc/passwd"));
        assert!(!is_layer_name("layer-../../x.qcow2"));
        let mut c = Chain::new("v".into(), 1 << 20, a.clone());
        let b = new_layer_name();
        c.files.insert(
            b.clone(),
            Layer {
                backing: Some(a.clone()),
            },
        );
        c.active = b.clone();
        assert_eq!(c.depth(&b), 2);
        assert_eq!(c.children(&a), vec![b.clone()]);
        assert!(c.validate().is_ok());
        c.files.get_mut(&a).unwrap().backing = Some(b.clone());
        assert!(c.validate().is_err(), "a loop must be refused");
    }
}
