//! Instance snapshots and images end to end on **mixed backends** — an LVM thin volume, an
//! LVM thick volume and a raw+reflink file volume attached to one instance — with a **real
//! qemu-guest-agent** freezing real ext4 guest filesystems on them (kiln issue 8).
//!
//! The host kernel has no device-mapper, so this test binary must run as root INSIDE the
//! user-mode-Linux guest that `tests/harness/uml-run.sh` boots: `tests/harness/lvm-suite.sh`
//! builds it on the host and runs it there (one guest boot for the whole file). Anywhere else
//! every test FAILS with instructions.
//!
//! In the guest, each test builds:
//! - a volume group of its own on a loop device (sparse file on the guest's tmpfs /tmp) with
//!   a thin pool, and a real XFS (loop-mounted, reflink on) for the file backend; kiln backends
//!   `thin` (`type = "thin"`), `thick` (`type = "thick"`, 100 % COW) and `file` (raw);
//! - a `qemu-ga` (the host's /usr/sbin/qemu-ga, seen through the guest's hostfs root) as the
//!   test's own child on a unix socket (`-m unix-listen`), its state directory on tmpfs /run
//!   (a state file on a filesystem that gets frozen would wedge the agent), with the
//!   unfiltered `guest-fsfreeze-freeze` blocked by the agent itself: the instance freezes only
//!   its listed mountpoints (`guest-fsfreeze-freeze-list`);
//! - one guest disk per volume: the volume as `volume attach` hands it to a hypervisor
//!   (`connection_info`: the LV's device node, the raw file's path) opened through a loop
//!   device, which plays the hypervisor's block frontend, then `mkfs.ext4` and mounted with
//!   `commit=300` (ext4 then never commits its journal on its own during a test, so what
//!   reaches a volume is what a freeze or an fsync forced there).
//!
//! Why a loop device in front of the LVs too: with the guest filesystem directly on the LV,
//! the freeze and LVM run in ONE kernel, and on this guest's 6.1 kernel (Debian 12's)
//! device-mapper's suspend, which freezes the filesystem on the device itself, fails with
//! EBUSY on a filesystem that userspace already froze — `lvcreate --snapshot` then fails
//! ("Failed to suspend"), a thick one leaving "Manual intervention required" (see
//! docs/benchmarks.md, "LVM: instance snapshots"). With a real VM the filesystem lives in the
//! guest's kernel and the host's device-mapper sees only block I/O, which is what the loop
//! device reproduces here: the LV's own block device carries no filesystem.
//!
//! Snapshot data is read without mounting and without replaying the journal (`debugfs`), as
//! a crash would leave it: a file snapshot from its file, an LVM snapshot from
//! `kiln snapshot export` (thin snapshots are created with the activation-skip flag, so they
//! have no device node; exporting reads the same bytes without activating anything).
//!
//! The tests run one at a time (`common::serial`): they share one kernel, and qemu-ga's
//! `guest-fsfreeze-thaw` thaws every filesystem it can see.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use kiln_testkit::XfsMount;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::guest::{Guest, Writer, read_guest_file, snapshot_logged};
use common::lvm::{TestVg, require_uml_guest, sys};
use common::{Runner, s, serial, unique_token};

/// Hang guard for commands and waits (not a timing threshold: far above any real run).
const LIMIT: Duration = Duration::from_secs(120);
/// Each guest disk's size.
const SIZE: &str = "64M";
/// The backends of the instance's three volumes, in attachment order (vda, vdb, vdc).
const BACKENDS: [&str; 3] = ["thin", "thick", "file"];

/// The backends' real storage: a private VG with a thin pool, and an XFS for the raw+reflink
/// file backend. Declared VG first: it is removed before the XFS unmounts itself.
struct Storage {
    vg: TestVg,
    xfs: XfsMount,
}

type Kiln = common::Kiln<Storage>;

