//! Backups kept in a Ceph pool (`rbd:POOL` targets) on the real test cluster: full and
//! incremental backups of an RBD volume as snapshots of one image in the `kiln-backups`
//! pool (tests/harness/ceph-start.sh creates it), restored onto a file backend and onto RBD,
//! deleted down to no image; a pool that does not exist changes nothing.
//!
//! Needs `--features rbd` and `CEPH_CONF` (tests/harness/rbd-suite.sh provides both);
//! without the feature this file fails rather than passing with zero tests.

#[cfg(not(feature = "rbd"))]
#[test]
fn rbd_feature_is_required() {
    panic!(
        "tests/backup_rbd.rs needs the `rbd` cargo feature and a cluster: run \
         tests/harness/rbd-suite.sh"
    );
}

#[cfg(feature = "rbd")]
mod common;

#[cfg(feature = "rbd")]
mod pool {
    use std::time::Duration;

    use serde_json::Value;

    use super::common::rbd::{ceph_conf, pool_listing, rbd};
    use super::common::{self, Runner, s, serial, tree};

    const POOL: &str = "kiln-backups";

    type Kiln = common::Kiln<()>;

    /// kiln with an RBD backend `ceph` (default) on pool `rbd` and a qcow2 file backend.
    fn kiln() -> Kiln {
        let config = format!(
            "default_backend = \"ceph\"\n\n[backends.ceph]\ndriver = \"rbd\"\nceph_conf = {:?}\npool = \"rbd\"\n\n[backends.files]\ndriver = \"file\"\npath = \"files\"\nformat = \"qcow2\"\n",
            ceph_conf().to_str().unwrap()
        );
        common::Kiln::with_config(tempfile::tempdir().unwrap(), &config, ())
            .runner(Runner::Bounded(Duration::from_secs(300)))
            .failures_leave_stdout_empty()
    }

