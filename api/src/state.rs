//! The server's shared state and the look-ups every handler shares: an object by id, as
//! the caller may see it (another project's object is 404, as if it did not exist).

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_core::attrs::{ObjectAttrs, ObjectKind, Owner};
use kiln_core::background::{Begun, Started};
use kiln_core::{Service, Snapshot, SnapshotId, Volume, VolumeId};
use tokio_util::task::TaskTracker;

use crate::config::{ApiConfig, Identity, Tokens};
use crate::context::Req;
use crate::error::{ApiError, ApiResult};

/// What every handler shares.
pub struct AppState {
    /// The service (store, backends, locks).
    pub service: Arc<Service>,
    /// The `[api]` configuration.
    pub config: ApiConfig,
    /// The tokens of `auth = "tokens"`.
    pub tokens: Tokens,
    /// Operations running in the background, awaited at shutdown.
    pub tracker: TaskTracker,
}

/// Shared state as handlers receive it.
pub type Shared = Arc<AppState>;

/// Whether `caller` may see an object of `attrs`: its own project's, or any for an admin.
pub fn may_see(caller: &Identity, attrs: &ObjectAttrs) -> bool {
    caller.admin || caller.project == attrs.project_id
}

/// Whether a list shows an object of `attrs`: the caller's project's; every project's for
/// an admin asking `all_tenants`.
pub fn listed(caller: &Identity, attrs: &ObjectAttrs, all_tenants: bool) -> bool {
    (caller.admin && all_tenants) || caller.project == attrs.project_id
}

impl AppState {
    /// Who a new object of `caller` belongs to, with the project quota.
    pub fn owner(&self, caller: &Identity) -> Owner {
        Owner {
            attrs: ObjectAttrs::owned_by(&caller.project, caller.user.as_deref()),
            quota: self.config.quotas,
        }
    }

    /// Object `id` loaded by `load` with its attributes, if the caller may see it; else 404
    /// with `missing` (malformed ids included, as Cinder answers). Only the canonical
    /// spelling is accepted: the attributes are keyed by it, and another spelling (upper
    /// case, no hyphens) must not find the object without them.
    pub async fn visible<I, T, Fut>(
        &self,
        req: &Req,
        id: &str,
        missing: String,
        load: impl FnOnce(I) -> Fut,
    ) -> ApiResult<(T, ObjectAttrs)>
    where
        I: std::str::FromStr + std::fmt::Display,
        Fut: std::future::Future<Output = kiln_core::Result<T>>,
    {
        let gone = || ApiError::not_found(missing.clone());
        let parsed: I = id.parse().map_err(|_| gone())?;
        if parsed.to_string() != id {
            return Err(gone());
        }
        let object = load(parsed).await.map_err(|e| match e.kind() {
            kiln_core::ErrorKind::NotFound => gone(),
            _ => e.into(),
        })?;
        let attrs = self.service.attrs(id.to_string()).await?;
        if !may_see(&req.caller, &attrs) {
            return Err(gone());
        }
        Ok((object, attrs))
    }

    /// Volume `id` and its attributes, if the caller may see it (see [`AppState::visible`]).
    pub async fn volume(&self, req: &Req, id: &str) -> ApiResult<(Volume, ObjectAttrs)> {
        let missing = format!("Volume {id} could not be found.");
        self.visible(req, id, missing, |v: VolumeId| self.service.volume(v))
            .await
    }

    /// Snapshot `id` and its attributes, if the caller may see it (see
    /// [`AppState::visible`]).
    pub async fn snapshot(&self, req: &Req, id: &str) -> ApiResult<(Snapshot, ObjectAttrs)> {
        let missing = format!("Snapshot {id} could not be found.");
        self.visible(req, id, missing, |s: SnapshotId| self.service.snapshot(s))
            .await
    }

    /// Checks that `caller` may attach a volume of `volume` (its attributes) to
    /// `instance`: an instance kiln knows must be visible to the caller (else 404) and, for
    /// a non-admin, belong to the volume's project — so an instance snapshot never takes
    /// another project's data.
    pub async fn check_instance_for(
        &self,
        req: &Req,
        instance: kiln_core::InstanceId,
        volume: &ObjectAttrs,
    ) -> ApiResult<()> {
        if self.service.store().instance(instance).await?.is_none() {
            return Ok(());
        }
        let a = self.service.attrs(instance.to_string()).await?;
        if !may_see(&req.caller, &a) {
            return Err(ApiError::not_found(format!(
                "Instance {instance} could not be found."
            )));
        }
        if !req.caller.admin && a.project_id != volume.project_id {
            return Err(ApiError::bad_request(format!(
                "instance {instance} belongs to another project than the volume"
            )));
        }
        Ok(())
    }

    /// Every object of `kind`'s attributes (objects without a row: the defaults).
    pub async fn all_attrs(&self, kind: ObjectKind) -> ApiResult<BTreeMap<String, ObjectAttrs>> {
        Ok(self.service.store().attrs_of(kind).await?)
    }

    /// [`AppState::start`] for an operation whose outcome the answer does not carry
    /// (deletes, reverts): `Ok` once it finished or is journaled.
    pub async fn launch<T, F>(&self, op: F) -> ApiResult<()>
    where
        T: Send + 'static,
        F: std::future::Future<Output = kiln_core::Result<T>> + Send + 'static,
    {
        self.start(op).await.map(drop)
    }

    /// Runs operation `op` in the background once it is journaled (see
    /// [`kiln_core::background`]): `Ok(Err(begun))` when it goes on, `Ok(Ok(v))` when it
    /// finished before that, its error when it was refused.
    pub async fn start<T, F>(&self, op: F) -> ApiResult<Result<T, Begun>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = kiln_core::Result<T>> + Send + 'static,
    {
        match kiln_core::background::start(&self.tracker, op, |panic| {
            Err(kiln_core::Error::store(format!(
                "operation task failed: {panic}"
            )))
        })
        .await
        {
            Started::Finished(r) => Ok(Ok(r?)),
            Started::Running(begun, handle) => {
                // The outcome is in the store (and the journal, if the process dies):
                // clients poll; only an unexpected failure is worth a log line here.
                tokio::spawn(async move {
                    match handle.await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "background operation failed"),
                        Err(e) => tracing::error!(error = %e, "background operation task failed"),
                        Ok(Ok(_)) => {}
                    }
                });
                Ok(Err(begun))
            }
        }
    }
}
