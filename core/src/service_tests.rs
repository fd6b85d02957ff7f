//! Unit tests of the service's logic against the in-memory fake driver.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;

use super::*;
use crate::error::ErrorKind;
use crate::locks::{FlockLocks, LockManager, PgLocks};
use crate::memory::MemoryDriver as FakeDriver;
use crate::store::{Batch, NewOp, PgOptions, PostgresStore, SqliteStore, Step};
use crate::types::{Attachment, Consistency, ImageId, InstanceId};

/// What the service tests run on: SQLite and host-local locks (the default), or, with
/// `KILN_TEST_STORE=postgres`, a fresh database of a throw-away PostgreSQL and advisory
/// locks — the multi-node store passes the same suite.
struct Backing {
    dir: tempfile::TempDir,
    postgres: Option<PgOptions>,
}

impl Backing {
    fn new() -> Backing {
        match std::env::var("KILN_TEST_STORE").as_deref() {
            Err(_) | Ok("sqlite") => Backing {
                dir: tempfile::tempdir().unwrap(),
                postgres: None,
            },
            Ok("postgres") => Backing::postgres(),
            Ok(other) => panic!("KILN_TEST_STORE={other:?}: use sqlite or postgres"),
        }
    }

    /// A fresh, migrated PostgreSQL database whatever `KILN_TEST_STORE` says.
    fn postgres() -> Backing {
        let options = PgOptions::new(kiln_testpg::PgServer::shared().create_database());
        PostgresStore::migrate(&options).unwrap();
        Backing {
            dir: tempfile::tempdir().unwrap(),
            postgres: Some(options),
        }
    }

    /// A new handle on the store: each call stands in for another kiln process (its own
    /// connection).
    fn store(&self) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = match &self.postgres {
            None => Arc::new(SqliteStore::open(&self.dir.path().join("kiln.db")).unwrap()),
            Some(o) => Arc::new(PostgresStore::connect(o).unwrap()),
        };
        Arc::new(TestStore {
            inner: store,
            fail: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A new lock table: each call stands in for another kiln process (or node).
    async fn locks(&self) -> Arc<dyn LockManager> {
        match &self.postgres {
            None => Arc::new(FlockLocks::new(self.dir.path().join("locks")).unwrap()),
            Some(o) => {
                // No fencing: a test process must never exit from under the harness.
                let liveness = crate::locks::Liveness {
                    fence: false,
                    ..Default::default()
                };
                Arc::new(PgLocks::connect(o, 16, liveness).await.unwrap())
            }
        }
    }
}

struct Fixture {
    svc: Arc<Service>,
    fake: Arc<FakeDriver>,
    store: Arc<dyn Store>,
    backing: Backing,
}

async fn fixture() -> Fixture {
    let backing = Backing::new();
    let store = backing.store();
    let fake = Arc::new(FakeDriver::default());
    let svc = service(&backing, &store, &fake).await;
    Fixture {
        svc: Arc::new(svc),
        fake,
        store,
        backing,
    }
}

/// A service on `store` and `fake` with a lock table of its own: a second call on the
/// same backing stands in for a second kiln process.
async fn service(backing: &Backing, store: &Arc<dyn Store>, fake: &Arc<FakeDriver>) -> Service {
    let mut backends = Backends::new("mem");
    backends.add_driver("mem", "fake", fake.clone());
    backends.add_unavailable("down", "fake", "cluster unreachable");
    Service::new(store.clone(), backends, backing.locks().await).unwrap()
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
    let f = fixture().await;
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
        .attach(v.id, Attachment::new(InstanceId::new(), "/dev/vdb"))
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
    assert_eq!(f.svc.snapshots(Some(v.id)).await.unwrap().len(), 2);
}

#[tokio::test]
async fn unknown_ids_and_bad_input_change_nothing() {
    let f = fixture().await;
    let v = volume(&f).await;
    let before = (
        f.svc.volumes().await.unwrap(),
        f.svc.snapshots(None).await.unwrap(),
    );
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
            .attach(v.id, Attachment::new(InstanceId::new(), "/dev/../sda"))
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
        (
            f.svc.volumes().await.unwrap(),
            f.svc.snapshots(None).await.unwrap()
        )
    );
    assert!(f.store.operations().unwrap().is_empty());
}

#[tokio::test]
async fn delete_volume_needs_cascade_when_it_has_snapshots() {
    let f = fixture().await;
    let v = volume(&f).await;
    f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.svc.create_snapshot(v.id, None, false).await.unwrap();
    let e = f.svc.delete_volume(v.id, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert!(e.to_string().contains("2 snapshot(s)"), "{e}");
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Available
    );

    f.svc
        .attach(v.id, Attachment::new(InstanceId::new(), "/dev/vdc"))
        .await
        .unwrap();
    let e = f.svc.delete_volume(v.id, true).await.unwrap_err();
    assert!(e.to_string().contains("in-use"), "{e}");
    assert_eq!(
        f.svc.snapshots(Some(v.id)).await.unwrap().len(),
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
    let f = fixture().await;
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
            f.svc.snapshot(s.id).await.unwrap().status,
            SnapshotStatus::Available
        );
    }
    f.svc.revert(snaps[2].id, no_progress()).await.unwrap();
    assert_eq!(f.fake.data(v.id).unwrap(), vec![2; 16]);

    // Attached volumes are not reverted behind the guest's back.
    f.svc
        .attach(v.id, Attachment::new(InstanceId::new(), "/dev/vdd"))
        .await
        .unwrap();
    let e = f.svc.revert(snaps[1].id, no_progress()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert_eq!(
        f.svc.snapshot(snaps[1].id).await.unwrap().status,
        SnapshotStatus::Available
    );
}

#[tokio::test]
async fn failed_driver_calls_leave_nothing_behind() {
    let f = fixture().await;
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
    assert!(f.svc.volumes().await.unwrap().is_empty());
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
    assert!(f.svc.snapshots(None).await.unwrap().is_empty());
    assert!(f.store.operations().unwrap().is_empty());

    // A failed revert is reported on the volume, not hidden.
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    *f.fake.fail_next.lock().unwrap() = Some("revert_to_snapshot");
    f.svc.revert(s.id, no_progress()).await.unwrap_err();
    let v = f.svc.volume(v.id).await.unwrap();
    assert_eq!(v.status, VolumeStatus::Error);
    assert!(v.status_reason.unwrap().contains("injected failure"));
    assert_eq!(
        f.svc.snapshot(s.id).await.unwrap().status,
        SnapshotStatus::Available
    );
}

#[tokio::test]
async fn busy_snapshot_stays_available_until_dependents_are_flattened() {
    let f = fixture().await;
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
        f.svc.snapshot(s.id).await.unwrap().status,
        SnapshotStatus::Available
    );
    f.svc.delete_snapshot(s.id, true).await.unwrap();
    assert!(f.store.snapshot(s.id).unwrap().is_none());

    let tree = f.svc.tree(v.id).await.unwrap();
    assert!(tree.snapshots.is_empty());
}

