//! `/v3/volumes`: create, list, show, update, delete, metadata and actions.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_core::attrs::ObjectKind;
use kiln_core::{Attachment, CreateVolume, InstanceId, SnapshotId, VolumeStatus};
use serde_json::{Value, json};

use crate::body;
use crate::context::Req;
use crate::error::{ApiError, ApiResult};
use crate::listing::{ListQuery, page};
use crate::state::{Shared, listed};
use crate::views;

/// The `{id}` path parameter.
pub(crate) fn param<'a>(p: &'a HashMap<String, String>, name: &str) -> ApiResult<&'a str> {
    p.get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("missing path parameter {name}")))
}

const CREATE_KEYS: &[&str] = &[
    "size",
    "name",
    "display_name",
    "description",
    "display_description",
    "snapshot_id",
    "metadata",
    "volume_type",
    "availability_zone",
    "source_volid",
    "imageRef",
    "backup_id",
    "multiattach",
    "consistencygroup_id",
    "group_id",
];

/// Keys kiln knows but cannot honour: a non-null value is refused, null is ignored.
const UNSUPPORTED_CREATE_KEYS: &[&str] = &[
    "source_volid",
    "imageRef",
    "backup_id",
    "consistencygroup_id",
    "group_id",
];

/// `POST /volumes`: 202 with the new volume (`available`, or `creating` while a clone
/// copies).
pub async fn create(State(st): State<Shared>, req: Req, bytes: Bytes) -> ApiResult<Response> {
    let b = body::wrapped(&bytes, "volume", &["OS-SCH-HNT:scheduler_hints"])?;
    body::only_keys(&b, CREATE_KEYS, "volume")?;
    for k in UNSUPPORTED_CREATE_KEYS {
        if !matches!(b.get(*k), None | Some(Value::Null)) {
            return Err(ApiError::bad_request(format!(
                "kiln does not support creating a volume with '{k}'"
            )));
        }
    }
    if body::opt_bool(&b, "multiattach")? == Some(true) {
        return Err(ApiError::bad_request(
            "kiln volumes attach to one instance at a time (multiattach)",
        ));
    }
    if let Some(az) = body::opt_str(&b, "availability_zone")?
        && az != "nova"
    {
        return Err(ApiError::bad_request(format!(
            "Availability zone '{az}' is invalid: kiln has one, 'nova'"
        )));
    }
    let size = body::opt_uint(&b, "size")?;
    let source = match body::opt_str(&b, "snapshot_id")? {
        Some(sid) => Some(st.snapshot(&req, &sid).await?.0),
        None => None,
    };
    if size.is_none() && source.is_none() {
        return Err(ApiError::bad_request(
            "Invalid input: 'size' is required without 'snapshot_id'",
        ));
    }
    let size_bytes = size
        .map(|g| {
            g.checked_mul(views::GIB)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid volume size {g}")))
        })
        .transpose()?;
    let backend = body::opt_str(&b, "volume_type")?;
    if let Some(t) = &backend
        && !st.service.backends().await.iter().any(|i| &i.name == t)
    {
        return Err(ApiError::not_found(format!(
            "Volume type with name {t} could not be found."
        )));
    }
    let mut owner = st.owner(&req.caller);
    owner.attrs.description = body::label(&b, "description", "display_description")?;
    owner.attrs.properties = body::opt_metadata(&b, "metadata")?.unwrap_or_default();
    owner.attrs.validate()?;
    let create = CreateVolume {
        size_bytes,
        backend,
        name: body::label(&b, "name", "display_name")?,
        source_snapshot: source.map(|s| s.id),
        owner: Some(owner),
    };
    // An empty volume is made at once, so its answer is final (`available`) and a refusal
    // is the answer. A clone copies data: it goes on in the background once journaled,
    // and the client polls its status (a clone that fails leaves no volume: 404).
    let volume = if create.source_snapshot.is_some() {
        let svc = st.service.clone();
        match st
            .start(async move { svc.create_volume(create).await })
            .await?
        {
            Ok(v) => v,
            Err(begun) => st.service.volume(begun.volume_id).await?,
        }
    } else {
        st.service.create_volume(create).await?
    };
    let attrs = st.service.attrs(volume.id.to_string()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"volume": views::volume(&req, &volume, &attrs)})),
    )
        .into_response())
}

