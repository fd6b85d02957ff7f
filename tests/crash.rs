//! Crash safety: kiln is killed (abort) between a driver call and the store update around it,
//! in both directions, for create, delete and revert, on both file formats (raw+reflink on
//! XFS, qcow2 chains with qemu-img); the next start must leave no transitional status, no
//! backend object without a record, and no record whose backend object is missing unless it
//! is marked `error` with a reason.
//! Needs the `failpoints` feature (tests/run-all.sh enables it). Without it this file does
//! not quietly compile to zero tests: the guard test below fails, and so does every crash
//! test (kiln cannot be crashed on purpose, so nothing aborts).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;

use common::{Kiln, chain_record, listing, s, tree, write_at};
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

const TRANSITIONAL: [&str; 5] = [
    "creating",
    "deleting",
    "restoring",
    "reverting",
    "restoring-backup",
];

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

/// The two file formats the matrix runs on.
#[derive(Clone, Copy, Debug)]
enum Format {
    Raw,
    Qcow2,
}

const FORMATS: [Format; 2] = [Format::Raw, Format::Qcow2];

impl Format {
    fn backend(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow",
        }
    }

    /// Backend objects: `volume-<id>` / `snapshot-<id>`. For qcow2 a volume is a directory
    /// and its snapshots are the entries of its chain record.
    fn objects(self, k: &Kiln) -> Vec<String> {
        match self {
            Format::Raw => listing(&k.raw_dir())
                .into_iter()
                .filter(|f| !f.starts_with('.'))
                .collect(),
            Format::Qcow2 => {
                let mut out = Vec::new();
                let Ok(rd) = std::fs::read_dir(k.qcow_dir()) else {
                    return out;
                };
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if !name.starts_with("volume-") || !e.path().join("chain.json").exists() {
                        continue;
                    }
                    let c = chain_record(&e.path());
                    for id in c["snapshots"].as_object().unwrap().keys() {
                        out.push(format!("snapshot-{id}"));
                    }
                    out.push(name);
                }
                out.sort();
                out
            }
        }
    }

    /// The file the volume's data lives in now (raw file, or the qcow2 active layer).
    fn active(self, k: &Kiln, vid: &str) -> PathBuf {
        match self {
            Format::Raw => k.raw_dir().join(format!("volume-{vid}")),
            Format::Qcow2 => k.qcow_active(vid),
        }
    }

    /// Writes `data` at offset 0 of the volume as a guest would.
    fn write(self, k: &Kiln, vid: &str, data: &[u8]) {
        let path = self.active(k, vid);
        match self {
            Format::Raw => write_at(&path, 0, data),
            Format::Qcow2 => k.qemu_io_write(&path, 0, data),
        }
    }

    /// The volume's whole data, as a guest would read it.
    fn read(self, k: &Kiln, vid: &str) -> Vec<u8> {
        let path = self.active(k, vid);
        match self {
            Format::Raw => std::fs::read(&path).unwrap(),
            Format::Qcow2 => {
                let out = k.dir.path().join("read.raw");
                let _ = std::fs::remove_file(&out);
                let st = Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "raw"])
                    .arg(&path)
                    .arg(&out)
                    .status()
                    .unwrap();
                assert!(st.success());
                std::fs::read(&out).unwrap()
            }
        }
    }
}

