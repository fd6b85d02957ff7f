//! What only RBD does with data, against the real cluster: writes across 4 MiB object
//! boundaries read back in whole-object extents, reverts report progress and can be re-run,
//! clones are CoW children (larger ones zero-filled, their snapshots read through the
//! parent), plus refusals, stats, bench and capabilities. Point-in-time data, revert to any
//! snapshot, clone independence and reader extents in general are the contract suite's
//! (rbd_contract.rs).

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

/// Generation 1 of the tests' volumes: object 0, and a write straddling objects 9 and 10
/// (4 MiB objects); 12 MiB of objects hold data.
async fn first_generation(d: &kiln_driver_rbd::RbdDriver, v: &kiln_core::Volume, m: &mut Model) {
    m.write(d, v, 0, 1, 1 << 20).await;
    m.write(d, v, (40 << 20) - (512 << 10), 2, 1 << 20).await;
}

#[tokio::test]
async fn data_across_an_object_boundary_reads_back_in_whole_object_extents() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let mut m = Model::new(SIZE);
    first_generation(&d, &v, &mut m).await;
    let s = take_snapshot(&d, &v).await;
    // Read in odd-sized chunks (3 MiB + 4 KiB) that cross object boundaries, then past
    // the end (must read 0 bytes).
    let (data, extents) = read_snapshot(&d, &s).await;
    assert!(
        data == m.0,
        "the write across objects 9/10 did not read back"
    );
    assert_extents_cover_data(&data, &extents, "snapshot");
    // Holes are skipped: data in objects 0, 9 and 10 only, reported as whole objects.
    assert_eq!(extent_bytes(&extents), 12 << 20, "extents {extents:?}");
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn revert_reports_progress_to_the_end_and_a_rerun_completes_it_again() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let mut m = Model::new(SIZE);
    first_generation(&d, &v, &mut m).await;
    let s = take_snapshot(&d, &v).await;
    let gen1 = m.0.clone();
    m.write(&d, &v, 512 << 10, 3, 1 << 20).await;
    m.write(&d, &v, 39 << 20, 4, 2 << 20).await;
    assert!(read_head(&d, &v, 0, SIZE as usize).await == m.0);

    let p = Arc::new(RecordingProgress::default());
    d.revert_to_snapshot(&v, &s, p.clone()).await.unwrap();
    p.assert_complete();
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == gen1,
        "head after the revert"
    );
    // Crash recovery re-runs an interrupted revert: running it again is safe and complete.
    let p = Arc::new(RecordingProgress::default());
    d.revert_to_snapshot(&v, &s, p.clone()).await.unwrap();
    p.assert_complete();
    assert!(
        read_head(&d, &v, 0, SIZE as usize).await == gen1,
        "head after re-running the revert"
    );
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn a_larger_clone_is_a_cow_child_with_zeros_beyond_and_its_snapshot_reads_through_the_parent()
{
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let mut m = Model::new(SIZE);
    first_generation(&d, &v, &mut m).await;
    let s = take_snapshot(&d, &v).await;
    let gen1 = m.0.clone();

    // Clone s into a larger volume: a CoW child of v@s with s's data, zeros beyond.
    let c = volume(96 << 20);
    let up = d
        .create_volume_from_snapshot(&c, &s, no_progress())
        .await
        .unwrap();
    assert_eq!(up.provider_location, Some(format!("rbd/volume-{}", c.id)));
    assert_eq!(head_size(&d, &c).await, 96 << 20);
    let parent = parent_of(&d, &c).await.expect("a CoW clone has a parent");
    assert_eq!(parent.image_name, volume_image(&v.id));
    assert_eq!(parent.snap_name, format!("snapshot-{}", s.id));
    let head = read_head(&d, &c, 0, 96 << 20).await;
    assert_prefix_then_zeros(&head, &gen1, "clone of s");

    // A snapshot of the clone, after a write to it, reads back through the parent too:
    // its extents include the parent's data (include_parent), its bytes are the write
    // over the parent's data.
    write(&d, &c, 0, pattern(7, 4 << 20)).await;
    let cs = take_snapshot(&d, &c).await;
    let (cdata, cext) = read_snapshot(&d, &cs).await;
    let mut want_c = gen1.clone();
    want_c.resize(96 << 20, 0);
    want_c[..4 << 20].copy_from_slice(&pattern(7, 4 << 20));
    assert!(cdata == want_c, "snapshot of the clone");
    assert_extents_cover_data(&cdata, &cext, "clone snapshot");

    // Clean up in dependency order.
    assert_eq!(d.delete_snapshot(&cs).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&c).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
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
    // online_snapshot, revert_any, clone and !diff are the contract suite's
    // (capabilities_match_behaviour, revert_to_any_snapshot_keeps_the_others,
    // clones_are_independent); these it does not check.
    assert!(caps.thin && caps.clone_cow);
    // RBD group snapshots are not used: a group snapshot is taken one by one.
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

/// The writer keeps several `rbd_aio_write`s in flight: a zeroing over bytes still being
/// written, and a write over bytes still being zeroed, must land after them (stream order),
/// and every request must be complete when `finish` returns.
#[tokio::test]
async fn the_writer_applies_overlapping_requests_in_order_with_many_in_flight() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let mut w = d.open_volume_writer(&v).await.unwrap();
    let expected = tokio::task::spawn_blocking(move || {
        let mut m = vec![0u8; SIZE as usize];
        // Twelve 4 MiB writes: more than the queue's depth, so it fills and drains.
        for i in 0..12u64 {
            let data = pattern(100 + i, 4 << 20);
            m[(i << 22) as usize..((i + 1) << 22) as usize].copy_from_slice(&data);
            w.write_at(i << 22, &data).unwrap();
        }
        // Over the last writes, which are still in flight.
        w.zero((40 << 20) + 4096, 6 << 20).unwrap();
        m[(40 << 20) + 4096..(46 << 20) + 4096].fill(0);
        // Over that zeroing, also in flight.
        let data = pattern(200, 64 << 10);
        w.write_at(42 << 20, &data).unwrap();
        m[42 << 20..(42 << 20) + (64 << 10)].copy_from_slice(&data);
        w.finish().unwrap();
        m
    })
    .await
    .unwrap();
    let got = read_head(&d, &v, 0, SIZE as usize).await;
    assert!(
        got == expected,
        "the image differs from the writes applied in order"
    );
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

/// A reader told which ranges come next reads them ahead; reads that skip planned pieces,
/// go back before them, or fall outside the plan still return the snapshot's bytes.
#[tokio::test]
async fn a_reader_with_read_ahead_returns_the_same_bytes_in_any_order() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let data = pattern(7, SIZE as usize);
    write(&d, &v, 0, data.clone()).await;
    let s = take_snapshot(&d, &v).await;
    let mut r = d.open_snapshot_reader(&s).await.unwrap();
    tokio::task::spawn_blocking(move || {
        // Planned: 2 MiB at an odd offset across an object boundary, then 48 MiB.
        r.will_read(&[((3 << 20) + 512, (5 << 20) + 512), (8 << 20, 56 << 20)]);
        let mut read = |off: u64, len: usize| {
            let mut buf = vec![0u8; len];
            kiln_core::delta::read_full(&mut *r, off, &mut buf).unwrap();
            assert!(
                buf[..] == data[off as usize..off as usize + len],
                "{len} bytes at {off} differ from the snapshot"
            );
        };
        // In plan order, straddling a 4 MiB object boundary.
        read((3 << 20) + 512, 2 << 20);
        // Skips ahead past queued pieces.
        read(30 << 20, (3 << 20) + 4096);
        // Goes back before the queue's front (a plain read).
        read(9 << 20, 1 << 20);
        // Outside every planned range.
        read(60 << 20, 4 << 20);
        // On from where the plan left off, to its end.
        read((33 << 20) + 4096, (23 << 20) - 4096);
    })
    .await
    .unwrap();
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}
