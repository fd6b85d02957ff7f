//! Running the real `kiln` binary: a data directory and a config of the test's own, the
//! command built without the caller's kiln environment, its JSON parsed, its failures checked.
//! Backend-independent: what a backend needs (an XFS mount, a volume group) is the `fixture`
//! the harness keeps alive, and the backend's own state checks are impls on `Kiln<ItsFixture>`
//! in the file that owns it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_testkit::XfsMount;
use serde_json::Value;

/// How [`Kiln::run`] runs one command; the suites differ in what a run must guard against.
#[derive(Clone, Copy, Debug)]
pub enum Runner {
    /// `Command::output`, stdin inherited: a local filesystem, nothing that can hang.
    Plain,
    /// stdin closed, output piped; the command is killed and the test panics once it outlives
    /// the limit (a hang guard for commands that talk to a cluster, not a timing threshold).
    Bounded(Duration),
    /// stdin closed; each command's duration and exit code go to stderr (visible with
    /// `--nocapture`), to see where the time goes in a slow guest.
    Traced,
}

/// A kiln data directory (`<dir>/data`) and config (`<dir>/kiln.toml`) of a test's own, and
/// the backend `fixture` the config points at, kept alive as long as the harness.
///
/// The default fixture is the file backends' XFS mount (see `common::files`).
pub struct Kiln<F = XfsMount> {
    /// Declared first so that it is dropped first: a fixture's cleanup (removing a VG and its
    /// loop device) runs before the directory that may hold its backing file goes.
    pub fixture: F,
    /// The test's private directory: data dir, config and any scratch files.
    pub dir: tempfile::TempDir,
    /// The config file every [`Kiln::cmd`] passes with `--config`.
    pub config: PathBuf,
    runner: Runner,
    failure_stdout_empty: bool,
    /// With `KILN_TEST_STORE=postgres`: this harness's own database on the test process's
    /// throw-away PostgreSQL, which every command gets as `KILN_STORE_URL`.
    store_url: Option<String>,
}

/// The node name commands run as on a PostgreSQL store; backends in the tests' configs
/// that name no node are placed on it (see [`Kiln::cmd_with`]).
pub const TEST_NODE: &str = "kiln-test";

/// `None` on SQLite (the default); with `KILN_TEST_STORE=postgres`, a fresh database,
/// migrated by `kiln store migrate` — the suite then runs unchanged on the shared store.
fn test_store_url() -> Option<String> {
    match std::env::var("KILN_TEST_STORE").as_deref() {
        Err(_) | Ok("sqlite") => None,
        Ok("postgres") => {
            let url = kiln_testpg::PgServer::shared().create_database();
            let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["store", "migrate"])
                .env("KILN_STORE_URL", &url)
                .env_remove("KILN_CONFIG")
                .env("KILN_DATA_DIR", std::env::temp_dir())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "kiln store migrate: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(url)
        }
        Ok(other) => panic!("KILN_TEST_STORE={other:?}: use sqlite or postgres"),
    }
}

