//! The LVM driver against real LVM (thin and thick) inside the user-mode-Linux guest: what
//! only LVM does with data, names and configuration. What every driver must do (point-in-time
//! data, revert to any snapshot, idempotent deletes, lookups, clone independence, reader
//! extents, refused calls) is the contract suite's, in `contract.rs`; thick COW limits are in
//! `lvm_thick.rs`, forced snapshots under writes in `lvm_online.rs`, the lvm commands each call
//! runs in `lvm_commands.rs`. Run with `tests/harness/lvm-suite.sh` (one guest boot per test
//! binary).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_core::{DeleteAction, ErrorKind, SnapshotDelta, VolumeDriver, no_progress};
use kiln_driver_lvm::{LvmConfig, LvmType, open};
use support::*;

// ---------------------------------------------------------------- locations, extents, a larger clone

/// What the contract suite cannot see on LVM: locations are `vg/lv`; the reader's extents
/// come from the thin pool's mappings (thick: one extent over the whole volume); a thin
/// snapshot keeps its activation skip and is deactivated again after reading; a clone larger
/// than its snapshot holds the snapshot's data then zeros, does not skip activation, and
/// (thick) reports copy progress up to its size; after the deletes only the pool is left.
async fn locations_extents_and_a_larger_clone(thin: bool) {
    let t = TestVg::new(if thin { "int-thin" } else { "int-thick" }, thin, 512);
    let d = driver(&t).await;
    assert_eq!(d.is_thin(), thin);
    let v = volume(VOL);
    let pu = d.create_volume(&v).await.unwrap();
    assert_eq!(Some(pu), loc(&t, &format!("volume-{}", v.id)));
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 8 << 20, 1);
    img.write(&dev, 40 << 20, 1 << 20, 2);
    let at_s1 = img.clone();
    let s1 = snapshot(&v);
    let pu = d.create_snapshot(&s1, &v).await.unwrap();
    assert_eq!(Some(pu), loc(&t, &format!("_snapshot-{}", s1.id)));
    // The origin diverges: its new mappings must not show up in the snapshot's extents.
    img.write(&dev, 0, 4 << 20, 3);
    img.write(&dev, 20 << 20, 1 << 20, 4);

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
        let attr = t.attr(&format!("_snapshot-{}", s1.id));
        assert_eq!(
            attr.chars().nth(4),
            Some('-'),
            "snapshot left active: {attr}"
        );
        assert_eq!(
            attr.chars().nth(9),
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
    assert_dev(&t.vol_dev(&c), &at_s1.resized(96 * MIB), "clone");
    if !thin {
        let total = prog.total.load(Ordering::SeqCst);
        assert_eq!(total, 96 * MIB);
        assert_eq!(
            prog.done.load(Ordering::SeqCst),
            total,
            "progress reached the total"
        );
    }
    let attr = t.attr(&format!("volume-{}", c.id));
    assert_eq!(
        attr.chars().nth(9),
        Some('-'),
        "clone must not skip activation: {attr}"
    );

    d.delete_volume(&c).await.unwrap();
    d.delete_snapshot(&s1).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    let left: Vec<String> = t
        .lv_names()
        .into_iter()
        .filter(|n| n != "kiln-pool")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn thin_locations_reader_extents_and_a_larger_clone() {
    locations_extents_and_a_larger_clone(true).await;
}

#[tokio::test]
async fn thick_locations_reader_extents_and_a_larger_clone() {
    locations_extents_and_a_larger_clone(false).await;
}

// ---------------------------------------------------------------- writes after a revert

/// The contract suite reverts to each of two snapshots with no write in between; here the
/// volume is written after a revert (thin: the new origin; thick: every other snapshot
/// copies-on-write), then reverted again, which must rewrite those writes too, and a finished
/// revert is re-run, as crash recovery does.
async fn writes_after_a_revert(thin: bool) {
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
    // And on to the newest, which must still hold its own point in time; the writes made
    // after the first revert must be rewritten too (thick: they are chunks that differ).
    d.revert_to_snapshot(&v, &snaps[2].0, no_progress())
        .await
        .unwrap();
    assert_dev(
        &dev,
        &snaps[2].1,
        "volume reverted to the newest after writes",
    );
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
async fn thin_writes_after_a_revert_spare_every_snapshot_and_a_rerun_is_harmless() {
    writes_after_a_revert(true).await;
}

#[tokio::test]
async fn thick_writes_after_a_revert_spare_every_snapshot_and_a_rerun_is_harmless() {
    writes_after_a_revert(false).await;
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

// ---------------------------------------------------------------- changes between snapshots

/// `diff_snapshots` on thin snapshots lists what the pool's mappings say changed between them:
/// three rewritten 64 KiB ranges (two over data of the older snapshot, one where it had
/// none) and a discarded MiB, each widened to whole pool chunks and no more; both images read
/// the same everywhere else. Snapshots of another volume and missing ones are refused, a
/// snapshot has no changes from itself, the order of the two does not matter, nothing is
/// activated or left reserved, an inactive pool works (and is left inactive), and so does a
/// volume that is gone.
#[tokio::test]
async fn thin_diff_lists_the_rewritten_ranges_from_the_pool_mappings() {
    const K: u64 = 1 << 10;
    let t = TestVg::new("diff-thin", true, 512);
    let d = driver(&t).await;
    assert!(d.capabilities().diff, "thin backends list changes");
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 8 << 20, 1);
    img.write(&dev, 40 << 20, 2 << 20, 2);
    let a = snapshot(&v);
    d.create_snapshot(&a, &v).await.unwrap();
    // Over data A holds, where A has none, over data A holds; then a discard over data.
    let rewrites = [(1 << 20) + 192 * K, 20 << 20, (41 << 20) + 512 * K];
    for (i, off) in rewrites.into_iter().enumerate() {
        img.write(&dev, off, 64 << 10, 10 + i as u64);
    }
    let discard = (40u64 << 20, 1u64 << 20);
    run(&[
        "blkdiscard",
        "-o",
        &discard.0.to_string(),
        "-l",
        &discard.1.to_string(),
        dev.to_str().unwrap(),
    ]);
    let b = snapshot(&v);
    d.create_snapshot(&b, &v).await.unwrap();
    let before = t.lv_state();

    let changed = match d.diff_snapshots(&a, &b).await.unwrap() {
        SnapshotDelta::Changed(e) => e,
        other => panic!("thin snapshots answered {other:?}"),
    };
    step(&format!("changed: {changed:?}"));
    let chunk: u64 = run(&[
        "lvs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "chunk_size",
        &format!("{}/kiln-pool", t.vg),
    ])
    .trim()
    .parse()
    .unwrap();
    let mut pos = 0;
    for e in &changed {
        assert!(
            e.offset >= pos && e.length > 0,
            "not sorted and disjoint: {changed:?}"
        );
        pos = e.offset + e.length;
    }
    assert!(pos <= VOL, "past the end: {changed:?}");
    let touched: Vec<(u64, u64)> = rewrites
        .iter()
        .map(|&o| (o, o + (64 << 10)))
        .chain([(discard.0, discard.0 + discard.1)])
        .collect();
    // (1) Every rewritten and discarded byte is listed.
    for &(start, end) in &touched {
        assert!(
            changed
                .iter()
                .any(|e| e.offset <= start && end <= e.offset + e.length),
            "{start}..{end} missing from {changed:?}"
        );
    }
    // (2) Nothing else is, but for the pool chunks around them.
    let widened: Vec<(u64, u64)> = touched
        .iter()
        .map(|&(s, e)| (s / chunk * chunk, e.div_ceil(chunk) * chunk))
        .collect();
    for e in &changed {
        assert!(
            widened
                .iter()
                .any(|&(s, end)| s <= e.offset && e.offset + e.length <= end),
            "{e:?} is far from every change (chunk {chunk}): {changed:?}"
        );
    }
    let total: u64 = changed.iter().map(|e| e.length).sum();
    let most: u64 = widened.iter().map(|(s, e)| e - s).sum();
    assert!(
        total <= most,
        "{total} bytes listed, at most {most} changed: {changed:?}"
    );

    // (3) Outside the listed ranges both images read the same.
    let (ra, rb) = (
        d.open_snapshot_reader(&a).await.unwrap(),
        d.open_snapshot_reader(&b).await.unwrap(),
    );
    let outside = changed.clone();
    let same = tokio::task::spawn_blocking(move || {
        let (mut ra, mut rb) = (ra, rb);
        assert_eq!((ra.size(), rb.size()), (VOL, VOL));
        let mut x = vec![0u8; MIB as usize];
        let mut y = vec![0u8; MIB as usize];
        let mut same = 0u64;
        for off in (0..VOL).step_by(MIB as usize) {
            for (r, buf) in [(&mut ra, &mut x), (&mut rb, &mut y)] {
                let mut k = 0;
                while k < buf.len() {
                    let n = r.read_at(off + k as u64, &mut buf[k..]).unwrap();
                    assert!(n > 0, "short read at {}", off + k as u64);
                    k += n;
                }
            }
            let mut p = off;
            while p < off + MIB {
                let inside = outside
                    .iter()
                    .find(|e| e.offset <= p && p < e.offset + e.length);
                let next = match inside {
                    Some(e) => (e.offset + e.length).min(off + MIB),
                    None => outside
                        .iter()
                        .map(|e| e.offset)
                        .find(|&o| o > p)
                        .unwrap_or(u64::MAX)
                        .min(off + MIB),
                };
                if inside.is_none() {
                    let (i, j) = ((p - off) as usize, (next - off) as usize);
                    assert!(
                        x[i..j] == y[i..j],
                        "A and B differ in {p}..{next}, outside {outside:?}"
                    );
                    same += (j - i) as u64;
                }
                p = next;
            }
        }
        same
    })
    .await
    .unwrap();
    assert_eq!(same, VOL - total);

    assert_eq!(
        d.diff_snapshots(&b, &a).await.unwrap(),
        SnapshotDelta::Changed(changed.clone()),
        "the order does not matter"
    );
    assert_eq!(
        d.diff_snapshots(&a, &a).await.unwrap(),
        SnapshotDelta::Changed(vec![])
    );
    let other = volume(VOL);
    d.create_volume(&other).await.unwrap();
    let other_snap = snapshot(&other);
    d.create_snapshot(&other_snap, &other).await.unwrap();
    let ghost = snapshot(&v);
    let kind = |r: kiln_core::Result<SnapshotDelta>| r.unwrap_err().kind();
    assert_eq!(
        kind(d.diff_snapshots(&a, &other_snap).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(d.diff_snapshots(&a, &ghost).await),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(d.diff_snapshots(&ghost, &b).await),
        ErrorKind::NotFound
    );
    d.delete_snapshot(&other_snap).await.unwrap();
    d.delete_volume(&other).await.unwrap();
    assert_eq!(t.lv_state(), before, "diff changed the VG");
    // No metadata snapshot is left reserved: another one can be taken.
    let tpool = format!("{}-kiln--pool-tpool", t.vg.replace('-', "--"));
    run(&["dmsetup", "message", &tpool, "0", "reserve_metadata_snap"]);
    run(&["dmsetup", "message", &tpool, "0", "release_metadata_snap"]);

    // An inactive pool is activated for the diff, and deactivated again.
    run(&["vgchange", "-q", "-an", &t.vg]);
    let inactive = t.lv_state();
    assert_eq!(
        d.diff_snapshots(&a, &b).await.unwrap(),
        SnapshotDelta::Changed(changed.clone()),
        "inactive pool"
    );
    assert_eq!(t.lv_state(), inactive, "the pool was left active");
    // The snapshots do not need their volume.
    d.delete_volume(&v).await.unwrap();
    assert_eq!(
        d.diff_snapshots(&a, &b).await.unwrap(),
        SnapshotDelta::Changed(changed),
        "volume deleted"
    );
}

// ---------------------------------------------------------------- bad input

/// The contract suite checks that calls on missing objects fail and change no LV name; here
/// every refusal has its error kind, the refusals include records that do not match (a
/// snapshot of another volume, a clone smaller than its snapshot) and the LVM-only calls,
/// and the whole VG (names, attributes, sizes, origins) and the data stay as they were.
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
        kind(
            d.revert_to_snapshot(&v, &snapshot(&v), no_progress())
                .await
                .map(drop)
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(
            d.revert_to_snapshot(&v, &other_snap, no_progress())
                .await
                .map(drop)
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            d.revert_to_snapshot(&ghost_v, &ghost_s, no_progress())
                .await
                .map(drop)
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
    // A retried create (lvcreate fails, the LV is found) reports the same location; the
    // same id asking for more than its LV holds is refused, naming the sizes.
    let again = d.create_volume(&v).await.unwrap();
    assert_eq!(again, loc(&t, &format!("volume-{}", v.id)).unwrap());
    let mut bigger = v.clone();
    bigger.size_bytes = VOL * 2;
    let e = d.create_volume(&bigger).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("smaller than the requested"), "{e}");

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
    // revert_any and clone are the contract suite's; it accepts a driver that refuses forced
    // snapshots and says so, but LVM takes them (lvm_online.rs) and must say so.
    let caps = d.capabilities();
    assert_eq!(caps.thin, thin);
    assert!(caps.online_snapshot);
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
