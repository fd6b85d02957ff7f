//! A throw-away PostgreSQL server, as kiln's Ceph and LVM harnesses start their clusters:
//! `initdb` in a temporary directory, `postgres` on a free loopback port (and a Unix socket
//! in that directory), trust authentication for the superuser `kiln`.
//!
//! - Run as root, the server runs as the `postgres` system user (PostgreSQL refuses root);
//!   the Debian `postgresql` package creates it. Binaries come from `KILN_PG_BINDIR`, else
//!   the newest `/usr/lib/postgresql/*/bin`, else `PATH`.
//! - [`PgServer::shared`] is one server per test process, started on first use; the kernel
//!   ends it when the process exits, however it exits (a parent-death signal set on a
//!   thread that lives as long as the process). [`PgServer::start`] is an owned server that
//!   a test can stop and restart; dropping it stops it.
//! - Each test takes its own database ([`PgServer::create_database`]).
//! - Data directories of servers whose process died are removed by the next start.
//!
//! Missing PostgreSQL is a panic naming the package to install: a test that needs the
//! server fails, it never passes without it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections (a hang guard, not a target).
const START_LIMIT: Duration = Duration::from_secs(60);

/// Settings of a throw-away server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// fsync and synchronous commit on, as a production server (benchmarks); off for
    /// tests, which never cut the power.
    pub durable: bool,
    /// Also listen on this address (besides 127.0.0.1), trusting clients of its /24: a
    /// test that reaches the server through another network namespace.
    pub also_listen: Option<std::net::Ipv4Addr>,
}

/// A running throw-away server.
pub struct PgServer {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    options: Options,
    owner: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

impl PgServer {
    /// The test process's shared server (started on first use, non-durable).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| PgServer::start(Options::default()))
    }

    /// Starts a server of its own; dropping it stops it. Panics if PostgreSQL cannot start.
    pub fn start(options: Options) -> PgServer {
        remove_stale_dirs();
        let bindir = bindir();
        let dir = std::env::temp_dir().join(format!(
            "kiln-testpg-{}-{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let owner = server_user();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let data = dir.join("data");
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=kiln",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--pgdata")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("run {}/initdb: {e}", bindir.display()));
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(addr) = options.also_listen {
            let hba = data.join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba)
                .unwrap_or_else(|e| panic!("read {}: {e}", hba.display()));
            let [a, b, c, _] = addr.octets();
            text.push_str(&format!("host all all {a}.{b}.{c}.0/24 trust\n"));
            std::fs::write(&hba, text).unwrap_or_else(|e| panic!("write {}: {e}", hba.display()));
        }
        let server = PgServer {
            dir,
            bindir,
            port: free_port(),
            options,
            owner,
            child: Mutex::new(None),
        };
        server.run();
        server
    }

    /// Starts the server process on the existing data directory and waits until it
    /// accepts connections.
    fn run(&self) {
        let flag = if self.options.durable { "on" } else { "off" };
        let listen = match self.options.also_listen {
            Some(a) => format!("127.0.0.1,{a}"),
            None => "127.0.0.1".to_string(),
        };
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args(["-h", &listen, "-p", &self.port.to_string()])
            // A client whose network went away is noticed within ~4 s (and its session
            // and locks end), as the deployment docs recommend for production, shorter.
            .args(["-c", "tcp_keepalives_idle=2"])
            .args(["-c", "tcp_keepalives_interval=1"])
            .args(["-c", "tcp_keepalives_count=2"])
            .args(["-c", &format!("fsync={flag}")])
            .args(["-c", &format!("synchronous_commit={flag}")])
            .args(["-c", &format!("full_page_writes={flag}")])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("server.log"))
                    .unwrap_or_else(|e| panic!("open server.log: {e}")),
            ));
        as_owner(&mut cmd, self.owner);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal
        // (SIGQUIT: the postmaster's immediate shutdown, which also ends its backends).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_lasting_thread(cmd)
            .unwrap_or_else(|e| panic!("start {}/postgres: {e}", self.bindir.display()));
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            // The client is dropped on that thread too (closing it blocks).
            if off_runtime(|| {
                postgres::Client::connect(&self.url("postgres"), postgres::NoTls).map(drop)
            })
            .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within {START_LIMIT:?}; see {}",
                self.dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://kiln@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "kiln_test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let url = self.url("postgres");
        off_runtime(|| {
            let mut c = postgres::Client::connect(&url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"));
            c.batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        });
        self.url(&name)
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&self) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            // SAFETY: plain kill(2) of the child this server started.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Stops and starts the server again on the same data and port.
    pub fn restart(&self) {
        self.stop();
        self.run();
    }

    /// The server's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread of its own: the blocking `postgres` client starts a runtime, which
/// tokio forbids on a thread that drives one (an async test).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process. The parent-death signal
/// fires when the *thread* that forked the child ends, and test and blocking-pool threads
/// come and go; the server must live until its owner stops it or the process exits.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // The channel's sender lives in a static: this loop never ends.
        });
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        // std drops root's supplementary groups when it changes the uid.
        cmd.uid(uid).gid(gid);
    }
}

/// The user the server runs as: `postgres` when we are root, else ourselves.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = c"postgres";
    // SAFETY: getpwnam returns a pointer to static storage or NULL; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, the test PostgreSQL needs the `postgres` user: apt-get install postgresql"
    );
    // SAFETY: pw is non-null and points to a valid passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some((uid, gid))
}

fn bindir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_PG_BINDIR") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries (initdb, postgres): apt-get install postgresql, or set KILN_PG_BINDIR")
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("bind a loopback port: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port()
}

/// Removes `kiln-testpg-<pid>-N` directories whose process is gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("kiln-testpg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
