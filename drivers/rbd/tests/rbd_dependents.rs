//! Snapshots with dependent clones (Busy, explicit flatten, protect/unprotect) and the
//! clone-depth / flatten_clones policy, against the real cluster.

mod common;

use std::sync::Arc;

use common::*;
use kiln_core::{DeleteAction, Error, ErrorKind, VolumeDriver, no_progress};
use kiln_driver_rbd::volume_image;
use kiln_testkit::pattern;

/// The error of a delete that must have been refused as `Busy`.
fn busy(r: kiln_core::Result<DeleteAction>) -> Error {
    match r {
        Err(e) if e.kind() == ErrorKind::Busy => e,
        Err(e) => panic!("expected Busy, got {e}"),
        Ok(a) => panic!("expected Busy, the delete returned {a}"),
    }
}

#[tokio::test]
async fn deleting_a_snapshot_with_clones_is_busy_until_they_are_flattened() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    // Data for the flatten to copy (that the clones keep it is the contract suite's:
    // a_snapshot_with_a_clone_is_busy_or_independent).
    write(&d, &v, 0, pattern(11, 8 << 20)).await;
    let s = take_snapshot(&d, &v).await;
    let c1 = volume(SIZE);
    let c2 = volume(SIZE);
    d.create_volume_from_snapshot(&c1, &s, no_progress())
        .await
        .unwrap();
    d.create_volume_from_snapshot(&c2, &s, no_progress())
        .await
        .unwrap();
    let image = volume_image(&v.id);
    let snap = format!("snapshot-{}", s.id);
    // Clone format 1 on this cluster: the driver protected the snapshot before cloning.
    let info = rbd_cli(&["info", "--format", "json", &format!("rbd/{image}@{snap}")]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["protected"], serde_json::json!("true"), "{info}");

    // The volume itself cannot go while it has snapshots.
    let e = busy(d.delete_volume(&v).await);
    assert_eq!(e.dependents(), [s.id.to_string()], "{e}");

    let e = busy(d.delete_snapshot(&s).await);
    let mut dependents = e.dependents().to_vec();
    dependents.sort();
    let mut want = vec![c1.id.to_string(), c2.id.to_string()];
    want.sort();
    assert_eq!(dependents, want, "Busy names the dependent volumes");
    let reason = e.message();
    assert!(reason.contains(&format!("volume-{}", c1.id)), "{reason}");
    assert!(reason.contains(&format!("volume-{}", c2.id)), "{reason}");

    // Flatten one clone (with progress): still busy, naming only the other one.
    let p = Arc::new(RecordingProgress::default());
    d.flatten_volume(&c1, p.clone()).await.unwrap();
    p.assert_complete();
    assert!(
        parent_of(&d, &c1).await.is_none(),
        "flattened clone has no parent"
    );
    let e = busy(d.delete_snapshot(&s).await);
    assert_eq!(e.dependents(), [c2.id.to_string()], "{e}");
    // Flattening a volume that is no clone is a no-op.
    d.flatten_volume(&c1, no_progress()).await.unwrap();

    // Deleting the other clone also frees the snapshot: unprotect + remove succeed.
    assert_eq!(d.delete_volume(&c2).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert!(cli_snapshots(&image).is_empty());
    assert_eq!(d.delete_volume(&c1).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn clones_deeper_than_max_clone_depth_are_flattened() {
    let d = driver_with(|c| c.max_clone_depth = 1).await;
    let base = create_volume(&d, SIZE).await;
    let data = pattern(21, 4 << 20);
    write(&d, &base, 4 << 20, data.clone()).await;
    let s0 = take_snapshot(&d, &base).await;
    // Depth 1: allowed, stays a CoW clone.
    let c1 = volume(SIZE);
    d.create_volume_from_snapshot(&c1, &s0, no_progress())
        .await
        .unwrap();
    assert!(
        parent_of(&d, &c1).await.is_some(),
        "depth-1 clone stays CoW"
    );
    let s1 = take_snapshot(&d, &c1).await;
    // Depth 2 > 1: flattened at once, with progress.
    let c2 = volume(SIZE);
    let p = Arc::new(RecordingProgress::default());
    d.create_volume_from_snapshot(&c2, &s1, p.clone())
        .await
        .unwrap();
    p.assert_complete();
    assert!(
        parent_of(&d, &c2).await.is_none(),
        "the deep clone must have no parent"
    );
    assert!(
        read_head(&d, &c2, 4 << 20, 4 << 20).await == data,
        "deep clone data"
    );
    assert!(read_head(&d, &c2, 0, 4 << 20).await.iter().all(|b| *b == 0));
    // Its source snapshot has no dependents now, so it can be deleted right away.
    assert_eq!(d.delete_snapshot(&s1).await.unwrap(), DeleteAction::Deleted);

    // flatten_clones: every clone is a full copy, whatever the depth.
    let f = driver_with(|c| c.flatten_clones = true).await;
    let c3 = volume(SIZE);
    f.create_volume_from_snapshot(&c3, &s0, no_progress())
        .await
        .unwrap();
    assert!(
        parent_of(&f, &c3).await.is_none(),
        "flatten_clones leaves no parent"
    );
    assert!(read_head(&f, &c3, 4 << 20, 4 << 20).await == data);

    for v in [&c3, &c2, &c1] {
        assert_eq!(d.delete_volume(v).await.unwrap(), DeleteAction::Deleted);
    }
    assert_eq!(d.delete_snapshot(&s0).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&base).await.unwrap(), DeleteAction::Deleted);
}
