//! Shared fixtures of the file driver's integration tests: real backends (loop-mounted XFS for
//! raw, a plain directory with the real qemu-img for qcow2), volume/snapshot records, a
//! byte-exact model of what each volume and snapshot must contain, and readers that compare
//! the backend's data with the model.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use chrono::Utc;
use kiln_core::{
    Snapshot, SnapshotId, SnapshotStatus, Volume, VolumeDriver, VolumeId, VolumeStatus,
};
use kiln_driver_file::{FileConfig, FileDriver, Format, Mode};

pub const MIB: u64 = 1 << 20;

/// A driver on a real backend, plus whatever keeps that backend alive.
pub struct Env {
    pub driver: FileDriver,
    _xfs: Option<kiln_testkit::XfsMount>,
    _tmp: Option<tempfile::TempDir>,
}

impl Env {
    /// Raw mode on a fresh loop-mounted XFS with reflink.
    pub async fn raw() -> Env {
        let xfs = kiln_testkit::XfsMount::new(512 * MIB);
        let mut cfg = FileConfig::new(xfs.path().join("kiln"));
        cfg.format = Format::Raw;
        let driver = kiln_driver_file::open("raw-test", cfg).await.unwrap();
        assert_eq!(driver.mode(), Mode::RawReflink);
        Env {
            driver,
            _xfs: Some(xfs),
            _tmp: None,
        }
    }

    /// qcow2 mode in a temp directory on this machine's ordinary filesystem.
    pub async fn qcow2() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("kiln-qcow2-")
            .tempdir()
            .unwrap();
        let mut cfg = FileConfig::new(tmp.path().join("kiln"));
        cfg.format = Format::Qcow2;
        let driver = kiln_driver_file::open("qcow2-test", cfg).await.unwrap();
        assert_eq!(driver.mode(), Mode::Qcow2);
        Env {
            driver,
            _xfs: None,
            _tmp: Some(tmp),
        }
    }

    /// A driver opened by the test itself; `tmp` (if any) is kept alive with it.
    pub fn with_driver(driver: FileDriver, tmp: Option<tempfile::TempDir>) -> Env {
        Env {
            driver,
            _xfs: None,
            _tmp: tmp,
        }
    }

    /// Raw mode with full copies, on this machine's ordinary (non-reflink) filesystem.
    pub async fn raw_full_copy() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("kiln-fullcopy-")
            .tempdir()
            .unwrap();
        let mut cfg = FileConfig::new(tmp.path().join("kiln"));
        cfg.format = Format::Raw;
        cfg.allow_full_copy = true;
        let driver = kiln_driver_file::open("fullcopy-test", cfg).await.unwrap();
        assert_eq!(driver.mode(), Mode::RawFullCopy);
        Env {
            driver,
            _xfs: None,
            _tmp: Some(tmp),
        }
    }
}

/// A volume record as the service would pass it.
pub fn volume(size: u64) -> Volume {
    let now = Utc::now();
    Volume {
        id: VolumeId::new(),
        name: Some("label; rm -rf / $(never used)".into()),
        size_bytes: size,
        backend: "test".into(),
        status: VolumeStatus::Available,
        status_reason: None,
        provider_location: None,
        source_snapshot_id: None,
        attachments: vec![],
        created_at: now,
        updated_at: now,
    }
}

