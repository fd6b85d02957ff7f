//! A minimal NBD client (fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, read / write /
//! flush) over a unix socket: the "guest" of the online-snapshot tests, writing through the
//! hypervisor's export the way a VM writes through its virtual disk. One connection for its
//! whole life: a test can then show that a snapshot never made the guest reconnect.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cut::{BLOCK, bases, stamp};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

/// One NBD connection to one export.
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    handle: u64,
}

impl NbdClient {
    /// Connects to `export` on the NBD server listening at `socket`.
    pub fn connect(socket: &Path, export: &str) -> std::io::Result<NbdClient> {
        let mut sock = UnixStream::connect(socket)?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
        let opt = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(std::io::Error::other("not a fixed-newstyle NBD server"));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        let mut msg = client_flags.to_be_bytes().to_vec();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        sock.write_all(&msg)?;
        let mut info = [0u8; 10];
        sock.read_exact(&mut info)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            sock.read_exact(&mut zeroes)?;
        }
        let size = u64::from_be_bytes(info[0..8].try_into().unwrap_or_default());
        Ok(NbdClient {
            sock,
            size,
            handle: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> std::io::Result<()> {
        self.handle += 1;
        let mut msg = Vec::with_capacity(28 + data.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&cmd.to_be_bytes());
        msg.extend_from_slice(&self.handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.sock.write_all(&msg)?;
        let mut reply = [0u8; 16];
        self.sock.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap_or_default());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap_or_default());
        let handle = u64::from_be_bytes(reply[8..16].try_into().unwrap_or_default());
        if magic != REPLY_MAGIC || handle != self.handle {
            return Err(std::io::Error::other("bad NBD reply"));
        }
        if error != 0 {
            return Err(std::io::Error::other(format!(
                "NBD request failed with error {error}"
            )));
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.request(CMD_READ, offset, buf.len() as u32, &[])?;
        self.sock.read_exact(buf)
    }

    /// Flushes the export (the hypervisor makes earlier writes durable).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])
    }
}

/// The guest of the online-snapshot tests: one thread writing generations 0, 1, 2, ... of
/// the [`crate::cut`] block format through NBD, block by block, each block to every export in
/// turn (block i of the first export, of the second, ..., then block i+1), one write at a
/// time, so that at any instant the exports differ by at most one block write. One
/// connection per export for its whole life; any NBD error ends it with that error. It
/// flushes every export when told to stop (what a guest flushed is durable).
pub struct Writer {
    stop: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

/// Hang guard of the writer and its waits (not a timing threshold).
const WRITER_LIMIT: Duration = Duration::from_secs(120);

impl Writer {
    /// Starts writing `blocks` blocks per generation to `exports` of the NBD server at
    /// `socket`.
    pub fn start(socket: &Path, exports: &[&str], blocks: u64) -> Writer {
        let sock = socket.to_path_buf();
        let names: Vec<String> = exports.iter().map(|e| e.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (s2, g2) = (stop.clone(), generation.clone());
        let handle = std::thread::spawn(move || {
            let bases = bases(blocks);
            let mut conns = names
                .iter()
                .map(|n| NbdClient::connect(&sock, n))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| format!("connect: {e}"))?;
            let mut buf = vec![0u8; BLOCK];
            let mut g = 0;
            let start = Instant::now();
            while !s2.load(Ordering::Relaxed) && start.elapsed() < WRITER_LIMIT {
                g2.store(g, Ordering::Relaxed);
                for i in 0..blocks {
                    stamp(&bases[i as usize], g, i, &mut buf);
                    for c in conns.iter_mut() {
                        c.write_at(i * BLOCK as u64, &buf)
                            .map_err(|e| format!("generation {g} block {i}: {e}"))?;
                    }
                }
                g += 1;
            }
            for c in conns.iter_mut() {
                c.flush().map_err(|e| format!("flush: {e}"))?;
            }
            Ok(g.saturating_sub(1))
        });
        Writer {
            stop,
            generation,
            handle,
        }
    }

    /// Waits until the writer writes generation `g` (so every earlier one is complete).
    pub fn wait_for(&self, g: u64) {
        let t = Instant::now();
        while self.generation.load(Ordering::Relaxed) < g {
            assert!(!self.handle.is_finished(), "the guest writer stopped");
            assert!(
                t.elapsed() < WRITER_LIMIT,
                "the guest writer did not reach generation {g}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the writer; the last generation it completed. Panics if it ever saw an error.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => panic!("the guest writer failed (it must never see an error): {e}"),
            Err(_) => panic!("the guest writer panicked"),
        }
    }
}
