//! `[backends.NAME]` settings of an RBD backend.

use std::path::PathBuf;

use kiln_core::{Error, Result};
use serde::Deserialize;

/// Configuration of one Ceph RBD backend (one pool, one client identity).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// RADOS pool holding the images. Default `rbd`.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Path of the cluster's ceph.conf. Default: `$CEPH_CONF` if set, else `/etc/ceph/ceph.conf`.
    #[serde(default = "default_ceph_conf")]
    pub ceph_conf: PathBuf,
    /// Ceph client id without the `client.` prefix. Default `admin`.
    #[serde(default = "default_client_name")]
    pub client_name: String,
    /// Keyring file for the client; when absent, whatever ceph.conf says (or no cephx).
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Seconds to wait for the cluster at start-up before giving up. Default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Deepest allowed chain of clones (a clone of a clone of …); a volume created from a
    /// snapshot deeper than this is flattened at once. Default 5, like Cinder's
    /// `rbd_max_clone_depth`: long chains make every read walk several parents.
    #[serde(default = "default_max_clone_depth")]
    pub max_clone_depth: u32,
    /// Flatten every volume created from a snapshot (full copy; the snapshot can then be
    /// deleted at once). Default false (copy-on-write clones).
    #[serde(default)]
    pub flatten_clones: bool,
}

fn default_pool() -> String {
    "rbd".into()
}
/// `$CEPH_CONF` when set (as librados and the ceph CLI do), else `/etc/ceph/ceph.conf`.
fn default_ceph_conf() -> PathBuf {
    std::env::var_os("CEPH_CONF")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf"))
}
fn default_client_name() -> String {
    "admin".into()
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_max_clone_depth() -> u32 {
    5
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            pool: default_pool(),
            ceph_conf: default_ceph_conf(),
            client_name: default_client_name(),
            keyring: None,
            connect_timeout_secs: default_connect_timeout(),
            max_clone_depth: default_max_clone_depth(),
            flatten_clones: false,
        }
    }
}

/// Longest start-up wait accepted: beyond this a typo (`600` for `60`) would make a down
/// cluster look like a hang.
pub const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;

impl RbdConfig {
    /// Checks the values that can be checked without the cluster; `backend` names the
    /// section in messages.
    pub fn validate(&self, backend: &str) -> Result<()> {
        let bad = |msg: String| Error::config(format!("backend {backend:?} (rbd): {msg}"));
        if self.pool.is_empty() || self.pool.contains('\0') || self.pool.contains('/') {
            return Err(bad(format!(
                "pool {:?} is not a valid pool name",
                self.pool
            )));
        }
        if self.client_name.is_empty()
            || self.client_name.contains('\0')
            || self.client_name.chars().any(char::is_whitespace)
        {
            return Err(bad(format!(
                "client_name {:?} is not a valid Ceph client id",
                self.client_name
            )));
        }
        if self.client_name.starts_with("client.") {
            return Err(bad(format!(
                "client_name {:?} must be given without the \"client.\" prefix (e.g. \"admin\")",
                self.client_name
            )));
        }
        if self.connect_timeout_secs == 0 || self.connect_timeout_secs > MAX_CONNECT_TIMEOUT_SECS {
            return Err(bad(format!(
                "connect_timeout_secs must be 1..={MAX_CONNECT_TIMEOUT_SECS}, got {}",
                self.connect_timeout_secs
            )));
        }
        if !self.ceph_conf.is_file() {
            return Err(bad(format!(
                "ceph_conf {} does not exist or is not a file (install ceph-common and copy the cluster's ceph.conf there, or set ceph_conf)",
                self.ceph_conf.display()
            )));
        }
        if let Some(k) = &self.keyring
            && !k.is_file()
        {
            return Err(bad(format!("keyring {} does not exist", k.display())));
        }
        for p in std::iter::once(&self.ceph_conf).chain(self.keyring.as_ref()) {
            if p.to_str().is_none_or(|s| s.contains('\0')) {
                return Err(bad(format!("path {} is not valid UTF-8", p.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let c: RbdConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RbdConfig::default());
        assert_eq!(c.pool, "rbd");
        // The suite runs with CEPH_CONF set; the default follows it like librados does.
        let expected = match std::env::var_os("CEPH_CONF").filter(|v| !v.is_empty()) {
            Some(v) => PathBuf::from(v),
            None => PathBuf::from("/etc/ceph/ceph.conf"),
        };
        assert_eq!(c.ceph_conf, expected);
        assert_eq!(c.client_name, "admin");
        assert_eq!(c.connect_timeout_secs, 10);
        assert_eq!(c.max_clone_depth, 5);
        assert!(!c.flatten_clones);
        assert!(c.keyring.is_none());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(serde_json::from_str::<RbdConfig>(r#"{"pool_name":"x"}"#).is_err());
    }

    #[test]
    fn validation_names_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        std::fs::write(&conf, "[global]\n").unwrap();
        let ok = RbdConfig {
            ceph_conf: conf.clone(),
            ..RbdConfig::default()
        };
        ok.validate("b").unwrap();

        let e = RbdConfig {
            client_name: "client.admin".into(),
            ..ok.clone()
        }
        .validate("b")
        .unwrap_err();
        assert!(
            e.to_string().contains("without the \"client.\" prefix"),
            "{e}"
        );

        let e = RbdConfig {
            ceph_conf: dir.path().join("missing.conf"),
            ..ok.clone()
        }
        .validate("b")
        .unwrap_err();
        assert!(e.to_string().contains("missing.conf"), "{e}");

        let e = RbdConfig {
            connect_timeout_secs: 0,
            ..ok.clone()
        }
        .validate("b")
        .unwrap_err();
        assert!(e.to_string().contains("connect_timeout_secs"), "{e}");

        let e = RbdConfig {
            pool: String::new(),
            ..ok
        }
        .validate("b")
        .unwrap_err();
        assert_eq!(e.kind(), kiln_core::ErrorKind::InvalidInput);
    }
}
