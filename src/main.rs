//! The `kiln` command: parses and validates arguments, opens the service through
//! `kiln-runtime`, runs one job, prints its result.
//!
//! Order matters: every argument is checked (ids, sizes, labels, devices, statuses) before
//! the store or any backend is touched, so bad input changes nothing and costs nothing; and
//! backends open only when the job needs them.

mod backup_cmd;
mod bench_api;
mod cli;
mod demo;
mod demo_hypervisor;
mod export;
mod instance_cmd;
mod job;
mod output;
mod serve_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use kiln_core::service::Service;
use kiln_core::{Error, Progress, ProgressHandle, Result};

use cli::{Cli, Format, LogFormat};
use job::Job;

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    // Commands are quiet by default: stdout carries results, stderr only what an operator
    // must see. The server logs at info (one access line per request).
    let filter =
        EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// One line, always: scripts grep it and people read it.
fn fail(e: &Error) -> i32 {
    let msg = e.to_string().replace('\n', " ");
    eprintln!("kiln: error: {msg}");
    e.kind().exit_code()
}

fn main() {
    let _failpoints = kiln_core::crash::setup();
    let cli = Cli::parse();
    if let cli::Command::AgentGuard(g) = &cli.command {
        // The freeze guard: no logging, no store, no runtime — only the agent and a pipe.
        let req = kiln_core::agent::FreezeRequest {
            agent: g.agent.clone(),
            mountpoints: g.mountpoint.clone(),
            deadline: std::time::Duration::from_millis(g.deadline_ms),
            timeout: std::time::Duration::from_millis(g.timeout_ms),
        };
        std::process::exit(kiln_core::agent::run_guard(
            &req,
            std::io::stdin(),
            std::io::stdout(),
        ));
    }
    if let cli::Command::Serve(args) = &cli.command {
        init_logging(cli.log_format, "info");
        std::process::exit(
            match serve_cmd::run(args, cli.config.as_deref(), cli.data_dir.clone()) {
                Ok(()) => 0,
                Err(e) => fail(&e),
            },
        );
    }
    init_logging(cli.log_format, "warn");
    if let cli::Command::Store(cli::StoreCmd::Migrate) = &cli.command {
        std::process::exit(
            match migrate(cli.config.as_deref(), cli.data_dir.clone(), cli.format) {
                Ok(()) => 0,
                Err(e) => fail(&e),
            },
        );
    }
    if let cli::Command::Bench(cli::BenchCmd::Api(args)) = &cli.command {
        std::process::exit(
            match bench_api::run(
                args,
                cli.config.as_deref(),
                cli.data_dir.clone(),
                cli.format,
            ) {
                Ok(()) => 0,
                Err(e) => fail(&e),
            },
        );
    }
    let fmt = cli.format;
    // Validate before anything is opened.
    let job = match Job::prepare(cli.command) {
        Ok(job) => job,
        Err(e) => std::process::exit(fail(&e)),
    };
    // One command, one operation: a single runtime thread (blocking work goes to the
    // blocking pool anyway) spares start-up the worker threads it would never use.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            r = async {
                let service = open(cli.config.as_deref(), cli.data_dir).await?;
                job.run(&service, fmt).await
            } => match r {
                Ok(()) => 0,
                Err(e) => fail(&e),
            },
            // Ctrl-C: stop *now*, as a crash would. Every operation is journaled, and
            // the locks must not be released while driver work (a blocking thread, a
            // qemu-img child) carries on, so the process exits at once instead of
            // unwinding: the kernel drops its locks as it dies and its children die with
            // it. The next kiln command resolves what was in flight.
            _ = tokio::signal::ctrl_c() => {
                eprintln!("kiln: interrupted; unfinished operations are resolved by the next kiln command");
                std::process::exit(130);
            }
        }
    });
    drop(runtime);
    std::process::exit(code);
}

/// Progress of driver-side copies, shown as a bar on an interactive stderr.
struct BarProgress(indicatif::ProgressBar);

