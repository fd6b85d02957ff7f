//! Fixtures for the LVM tests: a private volume group on a loop device inside the UML guest,
//! volume/snapshot records, device I/O and expected-image bookkeeping.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_core::{Progress, ProviderUpdate, Snapshot, SnapshotReader, Volume, VolumeId};
use kiln_driver_lvm::{LvmConfig, LvmDriver, LvmType, open};

pub const MIB: u64 = 1 << 20;

/// The usual test volume size: 16 extents of 4 MiB.
pub const VOL: u64 = 64 * MIB;

/// A driver on `t`'s VG with `t`'s config (thin or thick, the defaults otherwise).
pub async fn driver(t: &TestVg) -> LvmDriver {
    open("lvm-test", t.config()).await.unwrap()
}

/// The location `create_*` returns and `lookup_*` must return: `vg/lv`.
pub fn loc(t: &TestVg, lv: &str) -> Option<ProviderUpdate> {
    Some(ProviderUpdate {
        provider_location: Some(format!("{}/{lv}", t.vg)),
    })
}

/// Panics unless we run as root inside the guest that `tests/harness/uml-run.sh` boots: the
/// host kernel has no device-mapper, and a test that silently skipped would prove nothing.
pub fn require_guest() {
    let in_guest = std::env::var("KILN_UML_GUEST").as_deref() == Ok("1");
    let dm = Path::new("/dev/mapper/control").exists();
    assert!(
        in_guest && dm,
        "the LVM tests must run inside the user-mode-Linux guest with device-mapper \
         (KILN_UML_GUEST={:?}, /dev/mapper/control exists: {dm}); run \
         tests/harness/lvm-suite.sh, or set \
         CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/harness/uml-run.sh",
        std::env::var("KILN_UML_GUEST").ok()
    );
}

