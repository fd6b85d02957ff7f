//! Configuration: where the data directory is, which backends exist, and how to build their
//! drivers. With no config file kiln runs on an embedded default: one file backend named
//! `default` in `<data-dir>/volumes` and the SQLite store in `<data-dir>/kiln.db`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::service::Backend;
use kiln_core::store::SqliteStore;
use kiln_core::{Error, Result, Service, VolumeDriver};

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
}

/// Longest backend name: it appears in tables, logs and the store.
const MAX_BACKEND_NAME: usize = 64;

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            // toml's messages span several lines; keep the CLI's one-line promise.
            let msg = e.message().to_string();
            Error::Config(format!("{}: {msg}", path.display()))
        })
    }
}

/// Resolves the data directory: flag/env (already merged by clap), then the config file,
/// then the XDG data directory (`~/.local/share/kiln`).
pub fn data_dir(flag: Option<PathBuf>, config: &Config) -> Result<PathBuf> {
    flag.or_else(|| config.data_dir.clone())
        .or_else(|| dirs::data_dir().map(|d| d.join("kiln")))
        .ok_or_else(|| {
            Error::Config("no data directory: pass --data-dir or set KILN_DATA_DIR".into())
        })
}

fn backend_name_ok(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_BACKEND_NAME
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "backend name {name:?}: use 1-{MAX_BACKEND_NAME} letters, digits, '-' or '_', not starting with '-'"
        )))
    }
}

async fn build_driver(name: &str, mut table: toml::Table, data_dir: &Path) -> Result<Backend> {
    let kind = match table.remove("driver") {
        Some(toml::Value::String(k)) => k,
        Some(_) => {
            return Err(Error::Config(format!(
                "backend {name}: `driver` must be a string"
            )));
        }
        None => {
            return Err(Error::Config(format!(
                "backend {name}: missing `driver` (file, lvm or rbd)"
            )));
        }
    };
    let parse_err = |e: toml::de::Error| Error::Config(format!("backend {name}: {}", e.message()));
    // Parse errors are the user's to fix now (fatal); a backend that parses but cannot be
    // opened (cluster down, VG missing, no reflink) is listed as unavailable and must not
    // take the other backends down with it.
    let driver = match kind.as_str() {
        "file" => {
            // A relative path means "inside the data directory", so one config works for
            // several data directories (tests, per-user runs).
            if let Some(toml::Value::String(p)) = table.get("path") {
                let p = PathBuf::from(p);
                if p.is_relative() {
                    table.insert(
                        "path".into(),
                        toml::Value::String(data_dir.join(p).to_string_lossy().into_owned()),
                    );
                }
            }
            let cfg: kiln_driver_file::FileConfig =
                toml::Value::Table(table).try_into().map_err(parse_err)?;
            opened(name, kiln_driver_file::FileDriver::open(name, cfg).await)
        }
        "lvm" => {
            let cfg: kiln_driver_lvm::LvmConfig =
                toml::Value::Table(table).try_into().map_err(parse_err)?;
            opened(name, kiln_driver_lvm::LvmDriver::open(name, cfg).await)
        }
        #[cfg(feature = "rbd")]
        "rbd" => {
            let cfg: kiln_driver_rbd::RbdConfig =
                toml::Value::Table(table).try_into().map_err(parse_err)?;
            opened(name, kiln_driver_rbd::RbdDriver::open(name, cfg).await)
        }
        #[cfg(not(feature = "rbd"))]
        "rbd" => Err(
            "this kiln was built without RBD support; rebuild with `cargo build --features rbd` (needs librbd-dev, librados-dev)"
                .to_string(),
        ),
        other => {
            return Err(Error::Config(format!(
                "backend {name}: unknown driver {other:?} (file, lvm or rbd)"
            )));
        }
    };
    Ok(Backend { kind, driver })
}

fn opened<D: VolumeDriver + 'static>(
    name: &str,
    r: Result<D>,
) -> std::result::Result<Arc<dyn VolumeDriver>, String> {
    r.map(|d| Arc::new(d) as Arc<dyn VolumeDriver>)
        .map_err(|e| {
            // `backend list` shows the reason; operations on it fail with it.
            tracing::info!(backend = %name, error = %e, "backend unavailable");
            e.to_string()
        })
}

/// The embedded default: one file backend named `default` in `<data-dir>/volumes`.
fn embedded_backends() -> BTreeMap<String, toml::Table> {
    let mut t = toml::Table::new();
    t.insert("driver".into(), "file".into());
    t.insert("path".into(), "volumes".into());
    BTreeMap::from([("default".to_string(), t)])
}

/// Opens the store, builds every configured driver, runs crash recovery, and returns the
/// service. Recovery's actions are logged (warn level).
pub async fn open_service(config: Config, data_dir: &Path) -> Result<Service> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::io(format!("create data directory {}", data_dir.display()), e))?;
    let tables = if config.backends.is_empty() {
        embedded_backends()
    } else {
        config.backends
    };
    let default_backend = match config.default_backend {
        Some(d) => d,
        None if tables.len() == 1 => tables.keys().next().cloned().unwrap_or_default(),
        None if tables.contains_key("default") => "default".to_string(),
        None => {
            return Err(Error::Config(
                "several backends and no `default_backend`: name one in the config".into(),
            ));
        }
    };
    for name in tables.keys() {
        backend_name_ok(name)?;
    }
    // Open every backend at once: each open may wait on a cluster or run lvm commands, and
    // a slow or unreachable backend should not add its delay to every other one's.
    let opening = tables.into_iter().map(|(name, table)| async move {
        let backend = build_driver(&name, table, data_dir).await?;
        Ok::<_, Error>((name, backend))
    });
    let backends = futures::future::join_all(opening)
        .await
        .into_iter()
        .collect::<Result<BTreeMap<_, _>>>()?;
    let store = Arc::new(SqliteStore::open(&data_dir.join("kiln.db"))?);
    let service = Service::new(store, backends, default_backend, data_dir.join("locks"))?;
    service.recover().await?;
    Ok(service)
}
