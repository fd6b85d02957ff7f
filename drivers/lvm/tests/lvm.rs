//! The LVM driver against real LVM (thin and thick) inside the user-mode-Linux guest.
//! Run with `tests/harness/lvm-suite.sh` (one guest boot for this whole binary).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_core::{ErrorKind, VolumeDriver, no_progress};
use kiln_driver_lvm::{LvmConfig, LvmDriver, LvmType};
use support::*;

const VOL: u64 = 64 * MIB;

async fn driver(t: &TestVg) -> LvmDriver {
    LvmDriver::open("lvm-test", t.config()).await.unwrap()
}

// ---------------------------------------------------------------- data integrity

async fn integrity(thin: bool) {
    let t = TestVg::new(if thin { "int-thin" } else { "int-thick" }, thin, 512);
    let d = driver(&t).await;
    assert_eq!(d.is_thin(), thin);
    let v = volume(VOL);
    let pu = d.create_volume(&v).await.unwrap();
    assert_eq!(
        pu.provider_location,
        Some(format!("{}/volume-{}", t.vg, v.id))
    );
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    assert_dev(&dev, &img, "new volume reads zeros");
    img.write(&dev, 0, 8 << 20, 1);
    img.write(&dev, 40 << 20, 1 << 20, 2);
    let at_s1 = img.clone();

    let s1 = snapshot(&v);
    let pu = d.create_snapshot(&s1, &v).await.unwrap();
    assert_eq!(
        pu.provider_location,
        Some(format!("{}/_snapshot-{}", t.vg, s1.id))
    );
    assert!(d.snapshot_exists(&s1).await.unwrap());
    img.write(&dev, 0, 4 << 20, 3);
    img.write(&dev, 20 << 20, 1 << 20, 4);
    assert_dev(&dev, &img, "origin after overwrite");

    let r = d.open_snapshot_reader(&s1).await.unwrap();
    let want = at_s1.clone();
    let extents =
        tokio::task::spawn_blocking(move || assert_snapshot(r, &want, "snapshot read back"))
            .await
            .unwrap();
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    if thin {
        // Real thin mappings: 9 MiB written, so far less than the whole 64 MiB.
        assert!(
            (9 << 20..16 << 20).contains(&covered),
            "thin extents {extents:?}"
        );
        // The reader activated the skipped snapshot (-K) and deactivated it again on drop.
        let attr = run(&[
            "lvs",
            "--noheadings",
            "-o",
            "lv_attr",
            &format!("{}/_snapshot-{}", t.vg, s1.id),
        ]);
        assert_eq!(
            attr.trim().chars().nth(4),
            Some('-'),
            "snapshot left active: {attr}"
        );
        assert_eq!(
            attr.trim().chars().nth(9),
            Some('k'),
            "activation skip lost: {attr}"
        );
    } else {
        assert_eq!(covered, VOL);
    }

    // Clone from the snapshot, larger than it.
    let c = volume(96 * MIB);
    let (prog, handle) = counter();
    d.create_volume_from_snapshot(&c, &s1, handle)
        .await
        .unwrap();
    let mut clone_img = at_s1.resized(96 * MIB);
    assert_dev(&t.vol_dev(&c), &clone_img, "clone");
    if !thin {
        let total = prog.total.load(Ordering::SeqCst);
        assert_eq!(total, 96 * MIB);
        assert_eq!(
            prog.done.load(Ordering::SeqCst),
            total,
            "progress reached the total"
        );
    }
    // The clone is writable, independent of the snapshot and activates normally.
    clone_img.write(&t.vol_dev(&c), 0, 1 << 20, 5);
    let attr = run(&[
        "lvs",
        "--noheadings",
        "-o",
        "lv_attr",
        &format!("{}/volume-{}", t.vg, c.id),
    ]);
    assert_eq!(
        attr.trim().chars().nth(9),
        Some('-'),
        "clone must not skip activation: {attr}"
    );
    assert_snapshot(
        d.open_snapshot_reader(&s1).await.unwrap(),
        &at_s1,
        "snapshot after writing the clone",
    );

    // Revert, keep the snapshot.
    d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s1, "volume after revert");
    assert!(d.snapshot_exists(&s1).await.unwrap());
    let mut img = at_s1.clone();
    img.write(&dev, 10 << 20, 2 << 20, 6);
    assert_snapshot(
        d.open_snapshot_reader(&s1).await.unwrap(),
        &at_s1,
        "snapshot after revert and a new write",
    );
    assert_dev(&dev, &img, "volume after revert and a new write");

    // Deletes are idempotent and leave nothing behind.
    // The clone does not depend on the snapshot it came from.
    d.delete_snapshot(&s1).await.unwrap();
    assert_dev(
        &t.vol_dev(&c),
        &clone_img,
        "clone after deleting its snapshot",
    );
    d.delete_volume(&c).await.unwrap();
    d.delete_snapshot(&s1).await.unwrap();
    assert!(!d.snapshot_exists(&s1).await.unwrap());
    d.delete_volume(&v).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    assert!(!d.volume_exists(&v).await.unwrap());
    let left: Vec<String> = t
        .lv_names()
        .into_iter()
        .filter(|n| n != "kiln-pool")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn thin_snapshot_read_clone_revert_keep_data() {
    integrity(true).await;
}

