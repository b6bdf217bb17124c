//! The certificate worker: runs the certificate step (`certs::reconcile`) when the loop's
//! certificate targets change, when a waiting order or a renewal falls due, and on every
//! resync; only while this replica leads and its Lease is current.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use tokio::sync::watch;

use super::shard::SharedMembership;
use crate::certs::acme::AcmeConfig;
use crate::certs::challenges::Challenges;
use crate::certs::reconcile::{CertReport, CertSettings, Certs, Target};
use crate::cluster::WriteFence;
use crate::status::{Events, Metrics};
use crate::vocab::error_chain;

/// The first wait before setting up the ACME account again after a failure; it doubles up to
/// `ACCOUNT_RETRY_LAST`.
const ACCOUNT_RETRY_FIRST: Duration = Duration::from_secs(5);
const ACCOUNT_RETRY_LAST: Duration = Duration::from_secs(300);

/// How soon a round that failed, or left an environment without its namespace, is tried
/// again.
const ROUND_RETRY: Duration = Duration::from_secs(30);

/// What the worker works with.
pub struct CertWorker {
    pub client: Client,
    pub config: AcmeConfig,
    pub settings: CertSettings,
    pub challenges: Arc<Challenges>,
    pub metrics: Arc<Metrics>,
    /// The environments to certify, as the loop last decided (`pass::Outcome`).
    pub targets: watch::Receiver<Vec<Target>>,
    pub lead: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
    pub resync: Duration,
    pub membership: Option<SharedMembership>,
    pub fence: WriteFence,
}

impl CertWorker {
    /// Runs until `stop` or until the loop drops its side of `targets`.
    pub async fn run(mut self) {
        let events = Events::new(self.client.clone(), &self.settings.instance);
        let mut certs: Option<Certs> = None;
        // Setting up the account is retried with backoff: each try may register an account,
        // and Let's Encrypt allows 10 registrations per IP in 3 hours.
        let mut account_retry = ACCOUNT_RETRY_FIRST;
        let mut next = tokio::time::Instant::now() + self.resync;
        loop {
            tokio::select! {
                changed = self.targets.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(next) => {}
                _ = self.stop.wait_for(|s| *s) => return,
            }
            next = tokio::time::Instant::now() + self.resync;
            if !*self.lead.borrow() || !self.fence.is_open() {
                continue;
            }
            let want = self.targets.borrow_and_update().clone();
            if want.is_empty() {
                continue;
            }
            if certs.is_none() {
                match Certs::connect(
                    &self.client,
                    self.config.clone(),
                    self.settings.clone(),
                    self.challenges.clone(),
                )
                .await
                {
                    Ok(c) => certs = Some(c),
                    Err(e) => {
                        tracing::error!(
                            error = %error_chain(&e),
                            retry_in_s = account_retry.as_secs(),
                            "setting up certificates failed; retrying"
                        );
                        next = tokio::time::Instant::now() + account_retry;
                        account_retry = (account_retry * 2).min(ACCOUNT_RETRY_LAST);
                        continue;
                    }
                }
            }
            let Some(c) = &certs else { continue };
            match self.round(c, &want, &events).await {
                Next::Resync => {}
                Next::Sooner(wait) => next = next.min(tokio::time::Instant::now() + wait),
                Next::Retry => next = tokio::time::Instant::now() + ROUND_RETRY,
            }
        }
    }

    /// One round of the certificate step, and when the next one is due.
    async fn round(&self, certs: &Certs, want: &[Target], events: &Events) -> Next {
        certs.set_shard(self.membership.as_ref().map(|m| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .writable(tokio::time::Instant::now())
        }));
        let round =
            std::panic::AssertUnwindSafe(certs.reconcile(want, Some(events), Some(&self.metrics)))
                .catch_unwind();
        // A round stops when the lease is no longer current (its cluster writes, the
        // ledger's charges among them, are refused already); the next leader resumes its
        // orders.
        let round = tokio::select! {
            round = round => round,
            _ = self.fence.wait_closed() => {
                tracing::warn!("the lease is no longer current: the certificate round is cancelled");
                return Next::Resync;
            }
        };
        let Ok(round) = round else {
            tracing::error!(
                "the certificate step panicked (a bug; please report it); retrying in 30 s"
            );
            return Next::Retry;
        };
        match round {
            Ok(report) => next_round(&report),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "the certificate step failed; retrying in 30 s");
                Next::Retry
            }
        }
    }
}

/// When the worker runs next.
enum Next {
    /// At the resync (or when the targets change).
    Resync,
    /// This long from now, if before the resync.
    Sooner(Duration),
    /// `ROUND_RETRY` from now: the round failed.
    Retry,
}

/// Logs a round's report; when the next round is due.
fn next_round(report: &CertReport) -> Next {
    let t = report.tally();
    tracing::info!(
        current = t.current,
        reused = t.reused,
        issued = t.issued,
        waiting = t.waiting,
        failed = t.failed,
        orders_sent = report.orders_sent,
        "certificates"
    );
    let woken = report
        .next_wake
        .map(|at| Duration::from_secs(at.saturating_sub(crate::certs::unix_now()).max(1)));
    let retry = (t.failed > 0 || t.no_namespace > 0).then_some(ROUND_RETRY);
    match (woken, retry) {
        (Some(a), Some(b)) => Next::Sooner(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Next::Sooner(a),
        (None, None) => Next::Resync,
    }
}
