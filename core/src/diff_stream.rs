//! Ceph's incremental diff stream, `rbd diff v1` — the format `rbd export-diff` writes and
//! `rbd import-diff` applies (ceph/ceph `doc/dev/rbd-diff.rst`): the header line
//! `rbd diff v1\n`, then metadata records (`f` from-snapshot and `t` to-snapshot names, each
//! a little-endian u32 length and the bytes; `s` the image size, a little-endian u64), then
//! data records (`w` offset, length, the bytes; `z` offset, length of zeros; both u64 LE),
//! and `e` at the end. kiln writes it for every backend, so one stream format serves every
//! backup and restore, and a stream kiln made can be applied by the real `rbd import-diff`.

use std::io::{Read, Write};

use crate::error::{Error, Result};

/// The stream's first bytes.
pub const HEADER: &[u8] = b"rbd diff v1\n";

/// Longest snapshot name a reader accepts (Ceph's own names are far shorter).
const MAX_NAME: u32 = 4096;
/// Largest `w` record a reader holds in memory (Ceph writes at most one object, 4 MiB by
/// default; kiln writes at most [`MAX_WRITE`]).
const MAX_RECORD: u64 = 64 << 20;
/// Largest `w` record kiln writes.
pub const MAX_WRITE: usize = 4 << 20;

/// Writes one stream: [`DiffWriter::new`] writes the header and metadata, then data records
/// in any order, then [`DiffWriter::finish`] the end record.
pub struct DiffWriter<W: Write> {
    w: W,
}

impl<W: Write> DiffWriter<W> {
    /// Starts a stream from snapshot `from` (`None`: a full stream, from nothing) to
    /// snapshot `to` of an image of `size` bytes.
    pub fn new(mut w: W, from: Option<&str>, to: Option<&str>, size: u64) -> std::io::Result<Self> {
        w.write_all(HEADER)?;
        for (tag, name) in [(b'f', from), (b't', to)] {
            if let Some(n) = name {
                w.write_all(&[tag])?;
                w.write_all(&(n.len() as u32).to_le_bytes())?;
                w.write_all(n.as_bytes())?;
            }
        }
        w.write_all(b"s")?;
        w.write_all(&size.to_le_bytes())?;
        Ok(DiffWriter { w })
    }

    /// `data` at `offset` (one `w` record).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.w.write_all(b"w")?;
        self.w.write_all(&offset.to_le_bytes())?;
        self.w.write_all(&(data.len() as u64).to_le_bytes())?;
        self.w.write_all(data)
    }

    /// `len` bytes of zeros at `offset` (one `z` record).
    pub fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.w.write_all(b"z")?;
        self.w.write_all(&offset.to_le_bytes())?;
        self.w.write_all(&len.to_le_bytes())
    }

    /// Writes the end record and returns the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.w.write_all(b"e")?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// One record of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The snapshot the stream starts from.
    From(String),
    /// The snapshot the stream leads to.
    To(String),
    /// The image size at the end.
    Size(u64),
    /// Bytes at an offset.
    Data {
        /// Where they go.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Zeros at an offset.
    Zero {
        /// Where they start.
        offset: u64,
        /// How many.
        len: u64,
    },
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid("diff stream", what)
}

/// One record as [`RecordReader::next_item`] returns it: a `w` record's bytes go to the
/// caller's buffer, so a long stream is read with one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `f`: the snapshot the stream starts from.
    From(String),
    /// `t`: the snapshot the stream leads to.
    To(String),
    /// `s`: the image size at the end.
    Size(u64),
    /// `w`: `len` bytes at `offset`, now in the caller's buffer.
    Data {
        /// Where they go.
        offset: u64,
        /// How many (the buffer's length).
        len: u64,
    },
    /// `z`: `len` zeros at `offset`.
    Zero {
        /// Where they start.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// `e`: the end of the stream.
    End,
}

/// Reads a stream record by record. A stream that is not `rbd diff v1`, has an unknown tag,
/// an oversized record or ends early is refused with one line naming the byte offset.
pub struct RecordReader<R: Read> {
    r: R,
    pos: u64,
    started: bool,
}