/// A kiln with backends `thin` (default), `thick` and `file` on fresh real storage.
fn kiln() -> Kiln {
    require_uml_guest("instance_lvm");
    let dir = tempfile::tempdir().unwrap();
    let vg = TestVg::new("ki", dir.path(), 1 << 30, "384m");
    let xfs = XfsMount::new(512 << 20);
    let config = format!(
        "{}\n[backends.file]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n",
        vg.config(),
        xfs.path().join("vols").display()
    );
    common::Kiln::with_config(dir, &config, Storage { vg, xfs })
        .runner(Runner::Traced)
        .failures_leave_stdout_empty()
}

/// The `lvs` origin of LV `name`, or None when there is no such LV.
fn lv_origin(k: &Kiln, name: &str) -> Option<String> {
    k.fixture.vg.lv(name).map(|(_, _, origin)| origin)
}

/// The file backend's directory (on the XFS).
fn file_dir(k: &Kiln) -> PathBuf {
    k.fixture.xfs.path().join("vols")
}

/// Everything kiln records, every field, and every object on the three backends: compared
/// before and after a refused command.
fn everything(k: &Kiln) -> Value {
    json!({
        "volumes": k.json(&["volume", "list"]),
        "snapshots": k.json(&["snapshot", "list"]),
        "instances": k.json(&["instance", "list"]),
        "images": k.json(&["image", "list"]),
        "lvs": k.fixture.vg.lv_state(),
        "files": common::listing(&file_dir(k)),
    })
}

