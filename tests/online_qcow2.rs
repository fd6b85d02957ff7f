//! The `kiln` binary snapshots ATTACHED qcow2 volumes through their hypervisor: a real
//! `qemu-storage-daemon` (the stand-in hypervisor) has each volume's active file open, as
//! `volume attach` hands it over in its connection info, and exports it over NBD; a guest
//! writer (`kiln_testkit::nbd::Writer`) writes sequence-numbered blocks through NBD with one
//! connection for the whole test; the instance's `--qmp` is the daemon's monitor.
//!
//! Proven: `snapshot create --force` is a single cut landing inside a writer pass, taken
//! while the guest keeps writing without an error or a reconnect; the volume's connection
//! info follows the hypervisor's new top file; an instance snapshot of two qcow2 volumes
//! without an agent is one QMP transaction (`crash-consistent-group`, one common cut); kiln
//! killed before QMP and after the transaction is repaired at the next start (the record
//! matches what the daemon has open, no orphan overlay, no kiln node left half-added);
//! `snapshot delete` of an attached volume's snapshot is merged by the daemon (a QMP block
//! job) while the guest writes, also when kiln is killed before the job, while it runs in
//! the daemon, or after it concluded (the next start rolls it forward: no job left, the
//! other snapshot unchanged, every flushed write kept); a bench killed with its overlay on
//! top is committed back; bad `--node` and `--qmp` input is refused with one line and
//! changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Kiln, s};
use kiln_testkit::cut::{BLOCK, bases, check_image};
use kiln_testkit::nbd::Writer;
use kiln_testkit::qsd::{Disk, Qsd};
use serde_json::Value;

/// Blocks per generation (4 MiB per pass); the volumes are 8 MiB.
const BLOCKS: u64 = 1024;

/// A kiln whose instance `vm` has the monitor `<dir>/qsd/qmp.sock` (the daemon starts
/// later), with `n` qcow2 volumes attached at vdb, vdc, ... and a daemon serving their
/// active files as exports `d0`, `d1`, ...
struct Setup {
    qsd: Qsd,
    k: Kiln,
    instance: String,
    volumes: Vec<String>,
}

fn setup(n: usize) -> Setup {
    let k = Kiln::new();
    let qsd_dir = k.path("qsd");
    let qmp = qsd_dir.join("qmp.sock");
    let instance = s(
        &k.json(&[
            "instance",
            "create",
            "--name",
            "vm",
            "--qmp",
            qmp.to_str().unwrap(),
        ]),
        "id",
    );
    let mut volumes = Vec::new();
    let mut files = Vec::new();
    for i in 0..n {
        let vid = s(
            &k.json(&["volume", "create", "--size", "8M", "--backend", "qcow"]),
            "id",
        );
        let dev = format!("/dev/vd{}", (b'b' + i as u8) as char);
        // The daemon is not running yet: the attachment records no node (kiln asks again
        // at snapshot time).
        let v = k.attach(&vid, &instance, &dev);
        assert_eq!(v["connection_info"]["data"]["format"], "qcow2", "{v}");
        files.push(PathBuf::from(s(&v["connection_info"]["data"], "path")));
        volumes.push(vid);
    }
    let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    let disks: Vec<Disk<'_>> = names
        .iter()
        .zip(&files)
        .map(|(node, path)| Disk { node, path })
        .collect();
    let qsd = Qsd::start(&qsd_dir, &disks);
    assert_eq!(qsd.qmp_path(), qmp);
    Setup {
        qsd,
        k,
        instance,
        volumes,
    }
}

impl Setup {
    /// The file the daemon's top node for export `d<i>`'s disk has open now.
    fn daemon_file(&self, vid: &str) -> PathBuf {
        let recorded = self.active(vid);
        let nodes = self.qsd.monitor().block_nodes().unwrap();
        let top = nodes
            .iter()
            .find(|n| n.driver == "qcow2" && Path::new(&n.image_file()) == recorded);
        assert!(
            top.is_some(),
            "the daemon has no node on the recorded active file {}: {nodes:?}",
            recorded.display()
        );
        recorded
    }

    /// The volume's active file, as its connection info hands it to a hypervisor.
    fn active(&self, vid: &str) -> PathBuf {
        let v = self.k.json(&["volume", "show", vid]);
        PathBuf::from(s(&v["connection_info"]["data"], "path"))
    }

