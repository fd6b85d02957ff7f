//! One command line turned into one typed, validated job, then run against the service.
//!
//! [`Job::prepare`] parses every id, size, label, device and status *before* anything is
//! opened: bad input is refused with a one-line error and the store and backends are never
//! touched. [`Job::run`] then does the work and prints the result.

use kiln_core::service::Service;
use kiln_core::validate::{parse_size, validate_attachment, validate_device, validate_label};
use kiln_core::{
    Attachment, CreateVolume, Error, InstanceId, Result, SnapshotId, SnapshotStatus, VolumeId,
    VolumeStatus,
};

use crate::cli::{BackendCmd, BenchCmd, Command, Format, SnapshotCmd, VolumeCmd};
use crate::instance_cmd::AttachedVolume;
use crate::output::{self, emit};

/// A validated command.
pub enum Job {
    BackendList,
    VolumeCreate(CreateVolume),
    VolumeList,
    VolumeShow(VolumeId),
    VolumeDelete(VolumeId, bool),
    VolumeAttach(VolumeId, Attachment),
    VolumeDetach(VolumeId),
    VolumeFlatten(VolumeId),
    VolumeImportDiff(VolumeId, String),
    VolumeReset(VolumeId, VolumeStatus, Option<String>),
    VolumeHistory(VolumeId),
    VolumeCheck(VolumeId, bool),
    SnapshotCreate(VolumeId, Option<String>, bool),
    SnapshotList(Option<VolumeId>),
    SnapshotShow(SnapshotId),
    SnapshotDelete(SnapshotId, bool),
    SnapshotRevert(SnapshotId),
    SnapshotTree(VolumeId),
    SnapshotExport(SnapshotId, String),
    SnapshotDiff(SnapshotId, Option<SnapshotId>, String),
    SnapshotReset(SnapshotId, SnapshotStatus, Option<String>),
    SnapshotHistory(SnapshotId),
    Bench(BenchTarget, usize),
    BenchInstance(
        Option<String>,
        kiln_core::bench::instance::InstanceBenchRequest,
    ),
    Demo(bool),
    Instance(crate::instance_cmd::InstanceJob),
    Backup(crate::backup_cmd::BackupJob),
}

/// What `bench snapshot` runs on, before the default backend is known.
pub enum BenchTarget {
    Volume(VolumeId),
    Scratch(Option<String>, u64),
}

pub(crate) fn id<T: std::str::FromStr<Err = Error>>(s: &str) -> Result<T> {
    s.parse()
}

pub(crate) fn label(l: Option<String>) -> Result<Option<String>> {
    if let Some(l) = &l {
        validate_label(l)?;
    }
    Ok(l)
}

/// Parses a status given on the command line; refusals name the valid ones.
fn status<T: std::str::FromStr<Err = Error>>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|e: Error| Error::invalid("state", e.message().trim_start_matches("invalid ")))
}

