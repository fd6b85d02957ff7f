//! End-to-end tests of `kiln backup` on the real file backends (raw+reflink on a real XFS,
//! qcow2 with the real qemu tools): full and incremental backups in one directory target,
//! restores onto the other backend and over an existing volume, verification that names a
//! damaged chunk, retention of chains, and bad input that changes nothing.

mod common;

use std::path::{Path, PathBuf};

use common::{Kiln, s, tree, write_at};
use kiln_testkit::{XfsMount, pattern};
use serde_json::Value;

/// Writes `data` at `offset` into volume `vid` of `backend` as a guest would.
fn write(k: &Kiln<XfsMount>, backend: &str, vid: &str, offset: u64, data: &[u8]) {
    if backend == "raw" {
        write_at(k.raw_dir().join(format!("volume-{vid}")), offset, data);
    } else {
        k.qemu_io_write(&k.qcow_active(vid), offset, data);
    }
}

/// The store, the backend directories, and the backup target's contents.
fn everything(
    k: &Kiln<XfsMount>,
    target: &Path,
) -> (Value, Value, Vec<String>, Vec<String>, Value, Vec<String>) {
    let (v, sn, raw, qcow) = k.state();
    (v, sn, raw, qcow, k.json(&["backup", "list"]), tree(target))
}

fn target_dir(k: &Kiln<XfsMount>, name: &str) -> PathBuf {
    let d = k.path(name);
    std::fs::create_dir(&d).unwrap();
    d
}

/// A full backup and two incrementals of each file format, each restored onto the other
/// format (and the last over an existing volume): every restore equals its snapshot. The
/// records carry what the issue lists (id, volume, snapshot, parent, target, status, sizes,
/// time); incrementals read only what changed (the backend's tracking) and store little.
#[test]
fn full_and_incremental_backups_restore_onto_the_other_backend() {
    let k = Kiln::new();
    for (src, dst) in [("raw", "qcow"), ("qcow", "raw")] {
        let dir = target_dir(&k, &format!("backups-{src}"));
        let target = format!("dir:{}", dir.display());
        let vid = s(
            &k.json(&["volume", "create", "--size", "32M", "--backend", src]),
            "id",
        );
        write(&k, src, &vid, 0, &pattern(1, 8 << 20));
        let b1 = k.json(&[
            "backup", "create", &vid, "--target", &target, "--name", "nightly",
        ]);
        write(&k, src, &vid, 2 << 20, &pattern(2, 64 << 10));
        write(&k, src, &vid, 4 << 20, &vec![0u8; 128 << 10]);
        let b2 = k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]);
        write(&k, src, &vid, 30 << 20, &pattern(3, 4096));
        let b3 = k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]);

        for key in [
            "id",
            "volume_id",
            "snapshot_id",
            "parent_id",
            "target",
            "status",
            "size_bytes",
            "stored_bytes",
            "created_at",
        ] {
            assert!(b1.get(key).is_some(), "{src}: no {key} in {b1}");
        }
        assert_eq!(b1["parent_id"], Value::Null);
        assert_eq!(b1["name"], "nightly");
        assert_eq!(b2["parent_id"], b1["id"], "{src}");
        assert_eq!(b3["parent_id"], b2["id"], "{src}");
        for b in [&b1, &b2, &b3] {
            assert_eq!(b["status"], "available", "{b}");
            assert_eq!(b["target"], target.as_str());
            assert_eq!(b["size_bytes"], 32u64 << 20);
        }
        assert!(b1["stored_bytes"].as_u64().unwrap() >= 8 << 20, "{b1}");
        // 192 KiB changed, then 4 KiB: the backend's tracking keeps reads and storage near
        // that, far from the 8 MiB of data.
        for (b, changed) in [(&b2, 192u64 << 10), (&b3, 4096)] {
            let read = b["stream"]["read_bytes"].as_u64().unwrap();
            let stored = b["stored_bytes"].as_u64().unwrap();
            assert!(read >= changed && read <= 1 << 20, "{src}: {b}");
            assert!(stored <= (1 << 20) + 4096, "{src}: {b}");
        }
        let listed = k.json(&["backup", "list", "--volume", &vid]);
        assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
        let shown = k.json(&["backup", "show", &s(&b3, "id")]);
        assert_eq!(shown["snapshot_id"], b3["snapshot_id"]);

        for b in [&b1, &b2, &b3] {
            let v = k.json(&["backup", "verify", &s(b, "id")]);
            assert_eq!(v["backup_id"], b["id"], "{v}");
            let r = k.json(&["backup", "restore", &s(b, "id"), "--backend", dst]);
            assert_eq!(r["backend"], dst, "{r}");
            assert_eq!(r["status"], "available", "{r}");
            k.assert_holds(&r, &s(b, "snapshot_id"), &format!("{src} -> {dst}"));
        }
        // Over an existing detached volume (holding other data) of the same size.
        let over = s(
            &k.json(&["volume", "create", "--size", "32M", "--backend", dst]),
            "id",
        );
        write(&k, dst, &over, 0, &pattern(9, 32 << 20));
        let r = k.json(&["backup", "restore", &s(&b3, "id"), "--volume", &over]);
        assert_eq!(r["id"], over.as_str());
        k.assert_holds(&r, &s(&b3, "snapshot_id"), &format!("{src} over {dst}"));
    }
}