#[tokio::test]
async fn lineage_tree_follows_clones() {
    let f = fixture().await;
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
    let t = f.svc.tree(v.id).await.unwrap();
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

/// 32 tasks create and delete snapshots of one volume, deleting each other's too. The
/// per-volume lock serializes their operations (that is its job), so this proves the
/// service's bookkeeping under interleaving, not the store's compare-and-set: that one
/// contends for real in `store_compare_and_set_has_exactly_one_winner_under_contention`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_and_deletes_from_32_tasks_stay_consistent() {
    let f = fixture().await;
    let v = volume(&f).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let svc = f.svc.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..4 {
                let s = svc
                    .create_snapshot(v.id, Some(format!("t{i}-{j}")), i % 2 == 0)
                    .await?;
                // Half the tasks also try to delete someone else's snapshot: those can race
                // with its owner's delete; exactly one delete may win.
                if (i + j) % 3 == 0 {
                    continue;
                }
                match svc.delete_snapshot(s.id, false).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if let Some(other) = svc
                    .snapshots(Some(v.id))
                    .await?
                    .into_iter()
                    .find(|o| o.id != s.id)
                {
                    match svc.delete_snapshot(other.id, false).await {
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::WrongState) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let records = f.svc.snapshots(Some(v.id)).await.unwrap();
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
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Available
    );
}

/// Simulates a crash by journaling an operation the way the service does and then not
/// finishing it; recovery must resolve every kind.
#[tokio::test]
async fn recovery_resolves_every_unfinished_operation() {
    let f = fixture().await;
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
        image_id: None,
        consistency: None,
        created_at: now,
        updated_at: now,
    };
    let journal = |steps, kind, snap| {
        f.store
            .commit(Batch::with_op(steps, NewOp::of(kind, v.id, snap)))
            .unwrap()
            .unwrap()
    };

    // Snapshot create crashed after the driver made it / before the driver ran.
    let made = mk_snap(SnapshotStatus::Creating);
    f.fake.snapshots.lock().unwrap().insert(made.id, vec![1]);
    journal(
        vec![Step::InsertSnapshot(made.clone())],
        "create_snapshot",
        Some(made.id),
    );
    let lost = mk_snap(SnapshotStatus::Creating);
    journal(
        vec![Step::InsertSnapshot(lost.clone())],
        "create_snapshot",
        Some(lost.id),
    );
    // Snapshot delete crashed before the driver ran.
    let doomed = mk_snap(SnapshotStatus::Deleting);
    f.fake.snapshots.lock().unwrap().insert(doomed.id, vec![2]);
    journal(
        vec![Step::InsertSnapshot(doomed.clone())],
        "delete_snapshot",
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
        "revert",
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
            NewOp::of("create_volume", v2.id, None),
        ))
        .unwrap()
        .unwrap();

    let actions = f.svc.recover().await.unwrap();
    assert_eq!(actions.len(), 5, "{actions:?}");
    assert!(f.store.operations().unwrap().is_empty());

    assert_eq!(
        f.svc.snapshot(made.id).await.unwrap().status,
        SnapshotStatus::Available
    );
    let lost = f.svc.snapshot(lost.id).await.unwrap();
    assert_eq!(lost.status, SnapshotStatus::Error);
    assert!(lost.status_reason.unwrap().contains("crash"));
    assert!(f.store.snapshot(doomed.id).unwrap().is_none());
    assert!(!f.fake.snapshots.lock().unwrap().contains_key(&doomed.id));
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Available
    );
    assert_eq!(
        f.svc.snapshot(target.id).await.unwrap().status,
        SnapshotStatus::Available
    );
    assert_eq!(f.fake.data(v.id).unwrap(), vec![7; 16]);
    assert_eq!(
        f.svc.volume(v2.id).await.unwrap().status,
        VolumeStatus::Available
    );
    assert!(f.fake.volumes.lock().unwrap().contains_key(&v2.id));

    // Nothing left to do the second time.
    assert!(f.svc.recover().await.unwrap().is_empty());
}

#[tokio::test]
async fn recovery_skips_operations_whose_volume_is_locked() {
    let f = fixture().await;
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
            NewOp::of("delete_snapshot", v.id, Some(s.id)),
        ))
        .unwrap()
        .unwrap();
    // Another "process" (lock table on the same directory) is still working on it.
    let other = f.backing.locks().await;
    let held = other.lock(&[v.id.into()]).await.unwrap();
    assert!(f.svc.recover().await.unwrap().is_empty());
    assert_eq!(
        f.svc.snapshot(s.id).await.unwrap().status,
        SnapshotStatus::Deleting
    );
    // Released as an operation releases its locks: free for every node once it returns.
    held.release().await;
    assert_eq!(f.svc.recover().await.unwrap().len(), 1);
    assert!(f.store.snapshot(s.id).unwrap().is_none());
}

#[tokio::test]
async fn a_snapshot_the_backend_reports_broken_is_marked_error_and_not_used() {
    let f = fixture().await;
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.fake.write(v.id, &[5; 16]);
    f.fake.broken.lock().unwrap().push(s.id);
    let e = f.svc.revert(s.id, no_progress()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert_eq!(f.fake.data(v.id).unwrap(), vec![5; 16], "volume untouched");
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Available
    );
    let s = f.svc.snapshot(s.id).await.unwrap();
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
    let f = fixture().await;
    let down = f
        .svc
        .backends()
        .await
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
    // Unavailable, not a failure: nothing was decided, a retry later may work.
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(
        e.to_string().contains("unavailable: cluster unreachable"),
        "{e}"
    );
    assert!(f.svc.volumes().await.unwrap().is_empty());
    assert!(f.store.operations().unwrap().is_empty());
    assert!(f.svc.backend_stats("down").await.is_err());
}

fn snapshot_record(v: &Volume, status: SnapshotStatus) -> Snapshot {
    let now = Utc::now();
    Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name: None,
        size_bytes: v.size_bytes,
        backend: v.backend.clone(),
        status,
        status_reason: None,
        provider_location: None,
        forced: false,
        image_id: None,
        consistency: None,
        created_at: now,
        updated_at: now,
    }
}

