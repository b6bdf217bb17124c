//! What a pass came to, environment by environment: which failed and why, which were
//! refused, which had objects written, and which get certificates. Computed once from the
//! plan and the apply's report, the same way for `envctl apply` and `envctl run`. Pure: no
//! I/O, no clock.
//!
//! Which environments get certificates is decided here, on purpose: every valid environment
//! with TLS enabled that this replica writes, except a refused one (its namespace is not
//! ours, so nothing is written into it, a certificate included). A failed environment keeps
//! its certificate: a write of one of its objects that failed does not make its hostname's
//! certificate less needed, and leaving it out would abandon its order in flight (with the
//! quota that order spent) each time a flapping environment fails. One whose namespace does
//! not exist yet is skipped by the certificate step itself, and not charged.

use std::collections::BTreeMap;

use super::{PassOptions, PassPlan};
use crate::apply::Report;
use crate::certs::reconcile::{Target, targets};
use crate::cluster::FailureReason;
use crate::manifest::Loaded;
use crate::plan::Action;

/// Why an environment failed in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The first error: what was being done to which object, with the server's message.
    pub message: String,
    /// Its metric label.
    pub reason: FailureReason,
}

/// How many of an environment's objects a pass applied and deleted (planned writes, whether
/// or not each one then succeeded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    pub applied: usize,
    pub deleted: usize,
}

/// What a pass came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Environments whose read, dry-run or write failed; the others were applied.
    pub failed: BTreeMap<String, Failure>,
    /// Environments not planned because their namespace is not this instance's, with why.
    pub refused: BTreeMap<String, String>,
    /// Environments with objects to write.
    pub touched: BTreeMap<String, Touched>,
    /// The environments to certify (see the module's comment).
    pub certificates: Vec<Target>,
}

impl Outcome {
    /// The outcome of `pass` (planned from `loaded` with `options`) once `report` says how
    /// its writes went.
    pub fn of(loaded: &Loaded, pass: &PassPlan, report: &Report, options: &PassOptions) -> Self {
        let failed = Self::failures(pass, report);
        let refused: BTreeMap<String, String> = pass
            .plan
            .refused
            .iter()
            .map(|r| (r.environment.clone(), r.reason.clone()))
            .collect();
        let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
        for c in &pass.plan.changes {
            let t = touched.entry(c.environment.clone()).or_default();
            if c.action == Action::Delete {
                t.deleted += 1;
            } else {
                t.applied += 1;
            }
        }
        let certificates = targets(
            loaded
                .environments
                .iter()
                .map(|e| &e.environment)
                .filter(|e| !refused.contains_key(&e.metadata.name))
                .filter(|e| options.writes(&e.metadata.name)),
        );
        Outcome {
            failed,
            refused,
            touched,
            certificates,
        }
    }

    /// Each environment that failed in `pass`, with its first error: a read or dry-run the
    /// server refused or left unanswered, else an object that could not be written.
    pub fn failures(pass: &PassPlan, report: &Report) -> BTreeMap<String, Failure> {
        let mut failed: BTreeMap<String, Failure> = BTreeMap::new();
        for f in &pass.plan.failed {
            let reason = pass
                .failure_reasons
                .get(&f.environment)
                .copied()
                .unwrap_or(FailureReason::Other);
            failed.insert(
                f.environment.clone(),
                Failure {
                    message: f.reason.clone(),
                    reason,
                },
            );
        }
        for f in &report.failures {
            failed
                .entry(f.environment.clone())
                .or_insert_with(|| Failure {
                    message: format!("{} {}: {}", f.action.as_str(), f.object, f.error),
                    reason: f.reason.unwrap_or(FailureReason::Other),
                });
        }
        failed
    }

