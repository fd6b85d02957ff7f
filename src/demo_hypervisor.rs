//! The demo's stand-in hypervisor, for a forced snapshot of an attached qcow2 volume: a
//! `qemu-storage-daemon` (Debian's qemu-utils) opens the volume's active file, exports it
//! over NBD and serves QMP on a socket — the instance's `--qmp` — and a guest (`qemu-io`
//! over NBD, one connection) writes generation after generation while kiln snapshots. Both
//! are the demo's own children, started with an argv (never a shell) and ended by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};

/// The guest's block: each generation writes `BLOCKS` blocks of this size, in order, each
/// filled with the generation's number.
pub const BLOCK: u64 = 64 << 10;
/// Blocks per generation (4 MiB at offset 0).
pub const BLOCKS: u64 = 64;
/// Generations the guest writes (about 2,000 writes: long enough to snapshot mid-way).
pub const GENERATIONS: u64 = 30;
/// Start-up and exit bound (not a timing claim).
const LIMIT: Duration = Duration::from_secs(30);

/// Whether `tool` is on `PATH`.
pub fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .any(|d| std::fs::metadata(d.join(tool)).is_ok_and(|m| m.is_file()))
    })
}

/// A running qemu-storage-daemon serving one qcow2 file as node and NBD export `d0`.
pub struct StandIn {
    dir: PathBuf,
    child: Child,
}

impl StandIn {
    /// Starts the daemon with its sockets in `dir`, serving `image`; returns once they exist.
    pub fn start(dir: &Path, image: &Path) -> Result<StandIn> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .args(["--monitor", "chardev=m"])
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=unix,addr.path={}",
                dir.join("nbd.sock").display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=d0-file,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=d0,file=d0-file"])
            .args([
                "--export",
                "type=nbd,id=e0,node-name=d0,name=d0,writable=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::io("start qemu-storage-daemon", e))?;
        let mut s = StandIn {
            dir: dir.to_path_buf(),
            child,
        };
        let t = Instant::now();
        while !(s.qmp().exists() && s.nbd().exists()) {
            if t.elapsed() > LIMIT || s.child.try_wait().ok().flatten().is_some() {
                return Err(Error::backend(
                    "demo",
                    "qemu-storage-daemon did not start serving the volume",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    /// Its QMP monitor socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Its NBD socket.
    pub fn nbd(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// The guest: one `qemu-io` writing [`GENERATIONS`] generations through the export,
    /// then flushing.
    pub fn start_guest(&self) -> Result<Child> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"])
            .arg(format!("nbd+unix:///d0?socket={}", self.nbd().display()));
        for g in 1..=GENERATIONS {
            for b in 0..BLOCKS {
                cmd.arg("-c")
                    .arg(format!("write -q -P {g} {} {BLOCK}", b * BLOCK));
            }
        }
        cmd.args(["-c", "flush"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("start qemu-io (the demo's guest)", e))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the guest to finish; its failure (a write error, a broken connection) is an
/// error naming what it printed.
pub fn wait_guest(mut guest: Child) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some(status) = guest
            .try_wait()
            .map_err(|e| Error::io("wait for qemu-io", e))?
        {
            let mut err = String::new();
            if let Some(mut e) = guest.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return if status.success() && err.trim().is_empty() {
                Ok(())
            } else {
                Err(Error::backend(
                    "demo guest",
                    format!("qemu-io {status}: {}", err.trim().replace('\n', "; ")),
                ))
            };
        }
        if t.elapsed() > LIMIT {
            let _ = guest.kill();
            let _ = guest.wait();
            return Err(Error::backend("demo guest", "qemu-io did not finish"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The cut a snapshot image shows: `(g, k)` when blocks `0..k` hold generation `g` and the
/// rest `g - 1` (a point in time inside generation `g`, or `k == BLOCKS`: between two), or
/// why the image is not one instant of the guest's writes.
pub fn cut_of(image: &[u8]) -> std::result::Result<(u64, u64), String> {
    let mut gens = Vec::new();
    for b in 0..BLOCKS {
        let blk = image
            .get((b * BLOCK) as usize..((b + 1) * BLOCK) as usize)
            .ok_or("the image is shorter than the guest's region")?;
        let g = blk[0];
        if blk.iter().any(|&x| x != g) {
            return Err(format!("block {b} is torn (mixes generations)"));
        }
        gens.push(u64::from(g));
    }
    let hi = gens[0];
    let k = gens.iter().position(|&g| g != hi).unwrap_or(gens.len());
    match gens[k..].iter().position(|&g| hi == 0 || g != hi - 1) {
        None => Ok((hi, k as u64)),
        Some(j) => Err(format!(
            "blocks 0..{k} hold generation {hi} but block {} holds {}: not one instant",
            k + j,
            gens[k + j]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(gens: &[u8]) -> Vec<u8> {
        gens.iter()
            .flat_map(|&g| std::iter::repeat_n(g, BLOCK as usize))
            .collect()
    }

    #[test]
    fn a_cut_is_one_instant_of_the_guests_writes() {
        let mut g = vec![5u8; 10];
        g.extend(vec![4u8; (BLOCKS - 10) as usize]);
        assert_eq!(cut_of(&image(&g)), Ok((5, 10)));
        assert_eq!(cut_of(&image(&[3u8; BLOCKS as usize])), Ok((3, BLOCKS)));
        let mut two = g.clone();
        two[40] = 5;
        assert!(cut_of(&image(&two)).is_err(), "two cut points accepted");
        let mut torn = image(&g);
        torn[(20 * BLOCK + 7) as usize] = 5;
        assert!(cut_of(&torn).unwrap_err().contains("torn"));
    }
}
