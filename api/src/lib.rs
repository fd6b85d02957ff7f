//! `kiln serve`: a Cinder v3-compatible REST API over kiln's [`Service`], built on axum.
//!
//! One address serves three APIs the way DevStack lays them out: Cinder at `/v3` (and
//! `/v3/{project_id}`), with version discovery at `/` and `/v3`; Nova's subset (servers
//! kiln knows, `createImage`) at `/compute/v2.1`; Glance's subset (images) at
//! `/image/v2`; each with its own version discovery. Every answer carries
//! `x-openstack-request-id`; every request is one structured access-log line (target
//! `kiln::access`). Errors have Cinder's body shape. Operations that take a while
//! (clones, reverts, deletes) answer 202 as soon as they are journaled and go on in the
//! background; a shutdown waits for them (see [`serve`]).

pub mod attachments;
pub mod body;
pub mod compute;
pub mod config;
pub mod context;
pub mod error;
pub mod images;
pub mod limits;
pub mod listing;
pub mod metadata;
pub mod microversion;
pub mod snapshots;
pub mod state;
pub mod versions;
pub mod views;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_core::Service;
use kiln_core::attrs::ObjectKind;
use tokio_util::task::TaskTracker;

pub use config::{ApiConfig, AuthMode, Tokens};
use context::ApiFamily;
use error::ApiError;
pub use state::{AppState, Shared};

/// Cinder's collections under `/v3` (a first path segment that is none of them is a
/// project id).
const V3_COLLECTIONS: &[&str] = &["volumes", "snapshots", "limits", "attachments"];

/// The Cinder API family.
const V3: ApiFamily = ApiFamily {
    range: Some(microversion::VOLUME),
    prefix: "/v3",
    collections: V3_COLLECTIONS,
};

/// Nova's subset.
const COMPUTE: ApiFamily = ApiFamily {
    range: Some(microversion::COMPUTE),
    prefix: "/compute/v2.1",
    collections: &["servers"],
};

/// Glance's subset (no microversions, no project in paths).
const IMAGE: ApiFamily = ApiFamily {
    range: None,
    prefix: "/image/v2",
    collections: &["images"],
};

fn compute_routes() -> Router<Shared> {
    Router::new()
        .route("/servers", get(compute::index))
        .route("/servers/detail", get(compute::detail))
        .route("/servers/{id}", get(compute::show))
        .route("/servers/{id}/action", post(compute::action))
}

/// The `/v3` routes, mounted with and without a project segment.
fn v3_routes() -> Router<Shared> {
    let r = Router::new()
        .route("/volumes", get(volumes::index).post(volumes::create))
        .route("/volumes/detail", get(volumes::detail))
        .route(
            "/volumes/{id}",
            get(volumes::show)
                .put(volumes::update)
                .delete(volumes::delete),
        )
        .route("/volumes/{id}/action", post(volumes::action))
        .route("/snapshots", get(snapshots::index).post(snapshots::create))
        .route("/snapshots/detail", get(snapshots::detail))
        .route(
            "/snapshots/{id}",
            get(snapshots::show)
                .put(snapshots::update)
                .delete(snapshots::delete),
        )
        .route("/snapshots/{id}/action", post(snapshots::action))
        .route("/limits", get(limits::show))
        .route(
            "/attachments",
            get(attachments::index).post(attachments::create),
        )
        .route("/attachments/detail", get(attachments::detail))
        .route(
            "/attachments/{id}",
            get(attachments::show)
                .put(attachments::update)
                .delete(attachments::delete),
        )
        .route("/attachments/{id}/action", post(attachments::action));
    let r = metadata::metadata_routes!(r, "/volumes", ObjectKind::Volume);
    metadata::metadata_routes!(r, "/snapshots", ObjectKind::Snapshot)
}

/// An unknown path: 404 in Cinder's shape.
async fn not_found() -> ApiError {
    ApiError::not_found("The resource could not be found.")
}

/// `GET /healthcheck` (oslo's path): 200 `OK` without authentication, answered without
/// touching the store — its latency under load shows whether the runtime is blocked.
async fn healthcheck() -> &'static str {
    "OK"
}

/// Rewrites an error answer axum made itself (unknown method, body too large, bad path)
/// into Cinder's shape; answers that already are JSON pass unchanged.
async fn cinder_shaped(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "The method is not allowed for the requested URL.",
        StatusCode::PAYLOAD_TOO_LARGE => "The request body is too large.",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "The request body must be JSON.",
        _ => status.canonical_reason().unwrap_or("error"),
    };
    let (parts, _) = resp.into_parts();
    let mut out = ApiError::new(status, message).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().append(k, v.clone());
        }
    }
    out
}

/// The whole application: discovery, the Cinder API, the health check.
pub fn router(state: Shared) -> Router {
    let api = v3_routes();
    let v3 = Router::new()
        .nest("/v3", api.clone())
        .nest("/v3/{project_id}", api)
        .layer(from_fn_with_state((state.clone(), V3), context::api_layer))
        .with_state(state.clone());
    let nova = compute_routes();
    let compute = Router::new()
        .nest("/compute/v2.1", nova.clone())
        .nest("/compute/v2.1/{project_id}", nova)
        .layer(from_fn_with_state(
            (state.clone(), COMPUTE),
            context::api_layer,
        ))
        .with_state(state.clone());
    let image = Router::new()
        .route("/image/v2/images", get(images::index))
        .route(
            "/image/v2/images/{id}",
            get(images::show).delete(images::delete),
        )
        .layer(from_fn_with_state(
            (state.clone(), IMAGE),
            context::api_layer,
        ))
        .with_state(state);
    Router::new()
        .route("/", get(versions::root))
        .route("/v3", get(versions::v3_root))
        .route("/v3/", get(versions::v3_root))
        .route("/compute", get(compute::versions))
        .route("/compute/", get(compute::versions))
        .route("/compute/v2.1", get(compute::version))
        .route("/compute/v2.1/", get(compute::version))
        .route("/image", get(images::versions))
        .route("/image/", get(images::versions))
        .route("/image/versions", get(images::versions_ok))
        .route("/healthcheck", get(healthcheck))
        .merge(v3)
        .merge(compute)
        .merge(image)
        .fallback(not_found)
        .layer(from_fn(cinder_shaped))
        .layer(DefaultBodyLimit::max(body::MAX_BODY))
        .layer(from_fn(context::request_log))
}

/// Builds the shared state for `service`.
pub fn state(service: Arc<Service>, config: ApiConfig, tokens: Tokens) -> Shared {
    Arc::new(AppState {
        service,
        config,
        tokens,
        tracker: TaskTracker::new(),
    })
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting, lets
/// requests in flight finish and waits for background operations — all within `grace`.
/// An operation still running after that stays journaled, and the next start's recovery
/// resolves it.
pub async fn serve(
    state: Shared,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let deadline = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r?,
        () = deadline => tracing::warn!(
            "requests still in flight after the shutdown timeout: stopping without them"
        ),
    }
    state.tracker.close();
    let running = state.tracker.len();
    if running > 0 {
        tracing::info!(running, "waiting for background operations");
    }
    if tokio::time::timeout(grace, state.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = state.tracker.len(),
            "background operations still running at shutdown: they stay journaled and the next start resolves them"
        );
    }
    Ok(())
}
