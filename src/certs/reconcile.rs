//! The certificate step, shared by `envctl apply` and `envctl run`, as named steps:
//! read (each environment's Secret and the controller's copies) -> decide (`need`) -> reuse
//! copies -> reserve (schedule against the ledger and write it, BEFORE any order is sent) ->
//! order (HTTP-01, finalize, store the Secret and its copy) -> report (annotations, Events,
//! metrics). Owns the order of the steps; decisions are `certs`' and `ledger`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use serde::Serialize;

use super::acme::{Acme, AcmeConfig, AcmeError};
use super::challenges::Challenges;
use super::ledger::{BucketKey, BucketSpec, Decision, Ledger, Limit, OrderKind, OrderRequest};
use super::store::{
    AccountStore, CertStore, LedgerStore, Pending, StoreError, StoredCert, rfc3339,
};
use super::{CertInfo, Need, Request, Slot, need, schedule, unix_now};
use crate::manifest::Environment;
use crate::status::{
    Events, ExpiryLabels, ExpiryRange, LimitLabels, Metrics, OrderLabels, OrderOutcome,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("setting up the ACME account on {directory}")]
    Account {
        directory: String,
        #[source]
        source: AcmeError,
    },
    #[error("keeping certificate state in the cluster")]
    Store(#[from] StoreError),
}

/// Where certificate state lives and how many orders run at once.
#[derive(Debug, Clone)]
pub struct CertSettings {
    /// The controller's namespace: the account, the ledger and the copies.
    pub namespace: String,
    pub instance: String,
    pub overrides: BTreeMap<String, BucketSpec>,
    pub margin: u32,
    pub concurrency: usize,
}

/// One environment that wants a certificate.
#[derive(Debug, Clone)]
pub struct Target {
    pub environment: String,
    pub namespace: String,
    pub names: Vec<String>,
}

/// The environments with TLS enabled.
pub fn targets<'a>(envs: impl IntoIterator<Item = &'a Environment>) -> Vec<Target> {
    envs.into_iter()
        .filter(|e| e.spec.tls.enabled)
        .map(|e| Target {
            environment: e.metadata.name.clone(),
            namespace: e.namespace(),
            names: super::sorted_names(std::slice::from_ref(&e.spec.hostname)),
        })
        .collect()
}

/// What happened to one environment's certificate.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// A valid certificate is in place.
    Current {
        serial: String,
        not_after: String,
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
    },
    /// Waiting for quota: ordered at `until` at the earliest.
    Waiting {
        until: String,
        limit: Limit,
    },
    /// The namespace does not exist yet (its objects were not applied).
    NoNamespace,
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
                Outcome::Current { serial, not_after } => {
                    format!("current, serial {serial}, expires {not_after}")
                }
                Outcome::Reused { serial, not_after } => format!(
                    "reused the controller's copy, serial {serial}, expires {not_after} (no order)"
                ),
                Outcome::Issued {
                    serial,
                    not_after,
                    kind,
                } => format!(
                    "issued ({}), serial {serial}, expires {not_after}",
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
                Outcome::Failed { error } => format!("failed: {error}"),
            };
            out.push_str(&format!("certificate {}: {line}\n", e.environment));
        }
        let t = self.tally();
        out.push_str(&format!(
            "certificates: {} current, {} reused, {} issued, {} waiting, {} failed; {} order(s) sent\n",
            t.current, t.reused, t.issued, t.waiting, t.failed, self.orders_sent,
        ));
        out
    }
}

/// An ACME account with its ledger and stores: everything the step needs.
pub struct Certs {
    pub acme: Acme,
    pub ledger: LedgerStore,
    pub store: CertStore,
    pub challenges: Arc<Challenges>,
    pub settings: CertSettings,
    /// Waits last announced, by environment (so unchanged waits are not re-announced).
    announced: std::sync::Mutex<BTreeMap<String, (u64, Limit)>>,
}

