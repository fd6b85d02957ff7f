//! The configuration file (`etc/kiln.toml`): where the data directory is, where the state
//! lives and which backends exist. With no config file kiln runs on an embedded default:
//! one file backend named `default` in `<data-dir>/volumes` and the SQLite store in
//! `<data-dir>/kiln.db`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_core::{Error, Result};

use serde::Deserialize;

/// The parsed configuration file (see `etc/kiln.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data directory (store, lock files, default volume directory); overridden by
    /// `--data-dir` and `KILN_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// Backend for new volumes when `--backend` is not given; defaults to the only backend,
    /// or to one named `default`.
    pub default_backend: Option<String>,
    /// Backends by name; each table has `driver = "file" | "lvm" | "rbd"` plus that driver's keys.
    #[serde(default)]
    pub backends: BTreeMap<String, toml::Table>,
    /// The `[api]` section of `kiln serve` (parsed by the API crate).
    pub api: Option<toml::Table>,
    /// This node's name, for backends local to one node (`node = "..."` in a backend
    /// table); overridden by `KILN_NODE`; default: the host name.
    pub node: Option<String>,
    /// `[store]`: where kiln's state lives.
    #[serde(default)]
    pub store: StoreConfig,
}

/// The `[store]` section: SQLite in the data directory (no `url`), or PostgreSQL shared by
/// several nodes.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgresql://user@host:port/db`; overridden by `KILN_STORE_URL`. Absent: SQLite.
    pub url: Option<String>,
    /// Most connections a kiln process opens for store queries (default 16).
    pub max_connections: Option<u32>,
    /// Most lock sessions a kiln process holds at once (default 32): one per running
    /// operation, and one per key a task waits for in PostgreSQL; more wait for one to be
    /// released.
    pub lock_sessions: Option<usize>,
    /// Seconds to wait for PostgreSQL before an operation fails as unavailable (default 5).
    pub connect_timeout_secs: Option<u64>,
    /// Seconds after its last heartbeat that a kiln process counts as dead, so another node
    /// may take over its unfinished operations; a process that cannot write its heartbeat
    /// for a third of this exits (default 15; each process declares its own in its
    /// heartbeat row).
    pub node_timeout_secs: Option<u64>,
    /// Seconds between `kiln serve`'s recovery passes (default 10).
    pub recovery_interval_secs: Option<u64>,
}

/// Smallest [`StoreConfig::node_timeout_secs`]: its third, the fence, must leave room for
/// one heartbeat write (bounded at 1 s).
pub const MIN_NODE_TIMEOUT_SECS: u64 = 3;

/// Default of [`StoreConfig::lock_sessions`].
pub const DEFAULT_LOCK_SESSIONS: usize = 32;

impl StoreConfig {
    /// See [`StoreConfig::node_timeout_secs`]; refused below [`MIN_NODE_TIMEOUT_SECS`].
    pub fn node_timeout(&self) -> Result<std::time::Duration> {
        let secs = self.node_timeout_secs.unwrap_or(15);
        if secs < MIN_NODE_TIMEOUT_SECS {
            return Err(Error::config(format!(
                "[store] node_timeout_secs = {secs}: use at least {MIN_NODE_TIMEOUT_SECS} (a process fences itself after a third of it, and one heartbeat write may take a second)"
            )));
        }
        Ok(std::time::Duration::from_secs(secs))
    }

    /// See [`StoreConfig::recovery_interval_secs`].
    pub fn recovery_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.recovery_interval_secs.unwrap_or(10).max(1))
    }

    /// The PostgreSQL settings, or `None` for SQLite. `url` is `KILN_STORE_URL` when set.
    pub fn postgres(&self, url: Option<String>) -> Option<kiln_core::store::PgOptions> {
        let url = url.or_else(|| self.url.clone())?;
        let mut o = kiln_core::store::PgOptions::new(url);
        if let Some(n) = self.max_connections {
            o.max_connections = n;
        }
        if let Some(s) = self.connect_timeout_secs {
            o.connect_timeout = std::time::Duration::from_secs(s.max(1));
        }
        Some(o)
    }
}

/// Longest backend name: it appears in tables, logs and the store.
const MAX_BACKEND_NAME: usize = 64;

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            // toml's messages span several lines; keep the CLI's one-line promise.
            let msg = e.message().to_string();
            Error::config(format!("{}: {msg}", path.display()))
        })
    }
}

