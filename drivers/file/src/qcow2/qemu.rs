//! `qemu-img` invocations, as argv vectors through duct (never a shell), each traced with
//! its elapsed time. A failure carries qemu-img's own stderr; qemu's image-lock refusal is
//! [`ErrorKind::Unavailable`] (another process holds the image: retry later). Every
//! `qemu-img` is found through `PATH` and dies with kiln (see [`sys::dies_with_parent`]).

use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

use kiln_core::{Error, ErrorKind, Extent, Result};
use serde::Deserialize;

use crate::sys;

/// The program, looked up through `PATH` when it is run.
pub(crate) const QEMU_IMG: &str = "qemu-img";

/// `qemu-img <args>` in `cwd`, stdin closed, as a child that dies with kiln.
fn command(cwd: &Path, args: &[OsString]) -> duct::Expression {
    sys::dies_with_parent(duct::cmd(QEMU_IMG, args).dir(cwd).stdin_null())
}

fn cannot_run(op: &'static str, e: std::io::Error) -> Error {
    Error::backend(
        op,
        format!("cannot run {QEMU_IMG}: {e} (is qemu-utils installed?)"),
    )
    .with_source(e)
}

/// The error for a `qemu-img` that exited with `status` and printed `stderr`. qemu's
/// image-lock refusal (`Failed to get "write" lock`, `Failed to get shared "write"
/// lock`) means another process (a hypervisor, or another qemu-img) has the image open:
/// nothing was decided or written (qemu takes its locks while opening, before any I/O), so
/// it is `Unavailable`, not a failure.
fn failed(
    op: &'static str,
    args: &[OsString],
    elapsed_ms: u64,
    status: std::process::ExitStatus,
    stderr: &[u8],
) -> Error {
    let msg = String::from_utf8_lossy(stderr).trim().replace('\n', "; ");
    // The caller reports the error; the adapter logs it at info. Only details here.
    tracing::debug!(op, ?args, elapsed_ms, %msg, "qemu-img failed");
    let msg = if msg.is_empty() {
        format!("exited with {status}")
    } else {
        msg
    };
    if msg.contains("Failed to get") && msg.contains("lock") {
        Error::unavailable(
            op,
            format!("{msg} (another process holds the image; retry later)"),
        )
    } else {
        Error::backend(op, msg)
    }
}

/// Runs `qemu-img <args>` in `cwd` and returns its stdout. `op` names the operation in errors
/// (e.g. "qemu-img rebase").
pub(crate) fn run(op: &'static str, cwd: &Path, args: Vec<OsString>) -> Result<Vec<u8>> {
    let start = Instant::now();
    let out = command(cwd, &args)
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .map_err(|e| cannot_run(op, e))?;
    let elapsed_ms = start.elapsed().as_millis() as u64;
    if !out.status.success() {
        return Err(failed(op, &args, elapsed_ms, out.status, &out.stderr));
    }
    tracing::debug!(op, ?args, elapsed_ms, "qemu-img done");
    Ok(out.stdout)
}

/// Builds an argv vector from mixed string and path arguments.
macro_rules! argv {
    ($($a:expr),* $(,)?) => { vec![$(std::ffi::OsString::from($a)),*] };
}

/// `qemu-img create -f qcow2 <file> <size>` (a new empty image) in `cwd`.
pub(crate) fn create_empty(cwd: &Path, file: &str, size: u64) -> Result<()> {
    run(
        "qemu-img create",
        cwd,
        argv!["create", "-q", "-f", "qcow2", file, size.to_string()],
    )
    .map(drop)
}

/// `qemu-img create -f qcow2 -b <backing> -F qcow2 <file>` in `cwd`: an empty overlay of the
/// backing file's size. Both names are relative to `cwd`, so the overlay records a relative
/// backing name and the volume directory stays relocatable.
pub(crate) fn create_overlay(cwd: &Path, backing: &str, file: &str) -> Result<()> {
    run(
        "qemu-img create",
        cwd,
        argv![
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", file,
        ],
    )
    .map(drop)
}

/// `qemu-img rebase -f qcow2 [-F qcow2] -b <new_backing|""> <file>` in `cwd`, in safe mode:
/// every cluster whose content differs between the old and the new backing chain is copied
/// into `file` first, so what `file` shows never changes. Idempotent: rebasing onto the
/// backing the file already has copies nothing.
pub(crate) fn rebase(cwd: &Path, file: &str, new_backing: Option<&str>) -> Result<()> {
    let args = match new_backing {
        Some(p) => argv!["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", p, file,],
        None => argv!["rebase", "-q", "-f", "qcow2", "-b", "", file],
    };
    run("qemu-img rebase", cwd, args).map(drop)
}

