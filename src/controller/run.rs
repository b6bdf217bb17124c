//! `envctl run`: the GitOps loop. Each tick asks the source whether it moved (ls-remote, no
//! fetch), fetches only then, and reconciles with the same pass as `envctl apply`
//! (`reconcile::Loop`). Watches on the owned objects bring drift back within seconds; a
//! webhook or a full resync can wake it early. With leader election only the leader writes.
//!
//! Owns the start (the listener, the Lease tasks, the watch cache, the health tracker, the
//! certificate worker), what wakes a pass, and the stop; every decision about objects is the
//! pass's.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use kube::Client;
use tokio::sync::{Notify, watch};

use super::cert_worker::CertWorker;
use super::http::{self, Shared};
use super::leader::{self, LeaseConfig};
use super::lease_thread::on_lease_thread;
pub use super::options::{Clients, LeaseConnect, RunOptions, RunSource};
use super::poll::{DirectoryWatch, PollSource, Revision, WatchError, watch_directory};
use super::reconcile::{Backoff, Cluster, History, Loop, Published, Rollouts, Shard};
use super::relay::Relay;
use super::shard::SharedMembership;
use crate::certs::CertMode;
use crate::certs::challenges::Challenges;
use crate::cluster::{FailureReason, WriteFence};
use crate::observe::OBSERVED_KINDS;
use crate::status::{ApiVerb, Events, FailureLabels, Metrics, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("leading")]
    Lease(#[source] leader::LeaseError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("starting the watch cache")]
    Cache(#[source] crate::observe::ObserveError),
    #[error("serving HTTP on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Longest the first list of every owned kind may take before `run` gives up.
const CACHE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the controller until interrupted.
pub async fn run(clients: Clients, mut opts: RunOptions) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let stop = on_signal();
    let wake = Wake::default();
    let leases = Leases::start(&clients, &opts, &wake);
    let challenges = matches!(opts.certs, CertMode::Acme(_)).then(|| {
        Arc::new(Challenges::new(
            &clients.writer,
            &opts.cert_settings.namespace,
            &opts.cert_settings.instance,
        ))
    });
    let shared = serve(&clients, &opts, &metrics, &leases, &challenges, &wake).await?;
    let cache = crate::observe::Cache::start(
        &clients.writer,
        &opts.pass.render.instance,
        wake.drift.clone(),
        metrics.watch_errors.clone(),
    );
    cache
        .ready(CACHE_READY_TIMEOUT)
        .await
        .map_err(RunError::Cache)?;
    metrics.count_api(ApiVerb::List, OBSERVED_KINDS.len() as u64);
    let source = PollSource::new(std::mem::replace(
        &mut opts.source,
        RunSource::Directory(Default::default()),
    ));
    let _file_watch: Option<DirectoryWatch> =
        watch_directory(&source, opts.watch, wake.file_changes.clone())?;
    let (cert_targets, targets) = watch::channel(Vec::new());
    let cert_task = match (opts.certs.clone(), challenges) {
        (CertMode::Acme(config), Some(challenges)) => Some(tokio::spawn(
            CertWorker {
                client: clients.writer.clone(),
                config,
                settings: opts.cert_settings.clone(),
                challenges,
                metrics: metrics.clone(),
                targets,
                lead: leases.lead.clone(),
                stop: stop.clone(),
                resync: opts.resync,
                membership: leases.membership.clone(),
                fence: clients.fence.clone(),
            }
            .run(),
        )),
        _ => None,
    };
    let health = super::health::start(
        &clients.writer,
        &opts.pass.render.instance,
        opts.health,
        metrics.clone(),
        leases.lead.clone(),
        leases.membership.clone(),
        wake.health.clone(),
    );
    let mut state = Loop {
        cluster: Cluster {
            client: clients.writer.clone(),
            cache,
            events: Events::new(clients.writer.clone(), &opts.pass.render.instance),
            instance: opts.pass.render.instance.clone(),
            namespace: opts.cert_settings.namespace.clone(),
        },
        metrics: metrics.clone(),
        pass: opts.pass.clone(),
        certs_unconfigured: matches!(opts.certs, CertMode::Unconfigured),
        history: History::new(source.git(), opts.load.clone(), opts.max_file_size),
        rollouts: Rollouts::new(health),
        backoff: Backoff::new(),
        shard: leases.membership.clone().map(|membership| Shard {
            membership,
            generation: leases.generation.clone(),
        }),
        in_sync: Arc::default(),
        published: Published::new(cert_targets),
    };
    let mut driver = Driver {
        source,
        current: None,
        last_full_pass: Instant::now(),
        cancelled_pass: false,
        stop,
        fence: clients.fence.clone(),
        lead: leases.lead.clone(),
        fatal: leases.fatal.subscribe(),
        wake,
        shared,
        opts: &opts,
    };
    driver.drive(&mut state).await;
    leases
        .stop(&clients, &opts, cert_task, opts.shutdown_grace)
        .await
}

/// What wakes the loop besides its interval.
#[derive(Default)]
struct Wake {
    /// A webhook call (or one relayed from another replica).
    poke: Arc<Notify>,
    /// A watch event on an owned object.
    drift: Arc<Notify>,
    /// `--watch`: a file changed under the directory source.
    file_changes: Arc<Notify>,
    /// Some environment's health changed (a rollout wave may wait on it).
    health: Arc<Notify>,
    /// The shard's member set changed.
    shard: Arc<Notify>,
}

/// Turns true on SIGTERM (rollouts, drains) or SIGINT: no new pass is started, the one in
/// flight may finish within the grace period, the Lease is released, and `run` returns.
fn on_signal() -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("asked to stop: no new pass is started");
        let _ = stop_tx.send(true);
    });
    stop_rx
}

