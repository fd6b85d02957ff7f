//! Cinder's attachments API (3.27+; `os-complete` 3.44+) over kiln's one attachment per
//! volume. Creating an attachment records kiln's attachment at once (the volume is attached
//! for kiln from then on: snapshots need `force` before 3.66), and the API keeps Cinder's
//! lifecycle beside it: `reserved` (no connector), `attaching` (a connector given; the answer
//! carries `connection_info`), `attached` (after `os-complete`). The volume's API status is
//! `reserved` or `attaching` accordingly, `in-use` once attached. An attachment's id is
//! derived from its volume and instance, so it is stable.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use kiln_core::attrs::{ObjectAttrs, ObjectKind};
use kiln_core::{Attachment, InstanceId, Volume};
use serde_json::{Map, Value, json};

use crate::body;
use crate::context::Req;
use crate::error::{ApiError, ApiResult};
use crate::listing::{ListQuery, page};
use crate::state::{Shared, listed};
use crate::views::{self, attachment_id};
use crate::volumes::param;

/// Keys of the lifecycle kept in the volume's API bookkeeping.
const ID: &str = "attachment_id";
const STATUS: &str = "attachment_status";
const MODE: &str = "attachment_mode";

/// The Cinder status of `v`'s attachment: the recorded lifecycle when it is about the
/// attachment `v` has now, else `attached` (made by the CLI or `os-attach`).
pub fn status(v: &Volume, a: &ObjectAttrs) -> Option<&'static str> {
    let x = v.attachments.first()?;
    let current = attachment_id(v, &x.instance_id).to_string();
    Some(
        match (a.extra.get(ID), a.extra.get(STATUS).map(String::as_str)) {
            (Some(id), Some("reserved")) if *id == current => "reserved",
            (Some(id), Some("attaching")) if *id == current => "attaching",
            _ => "attached",
        },
    )
}

fn require_version(req: &Req, minor: u16) -> ApiResult<()> {
    if req.version.at_least(3, minor) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "the attachments API needs microversion 3.{minor} or later"
        )))
    }
}

async fn view(st: &Shared, v: &Volume, a: &ObjectAttrs, detail: bool) -> ApiResult<Value> {
    let Some(x) = v.attachments.first() else {
        return Err(ApiError::not_found("attachment not found"));
    };
    let mut out = json!({
        "id": attachment_id(v, &x.instance_id).to_string(),
        "status": status(v, a),
        "instance": x.instance_id.to_string(),
        "volume_id": v.id.to_string(),
    });
    if detail {
        out["attached_at"] = views::ts(&x.attached_at).into();
        out["detached_at"] = Value::Null;
        out["attach_mode"] = a.extra.get(MODE).map_or("rw", String::as_str).into();
        out["connection_info"] = match status(v, a) {
            Some("reserved") => Value::Null,
            _ => {
                // Cinder's attachment carries the driver's data with its connector kind.
                let info = st.service.connection_info(v.id).await?;
                let mut data = info.data;
                data.insert("driver_volume_type".into(), info.driver_volume_type.into());
                Value::Object(data)
            }
        };
    }
    Ok(out)
}

/// The visible volume whose attachment has id `id`.
async fn find(st: &Shared, req: &Req, id: &str) -> ApiResult<(Volume, ObjectAttrs)> {
    let missing = || ApiError::not_found(format!("Attachment {id} could not be found."));
    let attrs = st.all_attrs(ObjectKind::Volume).await?;
    for v in st.service.volumes().await? {
        if let Some(x) = v.attachments.first()
            && attachment_id(&v, &x.instance_id).to_string() == id
        {
            let a = attrs.get(&v.id.to_string()).cloned().unwrap_or_default();
            if !crate::state::may_see(&req.caller, &a) {
                return Err(missing());
            }
            return Ok((v, a));
        }
    }
    Err(missing())
}

/// The device of a new attachment: the connector's `mountpoint` when it names one, else
/// the first free `/dev/vdX` (from `vdb`) on the instance.
async fn device(
    st: &Shared,
    instance: InstanceId,
    connector: &Map<String, Value>,
) -> ApiResult<String> {
    if let Some(Value::String(m)) = connector.get("mountpoint") {
        return Ok(m.clone());
    }
    let used: Vec<String> = st
        .service
        .store()
        .instance_volumes(instance)
        .await?
        .iter()
        .flat_map(|v| v.attachments.iter().map(|a| a.device.clone()))
        .collect();
    (b'b'..=b'z')
        .map(|c| format!("/dev/vd{}", c as char))
        .find(|d| !used.contains(d))
        .ok_or_else(|| {
            ApiError::bad_request(format!("instance {instance} has no free /dev/vdX device"))
        })
}

fn connector(m: &Map<String, Value>) -> ApiResult<Option<Map<String, Value>>> {
    match m.get("connector") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(c)) if c.is_empty() => Ok(None),
        Some(Value::Object(c)) => Ok(Some(c.clone())),
        Some(_) => Err(ApiError::bad_request(
            "Invalid input for field 'connector': it must be an object.",
        )),
    }
}

async fn record(
    st: &Shared,
    v: &Volume,
    status: &str,
    mode: Option<String>,
) -> ApiResult<ObjectAttrs> {
    let x = v
        .attachments
        .first()
        .ok_or_else(|| ApiError::not_found("attachment not found"))?;
    let id = attachment_id(v, &x.instance_id).to_string();
    Ok(st
        .service
        .update_attrs(ObjectKind::Volume, v.id.to_string(), |a| {
            a.extra.insert(ID.into(), id.clone());
            a.extra.insert(STATUS.into(), status.into());
            if let Some(m) = &mode {
                a.extra.insert(MODE.into(), m.clone());
            }
            Ok(())
        })
        .await?)
}

