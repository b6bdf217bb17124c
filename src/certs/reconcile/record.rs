//! Step 4, record: book each order's outcome — in the quota ledger (settled: the issuance
//! tokens reserved at the charge stay spent; or what a refusal costs: the reservation is
//! released, a 429 resynchronises its bucket, a failed validation spends the identifiers'
//! failure tokens), on the namespace (wait annotations), as Events, and in the
//! metrics. Sends nothing to the CA.

use std::collections::BTreeMap;

use super::charge::Waits;
use super::quota::set_quota_metrics;
use super::{Books, Certs, Outcome, Target, empty_info};
use crate::certs::acme::AcmeError;
use crate::certs::ledger::{BucketKey, Ledger, Limit, OrderRequest};
use crate::certs::store::{StoreError, StoredCert, rfc3339};
use crate::certs::{CertInfo, Request, unix_now};
use crate::metrics::{ExpiryLabels, ExpiryRange, LimitLabels, Metrics, OrderLabels, OrderOutcome};
use crate::status::Events;
use crate::vocab::error_chain;

impl Certs {
    /// An issued and stored certificate: its order leaves the ledger, its wait is cleared,
    /// and it is announced.
    pub(super) async fn settled(
        &self,
        t: &Target,
        r: &Request,
        cert: &StoredCert,
        account: &str,
        events: Option<&Events>,
    ) -> CertInfo {
        let env = &r.environment;
        if let Err(e) = self
            .ledger
            .update(|doc| {
                doc.pending.remove(env);
                doc.queued.remove(env);
                doc.buckets.authorized(&OrderRequest {
                    account: account.to_string(),
                    names: r.names.clone(),
                    kind: r.kind,
                });
            })
            .await
        {
            record_failed(env, &e);
        }
        if let Ok(mut a) = self.announced.lock() {
            a.remove(env);
        }
        if let Err(e) = self.store.drop_order_key(env).await {
            tracing::warn!(environment = %env, error = %error_chain(&e), "deleting the order's key (it is replaced by the next order's)");
        }
        // Always: the wait may have been announced by another process (an earlier apply, a
        // previous leader).
        if let Err(e) = self.store.annotate_wait(&t.namespace, None).await {
            tracing::warn!(environment = %env, error = %error_chain(&e), "clearing the certificate wait annotations");
        }
        let info = cert.info.clone().unwrap_or_else(empty_info);
        if let Some(ev) = events {
            ev.publish(
                &t.namespace,
                false,
                "CertificateIssued",
                format!(
                    "certificate for {} issued, serial {}, expires {}",
                    t.names.join(","),
                    info.serial,
                    rfc3339(info.not_after)
                ),
            )
            .await;
        }
        tracing::info!(environment = %env, serial = %info.serial, "certificate issued");
        info
    }

    /// Books a refused order in the ledger: a 429 resynchronises its bucket, an
    /// authorization failure spends the identifiers' failure tokens; any other failure ends
    /// the order unless it is `resumable` (placed, and failed in transit).
    pub(super) async fn refused(
        &self,
        t: &Target,
        r: &Request,
        account: &str,
        e: AcmeError,
        resumable: bool,
        events: Option<&Events>,
    ) -> Outcome {
        let req = OrderRequest {
            account: account.to_string(),
            names: r.names.clone(),
            kind: r.kind,
        };
        let outcome = match &e {
            AcmeError::RateLimited {
                limit, retry_after, ..
            } => {
                let until = retry_after.unwrap_or(unix_now() + 3600);
                self.rate_limited(t, r, &req, *limit, until, events).await
            }
            AcmeError::AuthorizationFailed { .. } => {
                let now = unix_now();
                self.book(r, &req, Issuance::None, |doc| {
                    doc.buckets.authorization_failed(&req, now)
                })
                .await;
                Outcome::failed(&e)
            }
            // The CA issued the order's certificate (for a key envctl does not hold): it
            // counted the issuance, and so does the ledger.
            AcmeError::FinalizedWithAnotherKey => {
                self.book(r, &req, Issuance::Counted, |_| {}).await;
                Outcome::failed(&e)
            }
            _ => {
                if !resumable {
                    self.book(r, &req, Issuance::None, |_| {}).await;
                }
                Outcome::failed(&e)
            }
        };
        if let Outcome::Failed { error } = &outcome {
            if let Some(ev) = events {
                ev.publish(&t.namespace, true, "CertificateFailed", error.clone())
                    .await;
            }
            if let Err(e) = self.store.note_failure(&t.namespace, error).await {
                tracing::warn!(namespace = %t.namespace, error = %error_chain(&e), "noting a certificate failure");
            }
        }
        tracing::warn!(environment = %r.environment, error = %error_chain(&e), "certificate order");
        outcome
    }

