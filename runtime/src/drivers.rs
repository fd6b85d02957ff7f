//! The one list of driver kinds: the only place a driver's name, its config type and its
//! factory are tied together (model: crosvm `disk_file_from_file`, one arm per format,
//! formats behind cargo features). Adding a driver = one entry here (plus passing the
//! contract suite in `testkit`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::backends::Opener;
use kiln_core::{Error, Result, VolumeDriver};
use serde::de::DeserializeOwned;

/// Builds a backend's lazy opener from its config table (minus `driver`) and the data dir.
type Build = fn(&str, toml::Table, &Path) -> Result<Opener>;

/// A driver kind kiln knows (whether or not this build includes it).
pub struct DriverKind {
    /// The `driver = "..."` value.
    pub name: &'static str,
    /// Builds an opener from a backend's table; `None` when this build lacks the driver
    /// (the reason is [`DriverKind::missing`]).
    build: Option<Build>,
    /// Why this build cannot open it, when `build` is `None`.
    pub missing: &'static str,
}

/// Every driver kind, in the order listed in messages.
pub const DRIVERS: &[DriverKind] = &[
    DriverKind {
        name: "file",
        build: Some(file),
        missing: "",
    },
    DriverKind {
        name: "lvm",
        build: Some(lvm),
        missing: "",
    },
    DriverKind {
        name: "rbd",
        #[cfg(feature = "rbd")]
        build: Some(rbd),
        #[cfg(not(feature = "rbd"))]
        build: None,
        missing: "this kiln was built without RBD support; rebuild with `cargo build --features rbd` (the RBD backend then needs librbd1 at run time)",
    },
];

/// The driver names, for messages ("file, lvm or rbd").
pub fn names() -> String {
    let names: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// Parses a backend table (minus `driver`) into a driver's config type; errors name the
/// backend and stay on one line.
fn parse<C: DeserializeOwned>(name: &str, table: toml::Table) -> Result<C> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| Error::config(format!("backend {name}: {}", e.message())))
}

/// Turns a driver's async `open` into a lazy [`Opener`].
fn opener<C, D, F, Fut>(name: &str, cfg: C, open: F) -> Opener
where
    C: Clone + Send + Sync + 'static,
    D: VolumeDriver + 'static,
    F: Fn(String, C) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<D>> + Send + 'static,
{
    let name = name.to_string();
    Box::new(move || {
        let fut = open(name.clone(), cfg.clone());
        Box::pin(async move { fut.await.map(|d| Arc::new(d) as Arc<dyn VolumeDriver>) })
    })
}

fn file(name: &str, mut table: toml::Table, data_dir: &Path) -> Result<Opener> {
    // A relative path means "inside the data directory", so one config works for several
    // data directories (tests, per-user runs).
    if let Some(toml::Value::String(p)) = table.get("path") {
        let p = PathBuf::from(p);
        if p.is_relative() {
            table.insert(
                "path".into(),
                toml::Value::String(data_dir.join(p).to_string_lossy().into_owned()),
            );
        }
    }
    let cfg: kiln_driver_file::FileConfig = parse(name, table)?;
    Ok(opener(name, cfg, |n, c| async move {
        kiln_driver_file::open(&n, c).await
    }))
}

fn lvm(name: &str, table: toml::Table, _data_dir: &Path) -> Result<Opener> {
    let cfg: kiln_driver_lvm::LvmConfig = parse(name, table)?;
    Ok(opener(name, cfg, |n, c| async move {
        kiln_driver_lvm::open(&n, c).await
    }))
}

#[cfg(feature = "rbd")]
fn rbd(name: &str, table: toml::Table, _data_dir: &Path) -> Result<Opener> {
    let cfg: kiln_driver_rbd::RbdConfig = parse(name, table)?;
    Ok(opener(name, cfg, |n, c| async move {
        kiln_driver_rbd::open(&n, c).await
    }))
}

/// What a backend table asks for: a lazy opener, or the reason this build cannot open it.
pub(crate) enum Built {
    /// Opened on first use.
    Opener(Opener),
    /// This build lacks the driver.
    Missing(&'static str),
}

/// Parses backend `name`'s table: parse errors are the user's to fix now (fatal, one line);
/// whether it *opens* is only known on first use.
pub(crate) fn build(
    name: &str,
    mut table: toml::Table,
    data_dir: &Path,
) -> Result<(String, Built)> {
    let kind = match table.remove("driver") {
        Some(toml::Value::String(k)) => k,
        Some(_) => {
            return Err(Error::config(format!(
                "backend {name}: `driver` must be a string"
            )));
        }
        None => {
            return Err(Error::config(format!(
                "backend {name}: missing `driver` ({})",
                names()
            )));
        }
    };
    let Some(d) = DRIVERS.iter().find(|d| d.name == kind) else {
        return Err(Error::config(format!(
            "backend {name}: unknown driver {kind:?} ({})",
            names()
        )));
    };
    let built = match d.build {
        Some(build) => Built::Opener(build(name, table, data_dir)?),
        None => Built::Missing(d.missing),
    };
    Ok((kind, built))
}
