//! End-to-end tests of instance snapshots and images across two backends: one guest disk on
//! the file backend (raw+reflink on a real loop-mounted XFS) and two on Ceph RBD (a real
//! single-node cluster), frozen through a **real qemu-guest-agent**.
//!
//! Needs `--features rbd` (only then does the binary carry the RBD driver) and a running
//! cluster named by `CEPH_CONF`: `tests/harness/rbd-suite.sh` starts a throw-away one, runs
//! these tests and stops it. Without `CEPH_CONF` every test FAILS with instructions, and
//! built without the feature this file FAILS too (one test saying how to build it) rather
//! than passing with zero tests (the pattern of tests/cli_rbd.rs). Also needs root, qemu-ga,
//! e2fsprogs, util-linux and xfsprogs (tests/install-deps.sh).
//!
//! The "guest" is this host, kept safe exactly as in tests/instance.rs: the agent runs as
//! our own child on a unix socket, `guest-fsfreeze-freeze` (the unfiltered freeze of every
//! filesystem) is blocked by qemu-ga's own `--block-rpcs`, and the instance freezes only its
//! listed mountpoint through `guest-fsfreeze-freeze-list`. The file volume is a guest ext4
//! through a loop device; the RBD volumes hold data written with `rbd import-diff` (librbd,
//! as tests/cli_rbd.rs writes) and are read back with `rbd export`. Every external command is
//! an argv vector, never a shell string.
//!
//! The tests run one at a time (`common::serial`): qemu-ga's thaw thaws every filesystem
//! the shared kernel has frozen, and the tests compare the whole pool listing before and
//! after a failure, so nothing else may use the pool meanwhile (rbd-suite.sh runs the test
//! binaries one after another on a cluster of their own).

/// Built without the `rbd` feature the binary has no RBD driver, so none of the tests below
/// can run: fail, naming the command that runs them, instead of passing with zero tests.
#[cfg(not(feature = "rbd"))]
#[test]
fn rbd_feature_is_required() {
    panic!(
        "tests/instance_rbd.rs tests instance snapshots across the file and RBD backends, which \
         needs the `rbd` cargo feature: run `cargo test -p kiln --features rbd,failpoints --test \
         instance_rbd` against a cluster (tests/harness/rbd-suite.sh starts one, runs it and \
         stops the cluster)"
    );
}

#[cfg(feature = "rbd")]
mod common;

#[cfg(feature = "rbd")]
mod mixed {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use kiln_testkit::{XfsMount, pattern};
    use serde_json::Value;

    use crate::common::guest::{Guest, read_guest_file};
    use crate::common::rbd::{ceph_conf, diff_file, pool_listing, rbd, rbd_json, rbd_snaps};
    use crate::common::{
        self, Runner, check_failure, image, listing, s, serial, sha256_hex, unique_token,
    };

    const MIB: u64 = 1 << 20;
    /// Each volume: 16 RADOS objects of 4 MiB (small enough for a memstore OSD), and room
    /// for a guest ext4.
    const SIZE: u64 = 64 * MIB;
    /// Hang guard for one kiln, rbd or guest command, and for waits (a correctness bound,
    /// not a performance target).
    const LIMIT: Duration = Duration::from_secs(180);

    // ---- the cluster (copied from tests/cli_rbd.rs: its helpers are private to it) ----

    /// The monitor's port, from the `mon host = v2:127.0.0.1:PORT` line ceph-start.sh writes.
    fn mon_port() -> String {
        let conf = std::fs::read_to_string(ceph_conf()).unwrap();
        let line = conf
            .lines()
            .find(|l| l.trim_start().starts_with("mon host"))
            .unwrap_or_else(|| panic!("no mon host in {conf}"));
        line.rsplit(':').next().unwrap().trim().to_string()
    }

    // ---- kiln with both backends, an instance with one file and two RBD disks ----

    /// A kiln data dir and config with `raw` (raw+reflink on a real XFS, the default) and
    /// `ceph` (RBD, pool `rbd` of the test cluster).
    type Kiln = common::Kiln<XfsMount>;

    fn kiln() -> Kiln {
        let xfs = XfsMount::new(1 << 30);
        let config = format!(
            "default_backend = \"raw\"\n\n[backends.raw]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n\n[backends.ceph]\ndriver = \"rbd\"\nceph_conf = {:?}\npool = \"rbd\"\n",
            xfs.path().join("vols").display(),
            ceph_conf().to_str().unwrap()
        );
        common::Kiln::with_config(tempfile::tempdir().unwrap(), &config, xfs)
            .runner(Runner::Bounded(LIMIT))
            .failures_leave_stdout_empty()
    }