/// Resolves the data directory: flag/env (already merged by clap), then the config file,
/// then the XDG data directory (`~/.local/share/kiln`).
pub fn data_dir(flag: Option<PathBuf>, config: &Config) -> Result<PathBuf> {
    flag.or_else(|| config.data_dir.clone())
        .or_else(|| dirs::data_dir().map(|d| d.join("kiln")))
        .ok_or_else(|| Error::config("no data directory: pass --data-dir or set KILN_DATA_DIR"))
}

pub(crate) fn backend_name_ok(name: &str) -> Result<()> {
    name_ok("backend name", name)
}

/// A node name: the same rules as a backend name.
pub fn node_name_ok(name: &str) -> Result<()> {
    name_ok("node name", name)
}

fn name_ok(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_BACKEND_NAME
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} {name:?}: use 1-{MAX_BACKEND_NAME} letters, digits, '-' or '_', not starting with '-'"
        )))
    }
}

/// The embedded default: one file backend named `default` in `<data-dir>/volumes`.
pub(crate) fn embedded_backends() -> BTreeMap<String, toml::Table> {
    let mut t = toml::Table::new();
    t.insert("driver".into(), "file".into());
    t.insert("path".into(), "volumes".into());
    BTreeMap::from([("default".to_string(), t)])
}

impl Config {
    /// The configured backends (or the embedded default) and the default backend's name,
    /// validated: names are safe, and the default is one of them.
    pub fn backend_tables(&self) -> Result<(BTreeMap<String, toml::Table>, String)> {
        let tables = if self.backends.is_empty() {
            embedded_backends()
        } else {
            self.backends.clone()
        };
        let default_backend = match &self.default_backend {
            Some(d) => d.clone(),
            None if tables.len() == 1 => tables.keys().next().cloned().unwrap_or_default(),
            None if tables.contains_key("default") => "default".to_string(),
            None => {
                return Err(Error::config(
                    "several backends and no `default_backend`: name one in the config",
                ));
            }
        };
        for name in tables.keys() {
            backend_name_ok(name)?;
        }
        if !tables.contains_key(&default_backend) {
            return Err(Error::config(format!(
                "default backend {default_backend:?} is not configured"
            )));
        }
        Ok((tables, default_backend))
    }
}

impl Config {
    /// This node's name: `flag` (from the caller), then `node` in the config (which
    /// [`Config::apply_env`] sets from `KILN_NODE`), then the
    /// host name (up to its first dot), validated.
    pub fn node_name(&self, flag: Option<String>) -> Result<String> {
        if let Some(name) = flag.or_else(|| self.node.clone()) {
            node_name_ok(&name)?;
            return Ok(name);
        }
        Ok(default_node_name(
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .as_deref(),
        ))
    }
}

impl Config {
    /// Applies the environment's overrides: `KILN_NODE` (the node name) and
    /// `KILN_STORE_URL` (`[store] url`).
    pub fn apply_env(&mut self) {
        if let Some(n) = std::env::var("KILN_NODE").ok().filter(|n| !n.is_empty()) {
            self.node = Some(n);
        }
        if let Some(u) = std::env::var("KILN_STORE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            self.store.url = Some(u);
        }
    }
}

/// The node name when none is configured: the host name up to its first dot, reduced to
/// the characters a node name may have; `localhost` when nothing usable is left (a host
/// without a name says "(none)"). Never an error: a name nobody chose must not stop kiln.
fn default_node_name(hostname: Option<&str>) -> String {
    let short = hostname
        .unwrap_or("")
        .trim()
        .split('.')
        .next()
        .unwrap_or("");
    let name: String = short
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(MAX_BACKEND_NAME)
        .collect();
    let name = name.trim_start_matches('-').to_string();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// Where a backend is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Only by the named node (`node = "..."`).
    Node(String),
    /// By any node (`shared = true`, or an RBD pool).
    Shared,
}