impl Certs {
    /// Restores the account kept in the controller's namespace, or registers one and keeps it.
    pub async fn connect(
        client: &Client,
        config: AcmeConfig,
        settings: CertSettings,
        challenges: Arc<Challenges>,
    ) -> Result<Certs, CertError> {
        let accounts = AccountStore::new(client, &settings.namespace, &settings.instance);
        let directory = config.directory.clone();
        let account_err = |source| CertError::Account {
            directory: directory.clone(),
            source,
        };
        let stored = accounts.load(&config.directory).await?;
        let (mut acme, created) = Acme::connect(config.clone(), stored.as_deref())
            .await
            .map_err(account_err)?;
        if let Some(creds) = created {
            let kept = accounts.store(&config.directory, creds.clone()).await?;
            if kept != creds {
                // Another replica registered first: use its account.
                acme = Acme::connect(config, Some(&kept))
                    .await
                    .map_err(account_err)?
                    .0;
            }
        }
        Ok(Certs {
            acme,
            ledger: LedgerStore::new(
                client,
                &settings.namespace,
                &settings.instance,
                settings.overrides.clone(),
                settings.margin,
            ),
            store: CertStore::new(client, &settings.namespace, &settings.instance),
            challenges,
            settings,
            announced: Default::default(),
        })
    }

    /// Brings every target's certificate to where it should be.
    pub async fn reconcile(
        &self,
        targets: &[Target],
        events: Option<&Events>,
        metrics: Option<&Metrics>,
    ) -> Result<CertReport, CertError> {
        let now = unix_now();
        let concurrency = self.settings.concurrency.max(1);
        let mut report = CertReport::default();
        let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();

        // Read: each environment's Secret (and, when it has none, whether its namespace
        // exists), and the copies.
        // Each environment's Secret and, for a certificate with an ARI id, the CA's renewal
        // window: read concurrently, `concurrency` at a time.
        type Read = (
            usize,
            Result<Option<StoredCert>, StoreError>,
            bool,
            Option<i64>,
        );
        let reads: Vec<Read> = bounded(
            targets
                .iter()
                .enumerate()
                .map(|(i, t)| async move {
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
                        Some(id) if self.acme.ari => self.acme.renewal_window_start(&id).await,
                        _ => None,
                    };
                    (i, read, exists, renew_from)
                })
                .collect(),
            concurrency,
        )
        .await;
        let copies = self.store.copies().await?;

        // Decide.
        let mut requests: Vec<(Request, Option<String>)> = Vec::new();
        let mut reuse: Vec<(&Target, &StoredCert)> = Vec::new();
        let mut refresh_copy: Vec<(&Target, StoredCert)> = Vec::new();
        let mut expiries: Vec<i64> = Vec::new();
        for (i, read, exists, renew_from) in reads {
            let t = &targets[i];
            let current = match read {
                Ok(c) => c,
                Err(e) => {
                    outcomes.insert(
                        t.environment.clone(),
                        Outcome::Failed {
                            error: crate::vocab::error_chain(&e),
                        },
                    );
                    continue;
                }
            };
            if !exists {
                outcomes.insert(t.environment.clone(), Outcome::NoNamespace);
                continue;
            }
            let current_info = current.as_ref().and_then(|c| c.info.clone());
            let copy = copies.get(&t.environment);
            let copy_info = copy.and_then(|c| c.info.as_ref());
            match need(
                &t.names,
                current_info.as_ref(),
                copy_info,
                renew_from,
                now as i64,
            ) {
                Need::Current => {
                    let info = current_info.clone().unwrap_or_else(empty_info);
                    expiries.push(info.not_after);
                    report.next_wake = min_opt(
                        report.next_wake,
                        Some(renew_from.unwrap_or(info.renew_at()).max(0) as u64),
                    );
                    if copy_info.map(|c| &c.serial) != Some(&info.serial)
                        && let Some(c) = current
                    {
                        refresh_copy.push((t, c));
                    }
                    outcomes.insert(
                        t.environment.clone(),
                        Outcome::Current {
                            serial: info.serial,
                            not_after: rfc3339(info.not_after),
                        },
                    );
                }
                Need::Reuse => {
                    if let Some(c) = copy {
                        reuse.push((t, c));
                    }
                }
                Need::Order(kind) => {
                    let previous = current_info
                        .as_ref()
                        .filter(|c| c.covers(&t.names))
                        .or(copy_info.filter(|c| c.covers(&t.names)));
                    requests.push((
                        Request {
                            environment: t.environment.clone(),
                            names: t.names.clone(),
                            kind,
                            expires: previous.map(|p| p.not_after),
                            since: now,
                        },
                        previous.and_then(|p| p.ari_id.clone()),
                    ));
                }
            }
        }

