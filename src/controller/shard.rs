//! Member Leases for `envctl run --shard`. Each replica holds a `coordination.k8s.io/v1`
//! Lease of its own (`envctl-<instance>-member-<identity>`, labelled with the instance and
//! the role `shard-member`) and renews it; every renewal round it lists the instance's member
//! Leases and records the live ones in `crate::shard::Membership`, which decides what it may
//! write.
//!
//! A member is live until its Lease record has not changed for its lease duration, judged on
//! this replica's monotonic clock (as `super::leader` judges the leader's Lease), so clock
//! skew cannot shorten a lease. Each renewal that succeeds opens this replica's write fence
//! (`crate::cluster::fence`) for two thirds of the lease duration from when it was *sent*; a
//! replica whose renewals stop (a stalled API server, a paused process) writes nothing once
//! that time is up, before the others can count its Lease as lapsed, and its view of the
//! members is unknown from then on. A round is bounded well inside the lease. On shutdown the
//! Lease is deleted, so the others take its environments at once.
//!
//! The Lease carries this process's instance id (`super::leader::HOLDER_INSTANCE_ANNOTATION`):
//! a record of the same identity from another process is taken over only once it has lapsed,
//! and one that is renewed meanwhile means a second live process has this identity: this one
//! stops without writing.
//!
//! Owns the member Leases; writes nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::leader::{LeaseConfig, LeaseError, Observed, holder_instance, stamp_instance};
use crate::cluster::WriteFence;
use crate::render::{INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::shard::Membership;

/// The label that marks a Lease as a shard member's.
pub const ROLE_LABEL: &str = "envctl.materialize.cloud/role";
pub const MEMBER_ROLE: &str = "shard-member";

/// The membership as this replica sees it, shared with the loop.
pub type SharedMembership = Arc<Mutex<Membership>>;

/// The name of a member's Lease: a DNS subdomain made from the identity.
pub fn lease_name(instance: &str, identity: &str) -> String {
    let clean: String = identity
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("envctl-{instance}-member-{clean}");
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

/// The selector of an instance's member Leases.
pub fn member_selector(instance: &str) -> String {
    format!("{INSTANCE_LABEL}={instance},{ROLE_LABEL}={MEMBER_ROLE}")
}

fn lease(cfg: &LeaseConfig, instance: &str, transitions: i32) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut metadata = ObjectMeta {
        name: Some(lease_name(instance, &cfg.identity)),
        namespace: Some(cfg.namespace.clone()),
        labels: Some(BTreeMap::from([
            (INSTANCE_LABEL.to_string(), instance.to_string()),
            (ROLE_LABEL.to_string(), MEMBER_ROLE.to_string()),
            (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
        ])),
        ..ObjectMeta::default()
    };
    stamp_instance(&mut metadata, &cfg.instance_id);
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}

/// What a renewal round did with this replica's Lease.
enum Renewal {
    /// Renewed (or created); the write was sent at this instant.
    Renewed(Instant),
    /// The record is another process's of this identity and has not lapsed yet: wait.
    Waiting,
}

/// Renews this replica's Lease (creating it when missing).
async fn renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    instance: &str,
    own: &mut Observed,
) -> Result<Result<Renewal, LeaseError>, kube::Error> {
    let name = lease_name(instance, &cfg.identity);
    match api.get_opt(&name).await? {
        None => {
            let sent = Instant::now();
            api.create(&PostParams::default(), &lease(cfg, instance, 0))
                .await?;
            Ok(Ok(Renewal::Renewed(sent)))
        }
        Some(current) => {
            let spec = current.spec.clone().unwrap_or_default();
            if let Some(twin) = own.twin(&current, cfg) {
                return Ok(Err(twin));
            }
            let lapsed = own.expired(&current.metadata, &spec, cfg.duration, Instant::now());
            let mine = holder_instance(&current.metadata) == Some(cfg.instance_id.as_str());
            if !mine && !lapsed {
                return Ok(Ok(Renewal::Waiting));
            }
            let mut next = lease(cfg, instance, 0);
            if let (Some(spec), Some(old)) = (next.spec.as_mut(), current.spec.as_ref()) {
                spec.acquire_time = old.acquire_time.clone().or(spec.acquire_time.clone());
                spec.lease_transitions = old.lease_transitions;
            }
            next.metadata.resource_version = current.metadata.resource_version;
            let sent = Instant::now();
            api.replace(&name, &PostParams::default(), &next).await?;
            Ok(Ok(Renewal::Renewed(sent)))
        }
    }
}

/// Lists the member Leases; returns the live members' identities.
async fn live_members(
    api: &Api<Lease>,
    instance: &str,
    default: Duration,
    observed: &mut BTreeMap<String, Observed>,
) -> Result<BTreeSet<String>, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&member_selector(instance)))
        .await?;
    let now = Instant::now();
    let mut live = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for l in list.items {
        let Some(name) = l.metadata.name.clone() else {
            continue;
        };
        let spec = l.spec.unwrap_or_default();
        seen.insert(name.clone());
        let expired = observed
            .entry(name)
            .or_default()
            .expired(&l.metadata, &spec, default, now);
        if let (false, Some(holder)) = (expired, spec.holder_identity.filter(|h| !h.is_empty())) {
            live.insert(holder);
        }
    }
    observed.retain(|name, _| seen.contains(name));
    Ok(live)
}

