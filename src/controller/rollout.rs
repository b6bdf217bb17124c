//! The controller's side of rollouts in waves: where each environment stands against a new
//! revision (from its namespace's recorded revision and the manifests of earlier revisions,
//! kept in memory or read again from Git), the pure decision (`crate::rollout::decide`), the
//! manifests the pass renders (held environments from the revision they run), and the
//! rollout's status (ConfigMap, metrics, log, Events). Writes nothing but that status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::run::{HISTORY, Loop, POLL_TIMEOUT, Revision};
use crate::health::{self, Health};
use crate::manifest;
use crate::plan::{Action, Change};
use crate::rollout::{self, Member, Position, RolloutStatus};
use crate::status;
use crate::vocab::error_chain;
use crate::vocab::{HASH_ANNOTATION, ObjectKind};

/// With sharding, the rollout's status is recorded by the replica that owns this name (it
/// is no environment's: environment names are DNS labels, without a colon).
pub(super) const ROLLOUT_RECORDER: &str = "rollout:status";

/// What the rollout made of a revision for one pass.
pub(super) struct Rolled {
    /// The manifests the pass renders: the revision's, with held environments' replaced by
    /// those of the revision they run.
    pub(super) loaded: Arc<manifest::Loaded>,
    /// Held environments and the revision they stay on.
    pub(super) held: BTreeMap<String, String>,
    /// Held environments whose previous revision cannot be read: left out of the pass.
    pub(super) untouchable: BTreeSet<String>,
}

impl Loop {
    /// The validated manifests of an earlier revision: from this process's history, else
    /// read from Git (which keeps every fetched commit). `None` when it cannot be read.
    pub(super) async fn loaded_at(&mut self, id: &str) -> Option<Arc<manifest::Loaded>> {
        if let Some((_, l)) = self.history.iter().find(|(r, _)| r == id) {
            return Some(l.clone());
        }
        if self.unreadable.contains(id) {
            return None;
        }
        let git = self.git.clone()?;
        let (commit, max, load) = (
            id.to_string(),
            self.opts.max_file_size,
            self.opts.load.clone(),
        );
        let read = tokio::task::spawn_blocking(move || {
            let g = git.lock().unwrap_or_else(|e| e.into_inner());
            g.read(&commit, max)
                .map(|(files, problems)| {
                    manifest::load_with_unread(
                        &files,
                        &problems,
                        &load,
                        &mut manifest::Validated::default(),
                    )
                })
                .map_err(|e| error_chain(&e))
        });
        match tokio::time::timeout(POLL_TIMEOUT, read).await {
            Ok(Ok(Ok(loaded))) => {
                let loaded = Arc::new(loaded);
                self.history.push_back((id.to_string(), loaded.clone()));
                if self.history.len() > HISTORY {
                    self.history.pop_front();
                }
                Some(loaded)
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(revision = id, error = %e, "cannot read an earlier revision; environments held on it are left as they are");
                self.unreadable.insert(id.to_string());
                None
            }
            _ => {
                tracing::warn!(
                    revision = id,
                    "reading an earlier revision failed or timed out"
                );
                None
            }
        }
    }

    /// Remembers the desired-hash of each StatefulSet the pass wrote or tried to write (a
    /// failed write must not count as Ready on the old version either), and forgets
    /// environments that left the source.
    pub(super) fn note_applied_stateful_sets(
        &mut self,
        loaded: &manifest::Loaded,
        changes: &[Change],
    ) {
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

    /// Applies the source's RolloutPolicy to this revision: which environments get it now
    /// and which keep the revision they run. Records the rollout's status.
    pub(super) async fn roll(
        &mut self,
        revision: &Revision,
        loaded: &Arc<manifest::Loaded>,
    ) -> Rolled {
        let unrolled = Rolled {
            loaded: loaded.clone(),
            held: BTreeMap::new(),
            untouchable: BTreeSet::new(),
        };
        let policy = match &loaded.rollout {
            manifest::Rollout::None => {
                self.record_rollout(None).await;
                return unrolled;
            }
            manifest::Rollout::Policy { policy, .. } => Ok(policy.clone()),
            manifest::Rollout::Invalid(reason) => Err(reason.clone()),
        };
        let annotations = self.cache.namespace_annotations();
        // Health as of what this process applied: a judgement from a watch that has not yet
        // seen the applied StatefulSets would let a wave start on the old version's Ready.
        let health: BTreeMap<String, Health> = {
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
        };
        // Where each environment stands, and the revision it runs.
        let mut stands: Vec<(Position, Option<String>)> = Vec::new();
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
                    let same = self.loaded_at(r).await.is_some_and(|old| {
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
        let mut rolled = unrolled;
        if !decision.held.is_empty() {
            let mut replaced = (**loaded).clone();
            for (i, e) in loaded.environments.iter().enumerate() {
                let name = &e.environment.metadata.name;
                if !decision.held.contains(name) {
                    continue;
                }
                let Some(kept) = stands[i].1.clone() else {
                    continue;
                };
                let old = self.loaded_at(&kept).await;
                match old.and_then(|l| l.environment(name).cloned()) {
                    Some(o) => replaced.environments[i] = o,
                    None => {
                        rolled.untouchable.insert(name.clone());
                    }
                }
                rolled.held.insert(name.clone(), kept);
            }
            rolled.loaded = Arc::new(replaced);
        }
        self.record_rollout(Some(decision.status)).await;
        rolled
    }

    /// Publishes the rollout's status: metrics always; the ConfigMap, the log and an Event
    /// on a new halt only when it changed (with sharding: by the replica that owns
    /// `ROLLOUT_RECORDER`).
    pub(super) async fn record_rollout(&mut self, status: Option<RolloutStatus>) {
        use crate::metrics::{RolloutLabels, RolloutPhase};
        let s = status.clone().unwrap_or_default();
        for (phase, n) in [
            (RolloutPhase::Done, s.done),
            (RolloutPhase::InFlight, s.in_flight),
            (RolloutPhase::Waiting, s.waiting),
        ] {
            self.metrics
                .rollout_environments
                .get_or_create(&RolloutLabels { phase })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.metrics.rollout_wave.set(
            s.current_wave
                .map_or(0, |w| i64::try_from(w).unwrap_or(i64::MAX)),
        );
        self.metrics
            .rollout_halted
            .set(i64::from(s.halted.is_some()));
        self.rollout_waiting = s.current_wave.is_some();
        // With sharding every replica decides the same rollout; one of them records it.
        let records = self.membership.as_ref().is_none_or(|m| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .writable(tokio::time::Instant::now())
                .may_write(ROLLOUT_RECORDER)
        });
        if !records || self.rollout.as_ref() == status.as_ref() {
            return;
        }
        let newly_halted = s.halted.as_ref().filter(|h| {
            self.rollout
                .as_ref()
                .and_then(|r| r.halted.as_ref())
                .is_none_or(|old| old.environment != h.environment || old.reason != h.reason)
        });
        if let Some(h) = newly_halted {
            tracing::error!(revision = %s.revision, environment = %h.environment, reason = %h.reason, message = %h.message, "rollout halted");
            if h.environment != "-" {
                self.events
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
        let namespace = self.opts.cert_settings.namespace.clone();
        let instance = self.opts.pass.render.instance.clone();
        match status::write_rollout(&self.client, &namespace, &instance, &s).await {
            Ok(()) => self.rollout = status,
            Err(e) => tracing::warn!(error = %error_chain(&e), "recording the rollout's status"),
        }
    }
}