/// Found in review: a `Busy` refusal reset `error`/`error_deleting` to `available`, hiding
/// e.g. a half-done revert. A refusal must give back the status *and reason* it had.
#[tokio::test]
async fn a_busy_refusal_keeps_the_error_status_and_its_reason() {
    let f = fixture().await;
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.store
        .commit(Batch::new(vec![Step::SetSnapshotStatus {
            id: s.id,
            from: vec![],
            to: SnapshotStatus::ErrorDeleting,
            reason: Some("earlier delete failed: disk full".into()),
        }]))
        .unwrap()
        .unwrap();
    let before = f.svc.snapshot(s.id).await.unwrap();
    f.fake.busy.lock().unwrap().push(s.id);
    let e = f.svc.delete_snapshot(s.id, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    // Every field, `updated_at` included: a refusal leaves no trace.
    assert_eq!(f.svc.snapshot(s.id).await.unwrap(), before);

    // Same for a volume: an `error` volume refused by the backend stays `error`.
    let v2 = volume(&f).await;
    f.svc
        .reset_volume_state(v2.id, VolumeStatus::Error, Some("revert half done".into()))
        .await
        .unwrap();
    let before = f.svc.volume(v2.id).await.unwrap();
    f.fake
        .unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = f.svc.delete_volume(v2.id, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    let got = f.svc.volume(v2.id).await.unwrap();
    assert_eq!(got.status_reason.as_deref(), Some("revert half done"));
    assert_eq!(got, before);
    assert!(f.store.operations().unwrap().is_empty());
}

/// Found in review: recovery of a snapshot create the backend had finished marked it
/// `available` with `provider_location: null`.
#[tokio::test]
async fn recovered_snapshots_get_their_backend_location() {
    let f = fixture().await;
    let v = volume(&f).await;
    let made = snapshot_record(&v, SnapshotStatus::Creating);
    f.fake.snapshots.lock().unwrap().insert(made.id, vec![1]);
    f.store
        .commit(Batch::with_op(
            vec![Step::InsertSnapshot(made.clone())],
            NewOp::of("create_snapshot", v.id, Some(made.id)),
        ))
        .unwrap()
        .unwrap();
    f.svc.recover().await.unwrap();
    let got = f.svc.snapshot(made.id).await.unwrap();
    assert_eq!(got.status, SnapshotStatus::Available);
    assert_eq!(
        got.provider_location,
        Some(format!("mem:snapshot-{}", made.id))
    );
}

/// A backend that cannot answer during recovery must not turn into a recorded failure:
/// the operation stays journaled, the record untouched, and a later run resolves it.
#[tokio::test]
async fn recovery_keeps_operations_journaled_while_the_backend_cannot_answer() {
    let f = fixture().await;
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
            NewOp::of("delete_snapshot", v.id, Some(s.id)),
        ))
        .unwrap()
        .unwrap();
    let lost = snapshot_record(&v, SnapshotStatus::Creating);
    f.store
        .commit(Batch::with_op(
            vec![Step::InsertSnapshot(lost.clone())],
            NewOp::of("create_snapshot", v.id, Some(lost.id)),
        ))
        .unwrap()
        .unwrap();
    let records = f.svc.snapshots(None).await.unwrap();
    f.fake
        .unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(f.svc.recover().await.unwrap().is_empty());
    assert_eq!(f.store.operations().unwrap().len(), 2);
    assert_eq!(f.svc.snapshots(None).await.unwrap(), records);
    f.fake
        .unreachable
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let done = f.svc.recover().await.unwrap();
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done[0].outcome.contains("deletion completed"), "{done:?}");
    assert!(f.store.operations().unwrap().is_empty());
    assert!(f.store.snapshot(s.id).unwrap().is_none());
    assert_eq!(
        f.svc.snapshot(lost.id).await.unwrap().status,
        SnapshotStatus::Error
    );
}

/// Recovery of a clone (create from snapshot) and of a volume delete, and an honest report
/// of a delete whose backend object was already gone.
#[tokio::test]
async fn recovery_redoes_clones_and_finishes_volume_deletes() {
    let f = fixture().await;
    let v = volume(&f).await;
    f.fake.write(v.id, &[3; 16]);
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    // A clone whose copy was interrupted: a partial backend volume exists.
    let clone = Volume {
        id: VolumeId::new(),
        status: VolumeStatus::Creating,
        source_snapshot_id: Some(s.id),
        ..v.clone()
    };
    f.fake.write(clone.id, &[0; 4]);
    f.store
        .commit(Batch::with_op(
            vec![Step::InsertVolume(clone.clone())],
            NewOp::of("create_volume_from_snapshot", clone.id, Some(s.id)),
        ))
        .unwrap()
        .unwrap();
    // A volume delete interrupted after the backend removed it.
    let gone = volume(&f).await;
    f.fake.volumes.lock().unwrap().remove(&gone.id);
    f.store
        .commit(Batch::with_op(
            vec![Step::SetVolumeStatus {
                id: gone.id,
                from: vec![],
                to: VolumeStatus::Deleting,
                reason: None,
            }],
            NewOp::of("delete_volume", gone.id, None),
        ))
        .unwrap()
        .unwrap();
    let actions = f.svc.recover().await.unwrap();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(
        actions[0].outcome.contains("partial backend volume"),
        "{actions:?}"
    );
    assert!(actions[1].outcome.contains("already gone"), "{actions:?}");
    assert_eq!(f.fake.data(clone.id).unwrap(), vec![3; 16]);
    let c = f.svc.volume(clone.id).await.unwrap();
    assert_eq!(c.status, VolumeStatus::Available);
    assert_eq!(
        c.provider_location,
        Some(format!("mem:volume-{}", clone.id))
    );
    assert!(f.store.volume(gone.id).unwrap().is_none());
    assert!(f.store.operations().unwrap().is_empty());
}

/// The tests' view of a store: every call runs on a thread of its own, because the tests
/// call the store directly from async code and the PostgreSQL client must not block a
/// runtime thread (the service itself always calls it on the blocking pool); and commits
/// fail while `fail` is set (a store that breaks during recovery).
struct TestStore {
    inner: Arc<dyn Store>,
    fail: std::sync::atomic::AtomicBool,
}

fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

impl Store for TestStore {
    fn commit(
        &self,
        batch: Batch,
    ) -> Result<std::result::Result<Option<crate::store::OpId>, crate::store::Conflict>> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::store("disk I/O error (injected)"));
        }
        off_runtime(|| self.inner.commit(batch))
    }
    fn volume(&self, id: VolumeId) -> Result<Option<Volume>> {
        off_runtime(|| self.inner.volume(id))
    }
    fn volumes(&self) -> Result<Vec<Volume>> {
        off_runtime(|| self.inner.volumes())
    }
    fn volumes_from_snapshot(&self, id: SnapshotId) -> Result<Vec<Volume>> {
        off_runtime(|| self.inner.volumes_from_snapshot(id))
    }
    fn snapshot(&self, id: SnapshotId) -> Result<Option<Snapshot>> {
        off_runtime(|| self.inner.snapshot(id))
    }
    fn snapshots(&self, volume: Option<VolumeId>) -> Result<Vec<Snapshot>> {
        off_runtime(|| self.inner.snapshots(volume))
    }
    fn operations(&self) -> Result<Vec<crate::store::Operation>> {
        off_runtime(|| self.inner.operations())
    }
    fn history(&self, object_id: &str) -> Result<Vec<HistoryEntry>> {
        off_runtime(|| self.inner.history(object_id))
    }
    fn instance(&self, id: InstanceId) -> Result<Option<crate::instance::Instance>> {
        off_runtime(|| self.inner.instance(id))
    }
    fn instances(&self) -> Result<Vec<crate::instance::Instance>> {
        off_runtime(|| self.inner.instances())
    }
    fn instance_volumes(&self, id: InstanceId) -> Result<Vec<Volume>> {
        off_runtime(|| self.inner.instance_volumes(id))
    }
    fn image(&self, id: ImageId) -> Result<Option<crate::instance::Image>> {
        off_runtime(|| self.inner.image(id))
    }
    fn images(&self) -> Result<Vec<crate::instance::Image>> {
        off_runtime(|| self.inner.images())
    }
    fn backup(&self, id: crate::types::BackupId) -> Result<Option<crate::types::Backup>> {
        off_runtime(|| self.inner.backup(id))
    }
    fn backups(&self, volume: Option<VolumeId>) -> Result<Vec<crate::types::Backup>> {
        off_runtime(|| self.inner.backups(volume))
    }
    fn attrs(&self, id: &str) -> Result<Option<crate::attrs::ObjectAttrs>> {
        off_runtime(|| self.inner.attrs(id))
    }
    fn attrs_of(
        &self,
        kind: crate::attrs::ObjectKind,
    ) -> Result<std::collections::BTreeMap<String, crate::attrs::ObjectAttrs>> {
        off_runtime(|| self.inner.attrs_of(kind))
    }
    fn usage(&self, project: &str) -> Result<crate::attrs::Usage> {
        off_runtime(|| self.inner.usage(project))
    }
}

