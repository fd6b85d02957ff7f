//! The driver contract suite: one test body for every backend (model: stratisd's
//! `loopbacked.rs`/`real.rs`, the same test on every device kind).
//!
//! A driver proves itself by passing it on its *real* backend: each driver crate's tests
//! expand [`crate::contract_tests!`] with a factory for its [`Target`] (raw+reflink on XFS,
//! qcow2 with qemu-img, LVM thin and thick in user-mode Linux, RBD on a Ceph cluster). The
//! in-memory driver passes it too, which shows the suite is not shaped to one backend.
//! **Adding a driver = passing this suite** (plus its own tests of what only it does).
//!
//! What it checks, on the `VolumeDriver` trait alone: point-in-time data; revert to any
//! snapshot keeping the others; idempotent deletes that say what they did; `lookup_*`
//! agreeing with creates; busy semantics of a snapshot with a clone; clone independence;
//! capabilities matching behaviour; reader extents; changed extents between snapshots
//! covering every change; refused calls changing nothing.

use std::sync::Arc;

use kiln_core::{
    Attachment, DeleteAction, ErrorKind, InstanceId, Snapshot, SnapshotDelta, SnapshotId,
    SnapshotReader, SnapshotStatus, Volume, VolumeDriver, VolumeId, VolumeStatus, no_progress,
};

use crate::pattern;

/// Size of the suite's volumes: a few LVM extents, small enough for every backend.
pub const SIZE: u64 = 8 << 20;

/// A backend under test, as the suite needs it. Its methods block (they may run commands
/// or do I/O): the suite calls them from a blocking thread.
pub trait Target: Send + Sync + 'static {
    /// The driver under test.
    fn driver(&self) -> Arc<dyn VolumeDriver>;
    /// The backend's configured name (recorded on volumes and snapshots).
    fn backend(&self) -> String;
    /// Writes `data` at `offset` into volume `v` as a guest would, durably.
    fn write(&self, v: &Volume, offset: u64, data: &[u8]);
    /// The names of every backend object (volumes, snapshots, clones, bookkeeping files
    /// that an operation could create), sorted: compared before and after a refused call.
    fn objects(&self) -> Vec<String>;
}

/// Expands to one `#[tokio::test]` per contract case, each building its target with
/// `$factory` (an expression evaluating to an `Arc<impl Target>`).
#[macro_export]
macro_rules! contract_tests {
    ($factory:expr) => {
        $crate::contract_tests!(@cases $factory;
            point_in_time_data,
            revert_to_any_snapshot_keeps_the_others,
            deletes_are_idempotent_and_say_what_they_did,
            lookups_agree_with_creates,
            a_snapshot_with_a_clone_is_busy_or_independent,
            clones_are_independent,
            capabilities_match_behaviour,
            reader_extents_cover_the_data,
            diff_covers_every_change,
            refused_calls_change_nothing);
    };
    (@cases $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let target = $factory;
                $crate::contract::$case(target).await;
            }
        )*
    };
}

fn volume(t: &dyn Target) -> Volume {
    let now = chrono::Utc::now();
    Volume {
        id: VolumeId::new(),
        name: None,
        size_bytes: SIZE,
        backend: t.backend(),
        status: VolumeStatus::Available,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: None,
        attachments: vec![],
        created_at: now,
        updated_at: now,
    }
}

fn snapshot(v: &Volume) -> Snapshot {
    let now = chrono::Utc::now();
    Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name: None,
        size_bytes: v.size_bytes,
        backend: v.backend.clone(),
        status: SnapshotStatus::Available,
        status_reason: None,
        provider_location: None,
        forced: false,
        image_id: None,
        consistency: None,
        created_at: now,
        updated_at: now,
    }
}

fn clone_record(s: &Snapshot) -> Volume {
    let now = chrono::Utc::now();
    Volume {
        id: VolumeId::new(),
        name: None,
        size_bytes: s.size_bytes,
        backend: s.backend.clone(),
        status: VolumeStatus::Available,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: Some(s.id),
        attachments: vec![],
        created_at: now,
        updated_at: now,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => panic!("contract helper thread failed: {e}"),
    }
}

async fn write<T: Target>(t: &Arc<T>, v: &Volume, offset: u64, data: Vec<u8>) {
    let (t, v) = (t.clone(), v.clone());
    blocking(move || t.write(&v, offset, &data)).await
}

async fn objects<T: Target>(t: &Arc<T>) -> Vec<String> {
    let t = t.clone();
    blocking(move || t.objects()).await
}

