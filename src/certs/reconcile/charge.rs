//! Step 2, charge: queue every due order against the quota ledger (which are sent now, which
//! wait, and until when), announce the waits, and charge each order in the ledger, durably,
//! just before it is sent, so that a crash wastes at most the orders in flight. Writes the
//! ledger and the namespaces' wait annotations; sends nothing to the CA.

use std::collections::{BTreeMap, BTreeSet};

use super::{Books, Certs, Outcome, Target, bounded};
use crate::certs::ledger::{Decision, Limit, OrderRequest};
use crate::certs::store::{Pending, StoreError, rfc3339};
use crate::certs::{Request, Slot, schedule, unix_now};
use crate::status::Events;
use crate::vocab::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    #[error("queueing orders in the quota ledger")]
    Queue(#[source] StoreError),
    #[error("charging the order in the quota ledger before it is sent")]
    Charge(#[source] StoreError),
}

impl ChargeError {
    pub fn is_unreachable(&self) -> bool {
        match self {
            ChargeError::Queue(e) | ChargeError::Charge(e) => e.is_unreachable(),
        }
    }
}

/// The ledger's answer for the due orders.
pub(super) struct Queue {
    /// Orders charged and placed by an earlier pass: picked up where they are (no charge).
    pub resumes: Vec<(Request, String)>,
    /// Environments with another writer's order in flight, and that writer: left alone.
    pub elsewhere: Vec<(Request, String)>,
    /// Every other due order, with when it may be sent.
    pub slots: Vec<(Request, Slot)>,
    /// The ARI id of the certificate each order replaces.
    pub replaces: BTreeMap<String, String>,
    pub account: String,
}

/// Certificates waiting for quota in this pass.
#[derive(Default)]
pub(super) struct Waits {
    pub by_limit: BTreeMap<Limit, i64>,
    /// When the last waiting certificate will be ordered (unix seconds).
    pub last_served: u64,
}

impl Certs {
    /// Decides every order against the ledger: the order of service and the times of the
    /// waiting ones. Each order sent now is charged on its own (`charge`).
    pub(super) async fn queue(
        &self,
        orders: Vec<(Request, Option<String>)>,
        now: u64,
    ) -> Result<Queue, ChargeError> {
        let account = self.acme.id().to_string();
        let requesting: BTreeSet<String> =
            orders.iter().map(|(r, _)| r.environment.clone()).collect();
        let replaces: BTreeMap<String, String> = orders
            .iter()
            .filter_map(|(r, p)| p.clone().map(|p| (r.environment.clone(), p)))
            .collect();
        let requests: Vec<Request> = orders.into_iter().map(|(r, _)| r).collect();
        let (writer, abandoned) = (self.settings.writer.as_str(), self.abandoned_after());
        let (resumes, elsewhere, slots) = self
            .ledger
            .update(|doc| {
                // Another replica's entries (sharding) are not this one's to drop.
                doc.queued
                    .retain(|env, _| requesting.contains(env) || !self.serves(env));
                let mut resumes = Vec::new();
                let mut elsewhere = Vec::new();
                let mut fresh = Vec::new();
                for r in &requests {
                    let since = *doc.queued.entry(r.environment.clone()).or_insert(now);
                    match doc.pending.get(&r.environment) {
                        // Another writer's order in flight: its own to finish.
                        Some(p) if !p.workable_by(writer, now, abandoned) => {
                            let by = p.writer.clone().unwrap_or_default();
                            elsewhere.push((r.clone(), by));
                        }
                        Some(Pending {
                            order_url: Some(url),
                            names,
                            kind,
                            ..
                        }) if *names == r.names => {
                            let resumed = Request {
                                kind: *kind,
                                ..r.clone()
                            };
                            resumes.push((resumed, url.clone()));
                        }
                        _ => fresh.push(Request { since, ..r.clone() }),
                    }
                }
                // Orders charged but never known to be sent: their tokens stay spent. Another
                // writer's order in flight stays its own.
                doc.pending.retain(|env, p| {
                    resumes.iter().any(|(r, _)| r.environment == *env)
                        || !self.serves(env)
                        || !p.workable_by(writer, now, abandoned)
                });
                let slots = schedule(fresh, &doc.buckets, &account, now);
                (resumes, elsewhere, slots)
            })
            .await
            .map_err(ChargeError::Queue)?;
        Ok(Queue {
            resumes,
            elsewhere,
            slots,
            replaces,
            account,
        })
    }

    /// The waits among `slots` again, decided on the ledger as this pass's charges and
    /// outcomes left it: a charge lands a moment after `queue` decided (on its own clock), so
    /// a bucket that still had room frees its next token a second or two later than first
    /// estimated, and an order that ended without a certificate gave its tokens back. A
    /// request that fits now waits until now (the next pass orders it). On a failed read,
    /// the waits stand as `queue` decided them.
    pub(super) async fn requeue(
        &self,
        slots: &[(Request, Slot)],
        account: &str,
    ) -> Vec<(Request, Slot)> {
        let waiting: BTreeMap<&str, (&Request, Limit)> = slots
            .iter()
            .filter_map(|(r, s)| match s {
                Slot::Later { limit, .. } => Some((r.environment.as_str(), (r, *limit))),
                Slot::Now(_) => None,
            })
            .collect();
        if waiting.is_empty() {
            return Vec::new();
        }
        let doc = match self.ledger.load().await {
            Ok((doc, _)) => doc,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the ledger again for the waits");
                let first = slots
                    .iter()
                    .filter(|(_, s)| matches!(s, Slot::Later { .. }));
                return first.cloned().collect();
            }
        };
        let requests = waiting.values().map(|(r, _)| (*r).clone()).collect();
        let now = unix_now();
        schedule(requests, &doc.buckets, account, now)
            .into_iter()
            .map(|(r, slot)| match slot {
                Slot::Now(_) => {
                    let limit = waiting[r.environment.as_str()].1;
                    (r, Slot::Later { at: now, limit })
                }
                later => (r, later),
            })
            .collect()
    }

    /// Records every waiting certificate's outcome, and announces the waits that changed
    /// (namespace annotations and Events).
    pub(super) async fn announce_waits(
        &self,
        targets: &[Target],
        slots: &[(Request, Slot)],
        events: Option<&Events>,
        books: &mut Books,
    ) -> Waits {
        let by_env: BTreeMap<&str, &Target> = targets
            .iter()
            .map(|t| (t.environment.as_str(), t))
            .collect();
        let mut waits = Waits::default();
        let mut announce = Vec::new();
        for (r, slot) in slots {
            let Slot::Later { at, limit } = slot else {
                continue;
            };
            let (at, limit) = (*at, *limit);
            *waits.by_limit.entry(limit).or_default() += 1;
            waits.last_served = waits.last_served.max(at);
            books.wake_at(at);
            let until = rfc3339(at as i64);
            books
                .outcomes
                .insert(r.environment.clone(), Outcome::Waiting { until, limit });
            let changed = self
                .announced
                .lock()
                .map(|mut a| a.insert(r.environment.clone(), (at, limit)) != Some((at, limit)))
                .unwrap_or(true);
            if changed && let Some(t) = by_env.get(r.environment.as_str()) {
                announce.push((*t, at, limit));
            }
        }
        let writes = announce
            .into_iter()
            .map(|(t, at, limit)| self.announce_wait(t, at, limit, events));
        bounded(writes.collect(), self.settings.concurrency.max(1)).await;
        waits
    }

    async fn announce_wait(&self, t: &Target, at: u64, limit: Limit, events: Option<&Events>) {
        let wait = Some((at, limit.as_str()));
        if let Err(e) = self.store.annotate_wait(&t.namespace, wait).await {
            tracing::warn!(error = %error_chain(&e), "annotating a waiting certificate");
        }
        if let Some(ev) = events {
            ev.publish(
                &t.namespace,
                false,
                "CertificateDeferred",
                format!(
                    "the certificate for {} waits for quota ({limit}); it will be ordered at {}",
                    t.names.join(","),
                    rfc3339(at as i64)
                ),
            )
            .await;
        }
    }

    /// Write-ahead: charges one order in the ledger, durably, before it is sent; decided
    /// again on the ledger as it is now (another process may have spent the token). Returns
    /// the wait when the token is gone.
    pub(super) async fn charge(
        &self,
        r: &Request,
        account: &str,
    ) -> Result<Option<Outcome>, ChargeError> {
        let req = OrderRequest {
            account: account.to_string(),
            names: r.names.clone(),
            kind: r.kind,
        };
        let (writer, abandoned) = (self.settings.writer.as_str(), self.abandoned_after());
        let refused = self
            .ledger
            .update(|doc| {
                let now = unix_now();
                // Decided on the ledger as it is now: another writer may have placed an order
                // for this environment since the queue was read. One order, one writer.
                if let Some(p) = doc.pending.get(&r.environment)
                    && !p.workable_by(writer, now, abandoned)
                {
                    return Some(Outcome::InProgress {
                        by: p.writer.clone().unwrap_or_default(),
                    });
                }
                match doc.buckets.decide(&req, now) {
                    Decision::Allowed { charges } => {
                        doc.buckets.charge(&charges, now);
                        let pending = Pending {
                            names: r.names.clone(),
                            kind: r.kind,
                            charged_at: now,
                            order_url: None,
                            writer: Some(writer.to_string()),
                        };
                        doc.pending.insert(r.environment.clone(), pending);
                        None
                    }
                    Decision::Wait { at, limit } => Some(Outcome::Waiting {
                        until: rfc3339(at as i64),
                        limit,
                    }),
                }
            })
            .await
            .map_err(ChargeError::Charge)?;
        Ok(refused)
    }

    /// How long after its charge another writer's order counts as abandoned (its writer
    /// stopped): twice the time any order may take, and at least five minutes.
    pub(super) fn abandoned_after(&self) -> u64 {
        (self.acme.config.order_timeout.as_secs() * 2).max(300)
    }
}