/// Runs until aborted: renews this replica's Lease (opening `fence` from each renewal sent),
/// lists the members, records what it saw in `membership`, and on a change of the member set
/// wakes `changed` (the loop) and counts it in `generation` (a pass in flight stops writing).
/// Returns only when it must stop for good (another live process has this identity).
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    instance: String,
    membership: SharedMembership,
    changed: Arc<Notify>,
    generation: tokio::sync::watch::Sender<u64>,
    fence: WriteFence,
) -> LeaseError {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    let mut own = Observed::default();
    let mut reported: Option<BTreeSet<String>> = None;
    loop {
        // A fence that closed since the last round (renewals stalled, or the process was
        // paused past its lease): the view before the gap is void, so that after renewing
        // this replica waits a lease before writing, like any member that joins.
        if !fence.is_open() && reported.is_some() {
            tracing::warn!(
                "this replica's member Lease is not current (not renewed within two thirds of its duration): its view of the members is dropped and it writes nothing until it has renewed and the members have held for a lease"
            );
            reported = None;
            let moved = membership
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(None, Instant::now());
            if moved {
                generation.send_modify(|g| *g += 1);
                changed.notify_one();
            }
        }
        let round = tokio::time::timeout(cfg.round_timeout(), async {
            let renewed = renew(&api, &cfg, &instance, &mut own).await?;
            let members = live_members(&api, &instance, cfg.duration, &mut observed).await?;
            Ok::<_, kube::Error>((renewed, members))
        })
        .await;
        let now = Instant::now();
        // The view counts only while the fence is open: a replica whose renewals stopped
        // knows nothing of the members any more.
        let seen = match round {
            Ok(Ok((Ok(Renewal::Renewed(sent)), members))) => {
                fence.open_until(sent + cfg.fence_for());
                Some(members)
            }
            Ok(Ok((Ok(Renewal::Waiting), _))) => {
                tracing::info!(
                    identity = %cfg.identity,
                    "this identity's member Lease was written by another process; waiting for it to lapse before joining"
                );
                None
            }
            Ok(Ok((Err(fatal), _))) => {
                fence.close();
                return fatal;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "renewing this replica's member Lease or listing the members failed");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?cfg.round_timeout(), "renewing this replica's member Lease timed out");
                None
            }
        };
        let members = match seen {
            Some(m) => Some(m),
            None if fence.is_open() => reported.clone(),
            None => None,
        };
        if members != reported {
            match &members {
                Some(m) if m.contains(&cfg.identity) => tracing::info!(
                    members = ?m,
                    "shard members changed; environments that move are written once the change has held for {:?}",
                    cfg.duration
                ),
                _ => tracing::warn!(
                    "this replica's view of the shard members is stale; it writes nothing until it is current again"
                ),
            }
            reported = members.clone();
        }
        let moved = membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(members, now);
        if moved {
            generation.send_modify(|g| *g += 1);
            changed.notify_one();
        }
        // Wake when the fence closes too, so the membership turns unknown at once.
        let wake = Instant::now() + cfg.renew_every;
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = fence.wait_closed(), if fence.is_open() => {}
        }
    }
}

/// Deletes this replica's Lease (on shutdown, after the last pass): the others take its
/// environments at their next round.
pub async fn release(
    client: &Client,
    cfg: &LeaseConfig,
    instance: &str,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    match api
        .delete(
            &lease_name(instance, &cfg.identity),
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The live members of `instance`'s shard, judged by each Lease's renewTime against this
/// machine's clock (for `envctl status`, which looks once; the controller judges on its
/// own monotonic clock instead).
pub async fn members_now(
    client: &Client,
    namespace: Option<&str>,
    instance: &str,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<Lease> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = match api
        .list(&ListParams::default().labels(&member_selector(instance)))
        .await
    {
        Ok(list) => list,
        // Who may not read Leases sees no owners, and the rest of the status.
        Err(kube::Error::Api(s)) if s.code == 403 => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let now = Timestamp::now();
    let mut live: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|l| {
            let spec = l.spec?;
            let renewed = spec.renew_time?.0;
            let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let age = now.as_second() - renewed.as_second();
            (age <= lasts).then_some(spec.holder_identity).flatten()
        })
        .collect();
    live.sort();
    live.dedup();
    Ok(live)
}
