//! `kiln serve`: the REST API of `kiln-api` on a multi-threaded runtime, until SIGTERM or
//! Ctrl-C; then a graceful shutdown (requests in flight finish, background operations get
//! `--shutdown-timeout` seconds, anything left stays journaled for the next start).

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
        let state = kiln_api::state(service, api, tokens);
        kiln_api::serve(
            state,
            listener,
            shutdown_signal(),
            Duration::from_secs(args.shutdown_timeout),
        )
        .await
        .map_err(|e| Error::io("serve", e))?;
        tracing::info!("kiln serve: stopped");
        Ok(())
    });
    // Blocking work still running (a lock wait, a copy) does not hold the exit: what it
    // belonged to is journaled, and the next start resolves it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
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