/// `GET /volumes` (summaries) and `GET /volumes/detail`.
async fn list(st: &Shared, req: &Req, q: &ListQuery, detail: bool) -> ApiResult<Json<Value>> {
    let attrs = st.all_attrs(ObjectKind::Volume).await?;
    let rows = crate::listing::with_attrs(
        st.service.volumes().await?,
        &attrs,
        |v| (v.created_at, v.id),
        |v, a| {
            listed(&req.caller, a, q.all_tenants())
                && q.name.as_ref().is_none_or(|n| v.name.as_ref() == Some(n))
                && q.status
                    .as_ref()
                    .is_none_or(|s| views::volume_status(v, a) == s)
        },
    );
    let (rows, next) = page(rows, q, |(v, _)| v.id.to_string())?;
    let items: Vec<Value> = rows
        .iter()
        .map(|(v, a)| {
            if detail {
                views::volume(req, v, a)
            } else {
                views::volume_summary(req, v)
            }
        })
        .collect();
    let mut out = json!({"volumes": items});
    if let Some(marker) = next {
        let path = if detail { "volumes/detail" } else { "volumes" };
        out["volumes_links"] = json!([{"rel": "next", "href": q.next_href(req, path, &marker)}]);
    }
    Ok(Json(out))
}

/// `GET /volumes`.
pub async fn index(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, false).await
}

/// `GET /volumes/detail`.
pub async fn detail(
    State(st): State<Shared>,
    req: Req,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(&st, &req, &q, true).await
}

/// `GET /volumes/{id}`.
pub async fn show(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (v, a) = st.volume(&req, param(&p, "id")?).await?;
    Ok(Json(json!({"volume": views::volume(&req, &v, &a)})))
}

/// `PUT /volumes/{id}`: name, description, metadata.
pub async fn update(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let id = param(&p, "id")?;
    let b = body::wrapped(&bytes, "volume", &[])?;
    body::only_keys(
        &b,
        &[
            "name",
            "display_name",
            "description",
            "display_description",
            "metadata",
        ],
        "volume",
    )?;
    let (mut v, mut a) = st.volume(&req, id).await?;
    let description = (b.contains_key("description") || b.contains_key("display_description"))
        .then(|| body::label(&b, "description", "display_description"))
        .transpose()?;
    let metadata = body::opt_metadata(&b, "metadata")?;
    // Checked before anything is written: a refused update changes nothing.
    let mut check = a.clone();
    if let Some(d) = &description {
        check.description.clone_from(d);
    }
    if let Some(m) = &metadata {
        check.properties.clone_from(m);
    }
    check.validate()?;
    if b.contains_key("name") || b.contains_key("display_name") {
        let name = body::label(&b, "name", "display_name")?;
        if let Some(n) = &name {
            kiln_core::validate::validate_label(n)?;
        }
        v = st.service.rename_volume(v.id, name).await?;
    }
    if description.is_some() || metadata.is_some() {
        a = st
            .service
            .update_attrs(ObjectKind::Volume, id.to_string(), |x| {
                if let Some(d) = &description {
                    x.description.clone_from(d);
                }
                if let Some(m) = &metadata {
                    x.properties.clone_from(m);
                }
                Ok(())
            })
            .await?;
    }
    Ok(Json(json!({"volume": views::volume(&req, &v, &a)})))
}

