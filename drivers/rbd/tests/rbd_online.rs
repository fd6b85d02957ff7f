//! `create_snapshot_force` on an image that a second PROCESS is writing to while holding its
//! exclusive lock. The writer is this test binary re-executed (test `writer_process` with
//! `KILN_RBD_WRITER` set): it rewrites the blocks of a region strictly in order, pass after
//! pass, each block stamped with (pass, index) and filled with a pattern derived from both.
//! Since each write completes before the next starts, any point-in-time image of the region
//! is "blocks [0,k) from pass p, blocks [k,N) from pass p-1" for one cut point k — which is
//! what every snapshot must show, with no torn block.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use kiln_core::{DeleteAction, VolumeDriver};
use kiln_driver_rbd::cluster::Cluster;
use kiln_driver_rbd::image::Image;
use kiln_driver_rbd::volume_image;
use kiln_testkit::pattern;

const BLOCK: usize = 64 << 10;
/// 8 MiB region: two 4 MiB objects, so a cut can fall inside either or between them.
const BLOCKS: u64 = 128;
const MAGIC: u32 = 0x6b69_6c6e; // "kiln"
/// The writer gives up on its own after this long, whatever happens to the test.
const WRITER_MAX_SECS: u64 = 120;

fn block(pass: u64, index: u64) -> Vec<u8> {
    let mut b = pattern(pass << 32 | index, BLOCK);
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&pass.to_le_bytes());
    b[12..20].copy_from_slice(&index.to_le_bytes());
    b
}

/// The pass a block was written in (0 = never written), or an error for a torn/foreign block.
fn decode(index: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let pass = u64::from_le_bytes(b[4..12].try_into().unwrap());
    let idx = u64::from_le_bytes(b[12..20].try_into().unwrap());
    if magic != MAGIC || idx != index {
        return Err(format!(
            "block {index}: bad header (magic {magic:#x}, index {idx})"
        ));
    }
    if b != block(pass, index).as_slice() {
        return Err(format!(
            "block {index}: torn (header says pass {pass}, body differs)"
        ));
    }
    Ok(pass)
}

/// Checks the single-cut property; returns (pass p, cut k).
fn check_cut(region: &[u8]) -> Result<(u64, u64), String> {
    let passes: Vec<u64> = (0..BLOCKS)
        .map(|i| decode(i, &region[i as usize * BLOCK..(i as usize + 1) * BLOCK]))
        .collect::<Result<_, _>>()?;
    let p = passes[0];
    let k = passes.iter().take_while(|x| **x == p).count() as u64;
    let rest_ok = passes[k as usize..].iter().all(|x| p > 0 && *x == p - 1);
    if !rest_ok {
        return Err(format!("no single cut point: passes {passes:?}"));
    }
    Ok((p, k))
}

/// Writer mode: `KILN_RBD_WRITER=conf|image|stopfile`.
fn run_writer(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let [conf, image, stop] = parts.as_slice() else {
        panic!("bad KILN_RBD_WRITER {spec:?}");
    };
    let cfg = kiln_driver_rbd::RbdConfig {
        ceph_conf: PathBuf::from(conf),
        ..kiln_driver_rbd::RbdConfig::default()
    };
    let c = Arc::new(Cluster::connect_blocking(&cfg).unwrap());
    let img = Image::open(&c, image, None).unwrap();
    let started = Instant::now();
    let mut pass = 1u64;
    loop {
        for i in 0..BLOCKS {
            img.write(i * BLOCK as u64, &block(pass, i)).unwrap();
            if i == 0 && pass == 1 {
                println!("@@ LOCKED {}", img.is_exclusive_lock_owner().unwrap());
            }
        }
        println!("@@ PASS {pass}");
        pass += 1;
        if Path::new(stop).exists() || started.elapsed() > Duration::from_secs(WRITER_MAX_SECS) {
            break;
        }
    }
    drop(img);
    println!("@@ DONE");
}

/// In writer mode (re-executed by the test below) this is the writer. Run normally, it
/// checks the writer and the cut checker themselves: a finished writer leaves a region
/// whose cut is at the end of its last pass, and a torn block is detected.
#[test]
fn writer_process() {
    if let Ok(spec) = std::env::var("KILN_RBD_WRITER") {
        run_writer(&spec);
        return;
    }
    let mut region: Vec<u8> = (0..BLOCKS).flat_map(|i| block(3, i)).collect();
    assert_eq!(check_cut(&region).unwrap(), (3, BLOCKS));
    for i in 0..10 {
        region[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block(4, i as u64));
    }
    assert_eq!(check_cut(&region).unwrap(), (4, 10));
    region[20 * BLOCK + 100] ^= 1;
    assert!(check_cut(&region).unwrap_err().contains("torn"));
    region[20 * BLOCK + 100] ^= 1;
    region[30 * BLOCK..31 * BLOCK].copy_from_slice(&block(4, 30));
    assert!(check_cut(&region).unwrap_err().contains("no single cut"));
}

