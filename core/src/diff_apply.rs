//! Applying an `rbd diff v1` stream ([`crate::diff_stream`]) onto a volume, as `rbd
//! import-diff` does onto an image: the stream's metadata is checked before the first byte
//! is written, and every record must lie inside the image the stream describes.

use std::io::BufRead;

use crate::diff_stream::{Item, RecordReader};
use crate::driver::VolumeWriter;
use crate::error::{Error, Result};

/// What a stream says about itself (its metadata records).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamInfo {
    /// The snapshot the stream starts from (`None`: a full stream).
    pub from: Option<String>,
    /// The snapshot the stream leads to.
    pub to: Option<String>,
    /// The image size the stream describes.
    pub size_bytes: u64,
}

/// What applying (or checking) a stream did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Bytes written from `w` records.
    pub data_bytes: u64,
    /// Bytes zeroed by `z` records.
    pub zero_bytes: u64,
    /// Length of the stream.
    pub stream_bytes: u64,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid("diff stream", what)
}

/// Reads the whole stream and checks it (structure, size record before any data, every
/// record inside the image, the end record) without writing anything.
pub fn check(r: impl BufRead) -> Result<(StreamInfo, ApplyStats)> {
    walk(r, None, &|_| Ok(()), &|_| {})
}

/// Applies the stream onto `w`. `accept` sees the stream's metadata before the first write
/// and may refuse it (then nothing was written). `progress` gets each record's byte count.
/// On an error after the first write the volume holds part of the stream.
pub fn apply(
    r: impl BufRead,
    w: &mut dyn VolumeWriter,
    accept: &dyn Fn(&StreamInfo) -> Result<()>,
    progress: &dyn Fn(u64),
) -> Result<(StreamInfo, ApplyStats)> {
    walk(r, Some(w), accept, progress)
}

fn walk(
    r: impl BufRead,
    mut w: Option<&mut dyn VolumeWriter>,
    accept: &dyn Fn(&StreamInfo) -> Result<()>,
    progress: &dyn Fn(u64),
) -> Result<(StreamInfo, ApplyStats)> {
    let mut rr = RecordReader::new(r);
    let mut info = StreamInfo::default();
    let mut size: Option<u64> = None;
    let mut accepted = false;
    let mut stats = ApplyStats::default();
    let mut staging = Vec::new();
    let io = |e: std::io::Error| Error::io("write the volume", e);
    loop {
        let at = rr.position();
        let item = rr.next_record()?;
        let (offset, len) = match item {
            Item::From(n) if !accepted => {
                info.from = Some(n);
                continue;
            }
            Item::To(n) if !accepted => {
                info.to = Some(n);
                continue;
            }
            Item::Size(s) if !accepted => {
                size = Some(s);
                info.size_bytes = s;
                continue;
            }
            Item::From(_) | Item::To(_) | Item::Size(_) => {
                return Err(bad(format!("a metadata record after data, at byte {at}")));
            }
            Item::End => {
                if size.is_none() {
                    return Err(bad("it has no size record"));
                }
                if !accepted {
                    accept(&info)?;
                }
                stats.stream_bytes = rr.position();
                return Ok((info, stats));
            }
            Item::Data { offset, len } | Item::Zero { offset, len } => (offset, len),
        };
        let Some(size) = size else {
            return Err(bad(format!(
                "a data record before the size record, at byte {at}"
            )));
        };
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "a record at byte {at} covers {len} bytes at {offset}, past the image's {size}"
            )));
        }
        if !accepted {
            accept(&info)?;
            accepted = true;
        }
        let is_data = matches!(item, Item::Data { .. });
        match &mut w {
            // Straight from the reader's buffer into the volume: no copy of the record.
            Some(w) if is_data => rr.payload(len, &mut staging, &mut |from, piece| {
                w.write_at(offset + from, piece).map_err(io)
            })?,
            Some(w) => w.zero(offset, len).map_err(io)?,
            None if is_data => rr.payload(len, &mut staging, &mut |_, _| Ok(()))?,
            None => {}
        }
        if is_data {
            stats.data_bytes += len;
        } else {
            stats.zero_bytes += len;
        }
        progress(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff_stream::DiffWriter;

    /// A volume in memory.
    struct Mem(Vec<u8>);

    impl VolumeWriter for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
            self.0[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    fn stream(from: Option<&str>, size: u64, recs: &[(u64, Option<&[u8]>, u64)]) -> Vec<u8> {
        let mut w = DiffWriter::new(Vec::new(), from, Some("b"), size).unwrap();
        for (off, data, len) in recs {
            match data {
                Some(d) => w.data(*off, d).unwrap(),
                None => w.zero(*off, *len).unwrap(),
            }
        }
        w.finish().unwrap()
    }

    #[test]
    fn records_are_applied_and_counted() {
        let s = stream(Some("a"), 16, &[(2, Some(b"xyz"), 3), (8, None, 4)]);
        let mut v = Mem(vec![1; 16]);
        let (info, stats) = apply(&s[..], &mut v, &|_| Ok(()), &|_| {}).unwrap();
        assert_eq!(info.from.as_deref(), Some("a"));
        assert_eq!(info.to.as_deref(), Some("b"));
        assert_eq!(info.size_bytes, 16);
        assert_eq!((stats.data_bytes, stats.zero_bytes), (3, 4));
        assert_eq!(stats.stream_bytes, s.len() as u64);
        assert_eq!(
            v.0,
            b"\x01\x01xyz\x01\x01\x01\x00\x00\x00\x00\x01\x01\x01\x01"
        );
        assert_eq!(check(&s[..]).unwrap().1, stats);
    }

    #[test]
    fn a_refused_or_bad_stream_writes_nothing() {
        let s = stream(Some("a"), 16, &[(2, Some(b"xyz"), 3)]);
        let mut v = Mem(vec![1; 16]);
        let refuse = |_: &StreamInfo| Err(Error::invalid("stream", "no"));
        assert!(apply(&s[..], &mut v, &refuse, &|_| {}).is_err());
        assert_eq!(v.0, vec![1; 16]);
        // A record past the size the stream declares.
        let past = stream(None, 4, &[(2, Some(b"xyz"), 3)]);
        let e = apply(&past[..], &mut v, &|_| Ok(()), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("past the image"), "{e}");
        assert!(check(&past[..]).is_err());
        assert_eq!(v.0, vec![1; 16]);
        // Truncated: check sees it before anything is written.
        assert!(check(&s[..s.len() - 1]).is_err());
    }
}
