//! The qcow2 volume writer against the real qemu tools: data written through it (through a
//! private qemu-nbd) lands in the volume's active layer with qcow2 semantics — large writes
//! split, unaligned writes copied-on-write above a snapshot, zeroed ranges as zero clusters
//! rather than data — and snapshots taken before it stay exactly as they were. A writer
//! dropped without finishing leaves no qemu-nbd and no socket behind, a second writer on
//! the same volume is refused instead of waiting, and qemu-nbd outlives the thread that
//! opened the writer (the blocking pool's threads come and go).

mod common;

use std::path::{Path, PathBuf};

use common::{Env, MIB, Vol, check_snapshot, listing};
use kiln_core::{ErrorKind, Snapshot, Volume, VolumeDriver, VolumeWriter};

/// Every qemu-nbd process on the machine: (pid, argv).
fn qemu_nbd_argv() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue; // exited meanwhile
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.first().is_some_and(|a| a.ends_with("qemu-nbd")) {
            out.push((pid, argv));
        }
    }
    out
}

/// qemu-nbd processes serving a socket in `dir`, with that socket: (pid, socket).
fn qemu_nbd_in(dir: &Path) -> Vec<(u32, PathBuf)> {
    let want = format!("--socket={}/", dir.display());
    qemu_nbd_argv()
        .into_iter()
        .filter_map(|(pid, argv)| {
            let sock = argv.iter().find_map(|a| a.strip_prefix(&want))?;
            Some((pid, dir.join(sock)))
        })
        .collect()
}

/// Sockets in the backend directory.
fn sockets(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.ends_with(".sock"))
        .collect()
}

/// Nothing of any writer is left: no qemu-nbd serving this backend, no socket.
fn assert_no_server(env: &Env) {
    let dir = env.driver.path();
    assert_eq!(qemu_nbd_in(dir), vec![], "a qemu-nbd is still running");
    assert_eq!(sockets(dir), Vec::<String>::new(), "a socket was left");
}

