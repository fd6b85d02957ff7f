//! A snapshot as an `rbd diff v1` stream ([`crate::diff_stream`]): the whole snapshot, or
//! only what changed since an older snapshot of the same volume. The backend says which
//! ranges changed when it tracks them ([`crate::driver::SnapshotDelta::Changed`]); only
//! those are read. A backend that does not track is read twice and compared.

use std::io::Write;

use crate::diff_stream::{DiffWriter, MAX_WRITE};
use crate::driver::SnapshotReader;
use crate::error::{Error, Result};
use crate::types::Extent;

/// Unit of zero detection and comparison inside a read: a changed 4 KiB block costs one
/// grain of stream, not a whole 4 MiB read.
const GRAIN: usize = 64 << 10;

/// What a stream is made of. Built by `Service::open_delta`, which holds the volume's lock
/// for as long as this lives.
pub struct DeltaSource {
    /// The snapshot the stream leads to (its `t` record).
    pub to_name: String,
    /// Its image.
    pub to: Box<dyn SnapshotReader>,
    /// The older snapshot the stream starts from; `None` for a full stream.
    pub base: Option<Base>,
    /// Keeps whatever must outlive the reads (the volume's lock).
    pub guard: Option<Box<dyn Send>>,
}

/// The starting point of an incremental stream.
pub struct Base {
    /// The older snapshot (the stream's `f` record).
    pub name: String,
    /// How the changes are found.
    pub changes: Changes,
}

/// How an incremental stream finds what changed.
pub enum Changes {
    /// The backend's list of ranges that may differ: only those are read.
    Tracked(Vec<Extent>),
    /// No tracking: the older snapshot's image, read and compared grain by grain.
    Compare(Box<dyn SnapshotReader>),
}

/// What writing a stream did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// The snapshot's size (the stream's `s` record).
    pub size_bytes: u64,
    /// Bytes carried by `w` records.
    pub data_bytes: u64,
    /// Bytes declared zero by `z` records.
    pub zero_bytes: u64,
    /// Bytes read from the backend to make the stream (both images when comparing).
    pub read_bytes: u64,
}

/// `(start, end)` ranges of `extents`, clipped to `size`, sorted and merged.
fn clipped(extents: &[Extent], size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<Extent> = extents
        .iter()
        .filter(|e| e.offset < size)
        .map(|e| Extent {
            offset: e.offset,
            length: e.length.min(size - e.offset),
        })
        .collect();
    crate::types::merge_extents(&mut v)
        .into_iter()
        .map(|e| (e.offset, e.offset + e.length))
        .collect()
}

/// Splits `[start, end)` by the sorted ranges `inside`: `(start, end, is_inside)` pieces.
fn split(start: u64, end: u64, inside: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = start;
    for &(a, b) in inside {
        if b <= pos {
            continue;
        }
        if a >= end {
            break;
        }
        if a > pos {
            out.push((pos, a, false));
        }
        let stop = b.min(end);
        out.push((pos.max(a), stop, true));
        pos = stop;
    }
    if pos < end {
        out.push((pos, end, false));
    }
    out
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub fn read_full(reader: &mut dyn SnapshotReader, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let n = reader
            .read_at(at, &mut buf[done..])
            .map_err(|e| Error::io(format!("read snapshot at offset {at}"), e))?;
        if n == 0 {
            return Err(Error::backend(
                "read snapshot",
                format!("image ended early at offset {at}"),
            ));
        }
        done += n;
    }
    Ok(())
}

/// What one grain becomes in the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grain {
    Skip,
    Zero,
    Data,
}

/// Accumulates grains into as few records as possible.
struct Emitter<W: Write> {
    w: DiffWriter<W>,
    stats: StreamStats,
}

