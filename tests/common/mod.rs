//! Shared harness for the end-to-end tests: runs the real `kiln` binary against a data
//! directory and a config with two file backends — raw+reflink on a real loop-mounted XFS,
//! and qcow2 (real qemu-img) on a plain directory.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::XfsMount;
use serde_json::Value;

pub struct Kiln {
    pub dir: tempfile::TempDir,
    pub xfs: XfsMount,
    pub config: PathBuf,
}

impl Kiln {
    /// A fresh data dir and config; `raw` (XFS, default backend) and `qcow` backends.
    pub fn new() -> Kiln {
        let dir = tempfile::tempdir().unwrap();
        let xfs = XfsMount::new(1 << 30);
        let config = dir.path().join("kiln.toml");
        std::fs::write(
            &config,
            format!(
                "default_backend = \"raw\"\n\n[backends.raw]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n\n[backends.qcow]\ndriver = \"file\"\npath = \"qcow\"\nformat = \"qcow2\"\n",
                xfs.path().join("vols").display()
            ),
        )
        .unwrap();
        Kiln { dir, xfs, config }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn raw_dir(&self) -> PathBuf {
        self.xfs.path().join("vols")
    }

    pub fn qcow_dir(&self) -> PathBuf {
        self.data_dir().join("qcow")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.bare_cmd();
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// The binary with only the data directory set.
    pub fn bare_cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--data-dir").arg(self.data_dir());
        c.env_remove("FAILPOINTS")
            .env_remove("KILN_DATA_DIR")
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs with `--format json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--format", "json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "kiln {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kiln {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs, asserts the exit code and a one-line `kiln: error:` message; returns it.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(code),
            "kiln {args:?}: stderr {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "kiln {args:?}: expected one line, got {stderr:?}"
        );
        assert!(
            lines[0].starts_with("kiln: error: "),
            "kiln {args:?}: {stderr:?}"
        );
        stderr
    }

    /// Everything an operation could change: store listings and backend directory contents.
    pub fn state(&self) -> (Value, Value, Vec<String>, Vec<String>) {
        (
            self.json(&["volume", "list"]),
            self.json(&["snapshot", "list"]),
            listing(&self.raw_dir()),
            listing(&self.qcow_dir()),
        )
    }
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

pub fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
        .to_string()
}
