//! Step 3, order: for each order the ledger lets go now, charge it (step 2), place it (or
//! resume the one an earlier pass placed), authorize and finalize it within
//! `--certificate-timeout`, and store the certificate in the environment's Secret and the
//! controller's copy. Outcomes are booked by `record`.

use std::collections::BTreeMap;
use std::time::Duration;

use instant_acme::Order;

use super::{Books, Certs, Outcome, Target, bounded};
use crate::certs::acme::{AcmeError, Issued};
use crate::certs::store::{Pending, StoreError, StoredCert};
use crate::certs::{CertInfo, Request, Slot, unix_now};
use crate::metrics::{Metrics, OrderLabels, OrderOutcome};
use crate::status::Events;
use crate::vocab::error_chain;

use super::charge::Queue;

/// Placing (or resuming) an order failed.
#[derive(Debug, thiserror::Error)]
#[error("placing the order")]
pub struct PlaceError(#[source] pub AcmeError);

/// The order's key could not be made or kept (the order is resumed next time).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keeping the order's key before it is finalized")]
    Store(#[from] StoreError),
    #[error("making the order's key")]
    Make(#[from] AcmeError),
}

/// Authorizing or finalizing a placed order failed.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("authorizing and finalizing the order")]
    Acme(#[source] AcmeError),
    #[error("the order did not complete within {0:?}; it is resumed next time")]
    TimedOut(Duration),
}

/// Storing an issued certificate failed.
#[derive(Debug, thiserror::Error)]
#[error("storing the certificate in namespace {namespace}")]
pub struct StoreStepError {
    namespace: String,
    #[source]
    source: StoreError,
}

/// What became of one order.
pub(super) struct Sent {
    pub outcome: Outcome,
    /// The issued certificate.
    pub info: Option<CertInfo>,
    /// Whether a new order reached the server (not a resumed one).
    pub new_order: bool,
}

impl Sent {
    pub fn outcome(outcome: Outcome) -> Sent {
        Sent {
            outcome,
            info: None,
            new_order: false,
        }
    }
}

impl Certs {
    /// Sees every order that may go now through, `concurrency` at a time, and books each
    /// outcome.
    pub(super) async fn order_all(
        &self,
        targets: &[Target],
        queue: Queue,
        events: Option<&Events>,
        metrics: Option<&Metrics>,
        books: &mut Books,
    ) {
        let by_env: BTreeMap<&str, &Target> = targets
            .iter()
            .map(|t| (t.environment.as_str(), t))
            .collect();
        let Queue {
            resumes,
            elsewhere,
            slots,
            replaces,
            account,
        } = queue;
        for (r, by) in elsewhere {
            // Looked at again soon: once that writer is done, the certificate is in place.
            books.wake_at(unix_now() + 30);
            books
                .outcomes
                .insert(r.environment.clone(), Outcome::InProgress { by });
        }
        let jobs =
            resumes
                .into_iter()
                .map(|(r, url)| (r, Some(url)))
                .chain(slots.into_iter().filter_map(|(r, s)| match s {
                    Slot::Now(_) => Some((r, None)),
                    Slot::Later { .. } => None,
                }));
        let runs = jobs.map(|(r, url)| {
            let target = by_env.get(r.environment.as_str()).copied();
            let replaces = replaces.get(&r.environment).cloned();
            let account = account.as_str();
            async move {
                let Some(t) = target else {
                    return (r.environment.clone(), Sent::outcome(Outcome::NoNamespace));
                };
                let sent = self
                    .order_one(t, &r, url.as_deref(), replaces.as_deref(), account, events)
                    .await;
                (r.environment.clone(), sent)
            }
        });
        let results = bounded(runs.collect(), self.settings.concurrency.max(1)).await;
        for (env, sent) in results {
            books.orders_sent += usize::from(sent.new_order);
            match sent.outcome {
                // Someone else spent the token in the meantime: look again soon.
                Outcome::Waiting { .. } => books.wake_at(unix_now() + 60),
                // Another writer placed an order meanwhile: look again once it may be done.
                Outcome::InProgress { .. } => books.wake_at(unix_now() + 30),
                _ => {}
            }
            if let Some(i) = &sent.info {
                books.expiries.push(i.not_after);
                books.wake_at(i.renew_at().max(0) as u64);
            }
            count_order(metrics, &sent.outcome);
            books.outcomes.insert(env, sent.outcome);
        }
    }

    /// One order, step by step: charge, place, authorize and finalize, store, record.
    async fn order_one(
        &self,
        t: &Target,
        r: &Request,
        resume: Option<&str>,
        replaces: Option<&str>,
        account: &str,
        events: Option<&Events>,
    ) -> Sent {
        let new_order = resume.is_none();
        let failed = |outcome| Sent {
            outcome,
            info: None,
            new_order,
        };
        if new_order {
            match self.charge(r, account).await {
                Ok(None) => {}
                Ok(Some(waiting)) => return Sent::outcome(waiting),
                Err(e) => return Sent::outcome(Outcome::failed(&e)),
            }
        }
        let mut order = match self.place(t, r, resume, replaces).await {
            Ok(o) => o,
            Err(PlaceError(e)) => {
                return failed(self.refused(t, r, account, e, false, events).await);
            }
        };
        // The certificate's key is kept before the order can be finalized, so a stop between
        // finalizing and storing costs no second order. Without it the order waits (it stays
        // pending in the ledger and is resumed next time).
        let key = match self.order_key(r, order.url()).await {
            Ok(k) => k,
            Err(e) => return failed(Outcome::failed(&e)),
        };
        let issued = match self.complete(&mut order, &key).await {
            Ok(i) => i,
            // A protocol or network failure leaves the placed order to be resumed next time
            // (no new order, no new charge). An order finalized with a key envctl does not
            // hold is abandoned: the CA counted its certificate, so its charge stays spent,
            // and the next round orders anew under the ledger's limits.
            Err(CompleteError::Acme(e)) => {
                let resumable = matches!(e, AcmeError::Acme { .. });
                return failed(self.refused(t, r, account, e, resumable, events).await);
            }
            Err(e @ CompleteError::TimedOut(_)) => return failed(Outcome::failed(&e)),
        };
        let cert = match self.store_certificate(t, issued).await {
            Ok(c) => c,
            Err(e) => return failed(Outcome::failed(&e)),
        };
        let info = self.settled(t, r, &cert, account, events).await;
        Sent {
            outcome: Outcome::Issued {
                serial: info.serial.clone(),
                not_after: crate::certs::store::rfc3339(info.not_after),
                kind: r.kind,
                renews_at: crate::certs::store::rfc3339(info.renew_at()),
            },
            info: Some(info),
            new_order,
        }
    }

    /// Places a new order (the ledger was charged) or resumes an earlier one, and records a
    /// new order's URL so that a later pass can resume it.
    async fn place(
        &self,
        t: &Target,
        r: &Request,
        resume: Option<&str>,
        replaces: Option<&str>,
    ) -> Result<Order, PlaceError> {
        let order = match resume {
            Some(url) => self.acme.resume(url).await,
            None => {
                // Checked against the directory when the order was selected.
                let profile = self.acme.profile_for(t.profile.as_deref()).ok().flatten();
                self.acme.new_order(&r.names, replaces, profile).await
            }
        }
        .map_err(PlaceError)?;
        if resume.is_some() {
            return Ok(order);
        }
        let url = order.url().to_string();
        let env = &r.environment;
        let recorded = self
            .ledger
            .update(|doc| {
                let pending = doc.pending.entry(env.clone()).or_insert_with(|| Pending {
                    names: r.names.clone(),
                    kind: r.kind,
                    charged_at: unix_now(),
                    order_url: None,
                    writer: Some(self.settings.writer.clone()),
                });
                pending.order_url = Some(url.clone());
            })
            .await;
        if let Err(e) = recorded {
            tracing::warn!(environment = %env, error = %error_chain(&e), "recording the order URL");
        }
        Ok(order)
    }

    /// The key of `r`'s order `url`: the one kept for it, or a new one, kept now (before the
    /// order can be finalized).
    async fn order_key(&self, r: &Request, url: &str) -> Result<String, KeyError> {
        let env = &r.environment;
        if let Some(pem) = self.store.order_key(env, url).await? {
            return Ok(String::from_utf8_lossy(&pem).into_owned());
        }
        let pem = crate::certs::acme::new_order_key()?;
        self.store.keep_order_key(env, url, pem.as_bytes()).await?;
        Ok(pem)
    }

    /// Authorizes (HTTP-01) and finalizes a placed order, within the order timeout.
    async fn complete(&self, order: &mut Order, key: &str) -> Result<Issued, CompleteError> {
        let timeout = self.acme.config.order_timeout;
        let completing = self.acme.complete(order, &self.challenges, key);
        match tokio::time::timeout(timeout + Duration::from_secs(30), completing).await {
            Ok(result) => result.map_err(CompleteError::Acme),
            Err(_) => Err(CompleteError::TimedOut(timeout)),
        }
    }

    /// Stores an issued certificate in the environment's Secret, and a copy in the
    /// controller's namespace (best effort: the Secret is what counts).
    async fn store_certificate(
        &self,
        t: &Target,
        issued: Issued,
    ) -> Result<StoredCert, StoreStepError> {
        let cert = StoredCert {
            info: crate::certs::inspect(issued.chain_pem.as_bytes()).ok(),
            chain: issued.chain_pem.into_bytes(),
            key: issued.key_pem.into_bytes(),
        };
        self.store
            .write(&t.environment, &t.namespace, &cert)
            .await
            .map_err(|source| StoreStepError {
                namespace: t.namespace.clone(),
                source,
            })?;
        if let Err(e) = self.store.write_copy(&t.environment, &cert).await {
            tracing::warn!(environment = %t.environment, error = %error_chain(&e), "keeping a copy of the certificate");
        }
        Ok(cert)
    }
}

/// Counts an order's outcome in `certificate_orders`.
fn count_order(metrics: Option<&Metrics>, outcome: &Outcome) {
    let outcome = match outcome {
        Outcome::Issued { .. } => OrderOutcome::Issued,
        Outcome::Waiting { .. } => OrderOutcome::RateLimited,
        Outcome::Failed { .. } => OrderOutcome::Failed,
        _ => return,
    };
    if let Some(m) = metrics {
        m.certs.orders.get_or_create(&OrderLabels { outcome }).inc();
    }
}