    /// Every kiln-made node in the daemon's graph.
    fn kiln_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .qsd
            .monitor()
            .block_nodes()
            .unwrap()
            .into_iter()
            .map(|n| n.node_name)
            .filter(|n| n.starts_with("kiln-"))
            .collect();
        v.sort();
        v
    }

    /// (generation, cut point) of a snapshot's exported image, which must be one cut.
    fn cut_of(&self, sid: &str) -> (u64, usize) {
        let (img, _) = self.k.export(sid);
        check_image(&bases(BLOCKS), &img[..BLOCK * BLOCKS as usize])
            .unwrap_or_else(|e| panic!("snapshot {sid}: {e}"))
    }
}

#[test]
fn forced_snapshots_of_an_attached_qcow2_volume_go_through_the_hypervisor_while_it_writes() {
    let st = setup(1);
    let vid = st.volumes[0].clone();
    let writer = Writer::start(&st.qsd.nbd_path(), &["d0"], BLOCKS);
    let mut snaps = Vec::new();
    for i in 1..=4u64 {
        writer.wait_for(i);
        std::thread::sleep(Duration::from_millis(i * 17 % 60));
        let snap =
            st.k.json(&["snapshot", "create", &vid, "--force", "--name", "live"]);
        assert_eq!(snap["status"], "available", "{snap}");
        assert_eq!(snap["forced"], true);
        // The hypervisor now writes the file the connection info names.
        st.daemon_file(&vid);
        snaps.push(s(&snap, "id"));
    }
    let last = writer.stop();
    let cuts: Vec<(u64, usize)> = snaps.iter().map(|sid| st.cut_of(sid)).collect();
    eprintln!("(generation, cut point) per snapshot: {cuts:?}; writer finished {last}");
    assert!(
        cuts.windows(2).all(|w| w[0] <= w[1]),
        "snapshots go forward in time: {cuts:?}"
    );
    assert!(
        cuts.iter().any(|&(_, k)| k > 0 && k < BLOCKS as usize),
        "no snapshot landed inside a writer pass: {cuts:?}"
    );
    let v = st.k.json(&["volume", "show", &vid]);
    assert_eq!(v["status"], "in-use");
    assert_eq!(v["attachments"][0]["node"], Value::Null, "{v}");
    // Its frozen layers are read-only, so a clone reads them while the hypervisor runs (the
    // export above did too): the clone holds the snapshot's image.
    let clone = s(
        &st.k.json(&[
            "volume",
            "create",
            "--snapshot",
            &snaps[1],
            "--name",
            "copy",
        ]),
        "id",
    );
    let sc = s(&st.k.json(&["snapshot", "create", &clone]), "id");
    assert_eq!(
        st.k.export(&sc).0,
        st.k.export(&snaps[1]).0,
        "clone of a live snapshot"
    );
    // A snapshot of an attached volume cannot be reverted to (as in Cinder); nothing changes.
    let before = st.k.state();
    st.k.fails(&["snapshot", "revert", &snaps[0]], 5);
    assert_eq!(st.k.state(), before);
}

#[test]
fn an_instance_snapshot_of_two_attached_qcow2_volumes_is_one_transaction_with_one_cut() {
    let st = setup(2);
    let writer = Writer::start(&st.qsd.nbd_path(), &["d0", "d1"], BLOCKS);
    let mut images = Vec::new();
    for i in 1..=3u64 {
        writer.wait_for(i);
        std::thread::sleep(Duration::from_millis(i * 23 % 70));
        let img = st.k.json(&[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            &format!("cut-{i}"),
            "--quiesce",
            "off",
        ]);
        assert_eq!(img["kiln_consistency"], "crash-consistent-group", "{img}");
        images.push(img);
    }
    writer.stop();
    let n = BLOCKS as i64;
    for img in &images {
        let bdm: Value =
            serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
        // Writes done per disk: the writer writes each block to d0, then to d1, so one
        // instant has d0 equal to d1 or one write ahead.
        let count = |dev: &str| {
            let e = bdm
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["device_name"] == dev)
                .unwrap();
            let (g, k) = st.cut_of(e["snapshot_id"].as_str().unwrap());
            g as i64 * n + k as i64
        };
        let (c0, c1) = (count("/dev/vdb"), count("/dev/vdc"));
        assert!(
            c0 - c1 == 0 || c0 - c1 == 1,
            "not one instant: vdb has {c0} block writes, vdc {c1}"
        );
    }
}