/// Kills the writer if the test fails half-way.
struct WriterGuard(Child);
impl Drop for WriterGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_snapshot_while_another_process_writes_is_point_in_time() {
    let d = driver().await;
    let v = create_volume(&d, SIZE).await;
    let image = volume_image(&v.id);
    // A plain snapshot first: the driver's cached handle of the image takes the exclusive
    // lock for it and keeps it while idle. The writer must get the lock anyway (librbd in
    // this process hands it over on request), and the forced snapshots below then go to
    // the writer as the lock owner.
    let s0 = take_snapshot(&d, &v).await;
    let ours = cli_watchers(&image);
    assert_eq!(ours.len(), 1, "the driver keeps one handle open: {ours:?}");
    assert_eq!(cli_locks(&image), vec![format!("auto {}", ours[0])]);
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let spec = format!("{}|{image}|{}", ceph_conf().display(), stop.display());
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_RBD_WRITER", &spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = WriterGuard(child);
    let out = guard.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        // libtest prints "test writer_process ... " right before the writer's first line,
        // so the writer tags its lines and only the tagged part is forwarded.
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(pos) = line.find("@@ ")
                && tx.send(line[pos + 3..].to_string()).is_err()
            {
                break;
            }
        }
    });
    // The driver closes a handle left unused for IDLE_CLOSE (3 s); on a loaded machine the
    // writer process can take longer than that to start and take the lock. While waiting,
    // the test keeps the cached handle in use (a no-op on it), so "still open" below tests
    // the lock handover, not the idle timer.
    let touch = || {
        // None once no handle is cached: nothing to keep open (the check below says so).
        let _ = d
            .image_handles()
            .with_cached(&image, |_| Ok::<(), std::convert::Infallible>(()));
    };
    let next_line = |what: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            touch();
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(l) if l.starts_with(what) => return l,
                Ok(_) => {}
                Err(_) if std::time::Instant::now() < deadline => {}
                Err(_) => panic!("writer process: no {what} within 60 s"),
            }
        }
    };
    let pass_of = |l: &str| l.trim_start_matches("PASS ").parse::<u64>().unwrap();
    assert_eq!(
        next_line("LOCKED"),
        "LOCKED true",
        "the writer must own the exclusive lock"
    );
    next_line("PASS");

    // The lock is the writer's, not ours.
    let c = Arc::clone(d.cluster());
    let img_name = image.clone();
    let owners = tokio::task::spawn_blocking(move || {
        let img = Image::open(&c, &img_name, None).unwrap();
        (
            img.lock_owners().unwrap(),
            img.is_exclusive_lock_owner().unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(owners.0.len(), 1, "one lock owner: {owners:?}");
    assert!(!owners.1, "the test's handle must not own the lock");
    let locks = cli_locks(&image);
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_ne!(
        locks[0],
        format!("auto {}", ours[0]),
        "the driver's cached handle gave the lock up to the writer"
    );
    assert!(cli_watchers(&image).contains(&ours[0]), "and is still open");

    let mut snaps = Vec::new();
    for _ in 0..3 {
        let before = pass_of(&next_line("PASS"));
        let mut s = snapshot(&v);
        s.forced = true;
        d.create_snapshot_force(&s, &v, &attachment())
            .await
            .unwrap();
        snaps.push((s, before));
    }
    std::fs::write(&stop, b"").unwrap();
    // Collect the passes the writer completed until it stopped.
    let mut final_pass = 0;
    loop {
        let l = next_line("");
        if l == "DONE" {
            break;
        }
        if l.starts_with("PASS ") {
            final_pass = pass_of(&l);
        }
    }
    let status = tokio::task::spawn_blocking(move || {
        let st = guard.0.wait().unwrap();
        drop(guard);
        st
    })
    .await
    .unwrap();
    assert!(status.success(), "writer process failed: {status}");

    let mut last = (0, 0);
    let mut mid_pass = false;
    for (s, before) in &snaps {
        let (data, _) = read_snapshot(&d, s).await;
        let (p, k) = check_cut(&data[..BLOCKS as usize * BLOCK])
            .unwrap_or_else(|e| panic!("snapshot {} is not point-in-time: {e}", s.id));
        eprintln!(
            "snapshot {}: pass {p}, cut at block {k} (writer was past pass {before})",
            s.id
        );
        assert!(
            (p, k) >= (*before, BLOCKS),
            "snapshot taken after pass {before} completed shows pass {p} cut {k}"
        );
        assert!((p, k) >= last, "snapshots go forward in time");
        last = (p, k);
        mid_pass |= k < BLOCKS;
        assert!(
            data[BLOCKS as usize * BLOCK..].iter().all(|b| *b == 0),
            "outside the region"
        );
    }
    assert!(
        (final_pass, BLOCKS) > last,
        "the writer kept writing after the snapshots (last pass {final_pass}, last snapshot at {last:?})"
    );
    // The writer never pauses between passes, so a cut exactly at a pass boundary in all
    // three snapshots would mean the snapshots did not happen mid-stream.
    assert!(
        mid_pass,
        "no snapshot cut through a pass: were the writes concurrent at all?"
    );
    for (s, _) in &snaps {
        assert_eq!(d.delete_snapshot(s).await.unwrap(), DeleteAction::Deleted);
    }
    assert_eq!(d.delete_snapshot(&s0).await.unwrap(), DeleteAction::Deleted);
    assert_eq!(d.delete_volume(&v).await.unwrap(), DeleteAction::Deleted);
}