impl<F> Kiln<F> {
    /// Writes `config` to `<dir>/kiln.toml`; the data directory `<dir>/data` is left for kiln
    /// to create. Commands run with [`Runner::Plain`]; a failure is checked by its exit code
    /// and its one stderr line (see [`Kiln::failures_leave_stdout_empty`] for more).
    pub fn with_config(dir: tempfile::TempDir, config: &str, fixture: F) -> Kiln<F> {
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, config).unwrap();
        Kiln {
            fixture,
            dir,
            config: path,
            runner: Runner::Plain,
            failure_stdout_empty: false,
            store_url: test_store_url(),
        }
    }

    /// Every command of this harness runs with `runner`.
    pub fn runner(mut self, runner: Runner) -> Kiln<F> {
        self.runner = runner;
        self
    }

    /// [`Kiln::fails`] also asserts that a failed command wrote nothing to stdout.
    pub fn failures_leave_stdout_empty(mut self) -> Kiln<F> {
        self.failure_stdout_empty = true;
        self
    }

    /// The PostgreSQL database every command uses (`KILN_TEST_STORE=postgres`), or `None`
    /// on SQLite.
    pub fn store_url(&self) -> Option<&str> {
        self.store_url.as_deref()
    }

    /// The data directory every command is given (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A scratch path in the test's private directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The binary with only the data directory set, and none of the caller's kiln
    /// environment (fail points, data dir, config, log level) leaking into it.
    pub fn bare_cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--data-dir").arg(self.data_dir());
        c.env_remove("FAILPOINTS")
            .env_remove("KILN_DATA_DIR")
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_LOG")
            .env_remove("KILN_STORE_URL")
            .env_remove("KILN_NODE");
        if let Some(url) = &self.store_url {
            c.env("KILN_STORE_URL", url).env("KILN_NODE", TEST_NODE);
        }
        c
    }

    /// `kiln --data-dir <data> --config <config> ARGS…`, not yet run. On PostgreSQL, the
    /// config is given with `node = "kiln-test"` added to every backend that names neither
    /// a node nor `shared` (a shared store requires it of file and LVM backends), written
    /// next to it so that relative paths keep their meaning.
    pub fn cmd_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut c = self.bare_cmd();
        let config = match &self.store_url {
            Some(_) => placed(config),
            None => config.to_path_buf(),
        };
        c.arg("--config").arg(config).args(args);
        c
    }

    /// `kiln` with this harness's data dir and config and `args`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with(&self.config, args)
    }

    /// Runs `kiln ARGS…` with this harness's runner; returns its output whatever the exit.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        match self.runner {
            Runner::Plain => c.output().unwrap(),
            Runner::Bounded(limit) => run_bounded(c, limit).0,
            Runner::Traced => {
                c.stdin(Stdio::null());
                let t = Instant::now();
                let out = c
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run kiln {args:?}: {e}"));
                eprintln!(
                    "[{:6.2}s] kiln {args:?} -> {:?}",
                    t.elapsed().as_secs_f64(),
                    out.status.code()
                );
                out
            }
        }
    }

    /// Runs with `--format json` and asserts success; returns the output.
    fn run_json(&self, args: &[&str]) -> Output {
        let mut a = vec!["--format", "json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "kiln {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs with `--format json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        parse_json(args, &self.run_json(args))
    }

    /// Like [`Kiln::json`], and asserts that nothing reached stderr: at the default log
    /// level a successful command prints nothing there (a backend tool's own notes on the
    /// stderr of a successful command, such as lvm's "Rounding up size", must not be echoed).
    pub fn quiet_json(&self, args: &[&str]) -> Value {
        let out = self.run_json(args);
        assert!(
            out.stderr.is_empty(),
            "kiln {args:?} succeeded but wrote to stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json(args, &out)
    }

    /// Runs, asserts the exit code and a one-line `kiln: error: ` message (and, if this
    /// harness says so, no stdout); returns the message.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        if self.failure_stdout_empty {
            check_failure(args, &out, code)
        } else {
            check_error_line(args, &out, code)
        }
    }

    /// `kiln volume attach VID --instance INSTANCE --device DEVICE`, asserting success;
    /// returns the volume as printed.
    pub fn attach(&self, vid: &str, instance: &str, device: &str) -> Value {
        self.json(&[
            "volume",
            "attach",
            vid,
            "--instance",
            instance,
            "--device",
            device,
        ])
    }

    /// The store as the CLI lists it: (volumes, snapshots).
    pub fn store(&self) -> (Value, Value) {
        (
            self.json(&["volume", "list"]),
            self.json(&["snapshot", "list"]),
        )
    }

    /// Asserts that volume `volume` (as printed) holds exactly snapshot `snapshot`'s data:
    /// through a snapshot of it (removed again), compared byte for byte with the export.
    pub fn assert_holds(&self, volume: &Value, snapshot: &str, what: &str) {
        let id = volume["id"].as_str().expect("a volume id");
        let check = self.json(&["snapshot", "create", id]);
        let check = check["id"].as_str().expect("a snapshot id").to_string();
        let (got, _) = self.export(&check);
        let (want, _) = self.export(snapshot);
        assert!(
            got == want,
            "{what}: volume {id} differs from snapshot {snapshot}"
        );
        self.json(&["snapshot", "delete", &check]);
    }

    /// `kiln snapshot export ID --output FILE`: the file's bytes and the JSON summary (whose
    /// `snapshot_id` must be `sid`); the file is removed again.
    pub fn export(&self, sid: &str) -> (Vec<u8>, Value) {
        let f = self.path(&format!("export-{sid}-{}.raw", unique_token()));
        let e = self.json(&["snapshot", "export", sid, "--output", f.to_str().unwrap()]);
        assert_eq!(e["snapshot_id"], sid);
        let data = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        (data, e)
    }

    /// `kiln volume import-diff VOL` of a full stream ending at snapshot `a`, then of the
    /// incremental from `a` to `b`: asserts each took its end snapshot by name (the volume
    /// `available`, the incremental starting from `a`) and returns, for `a` then `b`, the id
    /// of the snapshot the import took, the original's bytes and the import's bytes.
    pub fn import_full_then_incremental(
        &self,
        vol: &str,
        full: &Path,
        inc: &Path,
        a: &str,
        b: &str,
    ) -> [(String, Vec<u8>, Vec<u8>); 2] {
        let import = |input: &Path| {
            self.json(&[
                "volume",
                "import-diff",
                vol,
                "--input",
                input.to_str().unwrap(),
            ])
        };
        let r1 = import(full);
        assert_eq!(r1["snapshot"]["name"], a, "{r1}");
        assert_eq!(r1["volume"]["status"], "available", "{r1}");
        let r2 = import(inc);
        assert_eq!(r2["snapshot"]["name"], b, "{r2}");
        assert_eq!(r2["stream"]["from"], a, "{r2}");
        [(a, &r1), (b, &r2)].map(|(orig, copy)| {
            let id = super::s(&copy["snapshot"], "id");
            let (want, _) = self.export(orig);
            let (got, _) = self.export(&id);
            (id, want, got)
        })
    }
}

/// Parses the stdout of `kiln ARGS…` as JSON, panicking with it when it is not.
fn parse_json(args: &[&str], out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kiln {args:?}: bad JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Asserts `out` is a failure with exit `code` and exactly one `kiln: error: ` line on
/// stderr; returns stderr.
pub fn check_error_line(args: &[&str], out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "kiln {args:?}: stderr {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "kiln {args:?}: expected one stderr line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("kiln: error: "),
        "kiln {args:?}: {stderr:?}"
    );
    stderr
}

/// [`check_error_line`], and nothing on stdout.
pub fn check_failure(args: &[&str], out: &Output, code: i32) -> String {
    let stderr = check_error_line(args, out, code);
    assert!(out.stdout.is_empty(), "kiln {args:?}: output on failure");
    stderr
}

/// Runs `cmd` with stdin closed and output piped; kills it and panics if it outlives `limit`.
/// Returns the output and how long the command took.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let what = format!("{cmd:?}");
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Both pipes drained while the child runs, so a chatty child cannot block on a full pipe.
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        out.read_to_end(&mut b).unwrap();
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        err.read_to_end(&mut b).unwrap();
        b
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {limit:?}: killed (hang)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = t0.elapsed();
    let output = Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    (output, elapsed)
}

/// A token no other call in this process returns (pid + counter): unique scratch names.
pub fn unique_token() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the calling test file's tests to one at a time while the guard lives (for tests
/// that share a backend and compare its whole state); a failed test does not poison the
/// others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `config` with every backend that has no placement placed on [`TEST_NODE`]; a file that
/// does not parse is passed as it is (the test checks kiln's refusal of it).
fn placed(config: &Path) -> PathBuf {
    let Ok(text) = std::fs::read_to_string(config) else {
        return config.to_path_buf();
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return config.to_path_buf();
    };
    if let Some(toml::Value::Table(backends)) = table.get_mut("backends") {
        for (_, b) in backends.iter_mut() {
            if let toml::Value::Table(b) = b
                && !b.contains_key("node")
                && !b.contains_key("shared")
            {
                b.insert("node".into(), TEST_NODE.into());
            }
        }
    }
    let out = config.with_extension("placed.toml");
    std::fs::write(&out, table.to_string()).unwrap();
    out
}
