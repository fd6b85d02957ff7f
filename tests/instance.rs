//! End-to-end tests of instance snapshots and images with a **real qemu-guest-agent**.
//!
//! The "guest" is this host, kept safe: the agent runs as our own child process on a unix
//! socket (the way a hypervisor exposes the agent channel), with `guest-fsfreeze-freeze`
//! (the unfiltered freeze of every filesystem) blocked by qemu-ga's own `--block-rpcs`, and
//! every instance freezes only its listed mountpoints through `guest-fsfreeze-freeze-list`.
//! Each guest disk is a kiln volume (raw+reflink file on a real XFS, or a qcow2 volume that a
//! real qemu-storage-daemon serves as a file through a FUSE export) attached to a loop
//! device, formatted ext4 and mounted: the guest writes through the page cache into the
//! volume's file, exactly the data path whose flush a freeze forces. Needs root, qemu-ga,
//! e2fsprogs, util-linux (tests/install-deps.sh).
//!
//! The tests run one at a time (`common::serial`): every "guest" here shares one kernel, and
//! qemu-ga's `guest-fsfreeze-thaw` thaws every filesystem it can see — one test's thaw
//! would end another test's freeze early (found the hard way: a deadline test passed
//! alone and failed beside another).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use common::guest::{Guest, Writer, read_guest_file, snapshot_logged};
use common::{Kiln, s, sha256_hex};
use serde_json::Value;

/// Hang guard for commands and waits (not a timing threshold: far above any real run).
const LIMIT: Duration = Duration::from_secs(120);

/// A kiln with `n` raw volumes of 64 MiB, each a guest disk, attached to an instance with
/// the agent and every disk's mountpoint to freeze: vda (boot 0), vdb, ...
struct Setup {
    k: Kiln,
    guest: Guest,
    instance: String,
    volumes: Vec<String>,
    disks: Vec<PathBuf>,
}

fn setup(n: usize) -> Setup {
    setup_fs(n, "ext4", "64M")
}

