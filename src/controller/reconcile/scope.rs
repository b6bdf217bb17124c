//! Step 3, scope and backoff: which environments this pass plans. A revision whose changed
//! files are known plans only the environments in them (and any not known to be applied);
//! a failing environment waits out its own backoff unless its file changed (a fix was
//! pushed), while the others go on; a held environment whose revision cannot be read is
//! left out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::super::poll::Revision;
use super::rollout::Rolled;
use crate::cluster::FailureReason;
use crate::metrics::{FailureLabels, Metrics};

/// A failing environment is tried again after 2 s, 4 s, 8 s ... at most 5 minutes apart.
const FIRST: Duration = Duration::from_secs(1);
const MAX: Duration = Duration::from_secs(300);

/// Failing environments: failures in a row, and when the next try is due.
pub struct Backoff {
    due: BTreeMap<String, (u32, Instant)>,
    /// When the last pass started.
    last_pass_at: Instant,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff {
            due: BTreeMap::new(),
            last_pass_at: Instant::now(),
        }
    }

    /// When the earliest failing environment is due again; never sooner than a second after
    /// the previous pass, so that no state can make retries spin.
    pub fn next_retry(&self) -> Option<Instant> {
        let earliest = self.due.values().map(|b| b.1).min()?;
        Some(earliest.max(self.last_pass_at + Duration::from_secs(1)))
    }

    /// The environments this pass plans (`None`: all), as said in the module's comment.
    /// `scoped`: the pass was asked for by a new revision; `applied`: whether an environment
    /// is known to be applied.
    pub fn scope(
        &mut self,
        revision: &Revision,
        rolled: &Rolled,
        scoped: bool,
        applied: impl Fn(&str) -> bool,
    ) -> Option<BTreeSet<String>> {
        let loaded = &rolled.loaded;
        self.last_pass_at = Instant::now();
        // An environment that left the source (or became invalid) has nothing to retry.
        self.due
            .retain(|name, _| loaded.environment(name).is_some());
        let now = Instant::now();
        let backing_off = |name: &str| self.due.get(name).is_some_and(|b| b.1 > now);
        let file_changed = |file: &str| revision.changed.as_ref().is_some_and(|c| c.contains(file));
        let names = |keep: &dyn Fn(&crate::manifest::LoadedEnvironment) -> bool| {
            loaded
                .environments
                .iter()
                .filter(|e| keep(e))
                .map(|e| e.environment.metadata.name.clone())
                .collect::<BTreeSet<String>>()
        };
        let mut scope = if let (true, Some(changed)) = (scoped, &revision.changed) {
            let scope = names(&|e| {
                let name = &e.environment.metadata.name;
                changed.contains(&e.origin.file) || !applied(name) && !backing_off(name)
            });
            tracing::debug!(
                environments = scope.len(),
                "planning only the environments that changed"
            );
            Some(scope)
        } else if self.due.values().any(|b| b.1 > now) {
            Some(names(&|e| {
                !backing_off(&e.environment.metadata.name) || file_changed(&e.origin.file)
            }))
        } else {
            None
        };
        if !rolled.untouchable.is_empty() {
            let scope = scope.get_or_insert_with(|| names(&|_| true));
            scope.retain(|name| !rolled.untouchable.contains(name));
        }
        scope
    }

    /// `env` failed again: counted, logged, and due after a longer wait.
    pub fn failed(&mut self, metrics: &Metrics, env: &str, reason: FailureReason, error: &str) {
        metrics
            .environment_failures
            .get_or_create(&FailureLabels { reason })
            .inc();
        let now = Instant::now();
        let entry = self.due.entry(env.to_string()).or_insert((0, now));
        entry.0 += 1;
        let wait = FIRST.saturating_mul(1 << entry.0.min(16)).min(MAX);
        entry.1 = now + wait;
        tracing::warn!(environment = %env, attempt = entry.0, retry_in = ?wait, reason = ?reason, error = %error, "environment failed; the others go on");
    }

    /// `env` was applied: no longer failing.
    pub fn succeeded(&mut self, env: &str) {
        self.due.remove(env);
    }
}
