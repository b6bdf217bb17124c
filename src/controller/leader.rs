//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never write at
//! once. Acquire and renew are updates guarded by the Lease's resourceVersion (optimistic
//! concurrency); a leader that cannot renew within the lease duration steps down before a
//! standby may take over; a leader that stops releases the Lease so a standby takes over at
//! once.
//!
//! Expiry is judged as client-go judges it: from when this replica last saw the Lease record
//! change, on its own monotonic clock. The remote `renewTime` is never compared with the
//! local wall clock, so clock skew between replicas cannot shorten or stretch a lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// How often the leader renews and a standby retries.
    pub renew_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// What identifies one version of the Lease record (the fields a holder rewrites).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    acquire_time: Option<String>,
    duration: Option<i32>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0.to_string()),
            duration: spec.lease_duration_seconds,
            transitions: spec.lease_transitions,
        }
    }
}

/// The record as last seen, and when (local monotonic clock).
#[derive(Debug, Default)]
pub struct Observed(Option<(Record, Instant)>);

impl Observed {
    /// Notes the record read now; returns whether its holder's lease has run out, counting
    /// from when this replica first saw this version of the record.
    pub(super) fn expired(&mut self, spec: &LeaseSpec, default: Duration, at: Instant) -> bool {
        let record = Record::of(spec);
        if record.holder.is_none() {
            return true; // released
        }
        let seen = match &self.0 {
            Some((r, t)) if *r == record => *t,
            _ => {
                self.0 = Some((record.clone(), at));
                at
            }
        };
        let duration = record
            .duration
            .and_then(|d| u64::try_from(d).ok())
            .map_or(default, Duration::from_secs);
        at.duration_since(seen) >= duration
    }
}

/// One round: returns whether we hold the lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
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
            let expired = observed.expired(&spec, cfg.duration, Instant::now());
            if !held_by_me && !expired {
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

/// Runs until aborted, publishing whether this process leads.
pub async fn run(client: Client, cfg: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<Instant> = None;
    let mut observed = Observed::default();
    loop {
        match try_acquire_or_renew(&api, &cfg, &mut observed).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                }
                last_renewed = Some(Instant::now());
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

/// Gives the Lease up, if this replica holds it: the holder is cleared (as client-go's
/// `ReleaseOnCancel` does), so a standby acquires it at its next try instead of waiting for
/// the lease to run out. Returns whether it was released.
pub async fn release(client: &Client, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(false);
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: spec.lease_transitions,
        ..LeaseSpec::default()
    });
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else wrote it meanwhile: it is no longer ours to release.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed.parse().expect("a time"))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn expiry_counts_from_when_the_record_was_seen_to_change() {
        let mut o = Observed::default();
        let t0 = Instant::now();
        // A renewTime far in the past (a skewed clock) is not expiry on its own.
        let old = spec("a", "2001-01-01T00:00:00Z");
        assert!(!o.expired(&old, Duration::from_secs(15), t0));
        assert!(!o.expired(&old, Duration::from_secs(15), t0 + Duration::from_secs(14)));
        // Unchanged for the whole lease duration: expired.
        assert!(o.expired(&old, Duration::from_secs(15), t0 + Duration::from_secs(15)));
        // A renewal restarts the count, whatever its timestamp says.
        let renewed = spec("a", "2001-01-01T00:00:01Z");
        assert!(!o.expired(
            &renewed,
            Duration::from_secs(15),
            t0 + Duration::from_secs(16)
        ));
        assert!(o.expired(
            &renewed,
            Duration::from_secs(15),
            t0 + Duration::from_secs(31)
        ));
        // A released lease is free at once.
        let released = LeaseSpec {
            holder_identity: None,
            ..renewed
        };
        assert!(o.expired(
            &released,
            Duration::from_secs(15),
            t0 + Duration::from_secs(17)
        ));
    }
}
