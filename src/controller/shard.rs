//! Member Leases for `envctl run --shard`. Each replica holds a `coordination.k8s.io/v1`
//! Lease of its own (`envctl-<instance>-member-<identity>`, labelled with the instance and
//! the role `shard-member`) and renews it; every renewal round it lists the instance's member
//! Leases and records the live ones in `crate::shard::Membership`, which decides what it may
//! write.
//!
//! A member is live until its Lease record has not changed for its lease duration, judged on
//! this replica's monotonic clock (as `super::leader` judges the leader's Lease), so clock
//! skew cannot shorten a lease. A replica whose own renewal or list has not succeeded for two
//! thirds of the lease duration records its view as unknown and writes nothing: it has fenced
//! itself before the others can count its Lease as lapsed. On shutdown the Lease is deleted,
//! so the others take its environments at once.
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

use super::leader::{LeaseConfig, Observed};
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
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(instance, &cfg.identity)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([
                (INSTANCE_LABEL.to_string(), instance.to_string()),
                (ROLE_LABEL.to_string(), MEMBER_ROLE.to_string()),
                (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
            ])),
            ..ObjectMeta::default()
        },
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

/// Renews this replica's Lease (creating it when missing).
async fn renew(api: &Api<Lease>, cfg: &LeaseConfig, instance: &str) -> Result<(), kube::Error> {
    let name = lease_name(instance, &cfg.identity);
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), &lease(cfg, instance, 0))
                .await?;
        }
        Some(current) => {
            let mut next = lease(cfg, instance, 0);
            if let (Some(spec), Some(old)) = (next.spec.as_mut(), current.spec.as_ref()) {
                spec.acquire_time = old.acquire_time.clone().or(spec.acquire_time.clone());
                spec.lease_transitions = old.lease_transitions;
            }
            next.metadata.resource_version = current.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &next).await?;
        }
    }
    Ok(())
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
            .expired(&spec, default, now);
        if let (false, Some(holder)) = (expired, spec.holder_identity.filter(|h| !h.is_empty())) {
            live.insert(holder);
        }
    }
    observed.retain(|name, _| seen.contains(name));
    Ok(live)
}

/// Runs until aborted: renews this replica's Lease, lists the members, records what it saw
/// in `membership`, and on a change of the member set wakes `changed` (the loop) and counts
/// it in `generation` (a pass in flight stops writing).
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    instance: String,
    membership: SharedMembership,
    changed: Arc<Notify>,
    generation: tokio::sync::watch::Sender<u64>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    let mut last_ok: Option<Instant> = None;
    let mut reported: Option<BTreeSet<String>> = None;
    let fence_after = cfg.duration * 2 / 3;
    loop {
        let round = tokio::time::timeout(fence_after.max(Duration::from_secs(1)), async {
            renew(&api, &cfg, &instance).await?;
            live_members(&api, &instance, cfg.duration, &mut observed).await
        })
        .await;
        let now = Instant::now();
        let seen = match round {
            Ok(Ok(members)) => {
                last_ok = Some(now);
                Some(members)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "renewing this replica's member Lease or listing the members failed");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?fence_after, "renewing this replica's member Lease timed out");
                None
            }
        };
        let members = match seen {
            Some(m) => Some(m),
            // Failed, but recently fine: keep the last view until it would be stale.
            None if last_ok.is_some_and(|t| now.duration_since(t) < fence_after) => {
                reported.clone()
            }
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
        tokio::time::sleep(cfg.renew_every).await;
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
