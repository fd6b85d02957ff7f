//! The LVM driver against real LVM (thin and thick) inside the user-mode-Linux guest.
//! Run with `tests/harness/lvm-suite.sh` (one guest boot for this whole binary).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln_core::{BlockingDriver, DeleteAction, ErrorKind, VolumeDriver, no_progress};
use kiln_driver_lvm::{LvmConfig, LvmDriver, LvmType, open};
use support::*;

const VOL: u64 = 64 * MIB;

async fn driver(t: &TestVg) -> LvmDriver {
    open("lvm-test", t.config()).await.unwrap()
}

/// The location `create_*` returns and `lookup_*` must return: `vg/lv`.
fn loc(t: &TestVg, lv: &str) -> Option<kiln_core::ProviderUpdate> {
    Some(kiln_core::ProviderUpdate {
        provider_location: Some(format!("{}/{lv}", t.vg)),
    })
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

    assert_eq!(
        d.lookup_volume(&v).await.unwrap(),
        Some(pu),
        "lookup returns what create returned"
    );

    let s1 = snapshot(&v);
    let pu = d.create_snapshot(&s1, &v).await.unwrap();
    assert_eq!(
        pu.provider_location,
        Some(format!("{}/_snapshot-{}", t.vg, s1.id))
    );
    assert_eq!(
        d.lookup_snapshot(&s1).await.unwrap(),
        Some(pu),
        "lookup returns what create returned"
    );
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
    assert!(d.lookup_snapshot(&s1).await.unwrap().is_some());
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
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    assert_dev(
        &t.vol_dev(&c),
        &clone_img,
        "clone after deleting its snapshot",
    );
    assert_eq!(d.delete_volume(&c).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(
        d.delete_snapshot(&s1).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(d.lookup_snapshot(&s1).await.unwrap(), None);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(
        d.delete_volume(&v).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(d.lookup_volume(&v).await.unwrap(), None);
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
    assert_eq!(
        d.lookup_volume(&v).await.unwrap(),
        loc(&t, &vol),
        "volume exists mid-revert, at the location it will have again"
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

/// The writer rewrites `REGION` in `BLOCK`-sized direct writes, one pass per generation.
const REGION: u64 = 8 * MIB;
const BLOCK: usize = 4096;
const BLOCKS: u64 = REGION / BLOCK as u64;

/// Block `i` of generation `g`: its header names both, the rest is a pattern derived from
/// them, so any block read back tells which write it came from, or that it is torn.
fn gen_block(g: u64, i: u64) -> Vec<u8> {
    let mut b = kiln_testkit::pattern((g << 32) | i, BLOCK);
    b[..8].copy_from_slice(&g.to_le_bytes());
    b[8..16].copy_from_slice(&i.to_le_bytes());
    b
}

/// The generation of block `i` as read back; panics on a torn or foreign block.
fn generation_of(block: &[u8], i: u64, what: &str) -> u64 {
    let g = u64::from_le_bytes(block[..8].try_into().unwrap());
    let idx = u64::from_le_bytes(block[8..16].try_into().unwrap());
    assert!(
        idx == i && g > 0 && block == gen_block(g, i).as_slice(),
        "{what}: block {i} is not a whole block of any generation (torn or foreign)"
    );
    g
}

/// Writes generation after generation of `REGION` with `O_DIRECT`, block by block in order
/// (each write completes before the next starts), counting completed blocks; checks `stop`
/// only between passes, so the volume ends holding one whole generation.
struct Writer {
    stop: AtomicBool,
    blocks: AtomicU64,
}

impl Writer {
    fn run(&self, dev: &std::path::Path) -> u64 {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .unwrap();
        // O_DIRECT needs a buffer aligned to the logical block size.
        let mut raw = vec![0u8; 2 * BLOCK];
        let at = raw.as_ptr().align_offset(BLOCK);
        let buf = &mut raw[at..at + BLOCK];
        let mut g = 0;
        while !self.stop.load(Ordering::SeqCst) {
            g += 1;
            for i in 0..BLOCKS {
                buf.copy_from_slice(&gen_block(g, i));
                f.write_all_at(buf, i * BLOCK as u64).unwrap();
                self.blocks.fetch_add(1, Ordering::SeqCst);
            }
        }
        g
    }

    /// Waits (polling the counter, however slow the machine) until `n` blocks are written.
    async fn reached(&self, n: u64) {
        while self.blocks.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn force_under_writes(thin: bool) {
    let t = TestVg::new(if thin { "force-thin" } else { "force-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let w = Arc::new(Writer {
        stop: AtomicBool::new(false),
        blocks: AtomicU64::new(0),
    });
    let writer = {
        let (w, dev) = (w.clone(), dev.clone());
        std::thread::spawn(move || w.run(&dev))
    };
    // Paced by the writer: the first pass complete (every block holds generation >= 1) and
    // the second under way.
    w.reached(BLOCKS + BLOCKS / 4).await;

    // A cut exactly between two passes (about 1 in BLOCKS) holds one whole generation and
    // shows nothing about a cut inside a pass; then another snapshot is taken.
    let mut found = None;
    let mut taken = Vec::new();
    for attempt in 1..=3 {
        let s = snapshot(&v);
        taken.push(s.clone());
        let before = w.blocks.load(Ordering::SeqCst);
        d.create_snapshot_force(&s, &v, &attachment())
            .await
            .unwrap();
        let after = w.blocks.load(Ordering::SeqCst);
        let what = format!("forced snapshot {attempt}");
        let mut r = d.open_snapshot_reader(&s).await.unwrap();
        assert_eq!(r.size(), VOL, "{what}: size");
        let mut gens = Vec::with_capacity(BLOCKS as usize);
        let mut blk = vec![0u8; BLOCK];
        for i in 0..BLOCKS {
            let n = r.read_at(i * BLOCK as u64, &mut blk).unwrap();
            assert_eq!(n, BLOCK, "{what}: short read");
            gens.push(generation_of(&blk, i, &what));
        }
        let mut rest = vec![0u8; MIB as usize];
        let mut pos = REGION;
        while pos < VOL {
            let n = r.read_at(pos, &mut rest).unwrap();
            assert!(
                n > 0 && zero(&rest[..n]),
                "{what}: data beyond the written region"
            );
            pos += n as u64;
        }
        drop(r);
        // One point in time: blocks 0..k of the newer generation, the rest of the one before.
        let newer = gens[0];
        let k = gens.iter().take_while(|g| **g == newer).count() as u64;
        assert!(
            gens[k as usize..].iter().all(|g| *g + 1 == newer),
            "{what}: not one cut of a sequential writer: generations {:?}",
            gens.chunks(64).map(|c| c[0]).collect::<Vec<_>>()
        );
        // The cut lies where the writer was while lvcreate ran: it had completed `before`
        // blocks when the call started, and at most one more than `after` when it returned
        // (a completed write is counted right after it returns).
        let cut = (newer - 1) * BLOCKS + k;
        assert!(
            (before..=after + 1).contains(&cut),
            "{what}: cut after {cut} blocks, outside the call ({before}..={after})"
        );
        eprintln!(
            "{what} ({}): writer at {before}..{after} blocks during lvcreate, cut after {cut} \
             (generation {newer}, block {k} of {BLOCKS})",
            if thin { "thin" } else { "thick" }
        );
        if k < BLOCKS {
            found = Some((newer, k));
            break;
        }
        // k == BLOCKS: a whole generation; the next pass is already being written.
    }
    let (newer, k) = found.expect("three cuts all fell exactly between passes");
    assert!(
        newer >= 2 && (1..BLOCKS).contains(&k),
        "the cut must split a pass: generation {newer}, block {k}"
    );
    // The writer kept going after the snapshot: one more full pass, then stop.
    let now = w.blocks.load(Ordering::SeqCst);
    w.reached(now + BLOCKS).await;
    w.stop.store(true, Ordering::SeqCst);
    let last = writer.join().unwrap();
    assert!(last > newer, "the writer wrote on after the snapshot");
    let region = read_range(&dev, 0, REGION as usize);
    for (i, blk) in region.chunks(BLOCK).enumerate() {
        assert_eq!(
            generation_of(blk, i as u64, "volume after the writer stopped"),
            last,
            "volume block {i}"
        );
    }
    for s in &taken {
        assert_eq!(d.delete_snapshot(s).await.unwrap(), DeleteAction::Deleted);
    }
}

#[tokio::test]
async fn thin_forced_snapshot_during_writes_cuts_one_pass_at_one_point() {
    force_under_writes(true).await;
}

#[tokio::test]
async fn thick_forced_snapshot_during_writes_cuts_one_pass_at_one_point() {
    force_under_writes(false).await;
}

// ---------------------------------------------------------------- thick overflow

#[tokio::test]
async fn thick_snapshot_overflow_is_detected_and_reported() {
    let t = TestVg::new("overflow", false, 512);
    let mut cfg = t.config();
    cfg.thick_snapshot_percent = 10;
    let d = open("lvm-test", cfg).await.unwrap();
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

    assert_eq!(
        d.lookup_snapshot(&s).await.unwrap(),
        loc(&t, &format!("_snapshot-{}", s.id)),
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
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
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
    let e = d.delete_volume(&v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    let mut dependents = e.dependents().to_vec();
    dependents.sort();
    let mut want = vec![s1.id.to_string(), s2.id.to_string()];
    want.sort();
    assert_eq!(dependents, want);
    assert!(e.message().contains(&s1.id.to_string()), "{e}");
    assert_eq!(t.lv_state(), before, "a refused delete changed the VG");
    assert_dev(&dev, &img, "volume after a refused delete");

    // Zeroing first, then lvremove; a repeat finds nothing (and says so).
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(
        d.delete_snapshot(&s2).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(
        d.delete_volume(&v).await.unwrap(),
        DeleteAction::AlreadyGone
    );
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
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.lookup_volume(&v).await.unwrap(), None);
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
    let bench = d.bench().expect("lvm has a bench primitive");
    let gv = ghost_v.clone();
    assert_eq!(
        kind(
            tokio::task::spawn_blocking(move || bench.bench_primitives(&gv))
                .await
                .unwrap()
                .map(drop)
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.snapshot_health(&ghost_s).await.map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(
        d.delete_snapshot(&ghost_s).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(
        d.delete_volume(&ghost_v).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    assert_eq!(d.lookup_volume(&ghost_v).await.unwrap(), None);
    assert_eq!(d.lookup_snapshot(&ghost_s).await.unwrap(), None);

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
    let e = open("x", LvmConfig::new("no-such-vg")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("no-such-vg"), "{e}");
    let mut thin = t.config();
    thin.lvm_type = LvmType::Thin;
    let e = open("x", thin.clone()).await.unwrap_err();
    assert!(
        e.to_string().contains("thin pool") && e.to_string().contains("kiln-pool"),
        "{e}"
    );
    let mut auto = t.config();
    auto.lvm_type = LvmType::Auto;
    assert!(!open("x", auto.clone()).await.unwrap().is_thin());
    let mut bad = t.config();
    bad.thick_snapshot_percent = 0;
    assert_eq!(
        open("x", bad).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let mut bad = t.config();
    bad.volume_group = "--all".into();
    assert_eq!(
        open("x", bad).await.unwrap_err().kind(),
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
    assert!(open("x", auto).await.unwrap().is_thin());
    assert!(open("x", thin).await.unwrap().is_thin());
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
    let bench = d.bench().expect("lvm has a bench primitive");
    let bv = v.clone();
    let samples = tokio::task::spawn_blocking(move || bench.bench_primitives(&bv))
        .await
        .unwrap()
        .unwrap();
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

// ---------------------------------------------------------------- sizes that are not whole extents

/// A 10 MiB volume in a VG of 4 MiB extents: lvm makes a 12 MiB LV. Everything kiln shows
/// must still be 10 MiB: the reader's size, a clone at exactly the snapshot's size, and
/// (thick) the bytes a revert or a clone copies.
async fn odd_size(thin: bool) {
    const SIZE: u64 = 10 * MIB;
    const LV: u64 = 12 * MIB;
    let t = TestVg::new(if thin { "odd-thin" } else { "odd-thick" }, thin, 256);
    let d = driver(&t).await;
    let v = volume(SIZE);
    d.create_volume(&v).await.unwrap();
    let vlv = format!("volume-{}", v.id);
    assert_eq!(t.lv_size(&vlv), LV, "lvm rounds to whole 4 MiB extents");
    let dev = t.vol_dev(&v);
    // `full` models the whole LV, the extent slack included; its first SIZE bytes are the
    // volume.
    let mut full = Image::zeros(LV);
    full.write(&dev, 0, SIZE as usize, 1);
    full.write(&dev, SIZE, (LV - SIZE) as usize, 2);
    let full_at_s = full.clone();
    let at_s = full.resized(SIZE);
    let s = snapshot(&v);
    assert_eq!(s.size_bytes, SIZE);
    d.create_snapshot(&s, &v).await.unwrap();
    // Rewrite every byte of the LV, slack included (an attached user can write it).
    full.write(&dev, 0, LV as usize, 3);
    assert_eq!(
        d.snapshot_health(&s).await.unwrap(),
        None,
        "a 100 % COW snapshot holds the whole LV, slack included"
    );

    // The image is exactly size_bytes long (export size = size_bytes).
    assert_snapshot(
        d.open_snapshot_reader(&s).await.unwrap(),
        &at_s,
        "snapshot of a 10 MiB volume",
    );

    // A clone at exactly the snapshot's size (the default size of a clone).
    let c = volume(SIZE);
    d.create_volume_from_snapshot(&c, &s, no_progress())
        .await
        .unwrap();
    let cdev = t.vol_dev(&c);
    assert_dev_range(&cdev, &at_s, 0, SIZE, "clone at the snapshot's size");
    if !thin {
        // Only size_bytes were copied; the clone's own slack is zeroed, not the source's.
        assert_dev_range(
            &cdev,
            &Image::zeros(LV),
            SIZE,
            LV - SIZE,
            "slack of a thick clone",
        );
    }

    // Revert: the volume's size_bytes equal the snapshot again.
    d.revert_to_snapshot(&v, &s, no_progress()).await.unwrap();
    assert_dev_range(&dev, &at_s, 0, SIZE, "volume after revert");
    if thin {
        // The LV is replaced by a snapshot of the snapshot: its slack comes along.
        assert_dev_range(
            &dev,
            &full_at_s,
            SIZE,
            LV - SIZE,
            "slack after a thin revert",
        );
    } else {
        // The copy back wrote exactly size_bytes: the slack keeps what was written last.
        assert_dev_range(&dev, &full, SIZE, LV - SIZE, "slack after a thick revert");
    }
    assert_eq!(d.delete_volume(&c).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn thin_volume_size_not_a_multiple_of_the_extent_is_kept_everywhere() {
    odd_size(true).await;
}

#[tokio::test]
async fn thick_volume_size_not_a_multiple_of_the_extent_is_kept_everywhere() {
    odd_size(false).await;
}

// ---------------------------------------------------------------- thick revert overflowing another snapshot

#[tokio::test]
async fn thick_revert_that_overflows_another_snapshot_reverts_and_names_it() {
    let t = TestVg::new("rev-ovf", false, 512);
    // Two drivers on one VG: the default 100 % COW, and a small 10 % COW (as after a
    // configuration change).
    let d = driver(&t).await;
    let mut cfg = t.config();
    cfg.thick_snapshot_percent = 10;
    let small = open("lvm-test-small", cfg).await.unwrap();
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 16 << 20, 1);
    let s1 = snapshot(&v);
    d.create_snapshot(&s1, &v).await.unwrap();
    let at_s1 = img.clone();
    // 16 MiB differ from s1 now: the revert will rewrite them.
    img.write(&dev, 0, 16 << 20, 2);
    let s2 = snapshot(&v);
    small.create_snapshot(&s2, &v).await.unwrap();
    let s2lv = format!("_snapshot-{}", s2.id);
    // 10 % of 64 MiB, in whole 4 MiB extents: 8 MiB of COW, less than the 16 MiB to rewrite.
    assert_eq!(t.lv_size(&s2lv), 8 * MIB);
    assert_eq!(small.snapshot_health(&s2).await.unwrap(), None);

    let e = d
        .revert_to_snapshot(&v, &s1, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    let msg = e.message();
    assert!(
        msg.contains(&s2.id.to_string())
            && msg.contains("overflowed")
            && msg.contains(&format!("now holds the data of snapshot {}", s1.id)),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    // The data is reverted, as the message says; the chosen snapshot is intact.
    assert_dev(&dev, &at_s1, "volume after the revert");
    assert_eq!(d.snapshot_health(&s1).await.unwrap(), None);
    assert_snapshot(
        d.open_snapshot_reader(&s1).await.unwrap(),
        &at_s1,
        "chosen snapshot after the revert",
    );
    let reason = small.snapshot_health(&s2).await.unwrap();
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("overflowed")),
        "{reason:?}"
    );
    // A re-run (as crash recovery does) has nothing left to rewrite, and s2 was invalid
    // before it started: not this run's doing, so it succeeds.
    d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert_dev(&dev, &at_s1, "volume after a repeated revert");
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

// ---------------------------------------------------------------- what each call runs

/// Create and delete run their one lvm command; only when it fails does one `lvs` look
/// (a re-run finding its work done, a missing volume, a name clash).
async fn one_command(thin: bool) {
    let t = TestVg::new(if thin { "one-thin" } else { "one-thick" }, thin, 512);
    // Thick: the defaults, COW zeroing on delete included.
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let s = snapshot(&v);
    let slv = format!("_snapshot-{}", s.id);

    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s, &v));
    assert_eq!(Some(r.unwrap()), loc(&t, &slv));
    assert_eq!(commands(&ev), ["lvcreate"], "create: {ev:?}");
    // A re-run, as after a crash before the store recorded the snapshot.
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s, &v));
    assert_eq!(Some(r.unwrap()), loc(&t, &slv), "a re-run succeeds");
    assert_eq!(commands(&ev), ["lvcreate", "lvs"], "re-run: {ev:?}");

    let before = t.lv_state();
    let ghost_v = volume(VOL);
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &snapshot(&ghost_v), &ghost_v));
    assert_eq!(r.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(commands(&ev), ["lvcreate", "lvs"], "missing volume: {ev:?}");
    // The snapshot's name taken by a snapshot of another volume: refused, nothing changed.
    let other = volume(VOL);
    d.create_volume(&other).await.unwrap();
    let clash = snapshot(&v);
    let clash_lv = format!("_snapshot-{}", clash.id);
    let other_spec = format!("{}/volume-{}", t.vg, other.id);
    if thin {
        run(&["lvcreate", "-q", "-s", "-ky", "-n", &clash_lv, &other_spec]);
    } else {
        run(&[
            "lvcreate",
            "-q",
            "-s",
            "-L",
            "8m",
            "-n",
            &clash_lv,
            &other_spec,
        ]);
    }
    let before_clash = t.lv_state();
    let e = d.create_snapshot(&clash, &v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("already exists"), "{e}");
    assert_eq!(
        t.lv_state(),
        before_clash,
        "a refused create changed the VG"
    );
    run(&["lvremove", "-q", "-f", &format!("{}/{clash_lv}", t.vg)]);
    d.delete_volume(&other).await.unwrap();
    assert_eq!(t.lv_state(), before, "failed creates changed the VG");

    let (r, ev) = capture(|| BlockingDriver::delete_snapshot(b, &s));
    assert_eq!(r.unwrap(), DeleteAction::Deleted);
    assert_eq!(commands(&ev), ["lvremove"], "delete: {ev:?}");
    let (r, ev) = capture(|| BlockingDriver::delete_snapshot(b, &s));
    assert_eq!(r.unwrap(), DeleteAction::AlreadyGone);
    if thin {
        assert_eq!(
            commands(&ev),
            ["lvremove", "lvs"],
            "repeated delete: {ev:?}"
        );
    } else {
        // Zeroing comes first: its COW device is missing, one lvs says the snapshot is gone.
        assert_eq!(commands(&ev), ["lvs"], "repeated delete: {ev:?}");
    }
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn thin_snapshot_create_and_delete_run_one_lvm_command_unless_it_fails() {
    one_command(true).await;
}

#[tokio::test]
async fn thick_snapshot_create_and_delete_run_one_lvm_command_unless_it_fails() {
    one_command(false).await;
}

#[tokio::test]
async fn snapshot_health_runs_one_lvs_of_that_snapshot_and_never_activates() {
    let t = TestVg::new("health", false, 512);
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 4 << 20, 1);
    let s1 = snapshot(&v);
    d.create_snapshot(&s1, &v).await.unwrap();
    let vlv = format!("volume-{}", v.id);
    let s1lv = format!("_snapshot-{}", s1.id);

    let (r, ev) = capture(|| BlockingDriver::snapshot_health(b, &s1));
    assert_eq!(r.unwrap(), None);
    assert_eq!(commands(&ev), ["lvs"], "{ev:?}");
    let lvs = ev.iter().find(|e| e.command().is_some()).unwrap();
    assert!(
        lvs.fields
            .contains(&format!("\"-S\", \"lv_name=\\\"{s1lv}\\\"\"")),
        "selects that one LV: {lvs:?}"
    );
    assert!(
        lvs.fields
            .contains("\"lv_name,lv_attr,lv_size,origin,lv_snapshot_invalid\""),
        "only the fields it reads: {lvs:?}"
    );

    // An inactive volume (its snapshots' tables live and die with it).
    run(&["lvchange", "-q", "-an", &format!("{}/{vlv}", t.vg)]);
    let inactive = |lv: &str| t.attr(lv).chars().nth(4) == Some('-');
    assert!(inactive(&vlv) && inactive(&s1lv));
    let (r, ev) = capture(|| BlockingDriver::snapshot_health(b, &s1));
    assert_eq!(r.unwrap(), None, "an inactive snapshot cannot be judged");
    assert_eq!(commands(&ev), ["lvs"], "{ev:?}");
    assert!(
        inactive(&vlv) && inactive(&s1lv),
        "the probe activated something: {} / {}",
        t.attr(&vlv),
        t.attr(&s1lv)
    );

    // A snapshot of the inactive volume is made inactive, reads (the reader activates and
    // deactivates again) and deletes (the COW zeroing activates it).
    let s2 = snapshot(&v);
    let (r, ev) = capture(|| BlockingDriver::create_snapshot(b, &s2, &v));
    r.unwrap();
    assert_eq!(commands(&ev), ["lvcreate"], "{ev:?}");
    let s2lv = format!("_snapshot-{}", s2.id);
    assert!(inactive(&s2lv), "{}", t.attr(&s2lv));
    assert_snapshot(
        d.open_snapshot_reader(&s2).await.unwrap(),
        &img,
        "snapshot of an inactive volume",
    );
    assert!(
        inactive(&vlv) && inactive(&s2lv),
        "left active by the reader"
    );
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    let ghost = snapshot(&v);
    assert_eq!(
        d.snapshot_health(&ghost).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn successful_commands_stderr_is_logged_at_debug_never_warn() {
    let t = TestVg::new("quiet", true, 512);
    let d = driver(&t).await;
    let b: &kiln_driver_lvm::LvmBackend = &d;
    // 1 GiB in a 384 MiB pool: lvm warns about over-provisioning ("WARNING: Sum of all
    // thin volume sizes ...") on stderr of a command that succeeds.
    let v = volume(1024 * MIB);
    let (r, ev) = capture(|| BlockingDriver::create_volume(b, &v));
    r.unwrap();
    let notes: Vec<&Captured> = ev
        .iter()
        .filter(|e| e.message.starts_with("lvm: "))
        .collect();
    assert!(
        notes
            .iter()
            .any(|e| e.message.contains("WARNING: Sum of all thin volume sizes")),
        "lvcreate's stderr is logged: {ev:?}"
    );
    assert!(
        notes.iter().all(|e| e.level == tracing::Level::DEBUG),
        "{notes:?}"
    );
    let loud: Vec<&Captured> = ev
        .iter()
        .filter(|e| e.level <= tracing::Level::WARN)
        .collect();
    assert!(loud.is_empty(), "logged at warn or error: {loud:?}");
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

// ---------------------------------------------------------------- connection info

/// `connection_info` names the device a hypervisor opens: writing there is writing the
/// volume (a snapshot taken afterwards holds the data); an unknown volume is `NotFound`.
async fn connection_info_is_the_volume_device(thin: bool) {
    let t = TestVg::new(if thin { "conn-thin" } else { "conn-thick" }, thin, 256);
    let d = driver(&t).await;
    let v = volume(16 * MIB);
    d.create_volume(&v).await.unwrap();
    let c = d.connection_info(&v).await.unwrap();
    assert_eq!(c.driver_volume_type, "local");
    let path = c.data["device_path"].as_str().unwrap().to_string();
    assert_eq!(std::path::Path::new(&path), t.vol_dev(&v));
    let mut img = Image::zeros(16 * MIB);
    img.write(std::path::Path::new(&path), MIB, 64 << 10, 7);
    let s = snapshot(&v);
    d.create_snapshot(&s, &v).await.unwrap();
    let r = d.open_snapshot_reader(&s).await.unwrap();
    assert_snapshot(r, &img, "snapshot after a write through the connection");
    let e = d.connection_info(&volume(16 * MIB)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    d.delete_snapshot(&s).await.unwrap();
    d.delete_volume(&v).await.unwrap();
}

#[tokio::test]
async fn thin_connection_info_is_the_volume_device() {
    connection_info_is_the_volume_device(true).await;
}

#[tokio::test]
async fn thick_connection_info_is_the_volume_device() {
    connection_info_is_the_volume_device(false).await;
}
