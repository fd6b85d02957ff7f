//! `kiln serve`: the REST API of `kiln-api` on a multi-threaded runtime, until SIGTERM or
//! Ctrl-C; then a graceful shutdown (requests in flight finish, background operations get
//! `--shutdown-timeout` seconds, anything left stays journaled for the next start).
//!
//! Recovery runs at start and then every `[store] recovery_interval_secs`: on a shared store
//! that is how the operations of a node that died are finished or rolled back by the nodes
//! that remain, and how an operation that failed while PostgreSQL was unreachable is
//! resolved once it is back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{Error, Result};

use crate::cli::ServeArgs;

/// Runs the server (blocks until it has shut down).
pub fn run(args: &ServeArgs, config: Option<&Path>, data_dir: Option<PathBuf>) -> Result<()> {
    let cfg = crate::load_config(config)?;
    let api = kiln_api::ApiConfig::from_table(cfg.api.as_ref())?;
    // Everything is checked before anything is opened: a bad address or token file
    // costs nothing.
    let addr = api.listen_addr(args.listen.as_deref())?;
    let base = config
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tokens = api.load_tokens(&base)?;
    let data_dir = kiln_runtime::data_dir(data_dir, &cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-serve")
        .build()
        .map_err(|e| Error::io("start the async runtime", e))?;
    let result = runtime.block_on(async move {
        let service = Arc::new(crate::open_with(&cfg, &data_dir).await?);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listen on {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("read the listening address", e))?;
        tracing::info!(
            address = %local,
            auth = ?api.auth,
            data_dir = %data_dir.display(),
            "kiln serve: listening (Cinder v3 at /v3)"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let recovery = tokio::spawn(recover_periodically(
            service.clone(),
            cfg.store.recovery_interval(),
            stop_rx,
        ));
        let state = kiln_api::state(service, api, tokens);
        kiln_api::serve(
            state,
            listener,
            async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            },
            Duration::from_secs(args.shutdown_timeout),
        )
        .await
        .map_err(|e| Error::io("serve", e))?;
        recovery.abort();
        tracing::info!("kiln serve: stopped");
        Ok(())
    });
    // Blocking work still running (a lock wait, a copy) does not hold the exit: what it
    // belonged to is journaled, and the next start resolves it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Runs recovery every `interval` (with up to 10% jitter, so that nodes started together
/// do not pass in lock step) until `stop` turns true. Errors are logged and retried at the
/// next pass: PostgreSQL or a backend may be briefly unreachable.
async fn recover_periodically(
    service: Arc<kiln_core::Service>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let jitter = interval.mul_f64(f64::from(std::process::id() % 100) / 1000.0);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval + jitter) => {}
        }
        match service.recover().await {
            Ok(done) if !done.is_empty() => {
                tracing::info!(
                    operations = done.len(),
                    "periodic recovery resolved unfinished operations"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "periodic recovery failed; retrying at the next pass")
            }
        }
    }
}

/// Resolves at SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
}
