//! Helpers on what the tests compare: kiln's JSON output, expected images, bytes on disk.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The string field `key` of `v`; panics, showing `v`, when it is missing or not a string.
pub fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
        .to_string()
}

/// The row of backend `name` in a `kiln backend list` JSON array.
pub fn backend_row(rows: &Value, name: &str) -> Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {rows}"))
        .clone()
}

/// Every timing a `kiln bench snapshot` report carries (kiln's create and delete, and the
/// backend primitive's) is a positive median, p90 and max.
pub fn assert_bench_timings(r: &Value) {
    for key in [
        "create_ms",
        "delete_ms",
        "primitive_ms",
        "primitive_delete_ms",
    ] {
        for p in ["median", "p90", "max"] {
            assert!(r[key][p].as_f64().unwrap() > 0.0, "{key}.{p} in {r}");
        }
    }
}

/// The expected image: `size` zeros with `chunks` written at their offsets, in order.
pub fn image(size: u64, chunks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for (off, data) in chunks {
        img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    img
}

/// Lowercase hex sha256 of `data`, as kiln prints it.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes `data` at `offset` of the file or device `path` and syncs it (a guest's write).
pub fn write_at(path: impl AsRef<Path>, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path.as_ref())
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Asserts `got == want`, naming the first differing byte and the `unit` (name, bytes) it
/// falls in instead of dumping megabytes.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str, unit: (&str, u64)) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    // memcmp first: a byte-wise search over 128 MiB is slow in a debug build.
    if got == want {
        return;
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    panic!(
        "{what}: first difference at byte {i} ({} {}): got {:#04x}, want {:#04x}",
        unit.0,
        i as u64 / unit.1,
        got[i],
        want[i]
    );
}

/// Applies an `rbd diff v1` stream onto `img` as `rbd import-diff` does (resize to the size
/// record, then data and zero records); returns the stream's (from, to) snapshot names.
pub fn apply_stream(img: &mut Vec<u8>, stream: &[u8]) -> (Option<String>, Option<String>) {
    use kiln_core::diff_stream::{Record, read_records};
    let (mut from, mut to) = (None, None);
    for r in read_records(stream).unwrap() {
        match r {
            Record::From(n) => from = Some(n),
            Record::To(n) => to = Some(n),
            Record::Size(s) => img.resize(s as usize, 0),
            Record::Data { offset, data } => {
                img[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
            }
            Record::Zero { offset, len } => img[offset as usize..(offset + len) as usize].fill(0),
        }
    }
    (from, to)
}
