//! kiln-runtime: configuration -> store -> locks -> drivers -> [`Service`], the wiring the
//! CLI uses now and an API server will use later.
//!
//! Opening is cheap on purpose: the configuration is parsed and checked, the store opened
//! and recovery run, but no backend is opened until an operation needs it (see
//! [`kiln_core::backends`]). A command on a file backend never waits for a Ceph cluster.

pub mod config;
pub mod drivers;

use std::path::Path;
use std::sync::Arc;

use kiln_core::backends::Backends;
use kiln_core::locks::FlockLocks;
use kiln_core::store::SqliteStore;
use kiln_core::{Error, Result, Service};

pub use config::{Config, data_dir};

/// Builds the service for `config` on `data_dir` (created if missing): the SQLite store in
/// `kiln.db`, host-local locks in `locks/`, every configured backend registered to open on
/// first use. Does not run recovery (see [`open`]).
pub fn build(config: &Config, data_dir: &Path) -> Result<Service> {
    let (tables, default_backend) = config.backend_tables()?;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::io(format!("create data directory {}", data_dir.display()), e))?;
    let mut backends = Backends::new(default_backend);
    for (name, table) in tables {
        match drivers::build(&name, table, data_dir)? {
            (kind, drivers::Built::Opener(opener)) => backends.add(name, kind, opener),
            (kind, drivers::Built::Missing(reason)) => backends.add_unavailable(name, kind, reason),
        }
    }
    let store = Arc::new(SqliteStore::open(&data_dir.join("kiln.db"))?);
    let locks = Arc::new(FlockLocks::new(data_dir.join("locks"))?);
    Service::new(store, backends, locks)
}

/// [`build`], then crash recovery: every operation a dead process left journaled is
/// finished or rolled back (its actions are logged at warn) before the service is used.
pub async fn open(config: &Config, data_dir: &Path) -> Result<Service> {
    let service = build(config, data_dir)?;
    service.recover().await?;
    Ok(service)
}