/// `DELETE /volumes/{id}[?cascade=true]`: 202; the volume answers 404 once it is gone.
pub async fn delete(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let (v, _) = st.volume(&req, param(&p, "id")?).await?;
    let cascade = match q.get("cascade") {
        None => false,
        Some(c) => {
            let m = serde_json::Map::from_iter([("cascade".to_string(), Value::String(c.clone()))]);
            body::opt_bool(&m, "cascade")?.unwrap_or(false)
        }
    };
    let svc = st.service.clone();
    st.launch(async move { svc.delete_volume(v.id, cascade).await })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /volumes/{id}/action`.
pub async fn action(
    State(st): State<Shared>,
    req: Req,
    Path(p): Path<HashMap<String, String>>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let id = param(&p, "id")?;
    let b = body::object(&bytes)?;
    let (name, arg) = match b.iter().next() {
        Some((k, v)) if b.len() == 1 => (k.as_str(), v.clone()),
        _ => {
            return Err(ApiError::bad_request(
                "An action body names exactly one action.",
            ));
        }
    };
    let arg = match arg {
        Value::Object(m) => m,
        Value::Null => serde_json::Map::new(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "Invalid input: '{name}' must be an object."
            )));
        }
    };
    let (v, a) = st.volume(&req, id).await?;
    match name {
        "os-attach" => {
            body::only_keys(
                &arg,
                &["instance_uuid", "mountpoint", "mode", "host_name"],
                name,
            )?;
            let instance: InstanceId = body::req_str(&arg, "instance_uuid")?
                .parse()
                .map_err(|e: kiln_core::Error| ApiError::bad_request(e.to_string()))?;
            if body::opt_str(&arg, "mode")?.is_some_and(|m| m != "rw") {
                return Err(ApiError::bad_request(
                    "kiln attaches volumes read-write only (mode 'rw')",
                ));
            }
            let device = body::req_str(&arg, "mountpoint")?;
            st.check_instance_for(&req, instance, &a).await?;
            st.service
                .attach(v.id, Attachment::new(instance, device))
                .await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        "os-detach" => {
            body::only_keys(&arg, &["attachment_id"], name)?;
            if let Some(att) = body::opt_str(&arg, "attachment_id")?
                && !v
                    .attachments
                    .iter()
                    .any(|x| views::attachment_id(&v, &x.instance_id).to_string() == att)
            {
                return Err(ApiError::not_found(format!(
                    "Attachment {att} could not be found."
                )));
            }
            st.service.detach(v.id).await?;
            crate::attachments::forget(&st, id, &a).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        "os-reset_status" => {
            require_admin(&req, name)?;
            body::only_keys(&arg, &["status", "attach_status", "migration_status"], name)?;
            let status: VolumeStatus = body::req_str(&arg, "status")?.parse()?;
            let reason = format!(
                "os-reset_status by {}",
                req.caller.user.as_deref().unwrap_or("admin")
            );
            st.service
                .reset_volume_state(v.id, status, Some(reason))
                .await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        "revert" if req.version.at_least(3, 40) => {
            body::only_keys(&arg, &["snapshot_id"], name)?;
            let (s, _) = st
                .snapshot(&req, &body::req_str(&arg, "snapshot_id")?)
                .await?;
            if s.volume_id != v.id {
                return Err(ApiError::bad_request(format!(
                    "Snapshot {} is not a snapshot of volume {}.",
                    s.id, v.id
                )));
            }
            let svc = st.service.clone();
            let sid: SnapshotId = s.id;
            st.launch(async move { svc.revert(sid, kiln_core::no_progress()).await })
                .await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        "os-initialize_connection" => {
            body::only_keys(&arg, &["connector"], name)?;
            let info = st.service.connection_info(v.id).await?;
            Ok(Json(json!({"connection_info": info})).into_response())
        }
        "os-set_bootable" => {
            body::only_keys(&arg, &["bootable"], name)?;
            let bootable = body::opt_bool(&arg, "bootable")?
                .ok_or_else(|| ApiError::bad_request("'bootable' is a required property."))?;
            st.service
                .update_attrs(ObjectKind::Volume, id.to_string(), |x| {
                    x.bootable = bootable;
                    Ok(())
                })
                .await?;
            Ok(StatusCode::OK.into_response())
        }
        "revert" => Err(ApiError::not_found(
            "revert requires microversion 3.40 or later",
        )),
        _ => Err(ApiError::bad_request(format!(
            "There is no such action: {name}"
        ))),
    }
}

/// Refuses `action` to a caller who is not an admin (403, as Cinder's policy does).
pub(crate) fn require_admin(req: &Req, action: &str) -> ApiResult<()> {
    if req.caller.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "Policy doesn't allow {action} to be performed."
        )))
    }
}
