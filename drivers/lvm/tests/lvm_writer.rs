//! The volume writer (`open_volume_writer`) against real LVM, thin and thick, inside the
//! user-mode-Linux guest: data written at any offset and zeroed ranges read back through the
//! device and through a snapshot byte for byte; on thin, zeroing unmaps whole pool chunks
//! instead of allocating them; writes are bounded by the volume's size; the writer undoes its
//! own activation and refuses a device in use. Run with `tests/harness/lvm-suite.sh writer`.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_core::{ErrorKind, Snapshot, SnapshotReader, VolumeDriver, VolumeWriter};
use support::*;

const K: u64 = 1 << 10;

/// A model of what the writer did: a base image (data written straight to the device before)
/// and the writer's writes and zeroed ranges on top, in order. Writes keep their data (a few
/// MiB), so any 1 MiB window can be computed.
#[derive(Clone)]
struct Model {
    base: Image,
    ops: Vec<(u64, Op)>,
}

#[derive(Clone)]
enum Op {
    Write(Vec<u8>),
    Zero(u64),
}

impl Model {
    fn new(base: Image) -> Model {
        Model {
            base,
            ops: Vec::new(),
        }
    }

    /// Expected bytes at `off` (64 KiB aligned) into `buf`.
    fn fill(&self, off: u64, buf: &mut [u8]) {
        self.base.fill(off, buf);
        let end = off + buf.len() as u64;
        for (at, op) in &self.ops {
            let len = match op {
                Op::Write(d) => d.len() as u64,
                Op::Zero(l) => *l,
            };
            let (s, e) = ((*at).max(off), (at + len).min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - off) as usize..(e - off) as usize];
            match op {
                Op::Write(d) => dst.copy_from_slice(&d[(s - at) as usize..(e - at) as usize]),
                Op::Zero(_) => dst.fill(0),
            }
        }
    }
}

/// Applies the write and records it in the model.
fn write(w: &mut dyn VolumeWriter, m: &mut Model, offset: u64, len: usize, seed: u64) {
    let data = kiln_testkit::pattern(seed, len);
    w.write_at(offset, &data)
        .unwrap_or_else(|e| panic!("write of {len} at {offset}: {e}"));
    m.ops.push((offset, Op::Write(data)));
}

/// Zeroes the range and records it in the model.
fn zero(w: &mut dyn VolumeWriter, m: &mut Model, offset: u64, len: u64) {
    w.zero(offset, len)
        .unwrap_or_else(|e| panic!("zero of {len} at {offset}: {e}"));
    m.ops.push((offset, Op::Zero(len)));
}

#[track_caller]
fn same(got: &[u8], want: &[u8], base: u64, what: &str) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) as u64;
        panic!(
            "{what}: first difference at byte {} (MiB {}): got {:#04x}, want {:#04x}",
            base + i,
            (base + i) / MIB,
            got[i as usize],
            want[i as usize]
        );
    }
}

/// Compares the whole device (the LV's slack included) with the model, 1 MiB at a time.
#[track_caller]
fn assert_device(dev: &Path, m: &Model, what: &str) {
    let f = std::fs::File::open(dev).unwrap_or_else(|e| panic!("{what}: {}: {e}", dev.display()));
    let size = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0)).unwrap();
    assert_eq!(size, m.base.size, "{what}: device size");
    let mut got = vec![0u8; MIB as usize];
    let mut exp = vec![0u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        f.read_exact_at(&mut got, off).unwrap();
        m.fill(off, &mut exp);
        same(&got, &exp, off, what);
    }
}

/// Reads a snapshot through its reader and compares its `size()` bytes with the model.
#[track_caller]
fn assert_reader(mut r: Box<dyn SnapshotReader>, m: &Model, size: u64, what: &str) {
    assert_eq!(r.size(), size, "{what}: image size");
    let mut got = vec![0u8; MIB as usize];
    let mut exp = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < size {
        let n = MIB.min(size - off) as usize;
        let mut k = 0;
        while k < n {
            let m = r.read_at(off + k as u64, &mut got[k..n]).unwrap();
            assert!(m > 0, "{what}: short read at {}", off + k as u64);
            k += m;
        }
        m.fill(off, &mut exp[..n]);
        same(&got[..n], &exp[..n], off, what);
        off += n as u64;
    }
    assert_eq!(
        r.read_at(size, &mut got).unwrap(),
        0,
        "{what}: past the end"
    );
}

