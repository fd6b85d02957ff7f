//! Unit tests of the service's logic against the in-memory fake driver.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::*;
use crate::fake::FakeDriver;
use crate::store::SqliteStore;

struct Fixture {
    svc: Arc<Service>,
    fake: Arc<FakeDriver>,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("kiln.db")).unwrap());
    let fake = Arc::new(FakeDriver::default());
    let mut backends = BTreeMap::new();
    backends.insert(
        "mem".to_string(),
        Backend {
            kind: "fake".into(),
            driver: Ok(fake.clone() as Arc<dyn VolumeDriver>),
        },
    );
    backends.insert(
        "down".to_string(),
        Backend {
            kind: "fake".into(),
            driver: Err("cluster unreachable".into()),
        },
    );
    let svc = Service::new(
        store.clone(),
        backends,
        "mem".into(),
        dir.path().join("locks"),
    )
    .unwrap();
    Fixture {
        svc: Arc::new(svc),
        fake,
        store,
        _dir: dir,
    }
}

async fn volume(f: &Fixture) -> Volume {
    f.svc
        .create_volume(CreateVolume {
            size_bytes: Some(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn snapshot_gate_follows_cinder() {
    let f = fixture();
    let v = volume(&f).await;
    assert_eq!(v.status, VolumeStatus::Available);
    assert_eq!(
        v.provider_location.as_deref(),
        Some(format!("mem:volume-{}", v.id).as_str())
    );
    f.svc
        .create_snapshot(v.id, Some("plain".into()), false)
        .await
        .unwrap();

    f.svc
        .attach(v.id, InstanceId::new(), "/dev/vdb")
        .await
        .unwrap();
    let e = f.svc.create_snapshot(v.id, None, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert!(
        e.to_string().contains("in-use") && e.to_string().contains("--force"),
        "{e}"
    );
    let forced = f.svc.create_snapshot(v.id, None, true).await.unwrap();
    assert!(forced.forced);
    assert_eq!(forced.status, SnapshotStatus::Available);

    // Every other status is refused, with the status named.
    f.svc.detach(v.id).await.unwrap();
    f.store
        .commit(Batch::new(vec![Step::SetVolumeStatus {
            id: v.id,
            from: vec![],
            to: VolumeStatus::Error,
            reason: None,
        }]))
        .unwrap()
        .unwrap();
    for force in [false, true] {
        let e = f.svc.create_snapshot(v.id, None, force).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongState);
        assert!(e.to_string().contains("is error"), "{e}");
    }
    assert_eq!(f.svc.snapshots(Some(v.id)).unwrap().len(), 2);
}

#[tokio::test]
async fn unknown_ids_and_bad_input_change_nothing() {
    let f = fixture();
    let v = volume(&f).await;
    let before = (f.svc.volumes().unwrap(), f.svc.snapshots(None).unwrap());
    assert_eq!(
        f.svc
            .create_snapshot(VolumeId::new(), None, false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        f.svc
            .delete_snapshot(SnapshotId::new(), false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        f.svc
            .revert(SnapshotId::new(), no_progress())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        f.svc
            .create_snapshot(v.id, Some("../x".into()), false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        f.svc
            .attach(v.id, InstanceId::new(), "/dev/../sda")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let e = f
        .svc
        .create_volume(CreateVolume {
            size_bytes: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = f
        .svc
        .create_volume(CreateVolume {
            size_bytes: Some(1 << 20),
            backend: Some("nope".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(
        f.svc.detach(v.id).await.unwrap_err().kind(),
        ErrorKind::WrongState
    );
    assert_eq!(
        before,
        (f.svc.volumes().unwrap(), f.svc.snapshots(None).unwrap())
    );
    assert!(f.store.operations().unwrap().is_empty());
}

#[tokio::test]
async fn delete_volume_needs_cascade_when_it_has_snapshots() {
    let f = fixture();
    let v = volume(&f).await;
    f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.svc.create_snapshot(v.id, None, false).await.unwrap();
    let e = f.svc.delete_volume(v.id, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert!(e.to_string().contains("2 snapshot(s)"), "{e}");
    assert_eq!(f.svc.volume(v.id).unwrap().status, VolumeStatus::Available);

    f.svc
        .attach(v.id, InstanceId::new(), "/dev/vdc")
        .await
        .unwrap();
    let e = f.svc.delete_volume(v.id, true).await.unwrap_err();
    assert!(e.to_string().contains("in-use"), "{e}");
    assert_eq!(
        f.svc.snapshots(Some(v.id)).unwrap().len(),
        2,
        "cascade must not start on an attached volume"
    );
    f.svc.detach(v.id).await.unwrap();

    f.svc.delete_volume(v.id, true).await.unwrap();
    assert!(f.store.volume(v.id).unwrap().is_none());
    assert!(f.fake.snapshots.lock().unwrap().is_empty());
    assert!(f.fake.volumes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn revert_to_any_snapshot_keeps_the_others() {
    let f = fixture();
    let v = volume(&f).await;
    let mut snaps = vec![];
    for i in 0..3u8 {
        f.fake.write(v.id, &[i; 16]);
        snaps.push(f.svc.create_snapshot(v.id, None, false).await.unwrap());
    }
    f.fake.write(v.id, &[9; 16]);
    let after = f.svc.revert(snaps[0].id, no_progress()).await.unwrap();
    assert_eq!(after.status, VolumeStatus::Available);
    assert_eq!(f.fake.data(v.id).unwrap(), vec![0; 16]);
    for s in &snaps {
        assert_eq!(
            f.svc.snapshot(s.id).unwrap().status,
            SnapshotStatus::Available
        );
    }
    f.svc.revert(snaps[2].id, no_progress()).await.unwrap();
    assert_eq!(f.fake.data(v.id).unwrap(), vec![2; 16]);

    // Attached volumes are not reverted behind the guest's back.
    f.svc
        .attach(v.id, InstanceId::new(), "/dev/vdd")
        .await
        .unwrap();
    let e = f.svc.revert(snaps[1].id, no_progress()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert_eq!(
        f.svc.snapshot(snaps[1].id).unwrap().status,
        SnapshotStatus::Available
    );
}

#[tokio::test]
async fn failed_driver_calls_leave_nothing_behind() {
    let f = fixture();
    *f.fake.fail_next.lock().unwrap() = Some("create_volume");
    assert_eq!(
        f.svc
            .create_volume(CreateVolume {
                size_bytes: Some(1 << 20),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Backend
    );
    assert!(f.svc.volumes().unwrap().is_empty());
    let v = volume(&f).await;
    *f.fake.fail_next.lock().unwrap() = Some("create_snapshot");
    assert_eq!(
        f.svc
            .create_snapshot(v.id, None, false)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Backend
    );
    assert!(f.svc.snapshots(None).unwrap().is_empty());
    assert!(f.store.operations().unwrap().is_empty());

    // A failed revert is reported on the volume, not hidden.
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    *f.fake.fail_next.lock().unwrap() = Some("revert_to_snapshot");
    f.svc.revert(s.id, no_progress()).await.unwrap_err();
    let v = f.svc.volume(v.id).unwrap();
    assert_eq!(v.status, VolumeStatus::Error);
    assert!(v.status_reason.unwrap().contains("injected failure"));
    assert_eq!(
        f.svc.snapshot(s.id).unwrap().status,
        SnapshotStatus::Available
    );
}

#[tokio::test]
async fn busy_snapshot_stays_available_until_dependents_are_flattened() {
    let f = fixture();
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    let clone = f
        .svc
        .create_volume(CreateVolume {
            source_snapshot: Some(s.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(clone.source_snapshot_id, Some(s.id));
    assert_eq!(clone.size_bytes, s.size_bytes);
    f.fake.busy.lock().unwrap().push(s.id);
    let e = f.svc.delete_snapshot(s.id, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        f.svc.snapshot(s.id).unwrap().status,
        SnapshotStatus::Available
    );
    f.svc.delete_snapshot(s.id, true).await.unwrap();
    assert!(f.store.snapshot(s.id).unwrap().is_none());

    let tree = f.svc.tree(v.id).unwrap();
    assert!(tree.snapshots.is_empty());
}

#[tokio::test]
async fn lineage_tree_follows_clones() {
    let f = fixture();
    let v = volume(&f).await;
    let s1 = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    let c1 = f
        .svc
        .create_volume(CreateVolume {
            source_snapshot: Some(s1.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let s2 = f.svc.create_snapshot(c1.id, None, false).await.unwrap();
    let c2 = f
        .svc
        .create_volume(CreateVolume {
            source_snapshot: Some(s2.id),
            size_bytes: Some(2 << 20),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = f.svc.tree(v.id).unwrap();
    assert_eq!(t.snapshots[0].snapshot.id, s1.id);
    assert_eq!(t.snapshots[0].clones[0].volume.id, c1.id);
    assert_eq!(
        t.snapshots[0].clones[0].snapshots[0].clones[0].volume.id,
        c2.id
    );
    assert_eq!(c2.size_bytes, 2 << 20);
    // Smaller than the snapshot is refused.
    let s3 = f.svc.create_snapshot(c2.id, None, false).await.unwrap();
    let e = f
        .svc
        .create_volume(CreateVolume {
            source_snapshot: Some(s3.id),
            size_bytes: Some(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("smaller than snapshot"), "{e}");
}

/// 32 tasks race to create and delete snapshots of one volume; every status transition is
/// a compare-and-set, so the end state must be consistent between store and backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_and_deletes_stay_consistent() {
    let f = fixture();
    let v = volume(&f).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let svc = f.svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut kept = 0;
            for j in 0..4 {
                let s = svc
                    .create_snapshot(v.id, Some(format!("t{i}-{j}")), i % 2 == 0)
                    .await?;
                // Half the tasks also try to delete someone else's snapshot: those can race
                // with its owner's delete; exactly one delete may win.
                if (i + j) % 3 == 0 {
                    kept += 1;
                    continue;
                }
                match svc.delete_snapshot(s.id, false).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if let Some(other) = svc
                    .snapshots(Some(v.id))?
                    .into_iter()
                    .find(|o| o.id != s.id)
                {
                    match svc.delete_snapshot(other.id, false).await {
                        Ok(()) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::WrongState) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<_, Error>(kept)
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let records = f.svc.snapshots(Some(v.id)).unwrap();
    assert!(
        records
            .iter()
            .all(|s| s.status == SnapshotStatus::Available),
        "{records:?}"
    );
    let in_store: HashSet<_> = records.iter().map(|s| s.id).collect();
    let on_backend: HashSet<_> = f.fake.snapshots.lock().unwrap().keys().copied().collect();
    assert_eq!(in_store, on_backend);
    assert!(f.store.operations().unwrap().is_empty());
    assert_eq!(f.svc.volume(v.id).unwrap().status, VolumeStatus::Available);
}

/// Simulates a crash by journaling an operation the way the service does and then not
/// finishing it; recovery must resolve every kind.
#[tokio::test]
async fn recovery_resolves_every_unfinished_operation() {
    let f = fixture();
    let v = volume(&f).await;
    let now = Utc::now();
    let mk_snap = |status| Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name: None,
        size_bytes: v.size_bytes,
        backend: "mem".into(),
        status,
        status_reason: None,
        provider_location: None,
        forced: false,
        created_at: now,
        updated_at: now,
    };
    let journal = |steps, kind, snap| {
        f.store
            .commit(Batch::with_op(steps, kind, v.id, snap))
            .unwrap()
            .unwrap()
    };

    // Snapshot create crashed after the driver made it / before the driver ran.
    let made = mk_snap(SnapshotStatus::Creating);
    f.fake.snapshots.lock().unwrap().insert(made.id, vec![1]);
    journal(
        vec![Step::InsertSnapshot(made.clone())],
        OpKind::CreateSnapshot,
        Some(made.id),
    );
    let lost = mk_snap(SnapshotStatus::Creating);
    journal(
        vec![Step::InsertSnapshot(lost.clone())],
        OpKind::CreateSnapshot,
        Some(lost.id),
    );
    // Snapshot delete crashed before the driver ran.
    let doomed = mk_snap(SnapshotStatus::Deleting);
    f.fake.snapshots.lock().unwrap().insert(doomed.id, vec![2]);
    journal(
        vec![Step::InsertSnapshot(doomed.clone())],
        OpKind::DeleteSnapshot,
        Some(doomed.id),
    );
    // Revert crashed: volume reverting, snapshot restoring.
    let target = mk_snap(SnapshotStatus::Restoring);
    f.fake
        .snapshots
        .lock()
        .unwrap()
        .insert(target.id, vec![7; 16]);
    journal(
        vec![
            Step::InsertSnapshot(target.clone()),
            Step::SetVolumeStatus {
                id: v.id,
                from: vec![],
                to: VolumeStatus::Reverting,
                reason: None,
            },
        ],
        OpKind::Revert,
        Some(target.id),
    );
    // A second volume whose create crashed before the driver ran.
    let v2 = Volume {
        id: VolumeId::new(),
        status: VolumeStatus::Creating,
        ..v.clone()
    };
    f.store
        .commit(Batch::with_op(
            vec![Step::InsertVolume(v2.clone())],
            OpKind::CreateVolume,
            v2.id,
            None,
        ))
        .unwrap()
        .unwrap();

    let actions = f.svc.recover().await.unwrap();
    assert_eq!(actions.len(), 5, "{actions:?}");
    assert!(f.store.operations().unwrap().is_empty());

    assert_eq!(
        f.svc.snapshot(made.id).unwrap().status,
        SnapshotStatus::Available
    );
    let lost = f.svc.snapshot(lost.id).unwrap();
    assert_eq!(lost.status, SnapshotStatus::Error);
    assert!(lost.status_reason.unwrap().contains("crash"));
    assert!(f.store.snapshot(doomed.id).unwrap().is_none());
    assert!(!f.fake.snapshots.lock().unwrap().contains_key(&doomed.id));
    assert_eq!(f.svc.volume(v.id).unwrap().status, VolumeStatus::Available);
    assert_eq!(
        f.svc.snapshot(target.id).unwrap().status,
        SnapshotStatus::Available
    );
    assert_eq!(f.fake.data(v.id).unwrap(), vec![7; 16]);
    assert_eq!(f.svc.volume(v2.id).unwrap().status, VolumeStatus::Available);
    assert!(f.fake.volumes.lock().unwrap().contains_key(&v2.id));

    // Nothing left to do the second time.
    assert!(f.svc.recover().await.unwrap().is_empty());
}

#[tokio::test]
async fn recovery_skips_operations_whose_volume_is_locked() {
    let f = fixture();
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.store
        .commit(Batch::with_op(
            vec![Step::SetSnapshotStatus {
                id: s.id,
                from: vec![],
                to: SnapshotStatus::Deleting,
                reason: None,
            }],
            OpKind::DeleteSnapshot,
            v.id,
            Some(s.id),
        ))
        .unwrap()
        .unwrap();
    // Another "process" (lock table on the same directory) is still working on it.
    let other = VolumeLocks::new(f._dir.path().join("locks")).unwrap();
    let held = other.lock(&[v.id]).await.unwrap();
    assert!(f.svc.recover().await.unwrap().is_empty());
    assert_eq!(
        f.svc.snapshot(s.id).unwrap().status,
        SnapshotStatus::Deleting
    );
    drop(held);
    assert_eq!(f.svc.recover().await.unwrap().len(), 1);
    assert!(f.store.snapshot(s.id).unwrap().is_none());
}

#[tokio::test]
async fn a_snapshot_the_backend_reports_broken_is_marked_error_and_not_used() {
    let f = fixture();
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.fake.write(v.id, &[5; 16]);
    f.fake.broken.lock().unwrap().push(s.id);
    let e = f.svc.revert(s.id, no_progress()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert_eq!(f.fake.data(v.id).unwrap(), vec![5; 16], "volume untouched");
    assert_eq!(f.svc.volume(v.id).unwrap().status, VolumeStatus::Available);
    let s = f.svc.snapshot(s.id).unwrap();
    assert_eq!(s.status, SnapshotStatus::Error);
    assert_eq!(
        s.status_reason.as_deref(),
        Some("copy-on-write space overflowed")
    );
    assert!(f.svc.open_snapshot_reader(s.id).await.is_err());
    let clone = f
        .svc
        .create_volume(CreateVolume {
            source_snapshot: Some(s.id),
            ..Default::default()
        })
        .await;
    assert_eq!(clone.unwrap_err().kind(), ErrorKind::WrongState);
    // It can still be deleted.
    f.svc.delete_snapshot(s.id, false).await.unwrap();
}

#[tokio::test]
async fn an_unavailable_backend_is_listed_and_refuses_before_the_store_changes() {
    let f = fixture();
    let down = f
        .svc
        .backends()
        .into_iter()
        .find(|b| b.name == "down")
        .unwrap();
    assert_eq!(down.unavailable.as_deref(), Some("cluster unreachable"));
    let e = f
        .svc
        .create_volume(CreateVolume {
            size_bytes: Some(1 << 20),
            backend: Some("down".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(
        e.to_string().contains("unavailable: cluster unreachable"),
        "{e}"
    );
    assert!(f.svc.volumes().unwrap().is_empty());
    assert!(f.store.operations().unwrap().is_empty());
    assert!(f.svc.backend_stats("down").await.is_err());
}