/// `POST /attachments` `{"attachment": {"volume_uuid", "instance_uuid", "connector", "mode"}}`.
pub async fn create(
    State(st): State<Shared>,
    req: Req,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require_version(&req, 27)?;
    let b = body::wrapped(&bytes, "attachment", &[])?;
    body::only_keys(
        &b,
        &["volume_uuid", "instance_uuid", "connector", "mode"],
        "attachment",
    )?;
    let mode = body::opt_str(&b, "mode")?;
    if mode.as_deref().is_some_and(|m| m != "rw") {
        return Err(ApiError::bad_request(
            "kiln attaches volumes read-write only (mode 'rw')",
        ));
    }
    let (v, a) = st.volume(&req, &body::req_str(&b, "volume_uuid")?).await?;
    let instance: InstanceId = body::req_str(&b, "instance_uuid")?
        .parse()
        .map_err(|e: kiln_core::Error| ApiError::bad_request(e.to_string()))?;
    st.check_instance_for(&req, instance, &a).await?;
    let conn = connector(&b)?;
    let dev = device(&st, instance, conn.as_ref().unwrap_or(&Map::new())).await?;
    let v = st
        .service
        .attach(v.id, Attachment::new(instance, dev))
        .await?;
    let status = if conn.is_some() {
        "attaching"
    } else {
        "reserved"
    };
    let a = record(&st, &v, status, mode).await?;
    Ok((
        StatusCode::OK,
        Json(json!({"attachment": view(&st, &v, &a, true).await?})),
    ))
}

async fn list(st: &Shared, req: &Req, q: &ListQuery, detail: bool) -> ApiResult<Json<Value>> {
    require_version(req, 27)?;
    let attrs = st.all_attrs(ObjectKind::Volume).await?;
    let rows = crate::listing::with_attrs(
        st.service.volumes().await?,
        &attrs,
        |v| (v.updated_at, v.id),
        |v, a| {
            !v.attachments.is_empty()
                && listed(&req.caller, a, q.all_tenants())
                && q.volume_id.as_ref().is_none_or(|x| v.id.to_string() == *x)
                && q.status
                    .as_ref()
                    .is_none_or(|s| status(v, a) == Some(s.as_str()))
        },
    );
    let (rows, next) = page(rows, q, |(v, _)| {
        v.attachments
            .first()
            .map(|x| attachment_id(v, &x.instance_id).to_string())
            .unwrap_or_default()
    })?;
    let mut items = Vec::with_capacity(rows.len());
    for (v, a) in &rows {
        items.push(view(st, v, a, detail).await?);
    }
    let mut out = json!({"attachments": items});
    if let Some(marker) = next {
        out["attachments_links"] =
            json!([{"rel": "next", "href": q.next_href(req, "attachments", &marker)}]);
    }
    Ok(Json(out))
}

/// `GET /attachments`.
pub async fn index(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, false).await
}

/// `GET /attachments/detail`.
pub async fn detail(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, true).await
}

/// `GET /attachments/{id}`.
pub async fn show(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    require_version(&req, 27)?;
    let (v, a) = find(&st, &req, param(&p, "id")?).await?;
    Ok(Json(json!({"attachment": view(&st, &v, &a, true).await?})))
}

/// `PUT /attachments/{id}` `{"attachment": {"connector": {...}}}`: a reservation becomes
/// `attaching`, and the answer carries the connection info.
pub async fn update(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    require_version(&req, 27)?;
    let b = body::wrapped(&bytes, "attachment", &[])?;
    body::only_keys(&b, &["connector"], "attachment")?;
    if connector(&b)?.is_none() {
        return Err(ApiError::bad_request("'connector' is a required property."));
    }
    let (v, a) = find(&st, &req, param(&p, "id")?).await?;
    let a = match status(&v, &a) {
        Some("reserved") => record(&st, &v, "attaching", None).await?,
        _ => a,
    };
    Ok(Json(json!({"attachment": view(&st, &v, &a, true).await?})))
}

/// `POST /attachments/{id}/action` `{"os-complete": null}` (3.44): the attachment is
/// `attached` and the volume `in-use`.
pub async fn action(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let b = body::object(&bytes)?;
    match b.iter().next() {
        Some((name, _)) if b.len() == 1 && name == "os-complete" => {
            require_version(&req, 44)?;
            let (v, _) = find(&st, &req, param(&p, "id")?).await?;
            record(&st, &v, "attached", None).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Some((name, _)) if b.len() == 1 => Err(ApiError::bad_request(format!(
            "There is no such action: {name}"
        ))),
        _ => Err(ApiError::bad_request(
            "An action body names exactly one action.",
        )),
    }
}

/// `DELETE /attachments/{id}`: detaches; the volume is `available` again.
pub async fn delete(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    require_version(&req, 27)?;
    let (v, a) = find(&st, &req, param(&p, "id")?).await?;
    st.service.detach(v.id).await?;
    forget(&st, &v.id.to_string(), &a).await?;
    Ok(Json(json!({"attachments": []})))
}

/// Drops the lifecycle kept for volume `id`'s attachment, once it is detached.
pub(crate) async fn forget(st: &Shared, id: &str, a: &ObjectAttrs) -> ApiResult<()> {
    if [ID, STATUS, MODE].iter().any(|k| a.extra.contains_key(*k)) {
        st.service
            .update_attrs(ObjectKind::Volume, id.to_string(), |a| {
                for k in [ID, STATUS, MODE] {
                    a.extra.remove(k);
                }
                Ok(())
            })
            .await?;
    }
    Ok(())
}