#[tokio::test]
async fn thick_snapshot_read_clone_revert_keep_data() {
    integrity(false).await;
}

// ---------------------------------------------------------------- revert to the oldest of three

async fn revert_oldest(thin: bool) {
    let t = TestVg::new(if thin { "rev-thin" } else { "rev-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    let mut snaps = Vec::new();
    for (i, off) in [0u64, 8, 16].into_iter().enumerate() {
        // Overlapping writes, so every snapshot differs from every other one.
        img.write(&dev, off << 20, 12 << 20, 100 + i as u64);
        let s = snapshot(&v);
        d.create_snapshot(&s, &v).await.unwrap();
        snaps.push((s, img.clone()));
    }
    img.write(&dev, 4 << 20, 40 << 20, 200);

    d.revert_to_snapshot(&v, &snaps[0].0, no_progress())
        .await
        .unwrap();
    assert_dev(&dev, &snaps[0].1, "volume reverted to the oldest");
    let mut img = snaps[0].1.clone();
    // Writes after the revert must not leak into any snapshot (thick: COW into each).
    img.write(&dev, 6 << 20, 20 << 20, 300);
    for (i, (s, want)) in snaps.iter().enumerate() {
        assert_snapshot(
            d.open_snapshot_reader(s).await.unwrap(),
            want,
            &format!("snapshot {i} after reverting to snapshot 0"),
        );
    }
    // And on to the newest, which must still hold its own point in time.
    d.revert_to_snapshot(&v, &snaps[2].0, no_progress())
        .await
        .unwrap();
    assert_dev(&dev, &snaps[2].1, "volume reverted to the newest");
    // Snapshot 2 was just read back through the volume; the other two must be untouched.
    for (i, (s, want)) in snaps.iter().enumerate().take(2) {
        assert_snapshot(
            d.open_snapshot_reader(s).await.unwrap(),
            want,
            &format!("snapshot {i} after reverting to snapshot 2"),
        );
    }
    // Re-running a finished revert is harmless.
    d.revert_to_snapshot(&v, &snaps[2].0, no_progress())
        .await
        .unwrap();
    assert_dev(&dev, &snaps[2].1, "volume after a repeated revert");
}

#[tokio::test]
async fn thin_revert_to_oldest_of_three_keeps_all() {
    revert_oldest(true).await;
}

#[tokio::test]
async fn thick_revert_to_oldest_of_three_keeps_all() {
    revert_oldest(false).await;
}

// ---------------------------------------------------------------- interrupted thin reverts

#[tokio::test]
async fn thin_revert_recovers_from_every_interrupted_state() {
    let t = TestVg::new("rev-crash", true, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 4 << 20, 11);
    let s1 = snapshot(&v);
    d.create_snapshot(&s1, &v).await.unwrap();
    let at_s1 = img.clone();
    img.write(&dev, 0, 4 << 20, 12);
    let s2 = snapshot(&v);
    d.create_snapshot(&s2, &v).await.unwrap();
    let at_s2 = img.clone();
    img.write(&dev, 0, 4 << 20, 13);

    let vol = format!("volume-{}", v.id);
    let new = format!("{vol}-revert-new");
    let old = format!("{vol}-revert-old");
    let snap1 = format!("{}/_snapshot-{}", t.vg, s1.id);
    let only_vol_and_snaps = |t: &TestVg| {
        let names = t.lv_names();
        assert!(names.contains(&vol), "{names:?}");
        assert!(
            !names.contains(&new) && !names.contains(&old),
            "temporaries left: {names:?}"
        );
    };

    // Crash after creating the new origin, before the first rename.
    run(&["lvcreate", "-q", "-s", "-kn", "-n", &new, &snap1]);
    d.revert_to_snapshot(&v, &s2, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s2, "revert after a crash before the renames");
    only_vol_and_snaps(&t);

    // Crash between the two renames (a revert to s1 was under way): the volume exists only
    // under the old name; a re-run to s1 finishes it.
    run(&["lvcreate", "-q", "-s", "-kn", "-n", &new, &snap1]);
    run(&["lvrename", "-q", &t.vg, &vol, &old]);
    assert!(
        d.volume_exists(&v).await.unwrap(),
        "volume exists mid-revert"
    );
    d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s1, "revert after a crash between the renames");
    only_vol_and_snaps(&t);

    // Crash after both renames, before removing the old origin.
    run(&["lvcreate", "-q", "-s", "-kn", "-n", &old, &snap1]);
    d.revert_to_snapshot(&v, &s2, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s2, "revert after a crash before the removal");
    only_vol_and_snaps(&t);

    // Only the old name left (new one lost): rolled back, then reverted.
    run(&["lvrename", "-q", &t.vg, &vol, &old]);
    d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s1, "revert after a rollback");
    only_vol_and_snaps(&t);
    for (s, want) in [(&s1, &at_s1), (&s2, &at_s2)] {
        assert_snapshot(
            d.open_snapshot_reader(s).await.unwrap(),
            want,
            "snapshots survive every recovery",
        );
    }
}

