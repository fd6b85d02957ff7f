//! `kiln bench api`: many clients creating and deleting snapshots on a few volumes for a
//! while — through a running `kiln serve` (HTTP requests, as the OpenStack clients make
//! them), or through the CLI (one whole `kiln` process per operation, as a script would) —
//! with per-operation latencies, throughput, every error by kind, and at the end a check
//! that no snapshot is left in a transitional status. In API mode a prober times
//! `GET /healthcheck` meanwhile: it touches no store and no driver, so its latency shows
//! whether anything blocks the server's async runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::cli::{ApiBenchArgs, ApiBenchMode, ApiBenchRoute, Format};

/// Latency figures of one kind of operation, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct Stats {
    n: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        n: v.len(),
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        max_ms: v[v.len() - 1],
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    /// Servers the requests went to (API mode).
    servers: usize,
    /// How they were spread over several servers.
    route: ApiBenchRoute,
    clients: usize,
    volumes: usize,
    duration_s: f64,
    creates: usize,
    deletes: usize,
    /// Creates and deletes per second.
    ops_per_s: f64,
    create: Stats,
    delete: Stats,
    /// Failed operations by kind (HTTP status or CLI exit code, and the message's start).
    errors: BTreeMap<String, usize>,
    /// `GET /healthcheck` while the load ran (API mode).
    health: Option<Stats>,
    /// Seconds until every deleted snapshot was gone after the load stopped.
    drain_s: f64,
    /// Snapshots of the bench volumes still in a transitional status after the drain
    /// (must be 0), and in `error` (must be 0).
    stuck: usize,
    in_error: usize,
}

#[derive(Default)]
struct Tally {
    create: Vec<f64>,
    delete: Vec<f64>,
    errors: BTreeMap<String, usize>,
}

impl Tally {
    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_default() += 1;
    }
}

/// How to reach kiln: an HTTP server, or the CLI with the global options of this run.
enum Target {
    Api {
        http: reqwest::Client,
        /// One server, or several nodes taken in turn (as a load balancer would).
        urls: Vec<String>,
        next: std::sync::atomic::AtomicUsize,
        route: ApiBenchRoute,
        token: Option<String>,
    },
    Cli {
        exe: PathBuf,
        global: Vec<String>,
    },
}

const MICROVERSION: &str = "volume 3.66";

/// `--url` when none is given.
const DEFAULT_URL: &str = "http://127.0.0.1:8776";