impl<W: Write> Emitter<W> {
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.stats.zero_bytes += len;
        self.w.zero(offset, len).map_err(write_err)
    }

    /// Emits `buf` (which sits at `offset`) classified grain by grain by `class`, each run of
    /// grains of one kind as one record.
    fn grains(
        &mut self,
        offset: u64,
        buf: &[u8],
        class: impl Fn(usize, &[u8]) -> Grain,
    ) -> Result<()> {
        let mut run: Option<(Grain, usize)> = None;
        let mut i = 0;
        while i < buf.len() {
            let n = GRAIN.min(buf.len() - i);
            let g = class(i, &buf[i..i + n]);
            match run {
                Some((kind, _)) if kind == g => {}
                Some((kind, start)) => {
                    self.run(offset, buf, kind, start, i)?;
                    run = Some((g, i));
                }
                None => run = Some((g, i)),
            }
            i += n;
        }
        match run {
            Some((kind, start)) => self.run(offset, buf, kind, start, buf.len()),
            None => Ok(()),
        }
    }

    /// One record for `buf[start..end]` of one kind.
    fn run(
        &mut self,
        offset: u64,
        buf: &[u8],
        kind: Grain,
        start: usize,
        end: usize,
    ) -> Result<()> {
        let at = offset + start as u64;
        match kind {
            Grain::Data => {
                self.stats.data_bytes += (end - start) as u64;
                self.w.data(at, &buf[start..end]).map_err(write_err)
            }
            Grain::Zero => self.zero(at, (end - start) as u64),
            Grain::Skip => Ok(()),
        }
    }
}