/// Bytes of `lv` mapped in its thin pool (`data_percent` of its size; two decimals, so
/// within about 4 KiB on a 64 MiB LV).
fn mapped(t: &TestVg, lv: &str) -> u64 {
    let out = run(&[
        "lvs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "data_percent,lv_size",
        &format!("{}/{lv}", t.vg),
    ]);
    let mut f = out.split_whitespace();
    let pct: f64 = f.next().unwrap().parse().unwrap();
    let size: f64 = f.next().unwrap().parse().unwrap();
    (pct * size / 100.0).round() as u64
}

/// `mapped` is `want` to within a quarter of a 64 KiB pool chunk, i.e. exactly that many
/// chunks.
#[track_caller]
fn assert_mapped(t: &TestVg, lv: &str, want: u64, what: &str) {
    let got = mapped(t, lv);
    assert!(
        got.abs_diff(want) < 16 * K,
        "{what}: {got} bytes mapped, want {want} ({} chunks of 64 KiB)",
        want / (64 * K)
    );
}

/// The thin pool's chunk size in bytes.
fn pool_chunk(t: &TestVg) -> u64 {
    run(&[
        "lvs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "chunk_size",
        &format!("{}/kiln-pool", t.vg),
    ])
    .trim()
    .parse()
    .unwrap()
}

/// Runs blocking code (writer calls, and the drops that run `lvchange -an`) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn take_snapshot(d: &kiln_driver_lvm::LvmDriver, v: &kiln_core::Volume) -> Snapshot {
    let s = snapshot(v);
    d.create_snapshot(&s, v).await.unwrap();
    s
}

/// Whether `lv` is active (`lv_attr` state `a`).
fn active(t: &TestVg, lv: &str) -> bool {
    t.attr(lv).chars().nth(4) == Some('a')
}

async fn read_back(d: &kiln_driver_lvm::LvmDriver, s: &Snapshot, m: &Model, what: &'static str) {
    let r = d.open_snapshot_reader(s).await.unwrap();
    let (m, size) = (m.clone(), s.size_bytes);
    blocking(move || assert_reader(r, &m, size, what)).await;
}