/// The invariants after recovery (which any kiln start runs).
fn check_consistent(k: &Kiln, f: Format) -> (Vec<Value>, Vec<Value>) {
    let vols = k.json(&["volume", "list"]).as_array().unwrap().clone();
    let snaps = k.json(&["snapshot", "list"]).as_array().unwrap().clone();
    let files = f.objects(k);
    let mut recorded = Vec::new();
    for (kind, obj) in vols
        .iter()
        .map(|v| ("volume", v))
        .chain(snaps.iter().map(|s| ("snapshot", s)))
    {
        let status = s(obj, "status");
        assert!(
            !TRANSITIONAL.contains(&status.as_str()),
            "{f:?}: {kind} left in {status}: {obj}"
        );
        let file = format!("{kind}-{}", s(obj, "id"));
        if files.contains(&file) {
            assert!(
                status == "error" || !obj["provider_location"].is_null(),
                "{f:?}: {kind} without its backend location: {obj}"
            );
            recorded.push(file);
        } else {
            assert_eq!(
                status, "error",
                "{f:?}: {kind} record without backend object: {obj}"
            );
            assert!(
                obj["status_reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{f:?}: error without a reason: {obj}"
            );
        }
    }
    for o in &files {
        assert!(
            recorded.contains(o),
            "{f:?}: backend object {o} has no record (objects {files:?})"
        );
    }
    (vols, snaps)
}

fn volume_with_data(k: &Kiln, f: Format) -> String {
    let v = k.json(&[
        "volume",
        "create",
        "--size",
        "16M",
        "--backend",
        f.backend(),
    ]);
    let vid = s(&v, "id");
    f.write(k, &vid, &pattern(7, 1 << 20));
    vid
}

#[test]
fn crash_during_volume_create() {
    for f in FORMATS {
        for phase in ["before_driver", "after_driver"] {
            let k = Kiln::new();
            crash(
                &k,
                &format!("create_volume::{phase}"),
                &[
                    "volume",
                    "create",
                    "--size",
                    "16M",
                    "--backend",
                    f.backend(),
                ],
            );
            let (vols, _) = check_consistent(&k, f);
            assert_eq!(vols.len(), 1, "{f:?} {phase}");
            assert_eq!(
                vols[0]["status"], "available",
                "{f:?} {phase}: creation is redone"
            );
        }
    }
}

#[test]
fn crash_during_snapshot_create() {
    for f in FORMATS {
        for (phase, expect) in [("before_driver", "error"), ("after_driver", "available")] {
            let k = Kiln::new();
            let vid = volume_with_data(&k, f);
            crash(
                &k,
                &format!("create_snapshot::{phase}"),
                &["snapshot", "create", &vid],
            );
            let (_, snaps) = check_consistent(&k, f);
            assert_eq!(snaps.len(), 1, "{f:?} {phase}");
            assert_eq!(snaps[0]["status"], expect, "{f:?} {phase}: {}", snaps[0]);
            // The volume is still usable afterwards.
            k.json(&["snapshot", "create", &vid]);
            check_consistent(&k, f);
        }
    }
}

#[test]
fn crash_during_snapshot_delete() {
    for f in FORMATS {
        for phase in ["before_driver", "after_driver"] {
            let k = Kiln::new();
            let vid = volume_with_data(&k, f);
            let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
            crash(
                &k,
                &format!("delete_snapshot::{phase}"),
                &["snapshot", "delete", &sid],
            );
            let (_, snaps) = check_consistent(&k, f);
            assert!(
                snaps.is_empty(),
                "{f:?} {phase}: the delete is rolled forward: {snaps:?}"
            );
            assert_eq!(k.json(&["volume", "show", &vid])["status"], "available");
        }
    }
}

#[test]
fn crash_during_volume_delete() {
    for f in FORMATS {
        for phase in ["before_driver", "after_driver"] {
            let k = Kiln::new();
            let vid = volume_with_data(&k, f);
            crash(
                &k,
                &format!("delete_volume::{phase}"),
                &["volume", "delete", &vid],
            );
            let (vols, _) = check_consistent(&k, f);
            assert!(vols.is_empty(), "{f:?} {phase}: {vols:?}");
        }
    }
}

#[test]
fn crash_during_revert() {
    for f in FORMATS {
        for phase in ["before_driver", "after_driver"] {
            let k = Kiln::new();
            let vid = volume_with_data(&k, f);
            let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
            let snap_data = f.read(&k, &vid);
            f.write(&k, &vid, &pattern(8, 2 << 20));
            assert_ne!(f.read(&k, &vid), snap_data);
            crash(
                &k,
                &format!("revert::{phase}"),
                &["snapshot", "revert", &sid],
            );
            let (vols, snaps) = check_consistent(&k, f);
            assert_eq!(vols[0]["status"], "available", "{f:?} {phase}");
            assert_eq!(snaps[0]["status"], "available", "{f:?} {phase}");
            assert!(
                f.read(&k, &vid) == snap_data,
                "{f:?} {phase}: the revert is rolled forward"
            );
        }
    }
}

/// A backup target directory for the crash tests.
fn backup_target(k: &Kiln) -> (PathBuf, String) {
    let d = k.path("backups");
    std::fs::create_dir_all(&d).unwrap();
    let t = format!("dir:{}", d.display());
    (d, t)
}

/// No backup is left in a transitional status and the target holds exactly the available
/// backups' directories (no partial or half-deleted one).
fn check_backups(k: &Kiln, dir: &std::path::Path) -> Vec<Value> {
    let backups = k.json(&["backup", "list"]).as_array().unwrap().clone();
    let mut want: Vec<String> = backups
        .iter()
        .map(|b| {
            assert_eq!(b["status"], "available", "{b}");
            format!("kiln-backup-{}", s(b, "id"))
        })
        .collect();
    want.sort();
    let top: Vec<String> = tree(dir).into_iter().filter(|p| !p.contains('/')).collect();
    assert_eq!(top, want, "the target holds other than the backups");
    backups
}

/// Killed while writing a backup (stream written; manifest written but not renamed into
/// place; renamed but not recorded): the next start leaves no half backup and no stuck
/// status — a backup the target holds whole is kept and verifies, anything else is gone —
/// and a backup can be made again.
#[test]
fn crash_during_backup_create() {
    for f in FORMATS {
        for (phase, kept) in [
            ("before_commit", false),
            ("before_rename", false),
            ("after_commit", true),
        ] {
            let k = Kiln::new();
            let (dir, target) = backup_target(&k);
            let vid = volume_with_data(&k, f);
            crash(
                &k,
                &format!("backup_create::{phase}"),
                &["backup", "create", &vid, "--target", &target],
            );
            check_consistent(&k, f);
            let backups = check_backups(&k, &dir);
            assert_eq!(
                backups.len(),
                usize::from(kept),
                "{f:?} {phase}: {backups:?}"
            );
            if kept {
                k.json(&["backup", "verify", &s(&backups[0], "id")]);
            }
            k.json(&["backup", "create", &vid, "--target", &target]);
            check_backups(&k, &dir);
        }
    }
}

/// Killed after a delete was journaled, before the files went: the next start finishes it.
#[test]
fn crash_during_backup_delete() {
    let f = Format::Raw;
    let k = Kiln::new();
    let (dir, target) = backup_target(&k);
    let vid = volume_with_data(&k, f);
    let b = s(
        &k.json(&["backup", "create", &vid, "--target", &target]),
        "id",
    );
    crash(
        &k,
        "backup_delete::before_remove",
        &["backup", "delete", &b],
    );
    check_consistent(&k, f);
    assert!(check_backups(&k, &dir).is_empty());
}

/// Killed while a backup is restored (all written, not yet flushed and recorded), into a new
/// volume and over an existing one: the volume is `error` with the reason, never silently
/// partial, and can be deleted.
#[test]
fn crash_during_backup_restore() {
    for f in FORMATS {
        let k = Kiln::new();
        let (_, target) = backup_target(&k);
        let vid = volume_with_data(&k, f);
        let b = s(
            &k.json(&["backup", "create", &vid, "--target", &target]),
            "id",
        );
        let over = s(
            &k.json(&[
                "volume",
                "create",
                "--size",
                "16M",
                "--backend",
                f.backend(),
            ]),
            "id",
        );
        for args in [
            vec!["backup", "restore", b.as_str(), "--backend", f.backend()],
            vec!["backup", "restore", b.as_str(), "--volume", over.as_str()],
        ] {
            let before: Vec<String> = k
                .json(&["volume", "list"])
                .as_array()
                .unwrap()
                .iter()
                .map(|v| s(v, "id"))
                .collect();
            crash(&k, "restore::before_finish", &args);
            let (vols, _) = check_consistent(&k, f);
            let restored: Vec<&Value> = vols
                .iter()
                .filter(|v| !before.contains(&s(v, "id")) || s(v, "id") == over)
                .filter(|v| s(v, "id") != vid)
                .collect();
            let target_vol = restored
                .iter()
                .find(|v| args.contains(&"--volume") == (s(v, "id") == over))
                .unwrap_or_else(|| panic!("{f:?} {args:?}: no restored volume in {vols:?}"));
            assert_eq!(
                target_vol["status"], "error",
                "{f:?} {args:?}: {target_vol}"
            );
            assert!(
                s(target_vol, "status_reason").contains("interrupted"),
                "{target_vol}"
            );
        }
        // Both can be deleted; the backup is untouched.
        for v in k.json(&["volume", "list"]).as_array().unwrap() {
            if s(v, "status") == "error" {
                k.json(&["volume", "delete", &s(v, "id")]);
            }
        }
        k.json(&["backup", "verify", &b]);
    }
}
