//! Step 6, publish: what the pass came to, told to the others. Each environment's status on
//! its namespace (written only when it changed), Events, refusals in the log (once each),
//! and the certificate targets, which wake the certificate worker when they change or a
//! namespace was created.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use tokio::sync::watch;

use super::outcome::Recorded;
use super::parts::Cluster;
use crate::certs::CERTIFICATE_ANNOTATION;
use crate::certs::reconcile::Target;
use crate::metrics::{ApiVerb, Metrics};
use crate::pass::{Outcome, PassOptions, PassPlan};
use crate::plan::Action;
use crate::status::{self, EnvState, EnvStatus};
use crate::vocab::{ObjectKind, error_chain};

/// What this process has published.
pub struct Published {
    /// Status last written per environment.
    written: BTreeMap<String, Recorded>,
    /// Refused environments already logged at error level (logged once, not every pass).
    refusals_reported: BTreeSet<String>,
    /// Wakes the certificate worker with the environments that want certificates.
    cert_targets: watch::Sender<Vec<Target>>,
}

/// One Event: namespace, whether a warning, reason, note.
type Event = (String, bool, &'static str, String);

impl Published {
    pub fn new(cert_targets: watch::Sender<Vec<Target>>) -> Published {
        Published {
            written: BTreeMap::new(),
            refusals_reported: BTreeSet::new(),
            cert_targets,
        }
    }

    /// Statuses last written, by environment.
    pub fn written(&self) -> &BTreeMap<String, Recorded> {
        &self.written
    }

    /// Whether `env` was last recorded as applied.
    pub fn applied(&self, env: &str) -> bool {
        self.written
            .get(env)
            .is_some_and(|w| w.state == EnvState::Applied)
    }

    /// Logs each refused environment once (not every pass).
    pub fn refusals(&mut self, outcome: &Outcome) {
        for (env, reason) in &outcome.refused {
            if self.refusals_reported.insert(env.clone()) {
                tracing::error!(environment = %env, reason = %reason, "refused");
            }
        }
    }

    /// Hands the certificate targets to the worker when they changed, or when a namespace
    /// was (re)created (otherwise it keeps its own schedule).
    pub fn certificate_targets(&self, outcome: &Outcome, pass: &PassPlan) {
        let created_namespace = pass
            .plan
            .changes
            .iter()
            .any(|c| c.key.kind == ObjectKind::Namespace && c.action == Action::Create);
        let names = |t: &[Target]| -> Vec<(String, Vec<String>)> {
            t.iter()
                .map(|t| (t.environment.clone(), t.names.clone()))
                .collect()
        };
        if created_namespace || names(&self.cert_targets.borrow()) != names(&outcome.certificates) {
            self.cert_targets.send_replace(outcome.certificates.clone());
        }
    }

    /// Writes the statuses that changed onto their namespaces, and the Events, each set
    /// `concurrency` at a time.
    pub async fn statuses(
        &mut self,
        cluster: &Cluster,
        metrics: &Metrics,
        statuses: Vec<EnvStatus>,
        what: Pass<'_>,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let (annotate, publish) = self.changed(statuses, &what);
        let concurrency = what.options.concurrency.max(1);
        let written: Vec<bool> = futures::stream::iter(annotate.iter().map(|s| async {
            match status::annotate(&cluster.client, s, &now).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "writing status");
                    false
                }
            }
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
        metrics.count_api(
            ApiVerb::StatusPatch,
            written.iter().filter(|w| **w).count() as u64,
        );
        let events = &cluster.events;
        futures::stream::iter(
            publish
                .into_iter()
                .map(|(ns, warning, reason, note)| async move {
                    events.publish(&ns, warning, reason, note).await
                }),
        )
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    }

    /// The statuses to write (changed, and not as the namespace has them already) and the
    /// Events to publish; remembers what is written.
    fn changed(
        &mut self,
        statuses: Vec<EnvStatus>,
        what: &Pass<'_>,
    ) -> (Vec<EnvStatus>, Vec<Event>) {
        let (outcome, live) = (what.outcome, &what.pass.live_namespaces);
        let mut annotate = Vec::new();
        let mut publish: Vec<Event> = Vec::new();
        // An environment another replica writes is recorded afresh if it comes back.
        self.written.retain(|name, _| what.options.writes(name));
        for s in statuses {
            let key = Recorded {
                revision: s.revision.clone(),
                state: s.state,
                error: s.error.clone(),
            };
            let recorded = live.get(&s.namespace);
            let same_as_live = recorded.is_some_and(|a| {
                a.get(status::REVISION_ANNOTATION) == Some(&s.revision)
                    && a.get(status::STATE_ANNOTATION).map(String::as_str) == Some(s.state.as_str())
                    && a.get(status::ERROR_ANNOTATION) == s.error.as_ref()
                    && a.get(CERTIFICATE_ANNOTATION).map(String::as_str) == s.certificate
            });
            let touched = outcome.touched.get(&s.environment);
            let namespace_exists = recorded.is_some() || touched.is_some();
            let changed = self.written.insert(s.environment.clone(), key.clone()) != Some(key);
            let note = s.error.clone().unwrap_or_default();
            match (s.state, touched) {
                // Nothing is written into a namespace that is not ours, Events included.
                _ if outcome.refused.contains_key(&s.environment) => {}
                (EnvState::Failed, _) if changed => {
                    publish.push((s.namespace.clone(), true, "ApplyFailed", note))
                }
                (EnvState::Invalid, _) if changed && namespace_exists => publish.push((
                    s.namespace.clone(),
                    true,
                    "InvalidManifest",
                    format!("kept at its last applied state: {note}"),
                )),
                (EnvState::Applied, Some(t)) => publish.push((
                    s.namespace.clone(),
                    false,
                    "Applied",
                    format!(
                        "revision {}: {} object(s) applied, {} deleted",
                        what.revision, t.applied, t.deleted
                    ),
                )),
                _ => {}
            }
            if !same_as_live && namespace_exists && changed {
                annotate.push(s);
            }
        }
        (annotate, publish)
    }
}

/// The pass whose statuses are published.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    pub revision: &'a str,
    pub pass: &'a PassPlan,
    pub options: &'a PassOptions,
    pub outcome: &'a Outcome,
}