/// The volume's record.
fn record(env: &Env, v: &Volume) -> serde_json::Value {
    let p = env
        .driver
        .path()
        .join(format!("volume-{}", v.id))
        .join("chain.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The volume's active file, from its record (read without the volume's lock, which an
/// open writer holds).
fn active_file(env: &Env, v: &Volume) -> PathBuf {
    let r = record(env, v);
    env.driver
        .path()
        .join(format!("volume-{}", v.id))
        .join(r["active"].as_str().unwrap())
}

/// The frozen file of snapshot `s`, as the driver reports its location.
async fn snapshot_file(env: &Env, s: &Snapshot) -> PathBuf {
    let up = env.driver.lookup_snapshot(s).await.unwrap().unwrap();
    PathBuf::from(up.provider_location.unwrap())
}

/// `qemu-img map` of `file` over `[start, end)`: every entry there reads as zeros and holds
/// no data cluster. With `own`, the entries must also be the file's own (depth 0): zero
/// clusters written into it, not holes showing its backing file.
fn assert_zero_not_data(file: &Path, start: u64, end: u64, own: bool) {
    let out = duct::cmd!(
        "qemu-img",
        "map",
        "-U",
        "--output=json",
        "-f",
        "qcow2",
        file
    )
    .read()
    .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut covered = 0;
    for m in &map {
        let (s, l) = (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap());
        if s + l <= start || s >= end {
            continue;
        }
        covered += (s + l).min(end) - s.max(start);
        assert_eq!(m["data"], false, "{start}..{end} allocated as data: {m}");
        assert_eq!(
            m["zero"], true,
            "{start}..{end} does not read as zeros: {m}"
        );
        if own {
            assert_eq!(
                m["depth"], 0,
                "{start}..{end} not zeroed in the file itself: {m}"
            );
        }
    }
    assert_eq!(covered, end - start, "map does not cover {start}..{end}");
}

/// Opens a writer through the async driver, as the service does.
async fn open(env: &Env, v: &Volume) -> Box<dyn VolumeWriter> {
    env.driver.open_volume_writer(v).await.unwrap()
}

/// Runs blocking writer calls off the runtime, as callers must.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Writes `data` at `off` through the writer and into the model.
fn put(w: &mut dyn VolumeWriter, img: &mut [u8], off: u64, data: &[u8]) {
    w.write_at(off, data).unwrap();
    img[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Zeroes `len` bytes at `off` through the writer and in the model.
fn zero(w: &mut dyn VolumeWriter, img: &mut [u8], off: u64, len: u64) {
    w.zero(off, len).unwrap();
    img[off as usize..(off + len) as usize].fill(0);
}

#[tokio::test]
async fn writes_read_back_and_zeroed_ranges_are_not_data() {
    let env = Env::qcow2().await;
    let size = 96 * MIB;
    let mut vol = Vol::create(&env, size).await;
    let active = active_file(&env, &vol.v);

    let mut w = open(&env, &vol.v).await;
    assert_eq!(w.size(), size);
    let img = std::mem::take(&mut vol.img);
    let (w, img) = blocking(move || {
        let mut img = img;
        let wr: &mut dyn VolumeWriter = &mut *w;
        // Larger than one NBD request (split), and unaligned at both ends.
        let big = kiln_testkit::pattern(1, (40 * MIB) as usize + 3);
        put(wr, &mut img, 4 * MIB + 512, &big);
        // Small, unaligned to sectors and clusters: qemu reads-modifies-writes.
        put(
            wr,
            &mut img,
            50 * MIB + 4097,
            &kiln_testkit::pattern(2, 10_000),
        );
        put(
            wr,
            &mut img,
            60 * MIB,
            &kiln_testkit::pattern(3, (8 * MIB) as usize),
        );
        put(
            wr,
            &mut img,
            70 * MIB,
            &kiln_testkit::pattern(4, (20 * MIB) as usize),
        );
        put(wr, &mut img, size - 4096, &kiln_testkit::pattern(5, 4096));
        // 1 MiB of cluster-aligned data made zero again.
        zero(wr, &mut img, 20 * MIB, MIB);
        // More than 32 MiB at once: one write-zeroes, no payload.
        zero(wr, &mut img, 58 * MIB, 34 * MIB);
        // A few bytes inside a cluster: written as zeros.
        zero(wr, &mut img, 10 * MIB + 100, 3000);
        (w, img)
    })
    .await;
    vol.img = img;
    blocking(move || w.finish()).await.unwrap();
    assert_no_server(&env);

    vol.check(&env).await;
    assert_zero_not_data(&active, 20 * MIB, 21 * MIB, true);
    assert_zero_not_data(&active, 58 * MIB, 92 * MIB, true);
    let (s, want) = vol.snap(&env).await;
    assert_eq!(snapshot_file(&env, &s).await, active);
    check_snapshot(&env.driver, &s, &want).await;
    assert_no_server(&env);
}

#[tokio::test]
async fn writes_above_a_snapshot_leave_it_unchanged() {
    let env = Env::qcow2().await;
    let size = 48 * MIB;
    let mut vol = Vol::create(&env, size).await;
    vol.write(&env, 0, (16 * MIB) as usize, 7).await;
    vol.write(&env, 30 * MIB, (4 * MIB) as usize, 8).await;
    let (s1, old) = vol.snap(&env).await;
    let frozen = snapshot_file(&env, &s1).await;
    let active = active_file(&env, &vol.v);
    assert_ne!(frozen, active);

    let w = open(&env, &vol.v).await;
    // qemu-nbd opened the backing chain read-only: the snapshot's file may still be
    // opened by anyone who needs it unshared, the active file may not.
    let info = |f: &Path| {
        duct::cmd!("qemu-img", "info", "--output=json", f)
            .stdout_null()
            .stderr_capture()
            .unchecked()
            .run()
            .unwrap()
    };
    let backing = info(&frozen);
    assert!(
        backing.status.success(),
        "the snapshot's file is write-locked: {}",
        String::from_utf8_lossy(&backing.stderr)
    );
    let top = info(&active);
    assert!(
        !top.status.success() && String::from_utf8_lossy(&top.stderr).contains("lock"),
        "qemu-nbd does not hold the active file"
    );

    let img = std::mem::take(&mut vol.img);
    let (w, img) = blocking(move || {
        let (mut w, mut img) = (w, img);
        let wr: &mut dyn VolumeWriter = &mut *w;
        // Partial clusters over the snapshot's data: copy-on-write keeps the rest.
        put(
            wr,
            &mut img,
            5 * MIB + 1000,
            &kiln_testkit::pattern(9, 70_000),
        );
        put(
            wr,
            &mut img,
            15 * MIB,
            &kiln_testkit::pattern(10, (3 * MIB) as usize),
        );
        // Data of the snapshot zeroed in the volume only.
        zero(wr, &mut img, 2 * MIB, MIB);
        zero(wr, &mut img, 30 * MIB + 512, 1024);
        (w, img)
    })
    .await;
    vol.img = img;
    blocking(move || w.finish()).await.unwrap();
    assert_no_server(&env);

    check_snapshot(&env.driver, &s1, &old).await;
    vol.check(&env).await;
    // Zero clusters in the active layer hide the snapshot's data under them.
    assert_zero_not_data(&active, 2 * MIB, 3 * MIB, true);
    let (s2, new) = vol.snap(&env).await;
    check_snapshot(&env.driver, &s2, &new).await;
    check_snapshot(&env.driver, &s1, &old).await;
}

#[tokio::test]
async fn a_dropped_writer_leaves_no_qemu_nbd_and_no_socket() {
    let env = Env::qcow2().await;
    let mut vol = Vol::create(&env, 16 * MIB).await;
    vol.write(&env, 0, MIB as usize, 1).await;

    let w = open(&env, &vol.v).await;
    let servers = qemu_nbd_in(env.driver.path());
    assert_eq!(servers.len(), 1, "{servers:?}");
    let (pid, sock) = servers[0].clone();
    assert!(sock.exists(), "{}", sock.display());
    let w = blocking(move || {
        let mut w = w;
        w.write_at(4096, &[0x5a; 8192]).unwrap();
        w
    })
    .await;
    blocking(move || drop(w)).await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu-nbd {pid} outlived its writer (or was not reaped)"
    );
    assert!(!sock.exists(), "{} left behind", sock.display());
    assert_no_server(&env);

    // The lock was released: the volume can be written and snapshotted again.
    let w = open(&env, &vol.v).await;
    blocking(move || w.finish()).await.unwrap();
    let (s, _) = vol.snap(&env).await;
    assert!(env.driver.lookup_snapshot(&s).await.unwrap().is_some());
    assert_no_server(&env);
}

#[tokio::test]
async fn a_second_writer_is_refused_while_one_is_open() {
    let env = Env::qcow2().await;
    let mut vol = Vol::create(&env, 16 * MIB).await;
    let w = open(&env, &vol.v).await;
    let e = env.driver.open_volume_writer(&vol.v).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(qemu_nbd_in(env.driver.path()).len(), 1);

    let img = std::mem::take(&mut vol.img);
    let (w, img) = blocking(move || {
        let (mut w, mut img) = (w, img);
        put(&mut *w, &mut img, MIB, &kiln_testkit::pattern(3, 5000));
        (w, img)
    })
    .await;
    vol.img = img;
    blocking(move || w.finish()).await.unwrap();
    assert_no_server(&env);

    // Once the first is finished, a writer opens again.
    let w = open(&env, &vol.v).await;
    blocking(move || w.finish()).await.unwrap();
    vol.check(&env).await;
    assert_no_server(&env);
}

/// The writer is opened on a thread that exits before the writer is used (what happens to
/// an idle blocking-pool thread): qemu-nbd, started to die with kiln, must not die with
/// that thread.
#[tokio::test]
async fn qemu_nbd_outlives_the_thread_that_opened_the_writer() {
    use kiln_core::BlockingDriver;
    let env = Env::qcow2().await;
    let mut vol = Vol::create(&env, 16 * MIB).await;
    let (driver, v) = (env.driver.clone(), vol.v.clone());
    let w = std::thread::spawn(move || BlockingDriver::open_volume_writer(&*driver, &v).unwrap())
        .join()
        .unwrap();
    let img = std::mem::take(&mut vol.img);
    let img = blocking(move || {
        let (mut w, mut img) = (w, img);
        put(
            &mut *w,
            &mut img,
            0,
            &kiln_testkit::pattern(11, (2 * MIB) as usize),
        );
        w.finish().unwrap();
        img
    })
    .await;
    vol.img = img;
    vol.check(&env).await;
    assert_no_server(&env);
}

#[tokio::test]
async fn out_of_range_writes_and_missing_volumes_are_refused() {
    let env = Env::qcow2().await;
    let vol = Vol::create(&env, 16 * MIB).await;
    let w = open(&env, &vol.v).await;
    blocking(move || {
        let mut w = w;
        let size = w.size();
        let e = w.write_at(size - 10, &[1u8; 11]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        let e = w.zero(size, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        // Refused before anything was sent: the writer still finishes.
        w.finish().unwrap();
    })
    .await;
    vol.check(&env).await;

    let missing = common::volume(16 * MIB);
    let e = env.driver.open_volume_writer(&missing).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_no_server(&env);
}

/// A backend directory whose path is too long for a unix socket address: the socket goes
/// into a private directory under the system temp directory, removed with the server.
#[tokio::test]
async fn a_long_backend_path_puts_the_socket_in_a_private_dir() {
    let tmp = tempfile::Builder::new()
        .prefix("kiln-qcow2-")
        .tempdir()
        .unwrap();
    let deep = tmp.path().join("d".repeat(60)).join("e".repeat(60));
    let mut cfg = kiln_driver_file::FileConfig::new(&deep);
    cfg.format = kiln_driver_file::Format::Qcow2;
    let driver = kiln_driver_file::open("qcow2-long", cfg).await.unwrap();
    let env = Env::with_driver(driver, Some(tmp));
    let mut vol = Vol::create(&env, 16 * MIB).await;

    let w = open(&env, &vol.v).await;
    // The server is found by the file it serves (a fresh layer name), its socket by argv.
    let active = active_file(&env, &vol.v);
    let name = active.file_name().unwrap().to_string_lossy().into_owned();
    let servers = qemu_nbd_argv()
        .into_iter()
        .filter(|(_, argv)| argv.last() == Some(&name))
        .collect::<Vec<_>>();
    assert_eq!(servers.len(), 1, "{servers:?}");
    let socket = servers[0]
        .1
        .iter()
        .find_map(|a| a.strip_prefix("--socket=").map(PathBuf::from))
        .unwrap();
    let private = socket.parent().unwrap().to_path_buf();
    assert!(
        socket.starts_with(std::env::temp_dir()),
        "{}",
        socket.display()
    );
    assert!(socket.as_os_str().len() <= 107);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", private.display());
    }

    let img = std::mem::take(&mut vol.img);
    let img = blocking(move || {
        let (mut w, mut img) = (w, img);
        put(&mut *w, &mut img, 123, &kiln_testkit::pattern(12, 100_000));
        w.finish().unwrap();
        img
    })
    .await;
    vol.img = img;
    assert!(!private.exists(), "{} left behind", private.display());
    vol.check(&env).await;
}
