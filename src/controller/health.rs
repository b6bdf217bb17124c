//! Keeps every environment's health current from watches (StatefulSets, pods, namespaces):
//! judged again on each watch event and at the next progress deadline, never by polling an
//! environment. Publishes it as the `environment_health` gauge, as Events on the namespace
//! when it changes (leader only), and to the loop, which a change wakes (rollout waves wait
//! on it). Owns no objects and writes nothing else.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use tokio::sync::{Notify, watch};

use crate::health::{self, Health, HealthState};
use crate::metrics::{HealthLabels, Metrics};
use crate::observe::HealthWatch;
use crate::status::Events;

use super::options::Judging;

/// One environment's health and what it was judged from.
#[derive(Debug, Clone)]
pub struct Judged {
    pub health: Health,
    /// Each StatefulSet's desired-hash as the judgement saw it (see `health::as_of_apply`).
    pub seen: BTreeMap<String, String>,
}

/// Every environment's health, as last judged.
pub type HealthMap = Arc<Mutex<BTreeMap<String, Judged>>>;

/// Longest the health watches may take to list before the tracker starts anyway (it then
/// reports `Unknown` until they do).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Tracker {
    pub watch: HealthWatch,
    pub deadline: Duration,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub leading: watch::Receiver<bool>,
    /// With sharding: Events go only to the environments this replica owns.
    pub membership: Option<super::shard::SharedMembership>,
    /// Wakes the loop when some environment's health state changed.
    pub changed: Arc<Notify>,
    pub current: HealthMap,
}

/// Starts the watches and the tracker task.
pub fn start(
    client: &Client,
    instance: &str,
    Judging { deadline, pods }: Judging,
    metrics: Arc<Metrics>,
    leading: watch::Receiver<bool>,
    membership: Option<super::shard::SharedMembership>,
    changed: Arc<Notify>,
) -> HealthMap {
    let events_in = Arc::new(Notify::new());
    let current: HealthMap = Arc::default();
    let tracker = Tracker {
        watch: HealthWatch::start(client, instance, pods, events_in.clone()),
        deadline,
        metrics,
        events: Events::new(client.clone(), instance),
        leading,
        membership,
        changed,
        current: current.clone(),
    };
    tokio::spawn(tracker.run(events_in));
    current
}

impl Tracker {
    async fn run(self, events_in: Arc<Notify>) {
        if let Err(e) = self.watch.ready(READY_TIMEOUT).await {
            tracing::warn!(error = %crate::vocab::error_chain(&e), "health watches are not listed yet; health shows Unknown until they are");
        }
        let mut next_deadline: Option<tokio::time::Instant> = None;
        loop {
            let changed = self.judge(&mut next_deadline).await;
            if changed {
                self.changed.notify_one();
            }
            tokio::select! {
                _ = events_in.notified() => {
                    // Let a burst of pod and StatefulSet events settle into one judgement.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(tokio::time::Instant::now)), if next_deadline.is_some() => {}
            }
        }
    }

    /// Judges every environment; returns whether any state, or any version a judgement saw
    /// (a rollout waits for the applied one, which may arrive already Ready), changed.
    async fn judge(&self, next_deadline: &mut Option<tokio::time::Instant>) -> bool {
        let observed = self.watch.observed();
        let now = k8s_openapi::jiff::Timestamp::now();
        let judged: BTreeMap<String, Judged> = observed
            .iter()
            .map(|(env, o)| {
                let judged = Judged {
                    health: health::assess(o, now, self.deadline),
                    seen: o.stateful_set_hashes(),
                };
                (env.clone(), judged)
            })
            .collect();
        // The earliest moment a Progressing environment would turn Degraded.
        *next_deadline = observed
            .iter()
            .filter_map(|(env, o)| health::degrades_at(o, &judged.get(env)?.health, self.deadline))
            .min()
            .map(|at| {
                let wait = now.duration_until(at).unsigned_abs();
                tokio::time::Instant::now() + wait + Duration::from_millis(100)
            });
        let previous = {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *current, judged.clone())
        };
        let mut changed = judged
            .iter()
            .any(|(env, j)| previous.get(env).is_some_and(|p| p.seen != j.seen));
        for (env, j) in &judged {
            let h = &j.health;
            let before = previous.get(env).map(|p| &p.health);
            if before.is_some_and(|b| b.state == h.state) {
                continue;
            }
            changed = true;
            if let Some(b) = before {
                self.metrics.environment_health.remove(&HealthLabels {
                    environment: env.clone(),
                    health: b.state,
                });
            }
            self.metrics
                .environment_health
                .get_or_create(&HealthLabels {
                    environment: env.clone(),
                    health: h.state,
                })
                .set(1);
            let warning = h.state == HealthState::Degraded;
            if warning {
                tracing::warn!(environment = %env, reason = %h.reason, message = %h.message, "environment degraded");
            } else {
                tracing::info!(environment = %env, health = %h.state, reason = %h.reason, "environment health");
            }
            // Unknown (nothing observed yet, or deleted) is not news worth an Event.
            let owned = self
                .membership
                .as_ref()
                .is_none_or(|m| m.lock().unwrap_or_else(|e| e.into_inner()).owns(env));
            if *self.leading.borrow() && owned && h.state != HealthState::Unknown {
                let namespace = crate::manifest::namespace_for(env);
                self.events
                    .publish(
                        &namespace,
                        warning,
                        h.state.as_str(),
                        format!("{}: {}", h.reason, h.message),
                    )
                    .await;
            }
        }
        for (env, b) in &previous {
            if !judged.contains_key(env) {
                changed = true;
                self.metrics.environment_health.remove(&HealthLabels {
                    environment: env.clone(),
                    health: b.health.state,
                });
            }
        }
        changed
    }
}
