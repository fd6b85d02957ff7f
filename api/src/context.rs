//! What every request carries once it passed the API's layer: its id, the negotiated
//! microversion and the authenticated caller; and the layers that establish them.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::{AuthMode, Identity};
use crate::error::ApiError;
use crate::microversion::{self, Range, Version};
use crate::state::AppState;

/// The response header naming the request (`req-<uuid>`), as every OpenStack service sends.
pub const REQUEST_ID: &str = "x-openstack-request-id";

/// A request's id, set by [`request_log`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The context of an API request (see the module docs).
#[derive(Debug, Clone)]
pub struct Req {
    /// Who is calling.
    pub caller: Identity,
    /// The negotiated microversion.
    pub version: Version,
    /// `scheme://host` the client used, for links.
    pub base_url: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Req {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Req>().cloned().ok_or_else(|| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "request context missing")
        })
    }
}

/// The outermost layer: gives every request an id (echoed in `x-openstack-request-id`)
/// and writes one structured access-log line per request.
pub async fn request_log(mut req: Request, next: Next) -> Response {
    let id = format!("req-{}", uuid::Uuid::new_v4());
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID), v);
    }
    let project = resp
        .extensions()
        .get::<Identity>()
        .map(|i| i.project.clone())
        .unwrap_or_default();
    tracing::info!(
        target: "kiln::access",
        request_id = %id,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        project = %project,
        ms = format_args!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        "request"
    );
    resp
}

/// The base URL the client used (`X-Forwarded-Proto` and `Host` honoured).
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.bytes().all(|c| c.is_ascii_graphic()))
        .unwrap_or("localhost");
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// Who the request's token identifies (see [`AuthMode`]).
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let token = headers
        .get("x-auth-token")
        .map(|t| t.to_str().map(str::trim))
        .transpose()
        .map_err(|_| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "The request you have made requires authentication.",
            )
        })?;
    match state.config.auth {
        AuthMode::NoAuth => {
            let default = || Identity {
                user: None,
                project: state.config.default_project.0.clone(),
                admin: true,
            };
            match token {
                None | Some("") | Some("notused") => Ok(default()),
                Some(t) => {
                    // cinderclient's noauth token is "user:project"; Cinder takes a bare
                    // word as both.
                    let (user, project) = match t.split_once(':') {
                        Some((u, p)) => (u, if p.is_empty() { u } else { p }),
                        None => (t, t),
                    };
                    kiln_core::attrs::validate_id("user id", user)
                        .and_then(|()| kiln_core::attrs::validate_id("project id", project))
                        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
                    Ok(Identity {
                        user: Some(user.to_string()),
                        project: project.to_string(),
                        admin: true,
                    })
                }
            }
        }
        AuthMode::Tokens => token
            .and_then(|t| state.tokens.get(t))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "The request you have made requires authentication.",
                )
            }),
    }
}

/// The project a path names after its API prefix (`/v3/<project>/volumes`), if any:
/// the first segment when it is not one of the API's collections.
fn path_project<'a>(path: &'a str, prefix: &str, collections: &[&str]) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?.trim_start_matches('/');
    let first = rest.split('/').next().filter(|s| !s.is_empty())?;
    (!collections.contains(&first)).then_some(first)
}

/// Which API a layer serves: its microversions, path prefix and collections.
#[derive(Clone, Copy)]
pub struct ApiFamily {
    /// Its microversions (`None`: the API has none, as Glance's v2).
    pub range: Option<Range>,
    /// Its path prefix (`/v3`).
    pub prefix: &'static str,
    /// Its top-level collections (a first segment that is none of them is a project id).
    pub collections: &'static [&'static str],
}

/// The API layer: negotiates the microversion, authenticates the caller, checks that a
/// project in the path is the caller's, and echoes the version on the answer (errors
/// included).
pub async fn api_layer(
    State((state, family)): State<(Arc<AppState>, ApiFamily)>,
    mut req: Request,
    next: Next,
) -> Response {
    let range = family.range;
    let version = match range.map(|r| r.negotiate(req.headers())) {
        None => Version::new(0, 0),
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return finish(
                e.into_response(),
                range,
                range.map_or(Version::new(0, 0), |r| r.min),
            );
        }
    };
    let caller = match authenticate(&state, req.headers()) {
        Ok(c) => c,
        Err(e) => return finish(e.into_response(), range, version),
    };
    if let Some(p) = path_project(req.uri().path(), family.prefix, family.collections)
        && p != caller.project
    {
        let e = ApiError::bad_request(format!(
            "Malformed request url: project {p:?} in the URL is not the token's project"
        ));
        return finish(e.into_response(), range, version);
    }
    let base_url = base_url(req.headers());
    req.extensions_mut().insert(Req {
        caller: caller.clone(),
        version,
        base_url,
    });
    // The handler runs in its own task, awaited here: a client that disconnects drops this
    // future, not the operation, which finishes (and is waited for at shutdown).
    let mut resp = match state.tracker.spawn(next.run(req)).await {
        Ok(r) => r,
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request task failed: {e}"),
        )
        .into_response(),
    };
    resp.extensions_mut().insert(caller);
    finish(resp, range, version)
}

/// Echoes the version (and `Vary`) on an answer of an API with microversions.
fn finish(mut resp: Response, range: Option<Range>, version: Version) -> Response {
    let Some(range) = range else {
        return resp;
    };
    if let Ok(v) = HeaderValue::from_str(&range.header_value(version)) {
        resp.headers_mut()
            .insert(HeaderName::from_static(microversion::HEADER), v);
    }
    resp.headers_mut().append(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version"),
    );
    if let Some(legacy) = range.legacy_header
        && let (Ok(name), Ok(v)) = (
            HeaderName::from_bytes(legacy.as_bytes()),
            HeaderValue::from_str(&version.to_string()),
        )
    {
        resp.headers_mut().insert(name, v);
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static(legacy));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_segments_are_told_from_collections() {
        let c = &["volumes", "snapshots", "limits"];
        assert_eq!(path_project("/v3/p1/volumes", "/v3", c), Some("p1"));
        assert_eq!(path_project("/v3/volumes/abc", "/v3", c), None);
        assert_eq!(path_project("/v3/limits", "/v3", c), None);
        assert_eq!(path_project("/v3/", "/v3", c), None);
        assert_eq!(path_project("/other/p1", "/v3", c), None);
    }
}
