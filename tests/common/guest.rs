//! A "guest" on this host for the instance-snapshot tests: a real qemu-guest-agent run as the
//! test's own child on a unix socket (the way a hypervisor exposes the agent channel), and
//! guest filesystems on kiln volumes through loop devices.
//!
//! Host safety: the agent refuses the unfiltered `guest-fsfreeze-freeze` (every filesystem of
//! this host) and anything that runs or writes on the host (`--block-rpcs`); instances freeze
//! only their listed mountpoints (`guest-fsfreeze-freeze-list`). Every "guest" shares this
//! kernel, and qemu-ga's thaw thaws every frozen filesystem it sees, so tests that freeze must
//! run one at a time: `common::serial` within a test process, and a lock file every `Guest`
//! holds across processes — the host and RBD suites run side by side, and an RBD instance
//! test's thaw once thawed the host suite's frozen XFS in the middle of its deadline test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Kiln;

/// Hang guard for the guest's waits (not a timing threshold: far above any real run).
pub const GUEST_LIMIT: Duration = Duration::from_secs(180);

/// Runs `cmd ARGS…`, asserting success; returns its trimmed stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A host-side qemu-guest-agent on a unix socket, and guest filesystems on kiln volumes.
pub struct Guest {
    dir: PathBuf,
    /// The agent's socket (an instance's `--agent`).
    pub sock: PathBuf,
    agent: Option<Child>,
    /// (mountpoint, loop device) of each guest disk.
    pub disks: Vec<(PathBuf, String)>,
    /// The host-wide guest lock (see the module docs); dropped after the cleanup.
    _host_lock: std::fs::File,
}

/// Every test process that runs a guest on this kernel takes this lock for the guest's life.
const HOST_GUEST_LOCK: &str = "/tmp/kiln-tests-qemu-ga.lock";

/// Waits for the host-wide guest lock.
fn host_guest_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_GUEST_LOCK)
        .unwrap();
    // SAFETY: flock on a descriptor this function owns; blocks until the lock is free.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {HOST_GUEST_LOCK}: {}",
        std::io::Error::last_os_error()
    );
    f
}

impl Guest {
    /// Starts the agent under `dir/guest`.
    pub fn start(dir: &Path) -> Guest {
        let dir = dir.join("guest");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let host_lock = host_guest_lock();
        let mut g = Guest {
            sock: dir.join("qga.sock"),
            dir,
            agent: None,
            disks: vec![],
            _host_lock: host_lock,
        };
        g.start_agent();
        g
    }

