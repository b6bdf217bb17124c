//! Step 1, select: read each environment's Secret (and, when it has none, whether its
//! namespace exists), the CA's renewal window (ARI) and the controller's copies; decide what
//! each certificate needs (`certs::need`); restore copies that cover the names (no order, no
//! quota) and keep copies of current certificates. Writes Secrets and copies only.

use super::{Books, Certs, Outcome, Target, bounded, empty_info};
use crate::certs::store::{StoreError, StoredCert, rfc3339};
use crate::certs::{Need, Request, need};
use crate::metrics::{Metrics, OrderLabels, OrderOutcome};
use crate::status::Events;
use crate::vocab::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("reading the controller's certificate copies")]
    Copies(#[source] StoreError),
}

impl SelectError {
    pub fn is_unreachable(&self) -> bool {
        match self {
            SelectError::Copies(e) => e.is_unreachable(),
        }
    }
}

/// What the pass must do beyond certificates that are current.
pub(super) struct Selection<'a> {
    /// Orders to place, each with the ARI id of the certificate it replaces.
    pub orders: Vec<(Request, Option<String>)>,
    /// Environments whose copy covers their names: restored without an order.
    pub reuse: Vec<(&'a Target, StoredCert)>,
    /// Current certificates whose copy is missing or older.
    pub keep: Vec<(&'a Target, StoredCert)>,
}

/// One target as read: its Secret, whether its namespace exists, the CA's renewal window.
type Read = (
    usize,
    Result<Option<StoredCert>, StoreError>,
    bool,
    Option<i64>,
);

impl Certs {
    pub(super) async fn select<'a>(
        &self,
        targets: &'a [Target],
        now: u64,
        books: &mut Books,
    ) -> Result<Selection<'a>, SelectError> {
        let reads = self.read_targets(targets).await;
        let copies = self
            .store
            .copies(targets.iter().map(|t| t.environment.as_str()))
            .await
            .map_err(SelectError::Copies)?;
        let mut selection = Selection {
            orders: Vec::new(),
            reuse: Vec::new(),
            keep: Vec::new(),
        };
        for (i, read, exists, renew_from) in reads {
            let t = &targets[i];
            let current = match read {
                Ok(c) => c,
                Err(e) => {
                    let error = error_chain(&e);
                    books
                        .outcomes
                        .insert(t.environment.clone(), Outcome::Failed { error });
                    continue;
                }
            };
            if !exists {
                books
                    .outcomes
                    .insert(t.environment.clone(), Outcome::NoNamespace);
                continue;
            }
            let copy = copies.get(&t.environment);
            let ca = CaSays {
                renew_from,
                profile: self.acme.profile_for(t.profile.as_deref()).map(|_| ()),
            };
            decide(t, current, copy, ca, now, books, &mut selection);
        }
        Ok(selection)
    }

    /// Each target's Secret and, for a certificate with an ARI id, the CA's renewal window:
    /// read concurrently, `concurrency` at a time.
    async fn read_targets(&self, targets: &[Target]) -> Vec<Read> {
        let reads = targets.iter().enumerate().map(|(i, t)| async move {
            let read = self.store.read(&t.namespace).await;
            let exists = match &read {
                Ok(None) => self.store.namespace_ready(&t.namespace).await,
                _ => true,
            };
            let ari_id = match &read {
                Ok(Some(c)) => c.info.as_ref().and_then(|i| i.ari_id.clone()),
                _ => None,
            };
            let renew_from = match ari_id {
                Some(id) if self.acme.ari => self.acme.renewal_time(&id).await,
                _ => None,
            };
            (i, read, exists, renew_from)
        });
        bounded(reads.collect(), self.settings.concurrency.max(1)).await
    }

    /// Restores copies (no quota); each restored certificate is announced and counted.
    pub(super) async fn restore_copies(
        &self,
        reuse: Vec<(&Target, StoredCert)>,
        events: Option<&Events>,
        metrics: Option<&Metrics>,
        books: &mut Books,
    ) {
        let restores = reuse.into_iter().map(|(t, c)| async move {
            let outcome = match self.store.write(&t.environment, &t.namespace, &c).await {
                Ok(()) => {
                    let info = c.info.clone().unwrap_or_else(empty_info);
                    if let Some(ev) = events {
                        ev.publish(
                            &t.namespace,
                            false,
                            "CertificateReused",
                            format!(
                                "restored certificate {} (expires {}) from the controller's copy; no order sent",
                                info.serial,
                                rfc3339(info.not_after)
                            ),
                        )
                        .await;
                    }
                    Outcome::Reused {
                        serial: info.serial,
                        not_after: rfc3339(info.not_after),
                    }
                }
                Err(e) => Outcome::Failed {
                    error: error_chain(&e),
                },
            };
            (t.environment.clone(), outcome)
        });
        for (env, o) in bounded(restores.collect(), self.settings.concurrency.max(1)).await {
            if let (Outcome::Reused { .. }, Some(m)) = (&o, metrics) {
                let outcome = OrderOutcome::Reused;
                m.certs.orders.get_or_create(&OrderLabels { outcome }).inc();
            }
            books.outcomes.insert(env, o);
        }
    }

    /// Keeps copies of current certificates in the controller's namespace (best effort).
    pub(super) async fn keep_copies(&self, keep: Vec<(&Target, StoredCert)>) {
        let writes = keep.into_iter().map(|(t, c)| async move {
            if let Err(e) = self.store.write_copy(&t.environment, &c).await {
                tracing::warn!(environment = %t.environment, error = %error_chain(&e), "keeping a copy of the certificate");
            }
        });
        bounded(writes.collect(), self.settings.concurrency.max(1)).await;
    }
}

