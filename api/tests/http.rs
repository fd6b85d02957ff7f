//! The API in process, request by request through the real router, on a real SQLite store
//! and the file backend (qcow2 through real qemu-img): discovery, microversions, the bad
//! input battery (Cinder's error shape, the store unchanged), isolation, quotas under
//! concurrent creates, paging, metadata, deletes answering 404 afterwards.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_api::{ApiConfig, AuthMode, Shared, Tokens};
use kiln_core::attrs::{ObjectKind, QuotaLimits};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    app: Router,
    state: Shared,
    _dir: tempfile::TempDir,
}

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const ROOT: &str = "root-token-0123456789a";
/// A member of the project CLI-made objects belong to.
const DAVE: &str = "dave-token-0123456789a";

fn tokens() -> Tokens {
    Tokens::parse(&format!(
        "[[tokens]]\ntoken = \"{ALICE}\"\nuser = \"alice\"\nproject = \"pa\"\n\
         [[tokens]]\ntoken = \"{BOB}\"\nuser = \"bob\"\nproject = \"pb\"\n\
         [[tokens]]\ntoken = \"{ROOT}\"\nuser = \"root\"\nproject = \"admin\"\nroles = [\"admin\"]\n\
         [[tokens]]\ntoken = \"{DAVE}\"\nuser = \"dave\"\nproject = \"default\"\n"
    ))
    .expect("token file")
}

async fn api(auth: AuthMode, quotas: QuotaLimits) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = kiln_runtime::open(&kiln_runtime::Config::default(), dir.path())
        .await
        .expect("service");
    let config = ApiConfig {
        auth,
        quotas,
        ..ApiConfig::default()
    };
    let toks = if auth == AuthMode::Tokens {
        tokens()
    } else {
        Tokens::default()
    };
    let state = kiln_api::state(Arc::new(service), config, toks);
    Api {
        app: kiln_api::router(state.clone()),
        state,
        _dir: dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        version: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kiln.test");
        if let Some(t) = token {
            req = req.header("x-auth-token", t);
        }
        if let Some(v) = version {
            req = req.header("openstack-api-version", v);
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call(Method::GET, path, token, None, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &str) -> Answer {
        self.call(Method::POST, path, token, Some("volume 3.66"), Some(body))
            .await
    }

    /// Everything the store holds, every field: volumes, snapshots, attributes, usage.
    async fn dump(&self) -> Value {
        let svc = &self.state.service;
        let store = svc.store();
        let mut attrs = serde_json::Map::new();
        for k in [
            ObjectKind::Volume,
            ObjectKind::Snapshot,
            ObjectKind::Instance,
            ObjectKind::Image,
        ] {
            attrs.insert(
                k.as_str().into(),
                json!(store.attrs_of(k).await.expect("attrs")),
            );
        }
        json!({
            "volumes": svc.volumes().await.expect("volumes"),
            "snapshots": svc.snapshots(None).await.expect("snapshots"),
            "operations": store.operations().await.expect("operations"),
            "attrs": attrs,
            "usage": store.usage("default".into()).await.expect("usage"),
        })
    }
}

/// Cinder's error shape: one key naming the fault, whose `code` is the status.
fn assert_cinder_error(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status.as_u16(), status, "{what}: {}", a.body);
    let obj = a
        .body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {}", a.body));
    assert_eq!(obj.len(), 1, "{what}: {}", a.body);
    let (_, fault) = obj.iter().next().expect("one key");
    assert_eq!(fault["code"], json!(status), "{what}: {}", a.body);
    let msg = fault["message"].as_str().unwrap_or_default();
    assert!(
        !msg.is_empty() && !msg.contains('\n'),
        "{what}: message {msg:?}"
    );
}