/// Starts the HTTP listener (health, metrics, webhook, HTTP-01), and with a Lease and a
/// webhook secret, the relay of webhook calls between replicas.
async fn serve(
    clients: &Clients,
    opts: &RunOptions,
    metrics: &Arc<Metrics>,
    leases: &Leases,
    challenges: &Option<Arc<Challenges>>,
    wake: &Wake,
) -> Result<Arc<Shared>, RunError> {
    let relay = opts.leader.as_ref().or(opts.shard.as_ref()).map(|cfg| {
        Relay::new(
            &clients.leases,
            &cfg.namespace,
            &opts.pass.render.instance,
            &cfg.identity,
        )
    });
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        ready: Default::default(),
        webhook_secret: opts.webhook_secret.clone(),
        poke: wake.poke.clone(),
        challenges: challenges.clone(),
        leading: leases.lead.clone(),
        relay: relay.clone(),
        sharded: opts.shard.is_some(),
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
    if let (Some(relay), true) = (relay, opts.webhook_secret.is_some()) {
        tokio::spawn(relay.watch(wake.poke.clone()));
    }
    Ok(shared)
}

/// The Lease tasks (leader election, shard membership) on their own thread, and what the
/// loop learns from them.
struct Leases {
    /// Whether this replica leads (always, without leader election).
    lead: watch::Receiver<bool>,
    /// With `--shard`: the member sets seen, and a count of their changes.
    membership: Option<SharedMembership>,
    generation: watch::Receiver<u64>,
    /// Set when a Lease task ended for good (another live process has this identity).
    fatal: Arc<watch::Sender<Option<String>>>,
    error: Arc<Mutex<Option<leader::LeaseError>>>,
    /// Stops the Lease thread (before the Lease is released on shutdown).
    thread_stop: watch::Sender<bool>,
    leader_task: Option<tokio::task::JoinHandle<()>>,
    shard_task: Option<tokio::task::JoinHandle<()>>,
}

