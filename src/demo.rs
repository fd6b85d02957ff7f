//! `kiln demo`: kiln's main job, end to end, on the default backend, printing each step and
//! the sha256 of the data it leaves. It uses only the service's public operations, so it
//! shows exactly what the CLI does, and it reaches a volume's bytes the way a hypervisor
//! does: through the volume's connection info (Cinder's `initialize_connection`). A raw image
//! (file, or an LVM block device) is written with pwrite + fsync and read back directly; a
//! qcow2 image (the active layer, which moves with every snapshot and revert) is written with
//! `qemu-io` and read with `qemu-img convert`, both started with an argv, never a shell.
//!
//! On qcow2, whose attached volumes only their hypervisor may switch to a new overlay, step 5
//! starts a qemu-storage-daemon as a stand-in hypervisor (see [`crate::demo_hypervisor`]) and
//! a guest writing through its NBD export, snapshots through its QMP monitor mid-write, and
//! checks the snapshot holds one instant of the guest's writes; without the daemon the step
//! says so and is skipped.
//!
//! Every sha256 is over the whole image (`size_bytes`, holes as zeros), the same measure
//! `snapshot export` prints, so a volume's and a snapshot's sums compare directly. The demo
//! checks what it shows: a snapshot that does not hold the volume's data at its instant, an
//! overwrite that changes nothing, or a clone or revert that does not bring the snapshot's
//! data back is an error, not a line of output.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_core::SnapshotReader;
use kiln_core::service::Service;
use kiln_core::{
    ConnectionInfo, CreateVolume, Error, ErrorKind, InstanceId, Result, SnapshotId, VolumeId,
    no_progress,
};
use sha2::{Digest, Sha256};

use crate::output::{human, tree_text};

/// The demo volume's size: large enough that snapshot times show they do not copy it,
/// small enough that hashing the whole image a few times (holes included) stays quick.
const SIZE: u64 = 256 << 20;
/// Length of each patterned write.
const WRITE_LEN: usize = 1 << 20;
/// Read unit when hashing an image.
const CHUNK: usize = 4 << 20;
/// Where a qcow2 image's tools come from, for messages.
const QEMU_PACKAGE: &str = "qemu-utils";

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// One step's line: what it did and how long kiln took for it (hashing not included).
fn step(n: u32, took_ms: f64, what: String) {
    println!("[{n}] {what}  ({took_ms:.1} ms)");
}

/// A line under a step: the sha256 it produced, and what it is of.
fn sum_line(sha: &str, what: String) {
    println!("    sha256 {sha}  {what}");
}

/// Recognizable data: 64-byte text records `kiln demo <label> @ <offset>`, so `strings` or
/// `hexdump -C` on the image shows what was written where.
struct Pattern {
    label: &'static str,
    offsets: [u64; 2],
}

impl Pattern {
    /// The bytes written at `off`.
    fn bytes_at(&self, off: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(WRITE_LEN + 64);
        while out.len() < WRITE_LEN {
            let at = off + out.len() as u64;
            let mut rec = format!("kiln demo {} @ {at:#012x}", self.label).into_bytes();
            rec.resize(63, b' ');
            rec.push(b'\n');
            out.extend_from_slice(&rec);
        }
        out.truncate(WRITE_LEN);
        out
    }

    fn describe(&self) -> String {
        let at = |off: u64| if off == 0 { "0".into() } else { human(off) };
        format!(
            "{} of \"kiln demo {}\" text at offsets {} and {}",
            human(WRITE_LEN as u64 * self.offsets.len() as u64),
            self.label,
            at(self.offsets[0]),
            at(self.offsets[1])
        )
    }
}

/// A volume's image as its connection info names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Image {
    /// A raw image file or block device: pwrite and read.
    Raw(PathBuf),
    /// A qcow2 image (the active layer): `qemu-io` writes, `qemu-img convert` reads.
    Qcow2(PathBuf),
}

impl Image {
    /// The image a connection names, or why the demo cannot open it itself.
    fn from_info(info: &ConnectionInfo) -> std::result::Result<Image, String> {
        let field = |k: &str| info.data.get(k).and_then(|v| v.as_str());
        match (
            info.driver_volume_type.as_str(),
            field("path"),
            field("device_path"),
        ) {
            ("file", Some(p), _) => match field("format") {
                Some("raw") => Ok(Image::Raw(p.into())),
                Some("qcow2") => Ok(Image::Qcow2(p.into())),
                other => Err(format!("a file connection in format {other:?}")),
            },
            ("local", _, Some(dev)) => Ok(Image::Raw(dev.into())),
            (kind, _, _) => Err(format!("a {kind:?} connection")),
        }
    }