/// [`setup`] with guest filesystem `fs` on volumes of `size`.
fn setup_fs(n: usize, fs: &str, size: &str) -> Setup {
    let k = Kiln::new();
    let mut guest = Guest::start(k.dir.path());
    let mut volumes = Vec::new();
    let mut disks = Vec::new();
    for _ in 0..n {
        let v = k.json(&["volume", "create", "--size", size]);
        disks.push(guest.disk_fs(Path::new(&s(&v, "provider_location")), fs));
        volumes.push(s(&v, "id"));
    }
    let mut args = vec![
        "instance".to_string(),
        "create".into(),
        "--name".into(),
        "web-1".into(),
        "--agent".into(),
        guest.sock.to_str().unwrap().into(),
        "--property".into(),
        "os_distro=debian".into(),
    ];
    for d in &disks {
        args.push("--freeze-mountpoint".into());
        args.push(d.to_str().unwrap().into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let instance = s(&k.json(&a), "id");
    for (i, v) in volumes.iter().enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        let mut args = vec![
            "volume",
            "attach",
            v,
            "--instance",
            &instance,
            "--device",
            &dev,
        ];
        if i == 0 {
            args.extend(["--boot-index", "0", "--disk-bus", "virtio"]);
        }
        // What a hypervisor needs to open it (Cinder's initialize_connection shape).
        let attached = k.json(&args);
        assert_eq!(attached["connection_info"]["driver_volume_type"], "file");
        assert_eq!(
            attached["connection_info"]["data"]["path"],
            attached["provider_location"]
        );
        assert_eq!(k.json(&["volume", "show", v]), attached);
    }
    let _ = &mut guest;
    Setup {
        k,
        guest,
        instance,
        volumes,
        disks,
    }
}

/// The image's snapshot of volume `vid`: its file on the raw backend.
fn snapshot_file(k: &Kiln, image: &Value, vid: &str) -> PathBuf {
    for sid in image["snapshots"].as_array().unwrap() {
        let snap = k.json(&["snapshot", "show", sid.as_str().unwrap()]);
        if snap["volume_id"] == vid {
            return PathBuf::from(s(&snap, "provider_location"));
        }
    }
    panic!("image has no snapshot of {vid}: {image}");
}

/// Everything kiln records, every field: compared before and after a refused command.
fn everything(k: &Kiln) -> Value {
    serde_json::json!({
        "volumes": k.json(&["volume", "list"]),
        "snapshots": k.json(&["snapshot", "list"]),
        "instances": k.json(&["instance", "list"]),
        "images": k.json(&["image", "list"]),
        "files": common::listing(&k.raw_dir()),
    })
}

/// The tentpole: a quiesced instance snapshot holds what the guest wrote but never fsynced
/// on every disk, the disks agree with each other (one cut), the fsync writer stalled
/// across the freeze window (a pass began before the freeze and ended after the thaw, and
/// none ended inside), and the image is Nova's.
#[test]
fn a_quiesced_instance_snapshot_holds_unsynced_writes_of_every_disk_cut_inside_the_window() {
    let _serial = common::serial();
    let mut st = setup(2);
    let w = Writer::start(&st.disks, true);
    w.wait_for(20);
    let (code, img, window, stderr) =
        snapshot_logged(&st.k, &st.instance, &["--quiesce", "required"]);
    w.wait_for(w.seq.load(Ordering::SeqCst) + 20);
    let passes = w.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let (frozen, thawing) = window.expect("no freeze/thaw log lines");
    assert!(frozen <= thawing);
    let utc = |t: SystemTime| DateTime::<Utc>::from(t);
    // The writer stalled: a pass was held until the thaw, no pass begun inside the window
    // completed inside it, and at most the pass in flight when the freeze began completed
    // inside (the freeze's own sync can make its data durable and let it return).
    assert!(
        passes
            .iter()
            .any(|(a, b)| utc(*a) <= thawing && utc(*b) >= thawing),
        "no fsync pass was held until the thaw ({frozen}..{thawing})"
    );
    assert!(
        !passes
            .iter()
            .any(|(a, b)| utc(*a) > frozen && utc(*b) < thawing),
        "an fsync begun while the filesystems were frozen completed before the thaw"
    );
    let inside: Vec<_> = passes
        .iter()
        .filter(|(_, b)| utc(*b) > frozen && utc(*b) < thawing)
        .collect();
    assert!(
        inside.len() <= 1 && inside.iter().all(|(a, _)| utc(*a) <= frozen),
        "fsyncs completed while the filesystems were frozen: {inside:?}"
    );
    // The image: Nova's fields and properties.
    assert_eq!(img["kiln_consistency"], "quiesced");
    assert_eq!(img["status"], "active");
    assert_eq!(img["size"], 0);
    assert_eq!(img["disk_format"], "raw");
    assert_eq!(img["container_format"], "bare");
    assert_eq!(img["bdm_v2"], "True");
    assert_eq!(img["root_device_name"], "/dev/vda");
    assert_eq!(img["os_distro"], "debian");
    assert_eq!(img["instance_id"], st.instance.as_str());
    assert!(
        img["kiln_freeze_window_ms"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    let bdm: Value = serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
    assert_eq!(bdm.as_array().unwrap().len(), 2);
    assert_eq!(bdm[0]["device_name"], "/dev/vda");
    assert_eq!(bdm[0]["boot_index"], 0);
    assert_eq!(bdm[0]["disk_bus"], "virtio");
    assert_eq!(bdm[0]["source_type"], "snapshot");
    assert_eq!(bdm[0]["destination_type"], "volume");
    assert_eq!(bdm[0]["volume_size"], 1);
    assert!(bdm[1]["boot_index"].is_null() && bdm[1]["volume_id"].is_null());
    // Buffered, never-fsynced data reached both snapshots, at one cut.
    let a: u64 = read_guest_file(&snapshot_file(&st.k, &img, &st.volumes[0]), "bseq")
        .expect("disk 0's snapshot lacks the unsynced file")
        .parse()
        .unwrap();
    let b: u64 = read_guest_file(&snapshot_file(&st.k, &img, &st.volumes[1]), "bseq")
        .expect("disk 1's snapshot lacks the unsynced file")
        .parse()
        .unwrap();
    assert!(a >= 20 && (a == b || a == b + 1), "disk0 {a}, disk1 {b}");
    for sid in img["snapshots"].as_array().unwrap() {
        let snap = st.k.json(&["snapshot", "show", sid.as_str().unwrap()]);
        assert_eq!(snap["consistency"], "quiesced");
        assert_eq!(snap["image_id"], img["id"]);
        assert_eq!(snap["forced"], true);
    }
    assert_eq!(st.guest.status(), "thawed");
    let _ = &mut st;
}

/// The same guest writer under `--quiesce off`: the crash-consistent snapshot lacks what the
/// guest had written but not committed (the second disk is never fsynced), while a
/// quiesced one right after holds it.
#[test]
fn without_quiesce_the_unsynced_writes_are_missing_from_the_snapshot() {
    let _serial = common::serial();
    let st = setup(2);
    let w = Writer::start(&st.disks, false);
    w.wait_for(20);
    let (code, off, window, stderr) = snapshot_logged(&st.k, &st.instance, &["--quiesce", "off"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(window.is_none(), "--quiesce off must not freeze: {stderr}");
    assert_eq!(off["kiln_consistency"], "crash-consistent");
    let before = w.seq.load(Ordering::SeqCst);
    let (code, on, _, stderr) = snapshot_logged(&st.k, &st.instance, &["--quiesce", "required"]);
    assert_eq!(code, Some(0), "{stderr}");
    w.stop();
    let disk1 = |img: &Value| read_guest_file(&snapshot_file(&st.k, img, &st.volumes[1]), "bseq");
    assert_eq!(
        disk1(&off),
        None,
        "an uncommitted file reached a crash-consistent snapshot"
    );
    let q: u64 = disk1(&on)
        .expect("the quiesced snapshot lacks it")
        .parse()
        .unwrap();
    assert!(
        q >= before,
        "quiesced {q} < {before} written before it started"
    );
}

/// The agent is down, or hangs (SIGSTOP): `required` fails fast with one line and changes
/// nothing; `auto` falls back to a crash-consistent image.
#[test]
fn a_down_or_hung_agent_fails_required_fast_and_auto_goes_crash_consistent() {
    let _serial = common::serial();
    let mut st = setup(1);
    let before = everything(&st.k);
    // Hung: the agent accepts the connection but never answers.
    let pid = st.guest.agent_pid();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
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
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let args = ["instance", "snapshot"];
    let msg = common::check_failure(&args, &out, 8);
    assert!(msg.contains("agent"), "{msg}");
    assert!(
        took < Duration::from_secs(30),
        "took {took:?} with a 1 s agent timeout"
    );
    assert_eq!(everything(&st.k), before);
    // Down.
    st.guest.kill_agent();
    let msg = st.k.fails(
        &[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "x",
            "--quiesce",
            "required",
        ],
        8,
    );
    assert!(msg.contains("agent"), "{msg}");
    assert_eq!(everything(&st.k), before);
    let img =
        st.k.json(&["instance", "snapshot", &st.instance, "--name", "x"]);
    assert_eq!(img["kiln_consistency"], "crash-consistent");
}

/// A member that cannot finish inside the window: its backend directory lives on a guest
/// filesystem that the freeze itself freezes, so its snapshot blocks until the guard thaws
/// at the deadline. The snapshots are not consistent: everything is rolled back, one line
/// says why, and the guest is thawed.
#[test]
fn snapshots_past_the_freeze_deadline_are_rolled_back_and_the_guest_thawed() {
    let _serial = common::serial();
    let st = setup_fs(1, "xfs", "320M");
    // A raw+reflink backend inside the guest's (frozen) XFS, and a volume on it attached as
    // vdb.
    let inner = st.disks[0].join("inner");
    let config = format!(
        "{}\n[backends.inner]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n",
        std::fs::read_to_string(&st.k.config).unwrap(),
        inner.display()
    );
    std::fs::write(&st.k.config, config).unwrap();
    let v =
        st.k.json(&["volume", "create", "--size", "16M", "--backend", "inner"]);
    st.k.json(&[
        "volume",
        "attach",
        &s(&v, "id"),
        "--instance",
        &st.instance,
        "--device",
        "/dev/vdb",
    ]);
    let before = everything(&st.k);
    let inner_before = common::listing(&inner);
    let (out, _) = common::run_bounded(
        st.k.cmd(&[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "late",
            "--quiesce",
            "required",
            "--freeze-timeout",
            "2s",
        ]),
        LIMIT,
    );
    let msg = common::check_failure(&["instance", "snapshot"], &out, 8);
    assert!(msg.contains("deadline"), "{msg}");
    assert_eq!(everything(&st.k), before);
    assert_eq!(common::listing(&inner), inner_before);
    assert_eq!(st.guest.status(), "thawed");
}

/// SIGKILL of kiln while the guest is frozen (held inside the window by a fail point that
/// sleeps there, as a slow backend would): the guard thaws at once — long before the 60 s
/// deadline — and the next kiln command rolls the members back; no image, no orphan.
#[test]
fn sigkill_mid_freeze_thaws_the_guest_and_the_next_start_rolls_back() {
    let _serial = common::serial();
    let st = setup(2);
    let before = everything(&st.k);
    let mut c = st.k.cmd(&[
        "--log-format",
        "json",
        "instance",
        "snapshot",
        &st.instance,
        "--name",
        "killed",
        "--quiesce",
        "required",
        "--freeze-timeout",
        "60s",
    ]);
    c.env("KILN_LOG", "info")
        .env(
            "FAILPOINTS",
            "instance_snapshot::after_members=sleep(100000)",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if l.contains("guest frozen") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(LIMIT).expect("kiln never froze the guest");
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    // The guest writes again once the guard has thawed it.
    let probe = st.disks[0].join("probe");
    let writer = std::thread::spawn(move || std::fs::write(probe, b"x").map(|()| Instant::now()));
    let t = Instant::now();
    while !writer.is_finished() {
        assert!(
            t.elapsed() < LIMIT,
            "the guest stayed frozen after kiln died"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let resumed = writer.join().unwrap().unwrap();
    assert!(
        resumed.duration_since(killed) < Duration::from_secs(30),
        "thawed only after {:?}: the deadline did it, not the guard seeing kiln die",
        resumed.duration_since(killed)
    );
    assert_eq!(st.guest.status(), "thawed");
    // The next command recovers: every member rolled back, nothing recorded.
    assert_eq!(everything(&st.k), before);
}

/// Fail points at every step of an instance snapshot (kiln aborts there): after the next
/// start no guest is frozen, no snapshot is left on any backend or in the store, and no
/// image is recorded.
#[test]
fn a_crash_at_any_step_leaves_no_frozen_guest_no_orphan_and_no_image() {
    let _serial = common::serial();
    let st = setup(2);
    let before = everything(&st.k);
    for point in [
        "after_freeze",
        "after_members",
        "after_thaw",
        "before_image",
    ] {
        let mut c = st.k.cmd(&[
            "instance",
            "snapshot",
            &st.instance,
            "--name",
            "crash",
            "--quiesce",
            "required",
        ]);
        c.env("FAILPOINTS", format!("instance_snapshot::{point}=return"));
        let (out, _) = common::run_bounded(c, LIMIT);
        assert!(
            !out.status.success(),
            "fail point {point} did not fire (is kiln built with --features failpoints?)"
        );
        // The guard saw kiln die; the next command's recovery rolls back.
        let t = Instant::now();
        while st.guest.status() != "thawed" {
            assert!(t.elapsed() < LIMIT, "{point}: the guest stayed frozen");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(everything(&st.k), before, "after a crash at {point}");
    }
}

/// A restore killed at either side of a member's driver call (fail points): the next
/// command rolls the whole restore back — no new volume on the backend or in the store, no
/// new instance — and the image restores fine afterwards.
#[test]
fn a_crashed_restore_leaves_no_volume_and_no_instance() {
    let _serial = common::serial();
    let st = setup(2);
    let img =
        st.k.json(&["instance", "snapshot", &st.instance, "--name", "golden"]);
    let iid = s(&img, "id");
    let before = everything(&st.k);
    for point in ["before_driver", "after_driver"] {
        let mut c = st.k.cmd(&["image", "restore", &iid, "--name", "crash"]);
        c.env("FAILPOINTS", format!("image_restore::{point}=return"));
        let (out, _) = common::run_bounded(c, LIMIT);
        assert!(
            !out.status.success(),
            "fail point {point} did not fire (is kiln built with --features failpoints?)"
        );
        assert_eq!(everything(&st.k), before, "after a crash at {point}");
    }
    let restored = st.k.json(&["image", "restore", &iid]);
    assert_eq!(restored["volumes"].as_array().unwrap().len(), 2);
}

/// Restore: every volume's data equals its snapshot's, at the device and boot index the
/// image records; the image's snapshots cannot be deleted alone; deleting the image
/// deletes them (or keeps them when asked).
#[test]
fn an_image_restores_every_volume_and_deletes_with_its_snapshots() {
    let _serial = common::serial();
    let st = setup(2);
    std::fs::write(st.disks[0].join("hello"), b"root fs").unwrap();
    std::fs::write(st.disks[1].join("hello"), b"data fs").unwrap();
    let img =
        st.k.json(&["instance", "snapshot", &st.instance, "--name", "golden"]);
    assert_eq!(img["kiln_consistency"], "quiesced");
    let iid = s(&img, "id");
    let snaps: Vec<String> = img["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let msg = st.k.fails(&["snapshot", "delete", &snaps[0]], 6);
    assert!(msg.contains(&iid), "{msg}");
    // Glance's view.
    let shown = st.k.json(&["image", "show", &iid]);
    assert_eq!(shown, img);
    let restored = st.k.json(&["image", "restore", &iid, "--name", "clone-1"]);
    let vols = restored["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_ne!(restored["id"], st.instance.as_str());
    for v in vols {
        let a = &v["attachments"][0];
        assert_eq!(a["instance_id"], restored["id"]);
        let src = s(v, "source_snapshot_id");
        let snap = st.k.json(&["snapshot", "show", &src]);
        let want = sha256_hex(&std::fs::read(s(&snap, "provider_location")).unwrap());
        let got = sha256_hex(&std::fs::read(s(v, "provider_location")).unwrap());
        assert_eq!(
            got, want,
            "restored {} differs from its snapshot",
            a["device"]
        );
        let orig = st.k.json(&["volume", "show", &s(&snap, "volume_id")]);
        assert_eq!(a["device"], orig["attachments"][0]["device"]);
        assert_eq!(a["boot_index"], orig["attachments"][0]["boot_index"]);
        assert_eq!(a["disk_bus"], orig["attachments"][0]["disk_bus"]);
        assert_eq!(v["status"], "in-use");
        assert_eq!(v["connection_info"]["driver_volume_type"], "file");
        assert_eq!(v["connection_info"]["data"]["path"], v["provider_location"]);
    }
    let root = vols
        .iter()
        .find(|v| v["attachments"][0]["device"] == "/dev/vda")
        .unwrap();
    assert_eq!(
        read_guest_file(Path::new(&s(root, "provider_location")), "hello").as_deref(),
        Some("root fs")
    );
    // Delete: the snapshots go with the image (the restored volumes are full reflink
    // copies: nothing depends on the snapshots).
    let r = st.k.json(&["image", "delete", &iid]);
    assert_eq!(r["snapshots_deleted"].as_array().unwrap().len(), 2);
    for sid in &snaps {
        st.k.fails(&["snapshot", "show", sid], 3);
        assert!(!st.k.raw_dir().join(format!("snapshot-{sid}")).exists());
    }
    st.k.fails(&["image", "show", &iid], 3);
    let img =
        st.k.json(&["instance", "snapshot", &st.instance, "--name", "kept"]);
    let r =
        st.k.json(&["image", "delete", &s(&img, "id"), "--keep-snapshots"]);
    for sid in r["snapshots_kept"].as_array().unwrap() {
        let snap = st.k.json(&["snapshot", "show", sid.as_str().unwrap()]);
        assert!(snap["image_id"].is_null());
        st.k.json(&["snapshot", "delete", sid.as_str().unwrap()]);
    }
}

/// Bad input: one line, the right exit code, nothing changed (every record, every field,
/// every backend file).
#[test]
fn bad_instance_and_image_input_is_refused_and_changes_nothing() {
    let _serial = common::serial();
    let st = setup(2);
    let empty = s(&st.k.json(&["instance", "create", "--name", "empty"]), "id");
    let spare = s(&st.k.json(&["volume", "create", "--size", "16M"]), "id");
    let snap = s(&st.k.json(&["snapshot", "create", &spare]), "id");
    let before = everything(&st.k);
    let unknown = "00000000-0000-4000-8000-000000000000";
    for (args, code) in [
        (vec!["instance", "snapshot", unknown, "--name", "x"], 3),
        (vec!["instance", "snapshot", &empty, "--name", "x"], 4),
        (vec!["instance", "snapshot", "../etc", "--name", "x"], 4),
        (
            vec!["instance", "snapshot", &st.instance, "--name", "$(reboot)"],
            4,
        ),
        (
            vec![
                "instance",
                "snapshot",
                &st.instance,
                "--name",
                "x",
                "--freeze-timeout",
                "0",
            ],
            4,
        ),
        (
            vec![
                "instance",
                "snapshot",
                &st.instance,
                "--name",
                "x",
                "--freeze-timeout",
                "1000h",
            ],
            4,
        ),
        (
            vec![
                "instance",
                "snapshot",
                &st.instance,
                "--name",
                "x",
                "--freeze-timeout",
                "99999m",
            ],
            4,
        ),
        (
            vec![
                "instance",
                "snapshot",
                &st.instance,
                "--name",
                "x",
                "--property",
                "bdm_v2=False",
            ],
            4,
        ),
        (
            vec![
                "instance",
                "snapshot",
                &st.instance,
                "--name",
                "x",
                "--property",
                "a;b=c",
            ],
            4,
        ),
        (vec!["instance", "create", "--agent", "relative.sock"], 4),
        (
            vec!["instance", "create", "--freeze-mountpoint", "/mnt/"],
            4,
        ),
        (vec!["instance", "create", "--id", &st.instance], 5),
        (vec!["instance", "delete", &st.instance], 6),
        (vec!["instance", "show", unknown], 3),
        (
            vec![
                "volume",
                "attach",
                &spare,
                "--instance",
                &st.instance,
                "--device",
                "/dev/vda",
            ],
            5,
        ),
        (
            vec![
                "volume",
                "attach",
                &st.volumes[0],
                "--instance",
                &empty,
                "--device",
                "/dev/vdb",
            ],
            5,
        ),
        (
            vec![
                "volume",
                "attach",
                &spare,
                "--instance",
                &empty,
                "--device",
                "/dev/vdb",
                "--boot-index=-1",
            ],
            4,
        ),
        (
            vec![
                "volume",
                "attach",
                &spare,
                "--instance",
                &empty,
                "--device",
                "/dev/vdb",
                "--disk-bus",
                "vir tio",
            ],
            4,
        ),
        (vec!["image", "show", &snap], 3),
        (vec!["image", "restore", &snap], 3),
        (vec!["image", "delete", &snap], 3),
        (vec!["image", "restore", unknown, "--name=-rf"], 4),
    ] {
        st.k.fails(&args, code);
        assert_eq!(everything(&st.k), before, "after {args:?}");
    }
}

/// Mixed backends with qcow2 volumes that a running hypervisor has open (issue 9): a raw+
/// reflink volume (vda) and two qcow2 volumes (vdb, vdc) served by a real
/// qemu-storage-daemon — the instance's `--qmp` — through FUSE exports, each a loop-mounted
/// ext4 the agent freezes. The quiesced image holds the never-fsynced writes of all three
/// disks at one cut; the qcow2 members were switched by one QMP transaction inside the
/// window (their active files moved, the daemon writes the new ones); restoring the image
/// gives every volume its snapshot's bytes.
#[test]
fn a_quiesced_snapshot_of_raw_and_hypervisor_served_qcow2_volumes_holds_every_disk_at_one_cut() {
    use kiln_testkit::qsd::{Disk, Export, Qsd};
    let _serial = common::serial();
    let k = Kiln::new();
    let mut guest = Guest::start(k.dir.path());
    let raw = s(&k.json(&["volume", "create", "--size", "64M"]), "id");
    let qcow: Vec<String> = (0..2)
        .map(|_| {
            s(
                &k.json(&["volume", "create", "--size", "64M", "--backend", "qcow"]),
                "id",
            )
        })
        .collect();
    let files: Vec<PathBuf> = qcow.iter().map(|v| k.qcow_active(v)).collect();
    let qsd = Qsd::start_with(
        &k.path("qsd"),
        &[
            Disk {
                node: "q0",
                path: &files[0],
            },
            Disk {
                node: "q1",
                path: &files[1],
            },
        ],
        Export::Fuse,
    );
    let raw_file = PathBuf::from(s(&k.json(&["volume", "show", &raw]), "provider_location"));
    let disks = vec![
        guest.disk_ext4(&raw_file),
        guest.disk_ext4(&qsd.fuse_file("q0")),
        guest.disk_ext4(&qsd.fuse_file("q1")),
    ];
    let mut args = vec![
        "instance".to_string(),
        "create".into(),
        "--agent".into(),
        guest.sock.to_str().unwrap().into(),
        "--qmp".into(),
        qsd.qmp_path().to_str().unwrap().into(),
    ];
    for d in &disks {
        args.push("--freeze-mountpoint".into());
        args.push(d.to_str().unwrap().into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let instance = s(&k.json(&a), "id");
    let vols = [raw.clone(), qcow[0].clone(), qcow[1].clone()];
    for (i, v) in vols.iter().enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        let attached = k.attach(v, &instance, &dev);
        if i > 0 {
            // The daemon has the file open: the attachment records its node.
            assert_eq!(attached["attachments"][0]["node"], format!("q{}", i - 1));
        }
    }
    let w = Writer::start(&disks, true);
    w.wait_for(20);
    let (code, img, window, stderr) = snapshot_logged(&k, &instance, &["--quiesce", "required"]);
    w.wait_for(w.seq.load(Ordering::SeqCst) + 20);
    w.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(window.is_some(), "not frozen: {stderr}");
    assert_eq!(img["kiln_consistency"], "quiesced", "{img}");
    // The qcow2 volumes moved onto new overlays, which the daemon now writes.
    let nodes = qsd.monitor().block_nodes().unwrap();
    for (v, old) in qcow.iter().zip(&files) {
        let now = k.qcow_active(v);
        assert_ne!(&now, old, "volume {v} was not switched");
        assert!(
            nodes
                .iter()
                .any(|n| n.driver == "qcow2" && Path::new(&n.image_file()) == now),
            "the daemon does not write {}: {nodes:?}",
            now.display()
        );
    }
    // Every disk's never-fsynced counter, from its snapshot as a crash would leave it.
    let bdm: Value = serde_json::from_str(img["block_device_mapping"].as_str().unwrap()).unwrap();
    let mut seqs = Vec::new();
    let mut sums = Vec::new();
    for dev in ["/dev/vda", "/dev/vdb", "/dev/vdc"] {
        let e = bdm
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["device_name"] == dev)
            .unwrap();
        let sid = s(e, "snapshot_id");
        let out = k.path(&format!("snap-{sid}.raw"));
        let summary = k.json(&[
            "snapshot",
            "export",
            &sid,
            "--output",
            out.to_str().unwrap(),
        ]);
        sums.push(s(&summary, "sha256"));
        let n: u64 = read_guest_file(&out, "bseq")
            .unwrap_or_else(|| panic!("{dev}'s snapshot lacks the unsynced file"))
            .parse()
            .unwrap();
        seqs.push(n);
    }
    assert!(
        seqs[0] >= 20 && seqs[0] >= seqs[1] && seqs[1] >= seqs[2] && seqs[0] - seqs[2] <= 1,
        "not one cut across the three disks: {seqs:?}"
    );
    // Restore: every volume equals its snapshot.
    let restored = k.json(&["image", "restore", &s(&img, "id"), "--name", "copy"]);
    for (i, dev) in ["/dev/vda", "/dev/vdb", "/dev/vdc"].iter().enumerate() {
        let v = restored["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["attachments"][0]["device"] == *dev)
            .unwrap_or_else(|| panic!("restored instance lacks {dev}: {restored}"));
        // Read back through a snapshot of it, detached (nothing serves the copies).
        let vid = s(v, "id");
        k.json(&["volume", "detach", &vid]);
        let sid = s(&k.json(&["snapshot", "create", &vid]), "id");
        let (bytes, _) = k.export(&sid);
        assert_eq!(sha256_hex(&bytes), sums[i], "{dev}");
    }
    assert_eq!(guest.status(), "thawed");
    drop(guest);
    drop(qsd);
}
