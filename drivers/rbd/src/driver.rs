//! `RbdDriver`: kiln's `VolumeDriver` over librbd, one connection per backend.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kiln_core::{
    Attachment, BackendStats, Capabilities, Error, PrimitiveSample, ProgressHandle, ProviderUpdate,
    Result, Snapshot, SnapshotReader, Volume, VolumeDriver,
};
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::config::RbdConfig;
use crate::image::{self, Image};
use crate::names::{snapshot_id_of_name, snapshot_name, volume_id_of_image, volume_image};
use crate::progress::ProgressBridge;
use crate::reader::RbdSnapshotReader;
use crate::{bench, stats};

/// Longest parent chain followed when measuring clone depth. Ceph itself has no limit, but a
/// chain this long means something is wrong; past it the clone is treated as too deep (and
/// flattened), which is always safe.
const MAX_PARENT_WALK: u32 = 64;

/// A Ceph RBD backend: one pool, one persistent librados connection shared by all calls.
pub struct RbdDriver {
    name: String,
    cfg: RbdConfig,
    cluster: Arc<Cluster>,
}

impl std::fmt::Debug for RbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDriver")
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl RbdDriver {
    /// Validates `cfg`, connects to the cluster (bounded by `connect_timeout_secs`: a cluster
    /// that is down gives a clear `Error::Backend` instead of a hang) and opens the pool
    /// (`Error::Config` if it does not exist). The connection lives as long as the driver.
    pub async fn open(backend_name: &str, cfg: RbdConfig) -> Result<RbdDriver> {
        cfg.validate(backend_name)?;
        let t = Instant::now();
        let cluster = Cluster::connect(&cfg).await.map_err(|e| match e {
            Error::Backend { op, message } => Error::Backend {
                op,
                message: format!("backend {backend_name:?}: {message}"),
            },
            Error::Config(m) => Error::Config(format!("backend {backend_name:?} (rbd): {m}")),
            other => other,
        })?;
        tracing::info!(
            backend = backend_name,
            pool = %cfg.pool,
            conf = %cfg.ceph_conf.display(),
            elapsed_ms = t.elapsed().as_millis() as u64,
            "connected to Ceph"
        );
        Ok(RbdDriver {
            name: backend_name.to_string(),
            cfg,
            cluster: Arc::new(cluster),
        })
    }

    /// The backend's configuration.
    pub fn config(&self) -> &RbdConfig {
        &self.cfg
    }

    /// The shared connection (for tests and tools that need raw image access).
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Runs `f` on the blocking pool with the connection, inside a span naming the operation
    /// and object, and logs the elapsed time.
    async fn blocking<T, F>(&self, op: &'static str, object: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Cluster>) -> Result<T> + Send + 'static,
    {
        let cluster = Arc::clone(&self.cluster);
        let span = tracing::info_span!("rbd", backend = %self.name, op, object = %object);
        async move {
            let t = Instant::now();
            let res = tokio::task::spawn_blocking(move || f(&cluster))
                .await
                .map_err(|e| Error::backend(op, format!("worker thread failed: {e}")))?;
            let elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
            match &res {
                Ok(_) => tracing::debug!(elapsed_ms, "done"),
                // The caller reports the error: at info, so the CLI keeps its one-line stderr.
                Err(e) => tracing::info!(elapsed_ms, error = %e, "failed"),
            }
            res
        }
        .instrument(span)
        .await
    }

    fn location(&self, image: &str, snap: Option<&str>) -> ProviderUpdate {
        let pool = &self.cfg.pool;
        ProviderUpdate {
            provider_location: Some(match snap {
                Some(s) => format!("{pool}/{image}@{s}"),
                None => format!("{pool}/{image}"),
            }),
        }
    }
}

fn volume_not_found(v: &kiln_core::VolumeId) -> Error {
    Error::NotFound {
        what: "volume",
        id: v.to_string(),
    }
}

fn snapshot_not_found(s: &Snapshot) -> Error {
    Error::NotFound {
        what: "snapshot",
        id: s.id.to_string(),
    }
}

/// Opens the volume's image read-write, mapping a missing image to `NotFound`.
fn open_volume(c: &Arc<Cluster>, v: &kiln_core::VolumeId) -> Result<Image> {
    Image::open(c, &volume_image(v), None).map_err(|e| {
        if e.is_not_found() {
            volume_not_found(v)
        } else {
            e.into()
        }
    })
}

/// Names a dependent image the way the service understands: the volume UUID for kiln's own
/// images, `pool/image` otherwise.
fn dependent_id(child: &image::ChildSpec) -> String {
    match volume_id_of_image(&child.image_name) {
        Some(id) => id.to_string(),
        None => format!("{}/{}", child.pool_name, child.image_name),
    }
}

fn describe_child(child: &image::ChildSpec) -> String {
    let trash = if child.trash {
        " (in the RBD trash)"
    } else {
        ""
    };
    format!("{}/{}{trash}", child.pool_name, child.image_name)
}

fn create_snapshot_blocking(c: &Arc<Cluster>, s: &Snapshot, force: bool) -> Result<()> {
    let img = open_volume(c, &s.volume_id)?;
    let snap = snapshot_name(&s.id);
    if force {
        // Without exclusive-lock librbd cannot make the writer pause: writes racing the
        // snapshot could land in it out of order. Refuse rather than hand out a torn image.
        let features = img.features()?;
        if features & crate::ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(Error::Unsupported(format!(
                "image {} lacks the exclusive-lock feature, so a snapshot while it is attached cannot be guaranteed crash-consistent",
                img.name()
            )));
        }
    }
    match img.snap_create(&snap) {
        Ok(()) => Ok(()),
        // The name is this snapshot's own UUID: it exists only if an earlier attempt of this
        // very request got through, so the request is done.
        Err(e) if e.errno == libc::EEXIST => {
            tracing::warn!(snapshot = %snap, "snapshot already exists; treating the create as done");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn delete_snapshot_blocking(c: &Arc<Cluster>, s: &Snapshot) -> Result<()> {
    let snap = snapshot_name(&s.id);
    let img = match Image::open(c, &volume_image(&s.volume_id), None) {
        Ok(i) => i,
        // No volume image, so no snapshot either.
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !img.snap_exists(&snap)? {
        return Ok(());
    }
    let children = img.children_of(&snap)?;
    if !children.is_empty() {
        return Err(busy_with_children(img.name(), &snap, &children));
    }
    if img.snap_is_protected(&snap)? {
        match img.snap_unprotect(&snap) {
            Ok(()) => {}
            // A clone appeared between the listing and the unprotect (another kiln process).
            Err(e) if e.errno == libc::EBUSY => {
                let children = img.children_of(&snap)?;
                return Err(busy_with_children(img.name(), &snap, &children));
            }
            Err(e) => return Err(e.into()),
        }
    }
    match img.snap_remove(&snap) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn busy_with_children(image: &str, snap: &str, children: &[image::ChildSpec]) -> Error {
    let names: Vec<String> = children.iter().map(describe_child).collect();
    Error::Busy {
        reason: format!(
            "snapshot {image}@{snap} has dependent clones: {}; flatten them first (kiln snapshot delete --flatten-dependents) or delete them",
            if names.is_empty() {
                "(a clone is being created)".to_string()
            } else {
                names.join(", ")
            }
        ),
        dependents: children.iter().map(dependent_id).collect(),
    }
}

fn delete_volume_blocking(c: &Arc<Cluster>, v: &Volume) -> Result<()> {
    let name = volume_image(&v.id);
    match image::remove(c, &name) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) if e.errno == libc::ENOTEMPTY => {
            let snaps = match Image::open_read_only(c, &name, None) {
                Ok(img) => img.snap_names()?,
                Err(_) => Vec::new(),
            };
            Err(Error::Busy {
                reason: format!(
                    "volume image {}/{name} still has snapshots: {}; delete them first",
                    c.pool(),
                    snaps.join(", ")
                ),
                dependents: snaps
                    .iter()
                    .map(|s| snapshot_id_of_name(s).map_or_else(|| s.clone(), |id| id.to_string()))
                    .collect(),
            })
        }
        Err(e) if e.errno == libc::EBUSY => Err(Error::Busy {
            reason: format!(
                "volume image {}/{name} is open by another client (a watcher holds it); detach it first",
                c.pool()
            ),
            dependents: Vec::new(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Number of ancestors of the image `cur` is open at (0 for a snapshot of an image that is
/// no clone). Takes the already-open handle so a clone opens `parent@snap` only once.
fn clone_depth(c: &Arc<Cluster>, mut cur: Image) -> Result<u32> {
    let mut depth = 0;
    while let Some(parent) = cur.parent()? {
        depth += 1;
        if depth >= MAX_PARENT_WALK {
            return Ok(depth);
        }
        if parent.pool_name != c.pool() || !parent.pool_namespace.is_empty() {
            // The ancestor lives in another pool/namespace this connection does not open;
            // count what is known. Deeper levels only make flattening more likely, and the
            // configured pool is where kiln's own chains live.
            tracing::debug!(
                ?parent,
                "parent outside the backend pool; depth counted so far"
            );
            return Ok(depth);
        }
        // Close the current level before opening the next: one image handle at a time.
        drop(cur);
        cur = Image::open_read_only(c, &parent.image_name, Some(&parent.snap_name))?;
    }
    Ok(depth)
}

fn create_from_snapshot_blocking(
    c: &Arc<Cluster>,
    cfg: &RbdConfig,
    v: &Volume,
    s: &Snapshot,
    progress: ProgressHandle,
) -> Result<()> {
    let parent = volume_image(&s.volume_id);
    let snap = snapshot_name(&s.id);
    let child = volume_image(&v.id);
    // One read-only handle on parent@snap serves the size check and the depth walk, and it
    // is closed before the read-write open below. Rapid overlapping open/close cycles of
    // the same image (read-write plus read-only at the snapshot, several times) made
    // librbd 16.2 abort on a completion thread (~6 in 100 clones); see docs/rbd-backend.md.
    let at_snap = match Image::open_read_only(c, &parent, Some(&snap)) {
        Ok(img) => img,
        Err(e) if e.errno == libc::ENOENT => return Err(snapshot_not_found(s)),
        Err(e) => return Err(e.into()),
    };
    let snap_size = at_snap.size()?;
    if v.size_bytes < snap_size {
        return Err(Error::invalid(
            "size",
            format!(
                "volume size {} is smaller than the snapshot's {snap_size} bytes",
                v.size_bytes
            ),
        ));
    }
    let depth = clone_depth(c, at_snap)? + 1;
    let src = open_volume(c, &s.volume_id)?;
    // Clone format 1 (the default while the cluster allows pre-mimic clients) refuses to
    // clone an unprotected snapshot; protecting is harmless for format 2.
    if !src.snap_is_protected(&snap)? {
        match src.snap_protect(&snap) {
            Ok(()) => {}
            // Protected concurrently by another clone request: fine.
            Err(e) if e.errno == libc::EBUSY => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(src);
    image::clone(c, &parent, &snap, &child).map_err(|e| {
        if e.errno == libc::EEXIST {
            Error::WrongState(format!("image {}/{child} already exists", c.pool()))
        } else {
            e.into()
        }
    })?;
    // From here on a failure removes the new clone again, so an error leaves the backend
    // as it was (the snapshot stays protected, which is harmless and undone on its delete).
    let finish = || -> Result<()> {
        let img = Image::open(c, &child, None)?;
        if v.size_bytes > img.size()? {
            img.resize(v.size_bytes)?;
        }
        let flatten = cfg.flatten_clones || depth > cfg.max_clone_depth;
        if flatten {
            tracing::info!(
                image = %child,
                depth,
                max_clone_depth = cfg.max_clone_depth,
                flatten_clones = cfg.flatten_clones,
                "flattening the new clone"
            );
            let bridge = ProgressBridge::new(progress, snap_size, &format!("flattening {child}"));
            img.flatten(&bridge)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        if let Err(rm) = image::remove(c, &child) {
            tracing::warn!(image = %child, error = %rm, "could not remove the half-made clone");
            return Err(Error::backend(
                "create volume from snapshot",
                format!("{e}; removing the partial clone {child} also failed: {rm}"),
            ));
        }
        return Err(e);
    }
    Ok(())
}

#[async_trait]
impl VolumeDriver for RbdDriver {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            thin: true,
            online_snapshot: true,
            revert_any: true,
            clone: true,
            clone_cow: !self.cfg.flatten_clones,
            diff: true,
            group_snapshot: false,
            snapshot_method: "rbd_snap_create (librbd; the exclusive-lock owner quiesces writes)"
                .into(),
        }
    }

    async fn create_volume(&self, v: &Volume) -> Result<ProviderUpdate> {
        let name = volume_image(&v.id);
        let size = v.size_bytes;
        let n2 = name.clone();
        self.blocking("rbd_create2", name.clone(), move |c| {
            image::create(c, &n2, size).map_err(|e| {
                if e.errno == libc::EEXIST {
                    Error::WrongState(format!("image {}/{n2} already exists", c.pool()))
                } else {
                    e.into()
                }
            })
        })
        .await?;
        Ok(self.location(&name, None))
    }

    async fn delete_volume(&self, v: &Volume) -> Result<()> {
        let v2 = v.clone();
        self.blocking("rbd_remove", volume_image(&v.id), move |c| {
            delete_volume_blocking(c, &v2)
        })
        .await
    }

    async fn volume_exists(&self, v: &Volume) -> Result<bool> {
        let name = volume_image(&v.id);
        let n2 = name.clone();
        self.blocking(
            "volume_exists",
            name,
            move |c| match Image::open_read_only(c, &n2, None) {
                Ok(_) => Ok(true),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e.into()),
            },
        )
        .await
    }

    async fn create_snapshot(&self, s: &Snapshot, v: &Volume) -> Result<ProviderUpdate> {
        let (image, snap) = (volume_image(&v.id), snapshot_name(&s.id));
        let s2 = s.clone();
        self.blocking("rbd_snap_create", format!("{image}@{snap}"), move |c| {
            create_snapshot_blocking(c, &s2, false)
        })
        .await?;
        Ok(self.location(&image, Some(&snap)))
    }

    async fn create_snapshot_force(
        &self,
        s: &Snapshot,
        v: &Volume,
        a: &Attachment,
    ) -> Result<ProviderUpdate> {
        let (image, snap) = (volume_image(&v.id), snapshot_name(&s.id));
        tracing::info!(
            image = %image,
            instance = %a.instance_id,
            "snapshot of an attached volume; the writer (exclusive-lock owner) takes it"
        );
        let s2 = s.clone();
        self.blocking(
            "rbd_snap_create (force)",
            format!("{image}@{snap}"),
            move |c| create_snapshot_blocking(c, &s2, true),
        )
        .await?;
        Ok(self.location(&image, Some(&snap)))
    }

    async fn delete_snapshot(&self, s: &Snapshot) -> Result<()> {
        let s2 = s.clone();
        self.blocking(
            "rbd_snap_remove",
            format!("{}@{}", volume_image(&s.volume_id), snapshot_name(&s.id)),
            move |c| delete_snapshot_blocking(c, &s2),
        )
        .await
    }

    async fn snapshot_exists(&self, s: &Snapshot) -> Result<bool> {
        let (image, snap) = (volume_image(&s.volume_id), snapshot_name(&s.id));
        self.blocking("rbd_snap_exists", format!("{image}@{snap}"), move |c| {
            match Image::open_read_only(c, &image, None) {
                Ok(img) => Ok(img.snap_exists(&snap)?),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn create_volume_from_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<ProviderUpdate> {
        let image = volume_image(&v.id);
        let (v2, s2, cfg) = (v.clone(), s.clone(), self.cfg.clone());
        self.blocking(
            "rbd_clone3",
            format!(
                "{}@{} -> {image}",
                volume_image(&s.volume_id),
                snapshot_name(&s.id)
            ),
            move |c| create_from_snapshot_blocking(c, &cfg, &v2, &s2, progress),
        )
        .await?;
        Ok(self.location(&image, None))
    }

    async fn revert_to_snapshot(
        &self,
        v: &Volume,
        s: &Snapshot,
        progress: ProgressHandle,
    ) -> Result<()> {
        if s.volume_id != v.id {
            return Err(Error::invalid(
                "snapshot",
                format!(
                    "snapshot {} belongs to volume {}, not {}",
                    s.id, s.volume_id, v.id
                ),
            ));
        }
        let (image, snap) = (volume_image(&v.id), snapshot_name(&s.id));
        let (vid, s2) = (v.id, s.clone());
        self.blocking(
            "rbd_snap_rollback_with_progress",
            format!("{image}@{snap}"),
            move |c| {
                let img = open_volume(c, &vid)?;
                if !img.snap_exists(&snap)? {
                    return Err(snapshot_not_found(&s2));
                }
                let size = Image::open_read_only(c, &image, Some(&snap))?.size()?;
                let bridge =
                    ProgressBridge::new(progress, size, &format!("reverting {image} to {snap}"));
                img.snap_rollback(&snap, &bridge)?;
                Ok(())
            },
        )
        .await
    }

    async fn flatten_volume(&self, v: &Volume, progress: ProgressHandle) -> Result<()> {
        let vid = v.id;
        self.blocking("rbd_flatten_with_progress", volume_image(&v.id), move |c| {
            let img = open_volume(c, &vid)?;
            if img.parent()?.is_none() {
                return Ok(());
            }
            let bridge =
                ProgressBridge::new(progress, img.size()?, &format!("flattening {}", img.name()));
            img.flatten(&bridge)?;
            Ok(())
        })
        .await
    }

    async fn open_snapshot_reader(&self, s: &Snapshot) -> Result<Box<dyn SnapshotReader>> {
        let (image, snap) = (volume_image(&s.volume_id), snapshot_name(&s.id));
        let s2 = s.clone();
        self.blocking("rbd_open_read_only", format!("{image}@{snap}"), move |c| {
            let img = Image::open_read_only(c, &image, Some(&snap)).map_err(|e| {
                if e.is_not_found() {
                    snapshot_not_found(&s2)
                } else {
                    Error::from(e)
                }
            })?;
            let size = img.size()?;
            let extents = img.allocated_extents(size)?;
            Ok(Box::new(RbdSnapshotReader::new(img, size, extents)) as Box<dyn SnapshotReader>)
        })
        .await
    }

    async fn stats(&self) -> Result<BackendStats> {
        self.blocking("ceph df", self.cfg.pool.clone(), |c| stats::pool_stats(c))
            .await
    }

    async fn bench_primitives(&self, v: &Volume) -> Result<Vec<PrimitiveSample>> {
        let vid = v.id;
        self.blocking("bench", volume_image(&v.id), move |c| bench::run(c, &vid))
            .await
    }
}