    fn describe(&self) -> String {
        match self {
            Image::Raw(p) => format!("raw image {}", p.display()),
            Image::Qcow2(p) => format!("qcow2 image {}", p.display()),
        }
    }
}

/// The image a hypervisor would open for volume `id` now; `Ok(Err(why))` when the backend
/// gives a connection the demo cannot write through itself (the data steps are skipped).
async fn image(service: &Service, id: VolumeId) -> Result<std::result::Result<Image, String>> {
    match service.connection_info(id).await {
        Ok(info) => Ok(Image::from_info(&info)),
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend("demo", format!("worker thread failed: {e}")))?
}

/// Runs a qemu tool and returns its stdout; its stderr becomes a one-line error.
fn run_tool(cmd: &mut Command, tool: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| {
        Error::io(
            format!("run {tool} (Debian package {QEMU_PACKAGE}) for a qcow2 volume"),
            e,
        )
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        return Err(Error::backend(
            tool.to_string(),
            format!("{}: {}", out.status, lines.join("; ")),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `pattern` into the image durably, as a guest's writes through a hypervisor land.
fn write_pattern(img: &Image, scratch: &Path, pattern: &Pattern) -> Result<()> {
    match img {
        Image::Raw(path) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
            for off in pattern.offsets {
                f.write_all_at(&pattern.bytes_at(off), off)
                    .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
            }
            f.sync_all()
                .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
        }
        Image::Qcow2(path) => {
            // qemu-io's command language splits on spaces: the data files are named
            // relative to the scratch directory (its working directory), whatever TMPDIR is.
            let mut cmd = Command::new("qemu-io");
            cmd.current_dir(scratch).args(["-f", "qcow2"]);
            for (i, off) in pattern.offsets.into_iter().enumerate() {
                let name = format!("{}-{i}.bin", pattern.label);
                let file = scratch.join(&name);
                std::fs::write(&file, pattern.bytes_at(off))
                    .map_err(|e| Error::io(format!("write {}", file.display()), e))?;
                cmd.arg("-c")
                    .arg(format!("write -s {name} {off} {WRITE_LEN}"));
            }
            cmd.args(["-c", "flush"]).arg(path);
            let out = run_tool(&mut cmd, "qemu-io")?;
            // Older qemu-io exits 0 even when a command failed: count the writes it reports.
            if out.matches("wrote ").count() != pattern.offsets.len() {
                return Err(Error::backend(
                    "qemu-io",
                    format!("{}: {}", path.display(), out.trim().replace('\n', "; ")),
                ));
            }
            Ok(())
        }
    }
}

/// sha256 of the first `size` bytes of a raw image (file or device).
fn sha_of_raw(path: &Path, size: u64) -> Result<String> {
    let f =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(CHUNK as u64) as usize;
        let n = f
            .read_at(&mut buf[..want], pos)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Err(Error::backend(
                "demo read",
                format!("{} ended at {pos} of {size} bytes", path.display()),
            ));
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of the volume's whole image, read the way a hypervisor sees it.
fn sha_of_image(img: &Image, scratch: &Path, size: u64) -> Result<String> {
    match img {
        Image::Raw(path) => sha_of_raw(path, size),
        Image::Qcow2(path) => {
            // The whole chain under the active layer, as a sparse raw file.
            let out = scratch.join("volume.raw");
            let _ = std::fs::remove_file(&out);
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(&out);
            let sha = run_tool(&mut cmd, "qemu-img").and_then(|_| sha_of_raw(&out, size));
            let _ = std::fs::remove_file(&out);
            sha
        }
    }
}

/// Writes `pattern` into volume `id` through its connection info; `Err(why)` inside when the
/// connection is not one the demo can open.
async fn write(
    service: &Service,
    id: VolumeId,
    scratch: &Path,
    pattern: &'static Pattern,
) -> Result<std::result::Result<Image, String>> {
    let img = match image(service, id).await? {
        Ok(img) => img,
        Err(why) => return Ok(Err(why)),
    };
    let (i, dir) = (img.clone(), scratch.to_path_buf());
    blocking(move || write_pattern(&i, &dir, pattern)).await?;
    Ok(Ok(img))
}

/// Prints and returns the sha256 of volume `id` (`None` when the demo cannot open it).
async fn volume_sha(
    service: &Service,
    id: VolumeId,
    scratch: &Path,
    what: &str,
    compare: impl FnOnce(&str) -> String,
) -> Result<Option<String>> {
    let img = match image(service, id).await? {
        Ok(img) => img,
        Err(_) => return Ok(None),
    };
    let size = service.volume(id).await?.size_bytes;
    let t = Instant::now();
    let (i, dir) = (img.clone(), scratch.to_path_buf());
    let sha = blocking(move || sha_of_image(&i, &dir, size)).await?;
    sum_line(
        &sha,
        format!(
            "of {what} ({} read through its connection info in {:.1} ms){}",
            match img {
                Image::Raw(_) => "raw image",
                Image::Qcow2(_) => "qcow2 chain",
            },
            ms(t),
            compare(&sha)
        ),
    );
    Ok(Some(sha))
}

/// Exports snapshot `id` (as `kiln snapshot export` does), prints and returns its sha256.
async fn snapshot_sha(
    service: &Service,
    id: SnapshotId,
    scratch: &Path,
    what: &str,
) -> Result<String> {
    let t = Instant::now();
    let out = scratch.join(format!("snapshot-{id}.raw"));
    let summary = crate::export(
        service,
        id,
        &out.to_string_lossy(),
        crate::cli::Format::Json,
    )
    .await;
    let _ = std::fs::remove_file(&out);
    let summary = summary?;
    sum_line(
        &summary.sha256,
        format!(
            "of {what} (exported, {} of data, in {:.1} ms)",
            human(summary.data_bytes_written),
            ms(t)
        ),
    );
    Ok(summary.sha256)
}

/// The demo's own check of what it shows: a failure is a kiln bug, never a line of output.
fn must(holds: bool, what: String) -> Result<()> {
    if holds {
        Ok(())
    } else {
        Err(Error::backend("demo check", what))
    }
}

fn same_or_not(a: &str, b: &str, name: &str) -> String {
    if a == b {
        format!(" (same as {name})")
    } else {
        format!(" (differs from {name})")
    }
}

/// A scratch directory for exports and qcow2 data, removed with its contents.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "kiln-demo-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static BEFORE: Pattern = Pattern {
    label: "before-upgrade",
    offsets: [0, SIZE / 2],
};
static AFTER: Pattern = Pattern {
    label: "after-upgrade",
    offsets: [0, SIZE / 4 * 3],
};

/// Runs the demo; removes what it created unless `keep` (also when a step fails).
pub async fn run(service: &Service, keep: bool) -> Result<()> {
    let backend = service
        .backends()
        .await
        .into_iter()
        .find(|b| b.default)
        .ok_or_else(|| Error::config("no default backend"))?;
    println!(
        "kiln demo on backend {:?} (driver {}, snapshots by {})",
        backend.name, backend.driver, backend.capabilities.snapshot_method
    );
    let scratch = Scratch::new()?;
    let mut created = Vec::new();
    let hypervisor = backend.capabilities.hypervisor_snapshot;
    let result = walk(service, &scratch.0, keep, hypervisor, &mut created).await;
    if result.is_err() && !keep && !created.is_empty() {
        // Newest first: the clone before its origin. Best effort; the error is what matters.
        for id in created.iter().rev() {
            let _ = service.detach(*id).await;
            let _ = service.delete_volume(*id, true).await;
        }
        println!("the demo failed; it removed the volumes it had created (--keep keeps them)");
    }
    result
}

async fn walk(
    service: &Service,
    scratch: &Path,
    keep: bool,
    hypervisor: bool,
    created: &mut Vec<VolumeId>,
) -> Result<()> {
    let t = Instant::now();
    let vol = service
        .create_volume(CreateVolume {
            size_bytes: Some(SIZE),
            name: Some("demo-disk".into()),
            ..Default::default()
        })
        .await?;
    created.push(vol.id);
    step(
        1,
        ms(t),
        format!(
            "created volume {} ({}) at {}",
            vol.id,
            human(vol.size_bytes),
            vol.provider_location.clone().unwrap_or_default()
        ),
    );

    let t = Instant::now();
    let first_image = write(service, vol.id, scratch, &BEFORE).await?;
    match &first_image {
        Ok(img) => step(
            2,
            ms(t),
            format!(
                "wrote {} through the volume's connection info: {}",
                BEFORE.describe(),
                img.describe()
            ),
        ),
        Err(why) => step(
            2,
            ms(t),
            format!(
                "wrote nothing: this backend gives {why}, which the demo cannot open itself; \
                 the data steps are skipped"
            ),
        ),
    }
    let written = volume_sha(service, vol.id, scratch, "the volume", |_| String::new()).await?;

    let t = Instant::now();
    let s1 = service
        .create_snapshot(vol.id, Some("before-upgrade".into()), false)
        .await?;
    step(
        3,
        ms(t),
        format!(
            "snapshot {} \"before-upgrade\" of the detached volume",
            s1.id
        ),
    );
    let snap = snapshot_sha(service, s1.id, scratch, "snapshot before-upgrade").await?;
    if let Some(w) = &written {
        must(
            *w == snap,
            format!(
                "snapshot {} does not hold the data the volume had when it was taken",
                s1.id
            ),
        )?;
    }

    let t = Instant::now();
    let second_image = write(service, vol.id, scratch, &AFTER).await?;
    match &second_image {
        Ok(img) => {
            let moved = match &first_image {
                Ok(before) if before != img => {
                    " (the snapshot moved the volume to a new active layer)"
                }
                _ => "",
            };
            step(
                4,
                ms(t),
                format!(
                    "overwrote the volume with {} through its connection info: {}{moved}",
                    AFTER.describe(),
                    img.describe()
                ),
            );
        }
        Err(_) => step(4, ms(t), "overwrote nothing (data steps skipped)".into()),
    }
    let overwritten = volume_sha(service, vol.id, scratch, "the volume", |sha| {
        same_or_not(sha, &snap, "snapshot before-upgrade")
    })
    .await?;
    if let Some(o) = &overwritten {
        must(
            *o != snap,
            format!("writing to volume {} changed nothing", vol.id),
        )?;
    }

    if hypervisor {
        hypervisor_step(service, scratch, vol.id).await?;
    } else {
        forced_step(service, scratch, vol.id, overwritten.as_deref()).await?;
    }

    let t = Instant::now();
    let clone = service
        .create_volume(CreateVolume {
            source_snapshot: Some(s1.id),
            name: Some("demo-clone".into()),
            ..Default::default()
        })
        .await?;
    created.push(clone.id);
    step(
        6,
        ms(t),
        format!("cloned volume {} from snapshot {}", clone.id, s1.id),
    );
    if let Some(c) = volume_sha(service, clone.id, scratch, "the clone", |sha| {
        same_or_not(sha, &snap, "snapshot before-upgrade")
    })
    .await?
    {
        must(
            c == snap,
            format!("clone {} does not hold snapshot {}'s data", clone.id, s1.id),
        )?;
    }

    let t = Instant::now();
    service.revert(s1.id, no_progress()).await?;
    step(
        7,
        ms(t),
        format!(
            "reverted volume {} to snapshot {} \"before-upgrade\" (other snapshots kept)",
            vol.id, s1.id
        ),
    );
    if let Some(r) = volume_sha(service, vol.id, scratch, "the volume", |sha| {
        same_or_not(sha, &snap, "snapshot before-upgrade")
    })
    .await?
    {
        must(
            r == snap,
            format!(
                "volume {} does not hold snapshot {}'s data after the revert",
                vol.id, s1.id
            ),
        )?;
    }

    println!("lineage:\n{}", tree_text(&service.tree(vol.id).await?));

    if keep {
        println!("kept volume {} and clone {} (--keep)", vol.id, clone.id);
    } else {
        let t = Instant::now();
        service.delete_volume(clone.id, true).await?;
        service.delete_volume(vol.id, true).await?;
        created.clear();
        step(
            8,
            ms(t),
            "deleted the clone, the volume and its snapshots (cascade)".into(),
        );
    }
    Ok(())
}

/// Step 5 on a backend that snapshots an attached volume itself: attach, forced snapshot
/// (or the backend's refusal), detach; the snapshot holds what the volume held.
async fn forced_step(
    service: &Service,
    scratch: &Path,
    vol: VolumeId,
    overwritten: Option<&str>,
) -> Result<()> {
    let instance = InstanceId::new();
    service
        .attach(vol, kiln_core::Attachment::new(instance, "/dev/vda"))
        .await?;
    let t = Instant::now();
    let forced = service
        .create_snapshot(vol, Some("while-running".into()), true)
        .await;
    let took = ms(t);
    service.detach(vol).await?;
    match forced {
        Ok(s) => {
            step(
                5,
                took,
                format!(
                    "attached to instance {instance} as /dev/vda; forced snapshot {} \
                     \"while-running\" of the in-use volume; detached",
                    s.id
                ),
            );
            let sha = snapshot_sha(service, s.id, scratch, "snapshot while-running").await?;
            if let Some(o) = overwritten {
                must(
                    sha == o,
                    format!("forced snapshot {} does not hold the volume's data", s.id),
                )?;
            }
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => step(
            5,
            took,
            format!(
                "attached to instance {instance} as /dev/vda; this backend refuses a forced \
                 snapshot of an in-use volume ({e}); detached"
            ),
        ),
        Err(e) => return Err(e),
    }

    Ok(())
}

/// Step 5 on a backend whose attached volumes only their hypervisor may snapshot (qcow2): a
/// qemu-storage-daemon stands in for it, a guest writes through its NBD export, and the
/// forced snapshot goes through its QMP monitor while the guest writes; the snapshot must
/// show one instant of the guest's writes. Skipped (said so) without qemu-storage-daemon.
async fn hypervisor_step(service: &Service, scratch: &Path, vol: VolumeId) -> Result<()> {
    use crate::demo_hypervisor as hv;
    let t = Instant::now();
    if !hv::installed("qemu-storage-daemon") || !hv::installed("qemu-io") {
        step(
            5,
            ms(t),
            format!(
                "skipped the forced snapshot of an attached qcow2 volume: it goes through the \
                 hypervisor, and the stand-in hypervisor (qemu-storage-daemon, qemu-io) is not \
                 installed (Debian package {QEMU_PACKAGE})"
            ),
        );
        return Ok(());
    }
    let Ok(Image::Qcow2(active)) = image(service, vol).await? else {
        return Err(Error::backend("demo", "the volume is not a qcow2 file"));
    };
    let dir = scratch.join("hypervisor");
    let daemon = blocking({
        let (dir, active) = (dir.clone(), active.clone());
        move || hv::StandIn::start(&dir, &active)
    })
    .await?;
    let instance = service
        .create_instance(kiln_core::service::InstanceSpec {
            project: None,
            name: Some("demo-vm".into()),
            qmp: Some(daemon.qmp().to_string_lossy().into_owned()),
            ..Default::default()
        })
        .await?;
    service
        .attach(vol, kiln_core::Attachment::new(instance.id, "/dev/vda"))
        .await?;
    let guest = daemon.start_guest()?;
    // Let the guest get going: the snapshot lands in the middle of its writes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let t = Instant::now();
    let forced = service
        .create_snapshot(vol, Some("while-running".into()), true)
        .await;
    let took = ms(t);
    let still_writing = matches!(guest_running(&guest), Some(true));
    let guest_done = blocking(move || hv::wait_guest(guest)).await;
    drop(daemon);
    service.detach(vol).await?;
    service.delete_instance(instance.id).await?;
    let s = forced?;
    guest_done?;
    step(
        5,
        took,
        format!(
            "attached to instance {} as /dev/vda, served by a qemu-storage-daemon (the \
             stand-in hypervisor) over NBD; forced snapshot {} \"while-running\" through its \
             QMP monitor while a guest wrote {} generations of {} through it{}; detached",
            instance.id,
            s.id,
            hv::GENERATIONS,
            human(hv::BLOCK * hv::BLOCKS),
            if still_writing {
                " (still writing when the snapshot returned)"
            } else {
                ""
            }
        ),
    );
    let mut reader = service.open_snapshot_reader(s.id).await?;
    let region = blocking(move || {
        let mut buf = vec![0u8; (hv::BLOCK * hv::BLOCKS) as usize];
        let mut off = 0;
        while off < buf.len() {
            let n = reader
                .read_at(off as u64, &mut buf[off..])
                .map_err(|e| Error::io("read the snapshot", e))?;
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(buf)
    })
    .await?;
    match hv::cut_of(&region) {
        Ok((g, k)) => println!(
            "  snapshot {}: blocks 0..{k} hold generation {g}, blocks {k}..{} generation {}: \
             one instant of the guest's writes",
            s.id,
            hv::BLOCKS,
            g.saturating_sub(1)
        ),
        Err(why) => must(
            false,
            format!("snapshot {} is not point-in-time: {why}", s.id),
        )?,
    }
    Ok(())
}

/// Whether the guest process is still running (`None`: cannot tell).
fn guest_running(guest: &std::process::Child) -> Option<bool> {
    // try_wait needs &mut; the pid's /proc entry answers without reaping.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", guest.id())).ok()?;
    Some(stat.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}
