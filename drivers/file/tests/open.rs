//! `kiln_driver_file::open`: mode selection by probing the real filesystem (XFS with reflink vs.
//! this machine's ext4), the refusal messages, and the format marker.

use kiln_core::{ErrorKind, VolumeDriver};
use kiln_driver_file::{FileConfig, Format, Mode};

fn cfg(path: &std::path::Path, format: Format, allow_full_copy: bool) -> FileConfig {
    let mut c = FileConfig::new(path);
    c.format = format;
    c.allow_full_copy = allow_full_copy;
    c
}

/// The temp directory must really be on a filesystem without reflink for these tests to
/// mean anything.
fn no_reflink_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = duct::cmd!("stat", "-f", "-c", "%T", dir.path())
        .read()
        .unwrap();
    assert!(
        out.trim() == "ext2/ext3" || out.trim() == "tmpfs",
        "expected the temp dir on ext4 or tmpfs (no reflink), found {out}"
    );
    dir
}

#[tokio::test]
async fn raw_on_a_filesystem_without_reflink_is_refused_clearly() {
    let dir = no_reflink_dir();
    let e = kiln_driver_file::open("t", cfg(&dir.path().join("b"), Format::Raw, false))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let msg = e.to_string();
    for word in ["reflink", "allow_full_copy", "qcow2", "FICLONE"] {
        assert!(msg.contains(word), "message lacks {word:?}: {msg}");
    }
    // Nothing was recorded: the directory can still be opened in another mode.
    kiln_driver_file::open("t", cfg(&dir.path().join("b"), Format::Qcow2, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn auto_without_reflink_picks_qcow2() {
    let dir = no_reflink_dir();
    let d = kiln_driver_file::open("t", cfg(&dir.path().join("b"), Format::Auto, false))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::Qcow2);
    let c = d.capabilities();
    assert!(c.snapshot_method.contains("qcow2"), "{c:?}");
    assert!(!c.online_snapshot);
    assert_eq!(
        d.stats().await.unwrap().details["mode"],
        serde_json::json!("qcow2")
    );
}

#[tokio::test]
async fn full_copy_mode_says_so() {
    let dir = no_reflink_dir();
    let d = kiln_driver_file::open("t", cfg(dir.path(), Format::Raw, true))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::RawFullCopy);
    let c = d.capabilities();
    assert!(!c.thin && !c.clone_cow && !c.online_snapshot, "{c:?}");
    assert!(c.snapshot_method.contains("full"), "{c:?}");
}

#[tokio::test]
async fn auto_on_xfs_picks_reflink() {
    let xfs = kiln_testkit::XfsMount::new(300 << 20);
    let d = kiln_driver_file::open("t", cfg(xfs.path(), Format::Auto, false))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::RawReflink);
    let c = d.capabilities();
    assert!(
        c.thin && c.online_snapshot && c.revert_any && c.clone_cow,
        "{c:?}"
    );
    assert!(c.snapshot_method.contains("FICLONE"), "{c:?}");
    // qcow2 can be chosen explicitly on XFS too; but not once the directory holds raw volumes.
    let e = kiln_driver_file::open("t", cfg(xfs.path(), Format::Qcow2, false))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("raw"), "{e}");
    let other = xfs.path().join("q");
    let q = kiln_driver_file::open("t", cfg(&other, Format::Qcow2, false))
        .await
        .unwrap();
    assert_eq!(q.mode(), Mode::Qcow2);
    // Reopening with auto keeps the recorded format.
    let again = kiln_driver_file::open("t", cfg(&other, Format::Auto, false))
        .await
        .unwrap();
    assert_eq!(again.mode(), Mode::Qcow2);
    assert!(q.path().is_absolute());
}

#[tokio::test]
async fn unusable_directory_is_a_config_error() {
    let dir = no_reflink_dir();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = kiln_driver_file::open("t", cfg(&file, Format::Auto, false))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

#[tokio::test]
async fn qcow2_open_removes_reader_temp_files_of_dead_processes() {
    let dir = no_reflink_dir();
    let b = dir.path().join("b");
    std::fs::create_dir(&b).unwrap();
    // pid_max is at most 2^22, so this process cannot exist.
    let dead = b.join(".reader-999999999-snapshot-x-y.raw");
    let alive = b.join(format!(".reader-{}-snapshot-x-y.raw", std::process::id()));
    std::fs::write(&dead, b"stale").unwrap();
    std::fs::write(&alive, b"in use").unwrap();
    kiln_driver_file::open("t", cfg(&b, Format::Qcow2, false))
        .await
        .unwrap();
    assert!(!dead.exists(), "stale reader file kept");
    assert!(alive.exists(), "a live process's reader file was removed");
}

/// The reflink probe (a written, fsynced and cloned scratch file) runs once per filesystem:
/// the marker records the device it was proven on, the next open on that device trusts it,
/// and a marker naming another device (a moved directory) is probed again.
#[tokio::test]
async fn reflink_is_probed_once_per_filesystem() {
    use std::os::unix::fs::MetadataExt;
    let xfs = kiln_testkit::XfsMount::new(300 << 20);
    let dir = xfs.path().join("b");
    let d = kiln_driver_file::open("t", cfg(&dir, Format::Auto, false))
        .await
        .unwrap();
    assert_eq!(d.mode(), Mode::RawReflink);
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("kiln-file-backend.json")).unwrap())
            .unwrap();
    let dev = std::fs::metadata(&dir).unwrap().dev();
    assert_eq!(marker["reflink_dev"], dev, "{marker}");
    drop(d);
    // A directory on ext4 whose marker claims reflink was proven on the XFS device: the
    // claim is not trusted (another device), the probe runs and refuses raw mode.
    let plain = no_reflink_dir();
    let moved = plain.path().join("b");
    std::fs::create_dir(&moved).unwrap();
    std::fs::write(
        moved.join("kiln-file-backend.json"),
        format!("{{\"format\": \"raw\", \"reflink_dev\": {dev}}}"),
    )
    .unwrap();
    let e = kiln_driver_file::open("t", cfg(&moved, Format::Raw, false))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("FICLONE"), "{e}");
}
