//! What changed between two snapshots of one volume, from the thin pool's own metadata.
//!
//! Two thin snapshots of a volume share every data block nobody rewrote in between: the
//! pool's mapping trees say which blocks of one map to the same data block as in the other
//! (unchanged), and which do not (rewritten, discarded, or written for the first time).
//! `thin_delta` compares the two trees on a reserved metadata snapshot of the pool, without
//! reading any data. Thick (COW) snapshots keep no such record: they answer
//! [`SnapshotDelta::Untracked`].

use kiln_core::{Error, Extent, Result, Snapshot, SnapshotDelta};

use crate::backend::LvmBackend;
use crate::command::Retry;
use crate::names;
use crate::thin_map;

/// `thin_delta` releases known to report ranges wrongly, as `[first, past-the-last)`
/// versions: before 0.7.0 (C++) mappings went missing from its output (fixed in 2014-2016),
/// and the Rust rewrite before 1.0.6 joined mappings whose data blocks are not contiguous
/// into one run, so it could report a rewritten block as the same (fixed by "[thin_delta]
/// Fix range mappings construction").
const BROKEN_THIN_DELTA: [(Version, Version); 2] = [((0, 0, 0), (0, 7, 0)), ((1, 0, 0), (1, 0, 6))];

/// `(major, minor, patch)`.
type Version = (u64, u64, u64);

/// The `major.minor.patch` in `thin_delta --version`'s output ("0.9.0", "thin_delta 1.0.4",
/// "1.1.0"), suffixes such as "-rc1" ignored.
fn parse_version(out: &str) -> Option<Version> {
    out.split_whitespace().find_map(|word| {
        let mut parts = word.trim_start_matches('v').splitn(3, '.');
        let mut num = || -> Option<u64> {
            let p = parts.next()?;
            let digits = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
            p[..digits].parse().ok()
        };
        Some((num()?, num()?, num()?))
    })
}

/// Whether `thin_delta` at version `out` (its `--version` output) can be trusted; `Err`
/// says why not.
fn check_version(out: &str) -> std::result::Result<(), String> {
    let v = parse_version(out)
        .ok_or_else(|| format!("thin_delta --version printed {:?}: no version", out.trim()))?;
    if BROKEN_THIN_DELTA
        .iter()
        .any(|(first, past)| *first <= v && v < *past)
    {
        return Err(format!(
            "thin_delta {}.{}.{} misreports changed ranges (use thin-provisioning-tools 0.7 to \
             0.9, or 1.0.6 or later)",
            v.0, v.1, v.2
        ));
    }
    Ok(())
}

