//! `kiln bench instance`: what an instance snapshot of N volumes costs against Nova's
//! sequential model, in one run on the same volumes.
//!
//! Per iteration: one instance snapshot (timed whole; its window is the guard's freeze →
//! thaw when an agent is given, else the members' span, first start to last end — the time
//! a guest would have to stay frozen), its image deleted again; then every volume
//! snapshotted one after another (Nova's `snapshot_volume_backed` loop), each create timed,
//! the sum being Nova's window. All in-process: no process start-up on either side.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Percentiles;
use crate::error::{Error, Result};
use crate::ops::instance_snapshot::{InstanceSnapshotRequest, Quiesce};
use crate::service::{CreateVolume, InstanceSpec, Service};
use crate::types::{Attachment, InstanceId, VolumeId};

/// Most volumes one bench attaches (two-letter device names, well past any real server).
pub const MAX_VOLUMES: usize = 64;

/// What `kiln bench instance` runs.
#[derive(Debug, Clone)]
pub struct InstanceBenchRequest {
    /// Backend of the scratch volumes.
    pub backend: String,
    /// How many volumes.
    pub volumes: usize,
    /// Each volume's size.
    pub size_bytes: u64,
    /// Iterations.
    pub iterations: usize,
    /// Freeze through this agent socket (then `mountpoints` are frozen); none = no freeze.
    pub agent: Option<String>,
    /// Mountpoints the agent freezes.
    pub mountpoints: Vec<String>,
}

/// The result of `kiln bench instance`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceBench {
    /// Backend benchmarked.
    pub backend: String,
    /// Volumes per instance snapshot.
    pub volumes: usize,
    /// Each volume's size in bytes.
    pub size_bytes: u64,
    /// Iterations.
    pub iterations: usize,
    /// What `window_ms` measures.
    pub window: String,
    /// The window a guest stays frozen (see `window`).
    pub window_ms: Percentiles,
    /// Taking every member concurrently, first start to last end.
    pub members_ms: Percentiles,
    /// With an agent: the freeze request's round trip (the guest syncing its filesystems).
    pub freeze_rpc_ms: Option<Percentiles>,
    /// With an agent: the thaw request's round trip.
    pub thaw_rpc_ms: Option<Percentiles>,
    /// The whole instance snapshot operation (journal, freeze, members, thaw, image).
    pub whole_ms: Percentiles,
    /// One volume's `snapshot create` (each of the sequential creates is a sample).
    pub single_create_ms: Percentiles,
    /// The sum of one-by-one creates of all volumes (Nova's window).
    pub sequential_sum_ms: Percentiles,
    /// `window_ms.median / single_create_ms.median` (target ≤ 2 with 8 volumes).
    pub window_ratio: f64,
    /// With an agent: the window without its freeze request — `(window − freeze request)
    /// / one create`, medians. The freeze request is the guest kernel's `FIFREEZE` (on
    /// Linux ≈ 40 ms cold, mostly RCU grace periods in `freeze_super`), which any
    /// orchestrator pays; this is the part kiln controls.
    pub window_after_freeze_ratio: Option<f64>,
    /// `sequential_sum_ms.median / window_ms.median`: how much shorter kiln's window is.
    pub speedup_over_sequential: f64,
}

/// Guest device name of the `i`-th volume: vda..vdz, then vdaa...
fn device(i: usize) -> String {
    let l = |n: usize| (b'a' + n as u8) as char;
    if i < 26 {
        format!("/dev/vd{}", l(i))
    } else {
        format!("/dev/vd{}{}", l(i / 26 - 1), l(i % 26))
    }
}

