//! Open read-write image handles kept between operations.
//!
//! A read-write `rbd_open` reads the image header, registers a watch on it and, on the first
//! operation that changes the image, acquires the exclusive lock and loads the object map;
//! `rbd_close` releases the lock and unregisters the watch. Doing that around every
//! snapshot create and delete cost about as much as the snapshot itself (kiln at ~2× the
//! bare `rbd_snap_create`, see docs/benchmarks.md). [`ImageCache`] keeps one handle per
//! image open instead, the way a long-lived librbd client (QEMU) does.
//!
//! The rules, and why:
//!
//! - **One thread at a time per handle.** librbd.h promises nothing about calling one
//!   `rbd_image_t` from several threads at once, and some calls change the handle's state
//!   (`rbd_snap_set` while listing a snapshot's children), so each handle sits behind its
//!   own mutex. Different images are used in parallel.
//! - **The exclusive lock moves as librbd moves it.** A cached handle that took the lock for
//!   a snapshot keeps it while idle, under librbd's default policy: when another client
//!   (a VM, a writer process, the `rbd` CLI) asks for the lock, librbd in this process hands
//!   it over; when another client owns it, a snapshot request on our handle is sent to that
//!   owner, which quiesces its writes and takes the snapshot (the forced-snapshot path).
//!   Nothing in kiln holds the lock by itself.
//! - **A handle must still be the image its name says.** Another process may remove or
//!   rename the image and create a new one under the same name; a stale handle would then
//!   act on the wrong image. Every reuse first reads the image's directory object
//!   (`rbd_id.<name>`, one small read) and compares the id with the handle's; a mismatch or
//!   a missing image closes the handle and opens afresh (which then reports the truth).
//! - **Idle handles are closed.** A handle holds a watch, and `rbd_remove` (kiln's own, in
//!   another process, or an admin's) refuses an image with watchers. A reaper thread closes
//!   handles unused for [`IDLE_CLOSE`]; kiln's delete retries a refused removal for a little
//!   longer than that (see the driver). At most [`CAPACITY`] handles stay open (least
//!   recently used closed first).
//! - **A handle that saw an error is closed.** Whatever state the failed call left it in,
//!   the next operation starts from a fresh open.
//! - **Closing waits for the current user.** [`ImageCache::close`] (before removing an image)
//!   returns only once the handle is really closed.
//! - **Clones do not use the cache.** The clone path keeps its own open/close sequence, the
//!   one proven free of the librbd 16.2 abort (docs/rbd-backend.md), and closes the cached
//!   handle of the source image first.
//! - **Lookups use a cached handle, but never open one.** Crash-recovery lookups answer from
//!   the cached handle when there is one ([`ImageCache::with_cached`]): no second handle of
//!   the image is opened beside it. Without one they probe with a read-only open, which
//!   sets no watch; opening (and caching) a read-write handle just to ask would put a
//!   watch on every image recovery looks at.
//! - **Snapshot readers do not use the cache** (they need a handle at the snapshot for as
//!   long as the caller reads; see `RbdBackend::open_snapshot_reader`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::errno::{CallResult, RbdCallError};
use crate::image::{self, Image};

/// Most handles kept open at once. Each is a watch on the cluster and a little memory
/// (header, object map: 2 bits per 4 MiB object); 64 covers the volumes one process works
/// on at a time.
pub const CAPACITY: usize = 64;

/// A handle unused this long is closed by the reaper, releasing its watch (and the exclusive
/// lock, if it holds it). Long enough that back-to-back operations on a volume (a bench
/// loop, a script) reuse the handle; short enough that another process's removal of the
/// image, which retries while watchers remain, gets through soon.
pub const IDLE_CLOSE: Duration = Duration::from_secs(3);

/// Why [`ImageCache::with`] failed.
#[derive(Debug)]
pub enum Failure<E> {
    /// The image could not be opened (or its identity not checked); nothing ran.
    Open(RbdCallError),
    /// The operation ran and failed (the handle has been closed).
    Op(E),
}

type Handle = Arc<Mutex<Image>>;

struct Entry {
    image: Handle,
    id: String,
    last_used: Instant,
}

struct State {
    entries: HashMap<String, Entry>,
    stopping: bool,
}

struct Shared {
    cluster: Arc<Cluster>,
    capacity: usize,
    idle: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

/// The open read-write handles of one backend, by image name. See the module docs.
pub struct ImageCache {
    shared: Arc<Shared>,
    reaper: Option<JoinHandle<()>>,
}

/// Locks a mutex whatever a panicking holder left behind: the data is handles and
/// timestamps, which stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ImageCache {
    /// An empty cache over `cluster` with the default bounds, and its reaper thread.
    pub fn new(cluster: Arc<Cluster>) -> std::io::Result<ImageCache> {
        Self::with_bounds(cluster, CAPACITY, IDLE_CLOSE)
    }