static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Prints the time since the first call in this process (visible with `--nocapture`), so
/// slow steps under UML can be found.
pub fn step(what: &str) {
    let t0 = T0.get_or_init(std::time::Instant::now);
    eprintln!("[{:7.2}s] {what}", t0.elapsed().as_secs_f64());
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(argv: &[&str]) -> String {
    let out = duct::cmd(argv[0], &argv[1..])
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin_null()
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A volume group of its own on a sparse file in the guest's /tmp, removed on drop.
pub struct TestVg {
    pub vg: String,
    pub thin: bool,
    loopdev: String,
    file: PathBuf,
}

impl TestVg {
    /// A VG of `size_mib`; with `thin`, a thin pool `kiln-pool` using most of it.
    pub fn new(tag: &str, thin: bool, size_mib: u64) -> TestVg {
        require_guest();
        step(&format!("{tag}: setting up"));
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let vg = format!("kt-{tag}-{}-{n}", std::process::id());
        let file = PathBuf::from(format!("/tmp/{vg}.img"));
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(size_mib * MIB).unwrap();
        drop(f);
        let loopdev = run(&["losetup", "-f", "--show", file.to_str().unwrap()])
            .trim()
            .to_string();
        // vgcreate initialises the PV itself.
        run(&["vgcreate", "-q", &vg, &loopdev]);
        if thin {
            let pool_size = format!("{}m", size_mib * 3 / 4);
            run(&[
                "lvcreate",
                "-q",
                "--type",
                "thin-pool",
                "-Zy",
                "-L",
                &pool_size,
                "-n",
                "kiln-pool",
                &vg,
            ]);
        }
        step(&format!("{vg}: ready"));
        TestVg {
            vg,
            thin,
            loopdev,
            file,
        }
    }

    /// A config for this VG of the matching type.
    pub fn config(&self) -> LvmConfig {
        let mut c = LvmConfig::new(&self.vg);
        c.lvm_type = if self.thin {
            LvmType::Thin
        } else {
            LvmType::Thick
        };
        c.command_timeout_secs = 60;
        c
    }

    /// The device node of `lv` (as libdm names it).
    pub fn dev(&self, lv: &str) -> PathBuf {
        PathBuf::from(format!(
            "/dev/mapper/{}-{}",
            self.vg.replace('-', "--"),
            lv.replace('-', "--")
        ))
    }

    pub fn vol_dev(&self, v: &Volume) -> PathBuf {
        self.dev(&format!("volume-{}", v.id))
    }

    /// `name attr size` of every LV, sorted: a fingerprint of the VG's state.
    pub fn lv_state(&self) -> Vec<String> {
        let out = run(&[
            "lvs",
            "-a",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,lv_attr,lv_size,origin",
            &self.vg,
        ]);
        let mut v: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// `lv_attr` of one LV.
    pub fn attr(&self, lv: &str) -> String {
        run(&[
            "lvs",
            "--noheadings",
            "-o",
            "lv_attr",
            &format!("{}/{lv}", self.vg),
        ])
        .trim()
        .to_string()
    }

    /// Size of one LV in bytes.
    pub fn lv_size(&self, lv: &str) -> u64 {
        run(&[
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_size",
            &format!("{}/{lv}", self.vg),
        ])
        .trim()
        .parse()
        .unwrap()
    }

    /// Names of the LVs (hidden ones excluded).
    pub fn lv_names(&self) -> Vec<String> {
        let out = run(&["lvs", "--noheadings", "-o", "lv_name", &self.vg]);
        let mut v: Vec<String> = out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        step(&format!("{}: test body done", self.vg));
        let quiet = |argv: &[&str]| {
            let _ = duct::cmd(argv[0], &argv[1..])
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .stdout_null()
                .stderr_null()
                .unchecked()
                .run();
        };
        quiet(&["vgremove", "-q", "-f", &self.vg]);
        quiet(&["losetup", "-d", &self.loopdev]);
        let _ = std::fs::remove_file(&self.file);
        step(&format!("{}: removed", self.vg));
    }
}

fn record<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A fresh volume record of `size` bytes.
pub fn volume(size: u64) -> Volume {
    record(serde_json::json!({
        "id": VolumeId::new(), "name": null, "size_bytes": size, "backend": "lvm",
        "status": "available", "status_reason": null, "provider_location": null,
        "source_snapshot_id": null, "attachments": [],
        "created_at": "2026-11-22T00:00:00Z", "updated_at": "2026-11-22T00:00:00Z"
    }))
}

/// A fresh snapshot record of `v`.
pub fn snapshot(v: &Volume) -> Snapshot {
    record(serde_json::json!({
        "id": kiln_core::SnapshotId::new(), "volume_id": v.id, "name": null,
        "size_bytes": v.size_bytes, "backend": "lvm", "status": "creating",
        "status_reason": null, "provider_location": null, "forced": false,
        "created_at": "2026-11-22T00:00:00Z", "updated_at": "2026-11-22T00:00:00Z"
    }))
}

/// An attachment record.
pub fn attachment() -> kiln_core::Attachment {
    record(serde_json::json!({
        "instance_id": kiln_core::InstanceId::new(), "device": "/dev/vdb",
        "attached_at": "2026-11-22T00:00:00Z"
    }))
}

/// Granularity of the test patterns: every 64 KiB block of a write is
/// `pattern(seed << 32 | block index)`, so any part of the expected image can be computed
/// without generating whole writes.
pub const PBLOCK: u64 = 64 << 10;

fn pattern_block(seed: u64, block: u64) -> Vec<u8> {
    kiln_testkit::pattern((seed << 32) | block, PBLOCK as usize)
}

/// The volume's expected content as a log of writes, computed 1 MiB at a time.
///
/// Under UML every page a guest process touches for the first time costs a slow fault and a
/// host mapping (the host's `vm.max_map_count` caps a guest process at roughly 250 MiB), so
/// the tests never hold whole images: they keep write logs and compare in 1 MiB pieces.
#[derive(Clone)]
pub struct Image {
    pub size: u64,
    writes: Vec<(u64, u64, u64)>,
}

impl Image {
    pub fn zeros(size: u64) -> Image {
        Image {
            size,
            writes: Vec::new(),
        }
    }

    /// The same writes on a device of another size (clones larger than their snapshot).
    pub fn resized(&self, size: u64) -> Image {
        Image {
            size,
            writes: self.writes.clone(),
        }
    }

    /// Writes the pattern of `seed` over `len` bytes at `offset` (multiples of 64 KiB) to the
    /// device with pwrite, fsyncs, and records it in the model.
    pub fn write(&mut self, dev: &Path, offset: u64, len: usize, seed: u64) {
        assert!(offset.is_multiple_of(PBLOCK) && (len as u64).is_multiple_of(PBLOCK));
        let f = OpenOptions::new().write(true).open(dev).unwrap();
        let w = (offset, len as u64, seed);
        let mut buf = vec![0u8; MIB as usize];
        let mut off = offset;
        while off < offset + len as u64 {
            let n = MIB.min(offset + len as u64 - off);
            self_fill(&[w], off, &mut buf[..n as usize]);
            f.write_all_at(&buf[..n as usize], off).unwrap();
            off += n;
        }
        f.sync_all().unwrap();
        self.writes.push(w);
    }

    /// Expected bytes at `off` (64 KiB aligned) into `buf`.
    pub fn fill(&self, off: u64, buf: &mut [u8]) {
        buf.fill(0);
        self_fill(&self.writes, off, buf);
    }
}

fn self_fill(writes: &[(u64, u64, u64)], off: u64, buf: &mut [u8]) {
    let end = off + buf.len() as u64;
    for &(wo, wl, seed) in writes {
        let (s, e) = (wo.max(off), (wo + wl).min(end));
        let mut blk = s / PBLOCK * PBLOCK;
        while blk < e {
            let data = pattern_block(seed, blk / PBLOCK);
            let (from, to) = (blk.max(s), (blk + PBLOCK).min(e));
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - blk) as usize..(to - blk) as usize]);
            blk += PBLOCK;
        }
    }
}