/// Found in review: recovery discarded store errors (`let _ = self.finish_…`) and still
/// reported "completed". A store that fails must leave the operation journaled and report
/// nothing as done.
#[tokio::test]
async fn recovery_reports_nothing_done_when_the_store_fails() {
    let f = fixture().await;
    let v = volume(&f).await;
    let s = snapshot_record(&v, SnapshotStatus::Restoring);
    f.fake.snapshots.lock().unwrap().insert(s.id, vec![7; 16]);
    f.store
        .commit(Batch::with_op(
            vec![
                Step::InsertSnapshot(s.clone()),
                Step::SetVolumeStatus {
                    id: v.id,
                    from: vec![],
                    to: VolumeStatus::Reverting,
                    reason: None,
                },
            ],
            NewOp::of("revert", v.id, Some(s.id)),
        ))
        .unwrap()
        .unwrap();
    let flaky = Arc::new(TestStore {
        inner: f.store.clone(),
        fail: std::sync::atomic::AtomicBool::new(true),
    });
    let mut backends = Backends::new("mem");
    backends.add_driver("mem", "fake", f.fake.clone());
    let svc = Service::new(flaky.clone(), backends, f.backing.locks().await).unwrap();
    assert!(svc.recover().await.unwrap().is_empty());
    assert_eq!(f.store.operations().unwrap().len(), 1);
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Reverting
    );
    flaky.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let done = svc.recover().await.unwrap();
    assert_eq!(done.len(), 1);
    assert!(done[0].outcome.contains("completed"), "{done:?}");
    assert_eq!(
        f.svc.volume(v.id).await.unwrap().status,
        VolumeStatus::Available
    );
}

/// The store's compare-and-set under real contention: 32 threads, each with its own
/// connection to the same database file (as 32 processes would have), start the same
/// `available -> deleting` transition at one barrier. No lock serializes them: exactly one
/// must win, and every loser must see the winner's status.
#[test]
fn store_compare_and_set_has_exactly_one_winner_under_contention() {
    let backing = Arc::new(Backing::new());
    let store = backing.store();
    let now = Utc::now();
    let v = Volume {
        id: VolumeId::new(),
        name: None,
        size_bytes: 1 << 20,
        backend: "mem".into(),
        status: VolumeStatus::Available,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: None,
        attachments: vec![],
        created_at: now,
        updated_at: now,
    };
    store
        .commit(Batch::new(vec![Step::InsertVolume(v.clone())]))
        .unwrap()
        .unwrap();
    for round in 0..5 {
        let s = snapshot_record(&v, SnapshotStatus::Available);
        store
            .commit(Batch::new(vec![Step::InsertSnapshot(s.clone())]))
            .unwrap()
            .unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(32));
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let (backing, barrier, sid, vid) = (backing.clone(), barrier.clone(), s.id, v.id);
                std::thread::spawn(move || {
                    let mine = backing.store();
                    barrier.wait();
                    mine.commit(Batch::with_op(
                        vec![Step::SetSnapshotStatus {
                            id: sid,
                            from: vec![SnapshotStatus::Available],
                            to: SnapshotStatus::Deleting,
                            reason: None,
                        }],
                        NewOp::of("delete_snapshot", vid, Some(sid)),
                    ))
                    .unwrap()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(c) = r {
                assert_eq!(c.found.as_deref(), Some("deleting"), "round {round}");
            }
        }
        assert_eq!(store.operations().unwrap().len(), round + 1);
    }
}

