//! Data integrity of what the file backend does beyond the driver contract suite
//! (`tests/contract.rs` runs that on the same three modes: point-in-time data, revert to any
//! snapshot keeping the others, idempotent deletes and lookups, clone independence, reader
//! extents, refused calls), in raw mode (real loop-mounted XFS, reflink), qcow2 mode (real
//! qemu-img) and raw full-copy mode: re-runs after a crash, clone sizes and progress, qcow2
//! chains (three-deep reverts, deletes of middle, base and branched snapshots), what a delete
//! leaves in the directory, bench and stats; every result compared byte for byte with a
//! model of what was written.

mod common;

use common::{Env, MIB, Vol, check_snapshot, listing, snapshot};
use kiln_core::{DeleteAction, ErrorKind, VolumeDriver, no_progress};
use kiln_driver_file::{MAX_CHAIN_DEPTH, Mode};

const SIZE: u64 = 32 * MIB;

/// A progress sink that remembers what it was told.
#[derive(Default)]
struct Recorder {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl kiln_core::Progress for Recorder {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, SeqCst);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, SeqCst);
    }
}

use std::sync::atomic::Ordering::SeqCst;

/// Runs each scenario against raw (XFS) and qcow2 backends, as two tests.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod raw {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Env::raw().await).await })*
        }
        mod qcow2 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Env::qcow2().await).await })*
        }
    };
}

both_modes!(
    reruns_change_nothing,
    clone_sizes_and_progress,
    revert_to_oldest_of_three,
    delete_middle_then_base_snapshot,
    delete_with_branches,
    revert_then_delete,
    deleting_everything_leaves_only_the_marker,
    bench_and_stats,
);

/// Full-copy mode shares every code path with raw+reflink except the copy itself, so it runs
/// the scenarios that copy (re-runs of snapshot and revert, clones), what deletes leave, and
/// bench.
mod full_copy {
    macro_rules! full_copy {
        ($($name:ident),* $(,)?) => {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Env::raw_full_copy().await).await })*
        };
    }
    full_copy!(
        reruns_change_nothing,
        clone_sizes_and_progress,
        deleting_everything_leaves_only_the_marker,
        bench_and_stats,
    );
}

