//! Glance's subset under `/image/v2`: the metadata-only images of instance snapshots, as
//! Glance serves them (properties flattened, `status` `active`, `size` 0, raw/bare), and
//! their deletion, which deletes their snapshots as `kiln image delete` does.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use kiln_core::attrs::{ObjectAttrs, ObjectKind};
use kiln_core::{Image, ImageId};
use serde_json::{Value, json};

use crate::compute::ts;
use crate::context::{Req, base_url};
use crate::error::ApiResult;
use crate::listing::{ListQuery, page};
use crate::state::{Shared, listed};
use crate::volumes::param;

/// An image as Glance v2 serves it.
fn view(i: &Image, a: &ObjectAttrs) -> Value {
    let mut v = kiln_core::instance::glance_view(i);
    let id = i.id.to_string();
    v["created_at"] = ts(&i.created_at).into();
    v["updated_at"] = ts(&i.updated_at).into();
    v["owner"] = a.project_id.clone().into();
    v["protected"] = false.into();
    v["os_hidden"] = false.into();
    v["tags"] = json!([]);
    v["checksum"] = Value::Null;
    v["os_hash_algo"] = Value::Null;
    v["os_hash_value"] = Value::Null;
    v["virtual_size"] = Value::Null;
    v["self"] = format!("/v2/images/{id}").into();
    v["file"] = format!("/v2/images/{id}/file").into();
    v["schema"] = "/v2/schemas/image".into();
    v
}

async fn image(st: &Shared, req: &Req, id: &str) -> ApiResult<(Image, ObjectAttrs)> {
    let missing = format!("No image found with ID {id}");
    st.visible(req, id, missing, |i: ImageId| st.service.image(i))
        .await
}

/// `GET /v2/images` (filters `name`, `status`; `limit`/`marker` with `next`).
pub async fn index(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let attrs = st.all_attrs(ObjectKind::Image).await?;
    let rows = crate::listing::with_attrs(
        st.service.images().await?,
        &attrs,
        |i| (i.created_at, i.id),
        |i, a| {
            listed(&req.caller, a, q.all_tenants() || req.caller.admin)
                && q.name.as_ref().is_none_or(|n| &i.name == n)
                && q.status.as_ref().is_none_or(|s| i.status.as_str() == s)
        },
    );
    let (rows, next) = page(rows, &q, |(i, _)| i.id.to_string())?;
    let mut out = json!({
        "images": rows.iter().map(|(i, a)| view(i, a)).collect::<Vec<_>>(),
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    });
    if let Some(marker) = next {
        out["next"] = format!("/v2/images?marker={marker}").into();
    }
    Ok(Json(out))
}

/// `GET /v2/images/{id}`.
pub async fn show(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (i, a) = image(&st, &req, param(&p, "id")?).await?;
    Ok(Json(view(&i, &a)))
}

/// `DELETE /v2/images/{id}`: 204 once the deletion is journaled; the image and its
/// snapshots go (the image answers 404 then).
pub async fn delete(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let (i, _) = image(&st, &req, param(&p, "id")?).await?;
    let svc = st.service.clone();
    st.launch(async move { svc.delete_image(i.id, false).await })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn version_doc(base: &str) -> Value {
    json!({"id": "v2.9", "status": "CURRENT", "links": [{"rel": "self", "href": format!("{base}/image/v2/")}]})
}

/// `GET /image` and `/image/`: 300 with the versions, as Glance answers.
pub async fn versions(headers: HeaderMap) -> (StatusCode, Json<Value>) {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": [version_doc(&base_url(&headers))]})),
    )
}

/// `GET /image/versions`: 200 with the versions.
pub async fn versions_ok(headers: HeaderMap) -> Json<Value> {
    Json(json!({"versions": [version_doc(&base_url(&headers))]}))
}