impl Leases {
    fn start(clients: &Clients, opts: &RunOptions, wake: &Wake) -> Leases {
        let (thread_stop, stopping) = watch::channel(false);
        let (lead_tx, lead) = watch::channel(opts.leader.is_none());
        let (fatal, _) = watch::channel::<Option<String>>(None);
        let fatal = Arc::new(fatal);
        let error: Arc<Mutex<Option<leader::LeaseError>>> = Arc::default();
        // A Lease task ends only for good: the loop stops, and `run` returns the reason.
        let ended = |done: tokio::sync::oneshot::Receiver<leader::LeaseError>| {
            let (fatal, slot) = (fatal.clone(), error.clone());
            tokio::spawn(async move {
                if let Ok(e) = done.await {
                    tracing::error!(error = %e, "stopping");
                    let _ = fatal.send(Some(e.to_string()));
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            })
        };
        let connect = &clients.lease_connect;
        let leader_task = opts.leader.clone().map(|cfg| {
            let fence = clients.fence.clone();
            ended(on_lease_thread(
                connect.clone(),
                stopping.clone(),
                move |c| leader::run(c, cfg, lead_tx, fence),
            ))
        });
        let membership: Option<SharedMembership> = opts.shard.as_ref().map(|cfg| {
            Arc::new(Mutex::new(crate::shard::Membership::new(
                &cfg.identity,
                cfg.duration,
            )))
        });
        let (generation_tx, generation) = watch::channel(0u64);
        let shard_task = opts.shard.clone().zip(membership.clone()).map(|(cfg, m)| {
            let (instance, fence) = (opts.pass.render.instance.clone(), clients.fence.clone());
            let changed = wake.shard.clone();
            ended(on_lease_thread(
                connect.clone(),
                stopping.clone(),
                move |c| super::shard::run(c, cfg, instance, m, changed, generation_tx, fence),
            ))
        });
        Leases {
            lead,
            membership,
            generation,
            fatal,
            error,
            thread_stop,
            leader_task,
            shard_task,
        }
    }

    /// The end of `run`: the Lease tasks stop and the fence closes (nothing more is
    /// written); the certificate worker finishes its round within the grace period; then the
    /// Leases are released so that a standby or the other members take over at once.
    async fn stop(
        self,
        clients: &Clients,
        opts: &RunOptions,
        cert_task: Option<tokio::task::JoinHandle<()>>,
        grace: Duration,
    ) -> Result<(), RunError> {
        if let Some(task) = &self.shard_task {
            task.abort();
        }
        let _ = self.thread_stop.send(true);
        clients.fence.close();
        if let Some(mut task) = cert_task
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            tracing::warn!(
                "the certificate step did not finish within the grace period; its orders resume on the next start"
            );
            task.abort();
        }
        if let Some(task) = self.leader_task {
            task.abort();
        }
        if let Some(cfg) = &opts.leader {
            release_lease(&clients.leases, cfg).await;
        }
        if let Some(cfg) = &opts.shard {
            leave_shard(&clients.leases, cfg, &opts.pass.render.instance).await;
        }
        tracing::info!("stopped");
        let fatal = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match fatal {
            Some(e) => Err(RunError::Lease(e)),
            None => Ok(()),
        }
    }
}

/// Releases the leader Lease (bounded): a standby takes over at once.
async fn release_lease(client: &Client, cfg: &LeaseConfig) {
    match tokio::time::timeout(Duration::from_secs(5), leader::release(client, cfg)).await {
        Ok(Ok(true)) => tracing::info!(lease = %cfg.name, "released the lease"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "releasing the lease; a standby takes over when it expires")
        }
        Err(_) => {
            tracing::warn!("releasing the lease timed out; a standby takes over when it expires")
        }
    }
}

/// Deletes this replica's member Lease (bounded): the others take its environments at once.
async fn leave_shard(client: &Client, cfg: &LeaseConfig, instance: &str) {
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

/// What decides when a pass runs: the source and its last revision, the triggers, the
/// Lease, the stop.
struct Driver<'a> {
    source: PollSource,
    current: Option<Revision>,
    /// When the last pass that planned every environment in full (the first, or a resync)
    /// ended: the next resync is due `resync` after it, however busy the loop is.
    last_full_pass: Instant,
    /// The last pass was cancelled when the fence closed.
    cancelled_pass: bool,
    stop: watch::Receiver<bool>,
    fence: WriteFence,
    lead: watch::Receiver<bool>,
    fatal: watch::Receiver<Option<String>>,
    wake: Wake,
    shared: Arc<Shared>,
    opts: &'a RunOptions,
}

/// What the driver does after a wake-up.
enum Step {
    /// Run a pass for this reason.
    Pass(Trigger, bool),
    /// Nothing to do now.
    Wait,
    /// Leave the loop.
    Stop,
}

