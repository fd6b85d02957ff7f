//! Several kiln nodes on one PostgreSQL and one Ceph cluster: three real `kiln serve`
//! processes (each its own node name, data directory and port) share a throw-away
//! PostgreSQL (store and locks) and a pool of the test cluster (`CEPH_CONF`, set by
//! tests/harness/rbd-suite.sh). The tests drive them through the REST API and check the
//! shared state against Ceph itself:
//!
//! - 32 clients spread over the three nodes create and delete snapshots of the same 8
//!   volumes: nothing lost, nothing duplicated, every status final, store == Ceph;
//! - one node is SIGKILLed while snapshot creates, deletes, a revert and an instance
//!   snapshot are in flight on it (held by fail points): the other nodes finish or roll back
//!   each one, and the time each took is measured;
//! - PostgreSQL restarts under load: nothing stays in a transitional status; restarted under
//!   an operation in flight, it lets no other node run beside that operation;
//! - a real network cut (a veth link into a network namespace, taken down) between one node
//!   and PostgreSQL: the node fences itself, another finishes its work;
//! - the survivors blocklist a dead node's Ceph client before taking its work over.
//!
//! Needs the binary built with `rbd,failpoints`, root (the server runs as `postgres`), and
//! Debian's postgresql (tests/install-deps.sh).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_testpg::{Options, PgServer};
use serde_json::{Value, json};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Seconds after its last heartbeat that a node counts as dead (fences itself after a
/// third of it): short, so takeovers are quick, yet longer than a PostgreSQL restart here.
const NODE_TIMEOUT_SECS: u64 = 9;
/// Hang guard for anything the tests wait for (not a performance target).
const LIMIT: Duration = Duration::from_secs(180);

/// Fail points that stop an operation in flight on the victim node (see
/// `kiln_core::crash::crash_point_async`): after the snapshot exists on Ceph, before a
/// snapshot delete reaches Ceph, after a revert's rollback, after an instance snapshot's
/// member snapshots were cut.
const HANG: &str = "create_snapshot::after_driver=return(hang);delete_snapshot::before_driver=return(hang);revert::after_driver=return(hang);instance_snapshot::after_members=return(hang)";

/// The multi-node tests share the machine's two cores with Ceph and PostgreSQL: one at a
/// time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    name: String,
    port: u16,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    pg: PgServer,
    url: String,
    pool: String,
    nodes: Vec<Node>,
    http: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The child `cmd` starts gets SIGKILL when this test process dies: a failed test never
/// leaves a node or a relay running.
fn die_with_test(cmd: &mut Command) {
    // SAFETY: prctl only sets the child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One kiln command as `node` (its config, data directory and name, no fail points),
/// which must succeed.
fn kiln_ok(node: &Node, args: &[&str]) {
    let out = Command::new(KILN)
        .arg("--config")
        .arg(&node.config)
        .arg("--data-dir")
        .arg(&node.data)
        .args(args)
        .env("KILN_NODE", &node.name)
        .env_remove("FAILPOINTS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ceph(args: &[&str]) -> String {
    let conf = common::rbd::ceph_conf();
    let out = Command::new("ceph")
        .arg("-c")
        .arg(&conf)
        .args(["--connect-timeout", "30"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Cluster {
    /// PostgreSQL, a pool of its own, `kiln store migrate`, and `n` nodes (not started).
    fn new(n: usize) -> Cluster {
        Cluster::with(n, Options::default())
    }

    /// Three started nodes and `n` volumes named `<prefix>-<i>`, made through each node in
    /// turn.
    async fn serving(n: usize, prefix: &str) -> (Arc<Cluster>, Vec<String>) {
        let c = Cluster::new(3);
        for i in 0..3 {
            c.start(i, None).await;
        }
        let mut volumes = Vec::new();
        for i in 0..n {
            volumes.push(c.volume(i % 3, &format!("{prefix}-{i}")).await);
        }
        (Arc::new(c), volumes)
    }

    /// [`Cluster::new`] with a server started with `options`.
    fn with(n: usize, options: Options) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pg = PgServer::start(options);
        let url = pg.create_database();
        let pool = format!("kiln-mn-{}", common::unique_token());
        ceph(&["osd", "pool", "create", &pool, "8"]);
        common::rbd::rbd(&["pool", "init", &pool]);
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let port = free_port();
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[store]\nurl = {url:?}\nnode_timeout_secs = {NODE_TIMEOUT_SECS}\nrecovery_interval_secs = 1\n\n[api]\nlisten = \"127.0.0.1:{port}\"\n\n[backends.ceph]\ndriver = \"rbd\"\nceph_conf = {:?}\npool = {pool:?}\n",
                    common::rbd::ceph_conf()
                ),
            )
            .unwrap();
            nodes.push(Node {
                data: dir.path().join(&name),
                log: dir.path().join(format!("{name}.log")),
                name,
                port,
                config,
                child: std::sync::Mutex::new(None),
            });
        }
        kiln_ok(&nodes[0], &["store", "migrate"]);
        Cluster {
            _dir: dir,
            pg,
            url,
            pool,
            nodes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// Starts node `i` (with `failpoints`, if any) and waits until it answers.
    async fn start(&self, i: usize, failpoints: Option<&str>) {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let mut c = Command::new(KILN);
        c.arg("--config")
            .arg(&node.config)
            .arg("--data-dir")
            .arg(&node.data)
            .args(["--log-format", "json", "serve"])
            .env("KILN_NODE", &node.name)
            .env("KILN_LOG", "info")
            .env_remove("KILN_STORE_URL")
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        match failpoints {
            Some(f) => c.env("FAILPOINTS", f),
            None => c.env_remove("FAILPOINTS"),
        };
        die_with_test(&mut c);
        *node.child.lock().unwrap() = Some(c.spawn().unwrap());
        let health = format!("http://127.0.0.1:{}/healthcheck", node.port);
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Ok(r) = self.http.get(&health).send().await
                && r.status().is_success()
            {
                return;
            }
            if !self.alive(i) {
                panic!(
                    "node {} exited at start: {}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} never answered",
                self.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, as a crash would.
    fn kill(&self, i: usize) {
        let child = self.nodes[i].child.lock().unwrap().take();
        if let Some(mut c) = child {
            // It may have exited already (a fenced node).
            let _ = c.kill();
            c.wait().unwrap();
        }
    }

    /// Node `i`'s process id.
    fn pid(&self, i: usize) -> libc::pid_t {
        let child = self.nodes[i].child.lock().unwrap();
        child.as_ref().map(|c| c.id() as libc::pid_t).unwrap()
    }

    /// Waits (bounded) until node `i` exits; returns its exit status.
    async fn exited(&self, i: usize) -> std::process::ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(st) = self.nodes[i]
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().unwrap())
            {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not exit",
                self.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether node `i` was started and has not exited.
    fn alive(&self, i: usize) -> bool {
        self.nodes[i]
            .child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// One Cinder (or, for `/compute` paths, Nova) request to node `i`.
    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let mut r = self
            .http
            .request(
                method,
                format!("http://127.0.0.1:{}{path}", self.nodes[i].port),
            )
            .header("OpenStack-API-Version", "volume 3.66")
            .header("X-OpenStack-Nova-API-Version", "2.45");
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.map_err(|e| format!("http: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("http: {e}"))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn ok(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let (st, v) = self.call(i, method.clone(), path, body).await.unwrap();
        assert!(
            (200..300).contains(&st),
            "{method} {path} on node {i}: {st} {v}"
        );
        v
    }

    async fn volume(&self, i: usize, name: &str) -> String {
        let v = self
            .ok(
                i,
                reqwest::Method::POST,
                "/v3/volumes",
                Some(json!({"volume": {"size": 1, "name": name}})),
            )
            .await;
        let id = v["volume"]["id"].as_str().unwrap().to_string();
        let q = format!("SELECT status FROM volumes WHERE id = '{id}'");
        self.until(async |c: &Cluster| {
            c.sql(&q).await.first().is_some_and(|r| r[0] == "available")
        })
        .await;
        id
    }

    async fn snapshot(&self, i: usize, volume: &str) -> String {
        let v = self
            .ok(
                i,
                reqwest::Method::POST,
                "/v3/snapshots",
                Some(json!({"snapshot": {"volume_id": volume, "force": true}})),
            )
            .await;
        v["snapshot"]["id"].as_str().unwrap().to_string()
    }

    /// A snapshot of `volume` created through node `a` and deleted through node `b`; then
    /// nothing is left in flight and the store equals Ceph.
    async fn still_serving(&self, a: usize, b: usize, volume: &str) {
        let s = self.snapshot(a, volume).await;
        self.ok(
            b,
            reqwest::Method::DELETE,
            &format!("/v3/snapshots/{s}"),
            None,
        )
        .await;
        self.settled().await;
        self.assert_store_matches_ceph().await;
    }

    /// Node `i` reaches PostgreSQL at `url` instead (restart it to take effect).
    fn set_store_url(&self, i: usize, url: &str) {
        let config = &self.nodes[i].config;
        let text = std::fs::read_to_string(config).unwrap();
        let text = text.replace(&format!("url = {:?}", self.url), &format!("url = {url:?}"));
        std::fs::write(config, text).unwrap();
    }

    /// Starts a snapshot create of `volume` on node `i` (started with [`HANG`]) and returns
    /// once its Ceph snapshot exists and the fail point holds it, journaled.
    async fn snapshot_held_in_flight(self: &Arc<Self>, i: usize, volume: &str) {
        {
            let (c, v) = (self.clone(), volume.to_string());
            tokio::spawn(async move {
                let body = json!({"snapshot": {"volume_id": v, "force": true}});
                let _ = c
                    .call(i, reqwest::Method::POST, "/v3/snapshots", Some(body))
                    .await;
            });
        }
        let q = format!(
            "SELECT count(*) FROM operations WHERE owner LIKE '{}:%'",
            self.nodes[i].name
        );
        self.until(async |c: &Cluster| c.sql(&q).await[0][0] == "1")
            .await;
        // Let the snapshot reach Ceph (the fail point holds the operation after the driver).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// The snapshot create held in flight on `volume` by a node that went away was
    /// finished by node `i`: one snapshot, available, and store == Ceph.
    async fn finished_by(&self, i: usize, volume: &str) {
        let snaps = self
            .sql(&format!(
                "SELECT status FROM snapshots WHERE volume_id = '{volume}'"
            ))
            .await;
        assert_eq!(snaps, vec![vec!["available".to_string()]]);
        assert!(
            self.log(i).contains("recovered an unfinished operation"),
            "{}",
            self.log(i)
        );
        self.assert_store_matches_ceph().await;
    }

    /// Rows of a query on the shared store, every column as text.
    async fn sql(&self, query: &str) -> Vec<Vec<String>> {
        self.try_sql(query).await.unwrap()
    }

    /// [`Cluster::sql`], or the error (the server may be restarting).
    async fn try_sql(&self, query: &str) -> Result<Vec<Vec<String>>, postgres::Error> {
        let (url, query) = (self.url.clone(), query.to_string());
        tokio::task::spawn_blocking(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
            Ok(c.simple_query(&query)?
                .into_iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or("").to_string())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect())
        })
        .await
        .unwrap()
    }

    /// Waits (bounded) until `cond` holds.
    async fn until(&self, cond: impl AsyncFn(&Cluster) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !cond(self).await {
            assert!(
                Instant::now() < deadline,
                "condition not reached within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no operation is journaled and no volume or snapshot is in a
    /// transitional status.
    async fn settled(&self) {
        self.until(async |c: &Cluster| {
            c.sql("SELECT count(*) FROM operations").await[0][0] == "0"
                && c.sql("SELECT count(*) FROM volumes WHERE status NOT IN ('available', 'in-use', 'error')").await[0][0] == "0"
                && c.sql("SELECT count(*) FROM snapshots WHERE status NOT IN ('available', 'error')").await[0][0] == "0"
        })
        .await;
    }

    /// The store's volumes and snapshots equal the pool's images and snapshots, name for
    /// name (volume-<id>, snapshot-<id>).
    async fn assert_store_matches_ceph(&self) {
        let mut store: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in self.sql("SELECT id FROM volumes").await {
            store.entry(format!("volume-{}", r[0])).or_default();
        }
        for r in self.sql("SELECT volume_id, id FROM snapshots").await {
            store
                .entry(format!("volume-{}", r[0]))
                .or_default()
                .insert(format!("snapshot-{}", r[1]));
        }
        let listing = common::rbd::rbd_json(&["ls", "-l", &self.pool]);
        let mut pool: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for e in listing.as_array().unwrap() {
            let image = e["image"].as_str().unwrap().to_string();
            let snaps = pool.entry(image).or_default();
            if let Some(s) = e["snapshot"].as_str() {
                snaps.insert(s.to_string());
            }
        }
        assert_eq!(store, pool, "store and Ceph differ");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = Command::new("ceph")
            .arg("-c")
            .arg(common::rbd::ceph_conf())
            .args([
                "osd",
                "pool",
                "delete",
                &self.pool,
                &self.pool,
                "--yes-i-really-really-mean-it",
            ])
            .output();
    }
}

/// What a load of snapshot creates and deletes did, seen from its clients.
#[derive(Default, Debug)]
struct Load {
    created: Vec<String>,
    deleted: usize,
    errors: BTreeMap<String, usize>,
}

/// `clients` clients, client c sending its k-th request to node (c + k) % nodes, create and
/// delete snapshots of `volumes` for `secs` seconds.
async fn load(c: &Arc<Cluster>, clients: usize, volumes: &[String], secs: u64) -> Load {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let volumes = Arc::new(volumes.to_vec());
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (c, volumes) = (c.clone(), volumes.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Load::default();
            let mut k = client;
            while Instant::now() < deadline {
                let node = k % c.nodes.len();
                let vol = &volumes[k % volumes.len()];
                k += 1;
                let made = c
                    .call(
                        node,
                        reqwest::Method::POST,
                        "/v3/snapshots",
                        Some(json!({"snapshot": {"volume_id": vol, "force": true}})),
                    )
                    .await;
                let sid = match made {
                    Ok((202, v)) => v["snapshot"]["id"].as_str().unwrap().to_string(),
                    Ok((st, v)) => {
                        *out.errors.entry(format!("create {st}: {}", v)).or_default() += 1;
                        continue;
                    }
                    Err(e) => {
                        *out.errors.entry(format!("create: {e}")).or_default() += 1;
                        continue;
                    }
                };
                out.created.push(sid.clone());
                let node = k % c.nodes.len();
                match c
                    .call(
                        node,
                        reqwest::Method::DELETE,
                        &format!("/v3/snapshots/{sid}"),
                        None,
                    )
                    .await
                {
                    Ok((202, _)) => out.deleted += 1,
                    Ok((st, v)) => *out.errors.entry(format!("delete {st}: {v}")).or_default() += 1,
                    Err(e) => *out.errors.entry(format!("delete: {e}")).or_default() += 1,
                }
            }
            out
        }));
    }
    let mut all = Load::default();
    for t in tasks {
        let l = t.await.unwrap();
        all.created.extend(l.created);
        all.deleted += l.deleted;
        for (k, v) in l.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    all
}

fn load_secs() -> u64 {
    std::env::var("KILN_MULTINODE_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// 32 clients for 60 s across three nodes on the same 8 volumes: every accepted create made
/// exactly one snapshot, every accepted delete removed it, no request failed, nothing is
/// left journaled or transitional, and the store equals Ceph.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_serve_one_store_and_one_pool_under_load() {
    let _serial = SERIAL.lock().await;
    let (c, volumes) = Cluster::serving(8, "mn").await;
    let secs = load_secs();
    let t = Instant::now();
    let l = load(&c, 32, &volumes, secs).await;
    let took = t.elapsed().as_secs_f64();
    c.settled().await;
    eprintln!(
        "3 nodes, 32 clients, {:.1} s: {} creates, {} deletes ({:.1} ops/s), errors {:?}",
        took,
        l.created.len(),
        l.deleted,
        (l.created.len() + l.deleted) as f64 / took,
        l.errors
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert!(l.created.len() > 32, "the load did next to nothing: {l:?}");
    let unique: BTreeSet<&String> = l.created.iter().collect();
    assert_eq!(
        unique.len(),
        l.created.len(),
        "a snapshot id was handed out twice"
    );
    assert_eq!(l.deleted, l.created.len());
    // Every snapshot created was deleted, in the store and on Ceph.
    assert_eq!(c.sql("SELECT count(*) FROM snapshots").await[0][0], "0");
    c.assert_store_matches_ceph().await;
    // Every node served its share.
    for i in 0..3 {
        let served = c.log(i).matches("\"method\":\"POST\"").count();
        assert!(
            served > 0,
            "node {} served no POST: {}",
            c.nodes[i].name,
            c.log(i)
        );
    }
}

/// A node dies (SIGKILL) with a snapshot create, a snapshot delete, a revert and an
/// instance snapshot in flight on it, each held at its fail point: the two other nodes
/// resolve every one — each journal entry gone, every status final, store == Ceph — and
/// the time from the kill to each resolution is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_of_a_killed_node_are_finished_or_rolled_back_by_the_others() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new(3);
    c.start(0, None).await;
    c.start(1, None).await;
    c.start(2, Some(HANG)).await;
    // Everything the victim will act on is made through the healthy nodes.
    let a = c.volume(0, "create-on-victim").await;
    let b = c.volume(1, "delete-on-victim").await;
    let sb = c.snapshot(0, &b).await;
    let rv = c.volume(0, "revert-on-victim").await;
    let srv = c.snapshot(1, &rv).await;
    let (d, e) = (
        c.volume(0, "instance-d").await,
        c.volume(1, "instance-e").await,
    );
    let instance = "6f4c1c52-95c0-4b6e-9d43-8a3b6f0e2a11";
    kiln_ok(
        &c.nodes[0],
        &[
            "instance",
            "create",
            "--id",
            instance,
            "--name",
            "victim-server",
        ],
    );
    for (vol, dev) in [(&d, "/dev/vda"), (&e, "/dev/vdb")] {
        c.ok(
            0,
            reqwest::Method::POST,
            &format!("/v3/volumes/{vol}/action"),
            Some(json!({"os-attach": {"instance_uuid": instance, "mountpoint": dev}})),
        )
        .await;
    }
    c.settled().await;
    let c = Arc::new(c);

    // In flight on the victim: the requests never answer (their node dies under them).
    let inflight = [
        (
            reqwest::Method::POST,
            "/v3/snapshots".to_string(),
            json!({"snapshot": {"volume_id": a, "force": true}}),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v3/snapshots/{sb}"),
            Value::Null,
        ),
        (
            reqwest::Method::POST,
            format!("/v3/volumes/{rv}/action"),
            json!({"revert": {"snapshot_id": srv}}),
        ),
        (
            reqwest::Method::POST,
            format!("/compute/v2.1/servers/{instance}/action"),
            json!({"createImage": {"name": "victim-image"}}),
        ),
    ];
    for (method, path, body) in inflight {
        let c = c.clone();
        tokio::spawn(async move {
            let body = (!body.is_null()).then_some(body);
            let _ = c.call(2, method, &path, body).await;
        });
    }
    c.until(async |c: &Cluster| {
        c.sql("SELECT count(*) FROM operations WHERE parent_id IS NULL AND owner LIKE 'n3:%'")
            .await[0][0]
            == "4"
    })
    .await;
    // Let the two that hang after their driver call reach it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ops: BTreeMap<String, String> = c
        .sql("SELECT id, kind FROM operations WHERE parent_id IS NULL")
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(ops.len(), 4, "{ops:?}");
    let killed = Instant::now();
    c.kill(2);

    // Each journal entry's resolution, timed from the kill.
    let mut resolved: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + LIMIT;
    while resolved.len() < ops.len() {
        let left: BTreeSet<String> = c
            .sql("SELECT id FROM operations WHERE parent_id IS NULL")
            .await
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        for (id, kind) in &ops {
            if !left.contains(id) && !resolved.contains_key(kind) {
                resolved.insert(kind.clone(), killed.elapsed().as_secs_f64());
            }
        }
        assert!(
            Instant::now() < deadline,
            "unresolved after {LIMIT:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "resolved after the kill (node timeout {NODE_TIMEOUT_SECS} s, recovery every 1 s): {resolved:?}"
    );
    for i in 0..2 {
        for line in c.log(i).lines().filter(|l| l.contains("recover")) {
            eprintln!("{}: {line}", c.nodes[i].name);
        }
    }
    c.settled().await;
    // The nodes that recovered them say so, and the victim did not.
    let recovered: usize = (0..2)
        .map(|i| {
            c.log(i)
                .matches("recovered an unfinished operation")
                .count()
        })
        .sum();
    assert!(recovered >= 4, "{}\n{}", c.log(0), c.log(1));
    // The snapshot created on Ceph before the kill was kept; the delete was carried out;
    // the revert was completed; the instance snapshot was rolled back: no image, and no
    // snapshot left of either of its volumes.
    let sa = c
        .sql(&format!(
            "SELECT status FROM snapshots WHERE volume_id = '{a}'"
        ))
        .await;
    assert_eq!(sa, vec![vec!["available".to_string()]], "create: {sa:?}");
    let sbr = c
        .sql(&format!("SELECT status FROM snapshots WHERE id = '{sb}'"))
        .await;
    assert!(sbr.is_empty(), "delete: {sbr:?}");
    let rvs = c
        .sql(&format!("SELECT status FROM volumes WHERE id = '{rv}'"))
        .await;
    assert_eq!(rvs[0][0], "available", "revert: {rvs:?}");
    let survivors = format!("{}{}", c.log(0), c.log(1));
    assert!(
        survivors.lines().any(|l| l.contains("\"op\":\"revert\"")
            && l.contains(&format!("revert to snapshot {srv} completed"))),
        "the revert was not completed by a survivor: {survivors}"
    );
    let images = c.sql("SELECT id FROM images").await;
    assert!(images.is_empty(), "{images:?}");
    let member_snaps = c
        .sql(&format!(
            "SELECT count(*) FROM snapshots WHERE volume_id IN ('{d}', '{e}')"
        ))
        .await;
    assert_eq!(member_snaps[0][0], "0");
    // Before taking the victim's operations over, a survivor blocklisted the victim's Ceph
    // client (the address it published in its heartbeat row): its watches on the images
    // it had open ended at once instead of after Ceph's watch timeout.
    let fences = c
        .sql("SELECT fences FROM kiln_nodes WHERE node = 'n3'")
        .await;
    let published: Vec<String> = serde_json::from_str(&fences[0][0]).unwrap();
    assert!(!published.is_empty(), "the victim published no Ceph client");
    let blocklist = ceph(&["osd", "blocklist", "ls"]);
    for handle in &published {
        // ceph:<fsid>:<address>
        let addr = handle.splitn(3, ':').nth(2).unwrap();
        assert!(
            blocklist.contains(addr),
            "{addr} is not blocklisted: {blocklist}"
        );
    }
    assert!(
        survivors.contains("fenced a dead kiln process off the backend"),
        "{survivors}"
    );
    c.assert_store_matches_ceph().await;
    // The survivors keep serving.
    c.still_serving(1, 0, &a).await;
}

/// PostgreSQL restarts while three nodes are under load: requests fail cleanly meanwhile,
/// no node gives up (the restart is shorter than the fence), and afterwards nothing is
/// journaled or transitional and the store equals Ceph.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgresql_restart_under_load_leaves_nothing_stuck() {
    let _serial = SERIAL.lock().await;
    let (c, volumes) = Cluster::serving(4, "pgr").await;
    let runner = {
        let (c, volumes) = (c.clone(), volumes.clone());
        tokio::spawn(async move { load(&c, 16, &volumes, 20).await })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t = Instant::now();
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.pg.restart())
        .await
        .unwrap();
    eprintln!("PostgreSQL restarted in {:.2} s", t.elapsed().as_secs_f64());
    let l = runner.await.unwrap();
    eprintln!(
        "during the restart: {} creates, {} deletes accepted; failures {:?}",
        l.created.len(),
        l.deleted,
        l.errors
    );
    c.settled().await;
    for i in 0..3 {
        assert!(c.alive(i), "node {} exited: {}", c.nodes[i].name, c.log(i));
    }
    // Snapshots whose delete failed while the server was down are still there (available)
    // or in error; every one is final, and the store equals Ceph.
    c.assert_store_matches_ceph().await;
    // The nodes work normally again.
    c.still_serving(2, 1, &volumes[0]).await;
}

/// A node stalled for longer than its fence (SIGSTOP, as a frozen VM or a host that stops
/// being scheduled) may already count as dead to the others: when it runs again it exits
/// at once (status 75, with one error line) instead of carrying on, and the operation it
/// held in flight is resolved by another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stalled_past_its_fence_exits_when_it_resumes_and_another_takes_over() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new(2);
    c.start(0, None).await;
    c.start(1, Some(HANG)).await;
    let v = c.volume(0, "stalled").await;
    let c = Arc::new(c);
    c.snapshot_held_in_flight(1, &v).await;
    let pid = c.pid(1);
    // SAFETY: plain kill(2) of the node process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let fence = Duration::from_secs(NODE_TIMEOUT_SECS) / 3;
    tokio::time::sleep(fence + Duration::from_secs(2)).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = Instant::now();
    let st = c.exited(1).await;
    eprintln!(
        "stalled node exited {:.2} s after it resumed: {st}",
        resumed.elapsed().as_secs_f64()
    );
    assert_eq!(st.code(), Some(75), "{}", c.log(1));
    assert!(
        c.log(1).contains("no heartbeat reached PostgreSQL"),
        "{}",
        c.log(1)
    );
    c.settled().await;
    c.finished_by(0, &v).await;
}

/// PostgreSQL restarts while node 2 is inside a snapshot create (paused after the driver by
/// a fail point): the restart ends node 2's lock session, so on the server its volume lock
/// is free while the create still runs. A create on the same volume through node 1 must not
/// run beside it: sampled every 50 ms, the volume never has two snapshots `creating` at
/// once, node 1's snapshot appears only once node 2's is available, and node 1 says it
/// waited for the operation that lost its lock session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgresql_restart_does_not_let_another_node_run_beside_an_operation() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new(2);
    c.start(0, None).await;
    c.start(1, Some("create_snapshot::after_driver=return(sleep:8000)"))
        .await;
    let v = c.volume(0, "exclusive").await;
    let c = Arc::new(c);
    let body = json!({"snapshot": {"volume_id": v, "force": true}});
    let first = {
        let (c, body) = (c.clone(), body.clone());
        tokio::spawn(async move {
            c.call(1, reqwest::Method::POST, "/v3/snapshots", Some(body))
                .await
        })
    };
    c.until(async |c: &Cluster| {
        c.sql("SELECT count(*) FROM operations WHERE owner LIKE 'n2:%'")
            .await[0][0]
            == "1"
    })
    .await;
    // Samples of (snapshot id, status) on the volume until both creates are done.
    let sampler = {
        let (c, v) = (c.clone(), v.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let q = format!("SELECT id, status FROM snapshots WHERE volume_id = '{v}' ORDER BY id");
            loop {
                if let Ok(rows) = c.try_sql(&q).await {
                    let done = rows.len() == 2 && rows.iter().all(|r| r[1] == "available");
                    samples.push((Instant::now(), rows));
                    if done {
                        return samples;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || c2.pg.restart())
        .await
        .unwrap();
    // Node 1's lock sessions died in the restart too: a request may fail as unavailable
    // (503) before one is replaced; a client retries those.
    let second = loop {
        let (st, b) = c
            .call(
                0,
                reqwest::Method::POST,
                "/v3/snapshots",
                Some(body.clone()),
            )
            .await
            .unwrap();
        if st != 503 {
            break (st, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!((200..300).contains(&second.0), "{second:?}");
    let mine = second.1["snapshot"]["id"].as_str().unwrap().to_string();
    let (st, b) = first.await.unwrap().unwrap();
    assert!((200..300).contains(&st), "{st} {b}");
    let theirs = b["snapshot"]["id"].as_str().unwrap().to_string();
    let samples = tokio::time::timeout(LIMIT, sampler).await.unwrap().unwrap();
    let theirs_available = samples
        .iter()
        .find(|(_, rows)| rows.iter().any(|r| r[0] == theirs && r[1] == "available"))
        .map(|(t, _)| *t)
        .unwrap();
    for (t, rows) in &samples {
        let creating = rows.iter().filter(|r| r[1] == "creating").count();
        assert!(creating <= 1, "two creates ran at once: {rows:?}");
        if rows.iter().any(|r| r[0] == mine) {
            assert!(
                *t >= theirs_available,
                "node 1's snapshot appeared before node 2's create finished: {rows:?}"
            );
        }
    }
    assert!(
        c.log(0)
            .contains("waiting for an operation that lost its lock session"),
        "{}",
        c.log(0)
    );
    c.settled().await;
    assert!(c.alive(0) && c.alive(1));
    c.assert_store_matches_ceph().await;
}

/// A network namespace joined to this one by a veth link, with a TCP relay inside it
/// (tests/harness/tcp_relay.py): a node that reaches PostgreSQL through the relay loses it
/// for real when the link is cut — no FIN, no RST, on both legs — while its Ceph traffic
/// (loopback) goes on. Removed on drop.
struct CutLink {
    ns: String,
    host_if: String,
    peer_if: String,
    host: std::net::Ipv4Addr,
    relay: std::net::Ipv4Addr,
    relay_child: Option<Child>,
}

fn ip_ok(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ip(args: &[&str]) {
    ip_ok(args).unwrap();
}

impl CutLink {
    /// A namespace and link of their own: names and subnet drawn at random (retried when
    /// taken by another run); namespaces left by runs whose process is gone are removed.
    fn new() -> CutLink {
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let pid = name
                .strip_prefix("kiln-cut-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = ip_ok(&["netns", "del", name]);
            }
        }
        let mut tried = Vec::new();
        for _ in 0..20 {
            let n = u32::from(uuid::Uuid::new_v4().as_bytes()[0]) % 250 + 1;
            let link = CutLink {
                ns: format!("kiln-cut-{}-{n}", std::process::id()),
                host_if: format!("kch{n}"),
                peer_if: format!("kcr{n}"),
                host: std::net::Ipv4Addr::new(10, 213, n as u8, 1),
                relay: std::net::Ipv4Addr::new(10, 213, n as u8, 2),
                relay_child: None,
            };
            // Taken (another run, or a leftover): its names are not ours to remove.
            if let Err(e) = ip_ok(&["netns", "add", &link.ns]) {
                tried.push(e);
                continue;
            }
            if let Err(e) = ip_ok(&[
                "link",
                "add",
                &link.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &link.peer_if,
            ]) {
                let _ = ip_ok(&["netns", "del", &link.ns]);
                tried.push(e);
                continue;
            }
            // From here the link and namespace are this run's: Drop removes them.
            ip(&["link", "set", &link.peer_if, "netns", &link.ns]);
            ip(&[
                "addr",
                "add",
                &format!("{}/24", link.host),
                "dev",
                &link.host_if,
            ]);
            ip(&["link", "set", &link.host_if, "up"]);
            link.inside(&[
                "addr",
                "add",
                &format!("{}/24", link.relay),
                "dev",
                &link.peer_if,
            ]);
            link.inside(&["link", "set", &link.peer_if, "up"]);
            link.inside(&["link", "set", "lo", "up"]);
            return link;
        }
        panic!("no free link name or subnet: {tried:?}");
    }

    /// `ip ARGS` inside the namespace.
    fn inside(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.ns, "ip"];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// Starts the relay: `relay:5432` inside the namespace to `host:port`, the server.
    fn relay_to(&mut self, port: u16) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/harness/tcp_relay.py");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "python3", script])
            .arg(self.relay.to_string())
            .arg("5432")
            .arg(self.host.to_string())
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening");
        self.relay_child = Some(child);
        format!("{}:5432", self.relay)
    }

    /// Cuts the link: the relay's side goes down, so packets both ways are dropped.
    fn cut(&self) {
        self.inside(&["link", "set", "dev", &self.peer_if, "down"]);
    }
}

impl Drop for CutLink {
    fn drop(&mut self) {
        if let Some(mut c) = self.relay_child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A real network cut between one node and PostgreSQL (its traffic crosses a veth link into
/// another network namespace, which the test takes down; Ceph stays reachable). The node,
/// caught inside a snapshot create, can no longer renew its heartbeat and exits (status 75)
/// within its fence time; the server notices the dead connection by its TCP keepalives and
/// frees the node's lock; another node then finishes the create. Nothing runs twice: the
/// volume ends with exactly one snapshot, available, in the store and in Ceph.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_postgresql_fences_itself_and_another_takes_over() {
    let _serial = SERIAL.lock().await;
    let mut link = CutLink::new();
    let c = Cluster::with(
        2,
        Options {
            also_listen: Some(link.host),
            ..Options::default()
        },
    );
    let via = link.relay_to(c.pg.port());
    let (dbname, _) = c
        .url
        .rsplit_once('/')
        .map(|(a, b)| (b.to_string(), a))
        .unwrap();
    c.set_store_url(1, &format!("postgresql://kiln@{via}/{dbname}"));
    c.start(0, None).await;
    c.start(1, Some(HANG)).await;
    // Node 2 really goes through the relay.
    let through: i64 = c
        .sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE client_addr = '{}'",
            link.relay
        ))
        .await[0][0]
        .parse()
        .unwrap();
    assert!(
        through >= 1,
        "node 2 does not reach PostgreSQL through the relay"
    );
    let v = c.volume(0, "cut").await;
    let c = Arc::new(c);
    c.snapshot_held_in_flight(1, &v).await;
    let cut = Instant::now();
    link.cut();
    let st = c.exited(1).await;
    let fenced = cut.elapsed();
    eprintln!(
        "cut-off node exited {:.2} s after the cut: {st}",
        fenced.as_secs_f64()
    );
    assert_eq!(st.code(), Some(75), "{}", c.log(1));
    assert!(
        c.log(1).contains("no heartbeat reached PostgreSQL"),
        "{}",
        c.log(1)
    );
    // It fenced before the others may count it dead (the fence is a third of the timeout;
    // a heartbeat write that hangs is bounded at 1 s).
    assert!(
        fenced < Duration::from_secs(NODE_TIMEOUT_SECS),
        "fenced only after {fenced:?}"
    );
    c.settled().await;
    eprintln!(
        "taken over {:.2} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    c.finished_by(0, &v).await;
    c.still_serving(0, 0, &v).await;
}
