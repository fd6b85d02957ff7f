//! Online (force) snapshots of a raw volume on real XFS while ANOTHER PROCESS writes to it.
//!
//! The writer (this test binary re-executed with `KILN_TEST_WRITER_FILE` set) writes
//! generation g to blocks 0..N in order, one pwrite per block, each block stamped with
//! (g, index) and a checksum; then g+1, and so on. A point-in-time image must show every
//! block intact (not torn) and a single cut point k: blocks < k carry g+1, blocks >= k carry g.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, MIB, Vol, snapshot};
use kiln_core::{Attachment, InstanceId, VolumeDriver};
use kiln_testkit::cut::{BLOCK, check_image, parse, stamp};

const BLOCKS: u64 = 2048; // 8 MiB written per generation
const ENV_FILE: &str = "KILN_TEST_WRITER_FILE";
const ENV_STOP: &str = "KILN_TEST_WRITER_STOP";
/// The writer stops by itself after this long even if nobody tells it to.
const WRITER_MAX: Duration = Duration::from_secs(60);

fn write_generation(bases: &[Vec<u64>], f: &std::fs::File, generation: u64) {
    let mut buf = [0u8; BLOCK];
    for i in 0..BLOCKS {
        stamp(&bases[i as usize], generation, i, &mut buf);
        f.write_all_at(&buf, i * BLOCK as u64).unwrap();
    }
}

/// The writer process's body, when this binary is re-executed by the test below; run
/// normally, it checks that the block format catches torn and misplaced blocks.
#[test]
fn writer_child() {
    let bases = kiln_testkit::cut::bases(BLOCKS);
    let Ok(path) = std::env::var(ENV_FILE) else {
        let mut a = [0u8; BLOCK];
        stamp(&bases[7], 3, 7, &mut a);
        assert_eq!(parse(&bases, &a, 7), Ok(3));
        assert!(parse(&bases, &a, 8).is_err(), "misplaced block accepted");
        let mut b = [0u8; BLOCK];
        stamp(&bases[7], 4, 7, &mut b);
        for cut in [8, 512, 2048, 4088] {
            let mut torn = a;
            torn[cut..].copy_from_slice(&b[cut..]);
            assert!(
                parse(&bases, &torn, 7).is_err(),
                "block torn at {cut} accepted"
            );
        }
        let mut img = vec![0u8; BLOCK * BLOCKS as usize];
        for (i, blk) in img.chunks_mut(BLOCK).enumerate() {
            stamp(&bases[i], if i < 100 { 5 } else { 4 }, i as u64, blk);
        }
        assert_eq!(check_image(&bases, &img), Ok((5, 100)));
        let n = img.len();
        stamp(
            &bases[BLOCKS as usize - 1],
            5,
            BLOCKS - 1,
            &mut img[n - BLOCK..],
        );
        assert!(
            check_image(&bases, &img).is_err(),
            "two cut points accepted"
        );
        return;
    };
    let stop = std::env::var(ENV_STOP).unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let start = Instant::now();
    let mut generation = 1;
    while !Path::new(&stop).exists() && start.elapsed() < WRITER_MAX {
        write_generation(&bases, &f, generation);
        generation += 1;
    }
    eprintln!("writer: wrote {} generations", generation - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_force_snapshots_are_point_in_time_under_a_concurrent_writer() {
    let env = Env::raw().await;
    let d = &env.driver;
    let vol = Vol::create(&env, 16 * MIB).await;
    let bases = kiln_testkit::cut::bases(BLOCKS);
    let path = d.active_image(&vol.v).unwrap();
    {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        write_generation(&bases, &f, 0);
        f.sync_all().unwrap();
    }
    let stop = d.path().join("writer.stop");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
        .env(ENV_FILE, &path)
        .env(ENV_STOP, &stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Block 0 is the first block of every generation: its stamp tells which generation the
    // writer is in.
    let f = std::fs::File::open(&path).unwrap();
    let wait_for_generation = |min: u64| {
        let started = Instant::now();
        loop {
            let mut hdr = [0u8; 8];
            f.read_exact_at(&mut hdr, 0).unwrap();
            if u64::from_le_bytes(hdr) >= min {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "writer process did not reach generation {min}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    };

    let attachment = Attachment::new(InstanceId::new(), "/dev/vdb");
    let mut snaps = Vec::new();
    for i in 0..8u64 {
        // Each snapshot lands in a later generation than the one before (so the writer is
        // provably running across them), at a varying point inside it.
        wait_for_generation(i + 1);
        std::thread::sleep(Duration::from_millis(i * 7 % 20));
        let s = snapshot(&vol.v);
        d.create_snapshot_force(&s, &vol.v, &attachment)
            .await
            .unwrap();
        snaps.push(s);
    }
    let writer_running = child.try_wait().unwrap().is_none();
    std::fs::write(&stop, b"").unwrap();
    let waited = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if waited.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("writer process did not stop");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "writer failed: {log}");
    assert!(writer_running, "writer stopped early: {log}");
    assert!(log.contains("writer: wrote"), "writer did not run: {log}");

    let (mut newest, mut cuts) = (Vec::new(), Vec::new());
    for s in &snaps {
        let mut r = d.open_snapshot_reader(s).await.unwrap();
        let mut img = vec![0u8; BLOCK * BLOCKS as usize];
        let mut off = 0;
        while off < img.len() {
            let n = r.read_at(off as u64, &mut img[off..]).unwrap();
            assert!(n > 0);
            off += n;
        }
        let (g, k) = check_image(&bases, &img).unwrap_or_else(|e| panic!("snapshot {}: {e}", s.id));
        newest.push(g);
        cuts.push(k);
    }
    eprintln!("newest generation per snapshot: {newest:?}, cut points: {cuts:?}");
    // The snapshots really landed while a generation was being written (not only between
    // generations), so the cut-point check above had something to check.
    assert!(
        cuts.iter().any(|k| *k > 0 && *k < BLOCKS as usize),
        "no snapshot landed inside a generation: {cuts:?}"
    );
    for (i, g) in newest.iter().enumerate() {
        assert!(
            *g > i as u64,
            "snapshot {i} shows generation {g}, taken after {}",
            i + 1
        );
    }
}
