//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never write at
//! once. Acquire and renew are updates guarded by the Lease's resourceVersion (optimistic
//! concurrency); a leader that stops releases the Lease so a standby takes over at once.
//!
//! Expiry is judged as client-go judges it: from when this replica last saw the Lease record
//! change, on its own monotonic clock. The remote `renewTime` is never compared with the
//! local wall clock, so clock skew between replicas cannot shorten or stretch a lease.
//!
//! The leader's writes are fenced (`crate::cluster::fence`): each renewal that succeeds opens
//! the fence for two thirds of the lease duration from the moment the renewal was *sent*, so a
//! standby (which counts a full duration from when it *saw* the record change) can never take
//! over while the fence is open. A round (read and write) is bounded well inside the lease.
//! Losing the lease closes the fence at once.
//!
//! Each process stamps its Lease record with an instance id of its own
//! (`HOLDER_INSTANCE_ANNOTATION`): a second process started with the same identity sees the
//! record renewed by another instance, says so, and stops without writing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::WriteFence;

/// The annotation on a Lease naming the process (not only the identity) that wrote it.
pub const HOLDER_INSTANCE_ANNOTATION: &str = "envctl.materialize.cloud/holder-instance";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// This process's own id (random per start): tells two processes of one identity apart.
    pub instance_id: String,
    pub duration: Duration,
    /// How often the leader renews and a standby retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// How long a write may go on after the renewal that allowed it was sent.
    pub fn fence_for(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The longest one renewal round (read and write) may take: well inside the fence, so a
    /// stalled API server cannot hold a round past it.
    pub fn round_timeout(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(500))
    }
}

/// A process id that two starts never share.
pub fn new_instance_id() -> String {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id())).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why leading ended for good.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "another process with identity {identity} (instance {other}) holds Lease {namespace}/{lease}: every replica needs an identity of its own (--leader-elect-identity); this one writes nothing and stops"
    )]
    DuplicateIdentity {
        identity: String,
        other: String,
        namespace: String,
        lease: String,
    },
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The process that wrote a Lease record, from its annotation.
pub fn holder_instance(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(HOLDER_INSTANCE_ANNOTATION))
        .map(String::as_str)
}

/// `meta` stamped with this process's instance id.
pub fn stamp_instance(meta: &mut ObjectMeta, instance_id: &str) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(HOLDER_INSTANCE_ANNOTATION.into(), instance_id.into());
}

/// What identifies one version of the Lease record (the fields a holder rewrites).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    instance: Option<String>,
    renew_time: Option<String>,
    acquire_time: Option<String>,
    duration: Option<i32>,
    transitions: Option<i32>,
}

