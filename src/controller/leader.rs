//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never write at
//! once. Acquire and renew are updates guarded by the Lease's resourceVersion (optimistic
//! concurrency); a leader that cannot renew within the lease duration steps down before a
//! standby may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(spec: &LeaseSpec, duration: Duration) -> bool {
    let Some(MicroTime(renewed)) = &spec.renew_time else {
        return true;
    };
    let secs = spec
        .lease_duration_seconds
        .map_or(duration.as_secs() as i64, i64::from);
    Timestamp::now().as_second() - renewed.as_second() > secs
}

/// One round: returns whether we hold the lease afterwards.
async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquired.or_else(|| Some(now())),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(mine(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let held_by_me = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !held_by_me && !expired(&spec, cfg.duration) {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
            let acquired = if held_by_me {
                spec.acquire_time.clone()
            } else {
                None
            };
            lease.spec = Some(mine(transitions, acquired));
            // The resourceVersion read above makes this a compare-and-swap.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs forever, publishing whether this process leads.
pub async fn run(client: Client, cfg: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &cfg).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                let _ = leading.send(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(lease = %cfg.name, "lost the lease");
                }
                let _ = leading.send(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "renewing the lease failed");
                // Step down before the lease can expire for the others.
                let stale = last_renewed.is_none_or(|t| t.elapsed() > cfg.duration * 2 / 3);
                if stale && *leading.borrow() {
                    tracing::warn!("stepping down: the lease could not be renewed in time");
                    let _ = leading.send(false);
                }
            }
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}