// ---------------------------------------------------------------- forced snapshot under writes

/// Two 4 KiB-block patterns over `REGION`; every block of the snapshot must be one of them,
/// and the switch from one to the other happens at most once (dd writes blocks in order and
/// each direct write completes before the next starts).
const REGION: u64 = 8 * MIB;
const BLOCK: usize = 4096;

fn block_pattern(gen_seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(REGION as usize);
    for i in 0..(REGION as usize / BLOCK) {
        v.extend_from_slice(&kiln_testkit::pattern(
            gen_seed * 1_000_000 + i as u64,
            BLOCK,
        ));
    }
    v
}

async fn force_under_writes(thin: bool) {
    let t = TestVg::new(if thin { "force-thin" } else { "force-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let a = block_pattern(1);
    let b = block_pattern(2);
    let fa = format!("/tmp/{}-a.bin", t.vg);
    let fb = format!("/tmp/{}-b.bin", t.vg);
    std::fs::write(&fa, &a).unwrap();
    std::fs::write(&fb, &b).unwrap();
    run(&[
        "dd",
        &format!("if={fa}"),
        &format!("of={}", dev.display()),
        "bs=1M",
        "oflag=direct",
        "status=none",
    ]);

    // Writer: alternate B and A passes with dd until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(false));
    let passes: Arc<std::sync::Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let writer = {
        let (stop, running, passes, dev) =
            (stop.clone(), running.clone(), passes.clone(), dev.clone());
        let (fa, fb) = (fa.clone(), fb.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let src = if n.is_multiple_of(2) { &fb } else { &fa };
                let started = Instant::now();
                running.store(true, Ordering::SeqCst);
                run(&[
                    "dd",
                    &format!("if={src}"),
                    &format!("of={}", dev.display()),
                    "bs=4k",
                    "oflag=direct",
                    "conv=notrunc",
                    "status=none",
                ]);
                passes.lock().unwrap().push((started, Instant::now()));
                n += 1;
            }
            n
        })
    };
    // Snapshot once the writer is well into its first pass (however loaded the machine is).
    while !running.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = snapshot(&v);
    let t0 = Instant::now();
    d.create_snapshot_force(&s, &v, &attachment())
        .await
        .unwrap();
    let t1 = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let n = writer.join().unwrap();
    let passes = passes.lock().unwrap().clone();
    let first_start = passes.first().map(|p| p.0).unwrap();
    let last_end = passes.last().map(|p| p.1).unwrap();
    assert!(
        first_start < t0 && last_end > t1,
        "the writer was not running during the whole snapshot ({n} passes)"
    );

    let mut r = d.open_snapshot_reader(&s).await.unwrap();
    assert_eq!(r.size(), VOL);
    let mut got = vec![0u8; REGION as usize];
    let mut off = 0;
    while off < got.len() {
        off += r.read_at(off as u64, &mut got[off..]).unwrap();
    }
    let mut rest = vec![0u8; MIB as usize];
    let mut pos = REGION;
    while pos < VOL {
        let n = r.read_at(pos, &mut rest).unwrap();
        assert!(
            n > 0 && rest[..n].iter().all(|x| *x == 0),
            "data beyond the written region"
        );
        pos += n as u64;
    }
    drop(r);
    let mut labels = Vec::new();
    for (i, blk) in got[..REGION as usize].chunks(BLOCK).enumerate() {
        let range = i * BLOCK..(i + 1) * BLOCK;
        labels.push(if blk == &a[range.clone()] {
            'A'
        } else if blk == &b[range] {
            'B'
        } else {
            panic!("block {i} of the snapshot is neither pass's data: torn or foreign");
        });
    }
    let switches = labels.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches <= 1,
        "not a point in time: {switches} switches between passes"
    );
    // The volume holds the last complete pass.
    let last = if n % 2 == 1 { &b } else { &a };
    assert!(
        read_range(&dev, 0, REGION as usize) == *last,
        "volume after the writer finished"
    );
    let rel = |t: Instant| t.saturating_duration_since(passes[0].0).as_millis();
    eprintln!(
        "forced snapshot ({}): lvcreate {}..{} ms, passes {:?} ms; first block {:?}, switch at {:?}",
        if thin { "thin" } else { "thick" },
        rel(t0),
        rel(t1),
        passes
            .iter()
            .map(|p| (rel(p.0), rel(p.1)))
            .collect::<Vec<_>>(),
        labels[0],
        labels.windows(2).position(|w| w[0] != w[1])
    );
    let _ = std::fs::remove_file(&fa);
    let _ = std::fs::remove_file(&fb);
}