/// `qemu-img commit -q -f qcow2 -d -b <base> <file>` in `cwd`: every cluster `file` allocates
/// (data and zero clusters) is written into its backing file `base`, so `base` then shows
/// exactly what `file` shows. `file` itself is left unchanged (`-d`), and what `file` shows
/// never changes either (its own clusters hide whatever `base` holds under them), so an
/// interrupted commit can simply be run again. Naming `base` explicitly makes qemu-img refuse
/// when `file`'s header is not backed by it. Costs O(data allocated in `file`).
///
/// qemu-img takes its image locks (write on both files) when it opens them, before it
/// writes anything; see [`is_lock_refusal`].
pub(crate) fn commit(cwd: &Path, file: &str, base: &str) -> Result<()> {
    run(
        "qemu-img commit",
        cwd,
        argv!["commit", "-q", "-f", "qcow2", "-d", "-b", base, file],
    )
    .map(drop)
}

/// Whether `e` is qemu-img refusing to open an image because another process (a
/// hypervisor) holds a conflicting image lock. qemu acquires those locks while opening,
/// before any I/O, so a command failing this way wrote nothing. [`run`] makes exactly these
/// failures `Unavailable`.
pub(crate) fn is_lock_refusal(e: &Error) -> bool {
    e.kind() == ErrorKind::Unavailable
}

/// What a file's header says, from `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Header {
    /// The image format qemu detected ("qcow2", "raw", ...).
    pub format: String,
    /// The backing file name in the header; `None` for a standalone image.
    #[serde(rename = "backing-filename")]
    pub backing: Option<String>,
    /// The virtual disk size.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// The header of `file` as qemu reads it (format probed, not assumed: a file that is not
/// qcow2 shows up as such), from `qemu-img info -U --output=json`. Reads only the header
/// (the backing file need not exist); `-U` so a hypervisor holding the file does not make
/// this fail.
pub(crate) fn header(cwd: &Path, file: &str) -> Result<Header> {
    let out = run(
        "qemu-img info",
        cwd,
        argv!["info", "-U", "--output=json", file],
    )?;
    serde_json::from_slice(&out)
        .map_err(|e| Error::backend("qemu-img info", format!("unexpected output: {e}")))
}

/// The backing file name recorded in the qcow2 header of `file` (`None` for a standalone
/// image); see [`header`].
pub(crate) fn backing_of(cwd: &Path, file: &str) -> Result<Option<String>> {
    let out = run(
        "qemu-img info",
        cwd,
        argv!["info", "-U", "--output=json", "-f", "qcow2", file],
    )?;
    let h: Header = serde_json::from_slice(&out)
        .map_err(|e| Error::backend("qemu-img info", format!("unexpected output: {e}")))?;
    Ok(h.backing)
}

/// `qemu-img convert -U -f qcow2 -O <fmt> <src> <dst>`: the whole chain under `src` flattened
/// into one independent image (sparse: zero clusters are not written).
///
/// `src` is always a snapshot's frozen file. `-U` (force share) lets this read it while a
/// hypervisor has the volume's active file, and so its backing chain, open: qemu's image
/// locks would refuse otherwise. Safe because frozen files only ever change by kiln's own
/// rebases, which the volume's flock keeps out while this runs.
pub(crate) fn convert(cwd: &Path, src: &Path, fmt: &str, dst: &Path) -> Result<()> {
    run(
        "qemu-img convert",
        cwd,
        argv!["convert", "-U", "-f", "qcow2", "-O", fmt, src, dst],
    )
    .map(drop)
}

/// [`convert`] with `-p`: qemu-img's percentage (`(12.34/100%)` lines on stdout) is turned
/// into `advance(bytes)` calls against `total` bytes, so long clones show progress.
pub(crate) fn convert_with_progress(
    cwd: &Path,
    src: &Path,
    fmt: &str,
    dst: &Path,
    total: u64,
    advance: &dyn Fn(u64),
) -> Result<()> {
    use std::io::Read;
    let op = "qemu-img convert";
    let args = argv!["convert", "-p", "-U", "-f", "qcow2", "-O", fmt, src, dst];
    let start = Instant::now();
    let handle = command(cwd, &args)
        .stderr_capture()
        .unchecked()
        .reader()
        .map_err(|e| cannot_run(op, e))?;
    let mut reported = 0u64;
    let mut report = |line: &[u8]| {
        if let Some(pct) = parse_percent(line) {
            let now = ((total as f64) * pct / 100.0) as u64;
            let now = now.min(total);
            if now > reported {
                advance(now - reported);
                reported = now;
            }
        }
    };
    let mut buf = [0u8; 512];
    let mut line = Vec::new();
    loop {
        let n = (&handle)
            .read(&mut buf)
            .map_err(|e| Error::backend(op, format!("reading progress: {e}")))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                report(&line);
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    report(&line);
    let out = handle
        .try_wait()
        .map_err(|e| Error::backend(op, e.to_string()))?
        .ok_or_else(|| Error::backend(op, "qemu-img did not exit after closing its output"))?;
    let elapsed_ms = start.elapsed().as_millis() as u64;
    if !out.status.success() {
        return Err(failed(op, &args, elapsed_ms, out.status, &out.stderr));
    }
    tracing::debug!(op, ?args, elapsed_ms, "qemu-img done");
    if total > reported {
        advance(total - reported);
    }
    Ok(())
}

/// `    (12.34/100%)` -> 12.34.
fn parse_percent(line: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
}

/// `qemu-img resize -f qcow2 <file> <size>` (grow only).
pub(crate) fn resize(cwd: &Path, file: &Path, size: u64) -> Result<()> {
    run(
        "qemu-img resize",
        cwd,
        argv!["resize", "-q", "-f", "qcow2", file, size.to_string()],
    )
    .map(drop)
}

#[derive(Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    #[serde(default)]
    data: bool,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    depth: u64,
}

