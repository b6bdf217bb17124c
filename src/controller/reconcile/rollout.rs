//! Step 2, rollout: where each environment stands against the new revision (from its
//! namespace's recorded revision and the manifests of earlier revisions), the pure decision
//! (`crate::rollout::decide`), the manifests the pass renders (held environments from the
//! revision they run), and the rollout's status (ConfigMap, metrics, log, Events). Writes
//! nothing but that status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::super::health::HealthMap;
use super::super::poll::Revision;
use super::load::History;
use super::parts::{Cluster, Shard};
use crate::health::{self, Health};
use crate::manifest::{self, Loaded};
use crate::metrics::Metrics;
use crate::plan::{Action, Change};
use crate::rollout::{self, Member, Position, RolloutStatus};
use crate::status;
use crate::vocab::error_chain;
use crate::vocab::{HASH_ANNOTATION, ObjectKind};

/// With sharding, the rollout's status is recorded by the replica that owns this name (it
/// is no environment's: environment names are DNS labels, without a colon).
const ROLLOUT_RECORDER: &str = "rollout:status";

/// What the rollout made of a revision for one pass.
pub struct Rolled {
    /// The manifests the pass renders: the revision's, with held environments' replaced by
    /// those of the revision they run.
    pub loaded: Arc<Loaded>,
    /// Held environments and the revision they stay on.
    pub held: BTreeMap<String, String>,
    /// Held environments whose previous revision cannot be read: left out of the pass.
    pub untouchable: BTreeSet<String>,
}

/// The rollout's part of the loop.
pub struct Rollouts {
    /// Every environment's health, kept current by the health tracker.
    health: HealthMap,
    /// The rollout's status as last recorded.
    recorded: Option<RolloutStatus>,
    /// Whether a wave waits on health (a change of health then wakes the loop).
    waiting: bool,
    /// Per environment, the desired-hash of each StatefulSet this process last wrote:
    /// health judged from older versions of them does not count for a rollout.
    applied_stateful_sets: BTreeMap<String, BTreeMap<String, String>>,
}

impl Rollouts {
    pub fn new(health: HealthMap) -> Rollouts {
        Rollouts {
            health,
            recorded: None,
            waiting: false,
            applied_stateful_sets: BTreeMap::new(),
        }
    }

    /// Whether a wave waits on health.
    pub fn waiting(&self) -> bool {
        self.waiting
    }

    /// Applies the source's RolloutPolicy to this revision: which environments get it now
    /// and which keep the revision they run. Records the rollout's status.
    pub async fn roll(
        &mut self,
        at: Context<'_>,
        history: &mut History,
        revision: &Revision,
        loaded: &Arc<Loaded>,
    ) -> Rolled {
        let mut rolled = Rolled {
            loaded: loaded.clone(),
            held: BTreeMap::new(),
            untouchable: BTreeSet::new(),
        };
        let policy = match &loaded.rollout {
            manifest::Rollout::None => {
                self.record(at, None).await;
                return rolled;
            }
            manifest::Rollout::Policy { policy, .. } => Ok(policy.clone()),
            manifest::Rollout::Invalid(reason) => Err(reason.clone()),
        };
        let stands = self.positions(at.cluster, history, revision, loaded).await;
        let health = self.health_as_applied();
        let members: Vec<Member<'_>> = loaded
            .environments
            .iter()
            .zip(&stands)
            .map(|(e, (position, _))| Member {
                name: &e.environment.metadata.name,
                labels: &e.environment.metadata.labels,
                position: *position,
            })
            .collect();
        let decision = match &policy {
            Ok(p) => rollout::decide(p, &revision.id, &members, &health),
            Err(reason) => rollout::hold_all(&revision.id, &members, reason),
        };
        drop(members);
        if !decision.held.is_empty() {
            let mut replaced = (**loaded).clone();
            for (i, e) in loaded.environments.iter().enumerate() {
                let name = &e.environment.metadata.name;
                let Some(kept) = stands[i].1.clone().filter(|_| decision.held.contains(name))
                else {
                    continue;
                };
                match history
                    .at(&kept)
                    .await
                    .and_then(|l| l.environment(name).cloned())
                {
                    Some(o) => replaced.environments[i] = o,
                    None => {
                        rolled.untouchable.insert(name.clone());
                    }
                }
                rolled.held.insert(name.clone(), kept);
            }
            rolled.loaded = Arc::new(replaced);
        }
        self.record(at, Some(decision.status)).await;
        rolled
    }