        // Reuse copies (no quota) and keep copies of current certificates.
        let reused: Vec<(String, Outcome)> =
            bounded(reuse.into_iter().map(|(t, c)| async move {
                let outcome = match self.store.write(&t.environment, &t.namespace, c).await {
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
                        error: crate::vocab::error_chain(&e),
                    },
                };
                (t.environment.clone(), outcome)
            }).collect(), concurrency)
            .await;
        for (env, o) in reused {
            if let (Outcome::Reused { .. }, Some(m)) = (&o, metrics) {
                m.certs
                    .orders
                    .get_or_create(&OrderLabels {
                        outcome: OrderOutcome::Reused,
                    })
                    .inc();
            }
            outcomes.insert(env, o);
        }
        bounded(refresh_copy.into_iter().map(|(t, c)| async move {
            if let Err(e) = self.store.write_copy(&t.environment, &c).await {
                tracing::warn!(environment = %t.environment, error = %crate::vocab::error_chain(&e), "keeping a copy of the certificate");
            }
        }).collect(), concurrency)
        .await;

        // Queue: decide every order against the ledger (the order of service and the times of
        // the waiting ones). Each order sent now is charged on its own, just before it is
        // sent (`order_one`), so a crash wastes at most the orders in flight.
        let account = self.acme.id().to_string();
        let requesting: BTreeSet<String> = requests
            .iter()
            .map(|(r, _)| r.environment.clone())
            .collect();
        let replaces: BTreeMap<String, String> = requests
            .iter()
            .filter_map(|(r, p)| p.clone().map(|p| (r.environment.clone(), p)))
            .collect();
        let requests: Vec<Request> = requests.into_iter().map(|(r, _)| r).collect();
        let (resumes, slots) = self
            .ledger
            .update(|doc| {
                doc.queued.retain(|env, _| requesting.contains(env));
                let mut resumes = Vec::new();
                let mut fresh = Vec::new();
                for r in &requests {
                    let since = *doc.queued.entry(r.environment.clone()).or_insert(now);
                    match doc.pending.get(&r.environment) {
                        Some(Pending {
                            order_url: Some(url),
                            names,
                            kind,
                            ..
                        }) if *names == r.names => {
                            resumes.push((
                                Request {
                                    kind: *kind,
                                    ..r.clone()
                                },
                                url.clone(),
                            ));
                        }
                        _ => fresh.push(Request { since, ..r.clone() }),
                    }
                }
                // Orders charged but never known to be sent: their tokens stay spent.
                doc.pending
                    .retain(|env, _| resumes.iter().any(|(r, _)| r.environment == *env));
                let slots = schedule(fresh, &doc.buckets, &account, now);
                (resumes, slots)
            })
            .await?;

        // Announce waits.
        let by_env: BTreeMap<&str, &Target> = targets
            .iter()
            .map(|t| (t.environment.as_str(), t))
            .collect();
        let mut waiting_by_limit: BTreeMap<Limit, i64> = BTreeMap::new();
        let mut last_served = 0u64;
        let mut announce = Vec::new();
        for (r, slot) in &slots {
            if let Slot::Later { at, limit } = slot {
                *waiting_by_limit.entry(*limit).or_default() += 1;
                last_served = last_served.max(*at);
                report.next_wake = min_opt(report.next_wake, Some(*at));
                outcomes.insert(
                    r.environment.clone(),
                    Outcome::Waiting {
                        until: rfc3339(*at as i64),
                        limit: *limit,
                    },
                );
                let changed = self
                    .announced
                    .lock()
                    .map(|mut a| {
                        a.insert(r.environment.clone(), (*at, *limit)) != Some((*at, *limit))
                    })
                    .unwrap_or(true);
                if changed && let Some(t) = by_env.get(r.environment.as_str()) {
                    announce.push((*t, *at, *limit));
                }
            }
        }
        bounded(announce.into_iter().map(|(t, at, limit)| async move {
            if let Err(e) = self
                .store
                .annotate_wait(&t.namespace, Some((at, limit.as_str())))
                .await
            {
                tracing::warn!(error = %crate::vocab::error_chain(&e), "annotating a waiting certificate");
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
        }).collect(), concurrency)
        .await;

        // Order.
        let jobs: Vec<(Request, Option<String>)> = resumes
            .into_iter()
            .map(|(r, url)| (r, Some(url)))
            .chain(slots.into_iter().filter_map(|(r, s)| match s {
                Slot::Now(_) => Some((r, None)),
                Slot::Later { .. } => None,
            }))
            .collect();
        let results: Vec<(String, Sent)> = bounded(
            jobs.into_iter()
                .map(|(r, url)| {
                    let target = by_env.get(r.environment.as_str()).copied();
                    let replaces = replaces.get(&r.environment).cloned();
                    let account = account.clone();
                    async move {
                        let Some(t) = target else {
                            return (r.environment.clone(), Sent::outcome(Outcome::NoNamespace));
                        };
                        let sent = self
                            .order_one(t, &r, url.as_deref(), replaces.as_deref(), &account, events)
                            .await;
                        (r.environment.clone(), sent)
                    }
                })
                .collect(),
            concurrency,
        )
        .await;
        for (env, sent) in results {
            let Sent {
                outcome,
                info,
                new_order,
            } = sent;
            report.orders_sent += usize::from(new_order);
            if let Outcome::Waiting { .. } = outcome {
                // Someone else spent the token in the meantime: look again soon.
                report.next_wake = min_opt(report.next_wake, Some(unix_now() + 60));
            }
            if let Some(i) = info {
                expiries.push(i.not_after);
                report.next_wake = min_opt(report.next_wake, Some(i.renew_at().max(0) as u64));
            }
            if let Some(m) = metrics {
                let o = match &outcome {
                    Outcome::Issued { .. } => Some(OrderOutcome::Issued),
                    Outcome::Waiting { .. } => Some(OrderOutcome::RateLimited),
                    Outcome::Failed { .. } => Some(OrderOutcome::Failed),
                    _ => None,
                };
                if let Some(outcome) = o {
                    m.certs.orders.get_or_create(&OrderLabels { outcome }).inc();
                }
            }
            outcomes.insert(env, outcome);
        }

        // Report.
        if let Some(m) = metrics {
            let deferred = waiting_by_limit.values().sum::<i64>();
            m.certs
                .orders
                .get_or_create(&OrderLabels {
                    outcome: OrderOutcome::Deferred,
                })
                .inc_by(deferred as u64);
            for l in Limit::ALL {
                m.certs
                    .waiting
                    .get_or_create(&LimitLabels { limit: l })
                    .set(waiting_by_limit.get(&l).copied().unwrap_or(0));
            }
            m.certs.queue_served_at.set(last_served as i64);
            match self.ledger.load().await {
                Ok((doc, _)) => set_quota_metrics(m, &doc.buckets, &account, now),
                Err(e) => {
                    tracing::warn!(error = %crate::vocab::error_chain(&e), "reading the ledger for metrics")
                }
            }
            let mut ranges: BTreeMap<u8, i64> = BTreeMap::new();
            for e in &expiries {
                *ranges
                    .entry(ExpiryRange::of(e - now as i64) as u8)
                    .or_default() += 1;
            }
            for r in ExpiryRange::ALL {
                m.certs
                    .by_expiry
                    .get_or_create(&ExpiryLabels { days: r })
                    .set(ranges.get(&(r as u8)).copied().unwrap_or(0));
            }
        }
        report.environments = targets
            .iter()
            .filter_map(|t| {
                outcomes.remove(&t.environment).map(|outcome| EnvOutcome {
                    environment: t.environment.clone(),
                    namespace: t.namespace.clone(),
                    outcome,
                })
            })
            .collect();
        Ok(report)
    }

    /// Places (or resumes) one order and sees it through. The ledger was charged already.
    async fn order_one(
        &self,
        t: &Target,
        r: &Request,
        resume: Option<&str>,
        replaces: Option<&str>,
        account: &str,
        events: Option<&Events>,
    ) -> Sent {
        let env = r.environment.clone();
        let failed = |e: &dyn std::error::Error| Outcome::Failed {
            error: crate::vocab::error_chain(e),
        };
        if resume.is_none() {
            // Write-ahead: charge this order in the ledger, durably, before it is sent;
            // decided again on the ledger as it is now (another process may have spent).
            let req = OrderRequest {
                account: account.to_string(),
                names: r.names.clone(),
                kind: r.kind,
            };
            let charged = self
                .ledger
                .update(|doc| {
                    let now = unix_now();
                    match doc.buckets.decide(&req, now) {
                        Decision::Allowed { charges } => {
                            doc.buckets.charge(&charges, now);
                            doc.pending.insert(
                                env.clone(),
                                Pending {
                                    names: r.names.clone(),
                                    kind: r.kind,
                                    charged_at: now,
                                    order_url: None,
                                },
                            );
                            None
                        }
                        Decision::Wait { at, limit } => Some((at, limit)),
                    }
                })
                .await;
            match charged {
                Ok(None) => {}
                Ok(Some((at, limit))) => {
                    return Sent::outcome(Outcome::Waiting {
                        until: rfc3339(at as i64),
                        limit,
                    });
                }
                Err(e) => return Sent::outcome(failed(&e)),
            }
        }
        let placed = match resume {
            Some(url) => self.acme.resume(url).await,
            None => self.acme.new_order(&r.names, replaces).await,
        };
        let new_order = resume.is_none();
        let mut order = match placed {
            Ok(o) => o,
            Err(e) => {
                return Sent {
                    outcome: self.refused(t, r, account, e, false, events).await,
                    info: None,
                    new_order,
                };
            }
        };
        if resume.is_none() {
            let url = order.url().to_string();
            let recorded = self
                .ledger
                .update(|doc| {
                    if let Some(p) = doc.pending.get_mut(&env) {
                        p.order_url = Some(url.clone());
                    } else {
                        doc.pending.insert(
                            env.clone(),
                            Pending {
                                names: r.names.clone(),
                                kind: r.kind,
                                charged_at: unix_now(),
                                order_url: Some(url.clone()),
                            },
                        );
                    }
                })
                .await;
            if let Err(e) = recorded {
                tracing::warn!(environment = %env, error = %crate::vocab::error_chain(&e), "recording the order URL");
            }
        }
        let issued = match tokio::time::timeout(
            self.acme.config.order_timeout + Duration::from_secs(30),
            self.acme.complete(&mut order, &self.challenges),
        )
        .await
        {
            Ok(Ok(i)) => i,
            // A protocol or network failure leaves the placed order to be resumed next time
            // (no new order, no new charge).
            Ok(Err(e)) => {
                let resumable = matches!(e, AcmeError::Acme { .. });
                return Sent {
                    outcome: self.refused(t, r, account, e, resumable, events).await,
                    info: None,
                    new_order,
                };
            }
            Err(_) => {
                return Sent {
                    outcome: Outcome::Failed {
                        error: format!(
                            "the order did not complete within {:?}; it is resumed next time",
                            self.acme.config.order_timeout
                        ),
                    },
                    info: None,
                    new_order,
                };
            }
        };
        let cert = StoredCert {
            info: super::inspect(issued.chain_pem.as_bytes()).ok(),
            chain: issued.chain_pem.into_bytes(),
            key: issued.key_pem.into_bytes(),
        };
        if let Err(e) = self.store.write(&t.environment, &t.namespace, &cert).await {
            return Sent {
                outcome: failed(&e),
                info: None,
                new_order,
            };
        }
        if let Err(e) = self.store.write_copy(&t.environment, &cert).await {
            tracing::warn!(environment = %env, error = %crate::vocab::error_chain(&e), "keeping a copy of the certificate");
        }
        if let Err(e) = self
            .ledger
            .update(|doc| {
                doc.pending.remove(&env);
                doc.queued.remove(&env);
            })
            .await
        {
            record_failed(&env, &e);
        }
        if let Ok(mut a) = self.announced.lock() {
            a.remove(&env);
        }
        // Always: the wait may have been announced by another process (an earlier apply, a
        // previous leader).
        if let Err(e) = self.store.annotate_wait(&t.namespace, None).await {
            tracing::warn!(environment = %env, error = %crate::vocab::error_chain(&e), "clearing the certificate wait annotations");
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
        Sent {
            outcome: Outcome::Issued {
                serial: info.serial.clone(),
                not_after: rfc3339(info.not_after),
                kind: r.kind,
            },
            info: Some(info),
            new_order,
        }
    }

    /// Books a refused order in the ledger: a 429 resynchronises its bucket, an
    /// authorization failure spends the identifiers' failure tokens; any other failure ends
    /// the order unless it is `resumable` (placed, and failed in transit).
    async fn refused(
        &self,
        t: &Target,
        r: &Request,
        account: &str,
        e: AcmeError,
        resumable: bool,
        events: Option<&Events>,
    ) -> Outcome {
        let env = r.environment.clone();
        let req = OrderRequest {
            account: account.to_string(),
            names: r.names.clone(),
            kind: r.kind,
        };
        let now = unix_now();
        let outcome = match &e {
            AcmeError::RateLimited {
                limit, retry_after, ..
            } => {
                let until = retry_after.unwrap_or(now + 3600);
                let ledger_keys = |b: &Ledger| -> Vec<BucketKey> {
                    let mut keys = b.charges(&req);
                    keys.extend(Ledger::failure_buckets(&req));
                    keys.retain(|k| limit.is_none_or(|l| k.limit == l));
                    keys
                };
                if let Err(e) = self
                    .ledger
                    .update(|doc| {
                        doc.pending.remove(&env);
                        for k in ledger_keys(&doc.buckets) {
                            doc.buckets.exhausted_until(&k, until);
                        }
                    })
                    .await
                {
                    record_failed(&env, &e);
                }
                let limit = limit.unwrap_or(Limit::NewOrdersPerAccount);
                let _ = self
                    .store
                    .annotate_wait(&t.namespace, Some((until, limit.as_str())))
                    .await;
                if let Ok(mut a) = self.announced.lock() {
                    a.insert(env.clone(), (until, limit));
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
            AcmeError::AuthorizationFailed { .. } => {
                if let Err(e) = self
                    .ledger
                    .update(|doc| {
                        doc.pending.remove(&env);
                        doc.buckets.charge(&Ledger::failure_buckets(&req), now);
                    })
                    .await
                {
                    record_failed(&env, &e);
                }
                Outcome::Failed {
                    error: crate::vocab::error_chain(&e),
                }
            }
            _ => {
                if !resumable
                    && let Err(e) = self
                        .ledger
                        .update(|doc| {
                            doc.pending.remove(&env);
                        })
                        .await
                {
                    record_failed(&env, &e);
                }
                Outcome::Failed {
                    error: crate::vocab::error_chain(&e),
                }
            }
        };
        if let (Outcome::Failed { error }, Some(ev)) = (&outcome, events) {
            ev.publish(&t.namespace, true, "CertificateFailed", error.clone())
                .await;
        }
        tracing::warn!(environment = %env, error = %crate::vocab::error_chain(&e), "certificate order");
        outcome
    }
}

/// A ledger write after an order's outcome could not be made: the order itself is over, so
/// the pass goes on; the state written before the send (the charge) stays, which errs on the
/// side of spending more quota, never less. Logged at error level.
fn record_failed(environment: &str, e: &StoreError) {
    tracing::error!(environment, error = %crate::vocab::error_chain(e), "recording an order's outcome in the quota ledger failed; its charge stays spent");
}

/// Runs futures, at most `n` at once. (Collecting them first keeps the borrows they hold
/// simple enough for the compiler to prove the caller's future `Send`.)
async fn bounded<F: std::future::Future>(futures: Vec<F>, n: usize) -> Vec<F::Output> {
    futures::stream::iter(futures)
        .buffer_unordered(n)
        .collect()
        .await
}

/// What became of one order.
struct Sent {
    outcome: Outcome,
    /// The issued certificate.
    info: Option<CertInfo>,
    /// Whether a new order reached the server (not a resumed one).
    new_order: bool,
}

impl Sent {
    fn outcome(outcome: Outcome) -> Sent {
        Sent {
            outcome,
            info: None,
            new_order: false,
        }
    }
}

fn empty_info() -> CertInfo {
    CertInfo {
        names: Vec::new(),
        serial: String::new(),
        not_before: 0,
        not_after: 0,
        ari_id: None,
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Every bucket's state, for `envctl quota` and the metrics.
pub fn quota(buckets: &Ledger, account: &str, now: u64) -> Vec<super::ledger::BucketStatus> {
    let mut keys: BTreeSet<BucketKey> = buckets.keys().into_iter().collect();
    if !account.is_empty() {
        keys.insert(BucketKey {
            limit: Limit::NewOrdersPerAccount,
            key: account.to_string(),
        });
    }
    for d in buckets.overrides.keys() {
        keys.insert(BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: d.clone(),
        });
    }
    keys.into_iter().map(|k| buckets.status(&k, now)).collect()
}

fn set_quota_metrics(m: &Metrics, buckets: &Ledger, account: &str, now: u64) {
    let mut least: BTreeMap<Limit, u32> = BTreeMap::new();
    for s in quota(buckets, account, now) {
        let e = least.entry(s.limit).or_insert(s.remaining);
        *e = (*e).min(s.remaining);
    }
    for (limit, remaining) in least {
        m.certs
            .quota_remaining
            .get_or_create(&LimitLabels { limit })
            .set(i64::from(remaining));
    }
}

#[derive(Serialize)]
struct BucketRow {
    limit: Limit,
    key: String,
    capacity: u32,
    used: u32,
    remaining: u32,
    next_token_at: Option<String>,
}

#[derive(Serialize)]
struct QuotaDoc<'a> {
    ledger: String,
    buckets: Vec<BucketRow>,
    /// Orders charged and not finished, by environment.
    pending: &'a BTreeMap<String, Pending>,
    /// Environments waiting for a certificate, with when they first asked.
    queued: BTreeMap<&'a str, String>,
}

/// `envctl quota`: every bucket of the ledger, as a table or JSON.
pub fn quota_report(
    doc: &super::store::LedgerDoc,
    store: &LedgerStore,
    json: bool,
) -> Result<String, String> {
    let now = unix_now();
    let buckets: Vec<BucketRow> = quota(&doc.buckets, "", now)
        .into_iter()
        .map(|s| BucketRow {
            limit: s.limit,
            key: s.key,
            capacity: s.capacity,
            used: s.used,
            remaining: s.remaining,
            next_token_at: s.next_token_at.map(|t| rfc3339(t as i64)),
        })
        .collect();
    let q = QuotaDoc {
        ledger: format!("{}/{}", store.namespace, store.name),
        buckets,
        pending: &doc.pending,
        queued: doc
            .queued
            .iter()
            .map(|(e, t)| (e.as_str(), rfc3339(*t as i64)))
            .collect(),
    };
    if json {
        return serde_json::to_string_pretty(&q)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string());
    }
    let mut out = format!("ledger {}\n", q.ledger);
    let rows: Vec<[String; 6]> = q
        .buckets
        .iter()
        .map(|b| {
            [
                b.limit.to_string(),
                b.key.clone(),
                b.used.to_string(),
                b.remaining.to_string(),
                b.capacity.to_string(),
                b.next_token_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "LIMIT",
        "KEY",
        "USED",
        "REMAINING",
        "CAPACITY",
        "NEXT FREE TOKEN",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no bucket has been charged yet)\n");
    }
    if !q.pending.is_empty() {
        out.push_str(&format!("{} order(s) in flight\n", q.pending.len()));
    }
    if !q.queued.is_empty() {
        out.push_str(&format!(
            "{} environment(s) waiting for a certificate\n",
            q.queued.len()
        ));
    }
    Ok(out)
}