/// One byte changed in a stored chunk: `backup verify` fails naming the chunk, and a restore
/// that needs it fails naming it too and leaves nothing behind (no new volume, nothing in the
/// store, the target untouched); over an existing volume, nothing is written to it.
#[test]
fn a_damaged_chunk_fails_verify_and_restore_naming_it_and_nothing_is_restored() {
    let k = Kiln::new();
    let dir = target_dir(&k, "backups");
    let target = format!("dir:{}", dir.display());
    let vid = s(&k.json(&["volume", "create", "--size", "40M"]), "id");
    write(&k, "raw", &vid, 0, &pattern(5, 36 << 20));
    let b1 = s(
        &k.json(&["backup", "create", &vid, "--target", &target]),
        "id",
    );
    write(&k, "raw", &vid, 0, &pattern(6, 4096));
    let b2 = s(
        &k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]),
        "id",
    );
    // 36 MiB of data: three chunk files. Damage the second.
    let chunk = dir.join(format!("kiln-backup-{b1}")).join("stream.000001");
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&chunk, &bytes).unwrap();

    let e = k.fails(&["backup", "verify", &b1], 8);
    assert!(e.contains("stream.000001") && e.contains(&b1), "{e}");
    // b2's own chunks are intact ...
    k.json(&["backup", "verify", &b2]);
    // ... but restoring it needs b1.
    let over = s(&k.json(&["volume", "create", "--size", "40M"]), "id");
    write(&k, "raw", &over, 0, &pattern(7, 1 << 20));
    let (over_before, _) = {
        let snap = s(&k.json(&["snapshot", "create", &over]), "id");
        let e = k.export(&snap);
        k.json(&["snapshot", "delete", &snap]);
        e
    };
    let before = everything(&k, &dir);
    for args in [
        vec!["backup", "restore", b2.as_str()],
        vec!["backup", "restore", b2.as_str(), "--backend", "qcow"],
        vec!["backup", "restore", b2.as_str(), "--volume", over.as_str()],
    ] {
        let e = k.fails(&args, 8);
        assert!(e.contains("stream.000001"), "{args:?}: {e}");
        assert_eq!(
            everything(&k, &dir),
            before,
            "{args:?} left something behind"
        );
    }
    let snap = s(&k.json(&["snapshot", "create", &over]), "id");
    let (after, _) = k.export(&snap);
    assert!(
        after == over_before,
        "a refused restore wrote into the volume"
    );
}

