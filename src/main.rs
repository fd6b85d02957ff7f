//! The `kiln` command: parses arguments, wires config -> drivers -> service, prints results.

mod cli;
mod config;
mod demo;
mod export;
mod output;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use kiln_core::service::Service;
use kiln_core::validate::parse_size;
use kiln_core::{CreateVolume, Error, Progress, ProgressHandle, Result};

use cli::{BackendCmd, BenchCmd, Cli, Command, Format, LogFormat, SnapshotCmd, VolumeCmd};
use output::emit;

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // Quiet by default: stdout carries results, stderr only what an operator must see.
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
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

fn main() {
    let _failpoints = kiln_core::crash::setup();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            r = run(cli) => match r {
                Ok(()) => 0,
                Err(e) => {
                    // One line, always: scripts grep it and people read it.
                    let msg = e.to_string().replace('\n', " ");
                    eprintln!("kiln: error: {msg}");
                    e.kind().exit_code()
                }
            },
            // Ctrl-C: stop between steps. Every operation is journaled, so whatever was in
            // flight is resolved by recovery on the next start; 130 is the shell convention.
            _ = tokio::signal::ctrl_c() => {
                eprintln!("kiln: interrupted; unfinished operations are resolved on the next start");
                130
            }
        }
    });
    drop(runtime);
    std::process::exit(code);
}