    /// Writes `mib` MiB of data into volume `vid` with `rbd bench` (random 64 KiB writes).
    fn scribble(vid: &str, mib: u32) {
        rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "64K",
            "--io-pattern",
            "rand",
            "--io-total",
            &format!("{mib}M"),
            &format!("rbd/volume-{vid}"),
        ]);
    }

    /// The backup pool's images and their snapshots.
    fn pool_state() -> Value {
        serde_json::from_str(&rbd(&["ls", "-l", POOL, "--format", "json"])).unwrap()
    }

    /// A full and two incremental backups of an RBD volume into the pool: one image with a
    /// snapshot per backup, incrementals reading only what changed; each restores onto a
    /// file volume and onto RBD (and over an existing RBD volume) equal to its snapshot;
    /// deletes go newest first and the last removes the image.
    #[test]
    fn pool_backups_full_and_incremental_restore_onto_file_and_rbd() {
        let _g = serial();
        let k = kiln();
        let target = format!("rbd:{POOL}");
        let vid = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
        scribble(&vid, 16);
        let b1 = k.json(&["backup", "create", &vid, "--target", &target]);
        scribble(&vid, 1);
        let b2 = k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]);
        scribble(&vid, 1);
        let b3 = k.json(&[
            "backup",
            "create",
            &vid,
            "--target",
            &target,
            "--incremental",
        ]);
        assert_eq!(b2["parent_id"], b1["id"]);
        assert_eq!(b3["parent_id"], b2["id"]);
        for b in [&b2, &b3] {
            let read = b["stream"]["read_bytes"].as_u64().unwrap();
            assert!(read <= 2 << 20, "an incremental read {read} bytes: {b}");
        }
        let snaps = rbd(&["snap", "ls", &format!("{POOL}/kiln-backup-{vid}")]);
        for b in [&b1, &b2, &b3] {
            assert!(snaps.contains(&format!("backup-{}", s(b, "id"))), "{snaps}");
            assert_eq!(b["target"], target.as_str());
            k.json(&["backup", "verify", &s(b, "id")]);
        }
        for b in [&b1, &b2, &b3] {
            for backend in ["files", "ceph"] {
                let r = k.json(&["backup", "restore", &s(b, "id"), "--backend", backend]);
                k.assert_holds(&r, &s(b, "snapshot_id"), &format!("{b} -> {backend}"));
            }
        }
        let over = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
        scribble(&over, 8);
        let r = k.json(&["backup", "restore", &s(&b2, "id"), "--volume", &over]);
        k.assert_holds(&r, &s(&b2, "snapshot_id"), "over an existing RBD volume");

        let e = k.fails(&["backup", "delete", &s(&b1, "id")], 6);
        assert!(e.contains(&s(&b2, "id")), "{e}");
        for b in [&b3, &b2, &b1] {
            k.json(&["backup", "delete", &s(b, "id")]);
        }
        let left = rbd(&["ls", POOL]);
        assert!(
            !left.contains(&vid),
            "the backup image is still there: {left}"
        );
    }

    /// A pool that does not exist, and an incremental into the pool with no full backup
    /// there, are refused with one line and change nothing (store, files, both pools).
    #[test]
    fn a_missing_pool_and_an_orphan_incremental_change_nothing() {
        let _g = serial();
        let k = kiln();
        let vid = s(&k.json(&["volume", "create", "--size", "8M"]), "id");
        let state = |k: &Kiln| {
            (
                k.store(),
                tree(&k.data_dir().join("files")),
                pool_state(),
                pool_listing(),
            )
        };
        let before = state(&k);
        let e = k.fails(
            &["backup", "create", &vid, "--target", "rbd:no-such-pool"],
            4,
        );
        assert!(e.contains("no-such-pool"), "{e}");
        let e = k.fails(
            &[
                "backup",
                "create",
                &vid,
                "--target",
                &format!("rbd:{POOL}"),
                "--incremental",
            ],
            4,
        );
        assert!(e.contains("full backup first"), "{e}");
        assert_eq!(state(&k), before);
    }

    /// kiln aborted while backing up into the pool — after the data, before the snapshot;
    /// after the snapshot, before the record — is resolved at the next start: no backup in
    /// `creating`, the image holds exactly the snapshots of the backups on record, and a
    /// backup can be made again.
    #[test]
    fn a_pool_backup_interrupted_is_undone_or_kept_whole() {
        use std::os::unix::process::ExitStatusExt;
        let _g = serial();
        let k = kiln();
        let target = format!("rbd:{POOL}");
        let vid = s(&k.json(&["volume", "create", "--size", "16M"]), "id");
        scribble(&vid, 4);
        for (point, kept) in [("before_commit", 0usize), ("after_commit", 1)] {
            let out = k
                .cmd(&["backup", "create", &vid, "--target", &target])
                .env("FAILPOINTS", format!("backup_create::{point}=return"))
                .output()
                .unwrap();
            assert_eq!(out.status.signal(), Some(6), "{point}: {out:?}");
            let backups = k.json(&["backup", "list", "--volume", &vid]);
            let backups = backups.as_array().unwrap();
            assert_eq!(backups.len(), kept, "{point}: {backups:?}");
            let image = format!("{POOL}/kiln-backup-{vid}");
            let snaps = if rbd(&["ls", POOL]).contains(&format!("kiln-backup-{vid}")) {
                rbd(&["snap", "ls", &image])
            } else {
                String::new()
            };
            assert_eq!(snaps.matches("backup-").count(), kept, "{point}: {snaps}");
            for b in backups {
                assert_eq!(b["status"], "available");
                k.json(&["backup", "verify", &s(b, "id")]);
                k.json(&["backup", "delete", &s(b, "id")]);
            }
        }
        let b = k.json(&["backup", "create", &vid, "--target", &target]);
        k.json(&["backup", "delete", &s(&b, "id")]);
    }
}
