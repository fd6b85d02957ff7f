//! `kiln backup ...`: validated jobs and their output.

use kiln_core::backup::Target;
use kiln_core::ops::backup::{BackupCreated, BackupRequest};
use kiln_core::service::{RestoreTarget, Service};
use kiln_core::{Backup, BackupId, Result, VolumeId};

use crate::cli::{BackupCmd, Format};
use crate::job::{id, label};
use crate::output::{emit, human, table, volume_table};

/// A validated backup command.
pub enum BackupJob {
    Create(BackupRequest),
    List(Option<VolumeId>),
    Show(BackupId),
    Delete(BackupId),
    Verify(BackupId),
    Prune(VolumeId, String, bool),
    Restore(BackupId, RestoreTarget),
}

impl BackupJob {
    /// Checks every argument before anything runs.
    pub fn parse(c: BackupCmd) -> Result<BackupJob> {
        Ok(match c {
            BackupCmd::Create {
                volume_id,
                snapshot,
                target,
                incremental,
                name,
            } => {
                // Refused here, before the store is opened, when it does not parse.
                Target::parse(&target)?;
                BackupJob::Create(BackupRequest {
                    volume_id: id(&volume_id)?,
                    snapshot_id: snapshot.as_deref().map(id).transpose()?,
                    target,
                    incremental,
                    name: label(name)?,
                })
            }
            BackupCmd::List { volume } => BackupJob::List(volume.as_deref().map(id).transpose()?),
            BackupCmd::Show { id: i } => BackupJob::Show(id(&i)?),
            BackupCmd::Delete { id: i } => BackupJob::Delete(id(&i)?),
            BackupCmd::Verify { id: i } => BackupJob::Verify(id(&i)?),
            BackupCmd::Prune {
                volume,
                keep,
                dry_run,
            } => {
                // Refused before the store is opened when it does not parse.
                kiln_core::backup::retention::Policy::parse(&keep)?;
                BackupJob::Prune(id(&volume)?, keep, dry_run)
            }
            BackupCmd::Restore {
                id: i,
                volume,
                backend,
            } => BackupJob::Restore(
                id(&i)?,
                RestoreTarget {
                    volume: volume.as_deref().map(id).transpose()?,
                    backend,
                },
            ),
        })
    }

    /// Runs the job and prints its result in `fmt`.
    pub async fn run(self, service: &Service, fmt: Format) -> Result<()> {
        match self {
            BackupJob::Create(req) => {
                let (p, pb) = crate::progress(fmt);
                let r = service.create_backup(req, p).await;
                pb.finish_and_clear();
                let r = r?;
                emit(fmt, &r, || created_text(&r));
            }
            BackupJob::List(volume) => {
                let bs = service.list_backups(volume).await?;
                emit(fmt, &bs, || backups_table(&bs));
            }
            BackupJob::Show(i) => {
                let b = service.backup(i).await?;
                emit(fmt, &b, || backups_table(std::slice::from_ref(&b)));
            }
            BackupJob::Delete(i) => {
                let b = service.delete_backup(i).await?;
                emit(fmt, &b, || format!("deleted backup {}", b.id));
            }
            BackupJob::Verify(i) => {
                let r = service.verify_backup(i).await?;
                emit(fmt, &r, || {
                    format!(
                        "backup {} is intact: {} chunks, {} stream ({} of data, {} of zeros)",
                        r.backup_id,
                        r.chunks,
                        human(r.stream_bytes),
                        human(r.data_bytes),
                        human(r.zero_bytes)
                    )
                });
            }
            BackupJob::Prune(volume, keep, dry_run) => {
                let r = service.prune_backups(volume, &keep, dry_run).await?;
                emit(fmt, &r, || {
                    let mut out = String::new();
                    for k in &r.kept {
                        out.push_str(&format!("keep   {}  ({})\n", k.id, k.reason));
                    }
                    let verb = if r.dry_run { "would remove" } else { "removed" };
                    for id in &r.removed {
                        out.push_str(&format!("{verb} {id}\n"));
                    }
                    out.push_str(&format!(
                        "{} kept, {} {verb}",
                        r.kept.len(),
                        r.removed.len()
                    ));
                    out
                });
            }
            BackupJob::Restore(i, to) => {
                let (p, pb) = crate::progress(fmt);
                let v = service.restore_backup(i, to, p).await;
                pb.finish_and_clear();
                let v = v?;
                emit(fmt, &v, || volume_table(&v));
            }
        }
        Ok(())
    }
}

fn created_text(r: &BackupCreated) -> String {
    let kind = if r.backup.parent_id.is_some() {
        "incremental"
    } else {
        "full"
    };
    format!(
        "{}\n{kind} backup: read {} from the backend, stored {} ({} of data, {} of zeros)",
        backups_table(std::slice::from_ref(&r.backup)),
        human(r.stream.read_bytes),
        human(r.backup.stored_bytes),
        human(r.stream.data_bytes),
        human(r.stream.zero_bytes)
    )
}

/// Table of backups.
pub fn backups_table(bs: &[Backup]) -> String {
    let mut t = table(&[
        "id", "volume", "snapshot", "parent", "target", "status", "size", "stored", "created",
    ]);
    for b in bs {
        let status = match &b.status_reason {
            Some(r) => format!("{} ({r})", b.status),
            None => b.status.to_string(),
        };
        t.add_row(vec![
            b.id.to_string(),
            b.volume_id.to_string(),
            b.snapshot_id.to_string(),
            b.parent_id.map(|p| p.to_string()).unwrap_or_default(),
            b.target.clone(),
            status,
            human(b.size_bytes),
            human(b.stored_bytes),
            b.created_at.to_rfc3339(),
        ]);
    }
    t.to_string()
}