/// Lowercase hex sha256 of a whole file or block device, streamed.
fn sha256_of(path: &Path) -> String {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// An instance with a thin, a thick and a file volume of [`SIZE`], attached as vda (boot 0,
/// virtio), vdb and vdc, each a mounted ext4 guest disk; the agent and every disk's
/// mountpoint are the instance's. Declared guest first: its filesystems and loop devices
/// are let go before the volume group is removed.
struct Setup {
    guest: Guest,
    k: Kiln,
    instance: String,
    /// The volumes as `volume attach` printed them, in [`BACKENDS`] order.
    volumes: Vec<Value>,
    disks: Vec<PathBuf>,
    /// The guest's directory (agent socket and state, mountpoints); removed after the guest.
    _run: tempfile::TempDir,
}

impl Setup {
    fn vid(&self, i: usize) -> String {
        s(&self.volumes[i], "id")
    }
}

fn setup() -> Setup {
    let k = kiln();
    // The agent's state directory on tmpfs /run: a state file on a filesystem that gets
    // frozen would wedge the agent.
    let run = tempfile::tempdir_in("/run").unwrap();
    let mut guest = Guest::start(run.path());
    let vids: Vec<String> = BACKENDS
        .iter()
        .map(|b| {
            s(
                &k.json(&["volume", "create", "--size", SIZE, "--backend", b]),
                "id",
            )
        })
        .collect();
    let mut args = vec![
        "instance".to_string(),
        "create".into(),
        "--name".into(),
        "db-1".into(),
        "--agent".into(),
        guest.sock.to_str().unwrap().into(),
        "--property".into(),
        "os_distro=debian".into(),
    ];
    for i in 0..BACKENDS.len() {
        args.push("--freeze-mountpoint".into());
        args.push(guest.mountpoint(i).to_str().unwrap().into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let instance = s(&k.json(&a), "id");
    let mut volumes = Vec::new();
    let mut disks = Vec::new();
    for (i, (vid, b)) in vids.iter().zip(BACKENDS).enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        let mut args = vec![
            "volume",
            "attach",
            vid,
            "--instance",
            &instance,
            "--device",
            &dev,
        ];
        if i == 0 {
            args.extend(["--boot-index", "0", "--disk-bus", "virtio"]);
        }
        let attached = k.json(&args);
        assert_eq!(attached["backend"], b);
        assert_eq!(attached["status"], "in-use");
        // What a hypervisor opens: the LV's device node, or the raw file.
        let ci = &attached["connection_info"];
        let backing = if b == "file" {
            assert_eq!(ci["driver_volume_type"], "file", "{attached}");
            assert_eq!(ci["data"]["path"], attached["provider_location"]);
            s(&ci["data"], "path")
        } else {
            assert_eq!(ci["driver_volume_type"], "local", "{attached}");
            let path = s(&ci["data"], "device_path");
            let lv = s(&attached, "provider_location");
            let (vg, lv) = lv.split_once('/').unwrap();
            assert_eq!(vg, k.fixture.vg.vg);
            assert_eq!(
                path,
                format!(
                    "/dev/mapper/{}-{}",
                    vg.replace('-', "--"),
                    lv.replace('-', "--")
                )
            );
            path
        };
        disks.push(guest.disk_ext4(Path::new(&backing)));
        volumes.push(attached);
    }
    Setup {
        guest,
        k,
        instance,
        volumes,
        disks,
        _run: run,
    }
}

/// The image's snapshot record of volume `vid`.
fn snapshot_of(k: &Kiln, image: &Value, vid: &str) -> Value {
    for sid in image["snapshots"].as_array().unwrap() {
        let snap = k.json(&["snapshot", "show", sid.as_str().unwrap()]);
        if snap["volume_id"] == vid {
            return snap;
        }
    }
    panic!("image has no snapshot of {vid}: {image}");
}

/// A file holding the snapshot's bytes, and their sha256: a file snapshot's own file; an
/// LVM snapshot exported by kiln into the test's directory (see the module docs).
fn snapshot_bytes(k: &Kiln, snap: &Value) -> (PathBuf, String) {
    if snap["backend"] == "file" {
        let p = PathBuf::from(s(snap, "provider_location"));
        let sha = sha256_of(&p);
        return (p, sha);
    }
    let sid = s(snap, "id");
    let f = k.path(&format!("export-{sid}.raw"));
    if !f.exists() {
        let e = k.json(&["snapshot", "export", &sid, "--output", f.to_str().unwrap()]);
        assert_eq!(e["snapshot_id"], sid.as_str());
        assert_eq!(s(&e, "sha256"), sha256_of(&f), "export of {sid}");
    }
    let sha = sha256_of(&f);
    (f, sha)
}

/// `/name` from the image's snapshot of volume `vid`, read with debugfs (no mount, no
/// journal replay).
fn file_in_snapshot(k: &Kiln, image: &Value, vid: &str, name: &str) -> Option<String> {
    let (path, _) = snapshot_bytes(k, &snapshot_of(k, image, vid));
    read_guest_file(&path, name)
}

/// The backend object a snapshot record names exists: an LV whose origin is its volume's
/// LV, or a file.
fn assert_snapshot_on_backend(k: &Kiln, snap: &Value, volume: &Value) {
    let loc = s(snap, "provider_location");
    if snap["backend"] == "file" {
        assert!(Path::new(&loc).is_file(), "{snap}");
        return;
    }
    let lv = loc.split_once('/').unwrap().1;
    let vol_lv = s(volume, "provider_location");
    assert_eq!(
        lv_origin(k, lv).as_deref(),
        Some(vol_lv.split_once('/').unwrap().1),
        "{snap}: lvs {:?}",
        k.fixture.vg.lv_state()
    );
}

/// The tentpole on mixed backends: a quiesced instance snapshot of a thin, a thick and a
/// file volume holds, on every disk, a file the guest wrote just before without fsync; the
/// sequence number one writer puts on all three disks differs by at most one between the
/// three snapshots (one cut); the fsync writer on the thin disk stalled across the logged
/// freeze window (no pass begun inside it returned before the thaw, one was held until the
/// thaw, at most the pass in flight at the freeze returned inside); the image lists three
/// quiesced snapshots at Nova's BDM.
#[test]
fn a_quiesced_snapshot_of_thin_thick_and_file_volumes_holds_unsynced_writes_of_every_disk_at_one_cut()
 {
    let _serial = serial();
    let st = setup();
    let token = unique_token();
    for (d, b) in st.disks.iter().zip(BACKENDS) {
        std::fs::write(d.join("hello"), format!("{b} {token}")).unwrap();
    }
    let w = Writer::start(&st.disks, true);
    w.wait_for(20);
    let (code, img, window, stderr) =
        snapshot_logged(&st.k, &st.instance, &["--quiesce", "required"]);
    w.wait_for(w.seq.load(Ordering::SeqCst) + 20);
    let passes = w.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let (frozen, thawing) = window.expect("no freeze/thaw log lines");
    assert!(frozen <= thawing);
    // The fsync writer stalled for the whole window. The pass in flight when the freeze began
    // may return inside it (the freeze's own sync made its data durable; seen under UML), but
    // no pass begun after "guest frozen" returned before "guest thawing", and one pass was
    // held until the thaw.
    let utc = |t: SystemTime| DateTime::<Utc>::from(t);
    let near = || {
        let i = passes.partition_point(|(_, b)| utc(*b) <= frozen);
        passes[i.saturating_sub(2)..(i + 3).min(passes.len())]
            .iter()
            .map(|(a, b)| format!("{}..{}", utc(*a), utc(*b)))
            .collect::<Vec<_>>()
    };
    assert!(
        passes
            .iter()
            .any(|(a, b)| utc(*a) <= thawing && utc(*b) >= thawing),
        "no fsync pass was held until the thaw; window {frozen}..{thawing}, passes {:?}",
        near()
    );
    assert!(
        !passes
            .iter()
            .any(|(a, b)| utc(*a) > frozen && utc(*b) < thawing),
        "an fsync begun inside the window {frozen}..{thawing} completed inside it: {:?}",
        near()
    );
    assert!(
        passes
            .iter()
            .filter(|(_, b)| utc(*b) > frozen && utc(*b) < thawing)
            .count()
            <= 1,
        "more than the in-flight fsync completed inside the window {frozen}..{thawing}: {:?}",
        near()
    );
    assert_eq!(img["kiln_consistency"], "quiesced", "{img}");
    assert_eq!(img["status"], "active");
    assert_eq!(img["instance_id"], st.instance.as_str());
    assert_eq!(img["root_device_name"], "/dev/vda");
    assert_eq!(img["os_distro"], "debian");
    assert_eq!(img["snapshots"].as_array().unwrap().len(), 3, "{img}");
    let bdm: Value = serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
    let bdm = bdm.as_array().unwrap();
    assert_eq!(bdm.len(), 3);
    for (i, e) in bdm.iter().enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        assert_eq!(e["device_name"], dev.as_str(), "{e}");
        assert_eq!(e["source_type"], "snapshot");
        assert_eq!(e["destination_type"], "volume");
        assert_eq!(e["boot_index"], if i == 0 { json!(0) } else { Value::Null });
        let snap = snapshot_of(&st.k, &img, &st.vid(i));
        assert_eq!(e["snapshot_id"], snap["id"], "{e}");
    }
    let mut seqs = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        let snap = snapshot_of(&st.k, &img, &st.vid(i));
        assert_eq!(snap["backend"], *b);
        assert_eq!(snap["consistency"], "quiesced");
        assert_eq!(snap["image_id"], img["id"]);
        assert_eq!(snap["status"], "available");
        assert_snapshot_on_backend(&st.k, &snap, &st.volumes[i]);
        assert_eq!(
            file_in_snapshot(&st.k, &img, &st.vid(i), "hello"),
            Some(format!("{b} {token}")),
            "the {b} snapshot lacks the file written without fsync just before"
        );
        let n: u64 = file_in_snapshot(&st.k, &img, &st.vid(i), "bseq")
            .unwrap_or_else(|| panic!("the {b} snapshot lacks the unsynced bseq file"))
            .parse()
            .unwrap();
        seqs.push(n);
    }
    let (lo, hi) = (*seqs.iter().min().unwrap(), *seqs.iter().max().unwrap());
    assert!(
        lo >= 20 && hi - lo <= 1,
        "thin/thick/file snapshots hold sequence numbers {seqs:?}: not one cut"
    );
    assert_eq!(st.guest.status(), "thawed");
}

