//! Crash safety: kiln is killed (abort) between a driver call and the store update around it,
//! in both directions, for create, delete and revert; the next start must leave no
//! transitional status, no backend object without a record, and no record whose backend
//! object is missing unless it is marked `error` with a reason.
//! Needs the `failpoints` feature (tests/run-all.sh enables it). Without it this file does
//! not quietly compile to zero tests: the guard test below fails, and so does every crash
//! test (kiln cannot be crashed on purpose, so nothing aborts).

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;

use common::{Kiln, listing, s};
use kiln_testkit::pattern;
use serde_json::Value;

/// A crash test run without fail points would prove nothing; say so loudly.
#[cfg(not(feature = "failpoints"))]
#[test]
fn built_with_the_failpoints_feature() {
    panic!(
        "tests/crash.rs needs `cargo test --features failpoints` (tests/run-all.sh passes it): \
         without fail points kiln cannot be crashed at the moments recovery must handle"
    );
}

const TRANSITIONAL: [&str; 4] = ["creating", "deleting", "restoring", "reverting"];

/// Runs kiln with the fail point armed and asserts it died by SIGABRT.
fn crash(k: &Kiln, point: &str, args: &[&str]) {
    let out = k
        .cmd(args)
        .env("FAILPOINTS", format!("{point}=return"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc_sigabrt()),
        "kiln {args:?} with {point} did not abort: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn libc_sigabrt() -> i32 {
    6
}

/// The invariants after recovery (which any kiln start runs).
fn check_consistent(k: &Kiln) -> (Vec<Value>, Vec<Value>) {
    let vols = k.json(&["volume", "list"]).as_array().unwrap().clone();
    let snaps = k.json(&["snapshot", "list"]).as_array().unwrap().clone();
    let files: Vec<String> = listing(&k.raw_dir())
        .into_iter()
        .filter(|f| !f.starts_with('.'))
        .collect();
    let mut recorded = Vec::new();
    for (kind, obj) in vols
        .iter()
        .map(|v| ("volume", v))
        .chain(snaps.iter().map(|s| ("snapshot", s)))
    {
        let status = s(obj, "status");
        assert!(
            !TRANSITIONAL.contains(&status.as_str()),
            "{kind} left in {status}: {obj}"
        );
        let file = format!("{kind}-{}", s(obj, "id"));
        if files.contains(&file) {
            recorded.push(file);
        } else {
            assert_eq!(
                status, "error",
                "{kind} record without backend object: {obj}"
            );
            assert!(
                obj["status_reason"].as_str().is_some_and(|r| !r.is_empty()),
                "error without a reason: {obj}"
            );
        }
    }
    for f in &files {
        assert!(
            recorded.contains(f),
            "backend object {f} has no record (files {files:?})"
        );
    }
    (vols, snaps)
}

fn volume_with_data(k: &Kiln) -> (String, String) {
    let v = k.json(&["volume", "create", "--size", "16M"]);
    let path = s(&v, "provider_location");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&pattern(7, 1 << 20), 0).unwrap();
    (s(&v, "id"), path)
}

#[test]
fn crash_during_volume_create() {
    for phase in ["before_driver", "after_driver"] {
        let k = Kiln::new();
        crash(
            &k,
            &format!("create_volume::{phase}"),
            &["volume", "create", "--size", "16M"],
        );
        let (vols, _) = check_consistent(&k);
        assert_eq!(vols.len(), 1, "{phase}");
        assert_eq!(
            vols[0]["status"], "available",
            "{phase}: creation is redone"
        );
    }
}

#[test]
fn crash_during_snapshot_create() {
    for (phase, expect) in [("before_driver", "error"), ("after_driver", "available")] {
        let k = Kiln::new();
        let (vid, _) = volume_with_data(&k);
        crash(
            &k,
            &format!("create_snapshot::{phase}"),
            &["snapshot", "create", &vid],
        );
        let (_, snaps) = check_consistent(&k);
        assert_eq!(snaps.len(), 1, "{phase}");
        assert_eq!(snaps[0]["status"], expect, "{phase}: {}", snaps[0]);
        // The volume is still usable afterwards.
        k.json(&["snapshot", "create", &vid]);
        check_consistent(&k);
    }
}

#[test]
fn crash_during_snapshot_delete() {
    for phase in ["before_driver", "after_driver"] {
        let k = Kiln::new();
        let (vid, _) = volume_with_data(&k);
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        crash(
            &k,
            &format!("delete_snapshot::{phase}"),
            &["snapshot", "delete", &sid],
        );
        let (_, snaps) = check_consistent(&k);
        assert!(
            snaps.is_empty(),
            "{phase}: the delete is rolled forward: {snaps:?}"
        );
    }
}

#[test]
fn crash_during_volume_delete() {
    for phase in ["before_driver", "after_driver"] {
        let k = Kiln::new();
        let (vid, _) = volume_with_data(&k);
        crash(
            &k,
            &format!("delete_volume::{phase}"),
            &["volume", "delete", &vid],
        );
        let (vols, _) = check_consistent(&k);
        assert!(vols.is_empty(), "{phase}: {vols:?}");
    }
}

#[test]
fn crash_during_revert() {
    for phase in ["before_driver", "after_driver"] {
        let k = Kiln::new();
        let (vid, path) = volume_with_data(&k);
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        let snap_data = std::fs::read(&path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&pattern(8, 2 << 20), 0).unwrap();
        drop(f);
        crash(
            &k,
            &format!("revert::{phase}"),
            &["snapshot", "revert", &sid],
        );
        let (vols, snaps) = check_consistent(&k);
        assert_eq!(vols[0]["status"], "available", "{phase}");
        assert_eq!(snaps[0]["status"], "available", "{phase}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            snap_data,
            "{phase}: the revert is rolled forward"
        );
    }
}