/// A snapshot record of `v` as the service would pass it.
pub fn snapshot(v: &Volume) -> Snapshot {
    let now = Utc::now();
    Snapshot {
        id: SnapshotId::new(),
        volume_id: v.id,
        name: Some("../../etc/passwd".into()),
        size_bytes: v.size_bytes,
        backend: "test".into(),
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

/// A volume on the backend together with the exact bytes it must hold.
pub struct Vol {
    pub v: Volume,
    pub img: Vec<u8>,
}

impl Vol {
    /// Creates a volume of `size` bytes on the backend.
    pub async fn create(env: &Env, size: u64) -> Vol {
        let v = volume(size);
        assert_eq!(env.driver.lookup_volume(&v).await.unwrap(), None);
        let up = env.driver.create_volume(&v).await.unwrap();
        let loc = up.provider_location.clone().unwrap();
        assert!(Path::new(&loc).is_absolute(), "{loc}");
        assert!(Path::new(&loc).exists(), "{loc}");
        // Recovery records what lookup says: it must be the location create reported.
        assert_eq!(env.driver.lookup_volume(&v).await.unwrap(), Some(up));
        Vol {
            v,
            img: vec![0; size as usize],
        }
    }

    /// Writes `len` bytes of pattern `seed` at `off` into the volume's current image (as a
    /// guest would), and into the model.
    pub async fn write(&mut self, env: &Env, off: u64, len: usize, seed: u64) {
        let data = kiln_testkit::pattern(seed, len);
        write_image(&env.driver, &self.v, off, &data).await;
        self.img[off as usize..off as usize + len].copy_from_slice(&data);
    }

    /// Writes several patterned ranges, leaving holes between them.
    pub async fn scatter(&mut self, env: &Env, seed: u64) {
        let size = self.v.size_bytes;
        // Unaligned to qcow2's 64 KiB clusters on purpose: partial-cluster copy-on-write.
        for (i, (off, len)) in [
            (0u64, 64 * 1024usize),
            (5 * MIB + 4096, 100 * 1024),
            (17 * MIB + 512, 1 << 20),
            (size - 3 * 4096, 3 * 4096),
        ]
        .into_iter()
        .enumerate()
        {
            self.write(env, off, len, seed * 100 + i as u64).await;
        }
    }

    /// Takes a snapshot (offline) and returns it with the bytes it must hold.
    pub async fn snap(&self, env: &Env) -> (Snapshot, Vec<u8>) {
        let s = snapshot(&self.v);
        assert_eq!(env.driver.lookup_snapshot(&s).await.unwrap(), None);
        let up = env.driver.create_snapshot(&s, &self.v).await.unwrap();
        let loc = up.provider_location.clone().unwrap();
        assert!(
            Path::new(&loc).is_absolute() && Path::new(&loc).exists(),
            "{loc}"
        );
        // Recovery records what lookup says: it must be the location create reported.
        assert_eq!(env.driver.lookup_snapshot(&s).await.unwrap(), Some(up));
        (s, self.img.clone())
    }

    /// Checks the volume's current data against the model.
    pub async fn check(&self, env: &Env) {
        let got = read_volume(&env.driver, &self.v).await;
        assert_same(&got, &self.img, "volume");
    }
}

/// Writes `data` at `off` into volume `v`'s current image: pwrite on the raw file, or
/// `qemu-io` on the active qcow2 overlay.
pub async fn write_image(driver: &FileDriver, v: &Volume, off: u64, data: &[u8]) {
    let img = driver.active_image(v).unwrap();
    match driver.mode() {
        Mode::Qcow2 => {
            let src = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(src.path(), data).unwrap();
            let cmd = format!(
                "write -s {} {off} {}",
                src.path().to_str().unwrap(),
                data.len()
            );
            let out = duct::cmd!("qemu-io", "-f", "qcow2", "-c", &cmd, &img)
                .stderr_to_stdout()
                .stdout_capture()
                .unchecked()
                .run()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("wrote"),
                "qemu-io: {text}"
            );
        }
        _ => {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(data, off).unwrap();
            f.sync_all().unwrap();
        }
    }
}

/// Reads volume `v`'s current data (qcow2: converted to raw through its chain).
pub async fn read_volume(driver: &FileDriver, v: &Volume) -> Vec<u8> {
    let img = driver.active_image(v).unwrap();
    match driver.mode() {
        Mode::Qcow2 => {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("v.raw");
            duct::cmd!(
                "qemu-img", "convert", "-f", "qcow2", "-O", "raw", &img, &out
            )
            .run()
            .unwrap();
            std::fs::read(out).unwrap()
        }
        _ => std::fs::read(img).unwrap(),
    }
}

/// Reads a snapshot through `open_snapshot_reader` and checks it byte for byte against
/// `want`, and that its extents are sorted, in range, cover every non-zero 4 KiB block and
/// leave the unwritten space out.
pub async fn check_snapshot(driver: &FileDriver, s: &Snapshot, want: &[u8]) {
    let mut r = driver.open_snapshot_reader(s).await.unwrap();
    let extents = r.extents().to_vec();
    let size = r.size();
    let got = tokio::task::spawn_blocking(move || {
        let mut out = vec![0u8; size as usize];
        let mut off = 0usize;
        while off < out.len() {
            let end = (off + (1 << 20)).min(out.len());
            let n = r.read_at(off as u64, &mut out[off..end]).unwrap();
            assert!(n > 0, "short read at {off}");
            off += n;
        }
        let mut past = [0u8; 16];
        assert_eq!(r.read_at(size, &mut past).unwrap(), 0, "read past the end");
        out
    })
    .await
    .unwrap();
    assert_eq!(size, want.len() as u64, "snapshot size");
    assert_same(&got, want, &format!("snapshot {}", s.id));
    let mut prev_end = 0;
    for e in &extents {
        assert!(
            e.length > 0 && e.offset >= prev_end,
            "extents unsorted: {extents:?}"
        );
        assert!(
            e.offset + e.length <= size,
            "extent past the end: {extents:?}"
        );
        prev_end = e.offset + e.length;
    }
    for (i, block) in want.chunks(4096).enumerate() {
        if !is_zero(block) {
            let (start, end) = (i as u64 * 4096, i as u64 * 4096 + block.len() as u64);
            assert!(
                extents
                    .iter()
                    .any(|e| e.offset <= start && e.offset + e.length >= end),
                "data at {start}..{end} not covered by extents {extents:?}"
            );
        }
    }
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    let written = want.chunks(4096).filter(|b| !is_zero(b)).count() as u64 * 4096;
    // Holes stay holes: allow for allocation granularity (qcow2 clusters, fs blocks), but
    // nothing close to the whole image.
    assert!(
        covered <= written + 2 * MIB,
        "extents cover {covered} bytes for {written} written: {extents:?}"
    );
}

static ZERO: [u8; 4096] = [0; 4096];

/// Whether a block (at most 4 KiB) is all zeros. Slice comparisons are memcmp, fast even in
/// the unoptimized test build; byte-by-byte iterator loops over 64 MiB images are not.
pub fn is_zero(block: &[u8]) -> bool {
    block == &ZERO[..block.len()]
}

/// Asserts two images are equal, naming the first differing offset.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if got == want {
        return;
    }
    let block = got
        .chunks(4096)
        .zip(want.chunks(4096))
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let base = block * 4096;
    let i = base
        + got[base..]
            .iter()
            .zip(&want[base..])
            .position(|(a, b)| a != b)
            .unwrap_or(0);
    panic!(
        "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
        got[i], want[i]
    );
}

/// Names in a directory (sorted), for "nothing left behind" checks.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
