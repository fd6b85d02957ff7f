//! Thick (COW) LVM only, inside the user-mode-Linux guest: snapshots whose COW store
//! overflows, an origin that has snapshots, the zeroing of deleted data, and changes between
//! snapshots that are not tracked. Run with `tests/harness/lvm-suite.sh`.

mod support;

use kiln_core::{DeleteAction, ErrorKind, SnapshotDelta, VolumeDriver, no_progress};
use kiln_driver_lvm::open;
use support::*;

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

// ---------------------------------------------------------------- an origin with snapshots

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

    // Zeroing first, then lvremove (repeats are the contract suite's); nothing is left.
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
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

// ---------------------------------------------------------------- thick revert overflowing another snapshot

#[tokio::test]
async fn thick_revert_that_overflows_another_snapshot_reverts_and_names_it_in_its_outcome() {
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

    // The revert completes and names the snapshot it invalidated (the service marks it
    // `error` with this reason and keeps the volume `available`).
    let outcome = d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert_eq!(outcome.invalidated.len(), 1, "{outcome:?}");
    assert_eq!(outcome.invalidated[0].snapshot, s2.id);
    let msg = &outcome.invalidated[0].reason;
    assert!(
        msg.contains("overflowed")
            && msg.contains(&s1.id.to_string())
            && msg.contains(&v.id.to_string()),
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
    // before it started: not this run's doing, so it names nothing.
    let again = d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert!(again.invalidated.is_empty(), "{again:?}");
    assert_dev(&dev, &at_s1, "volume after a repeated revert");
    assert_eq!(d.delete_snapshot(&s2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

// ---------------------------------------------------------------- half-made snapshot

/// A thick `lvcreate --snapshot` that fails after allocating its COW LV leaves a plain,
/// origin-less LV under the snapshot's name. The next create of that snapshot must clean it
/// up and make the snapshot, not report "already exists" for ever.
#[tokio::test]
async fn thick_create_over_a_half_made_snapshot_lv_replaces_it_with_the_snapshot() {
    let t = TestVg::new("halfmade", false, 256);
    let d = open("lvm-test", t.config()).await.unwrap();
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 1 << 20, 7);
    let s = snapshot(&v);
    let lv = format!("_snapshot-{}", s.id);
    run(&["lvcreate", "-q", "-L", "4m", "-n", &lv, &t.vg]);
    let half = t
        .lv_state()
        .into_iter()
        .find(|l| l.starts_with(&lv))
        .unwrap();
    assert_eq!(half.split(' ').count(), 3, "a plain LV, no origin: {half}");

    d.create_snapshot(&s, &v).await.unwrap();

    let made = t
        .lv_state()
        .into_iter()
        .find(|l| l.starts_with(&lv))
        .unwrap();
    assert!(
        made.ends_with(&format!(" volume-{}", v.id)),
        "a snapshot of the volume now: {made}"
    );
    assert!(t.attr(&lv).starts_with('s'), "attr {}", t.attr(&lv));
    let want = img.clone();
    img.write(&dev, 0, 1 << 20, 8);
    let r = d.open_snapshot_reader(&s).await.unwrap();
    assert_snapshot(r, &want, "the snapshot made over the half-made LV");
}

// ---------------------------------------------------------------- changes between snapshots

/// Thick (COW) snapshots keep no record of what changed between them: `diff_snapshots`
/// answers untracked (callers compare the data) and the backend does not claim the
/// capability; snapshots of another volume and missing ones are still refused.
#[tokio::test]
async fn thick_diff_is_untracked() {
    let t = TestVg::new("diff-thick", false, 512);
    let d = driver(&t).await;
    assert!(!d.capabilities().diff, "thick backends do not list changes");
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 1 << 20, 1);
    let a = snapshot(&v);
    d.create_snapshot(&a, &v).await.unwrap();
    img.write(&dev, 4 << 20, 64 << 10, 2);
    let b = snapshot(&v);
    d.create_snapshot(&b, &v).await.unwrap();
    let before = t.lv_state();
    assert_eq!(
        d.diff_snapshots(&a, &b).await.unwrap(),
        SnapshotDelta::Untracked
    );
    let other = volume(VOL);
    let ghost = snapshot(&v);
    let kind = |r: kiln_core::Result<SnapshotDelta>| r.unwrap_err().kind();
    assert_eq!(
        kind(d.diff_snapshots(&a, &snapshot(&other)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(d.diff_snapshots(&a, &ghost).await),
        ErrorKind::NotFound
    );
    assert_eq!(t.lv_state(), before, "diff changed the VG");
}