impl LvmBackend {
    /// Which ranges of snapshot `to` may differ from the older snapshot `from` of the same
    /// volume. Both thin: the ranges `thin_delta` finds between their mappings (in pool
    /// blocks); both thick: [`SnapshotDelta::Untracked`]. `InvalidInput` for snapshots of
    /// different volumes, of different kinds or thin pools; `NotFound` when either does not
    /// exist. When the installed `thin_delta` is missing or a release known to misreport
    /// (see [`BROKEN_THIN_DELTA`]), the answer is `Untracked` (logged once at warn): correct,
    /// only slower for the caller. Never activates a snapshot; an inactive pool is activated
    /// for the call only.
    pub(crate) fn diff_snapshots(&self, from: &Snapshot, to: &Snapshot) -> Result<SnapshotDelta> {
        kiln_core::driver::same_volume(from, to)?;
        let (from_lv, to_lv) = (names::snapshot(&from.id), names::snapshot(&to.id));
        let rows = self.lvs_named(&[&from_lv, &to_lv])?;
        let row = |s: &Snapshot, lv: &str| {
            rows.iter()
                .find(|r| r.lv_name == lv)
                .ok_or_else(|| Error::not_found("snapshot", s.id))
        };
        let (a, b) = (row(from, &from_lv)?, row(to, &to_lv)?);
        if a.is_thick_snapshot() && b.is_thick_snapshot() {
            return Ok(SnapshotDelta::Untracked);
        }
        if !(a.is_thin_volume() && b.is_thin_volume()) || a.pool_lv != b.pool_lv {
            return Err(Error::invalid(
                "snapshots",
                format!(
                    "{} and {} are not two thin snapshots in one thin pool (attributes {} and \
                     {}, pools {:?} and {:?}): their changes cannot be listed",
                    self.spec(&from_lv),
                    self.spec(&to_lv),
                    a.lv_attr,
                    b.lv_attr,
                    a.pool_lv,
                    b.pool_lv
                ),
            ));
        }
        self.check_image_covers(a, from.size_bytes)?;
        self.check_image_covers(b, to.size_bytes)?;
        let id = |r: &crate::report::LvRow| {
            r.thin_id().ok_or_else(|| {
                Error::backend(
                    "lvs",
                    format!(
                        "{} reports no thin device id ({:?})",
                        self.spec(&r.lv_name),
                        r.thin_id
                    ),
                )
            })
        };
        let (left, right) = (id(a)?, id(b)?);
        if let Err(why) = self.thin_delta_usable() {
            tracing::debug!(reason = %why, "no thin_delta; changes untracked");
            return Ok(SnapshotDelta::Untracked);
        }
        let (l, r) = (left.to_string(), right.to_string());
        let out = self
            .with_metadata_snap(&a.pool_lv, |tmeta| {
                self.runner.run(
                    "thin_delta",
                    "thin_delta",
                    &["--snap1", &l, "--snap2", &r, "--metadata-snap", tmeta],
                    Retry::Never,
                )
            })
            .and_then(|out| out)?;
        let mut changed = thin_map::changed_from_delta(&out.stdout, left, right, to.size_bytes)
            .map_err(|why| {
                Error::backend(
                    "thin_delta",
                    format!("output not understood ({why}) for devices {left} and {right}"),
                )
            })?;
        // Past the end of a smaller `from` nothing is the same.
        if to.size_bytes > from.size_bytes {
            let start = changed
                .iter()
                .position(|e| e.offset + e.length >= from.size_bytes)
                .unwrap_or(changed.len());
            let offset = changed
                .get(start)
                .map_or(from.size_bytes, |e| e.offset.min(from.size_bytes));
            changed.truncate(start);
            changed.push(Extent {
                offset,
                length: to.size_bytes - offset,
            });
        }
        tracing::debug!(
            from = %from_lv,
            to = %to_lv,
            ranges = changed.len(),
            bytes = changed.iter().map(|e| e.length).sum::<u64>(),
            "thin_delta"
        );
        Ok(SnapshotDelta::Changed(changed))
    }

    /// `Ok` when the installed `thin_delta` can be trusted, found out once per backend (one
    /// `thin_delta --version`); `Err` (logged once at warn) says why not.
    fn thin_delta_usable(&self) -> std::result::Result<(), String> {
        self.thin_delta
            .get_or_init(|| {
                let checked = self
                    .runner
                    .run(
                        "thin_delta --version",
                        "thin_delta",
                        &["--version"],
                        Retry::Never,
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|out| check_version(&out.stdout));
                if let Err(why) = &checked {
                    tracing::warn!(
                        vg = %self.vg,
                        reason = %why,
                        "changes between thin snapshots are not tracked: callers compare data \
                         instead (install thin-provisioning-tools)"
                    );
                }
                checked
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_delta_versions() {
        assert_eq!(parse_version("0.9.0\n"), Some((0, 9, 0)));
        assert_eq!(parse_version("thin_delta 1.0.4\n"), Some((1, 0, 4)));
        assert_eq!(parse_version("v1.1.0-rc1"), Some((1, 1, 0)));
        assert_eq!(parse_version("thin_delta\n"), None);
        for ok in [
            "0.7.0",
            "0.9.0",
            "1.0.6",
            "thin_delta 1.0.12",
            "1.1.0",
            "2.0.0",
        ] {
            assert_eq!(check_version(ok), Ok(()), "{ok}");
        }
        for bad in ["0.6.3", "1.0.0", "thin_delta 1.0.5", "", "unknown"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}