/// Writes at unaligned offsets (a 9 MiB one among them), zeroes aligned and unaligned ranges
/// that held data (some over data the same writer just wrote, one written into again), and
/// is refused past the end without writing anything; after `finish` the device (its slack
/// untouched) and a snapshot read through `open_snapshot_reader` equal the model byte for
/// byte. Thin: exactly the whole pool chunks of the zeroed ranges are unmapped. A second
/// writer, with that snapshot alive, zeroes and writes again: the snapshot keeps its data. A
/// writer on an inactive LV activates it and deactivates it again; a device held open, a
/// second writer and a missing volume are refused.
async fn writes_zeroes_and_reads_back(thin: bool) {
    let t = TestVg::new(if thin { "wr-thin" } else { "wr-thick" }, thin, 512);
    let d = driver(&t).await;
    // 62 MiB: a 64 MiB LV whose last 2 MiB are slack the writer must not touch.
    let size = VOL - 2 * MIB;
    let v = volume(size);
    d.create_volume(&v).await.unwrap();
    let lv = format!("volume-{}", v.id);
    let dev = t.vol_dev(&v);
    assert_eq!(t.lv_size(&lv), VOL);
    // Data everywhere (the slack too), so every zeroed range held data.
    let mut base = Image::zeros(VOL);
    base.write(&dev, 0, VOL as usize, 1);
    if thin {
        assert_mapped(&t, &lv, VOL, "fully written");
        assert_eq!(
            pool_chunk(&t),
            64 * K,
            "the ranges below assume 64 KiB chunks"
        );
    }

    let w = d.open_volume_writer(&v).await.unwrap();
    assert_eq!(w.size(), size, "the volume's size, not its LV's");
    let m1 = blocking(move || {
        let mut w = w;
        let mut m = Model::new(base);
        let wr = w.as_mut();
        write(wr, &mut m, MIB + 1, 1000, 11);
        write(wr, &mut m, 4097, 70_000, 12);
        // 9 MiB at a sector- but not page-aligned offset.
        write(wr, &mut m, 5 * MIB + 1536, 9 << 20, 13);
        // Ends exactly at the end of the volume.
        write(wr, &mut m, size - 777, 777, 14);
        // Aligned: 32 whole chunks (thin: discarded).
        zero(wr, &mut m, 20 * MIB, 2 * MIB);
        // Unaligned, inside two chunks: zero bytes at the edges, BLKZEROOUT between.
        zero(wr, &mut m, 30 * MIB + 1234, 100 * K);
        // Unaligned edges around 16 whole chunks.
        zero(wr, &mut m, 40 * MIB - 5000, MIB + 10_000);
        // Over part of the 9 MiB just written (still in the page cache): 64 whole chunks.
        zero(wr, &mut m, 8 * MIB, 4 * MIB);
        // Fresh data, 8 whole chunks of it zeroed, then one of those written into again.
        write(wr, &mut m, 50 * MIB, MIB as usize, 15);
        zero(wr, &mut m, 50 * MIB + 64 * K, 512 * K);
        write(wr, &mut m, 50 * MIB + 128 * K + 100, 4000, 16);
        // Nothing past the end, not even the part before it (the device comparison below
        // shows nothing was written).
        let refused: [(&str, std::io::Result<()>); 7] = [
            ("across the end", wr.write_at(size - 10, &[0xAA; 20])),
            ("at the end", wr.write_at(size, &[0xAA])),
            ("overflowing", wr.write_at(u64::MAX - 1, &[0xAA; 4])),
            ("zero across the end", wr.zero(size - 4096, 8192)),
            ("zero at the end", wr.zero(size, 1)),
            ("zero overflowing", wr.zero(u64::MAX - 1, 10)),
            ("zero into the slack", wr.zero(size, MIB)),
        ];
        for (what, r) in refused {
            let e = r.expect_err(what);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{what}: {e}");
        }
        // Nothing at the end is nothing to refuse.
        wr.write_at(size, &[]).unwrap();
        wr.zero(size, 0).unwrap();
        w.finish().unwrap();
        m
    })
    .await;
    assert!(active(&t, &lv), "an active LV stays active");
    let m = m1.clone();
    let d1 = dev.clone();
    blocking(move || assert_device(&d1, &m, "device after the first writer")).await;
    // Unmapped: 2 + 1 + 4 MiB, and 8 chunks less the one written into again.
    let mapped1 = VOL - (7 * MIB + 7 * 64 * K);
    if thin {
        assert_mapped(&t, &lv, mapped1, "after zeroing");
    }
    let s1 = take_snapshot(&d, &v).await;
    read_back(&d, &s1, &m1, "snapshot 1").await;

    // A second writer while snapshot 1 is alive: the chunks it unmaps (thin) or rewrites
    // with zeros (thick, copied into the COW first) stay in the snapshot.
    let w = d.open_volume_writer(&v).await.unwrap();
    let m2 = {
        let m1 = m1.clone();
        blocking(move || {
            let mut w = w;
            let mut m = m1;
            zero(w.as_mut(), &mut m, 0, 8 * MIB);
            write(w.as_mut(), &mut m, 16 * MIB + 3, 5000, 21);
            w.finish().unwrap();
            m
        })
        .await
    };
    if thin {
        assert_mapped(&t, &lv, mapped1 - 8 * MIB, "shared chunks unmapped");
    }
    let m = m2.clone();
    let d1 = dev.clone();
    blocking(move || assert_device(&d1, &m, "device after the second writer")).await;
    read_back(&d, &s1, &m1, "snapshot 1 after the second writer").await;
    let s2 = take_snapshot(&d, &v).await;
    read_back(&d, &s2, &m2, "snapshot 2").await;

    // Inactive (after a reboot, say): activated for the writer, inactive again after.
    run(&["lvchange", "-q", "-an", &format!("{}/{lv}", t.vg)]);
    assert!(!active(&t, &lv));
    let w = d.open_volume_writer(&v).await.unwrap();
    assert!(active(&t, &lv), "the writer activates the LV");
    let m3 = {
        let m2 = m2.clone();
        blocking(move || {
            let mut w = w;
            let mut m = m2;
            write(w.as_mut(), &mut m, 60 * MIB, 64 * K as usize, 31);
            zero(w.as_mut(), &mut m, 24 * MIB, MIB);
            w.finish().unwrap();
            m
        })
        .await
    };
    assert!(!active(&t, &lv), "the writer deactivates what it activated");
    run(&["lvchange", "-q", "-ay", &format!("{}/{lv}", t.vg)]);
    let m = m3.clone();
    let d1 = dev.clone();
    blocking(move || assert_device(&d1, &m, "device after the writer of the inactive LV")).await;
    // A writer dropped without finish releases the device and its activation too.
    run(&["lvchange", "-q", "-an", &format!("{}/{lv}", t.vg)]);
    let w = d.open_volume_writer(&v).await.unwrap();
    blocking(move || drop(w)).await;
    assert!(
        !active(&t, &lv),
        "a dropped writer deactivates what it activated"
    );
    run(&["lvchange", "-q", "-ay", &format!("{}/{lv}", t.vg)]);

    // Refused: a device someone holds open, a second writer, a volume that does not exist.
    let before = t.lv_state();
    let held = std::fs::File::open(&dev).unwrap();
    let e = d
        .open_volume_writer(&v)
        .await
        .err()
        .expect("device held open");
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    drop(held);
    let w = d.open_volume_writer(&v).await.unwrap();
    let e = d
        .open_volume_writer(&v)
        .await
        .err()
        .expect("a second writer");
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    blocking(move || w.finish().unwrap()).await;
    let e = d
        .open_volume_writer(&volume(size))
        .await
        .err()
        .expect("a missing volume");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(t.lv_state(), before, "refused writers changed the VG");
    let d1 = dev.clone();
    blocking(move || assert_device(&d1, &m3, "device after the refusals")).await;
    read_back(&d, &s1, &m1, "snapshot 1 at the end").await;
}

