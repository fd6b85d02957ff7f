//! Snapshots of ATTACHED qcow2 volumes, taken by their hypervisor: a real
//! `qemu-storage-daemon` (the stand-in hypervisor, `kiln_testkit::qsd`) has each volume's
//! active file open and exports it over NBD; a guest writer writes sequence-numbered blocks
//! through NBD (`kiln_testkit::nbd`, one connection for the whole test); the driver switches
//! the disks onto new overlays through the daemon's QMP monitor.
//!
//! Proven here: every snapshot is one cut (and at least one cut lands inside a writer pass),
//! two volumes snapshotted as a group share one cut, the writer never errors or reconnects,
//! the record matches the daemon's graph, and every file passes `qemu-img check` afterwards;
//! refused snapshots (no monitor, a monitor that does not serve the volume, a socket that is
//! not QMP, a dead daemon) change nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Env, MIB, listing, snapshot};
use kiln_core::{Attachment, ErrorKind, InstanceId, Snapshot, Volume, VolumeDriver, VolumeStatus};
use kiln_testkit::cut::{BLOCK, bases, check_image, stamp};
use kiln_testkit::nbd::Writer;
use kiln_testkit::qsd::{Disk, Qsd};

/// Blocks per generation: 4 MiB per pass through NBD.
const BLOCKS: u64 = 1024;

/// An attached qcow2 volume: its record (in-use, attached with the daemon's monitor) and
/// its volume directory.
struct Attached {
    v: Volume,
    dir: PathBuf,
}

impl Attached {
    fn attachment(&self) -> &Attachment {
        &self.v.attachments[0]
    }
}

/// Creates `n` qcow2 volumes filled with generation 0, starts a daemon serving their active
/// files (exports `d0`, `d1`, ...) and returns them attached through `qmp` (the daemon's
/// monitor unless the test says otherwise).
async fn setup(env: &Env, n: usize, dir: &Path) -> (Vec<Attached>, Qsd) {
    let d = &env.driver;
    let bases = bases(BLOCKS);
    let mut vols = Vec::new();
    let mut paths = Vec::new();
    for _ in 0..n {
        let mut v = common::volume(8 * MIB);
        d.create_volume(&v).await.unwrap();
        let mut img = vec![0u8; (BLOCKS as usize) * BLOCK];
        for (i, blk) in img.chunks_mut(BLOCK).enumerate() {
            stamp(&bases[i], 0, i as u64, blk);
        }
        common::write_image(d, &v, 0, &img).await;
        let active = d.active_image(&v).unwrap();
        let vdir = active.parent().unwrap().to_path_buf();
        paths.push(active);
        v.status = VolumeStatus::InUse;
        vols.push(Attached { v, dir: vdir });
    }
    let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    let disks: Vec<Disk<'_>> = names
        .iter()
        .zip(&paths)
        .map(|(node, path)| Disk { node, path })
        .collect();
    let qsd = Qsd::start(&dir.join("qsd"), &disks);
    for (i, a) in vols.iter_mut().enumerate() {
        let mut att = Attachment::new(
            InstanceId::new(),
            format!("/dev/vd{}", (b'b' + i as u8) as char),
        );
        att.qmp = Some(qsd.qmp_path().to_string_lossy().into_owned());
        a.v.attachments = vec![att];
    }
    (vols, qsd)
}

/// A snapshot's image, read through the driver's reader.
async fn image_of(env: &Env, s: &Snapshot) -> Vec<u8> {
    let mut r = env.driver.open_snapshot_reader(s).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut img = vec![0u8; BLOCK * BLOCKS as usize];
        let mut off = 0;
        while off < img.len() {
            let n = r.read_at(off as u64, &mut img[off..]).unwrap();
            assert!(n > 0, "short read at {off}");
            off += n;
        }
        img
    })
    .await
    .unwrap()
}

/// Everything a refused snapshot must leave alone: the volume directory's listing and its
/// record, byte for byte.
fn state(a: &Attached) -> (Vec<String>, Vec<u8>) {
    (
        listing(&a.dir),
        std::fs::read(a.dir.join("chain.json")).unwrap(),
    )
}

/// The daemon's top node for `file`, by its own graph.
fn daemon_top(qsd: &Qsd, file: &Path) -> Option<String> {
    qsd.monitor()
        .block_nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.driver == "qcow2" && Path::new(&n.image_file()) == file)
        .map(|n| n.node_name)
}