impl Target {
    /// A request to the node `--route` picks: the next in turn, or with `slot` (the index
    /// of the volume the request is about) under `--route volume`, that volume's node.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        slot: Option<usize>,
    ) -> Result<reqwest::RequestBuilder> {
        let Target::Api {
            http,
            urls,
            next,
            route,
            token,
        } = self
        else {
            return Err(Error::invalid("bench", "not an API target"));
        };
        let n = match (route, slot) {
            (ApiBenchRoute::Volume, Some(i)) => i,
            _ => next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let url = &urls[n % urls.len()];
        let mut r = http
            .request(method, format!("{url}{path}"))
            .header("OpenStack-API-Version", MICROVERSION);
        if let Some(t) = token {
            r = r.header("X-Auth-Token", t);
        }
        Ok(r)
    }

    /// One call: `Ok(json)` on success, `Err(kind)` describing the failure.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> std::result::Result<Value, String> {
        self.call_on(None, method, path, body).await
    }

    /// [`Target::call`] about the volume of index `slot` (see [`Target::request`]).
    async fn call_on(
        &self,
        slot: Option<usize>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> std::result::Result<Value, String> {
        let mut r = self
            .request(method, path, slot)
            .map_err(|e| e.to_string())?;
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.map_err(|e| format!("http: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("http: {e}"))?;
        if status.is_success() {
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        } else {
            Err(format!(
                "{} {}",
                status.as_u16(),
                text.chars().take(120).collect::<String>()
            ))
        }
    }

    /// One `kiln` process: its JSON output, or its exit code and first stderr line.
    async fn kiln(&self, args: &[&str]) -> std::result::Result<Value, String> {
        let Target::Cli { exe, global } = self else {
            return Err("not a CLI target".into());
        };
        let out = tokio::process::Command::new(exe)
            .args(global)
            .args(["--format", "json"])
            .args(args)
            .output()
            .await
            .map_err(|e| format!("spawn: {e}"))?;
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(format!(
                "exit {} {}",
                out.status.code().unwrap_or(-1),
                err.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(120)
                    .collect::<String>()
            ))
        }
    }

    async fn create_volume(&self, name: &str, size_gib: u64) -> Result<String> {
        let r = match self {
            Target::Api { .. } => self
                .call(
                    reqwest::Method::POST,
                    "/v3/volumes",
                    Some(json!({"volume": {"size": size_gib, "name": name}})),
                )
                .await
                .map(|v| v["volume"]["id"].clone()),
            Target::Cli { .. } => self
                .kiln(&[
                    "volume",
                    "create",
                    "--size",
                    &format!("{size_gib}G"),
                    "--name",
                    name,
                ])
                .await
                .map(|v| v["id"].clone()),
        };
        match r {
            Ok(Value::String(id)) => Ok(id),
            Ok(other) => Err(Error::invalid("bench", format!("no volume id in {other}"))),
            Err(e) => Err(Error::invalid("bench", format!("create volume: {e}"))),
        }
    }

    async fn delete_volume(&self, id: &str) -> std::result::Result<Value, String> {
        match self {
            Target::Api { .. } => {
                self.call(
                    reqwest::Method::DELETE,
                    &format!("/v3/volumes/{id}?cascade=true"),
                    None,
                )
                .await
            }
            Target::Cli { .. } => self.kiln(&["volume", "delete", id, "--cascade"]).await,
        }
    }

    /// Creates a forced snapshot of `volume`, the volume of index `slot`.
    async fn create_snapshot(
        &self,
        volume: &str,
        slot: usize,
    ) -> std::result::Result<String, String> {
        let v = match self {
            Target::Api { .. } => self
                .call_on(
                    Some(slot),
                    reqwest::Method::POST,
                    "/v3/snapshots",
                    Some(json!({"snapshot": {"volume_id": volume, "force": true}})),
                )
                .await
                .map(|v| v["snapshot"]["id"].clone()),
            Target::Cli { .. } => self
                .kiln(&["snapshot", "create", volume, "--force"])
                .await
                .map(|v| v["id"].clone()),
        }?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no snapshot id in {v}"))
    }

    /// Deletes snapshot `id` of the volume of index `slot`.
    async fn delete_snapshot(&self, id: &str, slot: usize) -> std::result::Result<Value, String> {
        match self {
            Target::Api { .. } => {
                self.call_on(
                    Some(slot),
                    reqwest::Method::DELETE,
                    &format!("/v3/snapshots/{id}"),
                    None,
                )
                .await
            }
            Target::Cli { .. } => self.kiln(&["snapshot", "delete", id]).await,
        }
    }

    /// Statuses of every snapshot of `volumes`.
    async fn snapshot_statuses(&self, volumes: &[String]) -> Result<Vec<String>> {
        let list = match self {
            Target::Api { .. } => self
                .call(reqwest::Method::GET, "/v3/snapshots/detail", None)
                .await
                .map(|v| v["snapshots"].clone()),
            Target::Cli { .. } => self.kiln(&["snapshot", "list"]).await,
        }
        .map_err(|e| Error::invalid("bench", format!("list snapshots: {e}")))?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| {
                        s["volume_id"]
                            .as_str()
                            .is_some_and(|v| volumes.iter().any(|x| x == v))
                    })
                    .map(|s| s["status"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Runs the benchmark and prints its report.
pub fn run(
    args: &ApiBenchArgs,
    config: Option<&std::path::Path>,
    data_dir: Option<PathBuf>,
    fmt: Format,
) -> Result<()> {
    if args.clients == 0 || args.volumes == 0 || args.duration == 0 {
        return Err(Error::invalid(
            "bench",
            "clients, volumes and duration must be at least 1",
        ));
    }
    let target = match args.mode {
        ApiBenchMode::Api => {
            let mut urls = Vec::new();
            for url in &args.url {
                let url = url.trim_end_matches('/').to_string();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Error::invalid(
                        "url",
                        format!("{url:?} is not an http(s) URL"),
                    ));
                }
                urls.push(url);
            }
            if urls.is_empty() {
                urls.push(DEFAULT_URL.to_string());
            }
            Target::Api {
                http: reqwest::Client::builder()
                    .pool_max_idle_per_host(args.clients * 2)
                    .timeout(Duration::from_secs(120))
                    .build()
                    .map_err(|e| Error::invalid("bench", format!("http client: {e}")))?,
                urls,
                next: std::sync::atomic::AtomicUsize::new(0),
                route: args.route,
                token: args.token.clone(),
            }
        }
        ApiBenchMode::Cli => {
            let exe = std::env::current_exe().map_err(|e| Error::io("find the kiln binary", e))?;
            let mut global = Vec::new();
            if let Some(c) = config {
                global.extend(["--config".to_string(), c.display().to_string()]);
            }
            if let Some(d) = data_dir {
                global.extend(["--data-dir".to_string(), d.display().to_string()]);
            }
            Target::Cli { exe, global }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the async runtime", e))?;
    let report = runtime.block_on(load(Arc::new(target), args))?;
    match fmt {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Format::Table => print_table(&report),
    }
    if report.stuck > 0 || report.in_error > 0 {
        return Err(Error::wrong_state(format!(
            "{} snapshot(s) left in a transitional status and {} in error",
            report.stuck, report.in_error
        )));
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "{} mode: {} clients on {} volumes for {:.1} s{}",
        r.mode,
        r.clients,
        r.volumes,
        r.duration_s,
        if r.servers > 1 {
            let how = match r.route {
                ApiBenchRoute::Request => "request by request",
                ApiBenchRoute::Volume => "each volume to one",
            };
            format!(", requests spread over {} servers ({how})", r.servers)
        } else {
            String::new()
        }
    );
    println!(
        "  {} creates + {} deletes = {:.1} ops/s",
        r.creates, r.deletes, r.ops_per_s
    );
    for (name, s) in [("create", &r.create), ("delete", &r.delete)] {
        println!(
            "  {name:<7} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
        );
    }
    if let Some(h) = &r.health {
        println!(
            "  health  p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} probes)",
            h.p50_ms, h.p90_ms, h.p99_ms, h.max_ms, h.n
        );
    }
    println!("  errors: {:?}", r.errors);
    println!(
        "  drained in {:.2} s; stuck {}, in error {}",
        r.drain_s, r.stuck, r.in_error
    );
}

async fn load(target: Arc<Target>, args: &ApiBenchArgs) -> Result<Report> {
    let mode = match args.mode {
        ApiBenchMode::Api => "api",
        ApiBenchMode::Cli => "cli",
    };
    let mut volumes = Vec::with_capacity(args.volumes);
    for i in 0..args.volumes {
        volumes.push(
            target
                .create_volume(&format!("bench-{mode}-{i}"), args.size)
                .await?,
        );
    }
    let volumes = Arc::new(volumes);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (target, volumes, tally) = (target.clone(), volumes.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                let slot = i % volumes.len();
                let vol = &volumes[slot];
                i += 1;
                let t = Instant::now();
                let made = target.create_snapshot(vol, slot).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let sid = match made {
                    Ok(sid) => {
                        tally.lock().await.create.push(ms);
                        sid
                    }
                    Err(e) => {
                        tally.lock().await.error(format!("create: {e}"));
                        continue;
                    }
                };
                let t = Instant::now();
                let gone = target.delete_snapshot(&sid, slot).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                match gone {
                    Ok(_) => tally.lock().await.delete.push(ms),
                    Err(e) => tally.lock().await.error(format!("delete: {e}")),
                }
            }
        }));
    }
    let prober = match target.as_ref() {
        Target::Api { http, urls, .. } => {
            let (http, url) = (http.clone(), format!("{}/healthcheck", urls[0]));
            Some(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if let Ok(r) = http.get(&url).send().await
                        && r.status().is_success()
                    {
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                lat
            }))
        }
        Target::Cli { .. } => None,
    };
    for t in tasks {
        t.await
            .map_err(|e| Error::invalid("bench", format!("client task failed: {e}")))?;
    }
    let duration_s = started.elapsed().as_secs_f64();
    let health = match prober {
        Some(p) => Some(stats(p.await.map_err(|e| {
            Error::invalid("bench", format!("health prober failed: {e}"))
        })?)),
        None => None,
    };
    // Deletes answered 202 finish in the background: wait for every snapshot to go.
    let drain = Instant::now();
    let mut statuses = target.snapshot_statuses(&volumes).await?;
    while !statuses.is_empty() && drain.elapsed() < Duration::from_secs(120) {
        if statuses.iter().all(|s| s == "error" || s == "available") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        statuses = target.snapshot_statuses(&volumes).await?;
    }
    let drain_s = drain.elapsed().as_secs_f64();
    let stuck = statuses
        .iter()
        .filter(|s| !matches!(s.as_str(), "available" | "error"))
        .count();
    let in_error = statuses.iter().filter(|s| *s == "error").count();
    // Leftover `available` ones are snapshots whose delete failed (counted as errors).
    for v in volumes.iter() {
        if let Err(e) = target.delete_volume(v).await {
            tracing::warn!(volume = %v, error = %e, "bench: cleanup failed");
        }
    }
    let t = std::mem::take(&mut *tally.lock().await);
    let (creates, deletes) = (t.create.len(), t.delete.len());
    let servers = match target.as_ref() {
        Target::Api { urls, .. } => urls.len(),
        Target::Cli { .. } => 0,
    };
    Ok(Report {
        mode,
        servers,
        route: args.route,
        clients: args.clients,
        volumes: args.volumes,
        duration_s,
        creates,
        deletes,
        ops_per_s: (creates + deletes) as f64 / duration_s,
        create: stats(t.create),
        delete: stats(t.delete),
        errors: t.errors,
        health,
        drain_s,
        stuck,
        in_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let s = stats((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.n, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 51.0, 99.0, 100.0)
        );
        assert_eq!(stats(vec![]).n, 0);
    }

    fn target(route: ApiBenchRoute) -> Target {
        Target::Api {
            http: reqwest::Client::new(),
            urls: vec!["http://a".into(), "http://b".into(), "http://c".into()],
            next: std::sync::atomic::AtomicUsize::new(0),
            route,
            token: None,
        }
    }

    fn host(t: &Target, slot: Option<usize>) -> String {
        let r = t
            .request(reqwest::Method::GET, "/x", slot)
            .unwrap()
            .build()
            .unwrap();
        r.url().host_str().unwrap().to_string()
    }

    #[test]
    fn requests_go_round_robin_or_each_volume_to_one_node() {
        let rr = target(ApiBenchRoute::Request);
        let got: Vec<String> = (0..4).map(|_| host(&rr, Some(0))).collect();
        assert_eq!(got, ["a", "b", "c", "a"]);
        let by_volume = target(ApiBenchRoute::Volume);
        let got: Vec<String> = [0, 1, 0, 2, 4, 1]
            .into_iter()
            .map(|slot| host(&by_volume, Some(slot)))
            .collect();
        assert_eq!(got, ["a", "b", "a", "c", "b", "b"]);
        // Requests about no volume (set-up, listing) still take turns.
        assert_eq!(host(&by_volume, None), "a");
        assert_eq!(host(&by_volume, None), "b");
    }
}
