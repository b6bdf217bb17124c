//! `envctl run`: the GitOps loop. Each tick asks the source whether it moved (ls-remote, no
//! fetch), fetches only then, and reconciles with the same pass as `envctl apply`. Watches on
//! the owned objects bring drift back within seconds; a webhook or a full resync can wake it
//! early. With leader election only the leader writes.
//!
//! Owns scheduling and bookkeeping; every decision about objects is the pass's.

use std::collections::{BTreeMap, BTreeSet};

use futures::{FutureExt, StreamExt};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Client;
use tokio::sync::{Notify, watch};

use super::health::HealthMap;
use super::http::{self, Shared};
use super::leader::{self, LeaseConfig};
use super::relay::Relay;
use super::shard::SharedMembership;
use crate::certs::CertMode;
use crate::certs::acme::AcmeConfig;
use crate::certs::challenges::Challenges;
use crate::certs::reconcile::{CertSettings, Certs, Target};
use crate::cluster::{FailureReason, WriteFence};
use crate::diagnostic::Diagnostic;
use crate::manifest::{self, LoadOptions, SourceFile};
use crate::observe::OBSERVED_KINDS;
use crate::pass::{PassOptions, apply_pass, plan_pass};
use crate::plan::Action;
use crate::render;
use crate::rollout::RolloutStatus;
use crate::source::git::{GitBackend, GitError};
use crate::status::{
    self, ApiVerb, EnvState, EnvStatus, Events, FailureLabels, Metrics, PollLabels, PollResult,
    Trigger, TriggerLabels,
};
use crate::vocab::error_chain;

/// Where `run` reads manifests.
pub enum RunSource {
    Git(Box<dyn GitBackend>),
    Directory(PathBuf),
}

pub struct RunOptions {
    pub source: RunSource,
    /// With a directory source: reconcile on file changes (debounced), not only each interval.
    pub watch: bool,
    pub load: LoadOptions,
    pub max_file_size: u64,
    pub pass: PassOptions,
    pub interval: Duration,
    pub resync: Duration,
    pub listen: SocketAddr,
    pub webhook_secret: Option<Vec<u8>>,
    pub leader: Option<LeaseConfig>,
    /// `--shard`: this replica's member Lease; environments are shared among the members.
    pub shard: Option<LeaseConfig>,
    /// How long a pass in flight may take to finish after SIGTERM or SIGINT.
    pub shutdown_grace: Duration,
    /// A rollout without progress for this long is Degraded.
    pub progress_deadline: Duration,
    /// Certificates: skipped, unconfigured (reported only) or from an ACME directory.
    pub certs: CertMode,
    /// Where certificate state lives (used with `CertMode::Acme`).
    pub cert_settings: CertSettings,
}

/// The controller's clients. `writer` holds every write to `fence` (passes, prunes, status,
/// Events, certificates); `leases` writes only what a standby writes too (the webhook relay,
/// releasing the Lease on shutdown). The Lease tasks connect on their own thread with
/// `lease_connect`.
pub struct Clients {
    pub writer: Client,
    pub leases: Client,
    pub fence: WriteFence,
    pub lease_connect: LeaseConnect,
}

/// How the Lease thread reaches the API server: the kubeconfig and the User-Agent's replica.
#[derive(Debug, Clone)]
pub struct LeaseConnect {
    pub kubeconfig: Option<PathBuf>,
    pub agent: String,
}

/// Runs a Lease task (`task`, given a client of its own) on a thread and a runtime of its
/// own, so that however long a pass keeps the controller's runtime busy (rendering and
/// planning a large fleet is CPU work), renewals are sent on time. Ends when `stop` turns
/// true; its result, if it ends for good, goes to `done`.
fn on_lease_thread<F, Fut>(
    connect: LeaseConnect,
    mut stop: watch::Receiver<bool>,
    task: F,
) -> tokio::sync::oneshot::Receiver<leader::LeaseError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = leader::LeaseError>,
{
    let (done, result) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("envctl-lease".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "starting the Lease thread's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let client = loop {
                    match crate::cluster::connect_as(connect.kubeconfig.as_deref(), Some(&connect.agent)).await {
                        Ok(c) => break c,
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "connecting the Lease client; retrying in a second");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = stop.wait_for(|s| *s) => return,
                            }
                        }
                    }
                };
                tokio::select! {
                    e = task(client) => { let _ = done.send(e); }
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the Lease thread");
    }
    result
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("leading")]
    Lease(#[source] leader::LeaseError),
    #[error("watching {path} for changes")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
    #[error("starting the watch cache")]
    Cache(#[source] crate::observe::ObserveError),
    #[error("serving HTTP on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One revision of the source, as read.
#[derive(Clone)]
pub(super) struct Revision {
    pub(super) id: String,
    pub(super) files: Vec<SourceFile>,
    pub(super) problems: Vec<Diagnostic>,
    /// Paths that changed since the previous revision, when known.
    pub(super) changed: Option<BTreeSet<String>>,
}

pub(super) type SharedGit = Arc<Mutex<Box<dyn GitBackend>>>;

/// Longest the first list of every owned kind may take before `run` gives up.
const CACHE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How many source revisions `Loop::history` keeps.
pub(super) const HISTORY: usize = 8;

/// Longest a poll (ls-remote, fetch and read) may take before the loop goes on without it.
pub(super) const POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// Asks the source whether it moved; fetches and reads only then.
async fn poll(
    source: &PollSource,
    current: Option<&Revision>,
    max: u64,
) -> Result<Option<Revision>, String> {
    match source {
        PollSource::Git(git) => {
            let git = git.clone();
            let known = current.map(|r| r.id.clone());
            let task = tokio::task::spawn_blocking(move || -> Result<Option<Revision>, String> {
                // A poll that outlived its timeout may still hold the source: skip this one.
                let mut g = match git.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        return Err("the previous poll is still running".into());
                    }
                };
                let result = (|| -> Result<Option<Revision>, GitError> {
                    let head = g.remote_head()?;
                    if known.as_deref() == Some(head.as_str()) {
                        return Ok(None);
                    }
                    let id = g.fetch()?;
                    let (files, problems) = g.read(&id, max)?;
                    let changed = known.as_deref().and_then(|k| g.changed(k, &id));
                    Ok(Some(Revision {
                        id,
                        files,
                        problems,
                        changed,
                    }))
                })();
                result.map_err(|e| error_chain(&e))
            });
            match tokio::time::timeout(POLL_TIMEOUT, task).await {
                Ok(joined) => joined.map_err(|e| format!("the Git task failed: {e}"))?,
                Err(_) => Err(format!("the poll took longer than {POLL_TIMEOUT:?}")),
            }
        }
        PollSource::Directory(root) => {
            let root = root.clone();
            let (files, problems) =
                tokio::task::spawn_blocking(move || crate::source::read_paths(&[root], max))
                    .await
                    .map_err(|e| format!("reading the directory failed: {e}"))?;
            let id = crate::source::directory_revision(&files, &problems);
            if current.is_some_and(|c| c.id == id) {
                return Ok(None);
            }
            Ok(Some(Revision {
                id,
                files,
                problems,
                changed: None,
            }))
        }
    }
}

