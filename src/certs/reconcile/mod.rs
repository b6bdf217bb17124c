//! The certificate step, shared by `envctl apply` and `envctl run`, as named steps, each in a
//! file of its own with its own error type:
//!
//! 1. `select`: read each environment's Secret and the controller's copies; decide which
//!    certificates are due (`certs::need`); restore copies (no order) and keep copies.
//! 2. `charge`: queue the due orders against the quota ledger (which go now, which wait and
//!    until when), announce the waits, and charge each order in the ledger, durably, just
//!    before it is sent.
//! 3. `order`: place (or resume) the order; authorize (HTTP-01) and finalize it, bounded in
//!    time; store the certificate in the environment's Secret and the controller's copy.
//! 4. `record`: book each outcome in the ledger, on the namespace, as Events and metrics;
//!    `report` is what the caller gets back.
//!
//! Owns the order of the steps and nothing else: the decisions are `certs`' and `ledger`'s,
//! the protocol is `acme`'s, the storage `store`'s.

mod charge;
mod order;
mod quota;
mod record;
mod report;
mod select;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use kube::Client;

pub use charge::ChargeError;
pub use order::{CompleteError, KeyError, PlaceError, StoreStepError};
pub use quota::{quota, quota_report};
pub use report::{CertReport, EnvOutcome, Outcome, Tally};
pub use select::SelectError;

use super::acme::{Acme, AcmeConfig, AcmeError};
use super::challenges::Challenges;
use super::ledger::{BucketSpec, Limit};
use super::store::{AccountStore, CertStore, LedgerStore, StoreError};
use super::{CertInfo, unix_now};
use crate::manifest::Environment;
use crate::metrics::Metrics;
use crate::status::Events;

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
    #[error("selecting the certificates that are due")]
    Select(#[from] SelectError),
    #[error("queueing certificate orders")]
    Charge(#[from] ChargeError),
}

impl CertSettings {
    /// The limits this process was configured with.
    pub fn limits(&self) -> super::ledger::Limits {
        super::ledger::Limits {
            overrides: self.overrides.clone(),
            margin: self.margin,
            share: self.share,
        }
    }
}

impl CertError {
    /// Whether the cluster could not be reached (or refused envctl): exit code 3.
    pub fn is_unreachable(&self) -> bool {
        match self {
            CertError::Account { .. } => false,
            CertError::Store(e) => e.is_unreachable(),
            CertError::Select(e) => e.is_unreachable(),
            CertError::Charge(e) => e.is_unreachable(),
        }
    }
}

/// Where certificate state lives and how many orders run at once.
#[derive(Debug, Clone)]
pub struct CertSettings {
    /// The controller's namespace: the account, the ledger and the copies.
    pub namespace: String,
    pub instance: String,
    pub overrides: BTreeMap<String, BucketSpec>,
    pub margin: u32,
    /// `--acme-limit-share`: this region's fixed share of the fleet-wide limits.
    pub share: Option<super::ledger::Share>,
    pub concurrency: usize,
    /// Who orders: `controller/<instance>` for `envctl run` (its replicas take turns under
    /// their Lease, and a restarted one resumes its predecessor's orders), `apply/<instance>`
    /// for `envctl apply` (one run resumes the last one's orders). An order in flight is
    /// worked on by its writer alone.
    pub writer: String,
}

/// One environment that wants a certificate.
#[derive(Debug, Clone)]
pub struct Target {
    pub environment: String,
    pub namespace: String,
    pub names: Vec<String>,
    /// The environment's `spec.tls.profile`, if it names one (else `--acme-profile`).
    pub profile: Option<String>,
}

/// The environments with TLS enabled.
pub fn targets<'a>(envs: impl IntoIterator<Item = &'a Environment>) -> Vec<Target> {
    envs.into_iter()
        .filter(|e| e.spec.tls.enabled)
        .map(|e| Target {
            environment: e.metadata.name.clone(),
            namespace: e.namespace(),
            names: super::sorted_names(std::slice::from_ref(&e.spec.hostname)),
            profile: e.spec.tls.profile.clone(),
        })
        .collect()
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
    /// With sharding: the environments this replica serves. The ledger's queue entries of
    /// the others' environments are theirs, and left alone.
    shard: std::sync::Mutex<Option<crate::shard::Writable>>,
}

impl Certs {
    /// With sharding: the environments this replica serves from now on.
    pub fn set_shard(&self, writable: Option<crate::shard::Writable>) {
        *self.shard.lock().unwrap_or_else(|e| e.into_inner()) = writable;
    }