/// Retention of chains: a backup an incremental builds on cannot be deleted (busy, naming
/// it); deleting newest first empties the target. Bad input — an unknown target scheme, a
/// missing or unwritable directory, an incremental with nothing to build on, a snapshot of
/// another volume, unknown ids — is one line with its exit code, and changes nothing: no
/// snapshot taken, no record, no file.
#[test]
fn chains_are_kept_whole_and_bad_input_changes_nothing() {
    let k = Kiln::new();
    let dir = target_dir(&k, "backups");
    let target = format!("dir:{}", dir.display());
    let vid = s(&k.json(&["volume", "create", "--size", "8M"]), "id");
    write(&k, "raw", &vid, 0, &pattern(8, 1 << 20));
    let other = s(&k.json(&["volume", "create", "--size", "8M"]), "id");
    let other_snap = s(&k.json(&["snapshot", "create", &other]), "id");

    let readonly = target_dir(&k, "readonly");
    lock_dir(&readonly, true);
    let file = k.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let before = everything(&k, &dir);
    let unknown = "5a0e0c1e-0000-4000-8000-000000000000";
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["--target".into(), "s3:bucket".into()],
            4,
            "dir:PATH or rbd:POOL",
        ),
        (
            vec!["--target".into(), "dir:/nonexistent/kiln".into()],
            4,
            "nonexistent",
        ),
        (
            vec!["--target".into(), format!("dir:{}", file.display())],
            4,
            "not a directory",
        ),
        (
            vec!["--target".into(), format!("dir:{}", readonly.display())],
            4,
            "not writable",
        ),
        (
            vec!["--target".into(), target.clone(), "--incremental".into()],
            4,
            "full backup first",
        ),
        (
            vec![
                "--target".into(),
                target.clone(),
                "--snapshot".into(),
                other_snap.clone(),
            ],
            4,
            "not a snapshot of volume",
        ),
        (
            vec!["--target".into(), target.clone(), "--name=-x;rm".into()],
            4,
            "name",
        ),
    ];
    for (extra, code, says) in cases {
        let mut args = vec!["backup".to_string(), "create".into(), vid.clone()];
        args.extend(extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = k.fails(&a, code);
        assert!(e.contains(says), "{a:?}: {e}");
        assert_eq!(everything(&k, &dir), before, "{a:?} changed something");
    }
    for (args, code) in [
        (
            vec!["backup", "create", unknown, "--target", target.as_str()],
            3,
        ),
        (vec!["backup", "show", unknown], 3),
        (vec!["backup", "delete", unknown], 3),
        (vec!["backup", "verify", unknown], 3),
        (vec!["backup", "restore", unknown], 3),
        (vec!["backup", "show", "../x"], 4),
    ] {
        k.fails(&args, code);
        assert_eq!(everything(&k, &dir), before, "{args:?} changed something");
    }
    lock_dir(&readonly, false);

    let b1 = s(
        &k.json(&["backup", "create", &vid, "--target", &target]),
        "id",
    );
    let b2 = s(
        &k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]),
        "id",
    );
    let before = everything(&k, &dir);
    let e = k.fails(&["backup", "delete", &b1], 6);
    assert!(e.contains(&b2), "{e}");
    assert_eq!(everything(&k, &dir), before);
    // A restore size mismatch over an existing volume is refused before anything is done.
    let small = s(&k.json(&["volume", "create", "--size", "4M"]), "id");
    let before = everything(&k, &dir);
    k.fails(&["backup", "restore", &b2, "--volume", &small], 4);
    assert_eq!(everything(&k, &dir), before);
    k.json(&["backup", "delete", &b2]);
    k.json(&["backup", "delete", &b1]);
    assert!(tree(&dir).is_empty(), "{:?}", tree(&dir));
    assert_eq!(k.json(&["backup", "list"]), Value::Array(vec![]));
}