enum PollSource {
    Git(SharedGit),
    Directory(PathBuf),
}

pub(super) struct Loop {
    pub(super) client: Client,
    pub(super) cache: crate::observe::Cache,
    pub(super) opts: RunOptions,
    pub(super) metrics: Arc<Metrics>,
    pub(super) events: Events,
    /// Status last written per environment: (revision, state, error).
    pub(super) written: BTreeMap<String, (String, EnvState, Option<String>)>,
    /// The validated manifests of the last revision read (drift and resync passes reuse them).
    pub(super) loaded: Option<(String, std::sync::Arc<manifest::Loaded>)>,
    /// Wakes the certificate worker with the environments that want certificates.
    pub(super) cert_targets: watch::Sender<Vec<Target>>,
    /// Refused environments already logged at error level (logged once, not every pass).
    pub(super) refusals_reported: BTreeSet<String>,
    /// Failing environments: failures in a row, and when the next try is due.
    pub(super) backoff: BTreeMap<String, (u32, tokio::time::Instant)>,
    /// When the last pass started.
    pub(super) last_pass_at: tokio::time::Instant,
    /// Every environment's health, kept current by `super::health`.
    pub(super) health: HealthMap,
    /// The Git source, to read the revisions environments held by a rollout still run.
    pub(super) git: Option<SharedGit>,
    /// The last revisions read, newest last (a rollout renders held environments from them).
    pub(super) history: std::collections::VecDeque<(String, Arc<manifest::Loaded>)>,
    /// The rollout's status as last recorded, and whether it waits on health.
    pub(super) rollout: Option<RolloutStatus>,
    pub(super) rollout_waiting: bool,
    /// Earlier revisions that could not be read (not asked again).
    pub(super) unreadable: BTreeSet<String>,
    /// Per environment, the desired-hash of each StatefulSet this process last wrote: health
    /// judged from older versions of them does not count for a rollout.
    pub(super) applied_stateful_sets: BTreeMap<String, BTreeMap<String, String>>,
    /// With `--shard`: the member sets seen, which decide what this replica writes.
    pub(super) membership: Option<SharedMembership>,
    /// With `--shard`: counts changes of the member set (a pass stops writing on one).
    pub(super) shard_generation: Option<watch::Receiver<u64>>,
    /// Environments found in sync, which a pass need not render or read again while their
    /// manifest and live objects stay as they were (forgotten on every resync).
    pub(super) in_sync: Arc<crate::pass::InSync>,
    /// What validation made of each file of the last revision (a new revision validates
    /// only the files that changed).
    pub(super) validated: manifest::Validated,
}

/// A failing environment is tried again after 2 s, 4 s, 8 s ... at most 5 minutes apart.
const ENV_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const ENV_BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Loop {
    /// With sharding: what this replica may write in this pass (and the shard metrics).
    fn writable(&self, loaded: &manifest::Loaded) -> Option<crate::shard::Writable> {
        let membership = self.membership.as_ref()?;
        let m = membership.lock().unwrap_or_else(|e| e.into_inner());
        let owned = loaded
            .environments
            .iter()
            .filter(|e| m.owns(&e.environment.metadata.name))
            .count();
        self.metrics
            .shard_environments
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
        self.metrics.shard_members.set(
            m.members()
                .map_or(0, |s| i64::try_from(s.len()).unwrap_or(i64::MAX)),
        );
        Some(m.writable(tokio::time::Instant::now()))
    }

    /// When the earliest failing environment is due again; never sooner than a second after
    /// the previous pass, so that no state can make retries spin.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        let earliest = self.backoff.values().map(|b| b.1).min()?;
        Some(earliest.max(self.last_pass_at + Duration::from_secs(1)))
    }
}