/// What the service relies on after a crash: re-running a create, a snapshot or a revert
/// returns the same result and changes no data (the contract suite runs each call once).
/// Also file-specific refusals: a revert to another volume's snapshot; and writes after a
/// revert reach no snapshot.
async fn reruns_change_nothing(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    let again = d.create_volume(&vol.v).await.unwrap();
    assert_eq!(d.lookup_volume(&vol.v).await.unwrap(), Some(again));
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    vol.write(&env, 25 * MIB, 4096, 3).await;
    // The same snapshot again, after more writes: still the first instant, volume untouched.
    let up = d.create_snapshot(&s1, &vol.v).await.unwrap();
    assert_eq!(d.lookup_snapshot(&s1).await.unwrap(), Some(up));
    check_snapshot(d, &s1, &d1).await;
    vol.check(&env).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.write(&env, 9 * MIB, 8192, 4).await;
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1.clone();
    vol.check(&env).await;
    // A re-run (the service retries an interrupted revert) gives the same result.
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.check(&env).await;
    check_snapshot(d, &s1, &d1).await;
    check_snapshot(d, &s2, &d2).await;
    // Writing after the revert changes neither snapshot.
    vol.write(&env, 0, 4096, 5).await;
    vol.check(&env).await;
    check_snapshot(d, &s1, &d1).await;
    check_snapshot(d, &s2, &d2).await;
    // A snapshot of another volume is refused.
    let other = Vol::create(&env, SIZE).await;
    let e = d
        .revert_to_snapshot(&other.v, &s1, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    other.check(&env).await;
    vol.check(&env).await;
}

/// Clone specifics the contract suite does not cover (it clones at the same size and checks
/// independence): progress ends complete, a larger clone reads zeros past the snapshot's
/// end and takes writes there, a smaller one is refused, and a clone snapshots like any
/// volume.
async fn clone_sizes_and_progress(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s, at_snap) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    // Same size.
    let same = Vol {
        v: common::volume(SIZE),
        img: at_snap.clone(),
    };
    let progress = std::sync::Arc::new(Recorder::default());
    let up = d
        .create_volume_from_snapshot(&same.v, &s, progress.clone())
        .await
        .unwrap();
    assert!(up.provider_location.is_some());
    same.check(&env).await;
    let (total, done) = (progress.total.load(SeqCst), progress.done.load(SeqCst));
    assert_eq!((total, done), (SIZE, SIZE), "progress must end complete");
    // Larger: the tail reads as zeros.
    let mut big = Vol {
        v: common::volume(SIZE + 8 * MIB),
        img: at_snap.clone(),
    };
    big.img.resize((SIZE + 8 * MIB) as usize, 0);
    d.create_volume_from_snapshot(&big.v, &s, no_progress())
        .await
        .unwrap();
    big.check(&env).await;
    // Smaller is refused.
    let small = common::volume(SIZE - MIB);
    let e = d
        .create_volume_from_snapshot(&small, &s, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(d.lookup_volume(&small).await.unwrap(), None);
    // The grown tail takes writes like the rest.
    big.write(&env, SIZE + MIB, 4096, 7).await;
    big.check(&env).await;
    check_snapshot(d, &s, &at_snap).await;
    // Snapshot of a clone works like any other.
    let (s2, d2) = big.snap(&env).await;
    check_snapshot(d, &s2, &d2).await;
}

async fn revert_to_oldest_of_three(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.write(&env, 20 * MIB, 2 * MIB as usize, 3).await;
    let (s3, d3) = vol.snap(&env).await;
    vol.write(&env, 21 * MIB, 4096, 4).await;
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1.clone();
    vol.check(&env).await;
    check_snapshot(d, &s1, &d1).await;
    check_snapshot(d, &s2, &d2).await;
    check_snapshot(d, &s3, &d3).await;
    // Continue on the new branch, snapshot it, and go back to the newest of the old branch.
    vol.write(&env, 26 * MIB, 4096, 5).await;
    let (s4, d4) = vol.snap(&env).await;
    d.revert_to_snapshot(&vol.v, &s3, no_progress())
        .await
        .unwrap();
    vol.img = d3.clone();
    vol.check(&env).await;
    for (s, want) in [(&s1, &d1), (&s2, &d2), (&s3, &d3), (&s4, &d4)] {
        check_snapshot(d, s, want).await;
    }
}

async fn delete_middle_then_base_snapshot(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, _d2) = vol.snap(&env).await;
    vol.write(&env, 5 * MIB, 4096, 3).await;
    let (s3, d3) = vol.snap(&env).await;
    vol.write(&env, 17 * MIB + 8192, 4096, 4).await;
    // Middle: its data (seen by s3 and the volume) must survive in the children.
    d.delete_snapshot(&s2).await.unwrap();
    assert!(d.lookup_snapshot(&s2).await.unwrap().is_none());
    check_snapshot(d, &s1, &d1).await;
    check_snapshot(d, &s3, &d3).await;
    vol.check(&env).await;
    // Base.
    d.delete_snapshot(&s1).await.unwrap();
    assert!(d.lookup_snapshot(&s1).await.unwrap().is_none());
    check_snapshot(d, &s3, &d3).await;
    vol.check(&env).await;
    // The last one: the volume stands alone.
    d.delete_snapshot(&s3).await.unwrap();
    vol.check(&env).await;
    vol.write(&env, 0, 4096, 9).await;
    vol.check(&env).await;
    let (s4, d4) = vol.snap(&env).await;
    check_snapshot(d, &s4, &d4).await;
}

/// Snapshots on two branches (after a revert) share the base: deleting the base must keep
/// both branches intact.
async fn delete_with_branches(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1;
    vol.write(&env, 23 * MIB, 70_000, 3).await;
    let (s3, d3) = vol.snap(&env).await;
    vol.write(&env, 24 * MIB, 4096, 4).await;
    d.delete_snapshot(&s1).await.unwrap();
    check_snapshot(d, &s2, &d2).await;
    check_snapshot(d, &s3, &d3).await;
    vol.check(&env).await;
    d.delete_snapshot(&s3).await.unwrap();
    check_snapshot(d, &s2, &d2).await;
    vol.check(&env).await;
}