static ZERO: [u8; 1 << 20] = [0; 1 << 20];

/// Whether a buffer (at most 1 MiB) is all zeros, by memcmp (fast even unoptimised).
pub fn zero(buf: &[u8]) -> bool {
    buf == &ZERO[..buf.len()]
}

#[track_caller]
fn assert_chunk(got: &[u8], want: &[u8], base: u64, what: &str) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) as u64;
        panic!(
            "{what}: first difference at byte {} (MiB {})",
            base + i,
            (base + i) / MIB
        );
    }
}

/// Compares a device with the model, 1 MiB at a time.
#[track_caller]
pub fn assert_dev(dev: &Path, want: &Image, what: &str) {
    let mut f =
        std::fs::File::open(dev).unwrap_or_else(|e| panic!("{what}: open {}: {e}", dev.display()));
    let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap();
    assert_eq!(size, want.size, "{what}: device size");
    let mut got = vec![0u8; MIB as usize];
    let mut exp = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < size {
        let n = MIB.min(size - off) as usize;
        f.read_exact_at(&mut got[..n], off).unwrap();
        want.fill(off, &mut exp[..n]);
        assert_chunk(&got[..n], &exp[..n], off, what);
        off += n as u64;
    }
}

/// Reads a snapshot through its reader 1 MiB at a time and compares it with the model; checks
/// that the extents are sorted and that nothing outside them holds data. Returns the extents.
#[track_caller]
pub fn assert_snapshot(
    mut r: Box<dyn SnapshotReader>,
    want: &Image,
    what: &str,
) -> Vec<kiln_core::Extent> {
    assert_eq!(r.size(), want.size, "{what}: image size");
    let extents = r.extents().to_vec();
    let mut pos = 0u64;
    for e in &extents {
        assert!(
            e.offset >= pos && e.length > 0,
            "{what}: bad extents {extents:?}"
        );
        pos = e.offset + e.length;
    }
    assert!(
        pos <= want.size,
        "{what}: extents beyond the end {extents:?}"
    );
    let mut got = vec![0u8; MIB as usize];
    let mut exp = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < want.size {
        let n = MIB.min(want.size - off) as usize;
        let mut k = 0;
        while k < n {
            let m = r.read_at(off + k as u64, &mut got[k..n]).unwrap();
            assert!(m > 0, "{what}: short read at {}", off + k as u64);
            k += m;
        }
        want.fill(off, &mut exp[..n]);
        assert_chunk(&got[..n], &exp[..n], off, what);
        // Outside the extents everything must read as zeros.
        let mut gap_start = off;
        let end = off + n as u64;
        for e in extents.iter().chain(std::iter::once(&kiln_core::Extent {
            offset: u64::MAX,
            length: 0,
        })) {
            let gap_end = e.offset.min(end);
            if gap_end > gap_start {
                let g = &got[(gap_start - off) as usize..(gap_end - off) as usize];
                assert!(
                    zero(g),
                    "{what}: data outside the extents in {gap_start}..{gap_end}"
                );
            }
            gap_start = gap_start.max(e.offset.saturating_add(e.length));
            if gap_start >= end {
                break;
            }
        }
        off += n as u64;
    }
    assert_eq!(
        r.read_at(want.size, &mut got).unwrap(),
        0,
        "{what}: read past the end"
    );
    extents
}