/// The whole image of snapshot `s`, read through the driver's reader.
async fn read_snapshot(d: &Arc<dyn VolumeDriver>, s: &Snapshot) -> Vec<u8> {
    let mut r = d
        .open_snapshot_reader(s)
        .await
        .unwrap_or_else(|e| panic!("open reader of {}: {e}", s.id));
    blocking(move || read_all(r.as_mut())).await
}

fn read_all(r: &mut dyn SnapshotReader) -> Vec<u8> {
    let mut out = vec![0u8; r.size() as usize];
    let mut off = 0usize;
    while off < out.len() {
        match r.read_at(off as u64, &mut out[off..]) {
            Ok(0) => panic!("reader ended at {off} of {}", out.len()),
            Ok(n) => off += n,
            Err(e) => panic!("read at {off}: {e}"),
        }
    }
    out
}

/// The volume's current data, through a temporary snapshot (no trait method reads a
/// volume; the temporary snapshot is deleted again).
async fn read_volume(d: &Arc<dyn VolumeDriver>, v: &Volume) -> Vec<u8> {
    let s = snapshot(v);
    d.create_snapshot(&s, v)
        .await
        .unwrap_or_else(|e| panic!("snapshot {} to read it: {e}", v.id));
    let data = read_snapshot(d, &s).await;
    d.delete_snapshot(&s)
        .await
        .unwrap_or_else(|e| panic!("delete read snapshot {}: {e}", s.id));
    data
}

/// Takes snapshot of `v` (panics with `what` if the driver refuses).
async fn take_snapshot(d: &Arc<dyn VolumeDriver>, v: &Volume, what: &str) -> Snapshot {
    let s = snapshot(v);
    d.create_snapshot(&s, v)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    s
}

/// A volume cloned from `s`, with the location the driver reported.
async fn make_clone(d: &Arc<dyn VolumeDriver>, s: &Snapshot) -> Volume {
    let mut c = clone_record(s);
    c.provider_location = d
        .create_volume_from_snapshot(&c, s, no_progress())
        .await
        .unwrap_or_else(|e| panic!("clone of {}: {e}", s.id))
        .provider_location;
    c
}

async fn new_volume<T: Target>(t: &Arc<T>) -> (Arc<dyn VolumeDriver>, Volume) {
    let d = t.driver();
    let mut v = volume(t.as_ref());
    let u = d
        .create_volume(&v)
        .await
        .unwrap_or_else(|e| panic!("create volume: {e}"));
    v.provider_location = u.provider_location;
    (d, v)
}

async fn cleanup(d: &Arc<dyn VolumeDriver>, snaps: &[&Snapshot], vols: &[&Volume]) {
    for s in snaps {
        let _ = d.delete_snapshot(s).await;
    }
    for v in vols {
        let _ = d.delete_volume(v).await;
    }
}

fn expect(data: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    for (off, d) in data {
        out[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    out
}

/// Two snapshots taken between writes each read back exactly what the volume held when
/// it was taken, later writes notwithstanding.
pub async fn point_in_time_data<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let (a, b, c) = (
        pattern(1, 1 << 20),
        pattern(2, 1 << 20),
        pattern(3, 2 << 20),
    );
    write(&t, &v, 0, a.clone()).await;
    let s1 = take_snapshot(&d, &v, "snapshot 1").await;
    write(&t, &v, 1 << 20, b.clone()).await;
    let s2 = take_snapshot(&d, &v, "snapshot 2").await;
    write(&t, &v, 0, c.clone()).await;
    assert!(
        read_snapshot(&d, &s1).await == expect(&[(0, &a)]),
        "snapshot 1 is not the data at its instant"
    );
    assert!(
        read_snapshot(&d, &s2).await == expect(&[(0, &a), (1 << 20, &b)]),
        "snapshot 2 is not the data at its instant"
    );
    assert!(
        read_volume(&d, &v).await == expect(&[(0, &c)]),
        "the volume lost writes made after its snapshots"
    );
    cleanup(&d, &[&s1, &s2], &[&v]).await;
}

/// Revert to the older of two snapshots, then to the newer: the volume holds each one's
/// data in turn, and both snapshots survive both reverts unchanged.
pub async fn revert_to_any_snapshot_keeps_the_others<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    if !d.capabilities().revert_any {
        cleanup(&d, &[], &[&v]).await;
        panic!("every kiln driver reverts to any snapshot; this one says it cannot");
    }
    let (a, b, c) = (
        pattern(11, 1 << 20),
        pattern(12, 1 << 20),
        pattern(13, 1 << 20),
    );
    write(&t, &v, 0, a.clone()).await;
    let s1 = take_snapshot(&d, &v, "snapshot 1").await;
    write(&t, &v, 0, b.clone()).await;
    let s2 = take_snapshot(&d, &v, "snapshot 2").await;
    write(&t, &v, 0, c).await;
    d.revert_to_snapshot(&v, &s1, no_progress())
        .await
        .expect("revert to the older snapshot");
    assert!(
        read_volume(&d, &v).await == expect(&[(0, &a)]),
        "revert to s1"
    );
    assert!(
        read_snapshot(&d, &s2).await == expect(&[(0, &b)]),
        "the newer snapshot changed"
    );
    d.revert_to_snapshot(&v, &s2, no_progress())
        .await
        .expect("revert to the newer snapshot");
    assert!(
        read_volume(&d, &v).await == expect(&[(0, &b)]),
        "revert to s2"
    );
    assert!(
        read_snapshot(&d, &s1).await == expect(&[(0, &a)]),
        "the older snapshot changed"
    );
    cleanup(&d, &[&s1, &s2], &[&v]).await;
}