#[tokio::test]
async fn thin_forced_snapshot_during_writes_is_point_in_time() {
    force_under_writes(true).await;
}

#[tokio::test]
async fn thick_forced_snapshot_during_writes_is_point_in_time() {
    force_under_writes(false).await;
}

// ---------------------------------------------------------------- thick overflow

#[tokio::test]
async fn thick_snapshot_overflow_is_detected_and_reported() {
    let t = TestVg::new("overflow", false, 512);
    let mut cfg = t.config();
    cfg.thick_snapshot_percent = 10;
    let d = LvmDriver::open("lvm-test", cfg).await.unwrap();
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 4 << 20, 1);
    let s = snapshot(&v);
    d.create_snapshot(&s, &v).await.unwrap();
    assert_eq!(
        d.snapshot_health(&s).await.unwrap(),
        None,
        "healthy at first"
    );
    // 10 % of 64 MiB of COW (lvm rounds to whole 4 MiB extents) cannot hold 32 MiB of changes.
    img.write(&dev, 0, 32 << 20, 2);

    assert!(
        d.snapshot_exists(&s).await.unwrap(),
        "an invalid snapshot still exists"
    );
    let reason = d
        .snapshot_health(&s)
        .await
        .unwrap()
        .expect("overflow not detected");
    assert!(
        reason.contains("overflowed") && reason.contains(&s.id.to_string()),
        "{reason}"
    );
    let stats = d.stats().await.unwrap();
    let invalid = stats.details["invalid_snapshots"].to_string();
    assert!(invalid.contains(&s.id.to_string()), "stats: {invalid}");
    let e = d
        .open_snapshot_reader(&s)
        .await
        .err()
        .expect("reading an invalid snapshot");
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    assert!(e.to_string().contains("invalid"), "{e}");
    let before = t.lv_state();
    let e = d
        .revert_to_snapshot(&v, &s, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    let c = volume(VOL);
    let e = d
        .create_volume_from_snapshot(&c, &s, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    assert_eq!(t.lv_state(), before, "failed revert/clone changed the VG");

    // The volume stays usable: its data is intact and it takes writes and new snapshots.
    assert_dev(&dev, &img, "volume after overflow");
    img.write(&dev, 50 << 20, 4 << 20, 3);
    assert_dev(&dev, &img, "volume written after overflow");
    let s2 = snapshot(&v);
    d.create_snapshot(&s2, &v).await.unwrap();
    assert_eq!(d.snapshot_health(&s2).await.unwrap(), None);
    assert_snapshot(
        d.open_snapshot_reader(&s2).await.unwrap(),
        &img,
        "new snapshot after overflow",
    );
    d.delete_snapshot(&s).await.unwrap();
    d.delete_snapshot(&s2).await.unwrap();
    d.delete_volume(&v).await.unwrap();
}

// ---------------------------------------------------------------- deletes

#[tokio::test]
async fn thick_origin_with_snapshots_is_busy_and_deleted_data_is_zeroed() {
    let t = TestVg::new("busy", false, 256);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, VOL as usize, 7);
    let (s1, s2) = (snapshot(&v), snapshot(&v));
    d.create_snapshot(&s1, &v).await.unwrap();
    d.create_snapshot(&s2, &v).await.unwrap();
    // Fill both COW stores with copies of the old data.
    img.write(&dev, 0, VOL as usize, 8);
    let before = t.lv_state();
    match d.delete_volume(&v).await.unwrap_err() {
        kiln_core::Error::Busy {
            reason,
            mut dependents,
        } => {
            dependents.sort();
            let mut want = vec![s1.id.to_string(), s2.id.to_string()];
            want.sort();
            assert_eq!(dependents, want);
            assert!(reason.contains(&s1.id.to_string()), "{reason}");
        }
        e => panic!("expected Busy, got {e}"),
    }
    assert_eq!(t.lv_state(), before, "a refused delete changed the VG");
    assert_dev(&dev, &img, "volume after a refused delete");

    d.delete_snapshot(&s1).await.unwrap();
    d.delete_snapshot(&s2).await.unwrap();
    d.delete_snapshot(&s2).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    assert!(t.lv_names().is_empty());

    // Every extent the volume and its COW stores used now belongs to one new LV: it must not
    // show any of the old tenant's data.
    let free = d.stats().await.unwrap().free_bytes.unwrap();
    let big = volume(free / MIB * MIB);
    d.create_volume(&big).await.unwrap();
    let size = assert_zero_dev(&t.vol_dev(&big), "deleted data leaked into a new volume");
    assert!(size >= VOL * 2);
    d.delete_volume(&big).await.unwrap();
}

