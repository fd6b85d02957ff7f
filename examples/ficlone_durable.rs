//! The durable raw+reflink snapshot primitive with no kiln around it, as a whole process:
//! `FICLONE` of SOURCE into a temp file in the same directory, `fsync` it, `rename` it to
//! DEST, `fsync` the directory. What `tests/harness/bench-startup.sh` times a whole
//! `kiln snapshot create` process against (same work, same durability, same process
//! start-up). With `--rm`, removes DEST durably instead (unlink + directory fsync).
//!
//! Usage: ficlone_durable SOURCE DEST | ficlone_durable --rm DEST

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

fn fail(what: &str, e: std::io::Error) -> ! {
    eprintln!("ficlone_durable: {what}: {e}");
    std::process::exit(1)
}

fn sync_dir(path: &Path) {
    let dir = path.parent().unwrap_or(Path::new("."));
    match File::open(dir) {
        Ok(d) => d.sync_all().unwrap_or_else(|e| fail("fsync dir", e)),
        Err(e) => fail("open dir", e),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dest] if flag == "--rm" => {
            let dest = Path::new(dest);
            std::fs::remove_file(dest).unwrap_or_else(|e| fail("unlink", e));
            sync_dir(dest);
        }
        [src, dest] => {
            let dest = Path::new(dest);
            let tmp = dest.with_extension("tmp");
            let s = File::open(src).unwrap_or_else(|e| fail("open source", e));
            let t = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .unwrap_or_else(|e| fail("create temp", e));
            // SAFETY: both descriptors are open for the duration of the call.
            let rc = unsafe { libc::ioctl(t.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) };
            if rc != 0 {
                fail("FICLONE", std::io::Error::last_os_error());
            }
            t.sync_all().unwrap_or_else(|e| fail("fsync", e));
            std::fs::rename(&tmp, dest).unwrap_or_else(|e| fail("rename", e));
            sync_dir(dest);
        }
        _ => {
            eprintln!("usage: ficlone_durable SOURCE DEST | ficlone_durable --rm DEST");
            std::process::exit(2)
        }
    }
}