/// Makes `dir` unwritable even for root (immutable), or writable again.
fn lock_dir(dir: &Path, locked: bool) {
    let flag = if locked { "+i" } else { "-i" };
    let out = std::process::Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chattr {flag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `backup prune` with Benji's syntax: `--dry-run` lists and changes nothing; a prune
/// removes what the policy does not keep (files and records, newest first) but never a
/// backup that a kept incremental builds on; a `--keep` that does not parse changes nothing.
#[test]
fn prune_keeps_what_the_policy_and_every_kept_chain_need() {
    let k = Kiln::new();
    let dir = target_dir(&k, "backups");
    let target = format!("dir:{}", dir.display());
    let vid = s(&k.json(&["volume", "create", "--size", "8M"]), "id");
    let mut ids = Vec::new();
    // full1 <- inc1, full2 <- inc2 <- inc3, full3
    for incremental in [false, true, false, true, true, false] {
        write(&k, "raw", &vid, 0, &pattern(ids.len() as u64, 64 << 10));
        let mut args = vec!["backup", "create", &vid, "--target", &target];
        if incremental {
            args.push("--incremental");
        }
        ids.push(s(&k.json(&args), "id"));
        // Distinct creation times (the policy orders by them).
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (full1, inc1, full2, inc2, inc3, full3) =
        (&ids[0], &ids[1], &ids[2], &ids[3], &ids[4], &ids[5]);

    let before = everything(&k, &dir);
    for bad in ["latest0", "days", "fortnights2", "days1,days2", ""] {
        let e = k.fails(
            &[
                "backup",
                "prune",
                "--volume",
                &vid,
                &format!("--keep={bad}"),
            ],
            4,
        );
        assert!(e.contains("--keep"), "{bad}: {e}");
    }
    k.fails(
        &[
            "backup",
            "prune",
            "--volume",
            "5a0e0c1e-0000-4000-8000-000000000000",
            "--keep",
            "latest1",
        ],
        3,
    );
    assert_eq!(everything(&k, &dir), before);

    // latest2 keeps full3 and inc3 — and inc3 needs inc2 and full2.
    let plan = k.json(&[
        "backup",
        "prune",
        "--volume",
        &vid,
        "--keep",
        "latest2",
        "--dry-run",
    ]);
    assert_eq!(everything(&k, &dir), before, "a dry run changed something");
    let kept: Vec<(String, String)> = plan["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (s(k, "id"), s(k, "reason")))
        .collect();
    let base = format!("base of {inc3}");
    assert_eq!(
        kept,
        vec![
            (full3.clone(), "latest".to_string()),
            (inc3.clone(), "latest".to_string()),
            (inc2.clone(), base.clone()),
            (full2.clone(), base),
        ]
    );
    let removed: Vec<String> = plan["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(removed, vec![inc1.clone(), full1.clone()]);
    assert_eq!(plan["dry_run"], true);

    let done = k.json(&["backup", "prune", "--volume", &vid, "--keep", "latest2"]);
    assert_eq!(done["removed"], plan["removed"]);
    let left: Vec<String> = k
        .json(&["backup", "list", "--volume", &vid])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| s(b, "id"))
        .collect();
    assert_eq!(
        left,
        vec![full2.clone(), inc2.clone(), inc3.clone(), full3.clone()]
    );
    let mut on_disk: Vec<String> = tree(&dir)
        .into_iter()
        .filter(|p| !p.contains('/'))
        .collect();
    on_disk.sort();
    let mut want: Vec<String> = left.iter().map(|i| format!("kiln-backup-{i}")).collect();
    want.sort();
    assert_eq!(on_disk, want);
    // What is left still restores.
    let r = k.json(&["backup", "restore", inc3]);
    assert_eq!(r["status"], "available");
}

/// `image export` then `image import` onto the other file format, then `image restore`: an
/// instance snapshot of raw+reflink volumes boots from qcow2 volumes holding exactly the
/// snapshots' data at the recorded devices and boot index; the imported image keeps the
/// original's properties with a mapping that names the new snapshots. An existing output
/// is never overwritten; an export without image.json, or with a damaged chunk, imports
/// nothing (the store and both backends unchanged).
#[test]
fn an_image_exported_with_its_data_boots_from_another_backend() {
    let k = Kiln::new();
    let inst = s(&k.json(&["instance", "create", "--name", "web"]), "id");
    let mut vols = Vec::new();
    for (i, (dev, boot)) in [("/dev/vda", Some("0")), ("/dev/vdb", None)]
        .iter()
        .enumerate()
    {
        let vid = s(&k.json(&["volume", "create", "--size", "16M"]), "id");
        write(&k, "raw", &vid, 4096, &pattern(30 + i as u64, 3 << 20));
        let mut args = vec![
            "volume",
            "attach",
            &vid,
            "--instance",
            &inst,
            "--device",
            dev,
        ];
        if let Some(b) = boot {
            args.extend(["--boot-index", b]);
        }
        k.json(&args);
        vols.push(vid);
    }
    let img = k.json(&[
        "instance",
        "snapshot",
        &inst,
        "--name",
        "golden",
        "--quiesce",
        "off",
    ]);
    let iid = s(&img, "id");
    let out = k.path("golden-export");
    let o = out.to_str().unwrap();
    let e = k.json(&["image", "export", &iid, "--output", o]);
    assert_eq!(e["snapshots"].as_array().unwrap().len(), 2, "{e}");
    assert!(out.join("image.json").exists());
    let again = k.fails(&["image", "export", &iid, "--output", o], 4);
    assert!(again.contains("never overwrites"), "{again}");

    // Refused imports change nothing: no image.json, then a damaged chunk.
    let empty = target_dir(&k, "empty");
    let bad_copy = k.path("damaged-export");
    copy_dir(&out, &bad_copy);
    let chunk = tree(&bad_copy)
        .into_iter()
        .find(|p| p.ends_with("stream.000000"))
        .unwrap();
    let mut bytes = std::fs::read(bad_copy.join(&chunk)).unwrap();
    bytes[100] ^= 1;
    std::fs::write(bad_copy.join(&chunk), bytes).unwrap();
    let before = (k.state(), k.json(&["image", "list"]));
    k.fails(&["image", "import", empty.to_str().unwrap()], 4);
    let e = k.fails(
        &[
            "image",
            "import",
            bad_copy.to_str().unwrap(),
            "--backend",
            "qcow",
        ],
        8,
    );
    assert!(e.contains("stream.000000"), "{e}");
    assert_eq!(
        (k.state(), k.json(&["image", "list"])),
        before,
        "a refused import left something"
    );

    let imported = k.json(&["image", "import", o, "--backend", "qcow"]);
    let new_id = s(&imported, "id");
    assert_ne!(new_id, iid);
    for key in [
        "name",
        "root_device_name",
        "bdm_v2",
        "kiln_consistency",
        "min_disk",
    ] {
        assert_eq!(imported[key], img[key], "{key}");
    }
    let new_snaps: Vec<String> = imported["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(s_str)
        .collect();
    let bdm: Value =
        serde_json::from_str(imported["block_device_mapping"].as_str().unwrap()).unwrap();
    let old_bdm: Value =
        serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
    for (new, old) in bdm
        .as_array()
        .unwrap()
        .iter()
        .zip(old_bdm.as_array().unwrap())
    {
        assert!(new_snaps.contains(&s(new, "snapshot_id")), "{new}");
        for key in ["device_name", "boot_index", "volume_size", "device_type"] {
            assert_eq!(new[key], old[key], "{key}");
        }
        let snap = k.json(&["snapshot", "show", &s(new, "snapshot_id")]);
        assert_eq!(snap["backend"], "qcow");
        assert_eq!(snap["image_id"], new_id.as_str());
    }

    let booted = k.json(&["image", "restore", &new_id, "--name", "copy"]);
    let booted_vols = booted["volumes"].as_array().unwrap();
    assert_eq!(booted_vols.len(), 2);
    for v in booted_vols {
        assert_eq!(v["backend"], "qcow", "{v}");
        let dev = v["attachments"][0]["device"].clone();
        let entry = old_bdm
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["device_name"] == dev)
            .unwrap();
        assert_eq!(v["attachments"][0]["boot_index"], entry["boot_index"]);
        // qcow2 in use is switched only by its hypervisor: detach to read it back.
        k.json(&["volume", "detach", &s(v, "id")]);
        let check = s(&k.json(&["snapshot", "create", &s(v, "id")]), "id");
        let (got, _) = k.export(&check);
        let (want, _) = k.export(&s(entry, "snapshot_id"));
        assert!(
            got == want,
            "{dev}: the booted volume differs from the original snapshot"
        );
    }
}

fn s_str(v: &Value) -> String {
    v.as_str().unwrap().to_string()
}

/// Copies a directory tree (an export) file by file.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for p in tree(from) {
        let (src, dst) = (from.join(&p), to.join(&p));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Unmounts a test's tmpfs when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A backup that fails part-way — its target fills up — leaves no backup record, no file on
/// the target, and no snapshot (the one it took for itself is removed again); the volume is
/// as it was and a backup to a roomier target works.
#[test]
fn a_backup_that_fails_part_way_leaves_nothing() {
    let k = Kiln::new();
    let small = target_dir(&k, "small");
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount tmpfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mounted = Tmpfs(small.clone());
    let vid = s(&k.json(&["volume", "create", "--size", "16M"]), "id");
    write(&k, "raw", &vid, 0, &pattern(40, 8 << 20));
    let before = everything(&k, &small);
    let e = k.fails(
        &[
            "backup",
            "create",
            &vid,
            "--target",
            &format!("dir:{}", small.display()),
        ],
        8,
    );
    assert!(e.contains("No space left"), "{e}");
    assert_eq!(
        everything(&k, &small),
        before,
        "a failed backup left something"
    );
    let dir = target_dir(&k, "big");
    let b = k.json(&[
        "backup",
        "create",
        &vid,
        "--target",
        &format!("dir:{}", dir.display()),
    ]);
    assert_eq!(b["status"], "available");
}
