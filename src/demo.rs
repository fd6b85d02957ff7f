//! `kiln demo`: kiln's main job, end to end, on the default backend, printing each step.
//! It uses only the service's public operations, so it shows exactly what the CLI does.

use std::time::Instant;

use kiln_core::service::Service;
use kiln_core::{CreateVolume, InstanceId, Result, no_progress};

use crate::output::{human, tree_text};

fn step(n: u32, started: Instant, what: String) {
    println!(
        "[{n}] {what}  ({:.1} ms)",
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// Runs the demo; removes what it created unless `keep`.
pub async fn run(service: &Service, keep: bool) -> Result<()> {
    let backend = service
        .backends()
        .await
        .into_iter()
        .find(|b| b.default)
        .ok_or_else(|| kiln_core::Error::config("no default backend"))?;
    println!(
        "kiln demo on backend {:?} (driver {}, snapshots by {})",
        backend.name, backend.driver, backend.capabilities.snapshot_method
    );

    let t = Instant::now();
    let vol = service
        .create_volume(CreateVolume {
            size_bytes: Some(1 << 30),
            name: Some("demo-disk".into()),
            ..Default::default()
        })
        .await?;
    step(
        1,
        t,
        format!(
            "created volume {} ({}) at {}",
            vol.id,
            human(vol.size_bytes),
            vol.provider_location.clone().unwrap_or_default()
        ),
    );

    let t = Instant::now();
    let s1 = service
        .create_snapshot(vol.id, Some("before-upgrade".into()), false)
        .await?;
    step(
        2,
        t,
        format!(
            "snapshot {} \"before-upgrade\" of the detached volume",
            s1.id
        ),
    );

    let instance = InstanceId::new();
    service.attach(vol.id, instance, "/dev/vda").await?;
    let t = Instant::now();
    let forced = service
        .create_snapshot(vol.id, Some("while-running".into()), true)
        .await;
    match &forced {
        Ok(s) => step(
            3,
            t,
            format!(
                "attached to instance {instance} as /dev/vda; forced snapshot {} of the in-use volume",
                s.id
            ),
        ),
        Err(e) => step(
            3,
            t,
            format!(
                "attached to instance {instance}; forced snapshot refused by this backend: {e}"
            ),
        ),
    }
    service.detach(vol.id).await?;

    let t = Instant::now();
    let clone = service
        .create_volume(CreateVolume {
            source_snapshot: Some(s1.id),
            name: Some("demo-clone".into()),
            ..Default::default()
        })
        .await?;
    step(
        4,
        t,
        format!("cloned volume {} from snapshot {}", clone.id, s1.id),
    );

    let t = Instant::now();
    service.revert(s1.id, no_progress()).await?;
    step(
        5,
        t,
        format!(
            "reverted volume {} to snapshot {} (other snapshots kept)",
            vol.id, s1.id
        ),
    );

    let t = Instant::now();
    let dir = tempfile_dir()?;
    let out = dir.join(format!("snapshot-{}.raw", s1.id));
    let summary = crate::export(
        service,
        s1.id,
        &out.to_string_lossy(),
        crate::cli::Format::Json,
    )
    .await?;
    step(
        6,
        t,
        format!(
            "exported snapshot {} to {} ({} data written), sha256 {}",
            s1.id,
            out.display(),
            human(summary.data_bytes_written),
            summary.sha256
        ),
    );
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_dir(&dir);

    println!("lineage:\n{}", tree_text(&service.tree(vol.id).await?));

    if keep {
        println!("kept volume {} and clone {} (--keep)", vol.id, clone.id);
    } else {
        let t = Instant::now();
        service.delete_volume(clone.id, true).await?;
        service.delete_volume(vol.id, true).await?;
        step(
            7,
            t,
            "deleted the clone, the volume and its snapshots (cascade)".into(),
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| kiln_core::Error::io(format!("create {}", dir.display()), e))?;
    Ok(dir)
}