    /// Writes `chunks` into RBD volume `vid`'s image head with `rbd import-diff`.
    fn rbd_write(k: &Kiln, vid: &str, chunks: &[(u64, &[u8])]) {
        let f = k.path(&format!("write-{}.diff", unique_token()));
        std::fs::write(&f, diff_file(chunks)).unwrap();
        rbd(&[
            "import-diff",
            "--no-progress",
            f.to_str().unwrap(),
            &format!("rbd/volume-{vid}"),
        ]);
        std::fs::remove_file(&f).unwrap();
    }

    /// sha256 of `rbd export SPEC` (an image head `rbd/volume-…` or a snapshot
    /// `rbd/volume-…@snapshot-…`).
    fn rbd_sha(k: &Kiln, spec: &str) -> String {
        let f = k.path(&format!("export-{}.raw", unique_token()));
        rbd(&["export", "--no-progress", spec, f.to_str().unwrap()]);
        let data = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        assert_eq!(data.len() as u64, SIZE, "{spec}: size");
        sha256_hex(&data)
    }

    /// Asserts Cinder's RBD `initialize_connection` shape for volume `vid` on the test cluster
    /// (no cephx, one monitor on loopback).
    fn assert_rbd_connection(ci: &Value, vid: &str) {
        assert_eq!(ci["driver_volume_type"], "rbd", "{ci}");
        let d = &ci["data"];
        assert_eq!(d["name"], format!("rbd/volume-{vid}").as_str(), "{ci}");
        assert_eq!(d["hosts"], serde_json::json!(["127.0.0.1"]), "{ci}");
        assert_eq!(d["ports"], serde_json::json!([mon_port()]), "{ci}");
        assert_eq!(d["cluster_name"], "ceph", "{ci}");
        assert_eq!(d["auth_enabled"], false, "{ci}");
        assert!(d["auth_username"].is_null(), "{ci}");
        assert_eq!(d["secret_type"], "ceph", "{ci}");
        assert!(d["secret_uuid"].is_null(), "{ci}");
        assert_eq!(d["volume_id"], vid, "{ci}");
        assert_eq!(d["discard"], true, "{ci}");
    }

    /// An instance with three attached disks: `vda` (boot 0) a raw file volume carrying a
    /// mounted guest ext4, `vdb` and `vdc` RBD volumes holding `rbd_want` (written with
    /// `rbd import-diff`, different data on each).
    struct Setup {
        /// Declared first so it drops first: unmounts the guest ext4 and frees its loop
        /// device before the XFS holding the volume file goes.
        guest: Guest,
        k: Kiln,
        instance: String,
        file_vol: String,
        /// Mountpoint of the guest ext4 on `file_vol`.
        mp: PathBuf,
        rbd_vols: [String; 2],
        /// Each RBD volume's whole expected image.
        rbd_want: [Vec<u8>; 2],
    }