    /// Where each environment of `loaded` stands against `revision`, and the revision it
    /// runs (as its namespace records it).
    async fn positions(
        &self,
        cluster: &Cluster,
        history: &mut History,
        revision: &Revision,
        loaded: &Loaded,
    ) -> Vec<(Position, Option<String>)> {
        let annotations = cluster.cache.namespace_annotations();
        let mut stands = Vec::new();
        for e in &loaded.environments {
            let recorded = annotations
                .get(&e.environment.namespace())
                .and_then(|a| a.get(status::REVISION_ANNOTATION))
                .filter(|r| !r.is_empty())
                .cloned();
            let position = match &recorded {
                None => Position::New,
                Some(r) if *r == revision.id => Position::AtTarget,
                Some(r) => {
                    let same = history.at(r).await.is_some_and(|old| {
                        old.environment(&e.environment.metadata.name)
                            .is_some_and(|o| o.environment == e.environment)
                    });
                    if same {
                        Position::AtTarget
                    } else {
                        Position::Behind
                    }
                }
            };
            stands.push((position, recorded));
        }
        stands
    }

    /// Health as of what this process applied: a judgement from a watch that has not yet
    /// seen the applied StatefulSets would let a wave start on the old version's Ready.
    fn health_as_applied(&self) -> BTreeMap<String, Health> {
        let judged = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let none = BTreeMap::new();
        judged
            .iter()
            .map(|(env, j)| {
                let applied = self.applied_stateful_sets.get(env).unwrap_or(&none);
                (
                    env.clone(),
                    health::as_of_apply(&j.health, &j.seen, applied),
                )
            })
            .collect()
    }

    /// Remembers the desired-hash of each StatefulSet the pass wrote or tried to write (a
    /// failed write must not count as Ready on the old version either), and forgets
    /// environments that left the source.
    pub fn note_applied(&mut self, loaded: &Loaded, changes: &[Change]) {
        for c in changes {
            if c.key.kind != ObjectKind::StatefulSet {
                continue;
            }
            let hash = c.object.as_ref().and_then(|o| {
                o.pointer("/metadata/annotations")?
                    .get(HASH_ANNOTATION)?
                    .as_str()
            });
            let written = self
                .applied_stateful_sets
                .entry(c.environment.clone())
                .or_default();
            match hash {
                Some(h) if c.action != Action::Delete => {
                    written.insert(c.key.name.clone(), h.to_string());
                }
                _ => {
                    written.remove(&c.key.name);
                }
            }
        }
        self.applied_stateful_sets
            .retain(|env, written| !written.is_empty() && loaded.environment(env).is_some());
    }

    /// Publishes the rollout's status: metrics always; the ConfigMap, the log and an Event
    /// on a new halt only when it changed (with sharding: by the replica that owns
    /// `ROLLOUT_RECORDER`).
    async fn record(&mut self, at: Context<'_>, status: Option<RolloutStatus>) {
        let s = status.clone().unwrap_or_default();
        rollout_metrics(at.metrics, &s);
        self.waiting = s.current_wave.is_some();
        // With sharding every replica decides the same rollout; one of them records it.
        let records = at.shard.is_none_or(|m| m.may_write(ROLLOUT_RECORDER));
        if !records || self.recorded.as_ref() == status.as_ref() {
            return;
        }
        let newly_halted = s.halted.as_ref().filter(|h| {
            self.recorded
                .as_ref()
                .and_then(|r| r.halted.as_ref())
                .is_none_or(|old| old.environment != h.environment || old.reason != h.reason)
        });
        if let Some(h) = newly_halted {
            tracing::error!(revision = %s.revision, environment = %h.environment, reason = %h.reason, message = %h.message, "rollout halted");
            if h.environment != "-" {
                at.cluster
                    .events
                    .publish(
                        &manifest::namespace_for(&h.environment),
                        true,
                        "RolloutHalted",
                        format!(
                            "revision {} halted: {} is Degraded ({}: {})",
                            s.revision, h.environment, h.reason, h.message
                        ),
                    )
                    .await;
            }
        } else if status.is_some() {
            tracing::info!("{}", s.summary());
        }
        let c = at.cluster;
        match status::write_rollout(&c.client, &c.namespace, &c.instance, &s).await {
            Ok(()) => self.recorded = status,
            Err(e) => tracing::warn!(error = %error_chain(&e), "recording the rollout's status"),
        }
    }
}

/// What the rollout step reads of the loop's other parts.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub cluster: &'a Cluster,
    pub shard: Option<&'a Shard>,
    pub metrics: &'a Metrics,
}

/// The rollout's gauges.
fn rollout_metrics(metrics: &Metrics, s: &RolloutStatus) {
    use crate::metrics::{RolloutLabels, RolloutPhase};
    for (phase, n) in [
        (RolloutPhase::Done, s.done),
        (RolloutPhase::InFlight, s.in_flight),
        (RolloutPhase::Waiting, s.waiting),
    ] {
        metrics
            .rollout_environments
            .get_or_create(&RolloutLabels { phase })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    metrics.rollout_wave.set(
        s.current_wave
            .map_or(0, |w| i64::try_from(w).unwrap_or(i64::MAX)),
    );
    metrics.rollout_halted.set(i64::from(s.halted.is_some()));
}
