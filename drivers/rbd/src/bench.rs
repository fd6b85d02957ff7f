//! `kiln bench` for RBD: the raw snapshot primitive over the open connection, and the `rbd`
//! CLI doing the same, for comparison (the CLI is never kiln's data path).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{Error, PrimitiveSample, Result, VolumeId};

use crate::cluster::Cluster;
use crate::image::Image;
use crate::names::volume_image;

/// Seconds the `rbd` CLI may take for one command before it is killed (it otherwise waits
/// up to 300 s for an unreachable monitor).
const CLI_TIMEOUT_SECS: u64 = 60;

/// Times `rbd_snap_create` + `rbd_snap_remove` on volume `v` (sample 1), then the `rbd snap
/// create` / `rbd snap rm` CLI (sample 2). The snapshots are named `bench-<fresh uuid>` and
/// removed again (also when the CLI fails half-way); without the `rbd` CLI only sample 1
/// is returned. The image handle is opened before and closed after the timed calls.
pub fn run(c: &Arc<Cluster>, v: &VolumeId) -> Result<Vec<PrimitiveSample>> {
    let image = volume_image(v);
    let mut samples = Vec::with_capacity(2);
    {
        let img = Image::open(c, &image, None).map_err(|e| {
            if e.is_not_found() {
                Error::NotFound {
                    what: "volume",
                    id: v.to_string(),
                }
            } else {
                e.into()
            }
        })?;
        let snap = format!("bench-{}", uuid::Uuid::new_v4());
        let t = Instant::now();
        img.snap_create(&snap)?;
        let create = t.elapsed();
        let t = Instant::now();
        img.snap_remove(&snap)?;
        let delete = t.elapsed();
        samples.push(PrimitiveSample {
            name: "rbd_snap_create + rbd_snap_remove (librbd, open connection)".into(),
            create,
            delete,
        });
    }
    // The handle above is closed: the CLI would otherwise have to ask it for the lock.
    let snap = format!("bench-{}", uuid::Uuid::new_v4());
    let spec = format!("{}/{image}@{snap}", c.pool());
    let create = match cli(c, &["snap", "create", &spec]) {
        Ok(d) => d,
        // The comparison needs ceph-common's `rbd`; without it, report the primitive alone
        // rather than no benchmark at all.
        Err(CliError::Missing(e)) => {
            tracing::warn!(error = %e, "rbd CLI not runnable (install ceph-common); CLI sample skipped");
            return Ok(samples);
        }
        Err(CliError::Failed(e)) => {
            remove_leftover(c, &image, &snap);
            return Err(e);
        }
    };
    let delete = match cli(c, &["snap", "rm", &spec]) {
        Ok(d) => d,
        Err(CliError::Missing(e)) | Err(CliError::Failed(e)) => {
            remove_leftover(c, &image, &snap);
            return Err(e);
        }
    };
    samples.push(PrimitiveSample {
        name: "rbd snap create + rbd snap rm (CLI: process start, connect, open)".into(),
        create,
        delete,
    });
    Ok(samples)
}

/// Removes a bench snapshot the CLI may have left behind, so bench leaves nothing.
fn remove_leftover(c: &Arc<Cluster>, image: &str, snap: &str) {
    let res = Image::open(c, image, None).and_then(|img| {
        if img.snap_exists(snap)? {
            img.snap_remove(snap)?;
        }
        Ok(())
    });
    if let Err(e) = res {
        tracing::warn!(image, snap, error = %e, "could not remove the bench snapshot");
    }
}

enum CliError {
    /// The CLI could not be started at all.
    Missing(Error),
    /// It ran and failed.
    Failed(Error),
}

/// Runs `timeout N rbd --conf C --id ID [--keyring K] --no-progress ARGS…` and times it.
fn cli(c: &Cluster, args: &[&str]) -> std::result::Result<Duration, CliError> {
    let timeout = CLI_TIMEOUT_SECS.to_string();
    let mut argv: Vec<&str> = vec![
        &timeout,
        "rbd",
        "--conf",
        c.conf_path(),
        "--id",
        c.client_name(),
    ];
    if let Some(k) = c.keyring() {
        argv.extend(["--keyring", k]);
    }
    argv.push("--no-progress");
    argv.extend_from_slice(args);
    let t = Instant::now();
    let out = duct::cmd("timeout", &argv)
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .map_err(|e| {
            CliError::Missing(Error::io("running the rbd CLI (install ceph-common)", e))
        })?;
    let elapsed = t.elapsed();
    // `timeout` exits 127 when it cannot find `rbd`.
    if out.status.code() == Some(127) {
        return Err(CliError::Missing(Error::backend(
            "rbd",
            "the rbd CLI is not installed (ceph-common)",
        )));
    }
    if !out.status.success() {
        return Err(CliError::Failed(Error::backend(
            format!("rbd {}", args.join(" ")),
            format!(
                "exit status {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )));
    }
    Ok(elapsed)
}
