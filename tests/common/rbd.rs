//! The RBD tests' view of the test cluster behind kiln's back: its ceph.conf (from
//! `CEPH_CONF`, set by tests/harness/rbd-suite.sh) and the `rbd` CLI.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::run_bounded;

/// Hang guard for one `rbd` command (a correctness bound, not a performance target).
pub const RBD_LIMIT: Duration = Duration::from_secs(180);

/// The cluster's ceph.conf from `CEPH_CONF`; panics with instructions when unset.
pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("CEPH_CONF") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "CEPH_CONF={} is not a file; is the test cluster running?",
                p.display()
            );
            p
        }
        _ => panic!(
            "CEPH_CONF is not set: the kiln RBD tests need a real Ceph cluster. Run \
             tests/harness/rbd-suite.sh (starts a throw-away single-node cluster, runs the RBD \
             tests, stops it), or eval \"$(tests/harness/ceph-start.sh DIR)\" and then `cargo \
             test -p kiln --features rbd,failpoints --test <cli_rbd|instance_rbd>`."
        ),
    }
}

/// `rbd --conf CEPH_CONF ARGS…`, asserting success; returns stdout.
pub fn rbd(args: &[&str]) -> String {
    let mut c = Command::new("rbd");
    c.arg("--conf").arg(ceph_conf()).args(args);
    let (out, _) = run_bounded(c, RBD_LIMIT);
    assert!(
        out.status.success(),
        "rbd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `rbd ARGS… --format json`, parsed.
pub fn rbd_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--format", "json"]);
    let out = rbd(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rbd {args:?}: bad JSON ({e}): {out}"))
}

/// The whole pool as `rbd ls -l` sees it: every image and snapshot, sizes, parents, locks.
pub fn pool_listing() -> Value {
    rbd_json(&["ls", "-l", "rbd"])
}

/// Snapshot names of `image` according to `rbd snap ls`.
pub fn rbd_snaps(image: &str) -> Vec<String> {
    let v = rbd_json(&["snap", "ls", &format!("rbd/{image}")]);
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Image names in the pool.
pub fn rbd_images() -> Vec<String> {
    rbd_json(&["ls", "rbd"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// An rbd "diff v1" stream (the format `rbd export-diff` writes, documented in Ceph's
/// doc/dev/rbd-diff.rst) that writes each chunk at its offset: no from/to snapshot, no size
/// record, so `rbd import-diff` applies it to the image head as plain writes.
pub fn diff_file(chunks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut d = b"rbd diff v1\n".to_vec();
    for (off, data) in chunks {
        d.push(b'w');
        d.extend_from_slice(&off.to_le_bytes());
        d.extend_from_slice(&(data.len() as u64).to_le_bytes());
        d.extend_from_slice(data);
    }
    d.push(b'e');
    d
}
