//! What the certificate step tells its caller: each environment's outcome, the tally and the
//! printed lines. Pure: no I/O.

use serde::Serialize;

use crate::certs::ledger::{Limit, OrderKind};

/// What happened to one environment's certificate.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// A valid certificate is in place.
    Current {
        serial: String,
        not_after: String,
        /// When it is due for renewal: inside the CA's ARI window, else with a third of
        /// its lifetime left.
        renews_at: String,
    },
    /// Restored from the controller's copy: no order.
    Reused {
        serial: String,
        not_after: String,
    },
    Issued {
        serial: String,
        not_after: String,
        kind: OrderKind,
        /// With a third of its lifetime left (the CA's ARI window, asked on the next pass,
        /// may move it).
        renews_at: String,
    },
    /// Waiting for quota: ordered at `until` at the earliest.
    Waiting {
        until: String,
        limit: Limit,
    },
    /// The namespace does not exist yet (its objects were not applied).
    NoNamespace,
    /// Another writer's order for it is in flight (the controller's, or another `apply`'s):
    /// left to that writer, not ordered again.
    InProgress {
        by: String,
    },
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvOutcome {
    pub environment: String,
    pub namespace: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Default, Serialize)]
pub struct CertReport {
    pub environments: Vec<EnvOutcome>,
    /// New orders sent to the ACME server in this pass.
    pub orders_sent: usize,
    /// When the step should run again on its own (earliest wait or renewal), unix seconds.
    #[serde(skip)]
    pub next_wake: Option<u64>,
}

/// How many environments ended each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub current: usize,
    pub reused: usize,
    pub issued: usize,
    pub waiting: usize,
    pub no_namespace: usize,
    pub in_progress: usize,
    pub failed: usize,
}

impl CertReport {
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for e in &self.environments {
            *match e.outcome {
                Outcome::Current { .. } => &mut t.current,
                Outcome::Reused { .. } => &mut t.reused,
                Outcome::Issued { .. } => &mut t.issued,
                Outcome::Waiting { .. } => &mut t.waiting,
                Outcome::NoNamespace => &mut t.no_namespace,
                Outcome::InProgress { .. } => &mut t.in_progress,
                Outcome::Failed { .. } => &mut t.failed,
            } += 1;
        }
        t
    }

    /// One line per environment and a summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for e in &self.environments {
            let line = match &e.outcome {
                Outcome::Current {
                    serial,
                    not_after,
                    renews_at,
                } => {
                    format!("current, serial {serial}, expires {not_after}, renews {renews_at}")
                }
                Outcome::Reused { serial, not_after } => format!(
                    "reused the controller's copy, serial {serial}, expires {not_after} (no order)"
                ),
                Outcome::Issued {
                    serial,
                    not_after,
                    kind,
                    renews_at,
                } => format!(
                    "issued ({}), serial {serial}, expires {not_after}, renews {renews_at}",
                    match kind {
                        OrderKind::New => "new",
                        OrderKind::Renewal => "renewal",
                        OrderKind::AriRenewal => "ARI renewal",
                    }
                ),
                Outcome::Waiting { until, limit } => {
                    format!("waiting for quota ({limit}) until {until}")
                }
                Outcome::NoNamespace => "skipped: its namespace does not exist".into(),
                Outcome::InProgress { by } => {
                    format!("in progress: {by} has an order in flight for it (not ordered again)")
                }
                Outcome::Failed { error } => format!("failed: {error}"),
            };
            out.push_str(&format!("certificate {}: {line}\n", e.environment));
        }
        let t = self.tally();
        out.push_str(&format!(
            "certificates: {} current, {} reused, {} issued, {} waiting, {} in progress elsewhere, {} failed; {} order(s) sent\n",
            t.current, t.reused, t.issued, t.waiting, t.in_progress, t.failed, self.orders_sent,
        ));
        out
    }
}

impl Outcome {
    /// A failure, with the error's whole chain as one line.
    pub fn failed(e: &dyn std::error::Error) -> Outcome {
        Outcome::Failed {
            error: crate::vocab::error_chain(e),
        }
    }
}