/// Compares `len` bytes of a device at `offset` with the model (both multiples of 64 KiB).
#[track_caller]
pub fn assert_dev_range(dev: &Path, want: &Image, offset: u64, len: u64, what: &str) {
    let f =
        std::fs::File::open(dev).unwrap_or_else(|e| panic!("{what}: open {}: {e}", dev.display()));
    let mut got = vec![0u8; MIB as usize];
    let mut exp = vec![0u8; MIB as usize];
    let mut off = offset;
    while off < offset + len {
        let n = MIB.min(offset + len - off) as usize;
        f.read_exact_at(&mut got[..n], off).unwrap();
        want.fill(off, &mut exp[..n]);
        assert_chunk(&got[..n], &exp[..n], off, what);
        off += n as u64;
    }
}

/// Reads `len` bytes of a device at `offset`.
pub fn read_range(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(dev).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

/// Checks that a whole device reads as zeros, 1 MiB at a time; returns its size.
#[track_caller]
pub fn assert_zero_dev(dev: &Path, what: &str) -> u64 {
    let f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            return off;
        }
        assert!(zero(&buf[..n]), "{what}: data at MiB {}", off / MIB);
        off += n as u64;
    }
}

/// Counts progress calls.
#[derive(Default)]
pub struct Counter {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

impl Progress for Counter {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::SeqCst);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::SeqCst);
    }
}

pub fn counter() -> (Arc<Counter>, kiln_core::ProgressHandle) {
    let c = Arc::new(Counter::default());
    (c.clone(), c)
}

/// One tracing event as [`capture`] saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: tracing::Level,
    /// The event's message.
    pub message: String,
    /// Every other field, `name=value` (Debug formatting), space-separated.
    pub fields: String,
}

impl Captured {
    /// For the driver's "command ok"/"command failed" events: the lvm subcommand (or the
    /// program) the command ran, i.e. the first element of its argv.
    pub fn command(&self) -> Option<String> {
        if self.message != "command ok" && self.message != "command failed" {
            return None;
        }
        let rest = &self.fields[self.fields.find("args=[\"")? + 7..];
        Some(rest[..rest.find('"')?].to_string())
    }
}

#[derive(Default)]
struct Collector {
    events: std::sync::Mutex<Vec<Captured>>,
    next_span: AtomicU64,
}

struct Sub(Arc<Collector>);

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest.push_str(&format!("{}={value} ", field.name()));
        }
    }
}

impl tracing::Subscriber for Sub {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.0.next_span.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        self.0.events.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            message: f.message,
            fields: f.rest,
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs `f` on this thread with a subscriber that records every tracing event (all levels);
/// returns `f`'s result and the events. Call the driver's blocking methods inside (the
/// async adapter would move them to other threads, out of this subscriber's reach).
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<Captured>) {
    let c = Arc::new(Collector::default());
    let r = tracing::subscriber::with_default(Sub(c.clone()), f);
    let events = c.events.lock().unwrap().clone();
    (r, events)
}

/// The lvm subcommands (argv[0] of `lvm`, or the program) that `events` record, in order.
pub fn commands(events: &[Captured]) -> Vec<String> {
    events.iter().filter_map(Captured::command).collect()
}
