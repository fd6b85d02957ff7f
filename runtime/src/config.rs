//! The configuration file (`etc/kiln.toml`): where the data directory is and which
//! backends exist. With no config file kiln runs on an embedded default: one file backend
//! named `default` in `<data-dir>/volumes` and the SQLite store in `<data-dir>/kiln.db`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_core::{Error, Result};

use serde::Deserialize;

/// The parsed configuration file (see `etc/kiln.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data directory (store, lock files, default volume directory); overridden by
    /// `--data-dir` and `KILN_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// Backend for new volumes when `--backend` is not given; defaults to the only backend,
    /// or to one named `default`.
    pub default_backend: Option<String>,
    /// Backends by name; each table has `driver = "file" | "lvm" | "rbd"` plus that driver's keys.
    #[serde(default)]
    pub backends: BTreeMap<String, toml::Table>,
    /// The `[api]` section of `kiln serve` (parsed by the API crate).
    pub api: Option<toml::Table>,
}

/// Longest backend name: it appears in tables, logs and the store.
const MAX_BACKEND_NAME: usize = 64;

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            // toml's messages span several lines; keep the CLI's one-line promise.
            let msg = e.message().to_string();
            Error::config(format!("{}: {msg}", path.display()))
        })
    }
}

/// Resolves the data directory: flag/env (already merged by clap), then the config file,
/// then the XDG data directory (`~/.local/share/kiln`).
pub fn data_dir(flag: Option<PathBuf>, config: &Config) -> Result<PathBuf> {
    flag.or_else(|| config.data_dir.clone())
        .or_else(|| dirs::data_dir().map(|d| d.join("kiln")))
        .ok_or_else(|| Error::config("no data directory: pass --data-dir or set KILN_DATA_DIR"))
}

pub(crate) fn backend_name_ok(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_BACKEND_NAME
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "backend name {name:?}: use 1-{MAX_BACKEND_NAME} letters, digits, '-' or '_', not starting with '-'"
        )))
    }
}

/// The embedded default: one file backend named `default` in `<data-dir>/volumes`.
pub(crate) fn embedded_backends() -> BTreeMap<String, toml::Table> {
    let mut t = toml::Table::new();
    t.insert("driver".into(), "file".into());
    t.insert("path".into(), "volumes".into());
    BTreeMap::from([("default".to_string(), t)])
}

impl Config {
    /// The configured backends (or the embedded default) and the default backend's name,
    /// validated: names are safe, and the default is one of them.
    pub fn backend_tables(&self) -> Result<(BTreeMap<String, toml::Table>, String)> {
        let tables = if self.backends.is_empty() {
            embedded_backends()
        } else {
            self.backends.clone()
        };
        let default_backend = match &self.default_backend {
            Some(d) => d.clone(),
            None if tables.len() == 1 => tables.keys().next().cloned().unwrap_or_default(),
            None if tables.contains_key("default") => "default".to_string(),
            None => {
                return Err(Error::config(
                    "several backends and no `default_backend`: name one in the config",
                ));
            }
        };
        for name in tables.keys() {
            backend_name_ok(name)?;
        }
        if !tables.contains_key(&default_backend) {
            return Err(Error::config(format!(
                "default backend {default_backend:?} is not configured"
            )));
        }
        Ok((tables, default_backend))
    }
}
