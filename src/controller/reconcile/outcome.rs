//! Step 5, outcome: what the pass came to (`pass::Outcome`, shared with `envctl apply`)
//! becomes each environment's status: failed ones back off, applied ones are cleared, the
//! ones this pass did not plan keep what was last recorded; and the state metrics.

use std::collections::BTreeMap;

use super::super::poll::Revision;
use super::rollout::Rolled;
use super::scope::Backoff;
use crate::certs::UNCONFIGURED_NOTE;
use crate::metrics::Metrics;
use crate::pass::{Outcome, PassOptions};
use crate::status::{EnvState, EnvStatus};

/// An environment's status as this process last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub revision: String,
    pub state: EnvState,
    pub error: Option<String>,
}

/// What the outcome step reads.
pub struct Pass<'a> {
    pub revision: &'a Revision,
    pub rolled: &'a Rolled,
    pub options: &'a PassOptions,
    pub outcome: &'a Outcome,
    /// No ACME directory is configured: TLS environments are noted as without a
    /// certificate.
    pub unconfigured: bool,
}

/// Each environment's status after the pass (the ones this replica writes), the invalid
/// ones included; counted in the state metrics.
pub fn statuses(
    pass: &Pass<'_>,
    written: &BTreeMap<String, Recorded>,
    backoff: &mut Backoff,
    metrics: &Metrics,
) -> Vec<EnvStatus> {
    for (env, f) in &pass.outcome.failed {
        backoff.failed(metrics, env, f.reason, &f.message);
    }
    let not_applied = pass.outcome.not_applied();
    let loaded = &pass.rolled.loaded;
    let mut counts: BTreeMap<EnvState, i64> = BTreeMap::new();
    let mut statuses = Vec::new();
    let mut without_certificate = 0i64;
    for env in loaded
        .environments
        .iter()
        .filter(|e| pass.options.writes(&e.environment.metadata.name))
    {
        let name = env.environment.metadata.name.clone();
        let certificate =
            (pass.unconfigured && env.environment.spec.tls.enabled).then_some(UNCONFIGURED_NOTE);
        without_certificate += i64::from(certificate.is_some());
        let previous = written.get(&name);
        let (state, error) = match not_applied.get(&name) {
            Some(e) => (EnvState::Failed, Some(e.clone())),
            // Not planned this pass (out of scope or backing off): as last recorded.
            None if !pass.options.plans(&name) => {
                previous.map_or((EnvState::Applied, None), |p| (p.state, p.error.clone()))
            }
            None => {
                backoff.succeeded(&name);
                (EnvState::Applied, None)
            }
        };
        *counts.entry(state).or_default() += 1;
        let file_changed = pass
            .revision
            .changed
            .as_ref()
            .is_none_or(|c| c.contains(&env.origin.file));
        let revision = if let Some(kept) = pass.rolled.held.get(&name) {
            kept.clone()
        } else if file_changed || pass.outcome.touched.contains_key(&name) || previous.is_none() {
            pass.revision.id.clone()
        } else {
            previous.map_or(pass.revision.id.clone(), |p| p.revision.clone())
        };
        statuses.push(EnvStatus {
            namespace: env.environment.namespace(),
            environment: name,
            revision,
            state,
            error,
            certificate,
        });
    }
    for name in loaded
        .invalid_names
        .iter()
        .filter(|n| pass.options.writes(n))
    {
        *counts.entry(EnvState::Invalid).or_default() += 1;
        let reason = loaded
            .invalid_reasons
            .get(name)
            .cloned()
            .unwrap_or_else(|| "invalid manifest".into());
        statuses.push(EnvStatus {
            namespace: crate::manifest::namespace_for(name),
            environment: name.clone(),
            revision: written
                .get(name)
                .map(|p| p.revision.clone())
                .unwrap_or_default(),
            state: EnvState::Invalid,
            error: Some(reason),
            certificate: None,
        });
    }
    metrics.set_states(&counts);
    metrics.certs.unconfigured.set(without_certificate);
    if without_certificate > 0 {
        tracing::warn!(
            environments = without_certificate,
            "TLS environments are applied without certificates: no ACME directory is configured (--acme-directory letsencrypt, letsencrypt-staging or a URL)"
        );
    }
    metrics.set_revision(&pass.revision.id);
    statuses
}