/// Runs the bench on scratch volumes and a scratch instance, removed again whatever happens.
pub async fn instance(service: &Service, req: InstanceBenchRequest) -> Result<InstanceBench> {
    if req.volumes == 0 || req.volumes > MAX_VOLUMES {
        return Err(Error::invalid(
            "volumes",
            format!("{}: must be 1..={MAX_VOLUMES}", req.volumes),
        ));
    }
    if req.iterations == 0 || req.iterations > super::MAX_ITERATIONS {
        return Err(Error::invalid(
            "iterations",
            format!("{}: must be 1..={}", req.iterations, super::MAX_ITERATIONS),
        ));
    }
    let inst = service
        .create_instance(InstanceSpec {
            project: None,
            name: Some("kiln-bench".into()),
            agent: req.agent.clone(),
            freeze_mountpoints: req.mountpoints.clone(),
            ..Default::default()
        })
        .await?;
    let mut vols = Vec::new();
    let result = async {
        for i in 0..req.volumes {
            let v = service
                .create_volume(CreateVolume {
                    owner: None,
                    size_bytes: Some(req.size_bytes),
                    backend: Some(req.backend.clone()),
                    name: Some("kiln-bench".into()),
                    source_snapshot: None,
                })
                .await?;
            vols.push(v.id);
            service
                .attach(v.id, Attachment::new(inst.id, device(i)))
                .await?;
        }
        run(service, &req, inst.id, &vols).await
    }
    .await;
    // Remove the scratch objects whatever happened; report the bench error first.
    let mut cleanup: Result<()> = Ok(());
    for id in &vols {
        let r = async {
            let v = service.volume(*id).await?;
            if !v.attachments.is_empty() {
                service.detach(*id).await?;
            }
            service.delete_volume(*id, true).await.map(drop)
        }
        .await;
        if cleanup.is_ok() {
            cleanup = r;
        }
    }
    let r = service.delete_instance(inst.id).await;
    let bench = result?;
    cleanup?;
    r?;
    Ok(bench)
}

async fn run(
    service: &Service,
    req: &InstanceBenchRequest,
    inst: InstanceId,
    vols: &[VolumeId],
) -> Result<InstanceBench> {
    let snap = || InstanceSnapshotRequest {
        owner: None,
        instance: inst,
        name: "kiln-bench".into(),
        quiesce: if req.agent.is_some() {
            Quiesce::Required
        } else {
            Quiesce::Off
        },
        freeze_timeout: crate::ops::instance_snapshot::DEFAULT_FREEZE_TIMEOUT,
        properties: Default::default(),
    };
    // Warm-up: lazy backend opens and cold caches on both sides.
    let r = service.snapshot_instance(snap()).await?;
    service.delete_image(r.image.id, false).await?;
    let (mut window, mut members, mut whole, mut single, mut seq) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut freeze, mut thaw) = (vec![], vec![]);
    let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
    for _ in 0..req.iterations {
        let t = Instant::now();
        let r = service.snapshot_instance(snap()).await?;
        whole.push(t.elapsed());
        members.push(ms(r.members_ms));
        window.push(ms(r.window_ms.unwrap_or(r.members_ms)));
        freeze.extend(r.freeze_ms.map(ms));
        thaw.extend(r.thaw_ms.map(ms));
        service.delete_image(r.image.id, false).await?;
        let mut sum = Duration::ZERO;
        let mut made = Vec::new();
        for v in vols {
            let t = Instant::now();
            let s = service.create_snapshot(*v, None, true).await?;
            let d = t.elapsed();
            single.push(d);
            sum += d;
            made.push(s.id);
        }
        seq.push(sum);
        for s in made {
            service.delete_snapshot(s, false).await?;
        }
    }
    let window_ms = Percentiles::of(&window);
    let single_create_ms = Percentiles::of(&single);
    let freeze_rpc_ms = (!freeze.is_empty()).then(|| Percentiles::of(&freeze));
    let sequential_sum_ms = Percentiles::of(&seq);
    Ok(InstanceBench {
        backend: req.backend.clone(),
        volumes: vols.len(),
        size_bytes: req.size_bytes,
        iterations: req.iterations,
        window: if req.agent.is_some() {
            "freeze to thaw, as the guard measured it".into()
        } else {
            "no agent: the members' span, first start to last end".into()
        },
        window_ratio: window_ms.median / single_create_ms.median,
        speedup_over_sequential: sequential_sum_ms.median / window_ms.median,
        window_ms,
        members_ms: Percentiles::of(&members),
        window_after_freeze_ratio: freeze_rpc_ms
            .map(|f| (window_ms.median - f.median) / single_create_ms.median),
        freeze_rpc_ms,
        thaw_rpc_ms: (!thaw.is_empty()).then(|| Percentiles::of(&thaw)),
        whole_ms: Percentiles::of(&whole),
        single_create_ms,
        sequential_sum_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_stay_valid_past_26_volumes() {
        for i in 0..MAX_VOLUMES {
            crate::validate::validate_device(&device(i)).unwrap();
        }
        assert_eq!(device(0), "/dev/vda");
        assert_eq!(device(26), "/dev/vdaa");
        let mut all: Vec<String> = (0..MAX_VOLUMES).map(device).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), MAX_VOLUMES);
    }
}