#[tokio::test]
async fn thin_volume_delete_leaves_its_snapshots_readable() {
    let t = TestVg::new("thin-del", true, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let mut img = Image::zeros(VOL);
    img.write(&t.vol_dev(&v), 0, 2 << 20, 9);
    let s = snapshot(&v);
    d.create_snapshot(&s, &v).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    assert!(!d.volume_exists(&v).await.unwrap());
    assert_snapshot(
        d.open_snapshot_reader(&s).await.unwrap(),
        &img,
        "thin snapshot outlives its origin",
    );
    d.delete_snapshot(&s).await.unwrap();
}

// ---------------------------------------------------------------- bad input

async fn bad_input(thin: bool) {
    let t = TestVg::new(if thin { "bad-thin" } else { "bad-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let mut img = Image::zeros(VOL);
    img.write(&t.vol_dev(&v), 0, 1 << 20, 1);
    let s = snapshot(&v);
    d.create_snapshot(&s, &v).await.unwrap();
    let other = volume(VOL);
    d.create_volume(&other).await.unwrap();
    let other_snap = snapshot(&other);
    d.create_snapshot(&other_snap, &other).await.unwrap();
    let before = t.lv_state();

    let ghost_v = volume(VOL);
    let ghost_s = snapshot(&ghost_v);
    let kind = |r: kiln_core::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(d.create_snapshot(&ghost_s, &ghost_v).await.map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.create_snapshot(&snapshot(&v), &other).await.map(drop)),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(d.revert_to_snapshot(&v, &snapshot(&v), no_progress()).await),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.revert_to_snapshot(&v, &other_snap, no_progress()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            d.revert_to_snapshot(&ghost_v, &ghost_s, no_progress())
                .await
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(
            d.create_volume_from_snapshot(&volume(VOL), &ghost_s, no_progress())
                .await
                .map(drop)
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(
            d.create_volume_from_snapshot(&volume(VOL / 2), &s, no_progress())
                .await
                .map(drop)
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(d.open_snapshot_reader(&ghost_s).await.map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.bench_primitives(&ghost_v).await.map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.snapshot_health(&ghost_s).await.map(drop)),
        ErrorKind::NotFound
    );
    d.delete_snapshot(&ghost_s).await.unwrap();
    d.delete_volume(&ghost_v).await.unwrap();
    assert!(!d.volume_exists(&ghost_v).await.unwrap());
    assert!(!d.snapshot_exists(&ghost_s).await.unwrap());

    assert_eq!(t.lv_state(), before, "bad requests changed the VG");
    assert_dev(&t.vol_dev(&v), &img, "volume after bad requests");
}

#[tokio::test]
async fn thin_bad_input_leaves_state_unchanged() {
    bad_input(true).await;
}

#[tokio::test]
async fn thick_bad_input_leaves_state_unchanged() {
    bad_input(false).await;
}

#[tokio::test]
async fn open_checks_vg_pool_and_resolves_auto() {
    let t = TestVg::new("open", false, 256);
    let e = LvmDriver::open("x", LvmConfig::new("no-such-vg"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("no-such-vg"), "{e}");
    let mut thin = t.config();
    thin.lvm_type = LvmType::Thin;
    let e = LvmDriver::open("x", thin.clone()).await.unwrap_err();
    assert!(
        e.to_string().contains("thin pool") && e.to_string().contains("kiln-pool"),
        "{e}"
    );
    let mut auto = t.config();
    auto.lvm_type = LvmType::Auto;
    assert!(!LvmDriver::open("x", auto.clone()).await.unwrap().is_thin());
    let mut bad = t.config();
    bad.thick_snapshot_percent = 0;
    assert_eq!(
        LvmDriver::open("x", bad).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let mut bad = t.config();
    bad.volume_group = "--all".into();
    assert_eq!(
        LvmDriver::open("x", bad).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    run(&[
        "lvcreate",
        "-q",
        "--type",
        "thin-pool",
        "-L",
        "64m",
        "-n",
        "kiln-pool",
        &t.vg,
    ]);
    assert!(LvmDriver::open("x", auto).await.unwrap().is_thin());
    assert!(LvmDriver::open("x", thin).await.unwrap().is_thin());
}

// ---------------------------------------------------------------- stats and bench

async fn stats_and_bench(thin: bool) {
    let t = TestVg::new(if thin { "bench-thin" } else { "bench-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let st = d.stats().await.unwrap();
    let total = st.total_bytes.unwrap();
    assert!((500 * MIB..=512 * MIB).contains(&total), "{st:?}");
    assert!(st.free_bytes.unwrap() < total);
    if thin {
        assert!(st.details["pool_data_percent"].is_number(), "{st:?}");
        assert!(
            st.details["pool_metadata_percent"].as_f64().unwrap() > 0.0,
            "{st:?}"
        );
    }
    let before = t.lv_state();
    let samples = d.bench_primitives(&v).await.unwrap();
    assert_eq!(samples.len(), 1);
    assert!(
        samples[0].name.contains("lvcreate --snapshot"),
        "{samples:?}"
    );
    assert!(samples[0].create > Duration::ZERO && samples[0].delete > Duration::ZERO);
    assert_eq!(t.lv_state(), before, "bench left something behind");
    let caps = d.capabilities();
    assert_eq!(caps.thin, thin);
    assert!(caps.revert_any && caps.online_snapshot && caps.clone);
}

#[tokio::test]
async fn thin_stats_and_bench() {
    stats_and_bench(true).await;
}

#[tokio::test]
async fn thick_stats_and_bench() {
    stats_and_bench(false).await;
}
