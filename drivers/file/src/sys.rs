//! Thin, safe wrappers around the Linux primitives the driver is built on: FICLONE,
//! SEEK_DATA/SEEK_HOLE, flock, statvfs, durable (fsync'ed) renames, and child processes that
//! die with kiln.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kiln_core::{Error, Extent, Result};

/// Maps an I/O error to [`Error::io`] with what the driver was doing and on which path.
pub(crate) fn io_ctx(what: &str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |source| Error::io(context, source)
}

/// Clones `src` into a new file `dst` (created or truncated) with FICLONE: the two files share
/// every extent until one of them is written. Returns the open destination so the caller can
/// fsync it. On failure `dst` is removed again.
pub(crate) fn reflink(src: &Path, dst: &Path) -> io::Result<File> {
    let s = File::open(src)?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    // SAFETY: both descriptors are open and owned by `s` and `d` for the whole call; FICLONE
    // takes the source descriptor as its integer argument and touches no user memory.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        drop(d);
        let _ = fs::remove_file(dst);
        return Err(e);
    }
    Ok(d)
}

/// Copies `src` into a new file `dst` (created or truncated) of the same size, writing only
/// the ranges that hold data so holes stay holes. `advance` is told every copied byte count.
/// Returns the open destination (not yet fsync'ed). On failure `dst` is removed again.
pub(crate) fn sparse_copy(src: &Path, dst: &Path, advance: &dyn Fn(u64)) -> io::Result<File> {
    let result = (|| {
        let s = File::open(src)?;
        let size = s.metadata()?.len();
        let d = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dst)?;
        d.set_len(size)?;
        let mut buf = vec![0u8; 1 << 20];
        for e in data_extents(&s, size)? {
            let mut off = e.offset;
            let end = e.offset + e.length;
            while off < end {
                let want = usize::try_from((end - off).min(buf.len() as u64))
                    .map_err(|_| io::Error::other("chunk larger than memory"))?;
                let n = s.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    // The source shrank under us; what is left reads as zeros anyway.
                    break;
                }
                // An all-zero chunk inside a data extent stays a hole in the copy.
                if buf[..n].iter().any(|b| *b != 0) {
                    d.write_all_at(&buf[..n], off)?;
                }
                off += n as u64;
                advance(n as u64);
            }
        }
        Ok(d)
    })();
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

/// Ranges of `file` (of logical `size`) that hold data, from SEEK_DATA/SEEK_HOLE: sorted,
/// non-overlapping, merged. A filesystem without hole reporting yields one extent.
pub(crate) fn data_extents(file: &File, size: u64) -> io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out: Vec<Extent> = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let off = libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset overflow"))?;
        // SAFETY: plain syscall on an fd owned by `file`.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data at or after `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if end <= start {
            break;
        }
        match out.last_mut() {
            Some(last) if last.offset + last.length == start => last.length += end - start,
            _ => out.push(Extent {
                offset: start,
                length: end - start,
            }),
        }
        pos = end;
    }
    Ok(out)
}

/// Makes `len` bytes at `offset` of `file` read as zeros: a punched hole (the blocks are
/// freed, the size kept), or written zeros on a filesystem that cannot punch.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::other("range overflow"));
    };
    // SAFETY: plain syscall on an fd owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// fsyncs a directory, so that renames and unlinks inside it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_ctx("fsync directory", dir))
}

/// Renames `from` to `to` (replacing it) and fsyncs the directory holding `to`.
pub(crate) fn durable_rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(io_ctx("rename to", to))?;
    fsync_dir(parent_of(to))
}

/// Writes `bytes` to `path` atomically: a temp file next to it is written and fsync'ed, then
/// renamed over `path`, then the directory is fsync'ed. A crash leaves the old or the new
/// content, never a mix.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("write {}", tmp.display()), e));
    }
    durable_rename(&tmp, path)
}

/// `dir/.name.tmp` for `dir/name`: the temp name [`atomic_write`] uses.
pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp"))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Removes a file; a file that is already gone is not an error. `true` if this call removed it.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Removes a directory tree; a tree that is already gone is not an error.
pub(crate) fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Whether `path` exists (an error other than "not found" is reported, not guessed).
pub(crate) fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
    }
}

/// An exclusive `flock` on a file or directory, released when dropped (the descriptor closes).
///
/// Serializes read-modify-write of on-disk metadata between kiln processes sharing a backend
/// directory. flock is independent of the OFD locks QEMU takes on images, so it never
/// conflicts with a hypervisor.
#[derive(Debug)]
pub(crate) struct Flock {
    _file: File,
}

impl Flock {
    /// Blocks until the exclusive lock on `path` is held. `create` makes a missing regular
    /// file (lock files); directories are opened as they are.
    pub(crate) fn exclusive(path: &Path, create: bool) -> Result<Flock> {
        let file = if create {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        } else {
            File::open(path)
        }
        .map_err(io_ctx("open lock", path))?;
        loop {
            // SAFETY: plain syscall on an fd owned by `file`.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Flock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::io(format!("flock {}", path.display()), e));
            }
        }
    }
}