async fn revert_then_delete(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.scatter(&env, 3).await;
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1.clone();
    // Delete the snapshot just reverted to: the volume keeps its data.
    d.delete_snapshot(&s1).await.unwrap();
    vol.check(&env).await;
    check_snapshot(d, &s2, &d2).await;
    d.revert_to_snapshot(&vol.v, &s2, no_progress())
        .await
        .unwrap();
    vol.img = d2.clone();
    d.delete_snapshot(&s2).await.unwrap();
    vol.check(&env).await;
    // Reverting to a deleted snapshot is a clear not-found.
    let e = d
        .revert_to_snapshot(&vol.v, &s2, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// What deletes leave in the backend directory: nothing but the format marker (and, raw, the
/// lock directory). In qcow2 mode a volume whose chain holds snapshots cannot go first:
/// `Busy`, naming them, volume intact. A snapshot of a deleted volume is `NotFound`.
async fn deleting_everything_leaves_only_the_marker(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.write(&env, 0, 4096, 1).await;
    let (s, d1) = vol.snap(&env).await;
    if d.mode() == Mode::Qcow2 {
        let e = d.delete_volume(&vol.v).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
        assert_eq!(e.dependents(), [s.id.to_string()]);
        assert!(d.lookup_volume(&vol.v).await.unwrap().is_some());
        vol.check(&env).await;
        check_snapshot(d, &s, &d1).await;
    }
    assert_eq!(d.delete_snapshot(&s).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(
        d.delete_volume(&vol.v).await.unwrap(),
        DeleteAction::Deleted
    );
    let e = d
        .create_snapshot(&snapshot(&vol.v), &vol.v)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let left: Vec<String> = listing(d.path())
        .into_iter()
        .filter(|n| n != "kiln-file-backend.json" && n != ".locks")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

async fn bench_and_stats(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let before = listing(d.path());
    let bench = d.bench().expect("the file backend has a bench primitive");
    let v = vol.v.clone();
    let samples = tokio::task::spawn_blocking(move || bench.bench_primitives(&v))
        .await
        .unwrap()
        .unwrap();
    let (want, n) = match d.mode() {
        Mode::RawReflink => ("durable FICLONE", 2),
        Mode::RawFullCopy => ("durable sparse copy", 2),
        Mode::Qcow2 => ("qemu-img create", 1),
    };
    assert_eq!(samples.len(), n, "{samples:?}");
    assert!(samples[0].name.contains(want), "{:?}", samples[0].name);
    assert_eq!(listing(d.path()), before, "bench left something behind");
    if d.mode() == Mode::Qcow2 {
        let vdir = d.path().join(format!("volume-{}", vol.v.id));
        assert_eq!(listing(&vdir).len(), 2, "{:?}", listing(&vdir)); // chain.json + base
    }
    vol.check(&env).await;
    let st = d.stats().await.unwrap();
    let (total, free) = (st.total_bytes.unwrap(), st.free_bytes.unwrap());
    assert!(total > 0 && free > 0 && free <= total, "{st:?}");
    assert_eq!(st.details["mode"], serde_json::json!(d.mode().as_str()));
}

// ---------------------------------------------------------------------------------------
// qcow2-only behaviour: chain depth limit, leftovers of interrupted operations.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_chain_depth_is_bounded() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut vol = Vol::create(&env, 8 * MIB).await;
    vol.write(&env, 0, 4096, 1).await;
    let mut snaps = Vec::new();
    for _ in 1..MAX_CHAIN_DEPTH {
        snaps.push(
            d.create_snapshot(&snapshot(&vol.v), &vol.v)
                .await
                .map(|_| ()),
        );
    }
    assert!(snaps.iter().all(|r| r.is_ok()), "{snaps:?}");
    let e = d
        .create_snapshot(&snapshot(&vol.v), &vol.v)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains(&MAX_CHAIN_DEPTH.to_string()), "{e}");
    vol.check(&env).await;
}

/// Simulates crashes inside qcow2 operations by leaving on disk exactly what an interrupted
/// step leaves, then checks that the next run repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_interrupted_operations_complete_on_rerun() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.write(&env, 3 * MIB, 4096, 3).await;
    let vdir = d.path().join(format!("volume-{}", vol.v.id));
    let chain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap();

    // 1. A snapshot interrupted after its overlay was created, before the record: an
    //    unrecorded layer and a half-written record temp file.
    let stray = vdir.join(format!("layer-{}.qcow2", uuid_like()));
    duct::cmd!("qemu-img", "create", "-q", "-f", "qcow2", &stray, "1M")
        .run()
        .unwrap();
    std::fs::write(vdir.join(".chain.json.tmp"), b"{ half").unwrap();
    let (s3, d3) = vol.snap(&env).await;
    assert!(!stray.exists(), "stray layer not removed");
    assert!(!vdir.join(".chain.json.tmp").exists());

    // 2. A rebase-path delete of s1 (its intent carries no `commit_child`: recorded by a
    //    kiln from before the commit path) interrupted after it rebased the child onto
    //    nothing but before the record was updated: re-running the delete must finish it
    //    on the rebase path with the data intact.
    let s1_file = chain["snapshots"][s1.id.to_string()]["file"]
        .as_str()
        .unwrap()
        .to_string();
    let s2_file = chain["snapshots"][s2.id.to_string()]["file"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        chain["files"][&s2_file]["backing"].as_str(),
        Some(s1_file.as_str())
    );
    let mut pending: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap();
    pending["snapshots"][s1.id.to_string()]["deleting"] = serde_json::json!(true);
    std::fs::write(
        vdir.join("chain.json"),
        serde_json::to_vec(&pending).unwrap(),
    )
    .unwrap();
    duct::cmd!(
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", &s2_file
    )
    .dir(&vdir)
    .run()
    .unwrap();
    d.delete_snapshot(&s1).await.unwrap();
    assert!(!vdir.join(&s1_file).exists());
    check_snapshot(d, &s2, &d2).await;
    check_snapshot(d, &s3, &d3).await;
    vol.check(&env).await;
    let _ = d1;

    // A layer removed behind kiln's back makes the snapshots above it unhealthy.
    assert_eq!(d.snapshot_health(&s2).await.unwrap(), None);
    let s2_path = vdir.join(&s2_file);
    let saved = std::fs::read(&s2_path).unwrap();
    std::fs::remove_file(&s2_path).unwrap();
    let why = d
        .snapshot_health(&s3)
        .await
        .unwrap()
        .expect("missing layer not reported");
    assert!(why.contains(&s2_file), "{why}");
    std::fs::write(&s2_path, saved).unwrap();
    assert_eq!(d.snapshot_health(&s3).await.unwrap(), None);

    // 3. A delete interrupted after the record was committed but before the file was
    //    unlinked: the orphan goes at the next operation.
    let orphan = vdir.join(&s1_file);
    duct::cmd!("qemu-img", "create", "-q", "-f", "qcow2", &orphan, "1M")
        .run()
        .unwrap();
    d.revert_to_snapshot(&vol.v, &s2, no_progress())
        .await
        .unwrap();
    assert!(!orphan.exists(), "orphan not removed");
    vol.img = d2.clone();
    vol.check(&env).await;
    check_snapshot(d, &s3, &d3).await;
    // Exactly the active file, the two snapshot files and the record remain.
    assert_eq!(listing(&vdir).len(), 4, "{:?}", listing(&vdir));

    // 4. A delete of s2 (now the base) interrupted after its intent was committed and the
    //    child (s3's file) rebased: the next operation of any kind, here a read of s3,
    //    finishes it before it trusts the record.
    let mut chain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap();
    let s3_file = chain["snapshots"][s3.id.to_string()]["file"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        chain["files"][&s3_file]["backing"].as_str(),
        Some(s2_file.as_str())
    );
    chain["snapshots"][s2.id.to_string()]["deleting"] = serde_json::json!(true);
    std::fs::write(vdir.join("chain.json"), serde_json::to_vec(&chain).unwrap()).unwrap();
    duct::cmd!(
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", &s3_file
    )
    .dir(&vdir)
    .run()
    .unwrap();
    assert!(
        d.lookup_snapshot(&s2).await.unwrap().is_some(),
        "a pending delete is not done yet"
    );
    check_snapshot(d, &s3, &d3).await;
    assert!(d.lookup_snapshot(&s2).await.unwrap().is_none());
    assert!(!vdir.join(&s2_file).exists());
    vol.check(&env).await;
    d.delete_snapshot(&s2).await.unwrap();
    // The active file (backed by s2's file before) was rebased too, so it reads the same.
    assert_eq!(listing(&vdir).len(), 3, "{:?}", listing(&vdir));
}

fn uuid_like() -> String {
    kiln_core::VolumeId::new().to_string()
}

/// Raw: stale temp files of interrupted operations (a crash before the rename) are simply
/// rebuilt by the re-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_interrupted_operations_complete_on_rerun() {
    let env = Env::raw().await;
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let s = snapshot(&vol.v);
    let junk = kiln_testkit::pattern(99, 3 * MIB as usize);
    let snap_tmp = d.path().join(format!(".snapshot-{}.tmp", s.id));
    std::fs::write(&snap_tmp, &junk).unwrap();
    assert!(
        d.lookup_snapshot(&s).await.unwrap().is_none(),
        "a temp file is not a snapshot"
    );
    d.create_snapshot(&s, &vol.v).await.unwrap();
    assert!(!snap_tmp.exists());
    let at_snap = vol.img.clone();
    check_snapshot(d, &s, &at_snap).await;
    vol.scatter(&env, 2).await;
    let revert_tmp = d.path().join(format!(".volume-{}.revert.tmp", vol.v.id));
    std::fs::write(&revert_tmp, &junk).unwrap();
    d.revert_to_snapshot(&vol.v, &s, no_progress())
        .await
        .unwrap();
    assert!(!revert_tmp.exists());
    vol.img = at_snap.clone();
    vol.check(&env).await;
    check_snapshot(d, &s, &at_snap).await;
}