    fn start_agent(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&self.sock)
            .arg("-t")
            .arg(self.dir.join("state"))
            .args([
                "-b",
                "guest-fsfreeze-freeze,guest-exec,guest-exec-status,guest-shutdown,guest-file-open,guest-file-write,guest-set-user-password,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-ga (apt-get install qemu-guest-agent)");
        self.agent = Some(child);
        let t = Instant::now();
        while !self.sock.exists() {
            assert!(
                t.elapsed() < GUEST_LIMIT,
                "qemu-ga never created its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where the `i`-th disk gets (or got) mounted.
    pub fn mountpoint(&self, i: usize) -> PathBuf {
        self.dir.join(format!("disk{i}"))
    }

    /// The agent's PID (to SIGSTOP it: an agent that hangs).
    pub fn agent_pid(&self) -> i32 {
        self.agent.as_ref().unwrap().id() as i32
    }

    /// Kills the agent (an agent that is down).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Formats `image` (a kiln volume's file) with `fs` through a loop device and mounts it:
    /// `ext4` with `commit=300`, which keeps ext4 from committing its journal on its own
    /// during a test, so what reaches the volume is what a freeze (or an fsync) forced
    /// there; or `xfs`, which has reflink, so a kiln backend can live inside the guest
    /// filesystem.
    pub fn disk_fs(&mut self, image: &Path, fs: &str) -> PathBuf {
        let dev = sh("losetup", &["-f", "--show", image.to_str().unwrap()]);
        let mp = self.mountpoint(self.disks.len());
        std::fs::create_dir_all(&mp).unwrap();
        self.disks.push((mp.clone(), dev.clone()));
        if fs == "xfs" {
            sh("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &dev]);
            sh("mount", &[&dev, mp.to_str().unwrap()]);
        } else {
            sh("mkfs.ext4", &["-q", "-F", &dev]);
            sh("mount", &["-o", "commit=300", &dev, mp.to_str().unwrap()]);
        }
        mp
    }

    /// [`Guest::disk_fs`] with ext4.
    pub fn disk_ext4(&mut self, image: &Path) -> PathBuf {
        self.disk_fs(image, "ext4")
    }

    /// The agent's view: `frozen` or `thawed` (kiln's own QGA client, as its recovery uses it).
    pub fn status(&self) -> String {
        let mut q =
            kiln_core::agent::qga::Qga::connect(self.sock.to_str().unwrap(), GUEST_LIMIT).unwrap();
        q.status().unwrap()
    }

    /// The guest can write and fsync on every disk again (a frozen filesystem blocks both):
    /// bounded, in a thread, so a frozen disk fails the test instead of hanging it.
    pub fn assert_writable(&self) {
        let mps: Vec<PathBuf> = self.disks.iter().map(|(mp, _)| mp.clone()).collect();
        let w = std::thread::spawn(move || {
            for mp in mps {
                let f = std::fs::File::create(mp.join("probe")).unwrap();
                f.sync_all().unwrap();
            }
        });
        let t = Instant::now();
        while !w.is_finished() {
            assert!(
                t.elapsed() < GUEST_LIMIT,
                "a guest filesystem stayed frozen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        w.join().unwrap();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for (mp, dev) in self.disks.iter().rev() {
            // A test that failed mid-freeze must not leave a frozen filesystem behind.
            let _ = Command::new("fsfreeze").arg("-u").arg(mp).output();
            let _ = Command::new("umount").arg(mp).output();
            let _ = Command::new("losetup").args(["-d", dev]).output();
        }
        self.kill_agent();
    }
}

/// Reads `/name` from the ext4 image `image` without mounting or replaying its journal: what
/// a crash would leave. `None` when the file is not there.
pub fn read_guest_file(image: &Path, name: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// A guest writer: buffered (never fsynced) `bseq` files on every disk, the same number on
/// each per iteration, one disk after the other; and, on the first disk, an `fseq` file
/// written and fsynced in a loop, each pass's start and end recorded.
///
/// Each `bseq` update is one fixed-width `pwrite` at offset 0 of a file created before the
/// loop, never a truncate: a cut between a truncate and its write would find it empty.
pub struct Writer {
    stop: Arc<AtomicBool>,
    /// The last number written to every `bseq`.
    pub seq: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<(SystemTime, SystemTime)>>>,
}

impl Writer {
    /// Starts writing on `disks` (and fsync passes on the first, with `fsync_pass`).
    pub fn start(disks: &[PathBuf], fsync_pass: bool) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let (stop, seq, disks) = (stop.clone(), seq.clone(), disks.to_vec());
            threads.push(std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                // One fixed-width write at offset 0 per iteration, never a truncate: a cut
                // between a truncate and its write would find the file empty.
                let files: Vec<std::fs::File> = disks
                    .iter()
                    .map(|d| std::fs::File::create(d.join("bseq")).unwrap())
                    .collect();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    for f in &files {
                        f.write_all_at(format!("{i:020}").as_bytes(), 0).unwrap();
                    }
                    seq.store(i, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
                vec![]
            }));
        }
        if fsync_pass {
            let (stop, disk) = (stop.clone(), disks[0].clone());
            threads.push(std::thread::spawn(move || {
                use std::io::Write;
                let mut passes = Vec::new();
                let mut f = std::fs::File::create(disk.join("fseq")).unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let t0 = SystemTime::now();
                    f.write_all(format!("{i}\n").as_bytes()).unwrap();
                    f.sync_all().unwrap();
                    passes.push((t0, SystemTime::now()));
                }
                passes
            }));
        }
        Writer { stop, seq, threads }
    }

    /// Waits until iteration `n` is written.
    pub fn wait_for(&self, n: u64) {
        let t = Instant::now();
        while self.seq.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < GUEST_LIMIT,
                "the guest writer makes no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops it; returns the fsync passes (start, end).
    pub fn stop(self) -> Vec<(SystemTime, SystemTime)> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// When kiln logged "guest frozen" and "guest thawing".
pub type Window = (DateTime<Utc>, DateTime<Utc>);

/// Runs `instance snapshot` with info logs as JSON; returns (exit code, stdout JSON or Null,
/// the timestamps of the "guest frozen" and "guest thawing" log lines).
pub fn snapshot_logged<F>(
    k: &Kiln<F>,
    instance: &str,
    extra: &[&str],
) -> (Option<i32>, Value, Option<Window>, String) {
    let mut args = vec![
        "--format",
        "json",
        "--log-format",
        "json",
        "instance",
        "snapshot",
        instance,
        "--name",
        "nightly",
    ];
    args.extend_from_slice(extra);
    let mut c = k.cmd(&args);
    c.env("KILN_LOG", "info");
    let (out, _) = super::run_bounded(c, GUEST_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let at = |msg: &str| {
        stderr.lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["fields"]["message"] == msg)
                .then(|| v["timestamp"].as_str()?.parse::<DateTime<Utc>>().ok())
                .flatten()
        })
    };
    let window = at("guest frozen").zip(at("guest thawing"));
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), json, window, stderr)
}
