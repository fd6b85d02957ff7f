//! Data integrity of every RBD operation against the real cluster: snapshot, read back,
//! revert to any snapshot, clone (with resize), plus stats, bench and capabilities.

mod common;

use std::sync::Arc;

use common::*;
use kiln_core::{DeleteAction, ErrorKind, Extent, VolumeDriver, no_progress};
use kiln_driver_rbd::volume_image;
use kiln_testkit::pattern;

/// The expected content of an image, updated alongside every write.
struct Model(Vec<u8>);

impl Model {
    fn new(size: u64) -> Self {
        Model(vec![0; size as usize])
    }
    async fn write(
        &mut self,
        d: &kiln_driver_rbd::RbdDriver,
        v: &kiln_core::Volume,
        off: u64,
        seed: u64,
        len: usize,
    ) {
        let data = pattern(seed, len);
        self.0[off as usize..off as usize + len].copy_from_slice(&data);
        write(d, v, off, data).await;
    }
}

fn assert_extents_cover_data(data: &[u8], extents: &[Extent], what: &str) {
    for w in extents.windows(2) {
        assert!(
            w[0].offset + w[0].length <= w[1].offset,
            "{what}: extents overlap or unsorted: {extents:?}"
        );
    }
    let covered = |pos: u64| {
        extents
            .iter()
            .any(|e| pos >= e.offset && pos < e.offset + e.length)
    };
    // Every non-zero 4 KiB block must lie inside an extent.
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|b| *b != 0) {
            assert!(
                covered(i as u64 * 4096),
                "{what}: data at {} outside every extent {extents:?}",
                i * 4096
            );
        }
    }
}

fn extent_bytes(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

#[tokio::test]
async fn snapshots_read_back_revert_to_oldest_and_clone_keep_data_intact() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    assert!(volume_exists(&d, &v).await);
    let mut m = Model::new(SIZE);

    // Generation 1: object 0 and a write straddling objects 9/10 (4 MiB objects).
    m.write(&d, &v, 0, 1, 1 << 20).await;
    m.write(&d, &v, (40 << 20) - (512 << 10), 2, 1 << 20).await;
    let s1 = take_snapshot(&d, &v).await;
    let gen1 = m.0.clone();
    assert!(snapshot_exists(&d, &s1).await);

    // Generation 2: overwrite part of the first write, add object 5.
    m.write(&d, &v, 512 << 10, 3, 1 << 20).await;
    m.write(&d, &v, 20 << 20, 4, 64 << 10).await;
    let s2 = take_snapshot(&d, &v).await;
    let gen2 = m.0.clone();

    // Generation 3, then more writes on the head after the last snapshot.
    m.write(&d, &v, 0, 5, 2 << 20).await;
    let s3 = take_snapshot(&d, &v).await;
    let gen3 = m.0.clone();
    m.write(&d, &v, 60 << 20, 6, 1 << 20).await;
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == m.0,
        "head differs from the model"
    );

    for (s, expected, what) in [(&s1, &gen1, "s1"), (&s2, &gen2, "s2"), (&s3, &gen3, "s3")] {
        let (data, extents) = read_snapshot(&d, s).await;
        assert_eq!(data.len() as u64, SIZE, "{what} size");
        assert!(
            data == *expected,
            "{what}: snapshot content differs from the point in time"
        );
        assert_extents_cover_data(&data, &extents, what);
    }
    // Holes are skipped: s1 has data in objects 0, 9 and 10 only (whole-object extents).
    let (_, e1) = read_snapshot(&d, &s1).await;
    assert_eq!(extent_bytes(&e1), 12 << 20, "s1 extents {e1:?}");

    // Revert to the OLDEST of three snapshots, with progress; the others stay intact.
    let p = Arc::new(RecordingProgress::default());
    d.revert_to_snapshot(&v, &s1, p.clone()).await.unwrap();
    p.assert_complete();
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == gen1,
        "head after revert to s1"
    );
    let name = volume_image(&v.id);
    let mut snaps = cli_snapshots(&name);
    snaps.sort();
    let mut want = vec![
        format!("snapshot-{}", s1.id),
        format!("snapshot-{}", s2.id),
        format!("snapshot-{}", s3.id),
    ];
    want.sort();
    assert_eq!(snaps, want, "every snapshot survives the revert");
    for (s, expected, what) in [(&s1, &gen1, "s1"), (&s2, &gen2, "s2"), (&s3, &gen3, "s3")] {
        assert!(
            read_snapshot(&d, s).await.0 == *expected,
            "{what} changed by the revert"
        );
    }
    // Safe to re-run (crash recovery re-runs reverts); also revert forward to s3.
    d.revert_to_snapshot(&v, &s1, no_progress()).await.unwrap();
    assert!(read_head(&d, &v, 0, SIZE as usize).await == gen1);
    d.revert_to_snapshot(&v, &s3, no_progress()).await.unwrap();
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == gen3,
        "head after revert to s3"
    );

    // Clone s2 into a larger volume: a CoW child of v@s2 with s2's data, zeros beyond.
    let c = volume(96 << 20);
    let p = Arc::new(RecordingProgress::default());
    let up = d
        .create_volume_from_snapshot(&c, &s2, p.clone())
        .await
        .unwrap();
    assert_eq!(up.provider_location, Some(format!("rbd/volume-{}", c.id)));
    assert_eq!(head_size(&d, &c).await, 96 << 20);
    let parent = parent_of(&d, &c).await.expect("a CoW clone has a parent");
    assert_eq!(parent.image_name, name);
    assert_eq!(parent.snap_name, format!("snapshot-{}", s2.id));
    let head = read_head(&d, &c, 0, 96 << 20).await;
    assert_prefix_then_zeros(&head, &gen2, "clone of s2");
    // Writing the clone changes neither the snapshot nor the origin.
    write(&d, &c, 0, pattern(7, 4 << 20)).await;
    assert!(
        read_snapshot(&d, &s2).await.0 == gen2,
        "s2 changed by a write to its clone"
    );
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == gen3,
        "origin changed by a write to a clone"
    );
    // A snapshot of the clone reads back through the parent too (include_parent extents).
    let cs = take_snapshot(&d, &c).await;
    let (cdata, cext) = read_snapshot(&d, &cs).await;
    let mut want_c = gen2.clone();
    want_c.resize(96 << 20, 0);
    want_c[..4 << 20].copy_from_slice(&pattern(7, 4 << 20));
    assert!(cdata == want_c, "snapshot of the clone");
    assert_extents_cover_data(&cdata, &cext, "clone snapshot");

    // Clean up in dependency order.
    assert_eq!(d.delete_snapshot(&cs).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&c).await.unwrap(), DeleteAction::Deleted);
    for s in [&s1, &s2, &s3] {
        assert_eq!(d.delete_snapshot(s).await.unwrap(), DeleteAction::Deleted);
        assert!(!snapshot_exists(&d, s).await);
    }
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
    assert!(!volume_exists(&d, &v).await);
}

