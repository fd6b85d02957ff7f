//! A real `qemu-storage-daemon` standing in for the hypervisor of an instance: it opens
//! qcow2 volumes as block nodes and exports each over NBD (the guest's disks), with two QMP
//! monitors — one for kiln (an instance's `--qmp`), one for the test's own checks, because a
//! monitor serves one client at a time. Started as the test's child; killed (by its PID) on
//! drop. Needs `qemu-utils` (installed by `tests/install-deps.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::hypervisor::qmp::Qmp;

/// Hang guard for start-up and QMP replies (not a timing threshold).
const LIMIT: Duration = Duration::from_secs(60);

/// One qemu-storage-daemon.
pub struct Qsd {
    dir: PathBuf,
    child: Option<Child>,
    /// FUSE-exported disks (their mountpoints are unmounted on drop).
    fuse: Vec<PathBuf>,
}

/// How the daemon exports its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// Over NBD on [`Qsd::nbd_path`], each disk as the export named like its node.
    Nbd,
    /// As a regular file (`<dir>/<node>.raw`, [`Qsd::fuse_file`]) through FUSE: a loop
    /// device on it gives the host a block device that the daemon serves, so a guest
    /// filesystem can live on the volume while the daemon has it open.
    Fuse,
}

/// One disk the daemon serves: node `node` (with file child `<node>-file`) on the qcow2 file
/// `path`, exported over NBD as `node`.
pub struct Disk<'a> {
    /// The node (and export) name.
    pub node: &'a str,
    /// The qcow2 file (a volume's active layer).
    pub path: &'a Path,
}

impl Qsd {
    /// Starts a daemon with its sockets under `dir`, serving `disks`; returns once both
    /// monitors and the NBD server listen.
    pub fn start(dir: &Path, disks: &[Disk<'_>]) -> Qsd {
        Qsd::start_with(dir, disks, Export::Nbd)
    }

    /// [`Qsd::start`] with the disks exported as `export` says.
    pub fn start_with(dir: &Path, disks: &[Disk<'_>], export: Export) -> Qsd {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut cmd = Command::new("qemu-storage-daemon");
        let mut fuse = Vec::new();
        for (id, sock) in [("kiln", "qmp.sock"), ("test", "test-qmp.sock")] {
            cmd.arg("--chardev").arg(format!(
                "socket,id={id},path={},server=on,wait=off",
                dir.join(sock).display()
            ));
            cmd.arg("--monitor").arg(format!("chardev={id}"));
        }
        cmd.arg("--nbd-server").arg(format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ));
        for d in disks {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name={}-file,filename={}",
                d.node,
                d.path.display()
            ));
            cmd.arg("--blockdev")
                .arg(format!("driver=qcow2,node-name={0},file={0}-file", d.node));
            match export {
                Export::Nbd => cmd.arg("--export").arg(format!(
                    "type=nbd,id=e-{0},node-name={0},name={0},writable=on",
                    d.node
                )),
                Export::Fuse => {
                    let file = dir.join(format!("{}.raw", d.node));
                    std::fs::File::create(&file)
                        .unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
                    fuse.push(file.clone());
                    cmd.arg("--export").arg(format!(
                        "type=fuse,id=e-{},node-name={},mountpoint={},writable=on",
                        d.node,
                        d.node,
                        file.display()
                    ))
                }
            };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-storage-daemon (apt-get install qemu-utils): {e}"));
        let q = Qsd {
            dir: dir.to_path_buf(),
            child: Some(child),
            fuse,
        };
        let t = Instant::now();
        while !(q.qmp_path().exists()
            && q.test_qmp_path().exists()
            && q.nbd_path().exists()
            && q.fuse.iter().all(|f| is_mounted(f)))
        {
            assert!(t.elapsed() < LIMIT, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        q
    }

    /// The monitor socket kiln is given (an instance's `--qmp`).
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The test's own monitor socket.
    pub fn test_qmp_path(&self) -> PathBuf {
        self.dir.join("test-qmp.sock")
    }

    /// The NBD server's socket.
    pub fn nbd_path(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// A connection to the test's own monitor.
    pub fn monitor(&self) -> Qmp {
        Qmp::connect(&self.test_qmp_path().to_string_lossy(), LIMIT)
            .unwrap_or_else(|e| panic!("test monitor: {e}"))
    }

    /// The regular file through which the FUSE export of node `node` shows the disk.
    pub fn fuse_file(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.raw"))
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kills the daemon (a hypervisor that died) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed daemon leaves its FUSE mounts behind ("transport endpoint not connected").
        for f in self.fuse.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&f).output();
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `path` is a mountpoint (listed in /proc/self/mounts).
fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*path.to_string_lossy()))
    })
}

/// Waits (bounded) on monitor connection `mon` (the test's, see [`Qsd::monitor`]) for a job
/// whose id starts with `prefix`, and limits its speed to `bytes_per_sec`, so that the test
/// can act while it surely still runs (cancel it, kill kiln). Returns the job's id.
pub fn slow_down_job(mon: &mut Qmp, prefix: &str, bytes_per_sec: u64) -> String {
    let t = Instant::now();
    let id = loop {
        if let Some(j) = mon
            .jobs()
            .unwrap_or_else(|e| panic!("query-jobs: {e}"))
            .into_iter()
            .find(|j| j.id.starts_with(prefix))
        {
            break j.id;
        }
        assert!(t.elapsed() < LIMIT, "no job {prefix}* started");
        std::thread::sleep(Duration::from_millis(1));
    };
    mon.execute(
        "block-job-set-speed",
        Some(serde_json::json!({"device": id, "speed": bytes_per_sec})),
    )
    .unwrap_or_else(|e| panic!("block-job-set-speed: {e}"));
    id
}
