//! kiln-runtime: configuration -> store -> locks -> drivers -> [`Service`], the wiring the
//! CLI and `kiln serve` share.
//!
//! Opening is cheap on purpose: the configuration is parsed and checked, the store opened
//! and recovery run, but no backend is opened until an operation needs it (see
//! [`kiln_core::backends`]). A command on a file backend never waits for a Ceph cluster.

pub mod config;
pub mod drivers;

use std::path::Path;
use std::sync::Arc;

use kiln_core::backends::Backends;
use kiln_core::locks::{FlockLocks, Liveness, LockManager, PgLocks};
use kiln_core::store::{PostgresStore, SqliteStore, Store};
use kiln_core::{Error, Result, Service};

pub use config::{Config, data_dir};

/// Builds the service for `config` on `data_dir` (created if missing): the SQLite store in
/// `kiln.db` and host-local locks in `locks/`, or, with `[store] url`, PostgreSQL for both;
/// every configured backend registered to open on first use (a backend local to another
/// node is registered as unavailable, naming its node). Does not run recovery (see [`open`]).
pub async fn build(config: &Config, data_dir: &Path) -> Result<Service> {
    let (tables, default_backend) = config.backend_tables()?;
    let node = config.node_name(None)?;
    let postgres = config.store.postgres(None);
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::io(format!("create data directory {}", data_dir.display()), e))?;
    let mut backends = Backends::new(default_backend);
    for (name, mut table) in tables {
        let placement = config::take_placement(&name, &mut table, postgres.is_some())?;
        if let config::Placement::Node(owner) = &placement
            && *owner != node
        {
            let kind = table
                .get("driver")
                .and_then(|d| d.as_str())
                .unwrap_or("unknown")
                .to_string();
            backends.add_unavailable(
                name.clone(),
                kind,
                format!(
                    "local to node {owner:?} (this is node {node:?}); send the request to {owner}"
                ),
            );
            continue;
        }
        match drivers::build(&name, table, data_dir)? {
            (kind, drivers::Built::Opener(opener)) => backends.add(name, kind, opener),
            (kind, drivers::Built::Missing(reason)) => backends.add_unavailable(name, kind, reason),
        }
    }
    kiln_core::node::set_name(&node);
    let (store, locks): (Arc<dyn Store>, Arc<dyn LockManager>) = match &postgres {
        None => (
            Arc::new(SqliteStore::open(&data_dir.join("kiln.db"))?),
            Arc::new(FlockLocks::new(data_dir.join("locks"))?),
        ),
        Some(options) => {
            let liveness = Liveness {
                node_timeout: config.store.node_timeout()?,
                fence: true,
            };
            // Connecting blocks (the store's client is synchronous): on the blocking
            // pool, so that no runtime worker stalls while PostgreSQL answers slowly.
            let opts = options.clone();
            let store = Arc::new(
                tokio::task::spawn_blocking(move || PostgresStore::connect(&opts))
                    .await
                    .map_err(|e| Error::store(format!("store connect task failed: {e}")))??,
            );
            let sessions = config
                .store
                .lock_sessions
                .unwrap_or(config::DEFAULT_LOCK_SESSIONS);
            let locks = Arc::new(PgLocks::connect(options, sessions, liveness).await?);
            (store, locks)
        }
    };
    Service::new(store, backends, locks)
}

/// [`build`], then crash recovery: every operation a dead process left journaled is
/// finished or rolled back (its actions are logged at warn) before the service is used.
pub async fn open(config: &Config, data_dir: &Path) -> Result<Service> {
    let service = build(config, data_dir).await?;
    service.recover().await?;
    Ok(service)
}

/// `kiln store migrate`: creates or upgrades the PostgreSQL schema (SQLite migrates itself
/// when opened; for it this just opens the file). Returns the schema versions before and
/// after.
pub fn migrate(config: &Config, data_dir: &Path) -> Result<(usize, usize)> {
    match config.store.postgres(None) {
        Some(options) => PostgresStore::migrate(&options),
        None => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                Error::io(format!("create data directory {}", data_dir.display()), e)
            })?;
            SqliteStore::open(&data_dir.join("kiln.db"))?;
            let n = kiln_core::store::Sqlite::SCHEMA_VERSION;
            Ok((n, n))
        }
    }
}