/// Total and available bytes of the filesystem holding `dir` (statvfs).
pub(crate) fn statvfs(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("path", format!("{} contains a NUL byte", dir.display())))?;
    // SAFETY: `st` is plain old data that statvfs fills in; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(
            format!("statvfs {}", dir.display()),
            io::Error::last_os_error(),
        ));
    }
    let frsize = st.f_frsize;
    Ok((st.f_blocks * frsize, st.f_bavail * frsize))
}

/// Whether a process with this id is alive (used to tell abandoned temp files from ones a
/// concurrent kiln process is still writing).
pub(crate) fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Makes every process `expr` starts die (SIGKILL) when kiln dies, so that no child outlives
/// the kiln that started it: a `qemu-img commit` or `rebase` left running after `kill -9`
/// would keep qemu's image locks (the next kiln's recovery then meets `Failed to get "write"
/// lock`) and could finish after that recovery recorded the chain, making the record lie.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not only the
/// process. That is what we want here: every child is started and waited for by the same
/// blocking thread (duct's `run`/`reader` spawn on the calling thread, which then waits), so
/// the thread outlives the child unless kiln itself dies.
pub(crate) fn dies_with_parent(expr: duct::Expression) -> duct::Expression {
    expr.before_spawn(|cmd| {
        use std::os::unix::process::CommandExt;
        // Taken in the parent, before the fork.
        let parent = libc::pid_t::try_from(std::process::id())
            .map_err(|_| io::Error::other("process id out of range"))?;
        // SAFETY: the hook runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: `set_parent_death_signal` makes two syscalls
        // and builds its error without allocating.
        unsafe { cmd.pre_exec(move || set_parent_death_signal(parent)) };
        Ok(())
    })
}

/// In a freshly forked child: asks for SIGKILL when the parent (thread) dies, then closes the
/// race where the parent died between the fork and the prctl (the child has then already
/// been re-parented, and the signal would never come) by refusing to exec.
fn set_parent_death_signal(parent: libc::pid_t) -> io::Result<()> {
    const NO_ARG: libc::c_ulong = 0;
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            NO_ARG,
            NO_ARG,
            NO_ARG,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain syscall.
    if unsafe { libc::getppid() } != parent {
        // `from_raw_os_error` does not allocate (we are between fork and exec).
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// The first executable file named `program` in the directories of `$PATH`, as
/// `std::process::Command` would find it; `None` if there is none.
pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Reads a small file completely.
pub(crate) fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_of_a_sparse_file_skip_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 32 << 20).unwrap();
        let ex = data_extents(&f, 64 << 20).unwrap();
        assert_eq!(ex.len(), 2, "{ex:?}");
        assert!(ex[0].offset <= 8 << 20 && ex[0].offset + ex[0].length >= (8 << 20) + 4096);
        assert!(ex[1].offset <= 32 << 20 && ex[1].offset + ex[1].length >= (32 << 20) + 4096);
        // A sparse copy keeps the data and the holes.
        let q = dir.path().join("g");
        drop(sparse_copy(&p, &q, &|_| {}).unwrap());
        let g = File::open(&q).unwrap();
        assert_eq!(g.metadata().unwrap().len(), 64 << 20);
        assert_eq!(data_extents(&g, 64 << 20).unwrap().len(), 2);
        let mut b = [0u8; 4096];
        g.read_exact_at(&mut b, 32 << 20).unwrap();
        assert!(b.iter().all(|x| *x == 9));
    }

    /// A child started through `dies_with_parent` from a thread that then exits without
    /// waiting for it is killed by the kernel (what happens to qemu-img when kiln dies).
    #[test]
    fn children_die_with_the_thread_that_started_them() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let pf = pidfile.clone();
        let t = std::thread::spawn(move || {
            let h = dies_with_parent(duct::cmd!(
                "sh",
                "-c",
                "echo $$ > \"$0\"; exec sleep 600",
                &pf
            ))
            .stdin_null()
            .start()
            .unwrap();
            while !pf.exists() || std::fs::read_to_string(&pf).unwrap().trim().is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // Leak the handle: the thread exits without waiting for the child.
            std::mem::forget(h);
        });
        t.join().unwrap();
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let started = std::time::Instant::now();
        // The kernel sends SIGKILL as the thread exits; nobody reaps the child yet (the
        // handle was leaked), so it turns into a zombie.
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
                .flatten();
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "child {pid} still running ({state:?}) after its parent thread exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Reap it: it died by SIGKILL, not by anything else.
        let mut status = 0;
        // SAFETY: plain syscall on our own child, writing into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(read_small(&p).unwrap(), b"two");
        assert!(!tmp_sibling(&p).exists());
    }
}