impl Record {
    fn of(meta: &ObjectMeta, spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            instance: holder_instance(meta).map(str::to_string),
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
    pub(super) fn expired(
        &mut self,
        meta: &ObjectMeta,
        spec: &LeaseSpec,
        default: Duration,
        at: Instant,
    ) -> bool {
        let record = Record::of(meta, spec);
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

    /// Whether the record, written by `identity` from another instance than `mine`, was
    /// renewed since this replica first saw it: a live process shares this identity. (A
    /// record left by a dead process of the same identity never changes, and expires.)
    pub(super) fn renewed_by_twin(
        &self,
        meta: &ObjectMeta,
        spec: &LeaseSpec,
        identity: &str,
        mine: &str,
    ) -> Option<String> {
        let record = Record::of(meta, spec);
        let other = record.instance.clone()?;
        let twin = record.holder.as_deref() == Some(identity) && other != mine;
        let before = self.0.as_ref().map(|(r, _)| r)?;
        let renewed = before.holder == record.holder
            && before.instance == record.instance
            && before.renew_time != record.renew_time;
        (twin && renewed).then_some(other)
    }
}

impl Observed {
    /// `lease`, as read now, renewed by another live process of `cfg`'s identity: the error
    /// this process stops with.
    pub(super) fn twin(&self, lease: &Lease, cfg: &LeaseConfig) -> Option<LeaseError> {
        let spec = lease.spec.clone().unwrap_or_default();
        let other =
            self.renewed_by_twin(&lease.metadata, &spec, &cfg.identity, &cfg.instance_id)?;
        Some(LeaseError::DuplicateIdentity {
            identity: cfg.identity.clone(),
            other,
            namespace: cfg.namespace.clone(),
            lease: lease.metadata.name.clone().unwrap_or_default(),
        })
    }
}

/// What one round found.
enum Round {
    /// This process holds the lease; the write that renewed it was sent at this instant.
    Holds(Instant),
    /// Another holds it (named when the record names one).
    Standby(Option<String>),
}

/// One round: reads the Lease and, when it is ours or free, writes it (a compare-and-swap).
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Observed,
) -> Result<Result<Round, LeaseError>, kube::Error> {
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
            let mut metadata = ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            };
            stamp_instance(&mut metadata, &cfg.instance_id);
            let lease = Lease {
                metadata,
                spec: Some(mine(0, None)),
            };
            let sent = Instant::now();
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Ok(Round::Holds(sent))),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Ok(Round::Standby(None))),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            if let Some(twin) = observed.twin(&lease, cfg) {
                return Ok(Err(twin));
            }
            let held_by_me = spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
                && holder_instance(&lease.metadata) == Some(cfg.instance_id.as_str());
            let expired = observed.expired(&lease.metadata, &spec, cfg.duration, Instant::now());
            if !held_by_me && !expired {
                return Ok(Ok(Round::Standby(spec.holder_identity.clone())));
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
            let acquired = if held_by_me {
                spec.acquire_time.clone()
            } else {
                None
            };
            lease.spec = Some(mine(transitions, acquired));
            stamp_instance(&mut lease.metadata, &cfg.instance_id);
            // The resourceVersion read above makes this a compare-and-swap.
            let sent = Instant::now();
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Ok(Round::Holds(sent))),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Ok(Round::Standby(None))),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs until aborted, publishing whether this process leads and holding its writes to
/// `fence`; returns only when it must stop for good (another process has its identity).
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leading: watch::Sender<bool>,
    fence: WriteFence,
) -> LeaseError {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed = Observed::default();
    let mut standing_by_for: Option<String> = None;
    loop {
        let round = tokio::time::timeout(
            cfg.round_timeout(),
            try_acquire_or_renew(&api, &cfg, &mut observed),
        )
        .await;
        match round {
            Ok(Ok(Ok(Round::Holds(sent)))) => {
                fence.open_until(sent + cfg.fence_for());
                standing_by_for = None;
                if !*leading.borrow() {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                }
                let _ = leading.send(true);
            }
            Ok(Ok(Ok(Round::Standby(holder)))) => {
                fence.close();
                if *leading.borrow() {
                    tracing::warn!(lease = %cfg.name, "lost the lease: writes stop and the pass in flight is cancelled");
                }
                let _ = leading.send(false);
                if holder.is_some() && holder != standing_by_for {
                    tracing::info!(lease = %cfg.name, leader = holder.as_deref().unwrap_or(""), "standing by: another replica leads");
                    standing_by_for = holder;
                }
            }
            Ok(Ok(Err(fatal))) => {
                fence.close();
                let _ = leading.send(false);
                return fatal;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease = %cfg.name, "renewing the lease failed");
            }
            Err(_) => {
                tracing::warn!(timeout = ?cfg.round_timeout(), lease = %cfg.name, "renewing the lease timed out");
            }
        }
        // Between rounds, step down the moment the fence closes (no renewal made in time).
        let wake = Instant::now() + cfg.renew_every;
        // Biased: a fence that closed by the time the sleep ends is seen here, not missed.
        tokio::select! {
            biased;
            _ = fence.wait_closed(), if *leading.borrow() => {
                tracing::warn!(lease = %cfg.name, "stepping down: the lease was not renewed within two thirds of its duration; writes stop and the pass in flight is cancelled");
                let _ = leading.send(false);
                tokio::time::sleep_until(wake).await;
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Gives the Lease up, if this process holds it: the holder is cleared (as client-go's
/// `ReleaseOnCancel` does), so a standby acquires it at its next try instead of waiting for
/// the lease to run out. Returns whether it was released. Close the fence first.
pub async fn release(client: &Client, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str())
        || holder_instance(&lease.metadata) != Some(cfg.instance_id.as_str())
    {
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
        let m = ObjectMeta::default();
        let t0 = Instant::now();
        // A renewTime far in the past (a skewed clock) is not expiry on its own.
        let old = spec("a", "2001-01-01T00:00:00Z");
        assert!(!o.expired(&m, &old, Duration::from_secs(15), t0));
        assert!(!o.expired(
            &m,
            &old,
            Duration::from_secs(15),
            t0 + Duration::from_secs(14)
        ));
        // Unchanged for the whole lease duration: expired.
        assert!(o.expired(
            &m,
            &old,
            Duration::from_secs(15),
            t0 + Duration::from_secs(15)
        ));
        // A renewal restarts the count, whatever its timestamp says.
        let renewed = spec("a", "2001-01-01T00:00:01Z");
        assert!(!o.expired(
            &m,
            &renewed,
            Duration::from_secs(15),
            t0 + Duration::from_secs(16)
        ));
        assert!(o.expired(
            &m,
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
            &m,
            &released,
            Duration::from_secs(15),
            t0 + Duration::from_secs(17)
        ));
    }

    #[test]
    fn a_twin_is_a_process_of_the_same_identity_that_renews() {
        let mut o = Observed::default();
        let t0 = Instant::now();
        let mut meta = ObjectMeta::default();
        stamp_instance(&mut meta, "other");
        let first = spec("a", "2026-01-01T00:00:00Z");
        // First sight: not yet known to be alive (a dead process's record looks the same).
        assert_eq!(o.renewed_by_twin(&meta, &first, "a", "mine"), None);
        assert!(!o.expired(&meta, &first, Duration::from_secs(15), t0));
        // The same record again: still nothing known.
        assert_eq!(o.renewed_by_twin(&meta, &first, "a", "mine"), None);
        // Renewed by the other instance of identity a: a twin.
        let renewed = spec("a", "2026-01-01T00:00:02Z");
        assert_eq!(
            o.renewed_by_twin(&meta, &renewed, "a", "mine").as_deref(),
            Some("other")
        );
        // Another identity renewing is a plain leader, and our own renewals are ours.
        assert_eq!(o.renewed_by_twin(&meta, &renewed, "b", "mine"), None);
        assert_eq!(o.renewed_by_twin(&meta, &renewed, "a", "other"), None);
    }
}