/// `qemu-img check` of every qcow2 file in `dir` (run once the daemon is gone).
fn qemu_img_check_all(dir: &Path) {
    for name in listing(dir).iter().filter(|n| n.ends_with(".qcow2")) {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(dir.join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_snapshots_of_an_attached_qcow2_volume_are_single_cuts_taken_by_the_hypervisor() {
    let env = Env::qcow2().await;
    let tmp = tempfile::tempdir().unwrap();
    let (vols, mut qsd) = setup(&env, 1, tmp.path()).await;
    let a = &vols[0];
    let writer = Writer::start(&qsd.nbd_path(), &["d0"], BLOCKS);
    let mut snaps = Vec::new();
    for i in 0..6u64 {
        writer.wait_for(i + 1);
        std::thread::sleep(Duration::from_millis(i * 11 % 40));
        let s = snapshot(&a.v);
        env.driver
            .create_snapshot_force(&s, &a.v, a.attachment())
            .await
            .unwrap();
        // The record's active file is the one the daemon now writes.
        let active = env.driver.active_image(&a.v).unwrap();
        assert_eq!(
            daemon_top(&qsd, &active).as_deref(),
            Some(
                format!(
                    "kiln-{}",
                    &active.file_name().unwrap().to_string_lossy()[6..].replace('-', "")[..26]
                )
                .as_str()
            ),
            "the daemon's top node is kiln's overlay on the recorded active file"
        );
        snaps.push(s);
    }
    let done = writer.stop();
    assert!(
        done >= 6,
        "the writer kept writing across every snapshot ({done})"
    );

    let mut cuts = Vec::new();
    let bases = bases(BLOCKS);
    let mut last_g = 0;
    for s in &snaps {
        let (g, k) = check_image(&bases, &image_of(&env, s).await)
            .unwrap_or_else(|e| panic!("snapshot {}: {e}", s.id));
        assert!(g >= last_g, "snapshots go forward in time");
        last_g = g;
        cuts.push((g, k));
    }
    eprintln!("(generation, cut point) per snapshot: {cuts:?}");
    assert!(
        cuts.iter().any(|&(_, k)| k > 0 && k < BLOCKS as usize),
        "no snapshot landed inside a writer pass: {cuts:?}"
    );
    // What the guest wrote and flushed last is in the volume's active chain once the daemon
    // is gone.
    qsd.kill();
    let now = common::read_volume(&env.driver, &a.v).await;
    let (g, k) = check_image(&bases, &now).unwrap();
    assert_eq!(
        (g, k),
        (done, BLOCKS as usize),
        "the volume holds the last full pass"
    );
    qemu_img_check_all(&a.dir);
    // Every snapshot can be deleted once detached (offline merge), and the data stays.
    let mut detached = a.v.clone();
    detached.status = VolumeStatus::Available;
    detached.attachments.clear();
    for s in &snaps {
        env.driver.delete_snapshot(s).await.unwrap();
    }
    assert_eq!(common::read_volume(&env.driver, &detached).await, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_of_two_attached_qcow2_volumes_is_one_transaction_with_one_common_cut() {
    let env = Env::qcow2().await;
    let tmp = tempfile::tempdir().unwrap();
    let (vols, mut qsd) = setup(&env, 2, tmp.path()).await;
    let writer = Writer::start(&qsd.nbd_path(), &["d0", "d1"], BLOCKS);
    let bases = bases(BLOCKS);
    let n = BLOCKS as i64;
    let mut groups = Vec::new();
    for i in 0..5u64 {
        writer.wait_for(i + 1);
        std::thread::sleep(Duration::from_millis(i * 13 % 50));
        let members: Vec<_> = vols
            .iter()
            .map(|a| (snapshot(&a.v), a.v.clone(), Some(a.attachment().clone())))
            .collect();
        let out = env.driver.create_group_snapshot(&members).await.unwrap();
        for r in &out {
            assert!(r.is_ok(), "{r:?}");
        }
        groups.push(members);
    }
    writer.stop();
    qsd.kill();
    let mut seen = Vec::new();
    for members in &groups {
        // Writes done to each disk, counted from generation 1: the writer writes each block
        // to d0, then to d1, one write at a time, so at any instant d0 has done the same
        // number of writes as d1 or one more.
        let mut counts = Vec::new();
        for (s, _, _) in members {
            let (g, k) = check_image(&bases, &image_of(&env, s).await)
                .unwrap_or_else(|e| panic!("snapshot {}: {e}", s.id));
            counts.push((g as i64 - 1) * n + k as i64);
        }
        let (c0, c1) = (counts[0], counts[1]);
        assert!(
            c0 - c1 == 0 || c0 - c1 == 1,
            "not one instant across both disks: d0 has {c0} block writes, d1 {c1}"
        );
        seen.push((c0, c1));
    }
    eprintln!("(d0 writes, d1 writes) per group snapshot: {seen:?}");
    for a in &vols {
        qemu_img_check_all(&a.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_online_snapshots_change_nothing_and_say_why_in_one_line() {
    let env = Env::qcow2().await;
    let tmp = tempfile::tempdir().unwrap();
    let (vols, mut qsd) = setup(&env, 1, tmp.path()).await;
    let a = &vols[0];
    let before = state(a);
    let refuse = |att: Attachment, kind: ErrorKind, says: &'static str| {
        let env = &env;
        let v = a.v.clone();
        async move {
            let s = snapshot(&v);
            let e = env
                .driver
                .create_snapshot_force(&s, &v, &att)
                .await
                .err()
                .unwrap_or_else(|| panic!("snapshot through {:?} was not refused", att.qmp));
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
            assert_eq!(env.driver.lookup_snapshot(&s).await.unwrap(), None);
        }
    };
    // No monitor recorded.
    let mut att = a.attachment().clone();
    att.qmp = None;
    refuse(att, ErrorKind::Unsupported, "no QMP monitor").await;
    assert_eq!(state(a), before);

    // A monitor that does not serve this volume: a second daemon with another file.
    let other = tmp.path().join("other.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&other)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stranger = Qsd::start(
        &tmp.path().join("qsd2"),
        &[Disk {
            node: "x",
            path: &other,
        }],
    );
    let mut att = a.attachment().clone();
    att.qmp = Some(stranger.qmp_path().to_string_lossy().into_owned());
    att.node = Some("x-nope".into());
    refuse(att, ErrorKind::WrongState, "has no block node").await;
    assert_eq!(state(a), before);

    // A socket that is not a QMP monitor (the daemon's NBD socket).
    let mut att = a.attachment().clone();
    att.qmp = Some(qsd.nbd_path().to_string_lossy().into_owned());
    refuse(att, ErrorKind::Unavailable, "QMP").await;
    assert_eq!(state(a), before);

    // The hypervisor died.
    qsd.kill();
    refuse(
        a.attachment().clone(),
        ErrorKind::Unavailable,
        "not running",
    )
    .await;
    assert_eq!(state(a), before);
}

/// Deleting snapshots of an attached volume: the hypervisor merges the layers (the newest
/// snapshot by an active commit, an older one by a stream into its child) while the guest
/// writes; every other snapshot keeps its image, the volume keeps every write, the record
/// matches the daemon's graph and every file passes `qemu-img check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_an_attached_qcow2_volume_are_merged_by_the_hypervisor_while_it_writes() {
    let env = Env::qcow2().await;
    let tmp = tempfile::tempdir().unwrap();
    let (vols, mut qsd) = setup(&env, 1, tmp.path()).await;
    let a = &vols[0];
    let writer = Writer::start(&qsd.nbd_path(), &["d0"], BLOCKS);
    let mut snaps = Vec::new();
    for i in 1..=4u64 {
        writer.wait_for(i);
        let s = snapshot(&a.v);
        env.driver
            .create_snapshot_force(&s, &a.v, a.attachment())
            .await
            .unwrap();
        snaps.push(s);
    }
    let mut images = Vec::new();
    for s in &snaps {
        images.push(image_of(&env, s).await);
    }
    let files_before = listing(&a.dir).len();
    writer.wait_for(6);
    // The newest snapshot: its child is the active file (active commit), its progress
    // (the job's bytes) reported.
    let counter = Arc::new(Counter::default());
    env.driver
        .delete_snapshot_with_progress(&snaps[3], counter.clone())
        .await
        .unwrap();
    let (total, done) = (
        counter.total.load(Ordering::SeqCst),
        counter.done.load(Ordering::SeqCst),
    );
    assert!(total > 0 && done == total, "progress {done} of {total}");
    let active = env.driver.active_image(&a.v).unwrap();
    assert!(
        daemon_top(&qsd, &active).is_some(),
        "the daemon writes the recorded active file"
    );
    // A middle one: streamed into its child.
    env.driver.delete_snapshot(&snaps[1]).await.unwrap();
    assert!(daemon_top(&qsd, &env.driver.active_image(&a.v).unwrap()).is_some());
    assert_eq!(listing(&a.dir).len(), files_before - 2, "two layers fewer");
    for s in [&snaps[1], &snaps[3]] {
        assert_eq!(env.driver.lookup_snapshot(s).await.unwrap(), None);
    }
    let last = writer.stop();
    for (i, s) in snaps.iter().enumerate() {
        if i == 0 || i == 2 {
            assert!(image_of(&env, s).await == images[i], "snapshot {i} changed");
        }
    }
    assert!(
        !qsd.monitor()
            .block_nodes()
            .unwrap()
            .iter()
            .any(|n| n.node_name.starts_with("kiln-")
                && !listing(&a.dir)
                    .iter()
                    .any(|f| n.image_file().ends_with(f.as_str()))),
        "a node on a merged file was left behind"
    );
    qsd.kill();
    let now = common::read_volume(&env.driver, &a.v).await;
    assert_eq!(
        check_image(&bases(BLOCKS), &now).unwrap(),
        (last, BLOCKS as usize),
        "the volume holds every flushed write"
    );
    qemu_img_check_all(&a.dir);
    let report = env
        .driver
        .check()
        .unwrap()
        .check_volume(&a.v, false)
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

/// Someone cancels the hypervisor's merge job (`job-cancel` on another monitor) while kiln
/// waits for it: the delete fails in one line, the snapshot stays with its image intact, the
/// record keeps no half-done intent, and the chain checks out; deleting it again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_job_cancelled_in_the_hypervisor_leaves_the_snapshot_and_a_consistent_chain() {
    let env = Env::qcow2().await;
    let tmp = tempfile::tempdir().unwrap();
    let d = &env.driver;
    let mut v = common::volume(128 * MIB);
    d.create_volume(&v).await.unwrap();
    let active = d.active_image(&v).unwrap();
    // 96 MiB of data in the base: streaming it into the child takes a while, and the test
    // slows the job down further before cancelling it.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 96M"])
        .arg(&active)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qsd = Qsd::start(
        &tmp.path().join("qsd"),
        &[Disk {
            node: "d0",
            path: &active,
        }],
    );
    v.status = VolumeStatus::InUse;
    let mut att = Attachment::new(InstanceId::new(), "/dev/vdb");
    att.qmp = Some(qsd.qmp_path().to_string_lossy().into_owned());
    v.attachments = vec![att.clone()];
    let (s1, s2) = (snapshot(&v), snapshot(&v));
    d.create_snapshot_force(&s1, &v, &att).await.unwrap();
    d.create_snapshot_force(&s2, &v, &att).await.unwrap();
    let vdir = active.parent().unwrap().to_path_buf();
    let record = std::fs::read(vdir.join("chain.json")).unwrap();
    let images = (digest(&env, &s1).await, digest(&env, &s2).await);

    // s1's file is the base; its child is s2's file, not the active one: a stream job.
    let driver = d.clone();
    let s1c = s1.clone();
    let del = tokio::spawn(async move { driver.delete_snapshot(&s1c).await });
    let mut mon = qsd.monitor();
    let job = kiln_testkit::qsd::slow_down_job(&mut mon, "kiln-del-", 1 << 20);
    mon.execute("job-cancel", Some(serde_json::json!({"id": job})))
        .unwrap();
    let e = del
        .await
        .unwrap()
        .expect_err("a cancelled merge reported success");
    assert!(e.to_string().contains(&job), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    assert!(
        d.lookup_snapshot(&s1).await.unwrap().is_some(),
        "the snapshot stays"
    );
    assert_eq!(
        std::fs::read(vdir.join("chain.json")).unwrap(),
        record,
        "the record is as it was"
    );
    assert!(
        mon.jobs().unwrap().is_empty(),
        "the cancelled job was left in the daemon"
    );
    drop(mon);
    assert_eq!(
        (digest(&env, &s1).await, digest(&env, &s2).await),
        images,
        "a snapshot's image changed"
    );
    // Again, uncancelled: merged, and the later snapshot (whose file took the data) shows
    // what it showed.
    d.delete_snapshot(&s1).await.unwrap();
    assert_eq!(d.lookup_snapshot(&s1).await.unwrap(), None);
    assert_eq!(digest(&env, &s2).await, images.1);
    drop(qsd);
    qemu_img_check_all(&vdir);
}

/// A digest (FNV-1a over 8-byte words) of a snapshot's whole image, read through the driver.
async fn digest(env: &Env, s: &Snapshot) -> u64 {
    let mut r = env.driver.open_snapshot_reader(s).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let size = r.size();
        let mut buf = vec![0u8; 4 << 20];
        let (mut off, mut h) = (0u64, 0xcbf2_9ce4_8422_2325u64);
        while off < size {
            let n = r.read_at(off, &mut buf).unwrap();
            assert!(n > 0, "short read at {off}");
            for w in buf[..n].chunks(8) {
                let mut word = [0u8; 8];
                word[..w.len()].copy_from_slice(w);
                h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0100_0000_01b3);
            }
            off += n as u64;
        }
        h
    })
    .await
    .unwrap()
}

/// A progress handle that remembers what it was told.
#[derive(Default)]
struct Counter {
    total: AtomicU64,
    done: AtomicU64,
}

impl kiln_core::Progress for Counter {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::SeqCst);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::SeqCst);
    }
}