/// Admin reset: refused while an operation runs or is unfinished; keeps the old status and
/// the reason in the history; unknown states are refused before anything changes.
#[tokio::test]
async fn reset_state_is_refused_while_busy_and_keeps_history() {
    let f = fixture().await;
    let v = volume(&f).await;
    let s = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    // A live owner (another lock table = another process) holds the volume.
    let other = f.backing.locks().await;
    let held = other.lock(&[v.id.into()]).await.unwrap();
    let e = f
        .svc
        .reset_volume_state(v.id, VolumeStatus::Error, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState);
    assert!(e.to_string().contains("running"), "{e}");
    // Released as an operation releases its locks: free for every node once it returns.
    held.release().await;
    // An unfinished (journaled) operation on it.
    let op = f
        .store
        .commit(Batch::with_op(
            vec![],
            NewOp::of("delete_snapshot", v.id, Some(s.id)),
        ))
        .unwrap()
        .unwrap()
        .unwrap();
    let e = f
        .svc
        .reset_snapshot_state(s.id, SnapshotStatus::Error, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unfinished"), "{e}");
    f.store
        .commit(Batch::new(vec![Step::FinishOp(op)]))
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            f.svc.volume(v.id).await.unwrap(),
            f.svc.snapshot(s.id).await.unwrap()
        ),
        (v.clone(), s.clone()),
        "refusals changed something"
    );

    let got = f
        .svc
        .reset_volume_state(v.id, VolumeStatus::Error, Some("disk replaced".into()))
        .await
        .unwrap();
    assert_eq!(got.status, VolumeStatus::Error);
    assert_eq!(got.status_reason.as_deref(), Some("disk replaced"));
    let got = f
        .svc
        .reset_volume_state(v.id, VolumeStatus::Available, None)
        .await
        .unwrap();
    assert_eq!(got.status, VolumeStatus::Available);
    assert_eq!(got.status_reason, None);
    let h = f.svc.history(&v.id.to_string()).await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (
            h[0].from_status.as_str(),
            h[0].to_status.as_str(),
            h[0].reason.as_str()
        ),
        ("available", "error", "disk replaced")
    );
    assert_eq!(h[1].from_status, "error");
    // An `in-use` reset without an attachment would lie.
    let e = f
        .svc
        .reset_volume_state(v.id, VolumeStatus::InUse, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // A bad reason is refused like a bad name.
    let e = f
        .svc
        .reset_snapshot_state(s.id, SnapshotStatus::Error, Some("$(rm -rf /)".into()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(f.svc.snapshot(s.id).await.unwrap(), s);
}

/// A group over three volumes on two backends, all or nothing.
#[tokio::test]
async fn a_group_snapshot_spans_backends_and_fails_as_a_unit() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let svc = two_backend_service(&store, &a, &b, &dir).await;
    let vols = three_volumes(&svc).await;
    let snaps = svc
        .create_group_snapshot(&vols, Some("nightly".into()), false)
        .await
        .unwrap();
    assert_eq!(snaps.len(), 3);
    assert!(snaps.iter().all(|s| s.status == SnapshotStatus::Available));
    assert_eq!(a.snapshots.lock().unwrap().len(), 2);
    assert_eq!(b.snapshots.lock().unwrap().len(), 1);
    // One member fails: the others are taken back, nothing is recorded.
    *b.fail_next.lock().unwrap() = Some("create_snapshot");
    let e = svc
        .create_group_snapshot(&vols, None, false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert_eq!(svc.snapshots(None).await.unwrap().len(), 3);
    assert_eq!(a.snapshots.lock().unwrap().len(), 2);
    assert!(store.operations().unwrap().is_empty());
}

/// A store and two in-memory backends (`mem`, `mem2`) in a temp dir of their own.
struct TwoBackends {
    dir: Backing,
    store: Arc<dyn Store>,
    a: Arc<FakeDriver>,
    b: Arc<FakeDriver>,
}

fn two_backends() -> TwoBackends {
    let dir = Backing::new();
    TwoBackends {
        store: dir.store(),
        dir,
        a: Arc::new(FakeDriver::default()),
        b: Arc::new(FakeDriver::default()),
    }
}

async fn two_backend_service(
    store: &Arc<dyn Store>,
    a: &Arc<FakeDriver>,
    b: &Arc<FakeDriver>,
    dir: &Backing,
) -> Service {
    let mut backends = Backends::new("mem");
    backends.add_driver("mem", "fake", a.clone());
    backends.add_driver("mem2", "fake", b.clone());
    Service::new(store.clone(), backends, dir.locks().await).unwrap()
}

/// Waits (10 s at most) until the locks of `keys` are free to another lock manager on
/// `dir`. A process that crashes loses its locks with it (the kernel drops its flocks, the
/// server its sessions, each a moment after the death); a service dropped in the middle of
/// an operation, the crash these tests stage, drops its lock set, which unlocks in the
/// background. The next start comes after that, as it would after a real crash.
async fn until_freed(dir: &Backing, keys: &[crate::locks::LockKey]) {
    let locks = dir.locks().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(held) = locks.try_lock(keys).await.unwrap() {
            held.release().await;
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the crashed service's locks were never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Two volumes on `mem`, one on `mem2`.
async fn three_volumes(svc: &Service) -> Vec<VolumeId> {
    let mut out = Vec::new();
    for backend in ["mem", "mem", "mem2"] {
        out.push(
            svc.create_volume(CreateVolume {
                size_bytes: Some(1 << 20),
                backend: Some(backend.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .id,
        );
    }
    out
}

/// The journal's multi-volume unit: a parent over 3 volumes on 2 backends is aborted after
/// 2 of its children reached the backend (the third hangs inside its driver call; the task
/// is then killed, as a crash would). The next start — a new service on the same store and
/// lock directory — resolves the whole group by the parent's rule (roll back): both made
/// snapshots are deleted from their backend, every record is removed, no journal entry or
/// transitional status is left.
#[tokio::test]
async fn an_aborted_group_over_two_backends_is_rolled_back_as_one_unit_by_the_next_start() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let first = Arc::new(two_backend_service(&store, &a, &b, &dir).await);
    let vols = three_volumes(&first).await;
    b.hang.lock().unwrap().push(vols[2]);
    let task = {
        let svc = first.clone();
        let vols = vols.clone();
        tokio::spawn(async move { svc.create_group_snapshot(&vols, None, false).await })
    };
    b.entered.notified().await;
    // Wait until both members on `mem` are made (they run concurrently with `mem2`).
    while a.snapshots.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(first);
    until_freed(&dir, &vols.iter().map(|v| (*v).into()).collect::<Vec<_>>()).await;

    let ops = store.operations().unwrap();
    let parent = ops.iter().find(|o| o.kind == "group_snapshot").unwrap();
    let children: Vec<_> = ops.iter().filter(|o| o.parent == Some(parent.id)).collect();
    assert_eq!(children.len(), 3, "{ops:?}");
    assert_eq!(store.snapshots(None).unwrap().len(), 3);
    assert_eq!(a.snapshots.lock().unwrap().len(), 2);

    b.hang.lock().unwrap().clear();
    let next = two_backend_service(&store, &a, &b, &dir).await;
    let actions = next.recover().await.unwrap();
    assert_eq!(
        actions.len(),
        1,
        "one unit, not one action per child: {actions:?}"
    );
    assert_eq!(actions[0].children.len(), 3);
    let outcome = &actions[0].outcome;
    assert!(outcome.contains("rolled back"), "{outcome}");
    assert_eq!(outcome.matches("made, deleted").count(), 2, "{outcome}");
    assert_eq!(outcome.matches("not made").count(), 1, "{outcome}");
    assert!(a.snapshots.lock().unwrap().is_empty());
    assert!(b.snapshots.lock().unwrap().is_empty());
    assert!(store.snapshots(None).unwrap().is_empty());
    assert!(store.operations().unwrap().is_empty());
    for id in vols {
        assert_eq!(
            next.volume(id).await.unwrap().status,
            VolumeStatus::Available
        );
    }
    assert!(next.recover().await.unwrap().is_empty());
}

// ---- instances and images (the orchestrator's core logic; real agents and backends are
// exercised end to end in tests/instance.rs) ----

use crate::agent::{FreezeRequest, Frozen, GuestAgents, Thawed};
use crate::ops::image_restore::RestoreRequest;
use crate::ops::instance_snapshot::{InstanceSnapshotRequest, Quiesce};

/// A stand-in agent for the orchestrator's logic: records freezes and thaws; can be down,
/// or report that its deadline passed before the thaw.
#[derive(Default)]
struct FakeAgents {
    log: std::sync::Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
    deadline_passes: std::sync::atomic::AtomicBool,
    frozen: std::sync::atomic::AtomicBool,
}

struct FakeFrozen(Arc<FakeAgents>);

#[async_trait::async_trait]
impl Frozen for FakeFrozen {
    fn count(&self) -> u64 {
        1
    }
    fn freeze_ms(&self) -> f64 {
        0.5
    }
    async fn thaw(self: Box<Self>) -> Result<Thawed> {
        self.0.log.lock().unwrap().push("thaw".into());
        self.0
            .frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(Thawed {
            by_deadline: self
                .0
                .deadline_passes
                .load(std::sync::atomic::Ordering::SeqCst),
            window_ms: 1.0,
            thaw_ms: 0.25,
        })
    }
}

struct AgentsHandle(Arc<FakeAgents>);

#[async_trait::async_trait]
impl GuestAgents for AgentsHandle {
    async fn freeze(&self, req: FreezeRequest) -> Result<Box<dyn Frozen>> {
        if self.0.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable("guest agent", "not answering"));
        }
        self.0
            .log
            .lock()
            .unwrap()
            .push(format!("freeze {}", req.agent));
        self.0
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(FakeFrozen(self.0.clone())))
    }
    async fn thaw_if_frozen(&self, agent: &str, _timeout: std::time::Duration) -> Result<bool> {
        self.0.log.lock().unwrap().push(format!("check {agent}"));
        Ok(self
            .0
            .frozen
            .swap(false, std::sync::atomic::Ordering::SeqCst))
    }
}

fn snap_req(instance: InstanceId, quiesce: Quiesce) -> InstanceSnapshotRequest {
    InstanceSnapshotRequest {
        owner: None,
        instance,
        name: "nightly".into(),
        quiesce,
        freeze_timeout: std::time::Duration::from_secs(10),
        properties: [("os_distro".to_string(), "debian".to_string())].into(),
    }
}

/// Three volumes (two backends) attached to a new instance with an agent: vda boot 0, vdb, vdc.
async fn instance_with_volumes(svc: &Service) -> (InstanceId, Vec<VolumeId>) {
    let inst = svc
        .create_instance(crate::service::InstanceSpec {
            project: None,
            agent: Some("/run/agent.sock".into()),
            properties: [("hw_disk_bus".to_string(), "virtio".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let vols = three_volumes(svc).await;
    for (i, v) in vols.iter().enumerate() {
        let mut a = Attachment::new(inst.id, format!("/dev/vd{}", ["a", "b", "c"][i]));
        a.boot_index = (i == 0).then_some(0);
        svc.attach(*v, a).await.unwrap();
    }
    (inst.id, vols)
}

#[tokio::test]
async fn an_instance_snapshot_freezes_snapshots_every_volume_thaws_and_records_a_nova_image() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let agents = Arc::new(FakeAgents::default());
    let svc = two_backend_service(&store, &a, &b, &dir)
        .await
        .with_agents(Arc::new(AgentsHandle(agents.clone())));
    let (inst, vols) = instance_with_volumes(&svc).await;
    let r = svc
        .snapshot_instance(snap_req(inst, Quiesce::Auto))
        .await
        .unwrap();
    let img = r.image;
    assert_eq!(
        *agents.log.lock().unwrap(),
        vec!["freeze /run/agent.sock", "thaw"]
    );
    assert_eq!(r.window_ms, Some(1.0));
    assert_eq!(img.consistency, Consistency::Quiesced);
    assert_eq!(img.snapshots.len(), 3);
    assert_eq!(img.properties["kiln_consistency"], "quiesced");
    assert_eq!(img.properties["os_distro"], "debian");
    assert_eq!(
        img.properties["hw_disk_bus"], "virtio",
        "inherited from the instance"
    );
    assert_eq!(img.properties["bdm_v2"], "True");
    assert_eq!(img.properties["root_device_name"], "/dev/vda");
    let bdm = crate::instance::image_bdm(&img).unwrap();
    assert_eq!(bdm.len(), 3);
    assert_eq!(bdm[0]["device_name"], "/dev/vda");
    assert_eq!(bdm[0]["boot_index"], 0);
    assert!(bdm[1]["boot_index"].is_null());
    for s in &img.snapshots {
        let s = svc.snapshot(*s).await.unwrap();
        assert_eq!(s.status, SnapshotStatus::Available);
        assert_eq!(s.image_id, Some(img.id));
        assert_eq!(s.consistency, Some(Consistency::Quiesced));
        assert!(s.forced, "taken of an attached volume");
        assert!(vols.contains(&s.volume_id));
    }
    // A snapshot an image lists cannot be deleted on its own.
    let e = svc
        .delete_snapshot(img.snapshots[0], false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains(&img.id.to_string()), "{e}");
    assert!(store.operations().unwrap().is_empty());
}

#[tokio::test]
async fn an_instance_snapshot_is_all_or_nothing_and_thaws_on_failure_and_on_a_passed_deadline() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let agents = Arc::new(FakeAgents::default());
    let svc = two_backend_service(&store, &a, &b, &dir)
        .await
        .with_agents(Arc::new(AgentsHandle(agents.clone())));
    let (inst, vols) = instance_with_volumes(&svc).await;
    let before = dump(&store);
    // One member fails: the error names its volume and backend; the guest was thawed.
    *b.fail_next.lock().unwrap() = Some("create_snapshot");
    let e = svc
        .snapshot_instance(snap_req(inst, Quiesce::Required))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&vols[2].to_string()) && e.to_string().contains("mem2"),
        "{e}"
    );
    assert_eq!(agents.log.lock().unwrap().last().unwrap(), "thaw");
    assert!(a.snapshots.lock().unwrap().is_empty() && b.snapshots.lock().unwrap().is_empty());
    assert_eq!(dump(&store), before, "nothing recorded");
    // The freeze deadline passed before the thaw: not consistent, rolled back.
    agents
        .deadline_passes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = svc
        .snapshot_instance(snap_req(inst, Quiesce::Required))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("deadline"), "{e}");
    assert!(a.snapshots.lock().unwrap().is_empty() && b.snapshots.lock().unwrap().is_empty());
    assert_eq!(dump(&store), before);
    // The agent is down: `required` fails with nothing changed, `auto` goes crash-consistent.
    agents
        .deadline_passes
        .store(false, std::sync::atomic::Ordering::SeqCst);
    agents.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = svc
        .snapshot_instance(snap_req(inst, Quiesce::Required))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(dump(&store), before);
    let r = svc
        .snapshot_instance(snap_req(inst, Quiesce::Auto))
        .await
        .unwrap();
    let img = r.image;
    assert_eq!(r.window_ms, None);
    assert_eq!(img.consistency, Consistency::CrashConsistent);
    let img2 = svc
        .snapshot_instance(snap_req(inst, Quiesce::Off))
        .await
        .unwrap()
        .image;
    assert_eq!(img2.consistency, Consistency::CrashConsistent);
}

/// Every table, every column (timestamps included): "nothing changed" means this is equal.
fn dump(store: &Arc<dyn Store>) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        store.volumes().unwrap(),
        store.snapshots(None).unwrap(),
        store.instances().unwrap(),
        store.images().unwrap(),
        store.operations().unwrap()
    )
}