#[tokio::test]
async fn discovery_needs_no_token_and_microversions_are_negotiated() {
    let a = api(AuthMode::Tokens, QuotaLimits::default()).await;
    let root = a.get("/", None).await;
    assert_eq!(root.status, StatusCode::MULTIPLE_CHOICES);
    assert_eq!(root.body["versions"][0]["version"], "3.66");
    assert_eq!(root.body["versions"][0]["min_version"], "3.0");
    for path in ["/v3", "/v3/"] {
        let v = a.get(path, None).await;
        assert_eq!(v.status, StatusCode::OK, "{path}");
        assert_eq!(v.body["versions"][0]["id"], "v3.0");
        assert_eq!(
            v.body["versions"][0]["links"][1]["href"],
            "http://kiln.test/v3/"
        );
        assert!(v.headers.contains_key("x-openstack-request-id"));
    }
    assert_cinder_error(&a.get("/v3/volumes", None).await, 401, "no token");
    assert_cinder_error(
        &a.get("/v3/volumes", Some("nope-nope-nope-nope")).await,
        401,
        "bad token",
    );
    let ok = a.get("/v3/volumes", Some(ALICE)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.headers["openstack-api-version"], "volume 3.0");
    assert!(
        ok.headers
            .get_all("vary")
            .iter()
            .any(|v| v == "OpenStack-API-Version")
    );
    let latest = a
        .call(
            Method::GET,
            "/v3/volumes",
            Some(ALICE),
            Some("volume latest"),
            None,
        )
        .await;
    assert_eq!(latest.headers["openstack-api-version"], "volume 3.66");
    let v = a
        .call(
            Method::GET,
            "/v3/volumes",
            Some(ALICE),
            Some("volume 3.67"),
            None,
        )
        .await;
    assert_cinder_error(&v, 406, "3.67");
    assert_eq!(v.headers["openstack-api-version"], "volume 3.0");
    assert_cinder_error(
        &a.call(
            Method::GET,
            "/v3/volumes",
            Some(ALICE),
            Some("volume 3.x"),
            None,
        )
        .await,
        400,
        "3.x",
    );
    // Routes with and without the project; another project's in the URL is 400.
    assert_eq!(
        a.get("/v3/pa/volumes/detail", Some(ALICE)).await.status,
        StatusCode::OK
    );
    assert_cinder_error(
        &a.get("/v3/pb/volumes", Some(ALICE)).await,
        400,
        "project mismatch",
    );
    assert_cinder_error(
        &a.get("/v3/nothing-here", Some(ALICE)).await,
        404,
        "unknown path",
    );
    assert_cinder_error(
        &a.call(Method::PATCH, "/v3/volumes", Some(ALICE), None, None)
            .await,
        405,
        "wrong method",
    );
}

