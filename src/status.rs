//! Status: what envctl tells people about each environment — namespace annotations
//! (revision, state, last error), Kubernetes Events, Prometheus metrics — and the table of
//! `envctl status`. Writes only status annotations and Events; objects are `apply`'s.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::StreamExt;

use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cluster::FIELD_MANAGER;
use crate::render::owned_selector;

pub const REVISION_ANNOTATION: &str = "envctl.materialize.cloud/revision";
pub const STATE_ANNOTATION: &str = "envctl.materialize.cloud/state";
pub const ERROR_ANNOTATION: &str = "envctl.materialize.cloud/last-error";
pub const APPLIED_AT_ANNOTATION: &str = "envctl.materialize.cloud/applied-at";
/// Every bookkeeping annotation envctl writes on namespaces (none of them is drift).
pub const STATUS_ANNOTATIONS: [&str; 7] = [
    REVISION_ANNOTATION,
    crate::certs::CERTIFICATE_ANNOTATION,
    STATE_ANNOTATION,
    ERROR_ANNOTATION,
    APPLIED_AT_ANNOTATION,
    crate::certs::WAIT_UNTIL_ANNOTATION,
    crate::certs::WAIT_REASON_ANNOTATION,
];

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
    pub kind: crate::render::ObjectKind,
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
    pub limit: crate::certs::ledger::Limit,
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

/// Every metric envctl exports.
pub struct Metrics {
    pub registry: Registry,
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
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let reconciles = Family::<TriggerLabels, Counter>::default();
        let environments = Family::<StateLabels, Gauge>::default();
        let polls = Family::<PollLabels, Counter>::default();
        let api_requests = Family::<ApiLabels, Counter>::default();
        let applied_revision = Family::<RevisionLabels, Gauge>::default();
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconciles",
            "Reconcile passes by what triggered them",
            reconciles.clone(),
        );
        registry.register(
            "environments",
            "Environments by state after the last pass",
            environments.clone(),
        );
        registry.register("polls", "Source polls by result", polls.clone());
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API by kind of request",
            api_requests.clone(),
        );
        registry.register(
            "applied_revision",
            "The source revision last applied (value 1)",
            applied_revision.clone(),
        );
        let environment_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "environment_failures",
            "Environments that failed in a pass (each alone; the others went on), by reason",
            environment_failures.clone(),
        );
        registry.register(
            "api_retries",
            "Requests to the Kubernetes API sent again after a transient error, by reason",
            crate::cluster::RETRIES.clone(),
        );
        let watch_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Watch streams of owned objects that broke and were re-established, by kind",
            watch_errors.clone(),
        );
        let certs = CertMetrics::default();
        registry.register(
            "certificate_orders",
            "Certificate outcomes by kind: issued, reused (no order), failed, rate limited by the server, deferred by the quota ledger",
            certs.orders.clone(),
        );
        registry.register(
            "certificate_quota_remaining",
            "Smallest remaining count among the quota ledger's buckets of each limit",
            certs.quota_remaining.clone(),
        );
        registry.register(
            "certificates_waiting",
            "Certificates waiting for quota, by the limit they wait for",
            certs.waiting.clone(),
        );
        registry.register(
            "certificate_queue_served_at_seconds",
            "When the last waiting certificate will be ordered (unix seconds, 0 when none waits)",
            certs.queue_served_at.clone(),
        );
        registry.register(
            "certificates_unconfigured",
            "TLS environments applied without a certificate because no ACME directory is configured",
            certs.unconfigured.clone(),
        );
        registry.register(
            "certificates_by_days_to_expiry",
            "Environments' certificates by days to expiry",
            certs.by_expiry.clone(),
        );
        Metrics {
            registry,
            certs,
            reconcile_seconds,
            reconciles,
            environments,
            polls,
            api_requests,
            applied_revision,
            environment_failures,
            watch_errors,
            last_revision: Mutex::new(None),
        }
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

