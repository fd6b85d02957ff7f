//! The file backends' harness: a config with raw+reflink on a real loop-mounted XFS (`raw`,
//! the default) and qcow2 with the real qemu-img on a plain directory (`qcow`), and what the
//! file tests read and write behind kiln's back (backend directory listings, the qcow2 chain
//! record, guest writes through qemu-io).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::XfsMount;
use serde_json::Value;

use super::Kiln;

impl Kiln<XfsMount> {
    /// A fresh data dir and config; `raw` (XFS, default backend) and `qcow` backends.
    pub fn new() -> Kiln<XfsMount> {
        let dir = tempfile::tempdir().unwrap();
        let xfs = XfsMount::new(1 << 30);
        let config = format!(
            "default_backend = \"raw\"\n\n[backends.raw]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n\n[backends.qcow]\ndriver = \"file\"\npath = \"qcow\"\nformat = \"qcow2\"\n",
            xfs.path().join("vols").display()
        );
        Kiln::with_config(dir, &config, xfs)
    }

    /// The `raw` backend's directory (on the XFS).
    pub fn raw_dir(&self) -> PathBuf {
        self.fixture.path().join("vols")
    }

    /// The `qcow` backend's directory (relative to the data dir in the config).
    pub fn qcow_dir(&self) -> PathBuf {
        self.data_dir().join("qcow")
    }

    /// Everything an operation could change: store listings and backend directory contents.
    pub fn state(&self) -> (Value, Value, Vec<String>, Vec<String>) {
        let (volumes, snapshots) = self.store();
        (
            volumes,
            snapshots,
            listing(&self.raw_dir()),
            listing(&self.qcow_dir()),
        )
    }

    /// The file a qcow2 volume's data lives in now: its active layer, per its chain record.
    pub fn qcow_active(&self, vid: &str) -> PathBuf {
        let dir = self.qcow_dir().join(format!("volume-{vid}"));
        let chain = chain_record(&dir);
        dir.join(chain["active"].as_str().unwrap())
    }

    /// Writes `data` at `offset` into the qcow2 image `image` as a guest would (`qemu-io`
    /// write + flush), from a scratch file in the test's directory.
    pub fn qemu_io_write(&self, image: &Path, offset: u64, data: &[u8]) {
        let src = self.path("qemu-io-write.bin");
        std::fs::write(&src, data).unwrap();
        let cmd = format!("write -s {} {offset} {}", src.display(), data.len());
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd, "-c", "flush"])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The qcow2 chain record (`chain.json`) of the volume directory `vdir`.
pub fn chain_record(vdir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap()
}

/// Names of the volume/snapshot objects in a backend directory (recursively), sorted;
/// bookkeeping files (the format marker, locks) are not backend objects.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let top = rel.split('/').next().unwrap_or_default();
        if !(top.starts_with("volume-") || top.starts_with("snapshot-") || top.starts_with('.'))
            || rel.contains("lock")
        {
            continue;
        }
        out.push(rel);
        if p.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// Every path under `dir` (relative, hidden ones included, recursively), sorted: a backup
/// target's whole contents.
pub fn tree(dir: &Path) -> Vec<String> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().to_string());
            if p.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out);
    out.sort();
    out
}