    fn setup() -> Setup {
        let k = kiln();
        let mut guest = Guest::start(k.dir.path());
        let f = k.json(&["volume", "create", "--size", "64M", "--name", "root"]);
        assert_eq!(f["backend"], "raw");
        let mp = guest.disk_ext4(Path::new(&s(&f, "provider_location")));
        let file_vol = s(&f, "id");
        let mut rbd_vols = Vec::new();
        let mut rbd_want = Vec::new();
        for (i, seed) in [(0u64, 11u64), (1, 21)] {
            let v = k.json(&[
                "volume",
                "create",
                "--size",
                "64M",
                "--backend",
                "ceph",
                "--name",
                "data",
            ]);
            assert_eq!(v["backend"], "ceph");
            let vid = s(&v, "id");
            // Two chunks, the second straddling a 4 MiB object boundary; other offsets on
            // each volume, so a swapped snapshot would show.
            let a = pattern(seed, MIB as usize);
            let b = pattern(seed + 1, 3 * MIB as usize / 2);
            let (a_off, b_off) = (i * 8 * MIB, 39 * MIB + MIB / 2 - i * 12 * MIB);
            rbd_write(&k, &vid, &[(a_off, &a), (b_off, &b)]);
            rbd_want.push(image(SIZE, &[(a_off, &a), (b_off, &b)]));
            rbd_vols.push(vid);
        }
        let instance = s(
            &k.json(&[
                "instance",
                "create",
                "--name",
                "mixed-1",
                "--agent",
                guest.sock.to_str().unwrap(),
                "--freeze-mountpoint",
                mp.to_str().unwrap(),
                "--property",
                "os_distro=debian",
            ]),
            "id",
        );
        let a = k.json(&[
            "volume",
            "attach",
            &file_vol,
            "--instance",
            &instance,
            "--device",
            "/dev/vda",
            "--boot-index",
            "0",
            "--disk-bus",
            "virtio",
        ]);
        assert_eq!(a["connection_info"]["driver_volume_type"], "file");
        assert_eq!(a["connection_info"]["data"]["path"], a["provider_location"]);
        for (vid, dev) in rbd_vols.iter().zip(["/dev/vdb", "/dev/vdc"]) {
            let a = k.json(&[
                "volume",
                "attach",
                vid,
                "--instance",
                &instance,
                "--device",
                dev,
                "--disk-bus",
                "virtio",
            ]);
            assert_eq!(a["status"], "in-use");
            assert_rbd_connection(&a["connection_info"], vid);
        }
        for (vid, want) in rbd_vols.iter().zip(&rbd_want) {
            assert_eq!(
                rbd_sha(&k, &format!("rbd/volume-{vid}")),
                sha256_hex(want),
                "head of {vid} after the writes"
            );
        }
        Setup {
            guest,
            k,
            instance,
            file_vol,
            mp,
            rbd_vols: rbd_vols.try_into().unwrap(),
            rbd_want: rbd_want.try_into().unwrap(),
        }
    }

    /// `instance snapshot INSTANCE --name NAME --quiesce required`, asserting success.
    fn snapshot(st: &Setup, name: &str) -> Value {
        st.k.json(&[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            name,
            "--quiesce",
            "required",
        ])
    }

    /// The image's snapshot of volume `vid`, as `snapshot show` prints it.
    fn member(k: &Kiln, img: &Value, vid: &str) -> Value {
        for sid in img["snapshots"].as_array().unwrap() {
            let snap = k.json(&["snapshot", "show", sid.as_str().unwrap()]);
            if snap["volume_id"] == vid {
                return snap;
            }
        }
        panic!("image has no snapshot of {vid}: {img}");
    }

    /// Everything kiln records (every field of every record) and every backend object: the
    /// file backend's directory and the whole pool (images and snapshots).
    fn everything(k: &Kiln) -> Value {
        serde_json::json!({
            "volumes": k.json(&["volume", "list"]),
            "snapshots": k.json(&["snapshot", "list"]),
            "instances": k.json(&["instance", "list"]),
            "images": k.json(&["image", "list"]),
            "files": listing(&k.fixture.path().join("vols")),
            "pool": pool_listing(),
        })
    }

    /// Removes what a test made on the shared cluster: every image (with its snapshots),
    /// then every volume (detached, with its snapshots); the store ends empty.
    fn clean_up(k: &Kiln) {
        for img in k.json(&["image", "list"]).as_array().unwrap() {
            k.json(&["image", "delete", &s(img, "id")]);
        }
        for v in k.json(&["volume", "list"]).as_array().unwrap() {
            let vid = s(v, "id");
            if !v["attachments"].as_array().unwrap().is_empty() {
                k.json(&["volume", "detach", &vid]);
            }
            k.json(&["volume", "delete", &vid, "--cascade"]);
        }
        assert_eq!(k.store(), (serde_json::json!([]), serde_json::json!([])));
    }

