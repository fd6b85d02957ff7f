//! Forced (online) snapshots of real LVM volumes, thin and thick, while a writer is busy
//! rewriting them, inside the user-mode-Linux guest: the cut must land inside a writer pass,
//! at one point in time. Run with `tests/harness/lvm-suite.sh`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln_core::{DeleteAction, VolumeDriver};
use support::*;

/// The writer rewrites `REGION` in `BLOCK`-sized direct writes, one pass per generation.
const REGION: u64 = 8 * MIB;
const BLOCK: usize = 4096;
const BLOCKS: u64 = REGION / BLOCK as u64;

/// Block `i` of generation `g`: its header names both, the rest is a pattern derived from
/// them, so any block read back tells which write it came from, or that it is torn.
fn gen_block(g: u64, i: u64) -> Vec<u8> {
    let mut b = kiln_testkit::pattern((g << 32) | i, BLOCK);
    b[..8].copy_from_slice(&g.to_le_bytes());
    b[8..16].copy_from_slice(&i.to_le_bytes());
    b
}

/// The generation of block `i` as read back; panics on a torn or foreign block.
fn generation_of(block: &[u8], i: u64, what: &str) -> u64 {
    let g = u64::from_le_bytes(block[..8].try_into().unwrap());
    let idx = u64::from_le_bytes(block[8..16].try_into().unwrap());
    assert!(
        idx == i && g > 0 && block == gen_block(g, i).as_slice(),
        "{what}: block {i} is not a whole block of any generation (torn or foreign)"
    );
    g
}

/// Writes generation after generation of `REGION` with `O_DIRECT`, block by block in order
/// (each write completes before the next starts), counting completed blocks; checks `stop`
/// only between passes, so the volume ends holding one whole generation.
struct Writer {
    stop: AtomicBool,
    blocks: AtomicU64,
}

impl Writer {
    fn run(&self, dev: &std::path::Path) -> u64 {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .unwrap();
        // O_DIRECT needs a buffer aligned to the logical block size.
        let mut raw = vec![0u8; 2 * BLOCK];
        let at = raw.as_ptr().align_offset(BLOCK);
        let buf = &mut raw[at..at + BLOCK];
        let mut g = 0;
        while !self.stop.load(Ordering::SeqCst) {
            g += 1;
            for i in 0..BLOCKS {
                buf.copy_from_slice(&gen_block(g, i));
                f.write_all_at(buf, i * BLOCK as u64).unwrap();
                self.blocks.fetch_add(1, Ordering::SeqCst);
            }
        }
        g
    }

    /// Waits (polling the counter, however slow the machine) until `n` blocks are written.
    async fn reached(&self, n: u64) {
        while self.blocks.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn force_under_writes(thin: bool) {
    let t = TestVg::new(if thin { "force-thin" } else { "force-thick" }, thin, 512);
    let d = driver(&t).await;
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let dev = t.vol_dev(&v);
    let w = Arc::new(Writer {
        stop: AtomicBool::new(false),
        blocks: AtomicU64::new(0),
    });
    let writer = {
        let (w, dev) = (w.clone(), dev.clone());
        std::thread::spawn(move || w.run(&dev))
    };
    // Paced by the writer: the first pass complete (every block holds generation >= 1) and
    // the second under way.
    w.reached(BLOCKS + BLOCKS / 4).await;

    // A cut exactly between two passes (about 1 in BLOCKS) holds one whole generation and
    // shows nothing about a cut inside a pass; then another snapshot is taken.
    let mut found = None;
    let mut taken = Vec::new();
    for attempt in 1..=3 {
        let s = snapshot(&v);
        taken.push(s.clone());
        let before = w.blocks.load(Ordering::SeqCst);
        d.create_snapshot_force(&s, &v, &attachment())
            .await
            .unwrap();
        let after = w.blocks.load(Ordering::SeqCst);
        let what = format!("forced snapshot {attempt}");
        let mut r = d.open_snapshot_reader(&s).await.unwrap();
        assert_eq!(r.size(), VOL, "{what}: size");
        let mut gens = Vec::with_capacity(BLOCKS as usize);
        let mut blk = vec![0u8; BLOCK];
        for i in 0..BLOCKS {
            let n = r.read_at(i * BLOCK as u64, &mut blk).unwrap();
            assert_eq!(n, BLOCK, "{what}: short read");
            gens.push(generation_of(&blk, i, &what));
        }
        let mut rest = vec![0u8; MIB as usize];
        let mut pos = REGION;
        while pos < VOL {
            let n = r.read_at(pos, &mut rest).unwrap();
            assert!(
                n > 0 && zero(&rest[..n]),
                "{what}: data beyond the written region"
            );
            pos += n as u64;
        }
        drop(r);
        // One point in time: blocks 0..k of the newer generation, the rest of the one before.
        let newer = gens[0];
        let k = gens.iter().take_while(|g| **g == newer).count() as u64;
        assert!(
            gens[k as usize..].iter().all(|g| *g + 1 == newer),
            "{what}: not one cut of a sequential writer: generations {:?}",
            gens.chunks(64).map(|c| c[0]).collect::<Vec<_>>()
        );
        // The cut lies where the writer was while lvcreate ran: it had completed `before`
        // blocks when the call started, and at most one more than `after` when it returned
        // (a completed write is counted right after it returns).
        let cut = (newer - 1) * BLOCKS + k;
        assert!(
            (before..=after + 1).contains(&cut),
            "{what}: cut after {cut} blocks, outside the call ({before}..={after})"
        );
        eprintln!(
            "{what} ({}): writer at {before}..{after} blocks during lvcreate, cut after {cut} \
             (generation {newer}, block {k} of {BLOCKS})",
            if thin { "thin" } else { "thick" }
        );
        if k < BLOCKS {
            found = Some((newer, k));
            break;
        }
        // k == BLOCKS: a whole generation; the next pass is already being written.
    }
    let (newer, k) = found.expect("three cuts all fell exactly between passes");
    assert!(
        newer >= 2 && (1..BLOCKS).contains(&k),
        "the cut must split a pass: generation {newer}, block {k}"
    );
    // The writer kept going after the snapshot: one more full pass, then stop.
    let now = w.blocks.load(Ordering::SeqCst);
    w.reached(now + BLOCKS).await;
    w.stop.store(true, Ordering::SeqCst);
    let last = writer.join().unwrap();
    assert!(last > newer, "the writer wrote on after the snapshot");
    let region = read_range(&dev, 0, REGION as usize);
    for (i, blk) in region.chunks(BLOCK).enumerate() {
        assert_eq!(
            generation_of(blk, i as u64, "volume after the writer stopped"),
            last,
            "volume block {i}"
        );
    }
    for s in &taken {
        assert_eq!(d.delete_snapshot(s).await.unwrap(), DeleteAction::Deleted);
    }
}

#[tokio::test]
async fn thin_forced_snapshot_during_writes_cuts_one_pass_at_one_point() {
    force_under_writes(true).await;
}

#[tokio::test]
async fn thick_forced_snapshot_during_writes_cuts_one_pass_at_one_point() {
    force_under_writes(false).await;
}