    /// Whether this replica serves `environment`'s certificate (always, without sharding).
    pub(super) fn serves(&self, environment: &str) -> bool {
        self.shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|w| w.may_write(environment))
    }

    /// Restores the account kept in the controller's namespace, or registers one and keeps it.
    /// A process registers at most one account per directory: when keeping it fails, the next
    /// try keeps the same account instead of registering another (Let's Encrypt allows 10
    /// registrations per IP in 3 hours).
    pub async fn connect(
        client: &Client,
        config: AcmeConfig,
        settings: CertSettings,
        challenges: Arc<Challenges>,
    ) -> Result<Certs, CertError> {
        let accounts = AccountStore::new(client, &settings.namespace, &settings.instance);
        // Printed in errors: never with credentials.
        let directory = crate::vocab::redact_urls(&config.directory);
        let account_err = |source| CertError::Account {
            directory: directory.clone(),
            source,
        };
        let stored = accounts.load(&config.directory).await?;
        let unsaved = if stored.is_none() {
            registered(&config.directory)
        } else {
            None
        };
        let (mut acme, created) =
            Acme::connect(config.clone(), stored.as_deref().or(unsaved.as_deref()))
                .await
                .map_err(account_err)?;
        if let Some(creds) = &created {
            remember_registered(&config.directory, creds);
        }
        if let Some(creds) = created.or(unsaved) {
            let kept = accounts.store(&config.directory, creds.clone()).await?;
            forget_registered(&config.directory);
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
                Some(settings.limits()),
            ),
            store: CertStore::new(client, &settings.namespace, &settings.instance),
            challenges,
            settings,
            announced: Default::default(),
            shard: Default::default(),
        })
    }

    /// Brings every target's certificate to where it should be: select, charge, order,
    /// record (see the module's comment).
    pub async fn reconcile(
        &self,
        targets: &[Target],
        events: Option<&Events>,
        metrics: Option<&Metrics>,
    ) -> Result<CertReport, CertError> {
        let now = unix_now();
        let mut books = Books::default();
        // The limits this process was given become the ledger's (written only on a change).
        self.ledger.record_limits().await?;
        let selection = self.select(targets, now, &mut books).await?;
        self.restore_copies(selection.reuse, events, metrics, &mut books)
            .await;
        self.keep_copies(selection.keep).await;
        let queue = self.queue(selection.orders, now).await?;
        // Waits are announced at once, and again once this pass's orders are charged and
        // done (`requeue`): only the ones that moved are written again.
        self.announce_waits(targets, &queue.slots, events, &mut Books::default())
            .await;
        let (account, slots) = (queue.account.clone(), queue.slots.clone());
        self.order_all(targets, queue, events, metrics, &mut books)
            .await;
        let waiting = self.requeue(&slots, &account).await;
        let waits = self
            .announce_waits(targets, &waiting, events, &mut books)
            .await;
        self.record_metrics(metrics, &waits, &books, &account, now)
            .await;
        Ok(books.report(targets))
    }
}

/// What one pass has found so far, filled in by the steps.
#[derive(Default)]
struct Books {
    outcomes: BTreeMap<String, Outcome>,
    /// Expiry times of the certificates in place after the pass.
    expiries: Vec<i64>,
    /// When the step should run again on its own (earliest wait or renewal), unix seconds.
    next_wake: Option<u64>,
    /// New orders sent to the ACME server.
    orders_sent: usize,
}

impl Books {
    fn wake_at(&mut self, at: u64) {
        self.next_wake = Some(self.next_wake.map_or(at, |w| w.min(at)));
    }

    /// The report, in the targets' order.
    fn report(mut self, targets: &[Target]) -> CertReport {
        let environments = targets
            .iter()
            .filter_map(|t| {
                self.outcomes
                    .remove(&t.environment)
                    .map(|outcome| EnvOutcome {
                        environment: t.environment.clone(),
                        namespace: t.namespace.clone(),
                        outcome,
                    })
            })
            .collect();
        CertReport {
            environments,
            orders_sent: self.orders_sent,
            next_wake: self.next_wake,
        }
    }
}

/// Accounts this process registered and has not kept in the cluster yet, by directory.
static REGISTERED: std::sync::Mutex<BTreeMap<String, Vec<u8>>> =
    std::sync::Mutex::new(BTreeMap::new());

fn registered(directory: &str) -> Option<Vec<u8>> {
    REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(directory)
        .cloned()
}

fn remember_registered(directory: &str, creds: &[u8]) {
    REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(directory.to_string(), creds.to_vec());
}

fn forget_registered(directory: &str) {
    REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(directory);
}

/// Runs futures, at most `n` at once. (Collecting them first keeps the borrows they hold
/// simple enough for the compiler to prove the caller's future `Send`.)
async fn bounded<F: std::future::Future>(futures: Vec<F>, n: usize) -> Vec<F::Output> {
    futures::stream::iter(futures)
        .buffer_unordered(n)
        .collect()
        .await
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
