//! `kiln bench snapshot`: times kiln's snapshot create/delete (service, store, locks and
//! driver together) against the backend's raw primitive, in the same run on the same volume.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::service::{CreateVolume, Service};

pub mod instance;

/// Median and tail of a series of timings, in milliseconds. The tail is the maximum, not a
/// "p99": a few dozen samples cannot tell a 99th percentile from the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// The slowest sample.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank median and 90th percentile, and the maximum, of `samples` (which must
    /// not be empty).
    pub fn of(samples: &[Duration]) -> Percentiles {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let idx = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[idx]
        };
        Percentiles {
            median: rank(0.5),
            p90: rank(0.9),
            max: rank(1.0),
        }
    }
}

/// A comparison primitive timed alongside (e.g. the `rbd` CLI).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What was timed.
    pub name: String,
    /// Its create timings.
    pub create_ms: Percentiles,
    /// Its delete timings.
    pub delete_ms: Percentiles,
}

/// The result of `kiln bench snapshot`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBench {
    /// Backend benchmarked.
    pub backend: String,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Iterations of each measurement.
    pub iterations: usize,
    /// kiln's `snapshot create` (store + lock + driver), per iteration.
    pub create_ms: Percentiles,
    /// kiln's `snapshot delete`, per iteration.
    pub delete_ms: Percentiles,
    /// The raw backend operation timed for comparison.
    pub primitive: String,
    /// The raw primitive's create timings.
    pub primitive_ms: Percentiles,
    /// The raw primitive's delete timings.
    pub primitive_delete_ms: Percentiles,
    /// `create_ms.median / primitive_ms.median`: kiln's overhead factor.
    pub create_ratio: f64,
    /// `delete_ms.median / primitive_delete_ms.median`.
    pub delete_ratio: f64,
    /// Further primitives timed in the same run (if the backend has any).
    pub comparisons: Vec<Comparison>,
}

/// Largest iteration count accepted: enough for stable p99s, small enough to finish.
pub const MAX_ITERATIONS: usize = 10_000;

/// What to benchmark on.
#[derive(Debug, Clone)]
pub enum Target {
    /// A scratch volume of this size on this backend, deleted afterwards.
    Scratch {
        /// Backend name.
        backend: String,
        /// Volume size in bytes.
        size_bytes: u64,
    },
    /// An existing volume (e.g. one filled with data), left as it was: `available`, or
    /// `in-use` — then kiln's path is the forced snapshot (for a qcow2 volume, through its
    /// hypervisor) and the backend's primitive is the one for an attached volume.
    Volume(crate::types::VolumeId),
}

/// Alternates kiln's snapshot create+delete with the backend's raw primitive `iterations`
/// times on the target volume. A scratch volume is removed again whatever happens.
pub async fn snapshot(
    service: &Service,
    target: Target,
    iterations: usize,
) -> Result<SnapshotBench> {
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err(Error::invalid(
            "iterations",
            format!("{iterations}: must be 1..={MAX_ITERATIONS}"),
        ));
    }
    match target {
        Target::Volume(id) => {
            let volume = service.volume(id).await?;
            run(service, &volume, iterations).await
        }
        Target::Scratch {
            backend,
            size_bytes,
        } => {
            let volume = service
                .create_volume(CreateVolume {
                    owner: None,
                    size_bytes: Some(size_bytes),
                    backend: Some(backend),
                    name: Some("kiln-bench".into()),
                    source_snapshot: None,
                })
                .await?;
            let result = run(service, &volume, iterations).await;
            // Remove the scratch volume whatever happened; report the bench error first.
            let cleanup = service.delete_volume(volume.id, true).await;
            let bench = result?;
            cleanup?;
            Ok(bench)
        }
    }
}

async fn run(
    service: &Service,
    volume: &crate::types::Volume,
    iterations: usize,
) -> Result<SnapshotBench> {
    let prim = service
        .backend_driver(&volume.backend)
        .await?
        .bench()
        .ok_or_else(|| Error::unsupported("this backend has no benchmark primitive"))?;
    let timed_primitive = || {
        let (prim, volume) = (prim.clone(), volume.clone());
        async move {
            tokio::task::spawn_blocking(move || prim.bench_primitives(&volume))
                .await
                .map_err(|e| Error::backend("bench", format!("worker thread failed: {e}")))?
        }
    };
    let force = volume.status == crate::types::VolumeStatus::InUse;
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    let mut prims: Vec<(String, Vec<Duration>, Vec<Duration>)> = Vec::new();
    // Warm-up: first calls pay for cold caches and lazy connections on every side.
    let s = service.create_snapshot(volume.id, None, force).await?;
    service.delete_snapshot(s.id, false).await?;
    timed_primitive().await?;
    for _ in 0..iterations {
        let t = Instant::now();
        let s = service.create_snapshot(volume.id, None, force).await?;
        create.push(t.elapsed());
        let t = Instant::now();
        service.delete_snapshot(s.id, false).await?;
        delete.push(t.elapsed());
        for (i, sample) in timed_primitive().await?.into_iter().enumerate() {
            if prims.len() <= i {
                prims.push((sample.name.clone(), Vec::new(), Vec::new()));
            }
            prims[i].1.push(sample.create);
            prims[i].2.push(sample.delete);
        }
    }
    let mut prims = prims.into_iter();
    let (primitive, pc, pd) = prims
        .next()
        .ok_or_else(|| Error::unsupported("the backend reported no primitive"))?;
    let create_ms = Percentiles::of(&create);
    let delete_ms = Percentiles::of(&delete);
    let primitive_ms = Percentiles::of(&pc);
    let primitive_delete_ms = Percentiles::of(&pd);
    Ok(SnapshotBench {
        backend: volume.backend.clone(),
        size_bytes: volume.size_bytes,
        iterations,
        create_ratio: create_ms.median / primitive_ms.median,
        delete_ratio: delete_ms.median / primitive_delete_ms.median,
        create_ms,
        delete_ms,
        primitive,
        primitive_ms,
        primitive_delete_ms,
        comparisons: prims
            .map(|(name, c, d)| Comparison {
                name,
                create_ms: Percentiles::of(&c),
                delete_ms: Percentiles::of(&d),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.median, p.p90, p.max), (50.0, 90.0, 100.0));
        let one = Percentiles::of(&[Duration::from_millis(7)]);
        assert_eq!((one.median, one.max), (7.0, 7.0));
    }
}