/// Two kiln processes on one backend directory: the flock keeps concurrent read-modify-write
/// of a qcow2 chain record from losing updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_two_drivers_on_one_directory_serialize() {
    let env = Env::qcow2().await;
    let mut cfg = kiln_driver_file::FileConfig::new(env.driver.path());
    cfg.format = kiln_driver_file::Format::Qcow2;
    let second = kiln_driver_file::open("second", cfg).await.unwrap();
    let mut vol = Vol::create(&env, 16 * MIB).await;
    vol.write(&env, MIB, 8192, 1).await;
    let drivers = [env.driver.clone(), second];
    let mut tasks = Vec::new();
    for i in 0..12 {
        let d = drivers[i % 2].clone();
        let v = vol.v.clone();
        tasks.push(tokio::spawn(async move {
            let s = snapshot(&v);
            d.create_snapshot(&s, &v).await.map(|_| s)
        }));
    }
    let mut snaps = Vec::new();
    for t in tasks {
        snaps.push(t.await.unwrap().unwrap());
    }
    for s in &snaps {
        assert!(
            env.driver.lookup_snapshot(s).await.unwrap().is_some(),
            "lost {}",
            s.id
        );
        check_snapshot(&env.driver, s, &vol.img).await;
    }
    // Concurrent deletes from both drivers merge correctly too.
    let mut tasks = Vec::new();
    for (i, s) in snaps.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        let d = drivers[i % 2].clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move { d.delete_snapshot(&s).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(
            env.driver.lookup_snapshot(s).await.unwrap().is_some(),
            i % 3 == 0
        );
        if i % 3 == 0 {
            check_snapshot(&env.driver, s, &vol.img).await;
        }
    }
    vol.write(&env, 2 * MIB, 4096, 2).await;
    vol.check(&env).await;
}