#[tokio::test]
async fn clone_refuses_a_smaller_size_and_create_refuses_an_existing_image() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let s = take_snapshot(&d, &v).await;
    let small = volume(SIZE / 2);
    let e = d
        .create_volume_from_snapshot(&small, &s, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!volume_exists(&d, &small).await);
    let e = d.create_volume(&v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    // Creating the same snapshot again (a retried request) is not an error.
    d.create_snapshot(&s, &v).await.unwrap();
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn stats_bench_and_capabilities() {
    let d = driver().await;
    let caps = d.capabilities();
    assert!(caps.thin && caps.online_snapshot && caps.revert_any && caps.clone && caps.clone_cow);
    // Nothing implements a changed-extent listing or a native group snapshot yet.
    assert!(!caps.diff, "diff is claimed but not implemented");
    assert!(!caps.group_snapshot);
    let flat = driver_with(|c| c.flatten_clones = true).await;
    assert!(
        !flat.capabilities().clone_cow,
        "flatten_clones makes clones full copies"
    );

    let st = d.stats().await.unwrap();
    let total = st.total_bytes.expect("total");
    let free = st.free_bytes.expect("free");
    assert!(total > 0 && free > 0 && free <= total, "{st:?}");
    assert_eq!(st.details["pool"], serde_json::json!("rbd"));

    let v = create_volume(&d, SIZE).await;
    write(&d, &v, 0, pattern(9, 1 << 20)).await;
    let samples = bench(&d, &v).await.unwrap();
    assert_eq!(samples.len(), 2, "{samples:?}");
    assert!(samples[0].name.contains("rbd_snap_create"));
    assert!(samples[1].name.contains("CLI"));
    for s in &samples {
        assert!(!s.create.is_zero() && !s.delete.is_zero(), "{s:?}");
    }
    eprintln!("bench: {samples:?}");
    assert!(
        cli_snapshots(&volume_image(&v.id)).is_empty(),
        "bench left snapshots behind"
    );
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}
