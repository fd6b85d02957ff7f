//! Nova's subset under `/compute/v2.1`: the servers (instances) kiln knows, and
//! `createImage`, which snapshots every attached volume at one instant and records the
//! metadata-only image Nova records for a boot-from-volume server.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use kiln_core::attrs::{ObjectAttrs, ObjectKind};
use kiln_core::ops::instance_snapshot::{DEFAULT_FREEZE_TIMEOUT, InstanceSnapshotRequest, Quiesce};
use kiln_core::{Instance, InstanceId, Volume};
use serde_json::{Value, json};

use crate::body;
use crate::context::{Req, base_url};
use crate::error::{ApiError, ApiResult};
use crate::listing::{ListQuery, page};
use crate::state::{Shared, listed, may_see};
use crate::volumes::param;

/// Nova's timestamp format: `2026-11-28T02:38:50Z`.
pub fn ts(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn links(req: &Req, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/servers/{id}", req.base_url)},
        {"rel": "bookmark", "href": format!("{}/compute/servers/{id}", req.base_url)},
    ])
}

/// A server's detail view, with the fields the clients read.
fn server_view(req: &Req, i: &Instance, a: &ObjectAttrs, vols: &[Volume]) -> Value {
    let id = i.id.to_string();
    let attached: Vec<Value> = vols
        .iter()
        .map(|v| {
            // (The caller filtered `vols` to the volumes it may see.)
            let dot = v
                .attachments
                .iter()
                .any(|x| x.instance_id == i.id && x.delete_on_termination);
            json!({"id": v.id.to_string(), "delete_on_termination": dot})
        })
        .collect();
    let mut view = json!({
        "id": id,
        "name": i.name.clone().unwrap_or_default(),
        "status": "ACTIVE",
        "tenant_id": a.project_id,
        "user_id": a.user_id,
        "metadata": {},
        "hostId": "",
        "image": "",
        "flavor": {"id": "kiln", "links": []},
        "created": ts(&i.created_at),
        "updated": ts(&i.updated_at),
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "links": links(req, &id),
        "config_drive": "",
        "key_name": null,
        "progress": 0,
        "security_groups": [],
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:vm_state": "active",
        "OS-EXT-STS:task_state": null,
        "OS-EXT-STS:power_state": 1,
        "OS-SRV-USG:launched_at": ts(&i.created_at),
        "OS-SRV-USG:terminated_at": null,
        "os-extended-volumes:volumes_attached": attached,
    });
    if req.caller.admin {
        view["OS-EXT-SRV-ATTR:root_device_name"] = i.root_device.clone().into();
    }
    if req.version.at_least(2, 9) {
        view["locked"] = false.into();
    }
    if req.version.at_least(2, 19) {
        view["description"] = Value::Null;
    }
    if req.version.at_least(2, 26) {
        view["tags"] = json!([]);
    }
    view
}

/// The volumes attached to instance `i` that the caller may see.
async fn visible_volumes(st: &Shared, req: &Req, i: &Instance) -> ApiResult<Vec<Volume>> {
    let attrs = st.all_attrs(ObjectKind::Volume).await?;
    Ok(st
        .service
        .store()
        .instance_volumes(i.id)
        .await?
        .into_iter()
        .filter(|v| {
            may_see(
                &req.caller,
                &attrs.get(&v.id.to_string()).cloned().unwrap_or_default(),
            )
        })
        .collect())
}

/// Instance `id` as the caller may see it (another project's is 404).
async fn instance(st: &Shared, req: &Req, id: &str) -> ApiResult<(Instance, ObjectAttrs)> {
    let missing = format!("Instance {id} could not be found.");
    st.visible(req, id, missing, |i: InstanceId| async move {
        st.service.instance(i).await.map(|(i, _)| i)
    })
    .await
}