impl Loop {
    /// `scoped`: plan only the environments whose files changed in this revision (plus any
    /// not known to be applied); drift, webhook-less resyncs and the first pass plan all.
    async fn reconcile(&mut self, revision: &Revision, trigger: Trigger, scoped: bool) {
        let started = Instant::now();
        self.metrics
            .reconciles
            .get_or_create(&TriggerLabels { trigger })
            .inc();
        let loaded = match &self.loaded {
            Some((id, loaded)) if *id == revision.id => loaded.clone(),
            _ => {
                let loaded = std::sync::Arc::new(manifest::load_with_unread(
                    &revision.files,
                    &revision.problems,
                    &self.opts.load,
                    &mut self.validated,
                ));
                for d in &loaded.diagnostics {
                    tracing::warn!(revision = %revision.id, "{d}");
                }
                self.loaded = Some((revision.id.clone(), loaded.clone()));
                if !self.history.iter().any(|(id, _)| *id == revision.id) {
                    self.history
                        .push_back((revision.id.clone(), loaded.clone()));
                    if self.history.len() > HISTORY {
                        self.history.pop_front();
                    }
                }
                loaded
            }
        };
        let rolled = self.roll(revision, &loaded).await;
        let loaded = rolled.loaded.clone();
        let load_ms = started.elapsed().as_millis() as u64;
        self.last_pass_at = tokio::time::Instant::now();
        // An environment that left the source (or became invalid) has nothing to retry.
        self.backoff
            .retain(|name, _| loaded.environment(name).is_some());
        let mut pass_options = self.opts.pass.clone();
        pass_options.writable = self.writable(&loaded);
        if trigger == Trigger::Resync {
            // The periodic resync plans every environment in full.
            self.in_sync.forget();
        }
        pass_options.in_sync = Some(self.in_sync.clone());
        // A failing environment waits out its own backoff (unless its file changed: a fix
        // was pushed); the others go on.
        let now = tokio::time::Instant::now();
        let backing_off = |name: &str| self.backoff.get(name).is_some_and(|b| b.1 > now);
        let file_changed = |file: &str| revision.changed.as_ref().is_some_and(|c| c.contains(file));
        if let (true, Some(changed)) = (scoped, &revision.changed) {
            let scope: BTreeSet<String> = loaded
                .environments
                .iter()
                .filter(|e| {
                    let name = &e.environment.metadata.name;
                    changed.contains(&e.origin.file)
                        || self
                            .written
                            .get(name)
                            .is_none_or(|w| w.1 != EnvState::Applied)
                            && !backing_off(name)
                })
                .map(|e| e.environment.metadata.name.clone())
                .collect();
            tracing::debug!(
                environments = scope.len(),
                "planning only the environments that changed"
            );
            pass_options.scope = Some(scope);
        } else if self.backoff.values().any(|b| b.1 > now) {
            pass_options.scope = Some(
                loaded
                    .environments
                    .iter()
                    .filter(|e| {
                        !backing_off(&e.environment.metadata.name) || file_changed(&e.origin.file)
                    })
                    .map(|e| e.environment.metadata.name.clone())
                    .collect(),
            );
        }
        if !rolled.untouchable.is_empty() {
            let all: BTreeSet<String> = loaded
                .environments
                .iter()
                .map(|e| e.environment.metadata.name.clone())
                .collect();
            let scope = pass_options.scope.get_or_insert(all);
            scope.retain(|name| !rolled.untouchable.contains(name));
        }
        let pass = match plan_pass(
            Some(&self.client),
            Some(&self.cache),
            &loaded,
            &pass_options,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "planning failed; nothing was changed");
                return;
            }
        };
        self.metrics
            .count_api(ApiVerb::DryRun, pass.dry_runs as u64);
        let applying = Instant::now();
        let report = match self.shard_generation.clone() {
            // Sharded: a change of the member set mid-pass stops the pass's writes (some of
            // its environments may have become another replica's); the next pass re-plans.
            Some(mut generation) => {
                generation.borrow_and_update();
                let changed = async move {
                    if generation.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    report = apply_pass(&self.client, &pass, &pass_options) => report,
                    _ = changed => {
                        self.note_applied_stateful_sets(&loaded, &pass.plan.changes);
                        tracing::warn!(revision = %revision.id, "the shard's members changed during the pass: its remaining writes are left to the next pass");
                        return;
                    }
                }
            }
            None => apply_pass(&self.client, &pass, &pass_options).await,
        };
        let apply_ms = applying.elapsed().as_millis() as u64;
        self.note_applied_stateful_sets(&loaded, &pass.plan.changes);
        let writes = pass
            .plan
            .changes
            .iter()
            .filter(|c| c.action != Action::Delete)
            .count();
        self.metrics.count_api(ApiVerb::Apply, writes as u64);
        self.metrics
            .count_api(ApiVerb::Delete, (pass.plan.changes.len() - writes) as u64);

        // Per-environment outcome.
        // Per-environment outcome: an environment whose read, dry-run or write failed fails
        // alone, with the server's message.
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut reasons: BTreeMap<String, FailureReason> = pass.failure_reasons.clone();
        for f in &pass.plan.failed {
            failed.insert(f.environment.clone(), f.reason.clone());
        }
        for f in &report.failures {
            failed
                .entry(f.environment.clone())
                .or_insert_with(|| format!("{} {}: {}", f.action.as_str(), f.object, f.error));
            if let Some(r) = f.reason {
                reasons.entry(f.environment.clone()).or_insert(r);
            }
        }
        for (env, reason) in &failed {
            let r = reasons.get(env).copied().unwrap_or(FailureReason::Other);
            self.metrics
                .environment_failures
                .get_or_create(&FailureLabels { reason: r })
                .inc();
            let entry = self.backoff.entry(env.clone()).or_insert((0, now));
            entry.0 += 1;
            let wait = ENV_BACKOFF_FIRST
                .saturating_mul(1 << entry.0.min(16))
                .min(ENV_BACKOFF_MAX);
            entry.1 = tokio::time::Instant::now() + wait;
            tracing::warn!(environment = %env, attempt = entry.0, retry_in = ?wait, reason = ?r, error = %reason, "environment failed; the others go on");
        }
        let refused: BTreeSet<&str> = pass
            .plan
            .refused
            .iter()
            .map(|r| r.environment.as_str())
            .collect();
        for r in &pass.plan.refused {
            failed.insert(r.environment.clone(), r.reason.clone());
            if self.refusals_reported.insert(r.environment.clone()) {
                tracing::error!(environment = %r.environment, reason = %r.reason, "refused");
            }
        }
        let mut touched: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for c in &pass.plan.changes {
            let e = touched.entry(c.environment.as_str()).or_default();
            if c.action == Action::Delete {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut counts: BTreeMap<EnvState, i64> = BTreeMap::new();
        let mut statuses = Vec::new();
        let unconfigured = matches!(self.opts.certs, CertMode::Unconfigured);
        let mut without_certificate = 0i64;
        let writes = |name: &str| pass_options.writes(name);
        for env in loaded
            .environments
            .iter()
            .filter(|e| writes(&e.environment.metadata.name))
        {
            let name = env.environment.metadata.name.clone();
            let certificate = (unconfigured && env.environment.spec.tls.enabled)
                .then_some(crate::certs::UNCONFIGURED_NOTE);
            without_certificate += i64::from(certificate.is_some());
            let file_changed = revision
                .changed
                .as_ref()
                .is_none_or(|c| c.contains(&env.origin.file));
            let (state, error) = match failed.get(&name) {
                Some(e) => (EnvState::Failed, Some(e.clone())),
                // Not planned this pass (out of scope or backing off): as last recorded.
                None if pass_options
                    .scope
                    .as_ref()
                    .is_some_and(|s| !s.contains(&name)) =>
                {
                    match self.written.get(&name) {
                        Some((_, st, err)) => (*st, err.clone()),
                        None => (EnvState::Applied, None),
                    }
                }
                None => {
                    self.backoff.remove(&name);
                    (EnvState::Applied, None)
                }
            };
            *counts.entry(state).or_default() += 1;
            let previous = self.written.get(&name).cloned();
            let revision_id = if let Some(kept) = rolled.held.get(&name) {
                kept.clone()
            } else if file_changed || touched.contains_key(name.as_str()) || previous.is_none() {
                revision.id.clone()
            } else {
                previous
                    .as_ref()
                    .map_or(revision.id.clone(), |p| p.0.clone())
            };
            statuses.push(EnvStatus {
                namespace: env.environment.namespace(),
                environment: name,
                revision: revision_id,
                state,
                error,
                certificate,
            });
        }
        for name in loaded.invalid_names.iter().filter(|n| writes(n)) {
            *counts.entry(EnvState::Invalid).or_default() += 1;
            let reason = loaded
                .invalid_reasons
                .get(name)
                .cloned()
                .unwrap_or_else(|| "invalid manifest".into());
            let previous_revision = self
                .written
                .get(name)
                .map(|p| p.0.clone())
                .unwrap_or_default();
            statuses.push(EnvStatus {
                namespace: crate::manifest::namespace_for(name),
                environment: name.clone(),
                revision: previous_revision,
                state: EnvState::Invalid,
                error: Some(reason),
                certificate: None,
            });
        }
        self.metrics.set_states(&counts);
        self.metrics.certs.unconfigured.set(without_certificate);
        if without_certificate > 0 {
            tracing::warn!(
                environments = without_certificate,
                "TLS environments are applied without certificates: no ACME directory is configured (--acme-directory letsencrypt, letsencrypt-staging or a URL)"
            );
        }
        self.metrics.set_revision(&revision.id);

        // The certificate worker looks again when the environments changed or a namespace
        // was (re)created; otherwise it keeps its own schedule.
        let targets = crate::certs::reconcile::targets(
            loaded
                .environments
                .iter()
                .map(|e| &e.environment)
                .filter(|e| !refused.contains(e.metadata.name.as_str()))
                .filter(|e| writes(&e.metadata.name)),
        );
        let created_namespace = pass
            .plan
            .changes
            .iter()
            .any(|c| c.key.kind == render::ObjectKind::Namespace && c.action == Action::Create);
        let names = |t: &[Target]| -> Vec<(String, Vec<String>)> {
            t.iter()
                .map(|t| (t.environment.clone(), t.names.clone()))
                .collect()
        };
        if created_namespace || names(&self.cert_targets.borrow()) != names(&targets) {
            self.cert_targets.send_replace(targets);
        }

        // Status annotations (written only when they change) and Events, concurrently.
        let live_ns = &pass.live_namespaces;
        let mut annotate = Vec::new();
        let mut publish: Vec<(String, bool, &'static str, String)> = Vec::new();
        // An environment another replica writes is recorded afresh if it comes back.
        self.written.retain(|name, _| writes(name));
        for s in statuses {
            let key = (s.revision.clone(), s.state, s.error.clone());
            let recorded = live_ns.get(&s.namespace);
            let same_as_live = recorded.is_some_and(|a| {
                a.get(status::REVISION_ANNOTATION) == Some(&s.revision)
                    && a.get(status::STATE_ANNOTATION).map(String::as_str) == Some(s.state.as_str())
                    && a.get(status::ERROR_ANNOTATION) == s.error.as_ref()
                    && a.get(crate::certs::CERTIFICATE_ANNOTATION)
                        .map(String::as_str)
                        == s.certificate
            });
            let namespace_exists =
                recorded.is_some() || touched.contains_key(s.environment.as_str());
            let changed = self.written.insert(s.environment.clone(), key.clone()) != Some(key);
            let note = s.error.clone().unwrap_or_default();
            match (s.state, touched.get(s.environment.as_str())) {
                // Nothing is written into a namespace that is not ours, Events included.
                _ if refused.contains(s.environment.as_str()) => {}
                (EnvState::Failed, _) if changed => {
                    publish.push((s.namespace.clone(), true, "ApplyFailed", note))
                }
                (EnvState::Invalid, _) if changed && namespace_exists => publish.push((
                    s.namespace.clone(),
                    true,
                    "InvalidManifest",
                    format!("kept at its last applied state: {note}"),
                )),
                (EnvState::Applied, Some((applied, deleted))) => publish.push((
                    s.namespace.clone(),
                    false,
                    "Applied",
                    format!(
                        "revision {}: {applied} object(s) applied, {deleted} deleted",
                        revision.id
                    ),
                )),
                _ => {}
            }
            if !same_as_live && namespace_exists && changed {
                annotate.push(s);
            }
        }
        let concurrency = self.opts.pass.concurrency.max(1);
        let (client, events) = (&self.client, &self.events);
        let written: Vec<bool> = futures::stream::iter(annotate.iter().map(|s| async {
            match status::annotate(client, s, &now).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "writing status");
                    false
                }
            }
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
        self.metrics.count_api(
            ApiVerb::StatusPatch,
            written.iter().filter(|w| **w).count() as u64,
        );
        futures::stream::iter(
            publish
                .into_iter()
                .map(|(ns, warning, reason, note)| async move {
                    events.publish(&ns, warning, reason, note).await
                }),
        )
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
        for h in &pass.plan.held {
            tracing::warn!(object = %h.key, reason = %h.reason, "held");
        }
        for c in
            pass.plan.changes.iter().filter(|c| {
                c.action == Action::Delete && c.key.kind == render::ObjectKind::Namespace
            })
        {
            tracing::info!(namespace = %c.key.name, "pruned environment");
        }
        let elapsed = started.elapsed();
        self.metrics
            .reconcile_seconds
            .observe(elapsed.as_secs_f64());
        if !pass.plan.has_changes() && trigger == Trigger::Drift {
            tracing::debug!(
                ms = elapsed.as_millis() as u64,
                "drift check: nothing to change"
            );
            return;
        }
        tracing::info!(
            revision = %revision.id,
            trigger = ?trigger,
            create = pass.plan.summary.create,
            update = pass.plan.summary.update,
            delete = pass.plan.summary.delete,
            unchanged = pass.plan.summary.unchanged,
            in_sync = self.in_sync.len(),
            held = pass.plan.summary.held,
            invalid = loaded.invalid_names.len(),
            failed = report.failures.len(),
            ms = elapsed.as_millis() as u64,
            load_ms = load_ms,
            observe_ms = pass.timings.get("observe").map_or(0, |d| d.as_millis() as u64),
            render_ms = pass.timings.get("render").map_or(0, |d| d.as_millis() as u64),
            plan_ms = pass.timings.get("plan").map_or(0, |d| d.as_millis() as u64),
            dry_run_ms = pass.timings.get("dry-run").map_or(0, |d| d.as_millis() as u64),
            apply_ms = apply_ms,
            "reconciled"
        );
    }
}

/// Runs the controller until interrupted.
pub async fn run(clients: Clients, opts: RunOptions) -> Result<(), RunError> {
    let Clients {
        writer: client,
        leases,
        fence,
        lease_connect,
    } = clients;
    // Stops the Lease thread (before the Lease is released on shutdown).
    let (lease_stop, lease_stopping) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let (lead_tx, lead_rx) = watch::channel(opts.leader.is_none());
    let challenges = matches!(opts.certs, CertMode::Acme(_)).then(|| {
        Arc::new(Challenges::new(
            &client,
            &opts.cert_settings.namespace,
            &opts.cert_settings.instance,
        ))
    });
    let relay = opts.leader.as_ref().or(opts.shard.as_ref()).map(|cfg| {
        Relay::new(
            &leases,
            &cfg.namespace,
            &opts.pass.render.instance,
            &cfg.identity,
        )
    });
    let poke = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        ready: Default::default(),
        webhook_secret: opts.webhook_secret.clone(),
        poke: poke.clone(),
        challenges: challenges.clone(),
        leading: lead_rx.clone(),
        relay: relay.clone(),
        sharded: opts.shard.is_some(),
    });
    // SIGTERM (rollouts, drains) and SIGINT: stop starting passes, finish the one in flight
    // within the grace period, release the Lease, exit 0.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("asked to stop: no new pass is started");
        let _ = stop_tx.send(true);
    });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.listen,
            source,
        })?;
    tracing::info!(addr = %opts.listen, "listening");
    let router = http::router(shared.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });

    // A lease task ends only for good (another live process has this identity): the loop
    // stops, and `run` returns the reason.
    let (fatal_tx, mut fatal_rx) = watch::channel::<Option<String>>(None);
    let fatal_tx = Arc::new(fatal_tx);
    let lease_error: Arc<Mutex<Option<leader::LeaseError>>> = Arc::default();
    let leader_task = opts.leader.clone().map(|cfg| {
        let (fence, fatal, slot) = (fence.clone(), fatal_tx.clone(), lease_error.clone());
        let ended = on_lease_thread(lease_connect.clone(), lease_stopping.clone(), move |c| {
            leader::run(c, cfg, lead_tx, fence)
        });
        tokio::spawn(async move {
            if let Ok(e) = ended.await {
                tracing::error!(error = %e, "stopping");
                let _ = fatal.send(Some(e.to_string()));
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        })
    });
    let shard_changed = Arc::new(Notify::new());
    let membership: Option<SharedMembership> = opts.shard.as_ref().map(|cfg| {
        Arc::new(Mutex::new(crate::shard::Membership::new(
            &cfg.identity,
            cfg.duration,
        )))
    });
    let (generation_tx, generation_rx) = watch::channel(0u64);
    let shard_task = opts.shard.clone().zip(membership.clone()).map(|(cfg, m)| {
        let (instance, changed, fence) = (
            opts.pass.render.instance.clone(),
            shard_changed.clone(),
            fence.clone(),
        );
        let ended = on_lease_thread(lease_connect.clone(), lease_stopping.clone(), move |c| {
            super::shard::run(c, cfg, instance, m, changed, generation_tx, fence)
        });
        let (fatal, slot) = (fatal_tx.clone(), lease_error.clone());
        tokio::spawn(async move {
            if let Ok(e) = ended.await {
                tracing::error!(error = %e, "stopping");
                let _ = fatal.send(Some(e.to_string()));
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        })
    });
    if let (Some(relay), true) = (relay, opts.webhook_secret.is_some()) {
        tokio::spawn(relay.watch(poke.clone()));
    }
    let drift = Arc::new(Notify::new());
    let cache = crate::observe::Cache::start(
        &client,
        &opts.pass.render.instance,
        drift.clone(),
        metrics.watch_errors.clone(),
    );
    cache
        .ready(CACHE_READY_TIMEOUT)
        .await
        .map_err(RunError::Cache)?;
    metrics.count_api(ApiVerb::List, OBSERVED_KINDS.len() as u64);

    let mut opts = opts;
    let poll_source =
        match std::mem::replace(&mut opts.source, RunSource::Directory(PathBuf::new())) {
            RunSource::Git(g) => PollSource::Git(Arc::new(Mutex::new(g))),
            RunSource::Directory(d) => PollSource::Directory(d),
        };
    // `--watch`: file changes in a directory source wake the loop (debounced).
    let file_changes = Arc::new(Notify::new());
    let _debouncer = match (&poll_source, opts.watch) {
        (PollSource::Directory(root), true) => {
            let wake = file_changes.clone();
            let mut debouncer = notify_debouncer_full::new_debouncer(
                Duration::from_millis(300),
                None,
                move |result: notify_debouncer_full::DebounceEventResult| {
                    if result.is_ok_and(|events| !events.is_empty()) {
                        wake.notify_one();
                    }
                },
            )
            .map_err(|source| RunError::Watch {
                path: root.display().to_string(),
                source,
            })?;
            debouncer
                .watch(root, notify::RecursiveMode::Recursive)
                .map_err(|source| RunError::Watch {
                    path: root.display().to_string(),
                    source,
                })?;
            Some(debouncer)
        }
        _ => None,
    };
    let events = Events::new(client.clone(), &opts.pass.render.instance);
    let health_changed = Arc::new(Notify::new());
    let health = super::health::start(
        &client,
        &opts.pass.render.instance,
        opts.progress_deadline,
        metrics.clone(),
        lead_rx.clone(),
        membership.clone(),
        health_changed.clone(),
    );
    let (cert_targets, targets_rx) = watch::channel(Vec::new());
    let cert_task = match (opts.certs.clone(), challenges) {
        (CertMode::Acme(config), Some(challenges)) => Some(tokio::spawn(cert_worker(
            client.clone(),
            config,
            opts.cert_settings.clone(),
            challenges,
            metrics.clone(),
            targets_rx,
            lead_rx.clone(),
            stop_rx.clone(),
            opts.resync,
            membership.clone(),
            fence.clone(),
        ))),
        _ => None,
    };
    let interval = opts.interval;
    let resync = opts.resync;
    let max = opts.max_file_size;
    let mut state = Loop {
        client,
        cache,
        opts,
        metrics: metrics.clone(),
        events,
        written: BTreeMap::new(),
        loaded: None,
        cert_targets,
        refusals_reported: BTreeSet::new(),
        backoff: BTreeMap::new(),
        last_pass_at: tokio::time::Instant::now(),
        health,
        git: match &poll_source {
            PollSource::Git(g) => Some(g.clone()),
            PollSource::Directory(_) => None,
        },
        history: std::collections::VecDeque::new(),
        rollout: None,
        rollout_waiting: false,
        unreadable: BTreeSet::new(),
        applied_stateful_sets: BTreeMap::new(),
        shard_generation: membership.is_some().then_some(generation_rx),
        in_sync: Arc::default(),
        validated: manifest::Validated::default(),
        membership,
    };
    let mut current: Option<Revision> = None;
    let mut last_pass = Instant::now();
    let mut trigger = Trigger::Poll;
    let mut first = true;
    let mut cancelled_pass = false;
    let mut stop = stop_rx.clone();
    let grace = state.opts.shutdown_grace;
    loop {
        if *stop.borrow() {
            break;
        }
        if !first {
            // A standby that becomes the leader reconciles at once, not an interval later.
            let standing_by = !*lead_rx.borrow();
            let mut became_leader = lead_rx.clone();
            let retry_at = state.next_retry();
            let settles_at = state.membership.as_ref().and_then(|m| {
                m.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .settles_at(tokio::time::Instant::now())
            });
            tokio::select! {
                _ = shard_changed.notified() => trigger = Trigger::Shard,
                _ = tokio::time::sleep_until(settles_at.unwrap_or_else(tokio::time::Instant::now)), if settles_at.is_some() => trigger = Trigger::Shard,
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => trigger = Trigger::Retry,
                _ = stop.changed() => break,
                _ = fatal_rx.changed() => break,
                _ = became_leader.wait_for(|l| *l), if standing_by => trigger = Trigger::Poll,
                _ = tokio::time::sleep(interval) => trigger = Trigger::Poll,
                _ = shared.poke.notified() => trigger = Trigger::Webhook,
                _ = file_changes.notified() => trigger = Trigger::Watch,
                _ = health_changed.notified(), if state.rollout_waiting => trigger = Trigger::Health,
                _ = drift.notified() => {
                    // Let a burst of watch events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    trigger = Trigger::Drift;
                }
            }
        }
        first = false;
        if fatal_rx.borrow().is_some() {
            break;
        }
        if !*lead_rx.borrow() || !fence.is_open() {
            // A standby is healthy and ready; it only waits.
            shared.ready.store(true, Ordering::Relaxed);
            continue;
        }
        let moved = match poll(&poll_source, current.as_ref(), max).await {
            Ok(Some(rev)) => {
                metrics
                    .polls
                    .get_or_create(&PollLabels {
                        result: PollResult::Fetched,
                    })
                    .inc();
                tracing::info!(revision = %rev.id, "new revision");
                current = Some(rev);
                true
            }
            Ok(None) => {
                metrics
                    .polls
                    .get_or_create(&PollLabels {
                        result: PollResult::Unchanged,
                    })
                    .inc();
                false
            }
            Err(e) => {
                metrics
                    .polls
                    .get_or_create(&PollLabels {
                        result: PollResult::Error,
                    })
                    .inc();
                tracing::warn!(error = %e, "polling the source failed; keeping the last revision");
                false
            }
        };
        let resync_due = last_pass.elapsed() >= resync;
        let Some(rev) = current.clone() else { continue };
        let why = if cancelled_pass && !moved {
            // The last pass was cancelled when the fence closed: done again now that it is
            // open (nothing else would ask for it until the next resync).
            Trigger::Retry
        } else if moved
            || matches!(
                trigger,
                Trigger::Drift
                    | Trigger::Webhook
                    | Trigger::Retry
                    | Trigger::Health
                    | Trigger::Shard
            )
        {
            trigger
        } else if resync_due {
            Trigger::Resync
        } else {
            continue; // nothing moved: no fetch was made, nothing is written
        };
        if *stop.borrow() || !*lead_rx.borrow() || !fence.is_open() {
            continue; // asked to stop, or the lease was lost while polling
        }
        // A pass in flight when the stop comes may finish within the grace period.
        let mut stopping = stop_rx.clone();
        tokio::select! {
            outcome = std::panic::AssertUnwindSafe(state.reconcile(&rev, why, moved)).catch_unwind() => {
                if outcome.is_err() {
                    // A bug: the pass ends as an error; the next trigger starts a new one.
                    tracing::error!(revision = %rev.id, "the pass panicked (a bug; please report it); nothing more is written in it");
                    state.metrics.environment_failures.get_or_create(&FailureLabels { reason: FailureReason::Other }).inc();
                }
            }
            _ = async {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace = ?grace, "the pass did not finish within the grace period; stopping anyway");
                break;
            }
            // The lease is lost, or was not renewed in time: its writes are refused already
            // (the fenced client); the pass stops here instead of failing request by request.
            _ = fence.wait_closed() => {
                tracing::warn!(revision = %rev.id, "the lease is no longer current: the pass in flight is cancelled and writes nothing more");
                cancelled_pass = true;
                continue;
            }
        }
        cancelled_pass = false;
        last_pass = Instant::now();
        shared.ready.store(true, Ordering::Relaxed);
    }
    if let Some(task) = &shard_task {
        task.abort();
    }
    let _ = lease_stop.send(true);
    fence.close();
    shutdown(
        &leases,
        state.opts.leader.as_ref(),
        state
            .opts
            .shard
            .as_ref()
            .map(|cfg| (cfg, state.opts.pass.render.instance.as_str())),
        cert_task,
        leader_task,
        grace,
    )
    .await;
    let fatal = lease_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match fatal {
        Some(e) => Err(RunError::Lease(e)),
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The end of `run`: the certificate worker finishes its round (within the grace period),
/// then the Lease is released so that a standby takes over at once.
async fn shutdown(
    client: &Client,
    lease: Option<&LeaseConfig>,
    shard: Option<(&LeaseConfig, &str)>,
    cert_task: Option<tokio::task::JoinHandle<()>>,
    leader_task: Option<tokio::task::JoinHandle<()>>,
    grace: Duration,
) {
    if let Some(mut task) = cert_task
        && tokio::time::timeout(grace, &mut task).await.is_err()
    {
        tracing::warn!(
            "the certificate step did not finish within the grace period; its orders resume on the next start"
        );
        task.abort();
    }
    if let Some(task) = leader_task {
        task.abort();
    }
    if let Some(cfg) = lease {
        match tokio::time::timeout(Duration::from_secs(5), leader::release(client, cfg)).await {
            Ok(Ok(true)) => tracing::info!(lease = %cfg.name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the lease; a standby takes over when it expires")
            }
            Err(_) => tracing::warn!(
                "releasing the lease timed out; a standby takes over when it expires"
            ),
        }
    }
    if let Some((cfg, instance)) = shard {
        match tokio::time::timeout(
            Duration::from_secs(5),
            super::shard::release(client, cfg, instance),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!("left the shard: the others take its environments now"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "deleting the member Lease; the others take over when it lapses")
            }
            Err(_) => tracing::warn!(
                "deleting the member Lease timed out; the others take over when it lapses"
            ),
        }
    }
    tracing::info!("stopped");
}

/// The first wait before setting up the ACME account again after a failure; it doubles up to
/// `ACCOUNT_RETRY_LAST`.
const ACCOUNT_RETRY_FIRST: Duration = Duration::from_secs(5);
const ACCOUNT_RETRY_LAST: Duration = Duration::from_secs(300);

/// Keeps certificates up to date: runs the certificate step when the environments change,
/// when a waiting order or a renewal falls due, and on every resync; only while leading.
#[allow(clippy::too_many_arguments)]
async fn cert_worker(
    client: Client,
    config: AcmeConfig,
    settings: CertSettings,
    challenges: Arc<Challenges>,
    metrics: Arc<Metrics>,
    mut targets: watch::Receiver<Vec<Target>>,
    lead: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    resync: Duration,
    membership: Option<SharedMembership>,
    fence: WriteFence,
) {
    let events = Events::new(client.clone(), &settings.instance);
    let mut certs: Option<Certs> = None;
    // Setting up the account is retried with backoff: each try may register an account, and
    // Let's Encrypt allows 10 registrations per IP in 3 hours.
    let mut account_retry = ACCOUNT_RETRY_FIRST;
    let mut next = tokio::time::Instant::now() + resync;
    loop {
        tokio::select! {
            changed = targets.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        next = tokio::time::Instant::now() + resync;
        if !*lead.borrow() || !fence.is_open() {
            continue;
        }
        let want = targets.borrow_and_update().clone();
        if want.is_empty() {
            continue;
        }
        if certs.is_none() {
            match Certs::connect(
                &client,
                config.clone(),
                settings.clone(),
                challenges.clone(),
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
        c.set_shard(membership.as_ref().map(|m| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .writable(tokio::time::Instant::now())
        }));
        let round = std::panic::AssertUnwindSafe(c.reconcile(&want, Some(&events), Some(&metrics)))
            .catch_unwind();
        // A round stops when the lease is no longer current (its cluster writes, the ledger's
        // charges among them, are refused already); the next leader resumes its orders.
        let round = tokio::select! {
            round = round => round,
            _ = fence.wait_closed() => {
                tracing::warn!("the lease is no longer current: the certificate round is cancelled");
                continue;
            }
        };
        let Ok(round) = round else {
            tracing::error!(
                "the certificate step panicked (a bug; please report it); retrying in 30 s"
            );
            next = tokio::time::Instant::now() + Duration::from_secs(30);
            continue;
        };
        match round {
            Ok(report) => {
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
                if let Some(at) = report.next_wake {
                    let wait = at.saturating_sub(crate::certs::unix_now()).max(1);
                    next = next.min(tokio::time::Instant::now() + Duration::from_secs(wait));
                }
                if t.failed > 0 || t.no_namespace > 0 {
                    next = next.min(tokio::time::Instant::now() + Duration::from_secs(30));
                }
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "the certificate step failed; retrying in 30 s");
                next = tokio::time::Instant::now() + Duration::from_secs(30);
            }
        }
    }
}