#[tokio::test]
async fn bad_instance_input_is_refused_and_changes_nothing() {
    let f = fixture().await;
    let v = volume(&f).await;
    let inst = f
        .svc
        .create_instance(crate::service::InstanceSpec::default())
        .await
        .unwrap();
    f.svc
        .attach(v.id, Attachment::new(inst.id, "/dev/vda"))
        .await
        .unwrap();
    let empty = f
        .svc
        .create_instance(crate::service::InstanceSpec::default())
        .await
        .unwrap();
    let before = dump(&f.store);
    let mut long = snap_req(inst.id, Quiesce::Off);
    long.freeze_timeout = std::time::Duration::from_secs(3600);
    let mut zero = snap_req(inst.id, Quiesce::Off);
    zero.freeze_timeout = std::time::Duration::ZERO;
    let mut reserved = snap_req(inst.id, Quiesce::Off);
    reserved
        .properties
        .insert("block_device_mapping".into(), "[]".into());
    let mut shell = snap_req(inst.id, Quiesce::Off);
    shell.name = "$(rm -rf /)".into();
    for (req, kind) in [
        (
            snap_req(InstanceId::new(), Quiesce::Off),
            ErrorKind::NotFound,
        ),
        (snap_req(empty.id, Quiesce::Off), ErrorKind::InvalidInput),
        (long, ErrorKind::InvalidInput),
        (zero, ErrorKind::InvalidInput),
        (reserved, ErrorKind::InvalidInput),
        (shell, ErrorKind::InvalidInput),
        // No agent: `required` cannot be met.
        (snap_req(inst.id, Quiesce::Required), ErrorKind::WrongState),
    ] {
        let e = f.svc.snapshot_instance(req).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(!e.to_string().contains('\n'));
    }
    // A second volume at a taken device, an attached volume attached again, an agent path
    // that is relative, an instance with volumes deleted, an image id that is a snapshot id.
    let w = volume(&f).await;
    let before_w = dump(&f.store);
    let e = f
        .svc
        .attach(w.id, Attachment::new(inst.id, "/dev/vda"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    let e = f
        .svc
        .attach(v.id, Attachment::new(empty.id, "/dev/vdb"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    let e = f
        .svc
        .create_instance(crate::service::InstanceSpec {
            project: None,
            agent: Some("../agent.sock".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = f.svc.delete_instance(inst.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    let s = f.svc.create_snapshot(w.id, None, false).await.unwrap();
    let e = f.svc.image(ImageId(s.id.0)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = f
        .svc
        .restore_image(RestoreRequest {
            image: ImageId(s.id.0),
            instance: None,
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    f.svc.delete_snapshot(s.id, false).await.unwrap();
    assert_eq!(dump(&f.store), before_w);
    f.svc.delete_volume(w.id, false).await.unwrap();
    assert_eq!(dump(&f.store), before);
}

#[tokio::test]
async fn an_image_restores_every_volume_with_its_data_and_deletes_with_its_snapshots() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let svc = two_backend_service(&store, &a, &b, &dir).await;
    let (inst, vols) = instance_with_volumes(&svc).await;
    a.write(vols[0], b"root disk");
    a.write(vols[1], b"data disk");
    b.write(vols[2], b"logs disk");
    let img = svc
        .snapshot_instance(snap_req(inst, Quiesce::Auto))
        .await
        .unwrap()
        .image;
    assert_eq!(
        img.consistency,
        Consistency::CrashConsistent,
        "no agent access"
    );
    a.write(vols[0], b"changed!!");
    // All or nothing: one clone fails, nothing is left.
    let before = dump(&store);
    *b.fail_next.lock().unwrap() = Some("create_volume_from_snapshot");
    let e = svc
        .restore_image(RestoreRequest {
            image: img.id,
            instance: None,
            name: Some("restored".into()),
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("mem2"), "{e}");
    assert_eq!(dump(&store), before);
    let (ri, rvols) = svc
        .restore_image(RestoreRequest {
            image: img.id,
            instance: None,
            name: Some("restored".into()),
        })
        .await
        .unwrap();
    assert_ne!(ri.id, inst);
    assert_eq!(ri.properties["hw_disk_bus"], "virtio");
    assert!(!ri.properties.contains_key("block_device_mapping"));
    assert_eq!(rvols.len(), 3);
    let want = [
        ("/dev/vda", Some(0), &b"root disk"[..]),
        ("/dev/vdb", None, b"data disk"),
        ("/dev/vdc", None, b"logs disk"),
    ];
    for (dev, boot, data) in want {
        let v = rvols
            .iter()
            .find(|v| v.attachments[0].device == dev)
            .unwrap();
        assert_eq!(v.status, VolumeStatus::InUse);
        assert_eq!(v.attachments[0].instance_id, ri.id);
        assert_eq!(v.attachments[0].boot_index, boot);
        let d = if v.backend == "mem" {
            a.data(v.id)
        } else {
            b.data(v.id)
        };
        assert_eq!(&d.unwrap()[..data.len()], data, "{dev}");
    }
    // Restoring onto an instance that has those devices taken is refused.
    let e = svc
        .restore_image(RestoreRequest {
            image: img.id,
            instance: Some(ri.id),
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    // Deleting the image deletes its snapshots (the restored volumes are full clones on
    // the fake driver, so nothing depends on them).
    let r = svc.delete_image(img.id, false).await.unwrap();
    assert_eq!(r.snapshots_deleted.len(), 3);
    assert!(svc.images().await.unwrap().is_empty());
    for s in &img.snapshots {
        assert_eq!(
            svc.snapshot(*s).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    // --keep-snapshots releases them instead.
    let img = svc
        .snapshot_instance(snap_req(inst, Quiesce::Off))
        .await
        .unwrap()
        .image;
    let r = svc.delete_image(img.id, true).await.unwrap();
    assert_eq!(r.snapshots_kept.len(), 3);
    for s in &img.snapshots {
        let s = svc.snapshot(*s).await.unwrap();
        assert_eq!(s.image_id, None);
        svc.delete_snapshot(s.id, false).await.unwrap();
    }
}

/// A crash in the middle of an instance snapshot (the task is killed while the third
/// member hangs inside the backend, the guest frozen): the next start thaws the guest and
/// rolls every member back; no image is recorded.
#[tokio::test]
async fn an_interrupted_instance_snapshot_is_thawed_and_rolled_back_by_the_next_start() {
    let TwoBackends { dir, store, a, b } = two_backends();
    let agents = Arc::new(FakeAgents::default());
    let first = Arc::new(
        two_backend_service(&store, &a, &b, &dir)
            .await
            .with_agents(Arc::new(AgentsHandle(agents.clone()))),
    );
    let (inst, vols) = instance_with_volumes(&first).await;
    b.hang.lock().unwrap().push(vols[2]);
    let task = {
        let svc = first.clone();
        tokio::spawn(async move {
            svc.snapshot_instance(snap_req(inst, Quiesce::Required))
                .await
        })
    };
    b.entered.notified().await;
    while a.snapshots.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(first);
    let mut keys: Vec<crate::locks::LockKey> = vols.iter().map(|v| (*v).into()).collect();
    keys.push(crate::locks::LockKey::Instance(inst));
    until_freed(&dir, &keys).await;
    assert!(
        agents.frozen.load(std::sync::atomic::Ordering::SeqCst),
        "left frozen by the crash"
    );

    b.hang.lock().unwrap().clear();
    let next = two_backend_service(&store, &a, &b, &dir)
        .await
        .with_agents(Arc::new(AgentsHandle(agents.clone())));
    let actions = next.recover().await.unwrap();
    assert_eq!(actions.len(), 1, "{actions:?}");
    let outcome = &actions[0].outcome;
    assert!(
        outcome.contains("thawed") && outcome.contains("no image"),
        "{outcome}"
    );
    assert_eq!(outcome.matches("made, deleted").count(), 2, "{outcome}");
    assert!(!agents.frozen.load(std::sync::atomic::Ordering::SeqCst));
    assert!(a.snapshots.lock().unwrap().is_empty() && b.snapshots.lock().unwrap().is_empty());
    assert!(store.snapshots(None).unwrap().is_empty());
    assert!(store.images().unwrap().is_empty());
    assert!(store.operations().unwrap().is_empty());
}

/// Found in review: a thick LVM revert that overflowed another snapshot returned an error,
/// so the volume was marked `error` although its data was reverted. Now the outcome names
/// the invalidated snapshots: the volume is `available`, the chosen snapshot too, and each
/// invalidated one is `error` with the backend's reason.
#[tokio::test]
async fn a_revert_that_invalidates_another_snapshot_marks_that_one_error_not_the_volume() {
    let f = fixture().await;
    let v = volume(&f).await;
    let s1 = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    let s2 = f.svc.create_snapshot(v.id, None, false).await.unwrap();
    f.fake.invalidate_on_revert.lock().unwrap().push(s2.id);
    let after = f
        .svc
        .revert(s1.id, crate::progress::no_progress())
        .await
        .unwrap();
    assert_eq!(after.status, VolumeStatus::Available);
    assert_eq!(after.status_reason, None);
    assert_eq!(
        f.svc.snapshot(s1.id).await.unwrap().status,
        SnapshotStatus::Available
    );
    let s2 = f.svc.snapshot(s2.id).await.unwrap();
    assert_eq!(s2.status, SnapshotStatus::Error);
    assert!(
        s2.status_reason
            .as_deref()
            .is_some_and(|r| r.contains("overflowed")),
        "{s2:?}"
    );
    assert!(f.store.operations().unwrap().is_empty());
}

/// A service on a fresh PostgreSQL database with one volume and one snapshot of it.
async fn postgres_snapshot() -> (Backing, Arc<dyn Store>, Service, Volume, Snapshot) {
    let backing = Backing::postgres();
    let store = backing.store();
    let fake = Arc::new(FakeDriver::default());
    let svc = service(&backing, &store, &fake).await;
    let v = svc
        .create_volume(CreateVolume {
            size_bytes: Some(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = svc.create_snapshot(v.id, None, false).await.unwrap();
    (backing, store, svc, v, s)
}

/// On a shared store a free lock does not prove its owner dead (a PostgreSQL restart ends
/// every node's sessions): recovery leaves a journaled operation alone while its owner's
/// heartbeat is fresh, and takes it over once the heartbeat is older than the node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_a_live_nodes_operation_alone_and_takes_over_a_dead_ones() {
    let (backing, store, svc, v, s) = postgres_snapshot().await;
    let store2 = store.clone();
    off_runtime(move || {
        store2
            .commit(Batch::with_op(
                vec![Step::SetSnapshotStatus {
                    id: s.id,
                    from: vec![],
                    to: SnapshotStatus::Deleting,
                    reason: None,
                }],
                NewOp::of("delete_snapshot", v.id, Some(s.id)),
            ))
            .unwrap()
            .unwrap()
    });
    // The entry now belongs to node b, alive: its lock is free (b's session is gone, as
    // after a server restart), but b's heartbeat is fresh.
    let url = backing.postgres.as_ref().unwrap().url.clone();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "UPDATE operations SET owner = 'b:1:alive';
             INSERT INTO kiln_nodes (incarnation, node, pid) VALUES ('b:1:alive', 'b', 1);",
        )
        .await
        .unwrap();
    assert!(svc.recover().await.unwrap().is_empty());
    assert_eq!(
        svc.snapshot(s.id).await.unwrap().status,
        SnapshotStatus::Deleting
    );
    // b stops: its heartbeat ages past the node timeout.
    client
        .batch_execute("UPDATE kiln_nodes SET heartbeat_at = now() - interval '1 minute' WHERE incarnation = 'b:1:alive'")
        .await
        .unwrap();
    let done = svc.recover().await.unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].operation.owner.as_deref(), Some("b:1:alive"));
    let store3 = store.clone();
    assert!(off_runtime(move || store3.snapshot(s.id).unwrap()).is_none());
}

/// A snapshot reader holds its volume's lock; on PostgreSQL that lock is a session, which
/// the server can end under a live node (a restart, `pg_terminate_backend`). The reader
/// then stops with an error instead of reading on unprotected from another node's change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reader_stops_once_its_lock_session_ends() {
    let (backing, _store, svc, v, s) = postgres_snapshot().await;
    let mut reader = svc.open_snapshot_reader(s.id).await.unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read_at(0, &mut buf).unwrap();
    let url = backing.postgres.as_ref().unwrap().url.clone();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ended: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND objid = ($1::bigint & 4294967295)::oid AND classid = ($1::bigint >> 32)::oid AND granted",
            &[&crate::locks::advisory_id(v.id.into())],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "the reader's lock session was not found");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        match reader.read_at(0, &mut buf) {
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the reader never noticed its lost lock"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(e.to_string().contains("lock was lost"), "{e}");
}

/// An image delete takes every lock it needs (its instance and its snapshots' volumes) in
/// one set: with a single PostgreSQL lock session it still runs, where a second set taken
/// while the first was held would wait forever for a session of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_delete_needs_one_lock_session() {
    let backing = Backing::postgres();
    let store = backing.store();
    let fake = Arc::new(FakeDriver::default());
    let mut backends = Backends::new("mem");
    backends.add_driver("mem", "fake", fake.clone());
    backends.add_driver("mem2", "fake", Arc::new(FakeDriver::default()));
    let liveness = crate::locks::Liveness {
        fence: false,
        ..Default::default()
    };
    let locks = Arc::new(
        PgLocks::connect(backing.postgres.as_ref().unwrap(), 1, liveness)
            .await
            .unwrap(),
    );
    let svc = Service::new(store.clone(), backends, locks).unwrap();
    let (inst, _vols) = instance_with_volumes(&svc).await;
    let img = svc
        .snapshot_instance(snap_req(inst, Quiesce::Off))
        .await
        .unwrap()
        .image;
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        svc.delete_image(img.id, false),
    )
    .await
    .expect("the image delete waited for a second lock session")
    .unwrap();
    assert_eq!(r.snapshots_deleted.len(), img.snapshots.len());
    assert!(svc.images().await.unwrap().is_empty());
}
