//! `connection_info` (Cinder's `initialize_connection` shape) on the file backend's three real
//! modes: the path it names is the image a hypervisor must open, so every test writes through
//! exactly that path (pwrite on raw, the real `qemu-io` on qcow2) and reads the result back
//! through the driver's own snapshot reader.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Env, MIB, Vol, check_snapshot, snapshot};
use kiln_core::{ConnectionInfo, ErrorKind, Volume, VolumeDriver, no_progress};
use kiln_driver_file::FileDriver;

const SIZE: u64 = 16 * MIB;

/// The connection info of `v`, checked for the shape every file volume has: type `file`,
/// exactly the keys `path` (absolute, existing) and `format` (the one given).
async fn info(d: &FileDriver, v: &Volume, format: &str) -> PathBuf {
    let ConnectionInfo {
        driver_volume_type,
        data,
    } = d.connection_info(v).await.unwrap();
    assert_eq!(driver_volume_type, "file");
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["format", "path"], "{data:?}");
    assert_eq!(data["format"], format, "{data:?}");
    let path = PathBuf::from(data["path"].as_str().unwrap());
    assert!(path.is_absolute() && path.is_file(), "{}", path.display());
    path
}

/// What a hypervisor writes into a raw image: pwrite + fsync on the path.
fn pwrite(path: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

/// What a hypervisor writes into a qcow2 image: the real qemu block layer (`qemu-io`) on the
/// path, flushed.
fn qemu_io_write(path: &Path, off: u64, data: &[u8]) {
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), data).unwrap();
    let cmd = format!("write -s {} {off} {}", src.path().display(), data.len());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &cmd, "-c", "flush"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("wrote"),
        "qemu-io: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info` of an image: (format, backing file name as written in the header).