/// The record must say what the qcow2 headers say: every file's backing file.
fn assert_record_matches_headers(vdir: &std::path::Path) {
    let chain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vdir.join("chain.json")).unwrap()).unwrap();
    for (name, layer) in chain["files"].as_object().unwrap() {
        let info = duct::cmd!("qemu-img", "info", "-U", "--output=json", name)
            .dir(vdir)
            .read()
            .unwrap();
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            info["backing-filename"].as_str(),
            layer["backing"].as_str(),
            "{name}: header and record disagree"
        );
    }
    let pending = chain["snapshots"]
        .as_object()
        .unwrap()
        .values()
        .any(|e| e["deleting"].as_bool() == Some(true));
    assert!(!pending, "a delete intent was left behind");
}

/// A process holding the active qcow2 file open for writing, as a hypervisor does: `qemu-io`
/// waiting for commands. Dropping it closes its stdin, and it exits.
struct Holder(std::process::Child);

impl Holder {
    fn open(image: &std::path::Path) -> Holder {
        use std::io::Read;
        let mut child = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(image)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The prompt appears once the image is open (and locked).
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while !String::from_utf8_lossy(&seen).contains("qemu-io>") {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Deleting a snapshot whose merge must rewrite a file a hypervisor holds fails cleanly: the
/// snapshot stays, every image still reads back, the record matches the headers, and the
/// volume is not blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_delete_under_an_open_active_file_fails_cleanly() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    let vdir = d.path().join(format!("volume-{}", vol.v.id));
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.scatter(&env, 3).await;
    let (s3, d3) = vol.snap(&env).await;
    vol.write(&env, 0, 4096, 4).await;
    {
        let _held = Holder::open(&d.active_image(&vol.v).unwrap());
        // s3's file is the active file's parent: merging it rewrites the active file. qemu's
        // lock refusal means "held by another process, retry later": unavailable.
        let e = d.delete_snapshot(&s3).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("lock"), "{e}");
        assert!(d.lookup_snapshot(&s3).await.unwrap().is_some());
        assert_record_matches_headers(&vdir);
        // s1's merge rewrites s2's frozen file, which is in the held file's backing chain:
        // qemu refuses that too (a running guest reads it).
        assert!(d.delete_snapshot(&s1).await.is_err());
        assert_record_matches_headers(&vdir);
        check_snapshot(d, &s1, &d1).await;
        check_snapshot(d, &s2, &d2).await;
        check_snapshot(d, &s3, &d3).await;
        // The volume is not blocked by the failed deletes: its snapshots still clone (they
        // are read with qemu's force-share, being frozen).
        let clone = Vol {
            v: common::volume(SIZE),
            img: d2.clone(),
        };
        d.create_volume_from_snapshot(&clone.v, &s2, no_progress())
            .await
            .unwrap();
        clone.check(&env).await;
    }
    vol.check(&env).await;
    d.delete_snapshot(&s1).await.unwrap();
    assert_record_matches_headers(&vdir);
    d.delete_snapshot(&s3).await.unwrap();
    assert_record_matches_headers(&vdir);
    check_snapshot(d, &s2, &d2).await;
    vol.check(&env).await;

    // Two children (after a revert), one of them held: whichever order the merge takes,
    // the record stays true and nothing is lost.
    d.revert_to_snapshot(&vol.v, &s2, no_progress())
        .await
        .unwrap();
    vol.img = d2.clone();
    vol.write(&env, 7 * MIB, 4096, 5).await;
    let (s4, d4) = vol.snap(&env).await;
    d.revert_to_snapshot(&vol.v, &s2, no_progress())
        .await
        .unwrap();
    vol.img = d2.clone();
    vol.write(&env, 8 * MIB, 4096, 6).await;
    {
        let _held = Holder::open(&d.active_image(&vol.v).unwrap());
        assert!(d.delete_snapshot(&s2).await.is_err());
        assert_record_matches_headers(&vdir);
        check_snapshot(d, &s2, &d2).await;
        check_snapshot(d, &s4, &d4).await;
    }
    vol.check(&env).await;
    d.delete_snapshot(&s2).await.unwrap();
    assert_record_matches_headers(&vdir);
    check_snapshot(d, &s4, &d4).await;
    vol.check(&env).await;
}
