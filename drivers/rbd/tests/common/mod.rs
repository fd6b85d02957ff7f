//! Shared helpers of the RBD integration tests. They run against the real cluster named by
//! `CEPH_CONF` (tests/harness/rbd-suite.sh starts one) and fail loudly without it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use kiln_core::{
    Attachment, Extent, InstanceId, PrimitiveSample, Progress, Result, Snapshot, SnapshotId,
    SnapshotStatus, Volume, VolumeDriver, VolumeId, VolumeStatus,
};
use kiln_driver_rbd::image::{Image, ParentSpec};
use kiln_driver_rbd::{RbdConfig, RbdDriver, volume_image};

/// 64 MiB: small enough for a memstore OSD, 16 objects of 4 MiB.
pub const SIZE: u64 = 64 << 20;

/// The cluster's ceph.conf from `CEPH_CONF`; panics with instructions when unset.
pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("CEPH_CONF") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "CEPH_CONF is not set: the RBD tests need a real Ceph cluster. Run \
             tests/harness/rbd-suite.sh (starts a throw-away single-node cluster, runs these \
             tests, stops it), or eval \"$(tests/harness/ceph-start.sh DIR)\" first."
        ),
    }
}

/// The test backend's configuration (pool `rbd`, client admin).
pub fn config() -> RbdConfig {
    RbdConfig {
        ceph_conf: ceph_conf(),
        ..RbdConfig::default()
    }
}

/// A driver on the test cluster, with `tweak` applied to the configuration.
pub async fn driver_with(tweak: impl FnOnce(&mut RbdConfig)) -> RbdDriver {
    let mut cfg = config();
    tweak(&mut cfg);
    kiln_driver_rbd::open("rbd-test", cfg)
        .await
        .unwrap_or_else(|e| panic!("cannot open the RBD backend on {:?}: {e}", ceph_conf()))
}

/// A driver with the default configuration.
pub async fn driver() -> RbdDriver {
    driver_with(|_| {}).await
}

/// A fresh volume record (nothing is created).
pub fn volume(size: u64) -> Volume {
    let now = Utc::now();
    Volume {
        id: VolumeId::new(),
        name: Some("label with spaces; never used".into()),
        size_bytes: size,
        backend: "rbd-test".into(),
        status: VolumeStatus::Creating,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: None,
        attachments: Vec::new(),
        created_at: now,
        updated_at: now,
    }
}

/// A fresh snapshot record of `v` (nothing is created).
pub fn snapshot(v: &Volume) -> Snapshot {
    let now = Utc::now();
    Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name: None,
        size_bytes: v.size_bytes,
        backend: "rbd-test".into(),
        status: SnapshotStatus::Creating,
        status_reason: None,
        provider_location: None,
        forced: false,
        image_id: None,
        consistency: None,
        created_at: now,
        updated_at: now,
    }
}

/// An attachment record for force snapshots.
pub fn attachment() -> Attachment {
    Attachment::new(InstanceId::new(), "/dev/vdb")
}

/// Creates a volume of `size` on the backend.
pub async fn create_volume(d: &RbdDriver, size: u64) -> Volume {
    let v = volume(size);
    let up = d.create_volume(&v).await.unwrap();
    assert_eq!(
        up.provider_location.as_deref(),
        Some(format!("rbd/volume-{}", v.id).as_str())
    );
    v
}

/// Snapshots `v` (not forced).
pub async fn take_snapshot(d: &RbdDriver, v: &Volume) -> Snapshot {
    let s = snapshot(v);
    let up = d.create_snapshot(&s, v).await.unwrap();
    assert_eq!(
        up.provider_location.as_deref(),
        Some(format!("rbd/volume-{}@snapshot-{}", v.id, s.id).as_str())
    );
    s
}

/// Whether `v`'s image exists, per `lookup_volume`; when it does, the location it reports
/// must be the image's.
pub async fn volume_exists(d: &RbdDriver, v: &Volume) -> bool {
    let found = d.lookup_volume(v).await.unwrap();
    if let Some(up) = &found {
        assert_eq!(
            up.provider_location.as_deref(),
            Some(format!("rbd/volume-{}", v.id).as_str()),
            "lookup_volume reports the image's location"
        );
    }
    found.is_some()
}

/// Whether `s` exists on its volume's image, per `lookup_snapshot`; when it does, the
/// location it reports must be the snapshot's.
pub async fn snapshot_exists(d: &RbdDriver, s: &Snapshot) -> bool {
    let found = d.lookup_snapshot(s).await.unwrap();
    if let Some(up) = &found {
        assert_eq!(
            up.provider_location.as_deref(),
            Some(format!("rbd/volume-{}@snapshot-{}", s.volume_id, s.id).as_str()),
            "lookup_snapshot reports the snapshot's location"
        );
    }
    found.is_some()
}

/// Runs the bench capability's primitive on `v` (on a blocking thread, as `kiln bench` does).
pub async fn bench(d: &RbdDriver, v: &Volume) -> Result<Vec<PrimitiveSample>> {
    let prim = d.bench().expect("the RBD backend has a bench primitive");
    let v = v.clone();
    tokio::task::spawn_blocking(move || prim.bench_primitives(&v))
        .await
        .unwrap()
}