/// Takes the placement keys (`node`, `shared`) out of a backend's table, before the driver
/// sees it. With a shared store (`multi_node`), a backend whose storage is a host's own
/// — LVM always, a file directory unless it says `shared = true` — must name its node: kiln
/// would otherwise let every node write "the same" volume group or directory, each its own.
pub fn take_placement(name: &str, table: &mut toml::Table, multi_node: bool) -> Result<Placement> {
    let node = match table.remove("node") {
        None => None,
        Some(toml::Value::String(n)) => {
            node_name_ok(&n)?;
            Some(n)
        }
        Some(_) => {
            return Err(Error::config(format!(
                "backend {name}: `node` must be a string"
            )));
        }
    };
    let shared = match table.remove("shared") {
        None => None,
        Some(toml::Value::Boolean(b)) => Some(b),
        Some(_) => {
            return Err(Error::config(format!(
                "backend {name}: `shared` must be true or false"
            )));
        }
    };
    let driver = table.get("driver").and_then(|d| d.as_str()).unwrap_or("");
    match (node, shared) {
        (Some(_), Some(true)) => Err(Error::config(format!(
            "backend {name}: `node` and `shared = true` contradict each other"
        ))),
        (Some(n), _) => Ok(Placement::Node(n)),
        (None, Some(true)) if driver == "lvm" => Err(Error::config(format!(
            "backend {name}: an LVM volume group belongs to one host; name it with `node = \"...\"`"
        ))),
        (None, Some(true)) => Ok(Placement::Shared),
        (None, _) if multi_node && (driver == "lvm" || driver == "file") => {
            Err(Error::config(format!(
                "backend {name}: with a shared store, a {driver} backend must say which node serves it (`node = \"...\"`){}",
                if driver == "file" {
                    ", or `shared = true` for a directory every node mounts"
                } else {
                    ""
                }
            )))
        }
        (None, _) => Ok(Placement::Shared),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../etc")
            .join(name);
        Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The shipped samples parse, and every backend in them is placed as their store needs.
    #[test]
    fn the_shipped_samples_are_valid_configurations() {
        for (name, shared) in [("kiln.toml", false), ("kiln-multinode.toml", true)] {
            let c = sample(name);
            assert_eq!(c.store.postgres(None).is_some(), shared, "{name}");
            let (tables, _) = c.backend_tables().unwrap();
            for (b, mut t) in tables {
                take_placement(&b, &mut t, shared).unwrap_or_else(|e| panic!("{name} {b}: {e}"));
            }
        }
        let m = sample("kiln-multinode.toml");
        assert_eq!(
            m.store.node_timeout().unwrap(),
            std::time::Duration::from_secs(15)
        );
        let short = StoreConfig {
            node_timeout_secs: Some(2),
            ..Default::default()
        };
        let e = short.node_timeout().unwrap_err();
        assert!(e.to_string().contains("at least 3"), "{e}");
        assert_eq!(
            m.store.recovery_interval(),
            std::time::Duration::from_secs(10)
        );
    }

    #[test]
    fn a_host_name_that_is_no_node_name_still_gives_one() {
        assert_eq!(default_node_name(Some("kiln1.dc1.example\n")), "kiln1");
        assert_eq!(default_node_name(Some("(none)")), "none");
        assert_eq!(default_node_name(Some("-")), "localhost");
        assert_eq!(default_node_name(None), "localhost");
        // A configured name is checked, not repaired.
        let c = Config {
            node: Some("../x".into()),
            ..Default::default()
        };
        assert!(c.node_name(None).is_err());
        assert_eq!(
            Config::default().node_name(Some("n1".into())).unwrap(),
            "n1"
        );
    }

    #[test]
    fn placement_follows_the_backend_and_the_store() {
        let table = |s: &str| s.parse::<toml::Table>().unwrap();
        let place = |s: &str, shared| take_placement("b", &mut table(s), shared);
        assert_eq!(place("driver = \"rbd\"", true).unwrap(), Placement::Shared);
        assert_eq!(
            place("driver = \"lvm\"\nnode = \"n1\"", true).unwrap(),
            Placement::Node("n1".into())
        );
        assert_eq!(
            place("driver = \"file\"\nshared = true", true).unwrap(),
            Placement::Shared
        );
        // One host: nothing to say.
        assert_eq!(place("driver = \"lvm\"", false).unwrap(), Placement::Shared);
        for bad in [
            "driver = \"lvm\"",
            "driver = \"file\"",
            "driver = \"lvm\"\nshared = true",
            "driver = \"file\"\nnode = \"n1\"\nshared = true",
            "driver = \"file\"\nnode = \"../x\"",
            "driver = \"file\"\nnode = 3",
        ] {
            assert!(place(bad, true).is_err(), "{bad}");
        }
        // The keys are taken out: the driver never sees them.
        let mut t = table("driver = \"file\"\nnode = \"n1\"\npath = \"x\"");
        take_placement("b", &mut t, true).unwrap();
        assert!(!t.contains_key("node"));
    }
}