    /// The CA said 429: every bucket the order touches (of the named limit) is exhausted
    /// until the CA's Retry-After, and the wait is announced.
    async fn rate_limited(
        &self,
        t: &Target,
        r: &Request,
        req: &OrderRequest,
        limit: Option<Limit>,
        until: u64,
        events: Option<&Events>,
    ) -> Outcome {
        let keys = |b: &Ledger| -> Vec<BucketKey> {
            let mut keys = b.charges(req);
            keys.extend(Ledger::failure_buckets(req));
            keys.retain(|k| limit.is_none_or(|l| k.limit == l));
            keys
        };
        // Refused: nothing was issued, so the reservation is released, then the refused
        // limit's buckets are resynchronised from the CA's answer.
        self.book(r, req, Issuance::None, |doc| {
            for k in keys(&doc.buckets) {
                doc.buckets.exhausted_until(&k, until);
            }
        })
        .await;
        let limit = limit.unwrap_or(Limit::NewOrdersPerAccount);
        let _ = self
            .store
            .annotate_wait(&t.namespace, Some((until, limit.as_str())))
            .await;
        if let Ok(mut a) = self.announced.lock() {
            a.insert(r.environment.clone(), (until, limit));
        }
        if let Some(ev) = events {
            ev.publish(
                &t.namespace,
                true,
                "CertificateRateLimited",
                format!(
                    "the ACME server refused the order for rate limit {limit}; the ledger now waits until {}",
                    rfc3339(until as i64)
                ),
            )
            .await;
        }
        Outcome::Waiting {
            until: rfc3339(until as i64),
            limit,
        }
    }

    /// Ends an order in the ledger (it leaves `pending`) and applies `cost` to the buckets.
    /// An order that ends without an issuance gives back the issuance tokens it reserved
    /// (once: only while it is still pending, in the same write that ends it).
    async fn book(
        &self,
        r: &Request,
        req: &OrderRequest,
        issuance: Issuance,
        cost: impl Fn(&mut crate::certs::store::LedgerDoc),
    ) {
        let env = &r.environment;
        let now = unix_now();
        if let Err(e) = self
            .ledger
            .update(|doc| {
                if let Some(p) = doc.pending.remove(env)
                    && issuance == Issuance::None
                {
                    doc.buckets.release(
                        &OrderRequest {
                            account: req.account.clone(),
                            names: p.names,
                            kind: p.kind,
                        },
                        now,
                    );
                }
                cost(doc);
            })
            .await
        {
            record_failed(env, &e);
        }
    }

    /// The pass's certificate metrics: deferred orders, waits by limit, quota left, expiries.
    pub(super) async fn record_metrics(
        &self,
        metrics: Option<&Metrics>,
        waits: &Waits,
        books: &Books,
        account: &str,
        now: u64,
    ) {
        let Some(m) = metrics else { return };
        let deferred = waits.by_limit.values().sum::<i64>();
        let outcome = OrderOutcome::Deferred;
        m.certs
            .orders
            .get_or_create(&OrderLabels { outcome })
            .inc_by(deferred as u64);
        for limit in Limit::ALL {
            let waiting = waits.by_limit.get(&limit).copied().unwrap_or(0);
            m.certs
                .waiting
                .get_or_create(&LimitLabels { limit })
                .set(waiting);
        }
        m.certs.queue_served_at.set(waits.last_served as i64);
        match self.ledger.load().await {
            Ok((doc, _)) => set_quota_metrics(m, &doc.buckets, account, now),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the ledger for metrics")
            }
        }
        let mut ranges: BTreeMap<u8, i64> = BTreeMap::new();
        for e in &books.expiries {
            *ranges
                .entry(ExpiryRange::of(e - now as i64) as u8)
                .or_default() += 1;
        }
        for days in ExpiryRange::ALL {
            let count = ranges.get(&(days as u8)).copied().unwrap_or(0);
            m.certs
                .by_expiry
                .get_or_create(&ExpiryLabels { days })
                .set(count);
        }
    }
}

/// Whether the CA issued a certificate for an order that ends without one in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Issuance {
    /// No certificate was issued: the order's reservation is released.
    None,
    /// The CA issued one (and counted it), though envctl cannot use it: the charge stays.
    Counted,
}

/// A ledger write after an order's outcome could not be made: the order itself is over, so
/// the pass goes on; the state written before the send (the charge) stays, which errs on the
/// side of spending more quota, never less. Logged at error level.
fn record_failed(environment: &str, e: &StoreError) {
    tracing::error!(environment, error = %error_chain(e), "recording an order's outcome in the quota ledger failed; its charge stays spent");
}
