//! Backups: a volume's snapshot stored outside its backend as an `rbd diff v1` stream
//! ([`crate::diff_stream`]) — whole, or only the changes since the snapshot of an earlier
//! backup — on a target, and restored onto a volume of any backend. The operations are in
//! [`crate::ops::backup`]; this module holds the targets.

mod chunk_reader;
pub mod dir;
pub mod retention;

use std::path::PathBuf;

use crate::driver::{SnapshotReader, VolumeWriter};
use crate::error::{Error, Result};
use crate::types::{BackupId, VolumeId};

/// Backups kept as images in a pool of a backend's cluster (`rbd:POOL`), as Cinder's Ceph
/// backup driver keeps them: one image per volume, one snapshot per backup. An incremental
/// is the stream of changes applied onto the image, then snapshotted; every backup's
/// snapshot holds its whole data. Calls block.
pub trait PoolBackups: Send + Sync {
    /// The pool, as the target names it.
    fn pool(&self) -> &str;
    /// A writer onto the volume's backup image, ready for backup data: for a full backup
    /// (`parent` none) a new or zeroed image of `size` bytes; for an incremental the image as
    /// `parent`'s snapshot left it.
    fn begin(
        &self,
        volume: VolumeId,
        size: u64,
        parent: Option<BackupId>,
    ) -> Result<Box<dyn VolumeWriter>>;
    /// Seals backup `id` (after its writer finished): the image's snapshot for it.
    fn seal(&self, volume: VolumeId, id: BackupId) -> Result<()>;
    /// Whether backup `id` is sealed on the pool.
    fn has(&self, volume: VolumeId, id: BackupId) -> Result<bool>;
    /// Backup `id`'s whole data.
    fn reader(&self, volume: VolumeId, id: BackupId) -> Result<Box<dyn SnapshotReader>>;
    /// Removes backup `id` (and the image with its last backup); removing one that is gone
    /// succeeds.
    fn delete(&self, volume: VolumeId, id: BackupId) -> Result<()>;
    /// Undoes an unsealed write: the image back to its newest snapshot (or removed when it
    /// has none).
    fn abandon(&self, volume: VolumeId) -> Result<()>;
}

/// Where backups are stored, as given on the command line (`dir:PATH`, `rbd:POOL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory (absolute once parsed).
    Dir(PathBuf),
    /// A Ceph pool.
    Rbd(String),
}

impl Target {
    /// Parses `dir:PATH` (made absolute; it must exist when a backup is written) or
    /// `rbd:POOL`. Anything else is refused with the accepted forms.
    pub fn parse(s: &str) -> Result<Target> {
        let bad = |why: &str| Error::invalid("target", format!("{s:?}: {why}"));
        match s.split_once(':') {
            Some(("dir", path)) => {
                if path.is_empty() {
                    return Err(bad("the directory is empty"));
                }
                if path.chars().any(char::is_control) {
                    return Err(bad("control characters are not allowed"));
                }
                let p = std::path::absolute(path).map_err(|e| bad(&e.to_string()))?;
                // The stored form must name the same directory from any working directory
                // and whatever a symlink points at later.
                Ok(Target::Dir(std::fs::canonicalize(&p).unwrap_or(p)))
            }
            Some(("rbd", pool)) => {
                let ok = !pool.is_empty()
                    && !pool.starts_with(['-', '.'])
                    && pool
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                if !ok {
                    return Err(bad("a pool name is letters, digits and _.- only"));
                }
                Ok(Target::Rbd(pool.to_string()))
            }
            _ => Err(bad("use dir:PATH or rbd:POOL")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dir(p) => write!(f, "dir:{}", p.display()),
            Target::Rbd(pool) => write!(f, "rbd:{pool}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_are_refused() {
        assert_eq!(
            Target::parse("dir:/nonexistent/b").unwrap().to_string(),
            "dir:/nonexistent/b"
        );
        assert!(matches!(Target::parse("dir:rel").unwrap(), Target::Dir(p) if p.is_absolute()));
        assert_eq!(
            Target::parse("rbd:backups").unwrap(),
            Target::Rbd("backups".into())
        );
        for bad in [
            "s3:bucket",
            "dir:",
            "/srv/b",
            "rbd:",
            "rbd:-x",
            "rbd:a/b",
            "dir:a\nb",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