    /// The tentpole across backends: one quiesced `instance snapshot` of a file disk and two
    /// RBD disks is one image with three quiesced snapshots; the file snapshot holds a file
    /// the guest wrote but never fsynced (absent from the volume just before: the freeze
    /// put it there), and each RBD snapshot holds its volume's data, unchanged when the
    /// heads move on.
    #[test]
    fn a_quiesced_snapshot_of_file_and_rbd_disks_is_one_image_holding_every_disks_data() {
        let _serial = serial();
        let st = setup();
        let token = format!("unsynced-{}", unique_token());
        std::fs::write(st.mp.join("unsynced"), &token).unwrap();
        let file_path = PathBuf::from(s(
            &st.k.json(&["volume", "show", &st.file_vol]),
            "provider_location",
        ));
        assert_eq!(
            read_guest_file(&file_path, "unsynced"),
            None,
            "the unsynced file reached the volume before any freeze: the test proves nothing"
        );

        let img = snapshot(&st, "mixed");
        let iid = s(&img, "id");
        eprintln!("freeze window: {} ms", img["kiln_freeze_window_ms"]);
        assert_eq!(img["kiln_consistency"], "quiesced", "{img}");
        assert_eq!(img["status"], "active");
        assert_eq!(img["instance_id"], st.instance.as_str());
        assert_eq!(img["root_device_name"], "/dev/vda");
        assert_eq!(img["os_distro"], "debian");
        assert!(
            img["kiln_freeze_window_ms"]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap()
                > 0.0,
            "{img}"
        );
        let sids = img["snapshots"].as_array().unwrap();
        assert_eq!(sids.len(), 3, "{img}");
        // Nova's BDM: root first, then by device; each entry names its snapshot.
        let bdm: Value =
            serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
        let bdm = bdm.as_array().unwrap();
        let devices: Vec<&str> = bdm
            .iter()
            .map(|e| e["device_name"].as_str().unwrap())
            .collect();
        assert_eq!(devices, ["/dev/vda", "/dev/vdb", "/dev/vdc"]);
        assert_eq!(bdm[0]["boot_index"], 0);
        assert!(bdm[1]["boot_index"].is_null() && bdm[2]["boot_index"].is_null());
        for (e, vid) in bdm
            .iter()
            .zip([&st.file_vol, &st.rbd_vols[0], &st.rbd_vols[1]])
        {
            assert_eq!(e["source_type"], "snapshot");
            assert_eq!(e["destination_type"], "volume");
            assert_eq!(e["snapshot_id"], member(&st.k, &img, vid)["id"], "{e}");
        }
        // Every member: available, in the image, quiesced, forced (the disks are attached).
        for (vid, backend) in [
            (&st.file_vol, "raw"),
            (&st.rbd_vols[0], "ceph"),
            (&st.rbd_vols[1], "ceph"),
        ] {
            let snap = member(&st.k, &img, vid);
            assert_eq!(snap["image_id"], iid.as_str(), "{snap}");
            assert_eq!(snap["consistency"], "quiesced", "{snap}");
            assert_eq!(snap["status"], "available", "{snap}");
            assert_eq!(snap["forced"], true, "{snap}");
            assert_eq!(snap["backend"], backend, "{snap}");
        }

        // The file snapshot holds what the guest never fsynced.
        let fsnap = member(&st.k, &img, &st.file_vol);
        assert_eq!(
            read_guest_file(Path::new(&s(&fsnap, "provider_location")), "unsynced").as_deref(),
            Some(token.as_str()),
            "the quiesced file snapshot lacks the unsynced file"
        );
        // Each RBD snapshot is on the cluster and holds its volume's data; the heads move on
        // and the snapshots do not.
        let mut specs = Vec::new();
        for (vid, want) in st.rbd_vols.iter().zip(&st.rbd_want) {
            let snap = member(&st.k, &img, vid);
            let sid = s(&snap, "id");
            let spec = format!("rbd/volume-{vid}@snapshot-{sid}");
            assert_eq!(s(&snap, "provider_location"), spec);
            assert_eq!(
                rbd_snaps(&format!("volume-{vid}")),
                [format!("snapshot-{sid}")]
            );
            assert_eq!(rbd_sha(&st.k, &spec), sha256_hex(want), "{spec}");
            specs.push(spec);
        }
        let later = pattern(99, 2 * MIB as usize);
        for vid in &st.rbd_vols {
            rbd_write(&st.k, vid, &[(0, &later)]);
        }
        for ((vid, want), spec) in st.rbd_vols.iter().zip(&st.rbd_want).zip(&specs) {
            let head = image(SIZE, &[(0, want), (0, &later)]);
            assert_eq!(
                rbd_sha(&st.k, &format!("rbd/volume-{vid}")),
                sha256_hex(&head)
            );
            assert_eq!(
                rbd_sha(&st.k, spec),
                sha256_hex(want),
                "{spec} after the head moved on"
            );
        }
        assert_eq!(st.guest.status(), "thawed");
        st.guest.assert_writable();
        clean_up(&st.k);
    }