fn write_err(e: std::io::Error) -> Error {
    Error::io("write the diff stream", e)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

impl DeltaSource {
    /// The ranges of `to` the stream reads, in order.
    fn reads(&self) -> Vec<(u64, u64)> {
        let size = self.to.size();
        match &self.base {
            None => clipped(self.to.extents(), size),
            Some(Base {
                changes: Changes::Tracked(changed),
                ..
            }) => {
                let data = clipped(self.to.extents(), size);
                clipped(changed, size)
                    .into_iter()
                    .flat_map(|(a, b)| split(a, b, &data))
                    .filter(|p| p.2)
                    .map(|(a, b, _)| (a, b))
                    .collect()
            }
            Some(Base {
                changes: Changes::Compare(old),
                ..
            }) => {
                let mut all = self.to.extents().to_vec();
                all.extend_from_slice(old.extents());
                clipped(&all, size)
            }
        }
    }

    /// Bytes the stream will read from `to` (the progress total).
    pub fn scan_bytes(&self) -> u64 {
        self.reads().iter().map(|(a, b)| b - a).sum()
    }

    /// Writes the stream to `out`, calling `progress` with each scanned byte count. A full
    /// stream carries the non-zero grains of the snapshot's data; an incremental one the
    /// grains that changed, as data, or as zeros when they are zero now.
    pub fn write_to<W: Write>(
        &mut self,
        out: W,
        progress: &dyn Fn(u64),
    ) -> Result<(StreamStats, W)> {
        let size = self.to.size();
        let from = self.base.as_ref().map(|b| b.name.clone());
        let w =
            DiffWriter::new(out, from.as_deref(), Some(&self.to_name), size).map_err(write_err)?;
        let mut em = Emitter {
            w,
            stats: StreamStats {
                size_bytes: size,
                ..Default::default()
            },
        };
        let data = clipped(self.to.extents(), size);
        let mut buf = vec![0u8; MAX_WRITE];
        let reads = self.reads();
        self.to.will_read(&reads);
        match &mut self.base {
            None => {
                for &(a, b) in &data {
                    scan(&mut *self.to, a, b, &mut buf, &mut em, progress, |_, g| {
                        if is_zero(g) { Grain::Skip } else { Grain::Data }
                    })?;
                }
            }
            Some(Base {
                changes: Changes::Tracked(changed),
                ..
            }) => {
                for (a, b) in clipped(changed, size) {
                    for (x, y, has_data) in split(a, b, &data) {
                        if has_data {
                            scan(&mut *self.to, x, y, &mut buf, &mut em, progress, |_, g| {
                                if is_zero(g) { Grain::Zero } else { Grain::Data }
                            })?;
                        } else {
                            em.zero(x, y - x)?;
                        }
                    }
                }
            }
            Some(Base {
                changes: Changes::Compare(old),
                ..
            }) => {
                let mut all = self.to.extents().to_vec();
                all.extend_from_slice(old.extents());
                let old_size = old.size();
                let mut obuf = vec![0u8; MAX_WRITE];
                old.will_read(&clipped(&all, size.min(old_size)));
                for (a, b) in reads {
                    let mut at = a;
                    while at < b {
                        let n = (b - at).min(MAX_WRITE as u64) as usize;
                        // The older image may be shorter: past its end it reads as zeros.
                        let old_n = old_size.saturating_sub(at).min(n as u64) as usize;
                        obuf[..n].fill(0);
                        if old_n > 0 {
                            read_full(&mut **old, at, &mut obuf[..old_n])?;
                            em.stats.read_bytes += old_n as u64;
                        }
                        read_full(&mut *self.to, at, &mut buf[..n])?;
                        em.stats.read_bytes += n as u64;
                        let old = &obuf[..n];
                        em.grains(at, &buf[..n], |i, g| {
                            if g == &old[i..i + g.len()] {
                                Grain::Skip
                            } else if is_zero(g) {
                                Grain::Zero
                            } else {
                                Grain::Data
                            }
                        })?;
                        at += n as u64;
                        progress(n as u64);
                    }
                }
            }
        }
        let stats = em.stats;
        let out = em.w.finish().map_err(write_err)?;
        Ok((stats, out))
    }
}

/// Reads `[a, b)` of `reader` in `buf`-sized pieces and emits each by `class`.
fn scan<W: Write>(
    reader: &mut dyn SnapshotReader,
    a: u64,
    b: u64,
    buf: &mut [u8],
    em: &mut Emitter<W>,
    progress: &dyn Fn(u64),
    class: impl Fn(usize, &[u8]) -> Grain + Copy,
) -> Result<()> {
    let mut at = a;
    while at < b {
        let n = (b - at).min(buf.len() as u64) as usize;
        read_full(reader, at, &mut buf[..n])?;
        em.stats.read_bytes += n as u64;
        em.grains(at, &buf[..n], class)?;
        at += n as u64;
        progress(n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff_stream::{Record, read_records};

    /// An in-memory image with the given data extents.
    struct Mem(Vec<u8>, Vec<Extent>);

    impl SnapshotReader for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn extents(&self) -> &[Extent] {
            &self.1
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
    }

    fn whole(len: usize) -> Vec<Extent> {
        vec![Extent {
            offset: 0,
            length: len as u64,
        }]
    }

    /// Applies a stream's records onto `base` (as `rbd import-diff` would).
    fn apply(base: &mut Vec<u8>, stream: &[u8]) {
        for r in read_records(stream).unwrap() {
            match r {
                Record::Size(s) => base.resize(s as usize, 0),
                Record::Data { offset, data } => {
                    base[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
                }
                Record::Zero { offset, len } => {
                    base[offset as usize..(offset + len) as usize].fill(0)
                }
                _ => {}
            }
        }
    }

    fn images() -> (Vec<u8>, Vec<u8>) {
        let len = 3 * MAX_WRITE + 12345;
        let old: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        let mut new = old.clone();
        new[10..20].fill(7); // a small rewrite
        new[MAX_WRITE + 5..MAX_WRITE + 5 + 3 * GRAIN].fill(0); // zeroed
        new[len - 3..].fill(9); // at the very end
        (old, new)
    }

    fn stream(src: &mut DeltaSource) -> (StreamStats, Vec<u8>) {
        src.write_to(Vec::new(), &|_| {}).unwrap()
    }

    #[test]
    fn a_compared_stream_carries_only_changed_grains_and_rebuilds_the_new_image() {
        let (old, new) = images();
        let mut src = DeltaSource {
            to_name: "b".into(),
            to: Box::new(Mem(new.clone(), whole(new.len()))),
            base: Some(Base {
                name: "a".into(),
                changes: Changes::Compare(Box::new(Mem(old.clone(), whole(old.len())))),
            }),
            guard: None,
        };
        let (stats, bytes) = stream(&mut src);
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &bytes);
        assert!(rebuilt == new);
        // Data: the first grain, the two grains the zeroed run only partly covers, the
        // short last grain. Zeros: the two grains it covers whole. Both images read whole.
        let tail = (new.len() % MAX_WRITE) as u64;
        assert_eq!(stats.data_bytes, 3 * GRAIN as u64 + tail);
        assert_eq!(stats.zero_bytes, 2 * GRAIN as u64);
        assert_eq!(stats.read_bytes, 2 * new.len() as u64);
    }

    #[test]
    fn a_tracked_stream_reads_only_the_changed_ranges() {
        let (old, new) = images();
        let changed = vec![
            Extent {
                offset: 0,
                length: 4096,
            },
            Extent {
                offset: MAX_WRITE as u64,
                length: 4 * GRAIN as u64,
            },
            Extent {
                offset: new.len() as u64 - 100,
                length: 1 << 30, // past the end: clipped
            },
        ];
        let mut src = DeltaSource {
            to_name: "b".into(),
            to: Box::new(Mem(new.clone(), whole(new.len()))),
            base: Some(Base {
                name: "a".into(),
                changes: Changes::Tracked(changed),
            }),
            guard: None,
        };
        assert_eq!(src.scan_bytes(), 4096 + 4 * GRAIN as u64 + 100);
        let (stats, bytes) = stream(&mut src);
        assert_eq!(stats.read_bytes, 4096 + 4 * GRAIN as u64 + 100);
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &bytes);
        assert!(rebuilt == new);
    }

    #[test]
    fn tracked_changes_outside_the_data_extents_become_zero_records_without_reads() {
        let new = vec![0u8; 2 * GRAIN];
        let mut src = DeltaSource {
            to_name: "b".into(),
            to: Box::new(Mem(new, vec![])),
            base: Some(Base {
                name: "a".into(),
                changes: Changes::Tracked(whole(GRAIN)),
            }),
            guard: None,
        };
        let (stats, bytes) = stream(&mut src);
        assert_eq!((stats.read_bytes, stats.zero_bytes), (0, GRAIN as u64));
        let recs = read_records(&bytes[..]).unwrap();
        assert!(recs.contains(&Record::Zero {
            offset: 0,
            len: GRAIN as u64
        }));
        assert!(recs.contains(&Record::From("a".into())));
    }

    #[test]
    fn a_full_stream_skips_zero_grains() {
        let mut img = vec![0u8; 4 * GRAIN];
        img[GRAIN + 1] = 1;
        let mut src = DeltaSource {
            to_name: "s".into(),
            to: Box::new(Mem(img.clone(), whole(img.len()))),
            base: None,
            guard: None,
        };
        let (stats, bytes) = stream(&mut src);
        assert_eq!((stats.data_bytes, stats.zero_bytes), (GRAIN as u64, 0));
        let mut rebuilt = Vec::new();
        apply(&mut rebuilt, &bytes);
        assert!(rebuilt == img);
    }

    #[test]
    fn split_cuts_a_range_by_the_inside_ranges() {
        assert_eq!(
            split(0, 100, &[(10, 20), (50, 200)]),
            vec![
                (0, 10, false),
                (10, 20, true),
                (20, 50, false),
                (50, 100, true)
            ]
        );
        assert_eq!(split(30, 40, &[(10, 20)]), vec![(30, 40, false)]);
    }
}
