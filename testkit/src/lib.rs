//! Fixtures for kiln's tests against real components: a loop-mounted XFS filesystem with
//! reflink, deterministic data patterns, and the driver contract suite ([`contract`]). Tests panic on setup failure on purpose: a
//! missing `mkfs.xfs` or a non-root run must fail loudly, never skip silently.

pub mod contract;
pub mod cut;
pub mod nbd;
pub mod qsd;

use std::path::{Path, PathBuf};

/// A real XFS filesystem (reflink enabled) on a sparse image, loop-mounted for one test and
/// unmounted on drop. Needs root and `xfsprogs` (installed by `tests/install-deps.sh`).
pub struct XfsMount {
    _dir: tempfile::TempDir,
    mountpoint: PathBuf,
}

impl XfsMount {
    /// Creates and mounts a fresh XFS of `size_bytes` (sparse; at least 300 MiB for XFS).
    pub fn new(size_bytes: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-xfs-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let image = dir.path().join("fs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let f = std::fs::File::create(&image).unwrap_or_else(|e| panic!("create image: {e}"));
        f.set_len(size_bytes.max(300 << 20))
            .unwrap_or_else(|e| panic!("size image: {e}"));
        drop(f);
        run(&["mkfs.xfs", "-q", "-m", "reflink=1", path_str(&image)]);
        run(&[
            "mount",
            "-o",
            "loop",
            path_str(&image),
            path_str(&mountpoint),
        ]);
        XfsMount {
            _dir: dir,
            mountpoint,
        }
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        // Lazy unmount: a test that failed may still hold a file open; the loop device is
        // released when the last user goes away, and the temp dir removal then succeeds.
        let _ = duct::cmd!("umount", "-l", &self.mountpoint)
            .stderr_null()
            .unchecked()
            .run();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 temp path {p:?}"))
}

fn run(argv: &[&str]) {
    let out = duct::cmd(argv[0], &argv[1..])
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap_or_else(|e| panic!("{argv:?}: {e} (is it installed? run tests/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Deterministic, seed-dependent bytes (xorshift), so two patterns with different seeds
/// differ in every 8-byte word and a test can tell which write a block came from.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