impl Driver<'_> {
    /// Passes until stopped, or until a Lease task ends for good.
    async fn drive(&mut self, state: &mut Loop) {
        let mut trigger = Trigger::Poll;
        let mut first = true;
        loop {
            if *self.stop.borrow() {
                return;
            }
            if !first {
                match self.woken(state).await {
                    Some(t) => trigger = t,
                    None => return,
                }
            }
            first = false;
            match self.decide(trigger).await {
                Step::Stop => return,
                Step::Wait => continue,
                Step::Pass(why, moved) => {
                    if !self.pass(state, why, moved).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits for what wakes the loop next: its reason, or `None` to stop.
    async fn woken(&mut self, state: &Loop) -> Option<Trigger> {
        // A standby that becomes the leader reconciles at once, not an interval later.
        let standing_by = !*self.lead.borrow();
        let mut became_leader = self.lead.clone();
        let retry_at = state.backoff.next_retry();
        let settles_at = state.shard.as_ref().and_then(|s| {
            s.membership
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .settles_at(tokio::time::Instant::now())
        });
        let at = |t: Option<tokio::time::Instant>| t.unwrap_or_else(tokio::time::Instant::now);
        let wake = &self.wake;
        let trigger = tokio::select! {
            _ = wake.shard.notified() => Trigger::Shard,
            _ = tokio::time::sleep_until(at(settles_at)), if settles_at.is_some() => Trigger::Shard,
            _ = tokio::time::sleep_until(at(retry_at)), if retry_at.is_some() => Trigger::Retry,
            _ = self.stop.changed() => return None,
            _ = self.fatal.changed() => return None,
            _ = became_leader.wait_for(|l| *l), if standing_by => Trigger::Poll,
            _ = tokio::time::sleep(self.opts.interval) => Trigger::Poll,
            _ = wake.poke.notified() => Trigger::Webhook,
            _ = wake.file_changes.notified() => Trigger::Watch,
            _ = wake.health.notified(), if state.rollouts.waiting() => Trigger::Health,
            _ = wake.drift.notified() => {
                // Let a burst of watch events settle into one pass.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Trigger::Drift
            }
        };
        Some(trigger)
    }

    /// Polls the source and decides whether a pass runs, and why.
    async fn decide(&mut self, trigger: Trigger) -> Step {
        if self.fatal.borrow().is_some() {
            return Step::Stop;
        }
        if !*self.lead.borrow() || !self.fence.is_open() {
            // A standby is healthy and ready; it only waits.
            self.shared.ready.store(true, Ordering::Relaxed);
            return Step::Wait;
        }
        let moved = self
            .source
            .poll_into(
                &mut self.current,
                self.opts.max_file_size,
                &self.shared.metrics,
            )
            .await;
        if self.current.is_none() {
            return Step::Wait;
        }
        let resync_due = self.last_full_pass.elapsed() >= self.opts.resync;
        let (why, moved) = if self.cancelled_pass && !moved {
            // The last pass was cancelled when the fence closed: done again now that it is
            // open (nothing else would ask for it until the next resync).
            (Trigger::Retry, moved)
        } else if resync_due {
            // Due, whatever woke the loop: a resync plans everything, changed files included
            // (a loop woken every few seconds would otherwise never resync).
            (Trigger::Resync, false)
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
            (trigger, moved)
        } else {
            return Step::Wait; // nothing moved: no fetch was made, nothing is written
        };
        if *self.stop.borrow() || !*self.lead.borrow() || !self.fence.is_open() {
            return Step::Wait; // asked to stop, or the lease was lost while polling
        }
        Step::Pass(why, moved)
    }

    /// Runs one pass; a pass in flight when the stop comes may finish within the grace
    /// period. Returns whether the loop goes on.
    async fn pass(&mut self, state: &mut Loop, why: Trigger, moved: bool) -> bool {
        let Some(rev) = self.current.clone() else {
            return true;
        };
        let grace = self.opts.shutdown_grace;
        let mut stopping = self.stop.clone();
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
                return false;
            }
            // The lease is lost, or was not renewed in time: its writes are refused already
            // (the fenced client); the pass stops here instead of failing request by request.
            _ = self.fence.wait_closed() => {
                tracing::warn!(revision = %rev.id, "the lease is no longer current: the pass in flight is cancelled and writes nothing more");
                self.cancelled_pass = true;
                return true;
            }
        }
        self.cancelled_pass = false;
        if why == Trigger::Resync {
            self.last_full_pass = Instant::now();
        }
        self.shared.ready.store(true, Ordering::Relaxed);
        true
    }
}