    /// The environments that failed or were refused, each with its message.
    pub fn not_applied(&self) -> BTreeMap<String, String> {
        let mut all: BTreeMap<String, String> = self
            .failed
            .iter()
            .map(|(e, f)| (e.clone(), f.message.clone()))
            .collect();
        for (e, reason) in &self.refused {
            all.entry(e.clone()).or_insert_with(|| reason.clone());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply;
    use crate::manifest::{LoadOptions, load};
    use crate::plan::EnvironmentError;
    use crate::source::SourceFile;

    fn environment(name: &str, tls: bool) -> SourceFile {
        SourceFile {
            path: format!("{name}.yaml"),
            bytes: format!(
                "apiVersion: envctl.materialize.cloud/v1alpha1
kind: Environment
metadata:
  name: {name}
spec:
  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11
  region: aws/us-east-1
  hostname: {name}.example.cloud
  tls: {{enabled: {tls}}}
  environmentd: {{image: materialize/environmentd:v0.130.0}}
"
            )
            .into_bytes(),
        }
    }

    fn options() -> PassOptions {
        PassOptions {
            render: Default::default(),
            prune: crate::plan::PrunePolicy {
                enabled: false,
                allow_mass_prune: false,
                max_prune: crate::plan::MaxPrune::Count(0),
            },
            concurrency: 1,
            diffs: false,
            scope: None,
            adopt: false,
            writable: None,
            progress: None,
            in_sync: None,
            regions: None,
        }
    }

    /// Applied, failed (a dry-run, then a write), refused, and without TLS: only the refused
    /// environment and the one without TLS go without a certificate; each failure keeps its
    /// first message and its label.
    #[test]
    fn failed_environments_keep_their_certificates_refused_ones_do_not() {
        let loaded = load(
            &[
                environment("applied", true),
                environment("dry-run-failed", true),
                environment("write-failed", true),
                environment("refused", true),
                environment("plain", false),
            ],
            &LoadOptions::default(),
        );
        assert_eq!(loaded.environments.len(), 5, "{:?}", loaded.diagnostics);
        let mut pass = PassPlan::default();
        pass.plan.failed.push(EnvironmentError {
            environment: "dry-run-failed".into(),
            reason: "dry-run of StatefulSet x: refused (422)".into(),
        });
        pass.failure_reasons
            .insert("dry-run-failed".into(), FailureReason::Invalid);
        pass.plan.refused.push(EnvironmentError {
            environment: "refused".into(),
            reason: "namespace env-refused belongs to another instance".into(),
        });
        let failure = |env: &str, error: &str| apply::Failure {
            object: format!("StatefulSet env-{env}/environmentd"),
            environment: env.into(),
            action: Action::Update,
            error: error.into(),
            unreachable: false,
            reason: Some(FailureReason::Forbidden),
        };
        let report = Report {
            applied: 0,
            deleted: 0,
            failures: vec![
                failure("write-failed", "first"),
                failure("write-failed", "second"),
            ],
        };
        let outcome = Outcome::of(&loaded, &pass, &report, &options());
        let certified: Vec<&str> = outcome
            .certificates
            .iter()
            .map(|t| t.environment.as_str())
            .collect();
        assert_eq!(certified, ["applied", "dry-run-failed", "write-failed"]);
        assert_eq!(
            outcome.failed["write-failed"],
            Failure {
                message: "update StatefulSet env-write-failed/environmentd: first".into(),
                reason: FailureReason::Forbidden,
            }
        );
        assert_eq!(
            outcome.failed["dry-run-failed"].reason,
            FailureReason::Invalid
        );
        assert_eq!(
            outcome.not_applied().keys().collect::<Vec<_>>(),
            ["dry-run-failed", "refused", "write-failed"]
        );
    }

    /// With sharding, the environments another replica writes get no certificate here.
    #[test]
    fn another_replicas_environments_are_not_certified_here() {
        let names: Vec<String> = (0..8).map(|i| format!("env-{i}")).collect();
        let files: Vec<SourceFile> = names.iter().map(|n| environment(n, true)).collect();
        let loaded = load(&files, &LoadOptions::default());
        let members: std::collections::BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let now = tokio::time::Instant::now();
        let mut membership = crate::shard::Membership::new("a", std::time::Duration::ZERO);
        membership.observe(Some(members.clone()), now);
        let mut options = options();
        options.writable = Some(membership.writable(now));
        let outcome = Outcome::of(&loaded, &PassPlan::default(), &Report::default(), &options);
        let mine: Vec<&str> = names
            .iter()
            .filter(|n| crate::shard::owner(n, &members) == Some("a"))
            .map(String::as_str)
            .collect();
        assert!(!mine.is_empty() && mine.len() < names.len(), "{mine:?}");
        let certified: Vec<&str> = outcome
            .certificates
            .iter()
            .map(|t| t.environment.as_str())
            .collect();
        assert_eq!(certified, mine);
    }
}