/// Writes `data` at `offset` of `v`'s head with rbd_write (test-only path), then flushes.
pub async fn write(d: &RbdDriver, v: &Volume, offset: u64, data: Vec<u8>) {
    let c = Arc::clone(d.cluster());
    let name = volume_image(&v.id);
    tokio::task::spawn_blocking(move || {
        let img = Image::open(&c, &name, None).unwrap();
        img.write(offset, &data).unwrap();
        img.flush().unwrap();
    })
    .await
    .unwrap();
}

/// Reads `len` bytes at `offset` of `v`'s head.
pub async fn read_head(d: &RbdDriver, v: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let c = Arc::clone(d.cluster());
    let name = volume_image(&v.id);
    tokio::task::spawn_blocking(move || {
        let img = Image::open_read_only(&c, &name, None).unwrap();
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = img.read(offset + done as u64, &mut buf[done..]).unwrap();
            assert!(n > 0, "short read at {}", offset + done as u64);
            done += n;
        }
        buf
    })
    .await
    .unwrap()
}

/// Size of `v`'s head.
pub async fn head_size(d: &RbdDriver, v: &Volume) -> u64 {
    let c = Arc::clone(d.cluster());
    let name = volume_image(&v.id);
    tokio::task::spawn_blocking(move || {
        Image::open_read_only(&c, &name, None)
            .unwrap()
            .size()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The parent (clone source) of `v`'s head, if any.
pub async fn parent_of(d: &RbdDriver, v: &Volume) -> Option<ParentSpec> {
    let c = Arc::clone(d.cluster());
    let name = volume_image(&v.id);
    tokio::task::spawn_blocking(move || {
        Image::open_read_only(&c, &name, None)
            .unwrap()
            .parent()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Reads a whole snapshot through `open_snapshot_reader` (in small, odd-sized chunks, to
/// exercise `read_at`), returning its bytes and extents.
pub async fn read_snapshot(d: &RbdDriver, s: &Snapshot) -> (Vec<u8>, Vec<Extent>) {
    let mut r = d.open_snapshot_reader(s).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let size = usize::try_from(r.size()).unwrap();
        let mut out = vec![0u8; size];
        let mut off = 0usize;
        while off < size {
            let end = (off + 3 * 1024 * 1024 + 4096).min(size);
            let n = r.read_at(off as u64, &mut out[off..end]).unwrap();
            assert!(n > 0, "read_at returned 0 before the end ({off} of {size})");
            off += n;
        }
        let mut tail = [0u8; 16];
        assert_eq!(
            r.read_at(size as u64, &mut tail).unwrap(),
            0,
            "read past the end"
        );
        (out, r.extents().to_vec())
    })
    .await
    .unwrap()
}

/// A progress sink that records what it was told.
#[derive(Default)]
pub struct RecordingProgress {
    pub total: Mutex<u64>,
    pub done: Mutex<u64>,
    pub messages: Mutex<Vec<String>>,
}

impl Progress for RecordingProgress {
    fn set_total(&self, bytes: u64) {
        *self.total.lock().unwrap() = bytes;
    }
    fn advance(&self, bytes: u64) {
        *self.done.lock().unwrap() += bytes;
    }
    fn set_message(&self, msg: &str) {
        self.messages.lock().unwrap().push(msg.to_string());
    }
}

impl RecordingProgress {
    /// Asserts the operation reported a total and finished at 100 %.
    pub fn assert_complete(&self) {
        let total = *self.total.lock().unwrap();
        assert!(total > 0, "no total reported");
        assert_eq!(
            *self.done.lock().unwrap(),
            total,
            "progress did not reach the total"
        );
        assert!(
            !self.messages.lock().unwrap().is_empty(),
            "no phase message"
        );
    }
}

/// Runs `rbd --conf CEPH_CONF ARGS…` (bounded), returning stdout; panics on failure.
pub fn rbd_cli(args: &[&str]) -> String {
    let conf = ceph_conf();
    let conf = conf.to_str().unwrap();
    let mut argv = vec!["60", "rbd", "--conf", conf];
    argv.extend_from_slice(args);
    let out = duct::cmd("timeout", &argv)
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .unwrap();
    assert!(
        out.status.success(),
        "rbd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Names of all snapshots of image `name` according to the rbd CLI (an independent view).
pub fn cli_snapshots(name: &str) -> Vec<String> {
    let json = rbd_cli(&["snap", "ls", "--format", "json", &format!("rbd/{name}")]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that `data` equals `expected` in `[0, expected.len())` and is zero after it.
pub fn assert_prefix_then_zeros(data: &[u8], expected: &[u8], what: &str) {
    assert!(
        data.len() >= expected.len(),
        "{what}: shorter than expected"
    );
    assert!(data[..expected.len()] == *expected, "{what}: data differs");
    assert!(
        data[expected.len()..].iter().all(|b| *b == 0),
        "{what}: non-zero bytes after the written data"
    );
}

/// Watch cookies on image `name` according to `rbd status` (an independent view): one per
/// open read-write handle of any client.
pub fn cli_watchers(name: &str) -> Vec<u64> {
    let json = rbd_cli(&["status", "--format", "json", &format!("rbd/{name}")]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["cookie"].as_u64().unwrap())
        .collect()
}

/// Lock ids on image `name` according to `rbd lock ls`; librbd's exclusive lock is
/// `auto <watch cookie of the owning handle>`.
pub fn cli_locks(name: &str) -> Vec<String> {
    let json = rbd_cli(&["lock", "ls", "--format", "json", &format!("rbd/{name}")]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}