/// The same buffered writer under `--quiesce off`: no freeze, a crash-consistent image, and
/// the snapshots lack what the guest wrote but ext4 never committed (no fsync on any disk);
/// a quiesced snapshot right after holds it on all three.
#[test]
fn without_quiesce_the_uncommitted_writes_are_missing_from_the_thin_thick_and_file_snapshots() {
    let _serial = serial();
    let st = setup();
    let w = Writer::start(&st.disks, false);
    w.wait_for(20);
    let (code, off, window, stderr) = snapshot_logged(&st.k, &st.instance, &["--quiesce", "off"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(window.is_none(), "--quiesce off must not freeze: {stderr}");
    assert_eq!(off["kiln_consistency"], "crash-consistent", "{off}");
    let before = w.seq.load(Ordering::SeqCst);
    let (code, on, _, stderr) = snapshot_logged(&st.k, &st.instance, &["--quiesce", "required"]);
    assert_eq!(code, Some(0), "{stderr}");
    w.stop();
    let mut missing = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        let snap = snapshot_of(&st.k, &off, &st.vid(i));
        assert_eq!(snap["consistency"], "crash-consistent");
        if file_in_snapshot(&st.k, &off, &st.vid(i), "bseq").is_none() {
            missing.push(*b);
        }
        let q: u64 = file_in_snapshot(&st.k, &on, &st.vid(i), "bseq")
            .unwrap_or_else(|| panic!("the quiesced {b} snapshot lacks it"))
            .parse()
            .unwrap();
        assert!(
            q >= before,
            "quiesced {b}: {q} < {before} written before it started"
        );
    }
    eprintln!("uncommitted bseq missing from the crash-consistent snapshots of: {missing:?}");
    assert_eq!(
        missing, BACKENDS,
        "an uncommitted file reached a crash-consistent snapshot"
    );
}

/// Restore of a mixed image: every restored volume's bytes equal its snapshot's (sha256 of
/// the LV device / the file against the snapshot's), although the source volumes changed
/// after the snapshot; each lands on its source's backend, at the device, boot index and bus
/// the image recorded, attached to a new instance; the restored root disk holds the guest's
/// file. Deleting the image deletes its snapshots on all three backends.
#[test]
fn a_mixed_image_restores_each_volume_to_its_snapshot_at_its_device_and_boot_index() {
    let _serial = serial();
    let st = setup();
    for (d, b) in st.disks.iter().zip(BACKENDS) {
        std::fs::write(d.join("hello"), format!("{b} fs")).unwrap();
    }
    let img =
        st.k.json(&["instance", "snapshot", &st.instance, "--name", "golden"]);
    assert_eq!(img["kiln_consistency"], "quiesced", "{img}");
    let iid = s(&img, "id");
    // The volumes move on: what is restored must be the snapshot, not the volume.
    for d in &st.disks {
        std::fs::write(d.join("hello"), b"changed after the snapshot").unwrap();
        sys(&["sync", "-f", d.join("hello").to_str().unwrap()]);
    }
    let snaps: Vec<Value> = (0..BACKENDS.len())
        .map(|i| snapshot_of(&st.k, &img, &st.vid(i)))
        .collect();
    let want: Vec<String> = snaps.iter().map(|sn| snapshot_bytes(&st.k, sn).1).collect();
    let msg = st.k.fails(&["snapshot", "delete", &s(&snaps[1], "id")], 6);
    assert!(msg.contains(&iid), "{msg}");
    let restored = st.k.json(&["image", "restore", &iid, "--name", "clone-1"]);
    assert_ne!(restored["id"], st.instance.as_str());
    let vols = restored["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3, "{restored}");
    let mut root = None;
    for v in vols {
        let src = s(v, "source_snapshot_id");
        let i = snaps
            .iter()
            .position(|sn| sn["id"] == src.as_str())
            .unwrap_or_else(|| panic!("restored from {src}, not one of the image's"));
        let orig = &st.volumes[i];
        let b = BACKENDS[i];
        assert_eq!(v["backend"], b, "{v}");
        assert_eq!(v["status"], "in-use");
        assert_eq!(v["size_bytes"], orig["size_bytes"]);
        let a = &v["attachments"][0];
        assert_eq!(a["instance_id"], restored["id"]);
        for field in ["device", "boot_index", "disk_bus"] {
            assert_eq!(a[field], orig["attachments"][0][field], "{field} of {b}");
        }
        let data = &v["connection_info"]["data"];
        let path = if b == "file" {
            assert_eq!(v["connection_info"]["driver_volume_type"], "file");
            s(data, "path")
        } else {
            assert_eq!(v["connection_info"]["driver_volume_type"], "local");
            s(data, "device_path")
        };
        assert_eq!(
            sha256_of(Path::new(&path)),
            want[i],
            "restored {b} volume ({}) differs from its snapshot",
            a["device"]
        );
        if a["boot_index"] == 0 {
            root = Some(path);
        }
    }
    assert_eq!(
        read_guest_file(Path::new(&root.expect("no restored root disk")), "hello").as_deref(),
        Some("thin fs")
    );
    // The image's snapshots go with it, on every backend.
    let r = st.k.json(&["image", "delete", &iid]);
    assert_eq!(r["snapshots_deleted"].as_array().unwrap().len(), 3, "{r}");
    for sn in &snaps {
        st.k.fails(&["snapshot", "show", &s(sn, "id")], 3);
        let loc = s(sn, "provider_location");
        if sn["backend"] == "file" {
            assert!(!Path::new(&loc).exists(), "{loc} left behind");
        } else {
            let lv = loc.split_once('/').unwrap().1;
            assert_eq!(lv_origin(&st.k, lv), None, "{lv} left behind");
        }
    }
    st.k.fails(&["image", "show", &iid], 3);
}

/// The agent hangs (SIGSTOP): `--quiesce required` fails within a bound with one stderr line
/// and changes nothing (every record, every LV, every backend file); `auto` then takes a
/// crash-consistent image of all three volumes; the agent, resumed, reports the guest thawed.
#[test]
fn a_hung_agent_fails_required_fast_changing_nothing_and_auto_goes_crash_consistent() {
    let _serial = serial();
    let st = setup();
    let before = everything(&st.k);
    let pid = st.guest.agent_pid();
    // Our own child, by its PID.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let (out, took) = common::run_bounded(
        st.k.cmd(&[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "x",
            "--quiesce",
            "required",
            "--freeze-timeout",
            "1s",
        ]),
        LIMIT,
    );
    let msg = common::check_failure(&["instance", "snapshot"], &out, 8);
    assert!(msg.contains("agent"), "{msg}");
    assert!(
        took < Duration::from_secs(30),
        "took {took:?} with a 1 s agent timeout"
    );
    assert_eq!(everything(&st.k), before);
    let (out, _) = common::run_bounded(
        st.k.cmd(&[
            "--format",
            "json",
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "x",
            "--quiesce",
            "auto",
            "--freeze-timeout",
            "1s",
        ]),
        LIMIT,
    );
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(img["kiln_consistency"], "crash-consistent", "{img}");
    assert!(img["kiln_freeze_window_ms"].is_null(), "{img}");
    assert_eq!(img["snapshots"].as_array().unwrap().len(), 3, "{img}");
    for (i, b) in BACKENDS.iter().enumerate() {
        let snap = snapshot_of(&st.k, &img, &st.vid(i));
        assert_eq!(snap["backend"], *b);
        assert_eq!(snap["consistency"], "crash-consistent");
        assert_snapshot_on_backend(&st.k, &snap, &st.volumes[i]);
    }
    assert_eq!(st.guest.status(), "thawed");
}
