//! One pass of the controller's loop, as named steps, each in a file of its own (with its
//! own error type where it can fail):
//!
//! 1. `load`: the revision's manifests, validated, and the history a rollout reads.
//! 2. `rollout`: which environments the revision reaches now; the others keep theirs.
//! 3. `scope`: which environments this pass plans (changed files, backoff).
//! 4. `plan_apply`: the shared pass plans and applies (a shard change stops its writes).
//! 5. `outcome`: what the pass came to (`pass::Outcome`) as each environment's status.
//! 6. `publish`: statuses on namespaces, Events, refusals, certificate targets.
//! 7. `report`: the log line and the pass's metrics.
//!
//! `Loop` holds the parts the steps keep between passes; this file owns the order of the
//! steps and nothing else.

mod load;
mod outcome;
mod parts;
mod plan_apply;
mod publish;
mod report;
mod rollout;
mod scope;

use std::sync::Arc;
use std::time::Instant;

pub use load::History;
pub use parts::{Cluster, Shard};
pub use publish::Published;
pub use rollout::Rollouts;
pub use scope::Backoff;

use super::poll::Revision;
use crate::metrics::Metrics;
use crate::pass::{InSync, Outcome, PassOptions};
use crate::status::{Trigger, TriggerLabels};
use crate::vocab::error_chain;

/// What the loop keeps between passes, in named parts.
pub struct Loop {
    pub cluster: Cluster,
    pub metrics: Arc<Metrics>,
    /// The pass's settings, as given (each pass narrows a copy).
    pub pass: PassOptions,
    /// No ACME directory is configured (TLS environments are noted as without one).
    pub certs_unconfigured: bool,
    pub history: History,
    pub rollouts: Rollouts,
    pub backoff: Backoff,
    pub shard: Option<Shard>,
    /// Environments found in sync, which a pass need not render or read again while their
    /// manifest and live objects stay as they were (forgotten on every resync).
    pub in_sync: Arc<InSync>,
    pub published: Published,
}

impl Loop {
    /// One pass over `revision`. `scoped`: plan only the environments whose files changed
    /// in this revision (plus any not known to be applied); drift, webhook-less resyncs and
    /// the first pass plan all.
    pub async fn reconcile(&mut self, revision: &Revision, trigger: Trigger, scoped: bool) {
        let started = Instant::now();
        self.metrics
            .reconciles
            .get_or_create(&TriggerLabels { trigger })
            .inc();
        // 1, 2: load; the rollout.
        let loaded = self.history.load(revision);
        let context = rollout::Context {
            cluster: &self.cluster,
            shard: self.shard.as_ref(),
            metrics: &self.metrics,
        };
        let rolled = self
            .rollouts
            .roll(context, &mut self.history, revision, &loaded)
            .await;
        let load = started.elapsed();
        // 3: scope.
        let mut options = self.pass.clone();
        options.writable = self
            .shard
            .as_ref()
            .map(|s| s.writable(&rolled.loaded, &self.metrics));
        if trigger == Trigger::Resync {
            self.in_sync.forget(); // the periodic resync plans every environment in full
        }
        options.in_sync = Some(self.in_sync.clone());
        let published = &self.published;
        options.scope = self
            .backoff
            .scope(revision, &rolled, scoped, |e| published.applied(e));
        // 4: plan and apply.
        let planned = plan_apply::plan_and_apply(
            &self.cluster,
            self.shard.as_ref(),
            &self.metrics,
            &rolled.loaded,
            &options,
        )
        .await;
        let (pass, applied) = match planned {
            Ok(p) => p,
            Err(e) => {
                return tracing::error!(error = %error_chain(&e), "planning failed; nothing was changed");
            }
        };
        self.rollouts
            .note_applied(&rolled.loaded, &pass.plan.changes);
        let plan_apply::Applied::Done { report, took } = applied else {
            return tracing::warn!(revision = %revision.id, "the shard's members changed during the pass: its remaining writes are left to the next pass");
        };
        // 5: outcome.
        let outcome = Outcome::of(&rolled.loaded, &pass, &report, &options);
        let statuses = outcome::statuses(
            &outcome::Pass {
                revision,
                rolled: &rolled,
                options: &options,
                outcome: &outcome,
                unconfigured: self.certs_unconfigured,
            },
            self.published.written(),
            &mut self.backoff,
            &self.metrics,
        );
        // 6: publish.
        self.published.refusals(&outcome);
        self.published.certificate_targets(&outcome, &pass);
        let what = publish::Pass {
            revision: &revision.id,
            pass: &pass,
            options: &options,
            outcome: &outcome,
        };
        self.published
            .statuses(&self.cluster, &self.metrics, statuses, what)
            .await;
        // 7: report.
        let took = report::Took {
            all: started.elapsed(),
            load,
            apply: took,
        };
        report::report(
            &self.metrics,
            &revision.id,
            trigger,
            (&rolled.loaded, &pass, &report),
            self.in_sync.len(),
            &took,
        );
    }
}