#[tokio::test]
async fn bad_input_gets_cinders_error_shape_and_changes_nothing() {
    let a = api(AuthMode::NoAuth, QuotaLimits::default()).await;
    let made = a
        .post(
            "/v3/volumes",
            None,
            r#"{"volume": {"size": 1, "name": "keep"}}"#,
        )
        .await;
    assert_eq!(made.status, StatusCode::ACCEPTED, "{}", made.body);
    let vid = made.body["volume"]["id"].as_str().expect("id").to_string();
    let snap = a
        .post(
            "/v3/snapshots",
            None,
            &format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#),
        )
        .await;
    assert_eq!(snap.status, StatusCode::ACCEPTED, "{}", snap.body);
    let sid = snap.body["snapshot"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let before = a.dump().await;
    let big = format!(
        r#"{{"volume": {{"size": 1, "description": "{}"}}}}"#,
        "x".repeat(300 * 1024)
    );
    let vol_action = format!("/v3/volumes/{vid}/action");
    let cases: Vec<(Method, String, Option<String>, u16)> = vec![
        (Method::POST, "/v3/volumes".into(), Some("{not json".into()), 400),
        (Method::POST, "/v3/volumes".into(), Some("[]".into()), 400),
        (Method::POST, "/v3/volumes".into(), None, 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": "one"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": -1}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 0}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1.5}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 99999999999}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 18446744073709551615}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "colour": "red"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1}, "extra": 1}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "name": "a;rm -rf /"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "name": "../../etc"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "name": "-rf"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "name": 7}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "metadata": {"k": 1}}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "description": "a\nb"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "volume_type": "nope"}}"#.into()), 404),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"size": 1, "imageRef": "x"}}"#.into()), 400),
        (Method::POST, "/v3/volumes".into(), Some(r#"{"volume": {"snapshot_id": "../x"}}"#.into()), 404),
        (Method::POST, "/v3/volumes".into(), Some(big), 413),
        (Method::GET, "/v3/volumes/..%2F..%2Fetc%2Fpasswd".into(), None, 404),
        (Method::GET, "/v3/volumes/00000000-0000-0000-0000-000000000000".into(), None, 404),
        (Method::DELETE, "/v3/volumes/not-a-uuid".into(), None, 404),
        (Method::GET, "/v3/volumes?limit=many".into(), None, 400),
        (Method::GET, "/v3/volumes?marker=nope".into(), None, 400),
        (Method::PUT, format!("/v3/volumes/{vid}"), Some(r#"{"volume": {"name": "$(reboot)"}}"#.into()), 400),
        (Method::PUT, format!("/v3/volumes/{vid}"), Some(r#"{"volume": {"size": 2}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-extend": {"new_size": 2}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-attach": {}, "os-detach": {}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-attach": {"instance_uuid": "x", "mountpoint": "/dev/vdb"}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-attach": {"instance_uuid": "6f1c1a10-2a7e-4d07-9c1e-0d2a3b4c5d6e", "mountpoint": "/dev/../sda"}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-reset_status": {"status": "bogus"}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(r#"{"os-detach": {}}"#.into()), 400),
        (Method::POST, vol_action.clone(), Some(format!(r#"{{"revert": {{"snapshot_id": "{vid}"}}}}"#)), 404),
        (Method::POST, "/v3/snapshots".into(), Some(format!(r#"{{"snapshot": {{"volume_id": "{vid}", "force": "maybe"}}}}"#)), 400),
        (Method::POST, "/v3/snapshots".into(), Some(format!(r#"{{"snapshot": {{"volume_id": "{vid}", "force": false}}}}"#)), 400),
        (Method::POST, "/v3/snapshots".into(), Some(r#"{"snapshot": {"volume_id": "../../x"}}"#.into()), 404),
        (Method::POST, "/v3/snapshots".into(), Some(r#"{"snapshot": {}}"#.into()), 400),
        (Method::PUT, format!("/v3/snapshots/{sid}/metadata/k"), Some(r#"{"meta": {"other": "v"}}"#.into()), 400),
        (Method::DELETE, format!("/v3/snapshots/{sid}/metadata/absent"), None, 404),
        (Method::POST, format!("/v3/snapshots/{sid}/action"), Some(r#"{"os-reset_status": {"status": "lost"}}"#.into()), 400),
        (Method::DELETE, format!("/v3/volumes/{vid}"), None, 400),
    ];
    // Unknown and malformed microversions on a request that would create something.
    for (version, status) in [
        ("volume 3.99", 406),
        ("volume 2.0", 406),
        ("volume 3.x", 400),
        ("volume latest extra", 400),
    ] {
        let r = a
            .call(
                Method::POST,
                "/v3/volumes",
                None,
                Some(version),
                Some(r#"{"volume": {"size": 1}}"#),
            )
            .await;
        assert_cinder_error(&r, status, version);
        assert_eq!(a.dump().await, before, "{version} changed the store");
    }
    for (method, path, body, status) in cases {
        let what = format!(
            "{method} {path} {}",
            body.as_deref()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect::<String>()
        );
        let r = a
            .call(method, &path, None, Some("volume 3.66"), body.as_deref())
            .await;
        assert_cinder_error(&r, status, &what);
        assert_eq!(a.dump().await, before, "{what} changed the store");
    }
}

#[tokio::test]
async fn projects_are_isolated_and_admins_see_all_with_all_tenants() {
    let a = api(AuthMode::Tokens, QuotaLimits::default()).await;
    let v = a
        .post(
            "/v3/volumes",
            Some(ALICE),
            r#"{"volume": {"size": 1, "name": "mine"}}"#,
        )
        .await;
    let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
    assert_eq!(v.body["volume"]["os-vol-tenant-attr:tenant_id"], "pa");
    assert_eq!(v.body["volume"]["user_id"], "alice");
    let s = a
        .post(
            "/v3/snapshots",
            Some(ALICE),
            &format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#),
        )
        .await;
    let sid = s.body["snapshot"]["id"].as_str().expect("id").to_string();
    let before = a.dump().await;
    for (m, path, body) in [
        (Method::GET, format!("/v3/volumes/{vid}"), None),
        (
            Method::PUT,
            format!("/v3/volumes/{vid}"),
            Some(r#"{"volume": {"name": "theirs"}}"#.to_string()),
        ),
        (Method::DELETE, format!("/v3/volumes/{vid}"), None),
        (Method::GET, format!("/v3/volumes/{vid}/metadata"), None),
        (
            Method::POST,
            "/v3/snapshots".to_string(),
            Some(format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#)),
        ),
        (Method::GET, format!("/v3/snapshots/{sid}"), None),
        (Method::DELETE, format!("/v3/snapshots/{sid}"), None),
        (
            Method::POST,
            format!("/v3/volumes/{vid}/action"),
            Some(format!(r#"{{"revert": {{"snapshot_id": "{sid}"}}}}"#)),
        ),
        (
            Method::POST,
            "/v3/volumes".to_string(),
            Some(format!(r#"{{"volume": {{"snapshot_id": "{sid}"}}}}"#)),
        ),
    ] {
        let r = a
            .call(
                m.clone(),
                &path,
                Some(BOB),
                Some("volume 3.66"),
                body.as_deref(),
            )
            .await;
        assert_cinder_error(&r, 404, &format!("bob {m} {path}"));
    }
    assert_eq!(a.dump().await, before, "bob changed alice's objects");
    let r = a
        .call(
            Method::POST,
            &format!("/v3/snapshots/{sid}/action"),
            Some(ALICE),
            None,
            Some(r#"{"os-reset_status": {"status": "error"}}"#),
        )
        .await;
    assert_cinder_error(&r, 403, "reset by a member");
    assert_eq!(
        a.get("/v3/volumes", Some(BOB)).await.body["volumes"],
        json!([])
    );
    assert_eq!(
        a.get("/v3/volumes", Some(ROOT)).await.body["volumes"],
        json!([])
    );
    let all = a.get("/v3/volumes?all_tenants=1", Some(ROOT)).await;
    assert_eq!(all.body["volumes"][0]["id"], json!(vid));
    // Members asking all_tenants see their own only.
    assert_eq!(
        a.get("/v3/volumes?all_tenants=1", Some(BOB)).await.body["volumes"],
        json!([])
    );
    assert_eq!(
        a.get(&format!("/v3/volumes/{vid}"), Some(ROOT))
            .await
            .status,
        StatusCode::OK
    );
}

/// 16 creates at once against a quota of 5 volumes: exactly 5 land. Nothing serializes
/// them before the store: each creation locks only its own new volume, so the quota guard
/// in the inserting transaction is what holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_holds_under_concurrent_creates() {
    let quotas = QuotaLimits {
        volumes: Some(5),
        snapshots: Some(1),
        gigabytes: None,
    };
    let a = Arc::new(api(AuthMode::Tokens, quotas).await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            a.post(
                "/v3/volumes",
                Some(ALICE),
                &format!(r#"{{"volume": {{"size": 1, "name": "q{i}"}}}}"#),
            )
            .await
        }));
    }
    let mut created = 0;
    let mut over = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::ACCEPTED => created += 1,
            StatusCode::PAYLOAD_TOO_LARGE => {
                assert_cinder_error(&r, 413, "over quota");
                assert!(
                    r.body["overLimit"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("volumes")
                );
                over += 1;
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    assert_eq!((created, over), (5, 11));
    assert_eq!(a.state.service.volumes().await.expect("volumes").len(), 5);
    let limits = a.get("/v3/limits", Some(ALICE)).await;
    assert_eq!(limits.body["limits"]["absolute"]["totalVolumesUsed"], 5);
    assert_eq!(limits.body["limits"]["absolute"]["maxTotalVolumes"], 5);
    assert_eq!(
        limits.body["limits"]["absolute"]["maxTotalVolumeGigabytes"],
        -1
    );
    // Bob's project has its own quota.
    let b = a
        .post("/v3/volumes", Some(BOB), r#"{"volume": {"size": 1}}"#)
        .await;
    assert_eq!(b.status, StatusCode::ACCEPTED);
    let vid = b.body["volume"]["id"].as_str().expect("id").to_string();
    let s1 = a
        .post(
            "/v3/snapshots",
            Some(BOB),
            &format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#),
        )
        .await;
    assert_eq!(s1.status, StatusCode::ACCEPTED);
    let s2 = a
        .post(
            "/v3/snapshots",
            Some(BOB),
            &format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#),
        )
        .await;
    assert_cinder_error(&s2, 413, "snapshot quota");
}

#[tokio::test]
async fn lists_page_by_marker_and_filter_by_name_and_status() {
    let a = api(AuthMode::NoAuth, QuotaLimits::default()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = a
            .post(
                "/v3/volumes",
                None,
                &format!(r#"{{"volume": {{"size": 1, "name": "p{i}"}}}}"#),
            )
            .await;
        ids.push(r.body["volume"]["id"].as_str().expect("id").to_string());
    }
    ids.reverse(); // newest first, as Cinder sorts
    let mut seen = Vec::new();
    let mut next = Some("/v3/volumes/detail?limit=2".to_string());
    while let Some(url) = next {
        let path = url
            .trim_start_matches("http://kiln.test")
            .trim_start_matches("/v3/default")
            .to_string();
        let path = if path.starts_with("/v3") {
            path
        } else {
            format!("/v3{path}")
        };
        let r = a.get(&path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        for v in r.body["volumes"].as_array().expect("list") {
            seen.push(v["id"].as_str().expect("id").to_string());
        }
        next = r.body["volumes_links"][0]["href"]
            .as_str()
            .map(str::to_string);
    }
    assert_eq!(seen, ids);
    let named = a.get("/v3/volumes/detail?name=p3", None).await;
    assert_eq!(named.body["volumes"].as_array().map(Vec::len), Some(1));
    assert_eq!(named.body["volumes"][0]["name"], "p3");
    assert_eq!(
        a.get("/v3/volumes?status=error", None).await.body["volumes"],
        json!([])
    );
    let summary = a.get("/v3/volumes?limit=1", None).await;
    assert_eq!(
        summary.body["volumes"][0].as_object().map(|o| o.len()),
        Some(3),
        "id, name, links"
    );
}

#[tokio::test]
async fn metadata_crud_and_deletes_answer_404_afterwards() {
    let a = api(AuthMode::NoAuth, QuotaLimits::default()).await;
    let v = a
        .post(
            "/v3/volumes",
            None,
            r#"{"volume": {"size": 1, "metadata": {"a": "1"}}}"#,
        )
        .await;
    let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
    let base = format!("/v3/volumes/{vid}/metadata");
    let r = a.post(&base, None, r#"{"metadata": {"b": "2"}}"#).await;
    assert_eq!(r.body["metadata"], json!({"a": "1", "b": "2"}));
    let r = a
        .call(
            Method::PUT,
            &base,
            None,
            None,
            Some(r#"{"metadata": {"c": "3"}}"#),
        )
        .await;
    assert_eq!(r.body["metadata"], json!({"c": "3"}));
    let r = a
        .call(
            Method::PUT,
            &format!("{base}/d"),
            None,
            None,
            Some(r#"{"meta": {"d": "4"}}"#),
        )
        .await;
    assert_eq!(r.body["meta"], json!({"d": "4"}));
    assert_eq!(
        a.get(&format!("{base}/d"), None).await.body["meta"],
        json!({"d": "4"})
    );
    assert_eq!(
        a.call(Method::DELETE, &format!("{base}/c"), None, None, None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(a.get(&base, None).await.body["metadata"], json!({"d": "4"}));
    assert_eq!(
        a.get(&format!("/v3/volumes/{vid}"), None).await.body["volume"]["metadata"],
        json!({"d": "4"})
    );

    let s = a
        .post(
            "/v3/snapshots",
            None,
            &format!(
                r#"{{"snapshot": {{"volume_id": "{vid}", "name": "s", "metadata": {{"x": "y"}}}}}}"#
            ),
        )
        .await;
    let sid = s.body["snapshot"]["id"].as_str().expect("id").to_string();
    assert_eq!(s.body["snapshot"]["status"], "available");
    assert_eq!(s.body["snapshot"]["metadata"], json!({"x": "y"}));
    let d = a
        .call(
            Method::DELETE,
            &format!("/v3/snapshots/{sid}"),
            None,
            None,
            None,
        )
        .await;
    assert_eq!(d.status, StatusCode::ACCEPTED);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while a.get(&format!("/v3/snapshots/{sid}"), None).await.status != StatusCode::NOT_FOUND {
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot never went away"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.call(
            Method::DELETE,
            &format!("/v3/volumes/{vid}"),
            None,
            None,
            None
        )
        .await
        .status,
        StatusCode::ACCEPTED
    );
    while a.get(&format!("/v3/volumes/{vid}"), None).await.status != StatusCode::NOT_FOUND {
        assert!(
            std::time::Instant::now() < deadline,
            "volume never went away"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let dump = a.dump().await;
    assert_eq!(
        dump["attrs"]["volume"],
        json!({}),
        "attributes go with their volume"
    );
    assert_eq!(dump["attrs"]["snapshot"], json!({}));
}

/// The shipped samples parse: etc/kiln.toml's [api] section and etc/kiln-tokens.toml.
#[test]
fn shipped_samples_parse() {
    let etc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc");
    let cfg = kiln_runtime::Config::load(&etc.join("kiln.toml")).expect("etc/kiln.toml");
    let api = ApiConfig::from_table(cfg.api.as_ref()).expect("[api]");
    assert_eq!(api.auth, AuthMode::NoAuth);
    assert_eq!(
        api.listen_addr(None).ok(),
        "127.0.0.1:8776".parse::<std::net::SocketAddr>().ok()
    );
    let tokens = Tokens::load(&etc.join("kiln-tokens.toml")).expect("etc/kiln-tokens.toml");
    assert!(
        tokens
            .get("replace-with-a-long-random-secret-2")
            .is_some_and(|i| i.admin)
    );
}

/// Nova's createImage over two attached raw+reflink volumes on a real XFS: at 2.45 the body
/// names the image, before it a Location header does; the image exists at once, Glance
/// serves it with its block_device_mapping, another project gets 404 for the server and
/// the image, and deleting the image removes its snapshots.
#[tokio::test]
async fn create_image_records_a_glance_image_of_every_attached_volume() {
    let xfs = kiln_testkit::XfsMount::new(1 << 30);
    let dir = tempfile::tempdir().expect("tempdir");
    let config: kiln_runtime::Config = toml::from_str(&format!(
        "[backends.raw]\ndriver = \"file\"\npath = \"{}\"\nformat = \"raw\"\n",
        xfs.path().join("vols").display()
    ))
    .expect("config");
    let service = Arc::new(
        kiln_runtime::open(&config, dir.path())
            .await
            .expect("service"),
    );
    let state = kiln_api::state(
        service.clone(),
        ApiConfig {
            auth: AuthMode::Tokens,
            ..ApiConfig::default()
        },
        tokens(),
    );
    let a = Api {
        app: kiln_api::router(state.clone()),
        state,
        _dir: dir,
    };
    let inst = service
        .create_instance(kiln_core::service::InstanceSpec {
            project: Some("pa".into()),
            id: None,
            name: Some("srv1".into()),
            agent: None,
            qmp: None,
            freeze_mountpoints: vec![],
            root_device: Some("/dev/vda".into()),
            properties: Default::default(),
        })
        .await
        .expect("instance");

    for dev in ["/dev/vda", "/dev/vdb"] {
        let v = a
            .post("/v3/volumes", Some(ALICE), r#"{"volume": {"size": 1}}"#)
            .await;
        let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
        let body = format!(
            r#"{{"os-attach": {{"instance_uuid": "{}", "mountpoint": "{dev}"}}}}"#,
            inst.id
        );
        assert_eq!(
            a.post(&format!("/v3/volumes/{vid}/action"), Some(ALICE), &body)
                .await
                .status,
            StatusCode::ACCEPTED
        );
    }
    // Bob cannot attach his volume to alice's server (it is not his to see).
    let bv = a
        .post("/v3/volumes", Some(BOB), r#"{"volume": {"size": 1}}"#)
        .await;
    let bvid = bv.body["volume"]["id"].as_str().expect("id").to_string();
    let body = format!(
        r#"{{"os-attach": {{"instance_uuid": "{}", "mountpoint": "/dev/vdc"}}}}"#,
        inst.id
    );
    assert_cinder_error(
        &a.post(&format!("/v3/volumes/{bvid}/action"), Some(BOB), &body)
            .await,
        404,
        "bob attaches to alice's server",
    );
    let body = format!(
        r#"{{"attachment": {{"volume_uuid": "{bvid}", "instance_uuid": "{}", "connector": {{}}}}}}"#,
        inst.id
    );
    let r = a
        .call(
            Method::POST,
            "/v3/attachments",
            Some(BOB),
            Some("volume 3.27"),
            Some(&body),
        )
        .await;
    assert_cinder_error(&r, 404, "bob reserves on alice's server");
    let nova = |v: &'static str| Some(v);
    let sid = inst.id.to_string();
    let show = a
        .call(
            Method::GET,
            &format!("/compute/v2.1/servers/{sid}"),
            Some(ALICE),
            nova("compute 2.45"),
            None,
        )
        .await;
    assert_eq!(show.status, StatusCode::OK, "{}", show.body);
    assert_eq!(show.headers["openstack-api-version"], "compute 2.45");
    assert_eq!(show.headers["x-openstack-nova-api-version"], "2.45");
    assert_eq!(
        show.body["server"]["os-extended-volumes:volumes_attached"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let by_name = a
        .call(
            Method::GET,
            "/compute/v2.1/servers/detail?name=srv1",
            Some(ALICE),
            None,
            None,
        )
        .await;
    assert_eq!(by_name.body["servers"][0]["id"], json!(sid));
    assert_cinder_error(
        &a.get(&format!("/compute/v2.1/servers/{sid}"), Some(BOB))
            .await,
        404,
        "bob's server view",
    );
    let act = format!("/compute/v2.1/servers/{sid}/action");
    let body = r#"{"createImage": {"name": "img1", "metadata": {"purpose": "test"}}}"#;
    assert_cinder_error(
        &a.call(
            Method::POST,
            &act,
            Some(BOB),
            nova("compute 2.45"),
            Some(body),
        )
        .await,
        404,
        "bob's createImage",
    );
    assert_cinder_error(
        &a.call(
            Method::POST,
            &act,
            Some(ALICE),
            nova("compute 2.45"),
            Some(r#"{"createImage": {"name": "x", "extra": 1}}"#),
        )
        .await,
        400,
        "unknown key",
    );
    let made = a
        .call(
            Method::POST,
            &act,
            Some(ALICE),
            nova("compute 2.45"),
            Some(body),
        )
        .await;
    assert_eq!(made.status, StatusCode::ACCEPTED, "{}", made.body);
    let img = made.body["image_id"]
        .as_str()
        .expect("image_id")
        .to_string();
    let old = a
        .call(
            Method::POST,
            &act,
            Some(ALICE),
            nova("compute 2.1"),
            Some(r#"{"createImage": {"name": "img2"}}"#),
        )
        .await;
    assert_eq!(old.status, StatusCode::ACCEPTED);
    let location = old.headers["location"].to_str().expect("ascii").to_string();
    assert!(
        location.starts_with("http://kiln.test/image/v2/images/"),
        "{location}"
    );

    let g = a.get(&format!("/image/v2/images/{img}"), Some(ALICE)).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(
        (
            g.body["status"].clone(),
            g.body["size"].clone(),
            g.body["owner"].clone()
        ),
        (json!("active"), json!(0), json!("pa"))
    );
    assert_eq!(g.body["purpose"], "test");
    let bdm: Value =
        serde_json::from_str(g.body["block_device_mapping"].as_str().expect("bdm")).expect("json");
    assert_eq!(bdm.as_array().map(Vec::len), Some(2));
    assert!(
        !g.headers.contains_key("openstack-api-version"),
        "Glance has no microversions"
    );
    assert_cinder_error(
        &a.get(&format!("/image/v2/images/{img}"), Some(BOB)).await,
        404,
        "bob's image",
    );
    assert_eq!(
        a.get("/image/v2/images", Some(BOB)).await.body["images"],
        json!([])
    );
    assert_eq!(
        a.get("/image/v2/images?name=img1", Some(ALICE)).await.body["images"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Its snapshots belong to alice's project too.
    let snaps = a.get("/v3/snapshots", Some(ALICE)).await;
    assert_eq!(snaps.body["snapshots"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        a.call(
            Method::DELETE,
            &format!("/image/v2/images/{img}"),
            Some(ALICE),
            None,
            None
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while a
        .get(&format!("/image/v2/images/{img}"), Some(ALICE))
        .await
        .status
        != StatusCode::NOT_FOUND
    {
        assert!(
            std::time::Instant::now() < deadline,
            "image never went away"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.get("/v3/snapshots", Some(ALICE)).await.body["snapshots"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    for path in ["/compute", "/compute/v2.1/", "/image", "/image/versions"] {
        let d = a.get(path, None).await;
        assert!(
            d.status.is_success() || d.status == StatusCode::MULTIPLE_CHOICES,
            "{path}: {}",
            d.status
        );
    }
    assert_eq!(
        a.get("/compute/v2.1/", None).await.body["version"]["version"],
        "2.45"
    );
    drop(xfs);
}

/// The attachments API: gated by microversion, a reservation shows the volume `reserved`,
/// a connector makes it `attaching` with connection info, `os-complete` (3.44) attaches,
/// another project gets 404, delete detaches.
#[tokio::test]
async fn attachments_follow_cinders_lifecycle() {
    let a = api(AuthMode::Tokens, QuotaLimits::default()).await;
    let v = a
        .post("/v3/volumes", Some(ALICE), r#"{"volume": {"size": 1}}"#)
        .await;
    let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
    let inst = "6f1c1a10-2a7e-4d07-9c1e-0d2a3b4c5d6e";
    let body = format!(
        r#"{{"attachment": {{"volume_uuid": "{vid}", "instance_uuid": "{inst}", "connector": {{}}}}}}"#
    );
    let at = |v: &'static str| Some(v);
    assert_cinder_error(
        &a.call(
            Method::POST,
            "/v3/attachments",
            Some(ALICE),
            at("volume 3.26"),
            Some(&body),
        )
        .await,
        404,
        "below 3.27",
    );
    assert_cinder_error(
        &a.call(
            Method::POST,
            "/v3/attachments",
            Some(BOB),
            at("volume 3.27"),
            Some(&body),
        )
        .await,
        404,
        "bob's volume",
    );
    let r = a
        .call(
            Method::POST,
            "/v3/attachments",
            Some(ALICE),
            at("volume 3.27"),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["attachment"]["status"], "reserved");
    assert_eq!(r.body["attachment"]["connection_info"], Value::Null);
    let att = r.body["attachment"]["id"].as_str().expect("id").to_string();
    assert_eq!(
        a.get(&format!("/v3/volumes/{vid}"), Some(ALICE)).await.body["volume"]["status"],
        "reserved"
    );
    let path = format!("/v3/attachments/{att}");
    assert_cinder_error(
        &a.call(Method::GET, &path, Some(BOB), at("volume 3.27"), None)
            .await,
        404,
        "bob's attachment",
    );
    let upd = a
        .call(
            Method::PUT,
            &path,
            Some(ALICE),
            at("volume 3.27"),
            Some(r#"{"attachment": {"connector": {"host": "h1"}}}"#),
        )
        .await;
    assert_eq!(
        upd.body["attachment"]["status"], "attaching",
        "{}",
        upd.body
    );
    assert_eq!(
        upd.body["attachment"]["connection_info"]["driver_volume_type"],
        "file"
    );
    assert_eq!(
        a.get(&format!("/v3/volumes/{vid}"), Some(ALICE)).await.body["volume"]["status"],
        "attaching"
    );
    let done = format!("{path}/action");
    assert_cinder_error(
        &a.call(
            Method::POST,
            &done,
            Some(ALICE),
            at("volume 3.43"),
            Some(r#"{"os-complete": null}"#),
        )
        .await,
        404,
        "os-complete below 3.44",
    );
    assert_eq!(
        a.call(
            Method::POST,
            &done,
            Some(ALICE),
            at("volume 3.44"),
            Some(r#"{"os-complete": null}"#)
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        a.call(Method::GET, &path, Some(ALICE), at("volume 3.27"), None)
            .await
            .body["attachment"]["status"],
        "attached"
    );
    let vol = a.get(&format!("/v3/volumes/{vid}"), Some(ALICE)).await;
    assert_eq!(vol.body["volume"]["status"], "in-use");
    assert_eq!(
        vol.body["volume"]["attachments"][0]["attachment_id"],
        json!(att)
    );
    let list = a
        .call(
            Method::GET,
            "/v3/attachments",
            Some(ALICE),
            at("volume 3.27"),
            None,
        )
        .await;
    assert_eq!(list.body["attachments"][0]["id"], json!(att));
    assert_eq!(
        a.call(
            Method::GET,
            "/v3/attachments",
            Some(BOB),
            at("volume 3.27"),
            None
        )
        .await
        .body["attachments"],
        json!([])
    );
    assert_eq!(
        a.call(Method::DELETE, &path, Some(ALICE), at("volume 3.27"), None)
            .await
            .status,
        StatusCode::OK
    );
    let vol = a.get(&format!("/v3/volumes/{vid}"), Some(ALICE)).await;
    assert_eq!(
        (
            vol.body["volume"]["status"].clone(),
            vol.body["volume"]["attachments"].clone()
        ),
        (json!("available"), json!([]))
    );
    assert_eq!(
        a.state.service.attrs(vid).await.expect("attrs").extra.len(),
        0,
        "the lifecycle is forgotten"
    );
}

/// Found in review: ids were parsed leniently (upper case, no hyphens) while the project
/// lookup used the raw text, so another spelling found the object without its project
/// and handed it to the default project. Only the canonical spelling finds an object.
#[tokio::test]
async fn other_spellings_of_an_id_find_nothing() {
    let a = api(AuthMode::Tokens, QuotaLimits::default()).await;
    let v = a
        .post("/v3/volumes", Some(ALICE), r#"{"volume": {"size": 1}}"#)
        .await;
    let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
    let s = a
        .post(
            "/v3/snapshots",
            Some(ALICE),
            &format!(r#"{{"snapshot": {{"volume_id": "{vid}"}}}}"#),
        )
        .await;
    let sid = s.body["snapshot"]["id"].as_str().expect("id").to_string();
    let before = a.dump().await;
    for id in [
        vid.to_uppercase(),
        vid.replace('-', ""),
        format!("{{{vid}}}"),
        format!("urn:uuid:{vid}"),
    ] {
        for token in [DAVE, ALICE] {
            assert_cinder_error(
                &a.get(&format!("/v3/volumes/{id}"), Some(token)).await,
                404,
                &id,
            );
            let d = a
                .call(
                    Method::DELETE,
                    &format!("/v3/volumes/{id}"),
                    Some(token),
                    None,
                    None,
                )
                .await;
            assert_cinder_error(&d, 404, &id);
        }
        let body = format!(r#"{{"snapshot": {{"volume_id": "{id}"}}}}"#);
        assert_cinder_error(&a.post("/v3/snapshots", Some(DAVE), &body).await, 404, &id);
    }
    let clone = format!(
        r#"{{"volume": {{"snapshot_id": "{}"}}}}"#,
        sid.to_uppercase()
    );
    assert_cinder_error(
        &a.post("/v3/volumes", Some(DAVE), &clone).await,
        404,
        "clone by another spelling",
    );
    assert_eq!(a.dump().await, before);
    assert_cinder_error(
        &a.get(&format!("/v3/volumes/{vid}"), Some(DAVE)).await,
        404,
        "dave",
    );
}

/// 16 metadata updates at once, each adding its own key: every key is kept (the
/// read-modify-write retries instead of overwriting a concurrent one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_metadata_updates_are_all_kept() {
    let a = Arc::new(api(AuthMode::NoAuth, QuotaLimits::default()).await);
    let v = a
        .post("/v3/volumes", None, r#"{"volume": {"size": 1}}"#)
        .await;
    let vid = v.body["volume"]["id"].as_str().expect("id").to_string();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (a, vid) = (a.clone(), vid.clone());
        tasks.push(tokio::spawn(async move {
            a.post(
                &format!("/v3/volumes/{vid}/metadata"),
                None,
                &format!(r#"{{"metadata": {{"k{i}": "v{i}"}}}}"#),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    let md = a.get(&format!("/v3/volumes/{vid}/metadata"), None).await;
    assert_eq!(
        md.body["metadata"].as_object().map(|m| m.len()),
        Some(16),
        "{}",
        md.body
    );
}