impl Job {
    /// Validates `cmd` completely; nothing is opened.
    pub fn prepare(cmd: Command) -> Result<Job> {
        Ok(match cmd {
            Command::Backend(BackendCmd::List) => Job::BackendList,
            Command::Volume(v) => match v {
                VolumeCmd::Create(c) => Job::VolumeCreate(CreateVolume {
                    owner: None,
                    size_bytes: c.size.as_deref().map(parse_size).transpose()?,
                    backend: c.backend,
                    name: label(c.name)?,
                    source_snapshot: c.snapshot.as_deref().map(id).transpose()?,
                }),
                VolumeCmd::List => Job::VolumeList,
                VolumeCmd::Show { id: i } => Job::VolumeShow(id(&i)?),
                VolumeCmd::Delete { id: i, cascade } => Job::VolumeDelete(id(&i)?, cascade),
                VolumeCmd::Attach {
                    id: i,
                    instance,
                    device,
                    boot_index,
                    disk_bus,
                    device_type,
                    delete_on_termination,
                    node,
                } => {
                    validate_device(&device)?;
                    let mut a = Attachment::new(id::<InstanceId>(&instance)?, device);
                    a.boot_index = boot_index;
                    a.disk_bus = disk_bus;
                    a.device_type = device_type;
                    a.delete_on_termination = delete_on_termination;
                    a.node = node;
                    validate_attachment(&a)?;
                    Job::VolumeAttach(id(&i)?, a)
                }
                VolumeCmd::Detach { id: i } => Job::VolumeDetach(id(&i)?),
                VolumeCmd::Flatten { id: i } => Job::VolumeFlatten(id(&i)?),
                VolumeCmd::ImportDiff { id: i, input } => Job::VolumeImportDiff(id(&i)?, input),
                VolumeCmd::ResetState {
                    id: i,
                    state,
                    reason,
                } => Job::VolumeReset(id(&i)?, status(&state)?, reason),
                VolumeCmd::History { id: i } => Job::VolumeHistory(id(&i)?),
                VolumeCmd::Check { id: i, repair } => Job::VolumeCheck(id(&i)?, repair),
            },
            Command::Snapshot(s) => match s {
                SnapshotCmd::Create {
                    volume_id,
                    name,
                    force,
                } => Job::SnapshotCreate(id(&volume_id)?, label(name)?, force),
                SnapshotCmd::List { volume } => {
                    Job::SnapshotList(volume.as_deref().map(id).transpose()?)
                }
                SnapshotCmd::Show { id: i } => Job::SnapshotShow(id(&i)?),
                SnapshotCmd::Delete {
                    id: i,
                    flatten_dependents,
                } => Job::SnapshotDelete(id(&i)?, flatten_dependents),
                SnapshotCmd::Revert { snapshot_id } => Job::SnapshotRevert(id(&snapshot_id)?),
                SnapshotCmd::Tree { volume_id } => Job::SnapshotTree(id(&volume_id)?),
                SnapshotCmd::Export {
                    snapshot_id,
                    output,
                } => {
                    if output != "-" && std::path::Path::new(&output).exists() {
                        return Err(Error::invalid(
                            "output",
                            format!("{output:?} exists; kiln never overwrites an export"),
                        ));
                    }
                    Job::SnapshotExport(id(&snapshot_id)?, output)
                }
                SnapshotCmd::Diff {
                    snapshot_id,
                    from,
                    output,
                } => Job::SnapshotDiff(
                    id(&snapshot_id)?,
                    from.as_deref().map(id).transpose()?,
                    output,
                ),
                SnapshotCmd::ResetState {
                    id: i,
                    state,
                    reason,
                } => Job::SnapshotReset(id(&i)?, status(&state)?, reason),
                SnapshotCmd::History { id: i } => Job::SnapshotHistory(id(&i)?),
            },
            Command::Bench(BenchCmd::Snapshot {
                backend,
                volume,
                size,
                iterations,
            }) => {
                if iterations == 0 || iterations > kiln_core::bench::MAX_ITERATIONS {
                    return Err(Error::invalid(
                        "iterations",
                        format!(
                            "{iterations}: must be 1..={}",
                            kiln_core::bench::MAX_ITERATIONS
                        ),
                    ));
                }
                let target = match volume {
                    Some(v) => BenchTarget::Volume(id(&v)?),
                    None => BenchTarget::Scratch(backend, parse_size(&size)?),
                };
                Job::Bench(target, iterations)
            }
            Command::Bench(BenchCmd::Instance {
                volumes,
                backend,
                size,
                iterations,
                agent,
                freeze_mountpoints,
            }) => {
                if let Some(a) = &agent {
                    kiln_core::validate::validate_host_path("agent", a)?;
                }
                Job::BenchInstance(
                    backend,
                    kiln_core::bench::instance::InstanceBenchRequest {
                        backend: String::new(),
                        volumes,
                        size_bytes: parse_size(&size)?,
                        iterations,
                        agent,
                        mountpoints: freeze_mountpoints,
                    },
                )
            }
            Command::Demo(args) => Job::Demo(args.keep),
            Command::Instance(c) => Job::Instance(crate::instance_cmd::InstanceJob::instance(c)?),
            Command::Image(c) => Job::Instance(crate::instance_cmd::InstanceJob::image(c)?),
            Command::Backup(c) => Job::Backup(crate::backup_cmd::BackupJob::parse(c)?),
            Command::AgentGuard(_) => {
                return Err(Error::invalid(
                    "command",
                    "agent-guard is run by kiln itself",
                ));
            }
            Command::Bench(BenchCmd::Api(_)) => {
                return Err(Error::invalid("command", "bench api runs its own clients"));
            }
            Command::Serve(_) => {
                return Err(Error::invalid("command", "serve runs a server, not a job"));
            }
            Command::Store(_) => {
                return Err(Error::invalid(
                    "command",
                    "store commands run before the service opens",
                ));
            }
        })
    }