/// Deleting twice: the first call deletes, the second finds it already gone; objects that
/// never existed are already gone too.
pub async fn deletes_are_idempotent_and_say_what_they_did<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let s = take_snapshot(&d, &v, "snapshot").await;
    assert_eq!(
        d.delete_snapshot(&s).await.expect("delete"),
        DeleteAction::Deleted
    );
    assert_eq!(
        d.delete_snapshot(&s).await.expect("delete again"),
        DeleteAction::AlreadyGone
    );
    assert_eq!(
        d.delete_snapshot(&snapshot(&v))
            .await
            .expect("delete unknown"),
        DeleteAction::AlreadyGone
    );
    assert_eq!(
        d.delete_volume(&v).await.expect("delete volume"),
        DeleteAction::Deleted
    );
    assert_eq!(
        d.delete_volume(&v).await.expect("delete volume again"),
        DeleteAction::AlreadyGone
    );
    assert_eq!(
        d.delete_volume(&volume(t.as_ref()))
            .await
            .expect("delete unknown volume"),
        DeleteAction::AlreadyGone
    );
}

/// `lookup_*` find what was created (with the location create reported) and nothing once
/// it is deleted: recovery records what lookups say.
pub async fn lookups_agree_with_creates<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let found = d.lookup_volume(&v).await.expect("lookup volume");
    assert_eq!(
        found.map(|u| u.provider_location),
        Some(v.provider_location.clone()),
        "lookup_volume disagrees with create_volume"
    );
    let s = snapshot(&v);
    assert_eq!(d.lookup_snapshot(&s).await.expect("lookup before"), None);
    let made = d.create_snapshot(&s, &v).await.expect("snapshot");
    assert_eq!(
        d.lookup_snapshot(&s).await.expect("lookup after"),
        Some(made),
        "lookup_snapshot disagrees with create_snapshot"
    );
    d.delete_snapshot(&s).await.expect("delete");
    assert_eq!(d.lookup_snapshot(&s).await.expect("lookup deleted"), None);
    d.delete_volume(&v).await.expect("delete volume");
    assert_eq!(
        d.lookup_volume(&v).await.expect("lookup deleted volume"),
        None
    );
}

/// A snapshot with a clone: deleting it either works (the clone is independent) or is
/// refused as `Busy`, changing nothing; after flattening the clone it always works, and
/// the clone keeps its data either way.
pub async fn a_snapshot_with_a_clone_is_busy_or_independent<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let a = pattern(21, 1 << 20);
    write(&t, &v, 0, a.clone()).await;
    let s = take_snapshot(&d, &v, "snapshot").await;
    let c = make_clone(&d, &s).await;
    match d.delete_snapshot(&s).await {
        Ok(DeleteAction::Deleted) => {}
        Ok(DeleteAction::AlreadyGone) => panic!("the snapshot existed"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
            assert!(
                !e.dependents().is_empty(),
                "Busy must name the dependents: {e}"
            );
            assert!(
                read_snapshot(&d, &s).await == expect(&[(0, &a)]),
                "a refused delete changed the snapshot"
            );
            d.flatten_volume(&c, no_progress()).await.expect("flatten");
            assert_eq!(
                d.delete_snapshot(&s).await.expect("delete after flatten"),
                DeleteAction::Deleted
            );
        }
    }
    assert!(
        read_volume(&d, &c).await == expect(&[(0, &a)]),
        "the clone lost its data when its snapshot went"
    );
    cleanup(&d, &[], &[&c, &v]).await;
}

