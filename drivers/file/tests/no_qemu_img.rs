//! The embedded default backend (`format = "auto"`) on a machine without qemu-img and without
//! reflink: it must still run, in raw full-copy mode, with one warning naming what would give
//! copy-on-write snapshots; an explicit `format = "qcow2"` is refused clearly; and the choice
//! is recorded, so opening the directory again once qemu-img is installed keeps the volumes
//! raw.
//!
//! qemu-img is found through `PATH`, and a test cannot change its own process's `PATH`
//! safely (other test threads read the environment), so the part without qemu-img runs in
//! this test binary re-executed with `PATH` set to an empty directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, MIB, Vol, check_snapshot};
use kiln_core::{ErrorKind, VolumeDriver, no_progress};
use kiln_driver_file::{FileConfig, Format, Mode};

/// Set in the re-executed child: the directory to work in.
const ENV_DIR: &str = "KILN_TEST_NO_QEMU_DIR";
const SIZE: u64 = 24 * MIB;

fn cfg(path: &Path, format: Format) -> FileConfig {
    let mut c = FileConfig::new(path);
    c.format = format;
    c
}

/// The backend directory, the model image file and the volume id file of one run.
fn paths(work: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        work.join("backend"),
        work.join("model.raw"),
        work.join("volume.id"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_without_reflink_or_qemu_img_runs_with_full_copies() {
    if let Ok(work) = std::env::var(ENV_DIR) {
        return without_qemu_img(Path::new(&work)).await;
    }
    let work = tempfile::tempdir().unwrap();
    let fs = duct::cmd!("stat", "-f", "-c", "%T", work.path())
        .read()
        .unwrap();
    assert!(
        fs.trim() == "ext2/ext3" || fs.trim() == "tmpfs",
        "the temp dir must be on a filesystem without reflink, found {fs}"
    );
    let empty = work.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "auto_without_reflink_or_qemu_img_runs_with_full_copies",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PATH", &empty)
        .env(ENV_DIR, work.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child did not run: {stdout}");
    // Exactly one warning, naming the package (and the alternative).
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("qemu-utils") && warnings[0].contains("XFS"),
        "{}",
        warnings[0]
    );

    // Back in this process, where qemu-img is installed: `auto` keeps raw full copies for
    // this directory, and the volume written without qemu-img reads back byte for byte.
    assert!(
        duct::cmd!("qemu-img", "--version").read().is_ok(),
        "this part needs qemu-img installed"
    );
    let (backend, model, id) = paths(work.path());
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backend.join("kiln-file-backend.json")).unwrap())
            .unwrap();
    assert_eq!(
        marker,
        serde_json::json!({"format": "raw", "full_copy": true})
    );
    let d = kiln_driver_file::open("again", cfg(&backend, Format::Auto))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::RawFullCopy);
    let id = std::fs::read_to_string(id).unwrap();
    let volume = std::fs::read(backend.join(format!("volume-{}", id.trim()))).unwrap();
    common::assert_same(&volume, &std::fs::read(model).unwrap(), "volume");
}

/// The child's part, with no qemu-img in `PATH`.
async fn without_qemu_img(work: &Path) {
    // The one line the parent checks: warnings and above, to stderr.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let (backend, model, id) = paths(work);

    // An explicit qcow2 backend cannot work: a clear configuration error, naming the tool
    // and its package.
    let e = kiln_driver_file::open("q", cfg(&work.join("q"), Format::Qcow2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(
        e.to_string().contains("qemu-img") && e.to_string().contains("qemu-utils"),
        "{e}"
    );

    let d = kiln_driver_file::open("default", cfg(&backend, Format::Auto))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::RawFullCopy);
    let caps = d.capabilities();
    assert!(
        !caps.thin && caps.snapshot_method.contains("full"),
        "{caps:?}"
    );
    let env = Env::with_driver(d, None);
    let dr = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    vol.scatter(&env, 1).await;
    let (s1, d1) = vol.snap(&env).await;
    vol.scatter(&env, 2).await;
    let (s2, d2) = vol.snap(&env).await;
    vol.write(&env, 3 * MIB, 4096, 3).await;
    check_snapshot(dr, &s1, &d1).await;
    check_snapshot(dr, &s2, &d2).await;
    vol.check(&env).await;
    dr.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1.clone();
    vol.check(&env).await;
    check_snapshot(dr, &s2, &d2).await;
    // Opening it again (every kiln command does) keeps the mode and warns no more.
    let again = kiln_driver_file::open("default", cfg(&backend, Format::Auto))
        .await
        .unwrap();
    assert_eq!(again.mode(), Mode::RawFullCopy);
    std::fs::write(model, &vol.img).unwrap();
    std::fs::write(id, vol.v.id.to_string()).unwrap();
}