    /// Runs the job and prints its result in `fmt`.
    pub async fn run(self, service: &Service, fmt: Format) -> Result<()> {
        match self {
            Job::BackendList => {
                let mut rows = Vec::new();
                for info in service.backends().await {
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
            Job::VolumeCreate(req) => {
                let (p, pb) = crate::progress(fmt);
                let v = service.create_volume_with_progress(req, p).await?;
                pb.finish_and_clear();
                emit(fmt, &v, || output::volume_table(&v));
            }
            Job::VolumeList => {
                let vs = service.volumes().await?;
                emit(fmt, &vs, || output::volumes_table(&vs));
            }
            Job::VolumeShow(id) => {
                let v = AttachedVolume::of(service, service.volume(id).await?).await;
                emit(fmt, &v, || v.table());
            }
            Job::VolumeDelete(id, cascade) => {
                let action = service.delete_volume(id, cascade).await?;
                deleted(fmt, "volume", &id.to_string(), action);
            }
            Job::VolumeAttach(id, a) => {
                let v = AttachedVolume::of(service, service.attach(id, a).await?).await;
                emit(fmt, &v, || v.table());
            }
            Job::VolumeDetach(id) => {
                let v = service.detach(id).await?;
                emit(fmt, &v, || output::volume_table(&v));
            }
            Job::VolumeFlatten(id) => {
                let (p, pb) = crate::progress(fmt);
                let v = service.flatten_volume(id, p).await?;
                pb.finish_and_clear();
                emit(fmt, &v, || output::volume_table(&v));
            }
            Job::VolumeImportDiff(id, input) => {
                let r = crate::import_diff(service, id, &input, fmt).await?;
                emit(fmt, &r, || {
                    let snap = r
                        .snapshot
                        .as_ref()
                        .map(|s| {
                            format!(
                                "; took snapshot {} named {:?}",
                                s.id,
                                s.name.as_deref().unwrap_or("")
                            )
                        })
                        .unwrap_or_default();
                    format!(
                        "applied {} of data and {} of zeros to volume {}{snap}",
                        output::human(r.stats.data_bytes),
                        output::human(r.stats.zero_bytes),
                        r.volume.id
                    )
                });
            }
            Job::VolumeReset(id, to, reason) => {
                let v = service.reset_volume_state(id, to, reason).await?;
                emit(fmt, &v, || output::volume_table(&v));
            }
            Job::VolumeHistory(id) => {
                service.volume(id).await?;
                let h = service.history(&id.to_string()).await?;
                emit(fmt, &h, || output::history_table(&h));
            }
            Job::VolumeCheck(id, repair) => {
                let r = service.check_volume(id, repair).await?;
                emit(fmt, &r, || output::check_text(&r));
                if !r.consistent {
                    return Err(Error::wrong_state(format!(
                        "volume {id} is not consistent: {} finding(s){}",
                        r.findings.len(),
                        if repair {
                            " remain after repair"
                        } else {
                            "; run with --repair to fix what is safe"
                        }
                    )));
                }
            }
            Job::SnapshotCreate(volume_id, name, force) => {
                let s = service.create_snapshot(volume_id, name, force).await?;
                emit(fmt, &s, || output::snapshot_table(&s));
            }
            Job::SnapshotList(volume) => {
                let ss = service.snapshots(volume).await?;
                emit(fmt, &ss, || output::snapshots_table(&ss));
            }
            Job::SnapshotShow(id) => {
                let s = service.snapshot(id).await?;
                emit(fmt, &s, || output::snapshot_table(&s));
            }
            Job::SnapshotDelete(id, flatten_dependents) => {
                let (p, pb) = crate::progress(fmt);
                let action = service
                    .delete_snapshot_with_progress(id, flatten_dependents, p)
                    .await?;
                pb.finish_and_clear();
                deleted(fmt, "snapshot", &id.to_string(), action);
            }
            Job::SnapshotRevert(id) => {
                let (p, pb) = crate::progress(fmt);
                let v = service.revert(id, p).await?;
                pb.finish_and_clear();
                emit(fmt, &v, || output::volume_table(&v));
            }
            Job::SnapshotTree(volume_id) => {
                let t = service.tree(volume_id).await?;
                emit(fmt, &t, || output::tree_text(&t));
            }
            Job::SnapshotExport(id, out) => {
                let summary = crate::export(service, id, &out, fmt).await?;
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
            Job::SnapshotDiff(id, from, out) => {
                let summary = crate::diff(service, id, from, &out, fmt).await?;
                if out == "-" {
                    // stdout carries the stream: the summary goes to stderr.
                    eprintln!(
                        "wrote the diff stream of snapshot {} ({} bytes) sha256 {}",
                        summary.snapshot_id, summary.stream_bytes, summary.sha256
                    );
                } else {
                    emit(fmt, &summary, || {
                        let since = summary
                            .from_snapshot_id
                            .as_ref()
                            .map(|f| format!(" (changes since {f})"))
                            .unwrap_or_default();
                        format!(
                            "wrote snapshot {}{since} as an rbd diff v1 stream to {}: {} image, \
                             {} of data, {} of zeros, {} stream, {} read\nsha256 {}",
                            summary.snapshot_id,
                            summary.output,
                            output::human(summary.size_bytes),
                            output::human(summary.data_bytes),
                            output::human(summary.zero_bytes),
                            output::human(summary.stream_bytes),
                            output::human(summary.read_bytes),
                            summary.sha256
                        )
                    });
                }
            }
            Job::SnapshotReset(id, to, reason) => {
                let s = service.reset_snapshot_state(id, to, reason).await?;
                emit(fmt, &s, || output::snapshot_table(&s));
            }
            Job::SnapshotHistory(id) => {
                service.snapshot(id).await?;
                let h = service.history(&id.to_string()).await?;
                emit(fmt, &h, || output::history_table(&h));
            }
            Job::Bench(target, iterations) => {
                let target = match target {
                    BenchTarget::Volume(id) => kiln_core::bench::Target::Volume(id),
                    BenchTarget::Scratch(backend, size_bytes) => {
                        kiln_core::bench::Target::Scratch {
                            backend: backend
                                .unwrap_or_else(|| service.default_backend().to_string()),
                            size_bytes,
                        }
                    }
                };
                let r = kiln_core::bench::snapshot(service, target, iterations).await?;
                emit(fmt, &r, || output::bench_text(&r));
            }
            Job::BenchInstance(backend, mut req) => {
                req.backend = backend.unwrap_or_else(|| service.default_backend().to_string());
                let r = kiln_core::bench::instance::instance(service, req).await?;
                emit(fmt, &r, || output::bench_instance_text(&r));
            }
            Job::Demo(keep) => crate::demo::run(service, keep).await?,
            Job::Instance(j) => j.run(service, fmt).await?,
            Job::Backup(j) => j.run(service, fmt).await?,
        }
        Ok(())
    }
}

/// Prints a delete's result: what was deleted, and whether the backend object was still
/// there (a retried delete says so instead of pretending).
fn deleted(fmt: Format, what: &str, id: &str, action: kiln_core::DeleteAction) {
    emit(
        fmt,
        &serde_json::json!({"id": id, "deleted": true, "backend": action}),
        || match action {
            kiln_core::DeleteAction::Deleted => format!("deleted {what} {id}"),
            kiln_core::DeleteAction::AlreadyGone => {
                format!("deleted {what} {id} (its backend object was already gone)")
            }
        },
    );
}
