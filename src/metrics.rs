//! Metrics: every Prometheus metric envctl exports, with label sets built from closed enums
//! only (no free-form label values but the applied revision). Defines and registers; the
//! stages update them. No I/O: `/metrics` is served by `controller::http`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::health::HealthState;
use crate::vocab::{Limit, ObjectKind};

/// The state of one environment after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelValue)]
pub enum EnvState {
    /// Everything applied at the revision.
    Applied,
    /// Some object could not be written.
    Failed,
    /// The manifest is invalid; the last applied state is kept.
    Invalid,
}

impl EnvState {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Applied => "applied",
            EnvState::Failed => "failed",
            EnvState::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    pub state: EnvState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum PollResult {
    /// The remote's ref did not move: no fetch.
    Unchanged,
    /// A new commit was fetched.
    Fetched,
    /// The remote could not be asked or fetched.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PollLabels {
    pub result: PollResult,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ApiVerb {
    List,
    DryRun,
    Apply,
    Delete,
    StatusPatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ApiLabels {
    pub verb: ApiVerb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Trigger {
    Poll,
    Webhook,
    Drift,
    Resync,
    Watch,
    /// A failing environment's backoff ran out.
    Retry,
    /// An environment's health changed while a rollout waits on it.
    Health,
    /// The shard's member set changed, or a change has held long enough to write.
    Shard,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: crate::cluster::FailureReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: ObjectKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RevisionLabels {
    pub revision: String,
}

/// What became of an environment's certificate in a pass (for `certificate_orders`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum OrderOutcome {
    Issued,
    Reused,
    Failed,
    RateLimited,
    Deferred,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OrderLabels {
    pub outcome: OrderOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: Limit,
}

/// Days until a certificate expires, in closed ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ExpiryRange {
    Expired,
    Under7,
    Under30,
    Under60,
    Over60,
}

impl ExpiryRange {
    pub const ALL: [ExpiryRange; 5] = [
        ExpiryRange::Expired,
        ExpiryRange::Under7,
        ExpiryRange::Under30,
        ExpiryRange::Under60,
        ExpiryRange::Over60,
    ];

    pub fn of(seconds_left: i64) -> ExpiryRange {
        match seconds_left / 86_400 {
            _ if seconds_left <= 0 => ExpiryRange::Expired,
            d if d < 7 => ExpiryRange::Under7,
            d if d < 30 => ExpiryRange::Under30,
            d if d < 60 => ExpiryRange::Under60,
            _ => ExpiryRange::Over60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ExpiryLabels {
    pub days: ExpiryRange,
}

/// Certificate metrics (registered into `Metrics`).
#[derive(Default)]
pub struct CertMetrics {
    pub orders: Family<OrderLabels, Counter>,
    /// The smallest remaining count among the buckets of each limit.
    pub quota_remaining: Family<LimitLabels, Gauge>,
    pub waiting: Family<LimitLabels, Gauge>,
    /// When the last waiting certificate will be ordered (unix seconds; 0 when none waits).
    pub queue_served_at: Gauge,
    pub by_expiry: Family<ExpiryLabels, Gauge>,
    /// TLS environments without a certificate because no ACME directory is configured.
    pub unconfigured: Gauge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HealthLabels {
    /// The environment's name (from the source: bounded by the fleet, like `revision`).
    pub environment: String,
    pub health: HealthState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum RolloutPhase {
    /// At the rollout's revision and Ready.
    Done,
    /// Given the rollout's revision, not Ready yet.
    InFlight,
    /// Still on its previous revision, waiting for its wave.
    Waiting,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RolloutLabels {
    pub phase: RolloutPhase,
}

/// Every metric envctl exports.
pub struct Metrics {
    pub registry: Registry,
    /// Every metric registered, as `/metrics` names it (the README's table is checked
    /// against this list and a real scrape).
    pub described: Vec<Description>,
    pub reconcile_seconds: Histogram,
    pub reconciles: Family<TriggerLabels, Counter>,
    pub environments: Family<StateLabels, Gauge>,
    pub polls: Family<PollLabels, Counter>,
    pub api_requests: Family<ApiLabels, Counter>,
    pub applied_revision: Family<RevisionLabels, Gauge>,
    /// Environments that failed in a pass, by reason.
    pub environment_failures: Family<FailureLabels, Counter>,
    /// Watch streams that broke and were re-established, by kind.
    pub watch_errors: Family<KindLabels, Counter>,
    pub certs: CertMetrics,
    /// 1 for each environment's current health (the other states are absent).
    pub environment_health: Family<HealthLabels, Gauge>,
    /// The rollout in progress: environments by phase, the current wave (1-based, 0 when
    /// no rollout runs) and whether it is halted (1) by a Degraded environment.
    pub rollout_environments: Family<RolloutLabels, Gauge>,
    pub rollout_wave: Gauge,
    pub rollout_halted: Gauge,
    /// With `--shard`: the environments this replica owns, and the live members it sees.
    pub shard_environments: Gauge,
    pub shard_members: Gauge,
    last_revision: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("envctl");
        let mut described = Vec::new();
        let mut metrics = Metrics {
            registry: Registry::default(),
            described: Vec::new(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            reconciles: Family::default(),
            environments: Family::default(),
            polls: Family::default(),
            api_requests: Family::default(),
            applied_revision: Family::default(),
            environment_failures: Family::default(),
            watch_errors: Family::default(),
            certs: CertMetrics::default(),
            environment_health: Family::default(),
            rollout_environments: Family::default(),
            rollout_wave: Gauge::default(),
            rollout_halted: Gauge::default(),
            shard_environments: Gauge::default(),
            shard_members: Gauge::default(),
            last_revision: Mutex::new(None),
        };
        let mut r = Described {
            registry: &mut registry,
            described: &mut described,
        };
        metrics.register_passes(&mut r);
        metrics.register_certificates(&mut r);
        metrics.register_fleet(&mut r);
        metrics.registry = registry;
        metrics.described = described;
        metrics
    }

    /// The passes: their triggers, durations, polls, requests, outcomes and watches.
    fn register_passes(&self, r: &mut Described<'_>) {
        r.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            self.reconcile_seconds.clone(),
        );
        r.register(
            "reconciles",
            "Reconcile passes by what triggered them",
            self.reconciles.clone(),
        );
        r.register(
            "environments",
            "Environments by state after the last pass",
            self.environments.clone(),
        );
        r.register("polls", "Source polls by result", self.polls.clone());
        r.register(
            "api_requests",
            "Requests to the Kubernetes API by kind of request",
            self.api_requests.clone(),
        );
        r.register(
            "applied_revision",
            "The source revision last applied (value 1)",
            self.applied_revision.clone(),
        );
        r.register(
            "environment_failures",
            "Environments that failed in a pass (each alone; the others went on), by reason",
            self.environment_failures.clone(),
        );
        r.register(
            "api_retries",
            "Requests to the Kubernetes API sent again after a transient error, by reason",
            crate::cluster::RETRIES.clone(),
        );
        r.register(
            "watch_errors",
            "Watch streams of owned objects that broke and were re-established, by kind",
            self.watch_errors.clone(),
        );
    }

    /// Certificates: outcomes, quota, waits, expiry.
    fn register_certificates(&self, r: &mut Described<'_>) {
        r.register(
            "certificate_orders",
            "Certificate outcomes by kind: issued, reused (no order), failed, rate limited by the server, deferred by the quota ledger",
            self.certs.orders.clone(),
        );
        r.register(
            "certificate_quota_remaining",
            "Smallest remaining count among the quota ledger's buckets of each limit",
            self.certs.quota_remaining.clone(),
        );
        r.register(
            "certificates_waiting",
            "Certificates waiting for quota, by the limit they wait for",
            self.certs.waiting.clone(),
        );
        r.register(
            "certificate_queue_served_at_seconds",
            "When the last waiting certificate will be ordered (unix seconds, 0 when none waits)",
            self.certs.queue_served_at.clone(),
        );
        r.register(
            "certificates_unconfigured",
            "TLS environments applied without a certificate because no ACME directory is configured",
            self.certs.unconfigured.clone(),
        );
        r.register(
            "certificates_by_days_to_expiry",
            "Environments' certificates by days to expiry",
            self.certs.by_expiry.clone(),
        );
    }

    /// The fleet: health, rollouts and shards.
    fn register_fleet(&self, r: &mut Described<'_>) {
        r.register(
            "environment_health",
            "Each environment's health (value 1 on its current state: Ready, Progressing, Degraded or Unknown)",
            self.environment_health.clone(),
        );
        r.register(
            "rollout_environments",
            "Environments of the rollout in progress by phase: done, in flight, waiting for their wave",
            self.rollout_environments.clone(),
        );
        r.register(
            "rollout_wave",
            "The rollout's current wave (1-based; 0 when no rollout is in progress)",
            self.rollout_wave.clone(),
        );
        r.register(
            "rollout_halted",
            "1 while the rollout is halted by a Degraded environment",
            self.rollout_halted.clone(),
        );
        r.register(
            "shard_environments",
            "Environments this replica owns (envctl run --shard; 0 without sharding)",
            self.shard_environments.clone(),
        );
        r.register(
            "shard_members",
            "Live shard members this replica sees, itself included (0 without sharding)",
            self.shard_members.clone(),
        );
    }

    pub fn set_revision(&self, revision: &str) {
        let mut last = self.last_revision.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = last.take() {
            self.applied_revision
                .remove(&RevisionLabels { revision: old });
        }
        self.applied_revision
            .get_or_create(&RevisionLabels {
                revision: revision.to_string(),
            })
            .set(1);
        *last = Some(revision.to_string());
    }

    pub fn set_states(&self, counts: &BTreeMap<EnvState, i64>) {
        for s in [EnvState::Applied, EnvState::Failed, EnvState::Invalid] {
            self.environments
                .get_or_create(&StateLabels { state: s })
                .set(counts.get(&s).copied().unwrap_or(0));
        }
    }

    pub fn count_api(&self, verb: ApiVerb, n: u64) {
        self.api_requests
            .get_or_create(&ApiLabels { verb })
            .inc_by(n);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One exported metric, as a scrape names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The sample name (`envctl_` prefix; `_total` for counters).
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    pub help: String,
}

/// The registry while metrics are registered, noting each one's description.
struct Described<'a> {
    registry: &'a mut Registry,
    described: &'a mut Vec<Description>,
}

impl Described<'_> {
    fn register<M>(&mut self, name: &str, help: &str, metric: M)
    where
        M: prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric,
    {
        let kind = format!("{:?}", M::TYPE).to_lowercase();
        let suffix = if kind == "counter" { "_total" } else { "" };
        self.described.push(Description {
            name: format!("envctl_{name}{suffix}"),
            kind,
            help: help.to_string(),
        });
        self.registry.register(name, help, metric);
    }
}