impl<R: Read> RecordReader<R> {
    /// Reads from `r` (the header is checked by the first [`RecordReader::next_item`]).
    pub fn new(r: R) -> Self {
        RecordReader {
            r,
            pos: 0,
            started: false,
        }
    }

    /// Bytes of the stream consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r
            .read_exact(buf)
            .map_err(|e| bad(format!("truncated at byte {} ({e})", self.pos)))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The next record; a `w` record's bytes replace `data`'s contents.
    pub fn next_item(&mut self, data: &mut Vec<u8>) -> Result<Item> {
        let item = self.next_record()?;
        if let Item::Data { len, .. } = item {
            // At most MAX_RECORD (checked by next_record).
            data.resize(len as usize, 0);
            self.fill(data)?;
        }
        Ok(item)
    }

    /// The next record without a `w` record's bytes: those `len` bytes come next in the
    /// stream and must be taken with [`RecordReader::payload`] before the next call.
    pub fn next_record(&mut self) -> Result<Item> {
        if !self.started {
            let mut h = [0u8; HEADER.len()];
            self.fill(&mut h)?;
            if h != HEADER {
                return Err(bad("it does not start with \"rbd diff v1\""));
            }
            self.started = true;
        }
        let at = self.pos;
        let mut tag = [0u8; 1];
        self.fill(&mut tag)?;
        Ok(match tag[0] {
            t @ (b'f' | b't') => {
                let mut l = [0u8; 4];
                self.fill(&mut l)?;
                let len = u32::from_le_bytes(l);
                if len > MAX_NAME {
                    return Err(bad(format!("snapshot name of {len} bytes at byte {at}")));
                }
                let mut name = vec![0u8; len as usize];
                self.fill(&mut name)?;
                let name = String::from_utf8(name)
                    .map_err(|_| bad(format!("snapshot name at byte {at} is not UTF-8")))?;
                if t == b'f' {
                    Item::From(name)
                } else {
                    Item::To(name)
                }
            }
            b's' => Item::Size(self.u64()?),
            b'w' => {
                let offset = self.u64()?;
                let len = self.u64()?;
                if len > MAX_RECORD {
                    return Err(bad(format!("a data record of {len} bytes at byte {at}")));
                }
                Item::Data { offset, len }
            }
            b'z' => {
                let offset = self.u64()?;
                let len = self.u64()?;
                Item::Zero { offset, len }
            }
            b'e' => Item::End,
            other => return Err(bad(format!("unknown record tag {other:#04x} at byte {at}"))),
        })
    }
}

/// A piece of a `w` record smaller than this, which the reader's buffer does not hold whole,
/// is gathered with the rest of the record first: a pipe hands out 64 KiB at a time, and a
/// volume writer (RBD above all) wants large writes.
const MIN_PIECE: usize = 1 << 20;

impl<R: std::io::BufRead> RecordReader<R> {
    /// Hands the `len` bytes of the `w` record just read by [`RecordReader::next_record`] to
    /// `sink`, in order, each piece with its offset from the record's start: straight from
    /// the underlying reader's buffer when it holds the rest of the record or at least
    /// [`MIN_PIECE`] of it (no copy), else gathered into `staging` first.
    pub fn payload(
        &mut self,
        len: u64,
        staging: &mut Vec<u8>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let left = len - done;
            let buf = self
                .r
                .fill_buf()
                .map_err(|e| bad(format!("truncated at byte {} ({e})", self.pos)))?;
            if buf.is_empty() {
                return Err(bad(format!("truncated at byte {}", self.pos)));
            }
            if (buf.len() as u64) < left && buf.len() < MIN_PIECE {
                // At most MAX_RECORD (checked by next_record).
                staging.resize(left as usize, 0);
                self.fill(staging)?;
                return sink(done, staging);
            }
            let n = (buf.len() as u64).min(left) as usize;
            sink(done, &buf[..n])?;
            self.r.consume(n);
            self.pos += n as u64;
            done += n as u64;
        }
        Ok(())
    }
}