async fn list(st: &Shared, req: &Req, q: &ListQuery, detail: bool) -> ApiResult<Json<Value>> {
    let attrs = st.all_attrs(ObjectKind::Instance).await?;
    let rows = crate::listing::with_attrs(
        st.service.instances().await?,
        &attrs,
        |i| (i.created_at, i.id),
        |i, a| {
            listed(&req.caller, a, q.all_tenants())
                && q.name.as_ref().is_none_or(|n| i.name.as_ref() == Some(n))
                && q.status
                    .as_ref()
                    .is_none_or(|s| s.eq_ignore_ascii_case("ACTIVE"))
        },
    );
    let (rows, next) = page(rows, q, |(i, _)| i.id.to_string())?;
    let mut items = Vec::with_capacity(rows.len());
    for (i, a) in &rows {
        items.push(if detail {
            let vols = visible_volumes(st, req, i).await?;
            server_view(req, i, a, &vols)
        } else {
            json!({"id": i.id.to_string(), "name": i.name.clone().unwrap_or_default(), "links": links(req, &i.id.to_string())})
        });
    }
    let mut out = json!({"servers": items});
    if let Some(marker) = next {
        let path = if detail { "servers/detail" } else { "servers" };
        out["servers_links"] = json!([{"rel": "next", "href": format!("{}/compute/v2.1/{path}?marker={marker}", req.base_url)}]);
    }
    Ok(Json(out))
}

/// `GET /servers`.
pub async fn index(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, false).await
}

/// `GET /servers/detail`.
pub async fn detail(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, true).await
}

/// `GET /servers/{id}`.
pub async fn show(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (i, a) = instance(&st, &req, param(&p, "id")?).await?;
    let vols = visible_volumes(&st, &req, &i).await?;
    Ok(Json(json!({"server": server_view(&req, &i, &a, &vols)})))
}

/// `POST /servers/{id}/action` `{"createImage": {"name", "metadata"}}`: snapshots every
/// attached volume at one instant (quiesced through the guest agent when it answers) and
/// answers 202 once the image is recorded and `active` — with `{"image_id"}` from 2.45, a
/// `Location` header before.
pub async fn action(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let b = body::object(&bytes)?;
    let (i, _) = instance(&st, &req, param(&p, "id")?).await?;
    let arg = match b.iter().next() {
        Some((name, Value::Object(arg))) if b.len() == 1 && name == "createImage" => arg.clone(),
        Some((name, _)) if b.len() == 1 && name == "createImage" => {
            return Err(ApiError::bad_request(
                "Invalid input: 'createImage' must be an object.",
            ));
        }
        Some((name, _)) if b.len() == 1 => {
            return Err(ApiError::bad_request(format!(
                "kiln serves only the createImage action, not {name}"
            )));
        }
        _ => {
            return Err(ApiError::bad_request(
                "An action body names exactly one action.",
            ));
        }
    };
    body::only_keys(&arg, &["name", "metadata"], "createImage")?;
    let name = body::req_str(&arg, "name")?;
    let properties = body::opt_metadata(&arg, "metadata")?.unwrap_or_default();
    // Every attached volume must be the caller's to see: an image never takes another
    // project's data.
    let all = st.service.store().instance_volumes(i.id).await?.len();
    if visible_volumes(&st, &req, &i).await?.len() != all {
        return Err(ApiError::bad_request(
            "a volume of another project is attached to this server; kiln does not snapshot it",
        ));
    }
    let owner = st.owner(&req.caller);
    let report = st
        .service
        .snapshot_instance(InstanceSnapshotRequest {
            instance: i.id,
            name,
            quiesce: Quiesce::Auto,
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT.min(Duration::from_secs(10)),
            properties,
            owner: Some(owner),
        })
        .await?;
    let id = report.image.id.to_string();
    if req.version.at_least(2, 45) {
        return Ok((StatusCode::ACCEPTED, Json(json!({"image_id": id}))).into_response());
    }
    let mut resp = StatusCode::ACCEPTED.into_response();
    let location = format!("{}/image/v2/images/{id}", req.base_url);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

fn version_doc(base: &str) -> Value {
    let r = crate::microversion::COMPUTE;
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": r.max.to_string(),
        "min_version": r.min.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/compute/v2.1/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    })
}

/// `GET /compute` and `/compute/`: the versions, as Nova lists them (200).
pub async fn versions(headers: HeaderMap) -> Json<Value> {
    Json(json!({"versions": [version_doc(&base_url(&headers))]}))
}

/// `GET /compute/v2.1` and `/compute/v2.1/`: this version.
pub async fn version(headers: HeaderMap) -> Json<Value> {
    Json(json!({"version": version_doc(&base_url(&headers))}))
}