/// Writes to a clone do not reach its volume or snapshot, and the other way round.
pub async fn clones_are_independent<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    assert!(d.capabilities().clone, "every kiln driver clones");
    let a = pattern(31, 1 << 20);
    write(&t, &v, 0, a.clone()).await;
    let s = take_snapshot(&d, &v, "snapshot").await;
    let c = make_clone(&d, &s).await;
    let (x, y) = (pattern(32, 1 << 20), pattern(33, 1 << 20));
    write(&t, &c, 0, x.clone()).await;
    write(&t, &v, 2 << 20, y.clone()).await;
    assert!(
        read_volume(&d, &c).await == expect(&[(0, &x)]),
        "the clone sees its origin's writes"
    );
    assert!(
        read_volume(&d, &v).await == expect(&[(0, &a), (2 << 20, &y)]),
        "the origin sees its clone's writes"
    );
    assert!(
        read_snapshot(&d, &s).await == expect(&[(0, &a)]),
        "the snapshot changed"
    );
    cleanup(&d, &[], &[&c]).await;
    cleanup(&d, &[&s], &[&v]).await;
}

/// `diff_snapshots` of two snapshots: a driver that claims `diff` answers `Changed` ranges
/// that cover every byte that differs between them (both read back in full) and stay near
/// what was written; a driver that does not claim it answers `Untracked`.
pub async fn diff_covers_every_change<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    write(&t, &v, 0, pattern(51, 4 << 20)).await;
    let s1 = take_snapshot(&d, &v, "snapshot 1").await;
    // 64 KiB rewritten, 64 KiB zeroed, 4 KiB written where there was nothing.
    write(&t, &v, 1 << 20, pattern(52, 64 << 10)).await;
    write(&t, &v, 3 << 20, vec![0; 64 << 10]).await;
    write(&t, &v, 6 << 20, pattern(53, 4096)).await;
    let s2 = take_snapshot(&d, &v, "snapshot 2").await;
    let delta = d.diff_snapshots(&s1, &s2).await;
    let claimed = d.capabilities().diff;
    match (claimed, delta) {
        (true, Ok(SnapshotDelta::Changed(ranges))) => {
            let (x, y) = (read_snapshot(&d, &s1).await, read_snapshot(&d, &s2).await);
            let mut covered = vec![false; y.len()];
            for r in &ranges {
                let end = (r.offset + r.length).min(y.len() as u64);
                for c in covered
                    .iter_mut()
                    .take(end as usize)
                    .skip(r.offset as usize)
                {
                    *c = true;
                }
            }
            if let Some(i) = (0..y.len()).find(|i| x[*i] != y[*i] && !covered[*i]) {
                panic!("byte {i} changed but no range covers it: {ranges:?}");
            }
            let total: u64 = ranges.iter().map(|r| r.length).sum();
            assert!(
                total <= 4 << 20,
                "{total} bytes reported changed for 132 KiB written: {ranges:?}"
            );
        }
        (false, Ok(SnapshotDelta::Untracked)) => {}
        (claimed, got) => panic!("capability diff = {claimed}, but diff_snapshots gave {got:?}"),
    }
    cleanup(&d, &[&s1, &s2], &[&v]).await;
}

/// What a driver says it can do, it does; what it says it cannot, it refuses cleanly.
pub async fn capabilities_match_behaviour<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let caps = d.capabilities();
    assert!(
        !caps.snapshot_method.is_empty(),
        "say how snapshots are made"
    );
    let a = pattern(41, 1 << 20);
    write(&t, &v, 0, a.clone()).await;
    let att = Attachment::new(InstanceId::new(), "/dev/vdb");
    let mut attached = v.clone();
    attached.status = VolumeStatus::InUse;
    attached.attachments = vec![att.clone()];
    let s = snapshot(&attached);
    let before = objects(&t).await;
    match d.create_snapshot_force(&s, &attached, &att).await {
        Ok(_) => {
            assert!(
                caps.online_snapshot,
                "create_snapshot_force worked but online_snapshot is false"
            );
            assert!(read_snapshot(&d, &s).await == expect(&[(0, &a)]));
            d.delete_snapshot(&s).await.expect("delete forced snapshot");
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(
                !caps.online_snapshot,
                "online_snapshot is true but a forced snapshot was refused: {e}"
            );
            // A backend whose hypervisor takes the snapshot says what is missing: this
            // attachment names no monitor (the real path is proven with a real hypervisor
            // in the backend's own tests).
            assert!(
                !caps.hypervisor_snapshot || e.to_string().contains("QMP monitor"),
                "hypervisor_snapshot is true but the refusal does not say why: {e}"
            );
            assert_eq!(
                before,
                objects(&t).await,
                "a refused force snapshot left objects"
            );
        }
    }
    // Group snapshots: every driver takes a group (natively or one by one); a native one
    // must give every member.
    let (_, w) = new_volume(&t).await;
    let members = vec![
        (snapshot(&v), v.clone(), None),
        (snapshot(&w), w.clone(), None),
    ];
    let out = d
        .create_group_snapshot(&members)
        .await
        .expect("group snapshot");
    assert_eq!(out.len(), 2);
    for ((s, _, _), r) in members.iter().zip(out) {
        r.unwrap_or_else(|e| panic!("group member {}: {e}", s.id));
        d.delete_snapshot(s).await.expect("delete group member");
    }
    cleanup(&d, &[], &[&v, &w]).await;
}

