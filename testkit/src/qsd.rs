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
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut cmd = Command::new("qemu-storage-daemon");
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
            cmd.arg("--export").arg(format!(
                "type=nbd,id=e-{0},node-name={0},name={0},writable=on",
                d.node
            ));
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
        };
        let t = Instant::now();
        while !(q.qmp_path().exists() && q.test_qmp_path().exists() && q.nbd_path().exists()) {
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
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}
