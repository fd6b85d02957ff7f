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
/// removed again; the image handle is opened before and closed after the timed calls.
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
    let spec = format!("{}/{image}@bench-{}", c.pool(), uuid::Uuid::new_v4());
    let create = cli(c, &["snap", "create", &spec])?;
    let delete = cli(c, &["snap", "rm", &spec])?;
    samples.push(PrimitiveSample {
        name: "rbd snap create + rbd snap rm (CLI: process start, connect, open)".into(),
        create,
        delete,
    });
    Ok(samples)
}

/// Runs `timeout N rbd --conf C --id ID [--keyring K] --no-progress ARGS…` and times it.
fn cli(c: &Cluster, args: &[&str]) -> Result<Duration> {
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
        .map_err(|e| Error::io("running the rbd CLI (install ceph-common)", e))?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        return Err(Error::backend(
            format!("rbd {}", args.join(" ")),
            format!(
                "exit status {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(elapsed)
}
