//! Version discovery, unauthenticated, as Cinder serves it: `GET /` answers 300 with every
//! version, `GET /v3` and `/v3/` answer 200 with v3 alone.

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::context::base_url;
use crate::microversion::VOLUME;

/// The v3 version document.
pub fn v3(base: &str) -> Value {
    json!({
        "id": "v3.0",
        "status": "CURRENT",
        "version": VOLUME.max.to_string(),
        "min_version": VOLUME.min.to_string(),
        "updated": "2023-09-01T00:00:00Z",
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
            {"rel": "self", "href": format!("{base}/v3/")},
        ],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}
        ],
    })
}

/// `GET /`: 300 Multiple Choices.
pub async fn root(headers: HeaderMap) -> (StatusCode, Json<Value>) {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": [v3(&base_url(&headers))]})),
    )
}

/// `GET /v3` and `GET /v3/`.
pub async fn v3_root(headers: HeaderMap) -> Json<Value> {
    Json(json!({"versions": [v3(&base_url(&headers))]}))
}
