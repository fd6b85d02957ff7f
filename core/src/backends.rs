//! The configured backends, opened on first use.
//!
//! Opening a backend can cost a cluster connect (RBD, bounded by its timeout) or a few lvm
//! commands; a command that touches one backend must not pay for the others, and a dead
//! cluster must not slow down a file-backend command. So each backend is opened the first
//! time an operation needs it, once per process, and an open that fails makes the backend
//! *unavailable* (listed with the reason; every operation on it refused before the store
//! is touched) rather than fatal.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;

use crate::driver::VolumeDriver;
use crate::error::{Error, ErrorKind, Result};
use crate::types::Capabilities;

/// Opens one backend's driver.
pub type Opener = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn VolumeDriver>>> + Send>> + Send + Sync,
>;

struct Entry {
    kind: String,
    opener: Opener,
    opened: tokio::sync::OnceCell<std::result::Result<Arc<dyn VolumeDriver>, (ErrorKind, String)>>,
}

/// A backend as listed by `backend list`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendInfo {
    /// Configured name.
    pub name: String,
    /// Driver kind ("file", "lvm", "rbd").
    pub driver: String,
    /// Whether it is the default backend for new volumes.
    pub default: bool,
    /// Why the backend could not be opened, when it could not.
    pub unavailable: Option<String>,
    /// What it can do.
    pub capabilities: Capabilities,
}

/// The backends by name, with the default for new volumes.
pub struct Backends {
    entries: BTreeMap<String, Entry>,
    default: String,
}

impl Backends {
    /// An empty set whose default backend will be `default` (it must be added).
    pub fn new(default: impl Into<String>) -> Self {
        Backends {
            entries: BTreeMap::new(),
            default: default.into(),
        }
    }

    /// Adds a backend opened on first use by `opener`.
    pub fn add(&mut self, name: impl Into<String>, kind: impl Into<String>, opener: Opener) {
        self.entries.insert(
            name.into(),
            Entry {
                kind: kind.into(),
                opener,
                opened: tokio::sync::OnceCell::new(),
            },
        );
    }

    /// Adds an already opened driver (tests, embedders).
    pub fn add_driver(
        &mut self,
        name: impl Into<String>,
        kind: impl Into<String>,
        driver: Arc<dyn VolumeDriver>,
    ) {
        self.add(
            name,
            kind,
            Box::new(move || {
                let d = driver.clone();
                Box::pin(async move { Ok(d) })
            }),
        );
    }

    /// Adds a backend that can never be opened, with the reason (e.g. a driver this build
    /// lacks).
    pub fn add_unavailable(
        &mut self,
        name: impl Into<String>,
        kind: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let reason: String = reason.into();
        self.add(
            name,
            kind,
            Box::new(move || {
                let r = reason.clone();
                Box::pin(async move { Err(Error::new(ErrorKind::Unavailable, r)) })
            }),
        );
    }

    /// Checks that the default backend is configured.
    pub fn validate(&self) -> Result<()> {
        if self.entries.contains_key(&self.default) {
            Ok(())
        } else {
            Err(Error::config(format!(
                "default backend {:?} is not configured",
                self.default
            )))
        }
    }

    /// The default backend's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// The backup pool `pool` (an `rbd:POOL` target) on the first backend of driver kind
    /// `kind` that has it; `Unsupported` when no such backend is configured.
    pub async fn backup_pool(
        &self,
        kind: &str,
        pool: &str,
    ) -> Result<Arc<dyn crate::backup::PoolBackups>> {
        let mut last = None;
        for (name, e) in &self.entries {
            if e.kind != kind {
                continue;
            }
            match self.driver(name).await {
                Ok(d) => match d.backup_pool(pool).await {
                    Ok(p) => return Ok(p),
                    Err(err) => last = Some(err),
                },
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::unsupported(format!(
                "{kind}:{pool} targets need a {kind} backend in the configuration"
            ))
        }))
    }

    /// Configured backend names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    async fn opened(
        &self,
        name: &str,
    ) -> Result<&std::result::Result<Arc<dyn VolumeDriver>, (ErrorKind, String)>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::not_found("backend", name))?;
        Ok(e.opened
            .get_or_init(|| async {
                (e.opener)().await.map_err(|err| {
                    // `backend list` shows the reason; operations on it fail with it.
                    tracing::info!(backend = %name, error = %err, "backend unavailable");
                    (err.kind(), err.to_string())
                })
            })
            .await)
    }

    /// The backend's driver, opening it on first use. A backend that cannot be opened
    /// gives an [`ErrorKind::Unavailable`] error naming it and the reason.
    pub async fn driver(&self, name: &str) -> Result<Arc<dyn VolumeDriver>> {
        match self.opened(name).await? {
            Ok(d) => Ok(d.clone()),
            Err((_, reason)) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "backend operation open backend failed: backend {name} is unavailable: {reason}"
                ),
            )
            .with_backend(name)),
        }
    }

    /// Every backend with its capabilities, opening them all (concurrently: one slow or
    /// unreachable backend does not add its delay to the others).
    pub async fn infos(&self) -> Vec<BackendInfo> {
        let opening = self.entries.keys().map(|name| async move {
            let r = self.opened(name).await;
            (name, r)
        });
        let mut out = Vec::new();
        for (name, r) in futures::future::join_all(opening).await {
            let (capabilities, unavailable) = match r {
                Ok(Ok(d)) => (d.capabilities(), None),
                Ok(Err((_, reason))) => (Capabilities::default(), Some(reason.clone())),
                Err(e) => (Capabilities::default(), Some(e.to_string())),
            };
            out.push(BackendInfo {
                name: name.clone(),
                driver: self
                    .entries
                    .get(name)
                    .map(|e| e.kind.clone())
                    .unwrap_or_default(),
                default: *name == self.default,
                unavailable,
                capabilities,
            });
        }
        out
    }
}
