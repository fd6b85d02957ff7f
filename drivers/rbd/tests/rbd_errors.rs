//! Failure paths: unreachable cluster, missing pool, the kinds of refusals on unknown
//! objects, force snapshots without exclusive-lock, deleting an open volume, against the
//! real cluster. (Idempotent deletes, lookups, and refusals that change nothing are the
//! contract suite's.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_core::{DeleteAction, ErrorKind, VolumeDriver, no_progress};
use kiln_driver_rbd::RbdConfig;

#[tokio::test]
async fn unreachable_cluster_fails_clearly_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\nms bind ipv6 = false\nlog file = {}/client.log\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let cfg = RbdConfig {
        ceph_conf: conf,
        connect_timeout_secs: 2,
        ..RbdConfig::default()
    };
    let t = Instant::now();
    let e = kiln_driver_rbd::open("down", cfg).await.unwrap_err();
    let elapsed = t.elapsed();
    eprintln!("unreachable cluster after {elapsed:?}: {e}");
    assert!(
        elapsed < Duration::from_secs(5),
        "took {elapsed:?}, timeout was 2 s"
    );
    // Unreachable, not missing: recovery keeps an operation journaled and retries it later
    // instead of deciding that the backend object does not exist.
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("\"down\""), "names the backend: {msg}");
    assert!(msg.contains("cluster"), "says what failed: {msg}");
}

#[tokio::test]
async fn missing_pool_and_bad_config_are_config_errors() {
    let e = kiln_driver_rbd::open(
        "b",
        RbdConfig {
            pool: "no-such-pool".into(),
            ..config()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("no-such-pool"), "{e}");

    let e = kiln_driver_rbd::open(
        "b",
        RbdConfig {
            ceph_conf: "/nonexistent/ceph.conf".into(),
            ..RbdConfig::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// What the contract suite (refused_calls_change_nothing,
/// deletes_are_idempotent_and_say_what_they_did, lookups_agree_with_creates) does not
/// check: the kind of each refusal, and the answers for a snapshot whose volume image does
/// not exist at all.
#[tokio::test]
async fn unknown_objects_are_idempotent_or_not_found() {
    let d = driver().await;
    // No volume image for these records: the snapshot is missing with its image.
    let ghost_v = volume(SIZE);
    let ghost_s = snapshot(&ghost_v);
    assert!(!snapshot_exists(&d, &ghost_s).await);
    assert_eq!(
        d.delete_snapshot(&ghost_s).await.unwrap(),
        DeleteAction::AlreadyGone
    );
    let e = d
        .open_snapshot_reader(&ghost_s)
        .await
        .err()
        .expect("reader on a missing snapshot");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = d.create_snapshot(&ghost_s, &ghost_v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = d.flatten_volume(&ghost_v, no_progress()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = bench(&d, &ghost_v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // An existing volume without that snapshot.
    let v = create_volume(&d, SIZE).await;
    let missing = snapshot(&v);
    let e = d
        .open_snapshot_reader(&missing)
        .await
        .err()
        .expect("reader on a missing snapshot");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = d
        .revert_to_snapshot(&v, &missing, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let clone = volume(SIZE);
    let e = d
        .create_volume_from_snapshot(&clone, &missing, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}

#[tokio::test]
async fn force_snapshot_without_exclusive_lock_and_delete_of_an_open_volume_are_refused() {
    let d = driver().await;
    // An image made outside kiln with layering only: no lock owner to quiesce writes.
    let v = volume(SIZE);
    let name = kiln_driver_rbd::volume_image(&v.id);
    rbd_cli(&[
        "create",
        "--size",
        "64M",
        "--image-feature",
        "layering",
        &format!("rbd/{name}"),
    ]);
    let s = snapshot(&v);
    let e = d
        .create_snapshot_force(&s, &v, &attachment())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("exclusive-lock"), "{e}");
    assert!(!snapshot_exists(&d, &s).await, "nothing was created");
    // A plain snapshot of it (nobody writing) is fine.
    d.create_snapshot(&s, &v).await.unwrap();
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);

    // While another client has the image open (a watch on its header), delete is Busy.
    let c = std::sync::Arc::clone(d.cluster());
    let n2 = name.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let img = kiln_driver_rbd::image::Image::open(&c, &n2, None).unwrap();
        opened_tx.send(()).unwrap();
        rx.recv().unwrap();
        drop(img);
    });
    opened_rx.recv().unwrap();
    let e = d.delete_volume(&v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(volume_exists(&d, &v).await);
    tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
    assert!(!volume_exists(&d, &v).await);
}