/// One environment's status as written to its namespace.
#[derive(Debug, Clone)]
pub struct EnvStatus {
    pub environment: String,
    pub namespace: String,
    pub revision: String,
    pub state: EnvState,
    pub error: Option<String>,
    /// Why a TLS environment has no certificate (`None` removes the note).
    pub certificate: Option<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("annotating namespace {namespace} with its status")]
    Annotate {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing environments")]
    List(#[source] kube::Error),
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Writes the status annotations of one environment's namespace (a merge patch of
/// annotations only; nothing else of the namespace is touched).
pub async fn annotate(client: &Client, status: &EnvStatus, now: &str) -> Result<(), StatusError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut annotations = serde_json::Map::new();
    annotations.insert(REVISION_ANNOTATION.into(), status.revision.clone().into());
    annotations.insert(STATE_ANNOTATION.into(), status.state.as_str().into());
    annotations.insert(
        ERROR_ANNOTATION.into(),
        status
            .error
            .as_deref()
            .map_or(serde_json::Value::Null, |e| truncate(e, 1024).into()),
    );
    annotations.insert(
        crate::certs::CERTIFICATE_ANNOTATION.into(),
        status
            .certificate
            .map_or(serde_json::Value::Null, serde_json::Value::from),
    );
    if status.state == EnvState::Applied {
        annotations.insert(APPLIED_AT_ANNOTATION.into(), now.into());
    }
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch(&status.namespace, &params, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(StatusError::Annotate {
            namespace: status.namespace.clone(),
            source,
        }),
    }
}

/// Sets the certificate note on these namespaces (those that exist), concurrently.
pub async fn note_certificates(
    client: &Client,
    namespaces: &[&str],
    note: &str,
) -> Result<(), StatusError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"annotations": {
        crate::certs::CERTIFICATE_ANNOTATION: note,
    }}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let results: Vec<Result<(), StatusError>> =
        futures::stream::iter(namespaces.iter().map(|ns| {
            let (api, patch, params) = (&api, &patch, &params);
            async move {
                match api.patch(ns, params, &Patch::Merge(patch)).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(source) => Err(StatusError::Annotate {
                        namespace: ns.to_string(),
                        source,
                    }),
                }
            }
        }))
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Publishes Kubernetes Events about environments (reported as `envctl`).
pub struct Events {
    recorder: Recorder,
}

impl Events {
    pub fn new(client: Client, instance: &str) -> Events {
        let reporter = Reporter {
            controller: "envctl".into(),
            instance: Some(instance.to_string()),
        };
        Events {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// An Event on the environment's namespace; failures to publish are logged, not fatal.
    pub async fn publish(&self, namespace: &str, warning: bool, reason: &str, note: String) {
        // The Event lives in the environment's own namespace, which must match the reference.
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(namespace.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(truncate(&note, 1024)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(namespace, reason, error = %e, "publishing an event failed");
        }
    }
}

/// One row of `envctl status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusRow {
    pub environment: String,
    pub namespace: String,
    pub revision: String,
    pub state: String,
    pub applied_at: String,
    /// The certificate's state: why there is none, or when it waits for quota.
    pub certificate: String,
    pub last_error: String,
}

/// Every environment of `instance` with its recorded status.
pub async fn read_all(client: &Client, instance: &str) -> Result<Vec<StatusRow>, StatusError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default().labels(&owned_selector(instance)))
        .await
        .map_err(StatusError::List)?;
    let mut rows: Vec<StatusRow> = list
        .items
        .into_iter()
        .map(|ns| {
            let labels = ns.metadata.labels.unwrap_or_default();
            let ann = ns.metadata.annotations.unwrap_or_default();
            let get = |k: &str| ann.get(k).cloned().unwrap_or_default();
            let terminating = ns.metadata.deletion_timestamp.is_some();
            StatusRow {
                environment: labels
                    .get(crate::render::ENVIRONMENT_LABEL)
                    .cloned()
                    .unwrap_or_default(),
                namespace: ns.metadata.name.unwrap_or_default(),
                revision: get(REVISION_ANNOTATION),
                state: if terminating {
                    "deleting".to_string()
                } else {
                    get(STATE_ANNOTATION)
                },
                applied_at: get(APPLIED_AT_ANNOTATION),
                certificate: certificate_state(&ann),
                last_error: get(ERROR_ANNOTATION),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.environment.cmp(&b.environment));
    Ok(rows)
}

/// What the namespace's annotations say of its certificate.
fn certificate_state(annotations: &BTreeMap<String, String>) -> String {
    if let Some(note) = annotations.get(crate::certs::CERTIFICATE_ANNOTATION) {
        return note.clone();
    }
    match (
        annotations.get(crate::certs::WAIT_UNTIL_ANNOTATION),
        annotations.get(crate::certs::WAIT_REASON_ANNOTATION),
    ) {
        (Some(until), Some(reason)) => format!("waiting for quota ({reason}) until {until}"),
        (Some(until), None) => format!("waiting for quota until {until}"),
        _ => String::new(),
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[StatusRow]) -> String {
    let header = [
        "ENVIRONMENT",
        "REVISION",
        "STATE",
        "APPLIED",
        "CERTIFICATE",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.environment.clone(),
                r.revision.chars().take(12).collect(),
                if r.state.is_empty() {
                    "-".into()
                } else {
                    r.state.clone()
                },
                if r.applied_at.is_empty() {
                    "-".into()
                } else {
                    r.applied_at.clone()
                },
                if r.certificate.is_empty() {
                    "-".into()
                } else {
                    r.certificate.clone()
                },
                r.last_error.replace('\n', " "),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |vals: [&str; 6]| {
        for (i, v) in vals.iter().enumerate() {
            if i == 5 {
                out.push_str(v);
            } else {
                out.push_str(&format!("{v:<w$}  ", w = widths[i]));
            }
        }
        while out.ends_with(' ') {
            out.pop();
        }
        out.push('\n');
    };
    line(header);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]]);
    }
    out
}
