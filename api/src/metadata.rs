//! Metadata of volumes and snapshots (Cinder's `/metadata` sub-resource): kiln's object
//! properties, read and written as one map.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use kiln_core::attrs::{ObjectAttrs, ObjectKind};
use serde_json::{Value, json};

use crate::body;
use crate::context::Req;
use crate::error::{ApiError, ApiResult};
use crate::state::Shared;
use crate::volumes::param;

async fn load(st: &Shared, req: &Req, kind: ObjectKind, id: &str) -> ApiResult<ObjectAttrs> {
    Ok(match kind {
        ObjectKind::Snapshot => st.snapshot(req, id).await?.1,
        _ => st.volume(req, id).await?.1,
    })
}

/// Applies `change` to the object's properties as one read-modify-write that concurrent
/// writers cannot undo (see `Service::update_attrs`).
async fn change(
    st: &Shared,
    kind: ObjectKind,
    id: &str,
    change: impl Fn(&mut std::collections::BTreeMap<String, String>) -> kiln_core::Result<()>,
) -> ApiResult<ObjectAttrs> {
    Ok(st
        .service
        .update_attrs(kind, id.to_string(), |a| change(&mut a.properties))
        .await?)
}

/// `GET …/{id}/metadata`.
pub async fn get_all(
    st: Shared,
    req: Req,
    kind: ObjectKind,
    p: HashMap<String, String>,
) -> ApiResult<Json<Value>> {
    let a = load(&st, &req, kind, param(&p, "id")?).await?;
    Ok(Json(json!({"metadata": a.properties})))
}

/// `POST …/{id}/metadata` (merge, `replace` false) and `PUT` (replace all).
pub async fn set_all(
    st: Shared,
    req: Req,
    kind: ObjectKind,
    p: HashMap<String, String>,
    bytes: Bytes,
    replace: bool,
) -> ApiResult<Json<Value>> {
    let id = param(&p, "id")?;
    let b = body::object(&bytes)?;
    body::only_keys(&b, &["metadata"], "metadata")?;
    let md = body::opt_metadata(&b, "metadata")?.ok_or_else(|| {
        ApiError::bad_request("Missing required element 'metadata' in request body.")
    })?;
    load(&st, &req, kind, id).await?;
    let a = change(&st, kind, id, |props| {
        if replace {
            props.clone_from(&md);
        } else {
            props.extend(md.clone());
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({"metadata": a.properties})))
}

/// `GET …/{id}/metadata/{key}`.
pub async fn get_one(
    st: Shared,
    req: Req,
    kind: ObjectKind,
    p: HashMap<String, String>,
) -> ApiResult<Json<Value>> {
    let key = param(&p, "key")?;
    let a = load(&st, &req, kind, param(&p, "id")?).await?;
    let v = a
        .properties
        .get(key)
        .ok_or_else(|| ApiError::not_found(format!("Metadata key {key} could not be found.")))?;
    Ok(Json(json!({"meta": {key: v}})))
}

/// `PUT …/{id}/metadata/{key}` with `{"meta": {key: value}}`.
pub async fn put_one(
    st: Shared,
    req: Req,
    kind: ObjectKind,
    p: HashMap<String, String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let (id, key) = (param(&p, "id")?, param(&p, "key")?);
    let b = body::object(&bytes)?;
    body::only_keys(&b, &["meta"], "meta")?;
    let meta = body::opt_metadata(&b, "meta")?
        .ok_or_else(|| ApiError::bad_request("Missing required element 'meta' in request body."))?;
    let value = match meta.get(key) {
        Some(v) if meta.len() == 1 => v.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "Request body and URI mismatch: 'meta' must hold exactly the key of the URI.",
            ));
        }
    };
    load(&st, &req, kind, id).await?;
    change(&st, kind, id, |props| {
        props.insert(key.to_string(), value.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({"meta": {key: value}})))
}

/// `DELETE …/{id}/metadata/{key}`.
pub async fn delete_one(
    st: Shared,
    req: Req,
    kind: ObjectKind,
    p: HashMap<String, String>,
) -> ApiResult<()> {
    let (id, key) = (param(&p, "id")?, param(&p, "key")?);
    load(&st, &req, kind, id).await?;
    change(&st, kind, id, |props| match props.remove(key) {
        Some(_) => Ok(()),
        None => Err(kiln_core::Error::not_found("metadata key", key)),
    })
    .await?;
    Ok(())
}

/// The metadata routes of one kind of object, for the router.
macro_rules! metadata_routes {
    ($router:expr, $base:literal, $kind:expr) => {{
        use axum::body::Bytes as B;
        use axum::extract::{Path as P, State as S};
        use axum::routing::get;
        use std::collections::HashMap as M;
        use $crate::context::Req as R;
        use $crate::metadata as m;
        use $crate::state::Shared as Sh;
        $router
            .route(
                concat!($base, "/{id}/metadata"),
                get(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>| {
                    m::get_all(st, req, $kind, p)
                })
                .post(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>, b: B| {
                    m::set_all(st, req, $kind, p, b, false)
                })
                .put(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>, b: B| {
                    m::set_all(st, req, $kind, p, b, true)
                }),
            )
            .route(
                concat!($base, "/{id}/metadata/{key}"),
                get(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>| {
                    m::get_one(st, req, $kind, p)
                })
                .put(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>, b: B| {
                    m::put_one(st, req, $kind, p, b)
                })
                .delete(|S(st): S<Sh>, req: R, P(p): P<M<String, String>>| {
                    m::delete_one(st, req, $kind, p)
                }),
            )
    }};
}
pub(crate) use metadata_routes;