impl Progress for BarProgress {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn set_message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

fn progress(format: Format) -> (ProgressHandle, indicatif::ProgressBar) {
    let pb = export::progress_bar(0, format == Format::Json);
    (Arc::new(BarProgress(pb.clone())), pb)
}

async fn open(config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> Result<Service> {
    let config = load_config(config)?;
    let data_dir = kiln_runtime::data_dir(data_dir, &config)?;
    open_with(&config, &data_dir).await
}

/// The configuration file, or the embedded default, with the environment's overrides
/// (KILN_NODE, KILN_STORE_URL).
fn load_config(config: Option<&std::path::Path>) -> Result<kiln_runtime::Config> {
    let mut config = match config {
        Some(path) => kiln_runtime::Config::load(path)?,
        None => kiln_runtime::Config::default(),
    };
    config.apply_env();
    Ok(config)
}

/// `kiln store migrate`: prints which store and the schema versions before and after.
fn migrate(config: Option<&std::path::Path>, data_dir: Option<PathBuf>, fmt: Format) -> Result<()> {
    let config = load_config(config)?;
    let data_dir = kiln_runtime::data_dir(data_dir, &config)?;
    let store = if config.store.postgres(None).is_some() {
        "postgresql"
    } else {
        "sqlite"
    };
    let (from, to) = kiln_runtime::migrate(&config, &data_dir)?;
    match fmt {
        Format::Json => println!(
            "{}",
            serde_json::json!({"store": store, "schema_version_before": from, "schema_version": to})
        ),
        Format::Table if from == to => println!("{store} store: schema version {to}, up to date"),
        Format::Table => println!("{store} store: schema version {from} -> {to}"),
    }
    Ok(())
}

/// The service for `config` on `data_dir`, recovered, with guest-agent access.
async fn open_with(config: &kiln_runtime::Config, data_dir: &std::path::Path) -> Result<Service> {
    let service = kiln_runtime::open(config, data_dir).await?;
    // Freeze guards are this same binary (`kiln agent-guard`), so they need nothing else
    // installed and match kiln's version.
    Ok(match std::env::current_exe() {
        Ok(exe) => service.with_agents(Arc::new(kiln_core::agent::ProcessAgents::new(
            exe,
            vec!["agent-guard".into()],
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot find the kiln binary; instance snapshots will not quiesce");
            service
        }
    })
}

/// Creates the output file `out`, which must not exist: kiln never overwrites one.
fn create_output(out: &str) -> Result<std::fs::File> {
    std::fs::File::create_new(out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::invalid(
            "output",
            format!("{out:?} exists; kiln never overwrites an output file"),
        ),
        _ => Error::io(format!("create {out:?}"), e),
    })
}

/// Writes a snapshot's `rbd diff v1` stream — whole, or the changes since `from` (see
/// [`kiln_core::delta`]) — to `out` (a new file, or "-" for stdout); on failure a partially
/// written file is removed.
pub async fn diff(
    service: &Service,
    id: kiln_core::SnapshotId,
    from: Option<kiln_core::SnapshotId>,
    out: &str,
    fmt: Format,
) -> Result<export::DiffSummary> {
    let mut src = service.open_delta(id, from).await?;
    let file = if out == "-" {
        None
    } else {
        Some(create_output(out)?)
    };
    let pb = export::progress_bar(src.scan_bytes(), fmt == Format::Json);
    let path = PathBuf::from(out);
    let result = tokio::task::spawn_blocking(move || match file {
        Some(f) => {
            let r = export::copy_diff(&mut src, &f, &pb).and_then(|r| {
                f.sync_all()
                    .map_err(|e| Error::io(format!("sync {}", path.display()), e))?;
                Ok(r)
            });
            if r.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            r
        }
        None => export::copy_diff(&mut src, std::io::stdout().lock(), &pb),
    })
    .await
    .map_err(|e| Error::backend("diff", format!("diff task failed: {e}")))?;
    let (stats, stream_bytes, sha256) = result?;
    Ok(export::DiffSummary {
        snapshot_id: id.to_string(),
        from_snapshot_id: from.map(|f| f.to_string()),
        output: out.to_string(),
        size_bytes: stats.size_bytes,
        data_bytes: stats.data_bytes,
        zero_bytes: stats.zero_bytes,
        read_bytes: stats.read_bytes,
        stream_bytes,
        sha256,
    })
}

/// Applies a diff stream from `input` (a file, checked whole first, or "-" for stdin) onto a
/// volume (see [`Service::import_diff`]).
pub async fn import_diff(
    service: &Service,
    id: kiln_core::VolumeId,
    input: &str,
    fmt: Format,
) -> Result<kiln_core::service::ImportedDiff> {
    let open = |input: &str| {
        std::fs::File::open(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::invalid("input", format!("{input:?} does not exist"))
            }
            _ => Error::io(format!("open {input:?}"), e),
        })
    };
    let reader: Box<dyn std::io::Read + Send> = if input == "-" {
        Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin()))
    } else {
        // A file is checked whole first, so a truncated or corrupt one writes nothing.
        let f = open(input)?;
        tokio::task::spawn_blocking(move || {
            kiln_core::diff_apply::check(std::io::BufReader::with_capacity(1 << 20, f))
        })
        .await
        .map_err(|e| Error::backend("import-diff", format!("check task failed: {e}")))??;
        Box::new(std::io::BufReader::with_capacity(1 << 20, open(input)?))
    };
    let (p, pb) = progress(fmt);
    let r = service.import_diff(id, reader, p).await;
    pb.finish_and_clear();
    r
}

/// Exports a snapshot; on failure a partially written output file is removed.
pub async fn export(
    service: &Service,
    id: kiln_core::SnapshotId,
    out: &str,
    fmt: Format,
) -> Result<export::ExportSummary> {
    let mut reader = service.open_snapshot_reader(id).await?;
    let mut sink = if out == "-" {
        export::Sink::Stdout
    } else {
        export::Sink::File(create_output(out)?, PathBuf::from(out))
    };
    let size = kiln_core::SnapshotReader::size(&reader);
    let pb = export::progress_bar(size, fmt == Format::Json);
    let out_owned = out.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let r = export::copy(&mut reader, &mut sink, &pb);
        if r.is_err()
            && let export::Sink::File(_, path) = &sink
        {
            let _ = std::fs::remove_file(path);
        }
        r
    })
    .await
    .map_err(|e| Error::backend("export", format!("export task failed: {e}")))?;
    let (written, sha256) = result?;
    Ok(export::ExportSummary {
        snapshot_id: id.to_string(),
        output: out_owned,
        size_bytes: size,
        data_bytes_written: written,
        sha256,
    })
}