fn header(path: &Path) -> (String, Option<String>) {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        info["format"].as_str().unwrap().to_string(),
        info["backing-filename"].as_str().map(str::to_string),
    )
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Raw modes: the path is the volume's own file (its `provider_location`), it stays the same
/// through snapshots and reverts, and what is written there is what snapshots hold.
async fn raw_path_is_the_volume_file(env: Env) {
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    let location = d.lookup_volume(&vol.v).await.unwrap().unwrap();
    let path = info(d, &vol.v, "raw").await;
    assert_eq!(location.provider_location, Some(path.display().to_string()));

    let a = kiln_testkit::pattern(1, MIB as usize);
    pwrite(&path, 3 * MIB, &a);
    vol.img[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&a);
    let (s1, d1) = vol.snap(&env).await;
    check_snapshot(d, &s1, &d1).await;
    assert_eq!(
        info(d, &vol.v, "raw").await,
        path,
        "a snapshot moved the volume"
    );

    let b = kiln_testkit::pattern(2, MIB as usize);
    pwrite(&path, 3 * MIB, &b);
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    assert_eq!(
        info(d, &vol.v, "raw").await,
        path,
        "a revert moved the volume"
    );
    // The revert brought the snapshot's data back under the same path.
    let mut got = vec![0u8; MIB as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut got, 3 * MIB)
        .unwrap();
    assert!(got == a, "the path does not show the reverted data");

    let e = d.connection_info(&common::volume(SIZE)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_reflink_path_is_the_volume_file() {
    raw_path_is_the_volume_file(Env::raw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_full_copy_path_is_the_volume_file() {
    raw_path_is_the_volume_file(Env::raw_full_copy().await).await;
}

/// qcow2: the path is the active layer (a qcow2 image, never `chain.json`); a snapshot moves
/// it to the new overlay backed by the frozen file, and what `qemu-io` writes through the
/// new path lands in the volume, not in the snapshot; a revert moves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_path_is_the_active_layer_and_follows_snapshots() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let mut vol = Vol::create(&env, SIZE).await;
    let vdir = d.path().join(format!("volume-{}", vol.v.id));
    let p0 = info(d, &vol.v, "qcow2").await;
    assert_eq!(p0.parent(), Some(vdir.as_path()));
    assert_ne!(file_name(&p0), "chain.json");
    assert_eq!(header(&p0), ("qcow2".into(), None));

    // Written through the path, seen by the snapshot.
    let a = kiln_testkit::pattern(1, 3 * MIB as usize / 2);
    qemu_io_write(&p0, MIB + 4096, &a);
    vol.img[(MIB + 4096) as usize..(MIB + 4096) as usize + a.len()].copy_from_slice(&a);
    let (s1, d1) = vol.snap(&env).await;

    // The snapshot froze p0; the volume continues in a new layer backed by it.
    let p1 = info(d, &vol.v, "qcow2").await;
    assert_ne!(p1, p0, "the path still names the frozen file");
    assert_eq!(p1.parent(), Some(vdir.as_path()));
    assert_eq!(header(&p1), ("qcow2".into(), Some(file_name(&p0))));
    let s1_location = d.lookup_snapshot(&s1).await.unwrap().unwrap();
    assert_eq!(
        s1_location.provider_location,
        Some(p0.display().to_string())
    );

    // Written through the new path: in the volume (the next snapshot shows it), not in s1.
    let b = kiln_testkit::pattern(2, MIB as usize);
    qemu_io_write(&p1, 2 * MIB, &b);
    vol.img[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&b);
    let (s2, d2) = vol.snap(&env).await;
    check_snapshot(d, &s1, &d1).await;
    check_snapshot(d, &s2, &d2).await;
    vol.check(&env).await;
    let p2 = info(d, &vol.v, "qcow2").await;
    assert!(p2 != p1 && p2 != p0);

    // A revert starts a new layer on s1's file: another path, showing s1's data.
    d.revert_to_snapshot(&vol.v, &s1, no_progress())
        .await
        .unwrap();
    vol.img = d1.clone();
    let p3 = info(d, &vol.v, "qcow2").await;
    assert!(p3 != p2 && p3 != p1 && p3 != p0);
    assert_eq!(header(&p3), ("qcow2".into(), Some(file_name(&p0))));
    let c = kiln_testkit::pattern(3, 4096);
    qemu_io_write(&p3, 0, &c);
    vol.img[..4096].copy_from_slice(&c);
    let (s3, d3) = vol.snap(&env).await;
    check_snapshot(d, &s3, &d3).await;
    check_snapshot(d, &s2, &d2).await;
    check_snapshot(d, &s1, &d1).await;

    let e = d.connection_info(&common::volume(SIZE)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// Asking where to connect is a read: it neither removes what an interrupted operation left
/// (the next operation does) nor answers with a layer that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_connection_info_changes_nothing_and_names_a_missing_layer() {
    let env = Env::qcow2().await;
    let d = &env.driver;
    let vol = Vol::create(&env, 8 * MIB).await;
    let vdir = d.path().join(format!("volume-{}", vol.v.id));
    let active = info(d, &vol.v, "qcow2").await;

    // A layer left by a snapshot interrupted before its record: kept by the read, removed
    // by the next operation.
    let stray = vdir.join(format!("layer-{}.qcow2", kiln_core::VolumeId::new()));
    std::fs::copy(&active, &stray).unwrap();
    let before = common::listing(&vdir);
    assert_eq!(info(d, &vol.v, "qcow2").await, active);
    assert_eq!(common::listing(&vdir), before);
    d.create_snapshot(&snapshot(&vol.v), &vol.v).await.unwrap();
    assert!(
        !stray.exists(),
        "the next operation did not remove the stray layer"
    );

    // The active layer removed behind kiln's back: an error naming it, not a dangling path.
    let active = info(d, &vol.v, "qcow2").await;
    let saved = d.path().join("saved-active-layer");
    std::fs::rename(&active, &saved).unwrap();
    let e = d.connection_info(&vol.v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains(&file_name(&active)), "{e}");
    std::fs::rename(&saved, &active).unwrap();
    assert_eq!(info(d, &vol.v, "qcow2").await, active);
}