fn parse_id<T: std::str::FromStr<Err = Error>>(s: &str) -> Result<T> {
    s.parse()
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

async fn open(cli: &Cli) -> Result<Service> {
    let config = match &cli.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    let data_dir = config::data_dir(cli.data_dir.clone(), &config)?;
    config::open_service(config, &data_dir).await
}

async fn run(cli: Cli) -> Result<()> {
    let service = open(&cli).await?;
    let fmt = cli.format;
    match cli.command {
        Command::Backend(BackendCmd::List) => {
            let mut rows = Vec::new();
            for info in service.backends() {
                let (stats, stats_error) = match service.backend_stats(&info.name).await {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                rows.push(output::BackendRow {
                    info,
                    stats,
                    stats_error,
                });
            }
            emit(fmt, &rows, || output::backends_table(&rows));
        }
        Command::Volume(cmd) => volume(&service, fmt, cmd).await?,
        Command::Snapshot(cmd) => snapshot(&service, fmt, cmd).await?,
        Command::Bench(BenchCmd::Snapshot {
            backend,
            volume,
            size,
            iterations,
        }) => {
            let target = match volume {
                Some(id) => kiln_core::bench::Target::Volume(parse_id(&id)?),
                None => kiln_core::bench::Target::Scratch {
                    backend: backend.unwrap_or_else(|| {
                        service
                            .backends()
                            .into_iter()
                            .find(|b| b.default)
                            .map(|b| b.name)
                            .unwrap_or_default()
                    }),
                    size_bytes: parse_size(&size)?,
                },
            };
            let r = kiln_core::bench::snapshot(&service, target, iterations).await?;
            emit(fmt, &r, || {
                let line = |name: &str, p: &kiln_core::bench::Percentiles| {
                    format!(
                        "{name:<28} median {:>9.3} ms   p90 {:>9.3} ms   p99 {:>9.3} ms\n",
                        p.median, p.p90, p.p99
                    )
                };
                let mut s = format!(
                    "backend {} — volume {} — {} iterations\nprimitive: {}\n",
                    r.backend,
                    output::human(r.size_bytes),
                    r.iterations,
                    r.primitive
                );
                s += &line("kiln snapshot create", &r.create_ms);
                s += &line("primitive create", &r.primitive_ms);
                s += &line("kiln snapshot delete", &r.delete_ms);
                s += &line("primitive delete", &r.primitive_delete_ms);
                for c in &r.comparisons {
                    s += &line(&format!("{} create", c.name), &c.create_ms);
                    s += &line(&format!("{} delete", c.name), &c.delete_ms);
                }
                s += &format!(
                    "create ratio (kiln/primitive median): {:.2}\ndelete ratio: {:.2}",
                    r.create_ratio, r.delete_ratio
                );
                s
            });
        }
        Command::Demo(args) => demo::run(&service, args.keep).await?,
    }
    Ok(())
}

async fn volume(service: &Service, fmt: Format, cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create(c) => {
            let req = CreateVolume {
                size_bytes: c.size.as_deref().map(parse_size).transpose()?,
                backend: c.backend,
                name: c.name,
                source_snapshot: c.snapshot.as_deref().map(parse_id).transpose()?,
            };
            let v = service.create_volume(req).await?;
            emit(fmt, &v, || output::volume_table(&v));
        }
        VolumeCmd::List => {
            let vs = service.volumes()?;
            emit(fmt, &vs, || output::volumes_table(&vs));
        }
        VolumeCmd::Show { id } => {
            let v = service.volume(parse_id(&id)?)?;
            emit(fmt, &v, || output::volume_table(&v));
        }
        VolumeCmd::Delete { id, cascade } => {
            let id = parse_id(&id)?;
            service.delete_volume(id, cascade).await?;
            emit(fmt, &serde_json::json!({"id": id, "deleted": true}), || {
                format!("deleted volume {id}")
            });
        }
        VolumeCmd::Attach {
            id,
            instance,
            device,
        } => {
            let v = service
                .attach(parse_id(&id)?, parse_id(&instance)?, &device)
                .await?;
            emit(fmt, &v, || output::volume_table(&v));
        }
        VolumeCmd::Detach { id } => {
            let v = service.detach(parse_id(&id)?).await?;
            emit(fmt, &v, || output::volume_table(&v));
        }
    }
    Ok(())
}

async fn snapshot(service: &Service, fmt: Format, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create {
            volume_id,
            name,
            force,
        } => {
            let s = service
                .create_snapshot(parse_id(&volume_id)?, name, force)
                .await?;
            emit(fmt, &s, || output::snapshot_table(&s));
        }
        SnapshotCmd::List { volume } => {
            let ss = service
                .snapshots_checked(volume.as_deref().map(parse_id).transpose()?)
                .await?;
            emit(fmt, &ss, || output::snapshots_table(&ss));
        }
        SnapshotCmd::Show { id } => {
            let s = service.snapshot_checked(parse_id(&id)?).await?;
            emit(fmt, &s, || output::snapshot_table(&s));
        }
        SnapshotCmd::Delete {
            id,
            flatten_dependents,
        } => {
            let id = parse_id(&id)?;
            service.delete_snapshot(id, flatten_dependents).await?;
            emit(fmt, &serde_json::json!({"id": id, "deleted": true}), || {
                format!("deleted snapshot {id}")
            });
        }
        SnapshotCmd::Revert { snapshot_id } => {
            let (p, pb) = progress(fmt);
            let v = service.revert(parse_id(&snapshot_id)?, p).await?;
            pb.finish_and_clear();
            emit(fmt, &v, || output::volume_table(&v));
        }
        SnapshotCmd::Tree { volume_id } => {
            let t = service.tree(parse_id(&volume_id)?)?;
            emit(fmt, &t, || output::tree_text(&t));
        }
        SnapshotCmd::Export {
            snapshot_id,
            output: out,
        } => {
            let summary = export(service, parse_id(&snapshot_id)?, &out, fmt).await?;
            if out == "-" {
                // stdout carries the image: the summary goes to stderr.
                eprintln!(
                    "exported snapshot {} ({} bytes) sha256 {}",
                    summary.snapshot_id, summary.size_bytes, summary.sha256
                );
            } else {
                emit(fmt, &summary, || {
                    format!(
                        "exported snapshot {} to {}: {} image, {} of data written (sparse)\nsha256 {}",
                        summary.snapshot_id,
                        summary.output,
                        output::human(summary.size_bytes),
                        output::human(summary.data_bytes_written),
                        summary.sha256
                    )
                });
            }
        }
    }
    Ok(())
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
        let path = PathBuf::from(out);
        let f = std::fs::File::create_new(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(
                "output",
                format!("{out:?} exists; kiln never overwrites an export"),
            ),
            _ => Error::io(format!("create {out:?}"), e),
        })?;
        export::Sink::File(f, path)
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
