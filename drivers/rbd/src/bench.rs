//! `kiln bench` for RBD: the raw snapshot primitive over the open connection, and the `rbd`
//! CLI doing the same, for comparison (the CLI is never kiln's data path).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{Error, PrimitiveSample, Result, VolumeId};

use crate::cluster::Cluster;
use crate::errno::RbdCallError;
use crate::handles::{Failure, ImageCache};
use crate::names::volume_image;

/// Seconds the `rbd` CLI may take for one command before it is killed (it otherwise waits
/// up to 300 s for an unreachable monitor).
const CLI_TIMEOUT_SECS: u64 = 60;

/// Times `rbd_snap_create` + `rbd_snap_remove` on volume `v` (sample 1), then the `rbd snap
/// create` / `rbd snap rm` CLI (sample 2). The snapshots are named `bench-<fresh uuid>` and
/// removed again (also when the CLI fails half-way); without the `rbd` CLI only sample 1
/// is returned. Sample 1 runs on the backend's own cached handle of the image — the one
/// kiln's snapshot create and delete use — so it is the librbd floor under kiln's path; a
/// separate handle would instead make the two fight over the image's exclusive lock.
pub fn run(c: &Arc<Cluster>, images: &ImageCache, v: &VolumeId) -> Result<Vec<PrimitiveSample>> {
    let image = volume_image(v);
    let mut samples = Vec::with_capacity(2);
    let snap = format!("bench-{}", uuid::Uuid::new_v4());
    let timed = images
        .with(&image, |img| -> Result<(Duration, Duration)> {
            let t = Instant::now();
            // The call kiln's own (not forced) snapshot create makes.
            img.snap_create_skip_quiesce(&snap)?;
            let create = t.elapsed();
            let t = Instant::now();
            img.snap_remove(&snap)?;
            Ok((create, t.elapsed()))
        })
        .map_err(|e| match e {
            Failure::Open(e) if e.is_not_found() => Error::not_found("volume", v.to_string()),
            Failure::Open(e) => e.into(),
            Failure::Op(e) => e,
        });
    let (create, delete) = match timed {
        Ok(t) => t,
        Err(e) => return Err(cleanup_after(e, images, &image, &snap)),
    };
    samples.push(PrimitiveSample {
        name: "rbd_snap_create2 (skip quiesce) + rbd_snap_remove (librbd, open connection, open image)".into(),
        create,
        delete,
    });
    // The cached handle may own the image's exclusive lock: the CLI's requests then go to
    // it (librbd forwards snapshot operations to the lock owner), as they would to a VM.
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
        Err(CliError::Failed(e)) => return Err(cleanup_after(e, images, &image, &snap)),
    };
    let delete = match cli(c, &["snap", "rm", &spec]) {
        Ok(d) => d,
        Err(CliError::Missing(e)) | Err(CliError::Failed(e)) => {
            return Err(cleanup_after(e, images, &image, &snap));
        }
    };
    samples.push(PrimitiveSample {
        name: "rbd snap create + rbd snap rm (CLI: process start, connect, open)".into(),
        create,
        delete,
    });
    Ok(samples)
}

/// `e`, after removing the bench snapshot a failed run may have left behind (so bench
/// leaves nothing); if that removal fails too, the error says so (one line).
fn cleanup_after(e: Error, images: &ImageCache, image: &str, snap: &str) -> Error {
    let res = images.with(image, |img| {
        if img.snap_exists(snap)? {
            img.snap_remove(snap)?;
        }
        Ok::<(), RbdCallError>(())
    });
    match res {
        // No image, no snapshot: nothing left behind.
        Ok(())
        | Err(Failure::Open(RbdCallError {
            errno: libc::ENOENT,
            ..
        })) => e,
        Err(Failure::Open(rm) | Failure::Op(rm)) => Error::backend(
            "bench",
            format!("{e}; removing the bench snapshot {image}@{snap} also failed: {rm}"),
        )
        .with_source(e),
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