    /// An empty cache keeping at most `capacity` handles, each at most `idle` unused.
    pub fn with_bounds(
        cluster: Arc<Cluster>,
        capacity: usize,
        idle: Duration,
    ) -> std::io::Result<ImageCache> {
        let shared = Arc::new(Shared {
            cluster,
            capacity: capacity.max(1),
            idle,
            state: Mutex::new(State {
                entries: HashMap::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
        });
        let s2 = Arc::clone(&shared);
        let reaper = std::thread::Builder::new()
            .name("kiln-rbd-idle".into())
            .spawn(move || reap(&s2))?;
        Ok(ImageCache {
            shared,
            reaper: Some(reaper),
        })
    }

    /// Runs `f` on the open read-write handle of image `name` (opened now if needed), with
    /// no other thread using that handle meanwhile. An error from `f` closes the handle.
    pub fn with<T, E>(
        &self,
        name: &str,
        f: impl FnOnce(&Image) -> Result<T, E>,
    ) -> Result<T, Failure<E>> {
        let handle = self.checkout(name).map_err(Failure::Open)?;
        self.run(name, handle, f)
    }

    /// Runs `f` as [`ImageCache::with`] does, but only on a handle that is already cached and
    /// still is the image its name says (the same id check); opens nothing. `None` when no
    /// handle of `name` is cached, or the cached one no longer is that image (it is dropped
    /// from the cache): the caller then finds out some other way, e.g. with a read-only open
    /// that sets no watch. An error from `f` closes the handle, as in `with`.
    pub fn with_cached<T, E>(
        &self,
        name: &str,
        f: impl FnOnce(&Image) -> Result<T, E>,
    ) -> Option<Result<T, Failure<E>>> {
        match self.cached(name) {
            Ok(Some(handle)) => Some(self.run(name, handle, f)),
            Ok(None) => None,
            Err(e) => Some(Err(Failure::Open(e))),
        }
    }

    /// Runs `f` on `handle` (checked out for `name`) under its mutex, then marks it used, or
    /// drops it from the cache if `f` failed.
    fn run<T, E>(
        &self,
        name: &str,
        handle: Handle,
        f: impl FnOnce(&Image) -> Result<T, E>,
    ) -> Result<T, Failure<E>> {
        let result = f(&lock(&handle));
        let mut st = lock(&self.shared.state);
        let ours = st
            .entries
            .get(name)
            .is_some_and(|e| Arc::ptr_eq(&e.image, &handle));
        let stale = if ours && result.is_err() {
            st.entries.remove(name)
        } else {
            if ours && let Some(e) = st.entries.get_mut(name) {
                e.last_used = Instant::now();
            }
            None
        };
        drop(st);
        // Closed here, outside the cache lock (rbd_close talks to the cluster).
        drop(stale);
        drop(handle);
        result.map_err(Failure::Op)
    }

    /// Closes the cached handle of image `name`, if any, once its current user (if any) is
    /// done; returns after `rbd_close`. Used before the image is removed or cloned.
    pub fn close(&self, name: &str) {
        let removed = lock(&self.shared.state).entries.remove(name);
        if let Some(e) = removed {
            close_when_free(e.image);
        }
    }

    /// How many handles are open (for tests and logs).
    pub fn len(&self) -> usize {
        lock(&self.shared.state).entries.len()
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a handle of image `name` is cached.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.shared.state).entries.contains_key(name)
    }

    /// The cached handle of `name` if there is one and the name still denotes its image;
    /// `None` if nothing is cached or the cached handle was of another image (then dropped
    /// from the cache). Opens nothing.
    fn cached(&self, name: &str) -> CallResult<Option<Handle>> {
        let cached = {
            let mut st = lock(&self.shared.state);
            st.entries.get_mut(name).map(|e| {
                e.last_used = Instant::now();
                (Arc::clone(&e.image), e.id.clone())
            })
        };
        let Some((handle, id)) = cached else {
            return Ok(None);
        };
        match image::id_of(&self.shared.cluster, name) {
            Ok(now) if now == id => Ok(Some(handle)),
            Ok(now) => {
                tracing::debug!(image = name, cached = %id, now = %now, "image replaced under its name; dropping its handle");
                self.discard(name, &handle);
                Ok(None)
            }
            Err(e) if e.is_not_found() => {
                tracing::debug!(
                    image = name,
                    "image gone under its name; dropping its handle"
                );
                self.discard(name, &handle);
                Ok(None)
            }
            // The cluster could not tell: do not act on a handle we cannot vouch for.
            Err(e) => Err(e),
        }
    }

    /// The handle of `name`: the cached one if it is still that image, else a fresh open.
    fn checkout(&self, name: &str) -> CallResult<Handle> {
        if let Some(handle) = self.cached(name)? {
            return Ok(handle);
        }
        let img = Image::open(&self.shared.cluster, name, None)?;
        let id = match img.id() {
            Ok(id) => id,
            // A format-1 image has no id to check a cached handle against: used uncached.
            Err(e) if e.errno == libc::EINVAL => return Ok(Arc::new(Mutex::new(img))),
            Err(e) => return Err(e),
        };
        let handle = Arc::new(Mutex::new(img));
        let (handle, closing) = {
            let mut st = lock(&self.shared.state);
            if let Some(e) = st.entries.get_mut(name) {
                // Another thread opened it meanwhile: use theirs, close ours.
                e.last_used = Instant::now();
                (Arc::clone(&e.image), vec![handle])
            } else {
                let mut closing = Vec::new();
                while st.entries.len() >= self.shared.capacity {
                    let lru = st
                        .entries
                        .iter()
                        .filter(|(_, e)| Arc::strong_count(&e.image) == 1)
                        .min_by_key(|(_, e)| e.last_used)
                        .map(|(k, _)| k.clone());
                    match lru.and_then(|k| st.entries.remove(&k)) {
                        Some(e) => closing.push(e.image),
                        // Every handle is in use: go over the bound for now.
                        None => break,
                    }
                }
                st.entries.insert(
                    name.to_string(),
                    Entry {
                        image: Arc::clone(&handle),
                        id,
                        last_used: Instant::now(),
                    },
                );
                (handle, closing)
            }
        };
        drop(closing);
        Ok(handle)
    }

    /// Forgets `handle` as the cached handle of `name` (if it still is); it closes when its
    /// last user lets go.
    fn discard(&self, name: &str, handle: &Handle) {
        let removed = {
            let mut st = lock(&self.shared.state);
            match st.entries.get(name) {
                Some(e) if Arc::ptr_eq(&e.image, handle) => st.entries.remove(name),
                _ => None,
            }
        };
        drop(removed);
    }
}

impl Drop for ImageCache {
    fn drop(&mut self) {
        lock(&self.shared.state).stopping = true;
        self.shared.wake.notify_all();
        if let Some(r) = self.reaper.take() {
            // The reaper only ever waits on the condvar or closes handles: it ends promptly.
            let _ = r.join();
        }
        let entries: Vec<Entry> = lock(&self.shared.state)
            .entries
            .drain()
            .map(|(_, e)| e)
            .collect();
        for e in entries {
            close_when_free(e.image);
        }
    }
}

/// Drops the last reference to `handle` (closing the image), waiting for any thread still
/// using it. Only `with` holds extra references, and only while it runs.
fn close_when_free(mut handle: Handle) {
    loop {
        match Arc::try_unwrap(handle) {
            Ok(m) => {
                drop(m.into_inner().unwrap_or_else(|p| p.into_inner()));
                return;
            }
            Err(shared) => {
                // Wait for the current user to finish, then for it to let go.
                drop(lock(&shared));
                std::thread::sleep(Duration::from_millis(1));
                handle = shared;
            }
        }
    }
}

/// The reaper: every third of the idle time, closes handles nobody used for that long and
/// nobody is using now.
fn reap(shared: &Shared) {
    let tick = (shared.idle / 3).max(Duration::from_millis(10));
    let mut st = lock(&shared.state);
    loop {
        if st.stopping {
            return;
        }
        st = shared
            .wake
            .wait_timeout(st, tick)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        if st.stopping {
            return;
        }
        let now = Instant::now();
        let idle: Vec<String> = st
            .entries
            .iter()
            .filter(|(_, e)| {
                now.duration_since(e.last_used) >= shared.idle && Arc::strong_count(&e.image) == 1
            })
            .map(|(k, _)| k.clone())
            .collect();
        if idle.is_empty() {
            continue;
        }
        let closing: Vec<Entry> = idle.iter().filter_map(|k| st.entries.remove(k)).collect();
        drop(st);
        tracing::debug!(images = ?idle, "closing idle image handles");
        drop(closing);
        st = lock(&shared.state);
    }
}
