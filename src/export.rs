//! `snapshot export`: the snapshot's full raw image to a file (sparse) or stdout, with a
//! progress bar and the image's SHA-256; `snapshot diff`: the snapshot as an `rbd diff v1`
//! stream.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_core::delta::read_full;
use kiln_core::{Error, Result, SnapshotReader};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Copy unit: large enough for sequential throughput, small enough to keep memory flat.
const CHUNK: usize = 4 << 20;

/// Where the image goes.
pub enum Sink {
    /// A new file: holes and all-zero chunks are skipped, so the copy is sparse.
    File(File, PathBuf),
    /// Standard output: every byte is written, zeros included.
    Stdout,
}

/// What an export did.
#[derive(Debug, Serialize)]
pub struct ExportSummary {
    /// The snapshot exported.
    pub snapshot_id: String,
    /// The output path, or "-".
    pub output: String,
    /// Image size in bytes.
    pub size_bytes: u64,
    /// Bytes of data actually written (excluding skipped holes and zero chunks).
    pub data_bytes_written: u64,
    /// SHA-256 of the full raw image (holes hashed as zeros), hex.
    pub sha256: String,
}

/// A progress bar on stderr in bytes, hidden when stderr is not a terminal or `hidden`.
pub fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        pb.set_style(style);
    }
    pb
}

/// The reader's extents as sorted `(start, end)` ranges clamped to its size (they may still
/// overlap or touch).
fn ranges(reader: &dyn SnapshotReader) -> Vec<(u64, u64)> {
    let size = reader.size();
    let mut extents: Vec<(u64, u64)> = reader
        .extents()
        .iter()
        .map(|e| {
            (
                e.offset.min(size),
                e.offset.saturating_add(e.length).min(size),
            )
        })
        .filter(|(s, e)| e > s)
        .collect();
    extents.sort_unstable();
    extents
}

/// What a diff stream holds.
#[derive(Debug, Serialize)]
pub struct DiffSummary {
    /// The snapshot the stream leads to.
    pub snapshot_id: String,
    /// The older snapshot it starts from (`null`: a full stream).
    pub from_snapshot_id: Option<String>,
    /// The output path, or "-".
    pub output: String,
    /// Image size in bytes (the stream's size record).
    pub size_bytes: u64,
    /// Bytes of data records (a full stream leaves all-zero grains out).
    pub data_bytes: u64,
    /// Bytes of zero records (ranges that became zeros since `from`).
    pub zero_bytes: u64,
    /// Bytes read from the backend to make the stream.
    pub read_bytes: u64,
    /// The stream's length in bytes.
    pub stream_bytes: u64,
    /// SHA-256 of the stream, hex.
    pub sha256: String,
}

/// A writer that hashes and counts what passes through.
struct Hashing<W: Write> {
    w: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Writes `src`'s stream to `out` (blocking), hashing it. Returns (what the stream holds,
/// stream bytes, stream sha256 hex).
pub fn copy_diff(
    src: &mut kiln_core::delta::DeltaSource,
    out: impl Write,
    pb: &ProgressBar,
) -> Result<(kiln_core::delta::StreamStats, u64, String)> {
    let sink = Hashing {
        w: std::io::BufWriter::with_capacity(1 << 20, out),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let (stats, sink) = src.write_to(sink, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    Ok((stats, sink.bytes, hex::encode(sink.hasher.finalize())))
}

/// Copies the image (blocking). Returns (data bytes written, sha256 hex).
pub fn copy(
    reader: &mut dyn SnapshotReader,
    sink: &mut Sink,
    pb: &ProgressBar,
) -> Result<(u64, String)> {
    let size = reader.size();
    let extents = ranges(reader);
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = Sha256::new();
    let mut stdout = std::io::stdout().lock();
    let mut written = 0u64;
    let mut pos = 0u64;

    let hole = |from: u64,
                to: u64,
                hasher: &mut Sha256,
                sink: &mut Sink,
                stdout: &mut std::io::StdoutLock<'_>|
     -> Result<()> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(CHUNK as u64) as usize;
            hasher.update(&zeros[..n]);
            if let Sink::Stdout = sink {
                stdout
                    .write_all(&zeros[..n])
                    .map_err(|e| Error::io("write to stdout", e))?;
            }
            at += n as u64;
            pb.inc(n as u64);
        }
        Ok(())
    };

    for (start, end) in extents {
        // Extents may overlap or touch; only copy what is past the current position.
        let start = start.max(pos);
        if start >= end {
            continue;
        }
        hole(pos, start, &mut hasher, sink, &mut stdout)?;
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            read_full(reader, at, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            match sink {
                Sink::File(f, path) => {
                    if buf[..n].iter().any(|b| *b != 0) {
                        f.write_all_at(&buf[..n], at)
                            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
                        written += n as u64;
                    }
                }
                Sink::Stdout => {
                    stdout
                        .write_all(&buf[..n])
                        .map_err(|e| Error::io("write to stdout", e))?;
                    written += n as u64;
                }
            }
            at += n as u64;
            pb.inc(n as u64);
        }
        pos = end;
    }
    hole(pos, size, &mut hasher, sink, &mut stdout)?;
    match sink {
        Sink::File(f, path) => {
            // The tail may be a hole: fix the length, then make it durable.
            f.set_len(size)
                .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
            f.sync_all()
                .map_err(|e| Error::io(format!("sync {}", path.display()), e))?;
        }
        Sink::Stdout => stdout.flush().map_err(|e| Error::io("flush stdout", e))?,
    }
    pb.finish_and_clear();
    Ok((written, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Extent;

    struct Mem(Vec<u8>, Vec<Extent>);
    impl SnapshotReader for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn extents(&self) -> &[Extent] {
            &self.1
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            // Short reads on purpose: the copier must loop.
            let off = offset as usize;
            let n = buf.len().min(self.0.len() - off).min(1000);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
    }

    #[test]
    fn sparse_file_export_matches_the_image_and_its_hash() {
        let mut image = vec![0u8; 10 << 20];
        image[5 << 20..(5 << 20) + 3000].fill(0xab);
        image[(10 << 20) - 10..].fill(0xcd);
        let extents = vec![
            Extent {
                offset: 5 << 20,
                length: 1 << 20,
            },
            Extent {
                offset: (10 << 20) - 4096,
                length: 8192,
            }, // runs past the end: clamped
        ];
        let mut r = Mem(image.clone(), extents);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let f = File::create_new(&path).unwrap();
        let mut sink = Sink::File(f, path.clone());
        let (written, sha) = copy(&mut r, &mut sink, &ProgressBar::hidden()).unwrap();
        let out = std::fs::read(&path).unwrap();
        assert_eq!(out, image);
        assert_eq!(sha, hex::encode(Sha256::digest(&image)));
        // The 1 MiB extent and the 4 KiB tail, nothing else.
        assert_eq!(written, (1 << 20) + 4096);
    }
}