#[tokio::test]
async fn thin_writer_writes_zeroes_and_reads_back() {
    writes_zeroes_and_reads_back(true).await;
}

#[tokio::test]
async fn thick_writer_writes_zeroes_and_reads_back() {
    writes_zeroes_and_reads_back(false).await;
}

/// Zeroing a whole fresh thin volume maps nothing; zeroing it with unaligned edges maps only
/// the two edge chunks; it reads zeros throughout. A pool set to `discards = ignore` takes no
/// discards: zeroing then writes zeros (the chunks stay mapped) and still reads zeros.
#[tokio::test]
async fn thin_writer_zeroing_allocates_nothing_and_falls_back_without_discards() {
    let t = TestVg::new("wr-fresh", true, 512);
    let d = driver(&t).await;
    let chunk = pool_chunk(&t);
    let v = volume(VOL);
    d.create_volume(&v).await.unwrap();
    let lv = format!("volume-{}", v.id);
    let dev = t.vol_dev(&v);
    assert_mapped(&t, &lv, 0, "fresh");

    let w = d.open_volume_writer(&v).await.unwrap();
    blocking(move || {
        let mut w = w;
        w.zero(0, VOL).unwrap();
        w.finish().unwrap();
    })
    .await;
    assert_mapped(&t, &lv, 0, "zeroing 64 MiB of a fresh volume");
    let w = d.open_volume_writer(&v).await.unwrap();
    blocking(move || {
        let mut w = w;
        w.zero(1000, VOL - 2000).unwrap();
        w.finish().unwrap();
    })
    .await;
    assert_mapped(&t, &lv, 2 * chunk, "unaligned edges: the two edge chunks");
    let d1 = dev.clone();
    assert_eq!(
        blocking(move || assert_zero_dev(&d1, "zeroed fresh volume")).await,
        VOL
    );

    // discards = ignore can only be set on an inactive pool.
    let mut img = Image::zeros(VOL);
    img.write(&dev, 0, 4 << 20, 2);
    let mapped = mapped(&t, &lv);
    run(&["vgchange", "-q", "-an", &t.vg]);
    run(&[
        "lvchange",
        "-q",
        "--discards",
        "ignore",
        &format!("{}/kiln-pool", t.vg),
    ]);
    let w = d.open_volume_writer(&v).await.unwrap();
    blocking(move || {
        let mut w = w;
        w.zero(0, 4 * MIB).unwrap();
        w.finish().unwrap();
    })
    .await;
    run(&["lvchange", "-q", "-ay", &format!("{}/{lv}", t.vg)]);
    let discards = run(&[
        "lvs",
        "--noheadings",
        "-o",
        "discards",
        &format!("{}/kiln-pool", t.vg),
    ]);
    assert_eq!(discards.trim(), "ignore");
    assert_mapped(&t, &lv, mapped, "zeros written, nothing unmapped");
    let d1 = dev.clone();
    blocking(move || assert_zero_dev(&d1, "zeroed without discards")).await;
}