/// Whether another process (a hypervisor) holds `file` open, by qemu's own image locks:
/// `qemu-img info` without `-U` is refused then. Asked before kiln writes files that a
/// hypervisor whose monitor is gone might still have open.
pub(crate) fn is_held(cwd: &Path, file: &str) -> Result<bool> {
    match run(
        "qemu-img info",
        cwd,
        argv!["info", "--output=json", "-f", "qcow2", file],
    ) {
        Ok(_) => Ok(false),
        Err(e) if is_lock_refusal(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Whether the qcow2 `file` allocates anything itself (data or zero clusters of its own, as
/// opposed to what its backing chain shows): `qemu-img map --output=json`, entries of depth
/// 0 that are data or explicit zeroes. Only for a file no process has open (its own
/// metadata on disk is then current); `-U` because its backing file may be a running
/// hypervisor's active, write-locked image, of which only the size is read.
pub(crate) fn has_own_clusters(cwd: &Path, file: &str) -> Result<bool> {
    Ok(map(cwd, file)?
        .iter()
        .any(|m| m.depth == 0 && (m.data || m.zero)))
}

/// `qemu-img map -U --output=json -f qcow2 <file>` in `cwd`, parsed.
fn map(cwd: &Path, file: impl AsRef<std::ffi::OsStr>) -> Result<Vec<MapEntry>> {
    let out = run(
        "qemu-img map",
        cwd,
        argv!["map", "-U", "--output=json", "-f", "qcow2", file.as_ref()],
    )?;
    serde_json::from_slice(&out)
        .map_err(|e| Error::backend("qemu-img map", format!("unexpected output: {e}")))
}

/// Ranges of the image `file` (through its whole backing chain) that may hold non-zero data,
/// from `qemu-img map -U --output=json`: entries with `data: true` or `zero: false`. Sorted
/// and merged. `file` is a frozen snapshot file; `-U` as for [`convert`].
pub(crate) fn data_extents(cwd: &Path, file: &Path) -> Result<Vec<Extent>> {
    mapped_where(cwd, file, |m| m.data || !m.zero)
}

/// Ranges of the image `file` allocated (data or zeroes) in its top `layers` files — the
/// file itself and its `layers - 1` nearest backing files — from `qemu-img map`'s depth.
/// Sorted and merged. `file` is a frozen snapshot file; `-U` as for [`convert`].
pub(crate) fn allocated_in_top(cwd: &Path, file: &Path, layers: u64) -> Result<Vec<Extent>> {
    mapped_where(cwd, file, |m| m.depth < layers && (m.data || m.zero))
}

/// The ranges of `qemu-img map` entries that `keep` selects, merged.
fn mapped_where(cwd: &Path, file: &Path, keep: impl Fn(&MapEntry) -> bool) -> Result<Vec<Extent>> {
    let mut ex: Vec<Extent> = Vec::new();
    for m in map(cwd, file)?.into_iter().filter(|m| keep(m)) {
        match ex.last_mut() {
            Some(last) if last.offset + last.length == m.start => last.length += m.length,
            _ => ex.push(Extent {
                offset: m.start,
                length: m.length,
            }),
        }
    }
    Ok(ex)
}

/// `qemu-img --version`: proves the tool is installed and runs.
pub(crate) fn version(cwd: &Path) -> Result<String> {
    let out = run("qemu-img --version", cwd, argv!["--version"])?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_percent;

    #[test]
    fn progress_lines() {
        assert_eq!(parse_percent(b"    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_percent(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent(b""), None);
        assert_eq!(parse_percent(b"qemu-img: error"), None);
        assert_eq!(parse_percent(b"(250.00/100%)"), None);
    }
}