/// The reader's extents cover every byte written; outside them the image reads as zeros;
/// its size is the volume's.
pub async fn reader_extents_cover_the_data<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let (a, b) = (pattern(51, 64 << 10), pattern(52, 128 << 10));
    write(&t, &v, 0, a.clone()).await;
    write(&t, &v, 5 << 20, b.clone()).await;
    let s = take_snapshot(&d, &v, "snapshot").await;
    let mut r = d.open_snapshot_reader(&s).await.expect("reader");
    let (size, extents, data) = blocking(move || {
        let e = r.extents().to_vec();
        (r.size(), e, read_all(r.as_mut()))
    })
    .await;
    assert_eq!(size, SIZE, "reader size is not the volume size");
    for w in extents.windows(2) {
        assert!(
            w[0].offset + w[0].length <= w[1].offset,
            "extents overlap or are unsorted"
        );
    }
    let covered = |off: u64, len: u64| {
        extents
            .iter()
            .any(|e| e.offset <= off && off + len <= e.offset + e.length)
    };
    assert!(covered(0, a.len() as u64), "first write not in {extents:?}");
    assert!(
        covered(5 << 20, b.len() as u64),
        "second write not in {extents:?}"
    );
    for (i, byte) in data.iter().enumerate() {
        if *byte != 0 {
            assert!(covered(i as u64, 1), "data at {i} outside the extents");
        }
    }
    assert!(data == expect(&[(0, &a), (5 << 20, &b)]), "reader data");
    cleanup(&d, &[&s], &[&v]).await;
}

/// Calls naming objects that do not exist are refused and leave the backend as it was.
pub async fn refused_calls_change_nothing<T: Target>(t: Arc<T>) {
    let (d, v) = new_volume(&t).await;
    let a = pattern(61, 1 << 20);
    write(&t, &v, 0, a.clone()).await;
    let before = objects(&t).await;
    let ghost = volume(t.as_ref());
    let ghost_snap = snapshot(&ghost);
    assert!(
        d.create_snapshot(&ghost_snap, &ghost).await.is_err(),
        "snapshot of a volume that does not exist"
    );
    let stray = snapshot(&v);
    let c = clone_record(&stray);
    assert!(
        d.create_volume_from_snapshot(&c, &stray, no_progress())
            .await
            .is_err(),
        "clone of a snapshot that does not exist"
    );
    assert!(
        d.revert_to_snapshot(&v, &stray, no_progress())
            .await
            .is_err(),
        "revert to a snapshot that does not exist"
    );
    assert!(
        d.open_snapshot_reader(&stray).await.is_err(),
        "reader of a snapshot that does not exist"
    );
    assert_eq!(
        before,
        objects(&t).await,
        "a refused call left or removed objects"
    );
    assert!(
        read_volume(&d, &v).await == expect(&[(0, &a)]),
        "a refused call changed the volume"
    );
    cleanup(&d, &[], &[&v]).await;
}

/// The in-memory driver as a [`Target`]: proof the suite is not shaped to one backend.
pub struct Memory(Arc<kiln_core::memory::MemoryDriver>);

impl Memory {
    /// A fresh in-memory backend.
    pub fn new() -> Arc<Memory> {
        Arc::new(Memory(Arc::default()))
    }
}

impl Target for Memory {
    fn driver(&self) -> Arc<dyn VolumeDriver> {
        self.0.clone()
    }
    fn backend(&self) -> String {
        "mem".into()
    }
    fn write(&self, v: &Volume, offset: u64, data: &[u8]) {
        self.0.write_at(v.id, offset, data);
    }
    fn objects(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .0
            .volumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .map(|k| format!("volume-{k}"))
            .chain(
                self.0
                    .snapshots
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .keys()
                    .map(|k| format!("snapshot-{k}")),
            )
            .collect();
        out.sort();
        out
    }
}