/// What the CA says about one target: the start of its certificate's ARI renewal window, and
/// whether it offers the profile the target asks for.
struct CaSays {
    renew_from: Option<i64>,
    profile: Result<(), String>,
}

/// What one target needs, given its Secret, the copy and what the CA says.
fn decide<'a>(
    t: &'a Target,
    current: Option<StoredCert>,
    copy: Option<&StoredCert>,
    ca: CaSays,
    now: u64,
    books: &mut Books,
    selection: &mut Selection<'a>,
) {
    let current_info = current.as_ref().and_then(|c| c.info.clone());
    let copy_info = copy.and_then(|c| c.info.as_ref());
    match need(
        &t.names,
        current_info.as_ref(),
        copy_info,
        ca.renew_from,
        now as i64,
    ) {
        Need::Current => {
            let info = current_info.clone().unwrap_or_else(empty_info);
            books.expiries.push(info.not_after);
            let renews_at = ca.renew_from.unwrap_or(info.renew_at());
            books.wake_at(renews_at.max(0) as u64);
            if copy_info.map(|c| &c.serial) != Some(&info.serial)
                && let Some(c) = current
            {
                selection.keep.push((t, c));
            }
            books.outcomes.insert(
                t.environment.clone(),
                Outcome::Current {
                    serial: info.serial,
                    not_after: rfc3339(info.not_after),
                    renews_at: rfc3339(renews_at),
                },
            );
        }
        Need::Reuse => {
            if let Some(c) = copy {
                selection.reuse.push((t, c.clone()));
            }
        }
        // A profile the directory does not offer: no order can succeed, so none is charged.
        Need::Order(_) if ca.profile.is_err() => {
            let error = ca.profile.err().unwrap_or_default();
            books
                .outcomes
                .insert(t.environment.clone(), Outcome::Failed { error });
        }
        Need::Order(kind) => {
            let previous = current_info
                .as_ref()
                .filter(|c| c.covers(&t.names))
                .or(copy_info.filter(|c| c.covers(&t.names)));
            let request = Request {
                environment: t.environment.clone(),
                names: t.names.clone(),
                kind,
                expires: previous.map(|p| p.not_after),
                since: now,
            };
            // `replaces` only names a certificate the CA answered ARI for: a CA refuses an order
            // that replaces a certificate it does not know (one restored from elsewhere).
            let replaces = previous
                .and_then(|p| p.ari_id.clone())
                .filter(|_| ca.renew_from.is_some());
            selection.orders.push((request, replaces));
        }
    }
}
