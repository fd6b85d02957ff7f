//! The `[backends.NAME]` settings of a file backend.

use std::path::PathBuf;

use serde::Deserialize;

/// Settings of one file backend (`driver = "file"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory holding every volume and snapshot of this backend; created if missing.
    pub path: PathBuf,
    /// On-disk format; `auto` (the default) picks raw files with reflink snapshots where the
    /// directory's filesystem supports reflink, else qcow2 chains, else (no `qemu-img` in
    /// `PATH` either) raw full copies.
    #[serde(default)]
    pub format: Format,
    /// With `format = "raw"` on a filesystem without reflink: allow snapshots and clones as
    /// full sparse copies (slow, O(allocated data), no online snapshots) instead of refusing
    /// to start. Default `false`.
    #[serde(default)]
    pub allow_full_copy: bool,
}

impl FileConfig {
    /// A config for `path` with every other setting at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileConfig {
            path: path.into(),
            format: Format::default(),
            allow_full_copy: false,
        }
    }
}

/// Requested on-disk format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Raw with reflink where the filesystem supports it, else qcow2; without `qemu-img`
    /// either, raw full copies (with a warning).
    #[default]
    Auto,
    /// Sparse raw files; snapshots and clones by reflink (or full copies, if allowed).
    Raw,
    /// qcow2 images with external snapshot chains built by `qemu-img`.
    Qcow2,
}

/// The mode a backend actually runs in, decided once by [`crate::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Raw files, snapshots and clones by FICLONE.
    RawReflink,
    /// Raw files, snapshots and clones by full sparse copy (`allow_full_copy = true`).
    RawFullCopy,
    /// qcow2 external snapshot chains.
    Qcow2,
}

impl Mode {
    /// Short name used in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::RawReflink => "raw-reflink",
            Mode::RawFullCopy => "raw-full-copy",
            Mode::Qcow2 => "qcow2",
        }
    }

    /// The format recorded in the backend directory's marker file.
    pub(crate) fn format_name(self) -> &'static str {
        match self {
            Mode::RawReflink | Mode::RawFullCopy => "raw",
            Mode::Qcow2 => "qcow2",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: FileConfig = serde_json::from_str(r#"{"path":"/srv/kiln"}"#).unwrap();
        assert_eq!(c, FileConfig::new("/srv/kiln"));
        let c: FileConfig =
            serde_json::from_str(r#"{"path":"/x","format":"qcow2","allow_full_copy":true}"#)
                .unwrap();
        assert_eq!(c.format, Format::Qcow2);
        assert!(c.allow_full_copy);
        assert!(serde_json::from_str::<FileConfig>(r#"{"path":"/x","pool":"y"}"#).is_err());
        assert!(serde_json::from_str::<FileConfig>(r#"{"path":"/x","format":"vmdk"}"#).is_err());
    }
}