/// Reads a whole stream (header to end record) into its records (for tests and small
/// streams; [`RecordReader`] reads record by record).
pub fn read_records(r: impl Read) -> Result<Vec<Record>> {
    let mut rr = RecordReader::new(r);
    let mut out = Vec::new();
    let mut data = Vec::new();
    loop {
        out.push(match rr.next_item(&mut data)? {
            Item::From(n) => Record::From(n),
            Item::To(n) => Record::To(n),
            Item::Size(s) => Record::Size(s),
            Item::Data { offset, .. } => Record::Data {
                offset,
                data: std::mem::take(&mut data),
            },
            Item::Zero { offset, len } => Record::Zero { offset, len },
            Item::End => return Ok(out),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `step` bytes per read, as a pipe does.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.1).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Every record's bytes through `payload`, as (offset, piece length) per sink call.
    fn pieces(r: impl std::io::BufRead) -> (Vec<u8>, Vec<(u64, usize)>) {
        let mut rr = RecordReader::new(r);
        let (mut got, mut calls, mut staging) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            match rr.next_record().unwrap() {
                Item::Data { offset, len } => rr
                    .payload(len, &mut staging, &mut |from, piece| {
                        calls.push((offset + from, piece.len()));
                        got.extend_from_slice(piece);
                        Ok(())
                    })
                    .unwrap(),
                Item::End => return (got, calls),
                _ => {}
            }
        }
    }

    #[test]
    fn record_bytes_pass_in_large_pieces_and_small_ones_are_gathered_per_record() {
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut w = DiffWriter::new(Vec::new(), None, Some("s"), 8 << 20).unwrap();
        w.data(0, &data).unwrap();
        let bytes = w.finish().unwrap();
        // A reader holding 2 MiB at a time: two pieces straight from its buffer.
        let (got, calls) = pieces(std::io::BufReader::with_capacity(2 << 20, &bytes[..]));
        assert!(got == data, "the bytes differ");
        assert!(calls.len() >= 2 && calls.iter().all(|c| c.1 >= MIN_PIECE / 2));
        // A pipe's 64 KiB reads: the record is gathered and handed over whole.
        let (got, calls) = pieces(std::io::BufReader::with_capacity(
            4 << 20,
            Trickle(&bytes, 64 << 10),
        ));
        assert!(got == data, "the gathered bytes differ");
        assert_eq!(calls.len(), 1, "gathered pieces: {calls:?}");
        assert_eq!(calls[0].1, data.len());
        // Ending inside a record is refused.
        let mut rr = RecordReader::new(&bytes[..bytes.len() / 2]);
        assert!(matches!(rr.next_record().unwrap(), Item::To(_)));
        assert!(matches!(rr.next_record().unwrap(), Item::Size(_)));
        let Item::Data { len, .. } = rr.next_record().unwrap() else {
            panic!("no data record");
        };
        let e = rr
            .payload(len, &mut Vec::new(), &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn a_stream_reads_back_as_written_and_bad_ones_are_refused() {
        let mut w = DiffWriter::new(Vec::new(), Some("a"), Some("b"), 1 << 20).unwrap();
        w.data(4096, b"hello").unwrap();
        w.zero(8192, 512).unwrap();
        let bytes = w.finish().unwrap();
        assert!(bytes.starts_with(HEADER));
        assert_eq!(
            read_records(&bytes[..]).unwrap(),
            vec![
                Record::From("a".into()),
                Record::To("b".into()),
                Record::Size(1 << 20),
                Record::Data {
                    offset: 4096,
                    data: b"hello".to_vec()
                },
                Record::Zero {
                    offset: 8192,
                    len: 512
                },
            ]
        );
        // Byte for byte what Ceph's format says: tag, LE lengths, LE offsets.
        let full = DiffWriter::new(Vec::new(), None, Some("s"), 7)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(
            full,
            b"rbd diff v1\nt\x01\x00\x00\x00ss\x07\x00\x00\x00\x00\x00\x00\x00e"
        );
        assert!(read_records(&b"rbd diff v2\n"[..]).is_err());
        assert!(
            read_records(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        let mut odd = full.clone();
        odd.insert(HEADER.len(), b'q');
        assert!(
            read_records(&odd[..])
                .unwrap_err()
                .to_string()
                .contains("unknown record tag")
        );
    }
}