    /// `image restore` of a mixed image: three new volumes at the recorded devices and boot
    /// index, each holding exactly its snapshot's data (not the heads, which moved on), the
    /// RBD ones with Cinder's rbd connection info. Then, the restored RBD clones flattened,
    /// `image delete` removes the snapshots from the pool and the file backend, and the
    /// restored volumes keep their data.
    #[test]
    fn a_mixed_image_restores_every_volume_and_its_delete_removes_the_rbd_snapshots() {
        let _serial = serial();
        let st = setup();
        std::fs::write(st.mp.join("hello"), b"root fs").unwrap();
        let img = snapshot(&st, "golden");
        assert_eq!(img["kiln_consistency"], "quiesced");
        let iid = s(&img, "id");
        let snaps: Vec<String> = img["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        // The heads move on after the snapshot: a restore must not pick them up.
        std::fs::write(st.mp.join("hello"), b"changed").unwrap();
        std::fs::File::open(st.mp.join("hello"))
            .unwrap()
            .sync_all()
            .unwrap();
        let later = pattern(77, MIB as usize);
        for vid in &st.rbd_vols {
            rbd_write(&st.k, vid, &[(4 * MIB, &later)]);
        }

        let restored = st.k.json(&["image", "restore", &iid, "--name", "mixed-2"]);
        let rid = s(&restored, "id");
        assert_ne!(rid, st.instance);
        let vols = restored["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 3, "{restored}");
        let mut rbd_restored = Vec::new();
        for v in vols {
            let vid = s(v, "id");
            let a = &v["attachments"][0];
            assert_eq!(a["instance_id"], rid.as_str());
            assert_eq!(v["status"], "in-use");
            let src = s(v, "source_snapshot_id");
            assert!(snaps.contains(&src), "{v}");
            let snap = st.k.json(&["snapshot", "show", &src]);
            let orig = st.k.json(&["volume", "show", &s(&snap, "volume_id")]);
            let oa = &orig["attachments"][0];
            assert_eq!(a["device"], oa["device"], "{v}");
            assert_eq!(a["boot_index"], oa["boot_index"], "{v}");
            assert_eq!(a["disk_bus"], oa["disk_bus"], "{v}");
            assert_eq!(v["backend"], orig["backend"], "{v}");
            assert_eq!(v["size_bytes"], snap["size_bytes"], "{v}");
            assert_eq!(
                st.k.json(&["volume", "show", &vid])["connection_info"],
                v["connection_info"]
            );
            if v["backend"] == "ceph" {
                assert_rbd_connection(&v["connection_info"], &vid);
                let spec = s(&snap, "provider_location");
                let want = &st.rbd_want[st
                    .rbd_vols
                    .iter()
                    .position(|o| *o == s(&orig, "id"))
                    .unwrap()];
                assert_eq!(rbd_sha(&st.k, &spec), sha256_hex(want), "{spec}");
                assert_eq!(
                    rbd_sha(&st.k, &format!("rbd/volume-{vid}")),
                    sha256_hex(want),
                    "restored {} differs from its snapshot",
                    a["device"]
                );
                rbd_restored.push((vid, sha256_hex(want)));
            } else {
                assert_eq!(v["connection_info"]["driver_volume_type"], "file");
                assert_eq!(v["connection_info"]["data"]["path"], v["provider_location"]);
                let path = PathBuf::from(s(v, "provider_location"));
                assert_eq!(
                    sha256_hex(&std::fs::read(&path).unwrap()),
                    sha256_hex(&std::fs::read(s(&snap, "provider_location")).unwrap()),
                    "restored {} differs from its snapshot",
                    a["device"]
                );
                assert_eq!(a["device"], "/dev/vda");
                assert_eq!(read_guest_file(&path, "hello").as_deref(), Some("root fs"));
            }
        }
        assert_eq!(rbd_restored.len(), 2);

        // The restored RBD volumes are copy-on-write children of the image's snapshots,
        // which the cluster would not let go; flattened, they stand alone.
        for (vid, sha) in &rbd_restored {
            let info = rbd_json(&["info", &format!("rbd/volume-{vid}")]);
            assert!(info.get("parent").is_some(), "{info}");
            st.k.json(&["volume", "flatten", vid]);
            let info = rbd_json(&["info", &format!("rbd/volume-{vid}")]);
            assert!(info.get("parent").is_none(), "still a clone: {info}");
            assert_eq!(&rbd_sha(&st.k, &format!("rbd/volume-{vid}")), sha);
        }
        // image delete: every snapshot goes, from kiln, the pool and the file backend.
        let r = st.k.json(&["image", "delete", &iid]);
        let mut deleted: Vec<String> = r["snapshots_deleted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        deleted.sort();
        let mut want = snaps.clone();
        want.sort();
        assert_eq!(deleted, want, "{r}");
        st.k.fails(&["image", "show", &iid], 3);
        for sid in &snaps {
            st.k.fails(&["snapshot", "show", sid], 3);
            assert!(
                !st.k
                    .fixture
                    .path()
                    .join("vols")
                    .join(format!("snapshot-{sid}"))
                    .exists()
            );
        }
        for vid in &st.rbd_vols {
            assert_eq!(
                rbd_snaps(&format!("volume-{vid}")),
                Vec::<String>::new(),
                "snapshots left on volume-{vid}"
            );
        }
        let pool = pool_listing().to_string();
        for sid in &snaps {
            assert!(
                !pool.contains(sid.as_str()),
                "{sid} still in the pool: {pool}"
            );
        }
        for (vid, sha) in &rbd_restored {
            assert_eq!(&rbd_sha(&st.k, &format!("rbd/volume-{vid}")), sha);
        }
        assert_eq!(st.guest.status(), "thawed");
        clean_up(&st.k);
    }

    /// All or nothing across backends, with two real RBD failures: a snapshot limit the
    /// image has reached (`rbd snap limit set`: librbd refuses with EDQUOT) and an image
    /// removed behind kiln's back (`rbd rm`). Each time the frozen guest's file member and
    /// the other RBD member were made and must be undone: the command fails with one line
    /// naming the volume and the backend, exit code per the README (8 backend failure, 3
    /// not found), and every record, every file and every pool image and snapshot is as it
    /// was; the guest is thawed. Between the two, with the limit lifted, the same snapshot
    /// succeeds: what the failure left is a clean starting point.
    #[test]
    fn a_failing_rbd_member_fails_the_whole_snapshot_and_leaves_nothing_on_any_backend() {
        let _serial = serial();
        let st = setup();
        let cmd = [
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "doomed",
            "--quiesce",
            "required",
        ];
        // 1. The second RBD image already has one snapshot (taken through kiln, so a
        //    rollback that deleted too much would show) and a limit of one.
        let capped = &st.rbd_vols[1];
        let kept =
            st.k.json(&["snapshot", "create", capped, "--force", "--name", "kept"]);
        let capped_img = format!("rbd/volume-{capped}");
        rbd(&["snap", "limit", "set", "--limit", "1", &capped_img]);
        let before = everything(&st.k);
        let msg = check_failure(&cmd, &st.k.run(&cmd), 8);
        eprintln!("snapshot limit reached: {msg}");
        assert!(
            msg.contains(&format!("volume {capped} (backend ceph)")),
            "does not name the volume and backend: {msg}"
        );
        assert!(msg.contains("quota"), "{msg}");
        assert_eq!(
            everything(&st.k),
            before,
            "the failed snapshot left something"
        );
        assert_eq!(
            rbd_snaps(&format!("volume-{capped}")),
            [format!("snapshot-{}", s(&kept, "id"))]
        );
        assert_eq!(st.guest.status(), "thawed");
        st.guest.assert_writable();

        // Limit lifted: the same command succeeds.
        rbd(&["snap", "limit", "clear", &capped_img]);
        let img = snapshot(&st, "after-limit");
        assert_eq!(img["snapshots"].as_array().unwrap().len(), 3);
        st.k.json(&["image", "delete", &s(&img, "id")]);

        // 2. The first RBD image is removed behind kiln's back.
        let gone = &st.rbd_vols[0];
        rbd(&["rm", "--no-progress", &format!("rbd/volume-{gone}")]);
        let before = everything(&st.k);
        let msg = check_failure(&cmd, &st.k.run(&cmd), 3);
        eprintln!("image removed: {msg}");
        assert!(
            msg.contains(&format!("volume {gone} (backend ceph)")),
            "does not name the volume and backend: {msg}"
        );
        assert_eq!(
            everything(&st.k),
            before,
            "the failed snapshot left something"
        );
        assert_eq!(st.guest.status(), "thawed");
        st.guest.assert_writable();
        clean_up(&st.k);
    }
}