#[test]
fn kiln_killed_around_the_qmp_transaction_is_repaired_at_the_next_start() {
    for (point, switched) in [
        ("before_qmp", false),
        // The overlay node is in the daemon but on top of nothing: recovery removes it.
        ("after_add", false),
        ("after_transaction", true),
    ] {
        let st = setup(1);
        let vid = st.volumes[0].clone();
        let vdir = st.k.qcow_dir().join(format!("volume-{vid}"));
        let before_files = common::listing(&vdir);
        let before_active = st.active(&vid);
        let out =
            st.k.cmd(&["snapshot", "create", &vid, "--force"])
                .env("FAILPOINTS", format!("qcow2_online::{point}=return"))
                .output()
                .unwrap();
        assert!(
            !out.status.success(),
            "{point}: kiln was not killed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The next start settles it (recovery runs before any command).
        let snaps = st.k.json(&["snapshot", "list"]);
        let snaps = snaps.as_array().unwrap();
        assert_eq!(snaps.len(), 1, "{point}: {snaps:?}");
        let record = common::chain_record(&vdir);
        assert!(record.get("online").is_none(), "{point}: {record}");
        if switched {
            assert_eq!(snaps[0]["status"], "available", "{point}: {}", snaps[0]);
            assert_ne!(st.active(&vid), before_active, "{point}");
            st.daemon_file(&vid);
            assert_eq!(
                st.kiln_nodes().len(),
                1,
                "{point}: the overlay node stays, on top"
            );
        } else {
            assert_eq!(snaps[0]["status"], "error", "{point}: {}", snaps[0]);
            assert_eq!(
                common::listing(&vdir),
                before_files,
                "{point}: no orphan overlay"
            );
            assert_eq!(st.active(&vid), before_active, "{point}");
            assert!(st.kiln_nodes().is_empty(), "{point}: {:?}", st.kiln_nodes());
            st.daemon_file(&vid);
        }
        // The guest writes on, and a snapshot works again.
        let writer = Writer::start(&st.qsd.nbd_path(), &["d0"], BLOCKS);
        writer.wait_for(1);
        st.k.json(&["snapshot", "create", &vid, "--force"]);
        writer.stop();
        st.k.json(&["volume", "check", &vid]);
    }
}

#[test]
fn bad_node_and_monitor_input_is_refused_in_one_line_and_changes_nothing() {
    let st = setup(1);
    let vid = s(
        &st.k
            .json(&["volume", "create", "--size", "8M", "--backend", "qcow"]),
        "id",
    );
    let plain = s(&st.k.json(&["instance", "create"]), "id");
    let before = st.k.state();
    let instances = st.k.json(&["instance", "list"]);
    for (args, code, says) in [
        (vec!["--node", "1bad"], 4, "node name"),
        (vec!["--node", "has space"], 4, "node name"),
        (vec!["--node", &"n".repeat(32)], 4, "node name"),
        (vec!["--node", "nope"], 4, "has no node"),
        // d0 is the other volume's node: it has another file open.
        (vec!["--node", "d0"], 4, "not volume"),
    ] {
        let mut a = vec![
            "volume",
            "attach",
            &vid,
            "--instance",
            &st.instance,
            "--device",
            "/dev/vdz",
        ];
        a.extend(args.iter().copied());
        let e = st.k.fails(&a, code);
        assert!(e.contains(says), "{a:?}: {e}");
    }
    let e = st.k.fails(
        &[
            "volume",
            "attach",
            &vid,
            "--instance",
            &plain,
            "--device",
            "/dev/vdb",
            "--node",
            "d0",
        ],
        4,
    );
    assert!(e.contains("no QMP monitor"), "{e}");
    assert_eq!(st.k.state(), before);
    assert_eq!(st.k.json(&["instance", "list"]), instances);
    // A forced snapshot through a monitor socket that is not QMP, and through a dead daemon.
    let not_qmp = s(
        &st.k.json(&[
            "instance",
            "create",
            "--qmp",
            st.qsd.nbd_path().to_str().unwrap(),
        ]),
        "id",
    );
    st.k.attach(&vid, &not_qmp, "/dev/vdb");
    let before = st.k.state();
    let e = st.k.fails(&["snapshot", "create", &vid, "--force"], 8);
    assert!(e.contains("QMP"), "{e}");
    assert_eq!(st.k.state(), before);
    let mut st = st;
    st.qsd.kill();
    let e =
        st.k.fails(&["snapshot", "create", &st.volumes[0], "--force"], 8);
    assert!(e.contains("not running"), "{e}");
    assert_eq!(st.k.state(), before);
    let instances = st.k.json(&["instance", "list"]);
    for bad in ["relative/qmp.sock", "/tmp/../etc/qmp", "-rf"] {
        let arg = format!("--qmp={bad}");
        let e = st.k.fails(&["instance", "create", &arg], 4);
        assert!(e.contains("qmp"), "{bad}: {e}");
    }
    assert_eq!(st.k.state(), before);
    assert_eq!(st.k.json(&["instance", "list"]), instances);
}

#[test]
fn snapshot_delete_of_an_attached_qcow2_volume_is_merged_by_the_hypervisor_and_survives_a_kill() {
    for point in ["before_job", "after_job", "none"] {
        let st = setup(1);
        let vid = st.volumes[0].clone();
        let writer = Writer::start(&st.qsd.nbd_path(), &["d0"], BLOCKS);
        writer.wait_for(1);
        let s1 = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
        writer.wait_for(2);
        let s2 = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
        writer.wait_for(3);
        let s1_image = st.k.export(&s1).0;
        // s2 is the newest: its child is the active file (active commit in the daemon).
        let mut c = st.k.cmd(&["snapshot", "delete", &s2]);
        if point != "none" {
            c.env("FAILPOINTS", format!("qcow2_online::{point}=return"));
        }
        let out = c.output().unwrap();
        assert_eq!(
            out.status.success(),
            point == "none",
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The next command settles it first: the delete is rolled forward.
        let snaps = st.k.json(&["snapshot", "list"]);
        let ids: Vec<String> = snaps
            .as_array()
            .unwrap()
            .iter()
            .map(|x| s(x, "id"))
            .collect();
        assert_eq!(ids, vec![s1.clone()], "{point}");
        let vdir = st.k.qcow_dir().join(format!("volume-{vid}"));
        let record = common::chain_record(&vdir);
        assert_eq!(
            record["files"].as_object().unwrap().len(),
            2,
            "{point}: {record}"
        );
        assert!(
            record["snapshots"][&s1].get("deleting").is_none(),
            "{point}: {record}"
        );
        st.daemon_file(&vid);
        assert!(
            st.qsd.monitor().jobs().unwrap().is_empty(),
            "{point}: a job was left in the daemon"
        );
        let last = writer.stop();
        assert_eq!(
            st.k.export(&s1).0,
            s1_image,
            "{point}: the other snapshot changed"
        );
        // Every write the guest flushed is in the volume: a new snapshot shows the last full
        // pass. Then the remaining older snapshot goes too (a stream of the base into its
        // child), and the volume's record and files check out.
        let s3 = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
        assert_eq!(
            st.cut_of(&s3),
            (last, BLOCKS as usize),
            "{point}: every flushed write is in the volume"
        );
        st.k.json(&["snapshot", "delete", &s1]);
        st.k.json(&["volume", "check", &vid]);
    }
}

#[test]
fn bench_snapshot_of_an_attached_qcow2_volume_reports_kiln_and_the_bare_qmp_sequence() {
    let st = setup(1);
    let vid = st.volumes[0].clone();
    let vdir = st.k.qcow_dir().join(format!("volume-{vid}"));
    let record = common::chain_record(&vdir);
    let writer = Writer::start(&st.qsd.nbd_path(), &["d0"], BLOCKS);
    writer.wait_for(1);
    let r =
        st.k.json(&["bench", "snapshot", "--volume", &vid, "--iterations", "3"]);
    let last = writer.stop();
    common::assert_bench_timings(&r);
    assert!(
        r["primitive"].as_str().unwrap().contains("transaction"),
        "{r}"
    );
    assert_eq!(r["comparisons"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["create_ratio"].as_f64().unwrap() > 0.0);
    // Left as it was: the record (its active file may have moved: kiln's own snapshot and
    // delete make the former snapshot file active), no snapshot, no kiln node or job in the
    // daemon, the daemon on the recorded file, and every write of the guest there.
    let after = common::chain_record(&vdir);
    assert_eq!(after["snapshots"], record["snapshots"]);
    assert!(after.get("online").is_none(), "{after}");
    assert_eq!(after["files"].as_object().unwrap().len(), 1, "{after}");
    assert!(
        st.k.json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    st.daemon_file(&vid);
    assert!(st.kiln_nodes().is_empty(), "{:?}", st.kiln_nodes());
    assert!(st.qsd.monitor().jobs().unwrap().is_empty());
    let s3 = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
    assert_eq!(st.cut_of(&s3), (last, BLOCKS as usize));
}

#[test]
fn a_bench_killed_with_its_overlay_on_top_is_undone_at_the_next_start() {
    let st = setup(1);
    let vid = st.volumes[0].clone();
    let vdir = st.k.qcow_dir().join(format!("volume-{vid}"));
    let files = common::listing(&vdir);
    let writer = Writer::start(&st.qsd.nbd_path(), &["d0"], BLOCKS);
    writer.wait_for(1);
    let out =
        st.k.cmd(&["bench", "snapshot", "--volume", &vid, "--iterations", "1"])
            .env("FAILPOINTS", "qcow2_online::bench_switched=return")
            .output()
            .unwrap();
    assert!(!out.status.success(), "the bench was not killed");
    // The guest wrote into the bench overlay meanwhile; the next start commits it back.
    writer.wait_for(2);
    st.k.json(&["volume", "show", &vid]);
    let last = writer.stop();
    let record = common::chain_record(&vdir);
    assert!(record.get("online").is_none(), "{record}");
    assert!(
        st.k.json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(st.kiln_nodes().is_empty(), "{:?}", st.kiln_nodes());
    assert_eq!(common::listing(&vdir), files, "the bench overlay is gone");
    st.daemon_file(&vid);
    let s1 = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
    assert_eq!(st.cut_of(&s1), (last, BLOCKS as usize), "no write was lost");
}

#[test]
fn kiln_killed_while_the_hypervisor_merges_is_finished_by_the_next_start() {
    let st = setup(1);
    let vid = st.volumes[0].clone();
    let sid = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
    // 6 MiB the guest wrote into the active file since: what the active commit merges down.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(format!(
            "nbd+unix:///d0?socket={}",
            st.qsd.nbd_path().display()
        ))
        .args(["-c", "write -P 9 0 6M", "-c", "flush"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The merge runs at 1 MiB/s from its start (6 s for 6 MiB): it surely still runs when
    // kiln is killed, however fast this machine merges.
    let mut kiln =
        st.k.cmd(&["snapshot", "delete", &sid])
            .env("FAILPOINTS", "qcow2_online::merge_speed=return(1048576)")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    // Kill kiln while its job runs in the daemon.
    let mut mon = st.qsd.monitor();
    let job = kiln_testkit::qsd::slow_down_job(&mut mon, "kiln-del-", 1 << 20);
    kiln.kill().unwrap();
    kiln.wait().unwrap();
    let left = mon.jobs().unwrap();
    assert!(
        left.iter()
            .any(|j| j.id == job && (j.status == "running" || j.status == "ready")),
        "the job was not running when kiln died: {left:?}"
    );
    mon.execute(
        "block-job-set-speed",
        Some(serde_json::json!({"device": job, "speed": 0})),
    )
    .unwrap();
    drop(mon);
    // The next start waits for the job and records its outcome.
    assert!(
        st.k.json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let vdir = st.k.qcow_dir().join(format!("volume-{vid}"));
    let record = common::chain_record(&vdir);
    assert_eq!(record["files"].as_object().unwrap().len(), 1, "{record}");
    st.daemon_file(&vid);
    assert!(st.qsd.monitor().jobs().unwrap().is_empty());
    let again = s(&st.k.json(&["snapshot", "create", &vid, "--force"]), "id");
    let (img, _) = st.k.export(&again);
    assert!(
        img[..6 << 20].iter().all(|&b| b == 9),
        "the guest's writes are in the volume"
    );
    st.k.json(&["volume", "check", &vid]);
}
