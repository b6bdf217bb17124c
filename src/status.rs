//! Status: what envctl tells people about each environment — namespace annotations
//! (revision, state, last error, certificate notes) and Kubernetes Events — and the table of
//! `envctl status`. Writes only status annotations and Events; objects are `apply`'s, and the
//! metrics it updates are defined in `metrics`.

use std::collections::BTreeMap;

use futures::StreamExt;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::cluster::FIELD_MANAGER;
use crate::health::{Health, HealthState};
pub use crate::metrics::{
    ApiLabels, ApiVerb, CertMetrics, EnvState, ExpiryLabels, ExpiryRange, FailureLabels,
    KindLabels, LimitLabels, Metrics, OrderLabels, OrderOutcome, PollLabels, PollResult,
    RevisionLabels, StateLabels, Trigger, TriggerLabels,
};
pub use crate::rollout::RolloutStatus;
pub use crate::vocab::{
    APPLIED_AT_ANNOTATION, ERROR_ANNOTATION, REVISION_ANNOTATION, STATE_ANNOTATION,
    STATUS_ANNOTATIONS,
};
use crate::vocab::{
    CERTIFICATE_ANNOTATION, ENVIRONMENT_LABEL, NOT_AFTER_ANNOTATION, REGION_ANNOTATION, TLS_SECRET,
    WAIT_REASON_ANNOTATION, WAIT_UNTIL_ANNOTATION, owned_selector,
};

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
    #[error("reading or writing the rollout's status in ConfigMap {name}")]
    Rollout {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading what the environments run")]
    Health(#[source] crate::observe::ObserveError),
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
        CERTIFICATE_ANNOTATION.into(),
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
        CERTIFICATE_ANNOTATION: note,
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

/// The ConfigMap (in the controller's namespace) holding the rollout's status.
pub fn rollout_config_map(instance: &str) -> String {
    format!("envctl-{instance}-rollout")
}

const ROLLOUT_KEY: &str = "status.json";

/// Records the rollout's status for `envctl status` (a server-side apply of one ConfigMap).
pub async fn write_rollout(
    client: &Client,
    namespace: &str,
    instance: &str,
    rollout: &RolloutStatus,
) -> Result<(), StatusError> {
    let name = rollout_config_map(instance);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let body = serde_json::to_string(rollout).unwrap_or_default();
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {
            crate::vocab::MANAGED_BY_KEY: crate::vocab::MANAGED_BY_VALUE,
            crate::vocab::INSTANCE_LABEL: instance,
        }},
        "data": {ROLLOUT_KEY: body},
    });
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
    .map_err(|source| StatusError::Rollout {
        name: format!("{namespace}/{name}"),
        source,
    })
}

/// The rollout's status as the controller last recorded it (`None` when it never did).
pub async fn read_rollout(
    client: &Client,
    namespace: &str,
    instance: &str,
) -> Result<Option<RolloutStatus>, StatusError> {
    let name = rollout_config_map(instance);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get_opt(&name)
        .await
        .map_err(|source| StatusError::Rollout {
            name: format!("{namespace}/{name}"),
            source,
        })?;
    Ok(cm
        .and_then(|c| c.data)
        .and_then(|d| d.get(ROLLOUT_KEY).cloned())
        .and_then(|s| serde_json::from_str(&s).ok()))
}

/// One row of `envctl status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusRow {
    pub environment: String,
    pub namespace: String,
    /// The region its namespace records (`spec.region` as last applied).
    pub region: String,
    /// What was last applied: a Git commit, or `dir-<digest>` of a directory's files.
    pub revision: String,
    pub state: String,
    pub applied_at: String,
    /// `Ready`, `Progressing`, `Degraded` or `Unknown`, judged now from the cluster.
    pub health: HealthState,
    /// Why, in one word (`AllReady`, `Unschedulable`, `ImagePull`...).
    pub reason: String,
    /// Why, for people (the scheduler's message, the failing pod and container...).
    pub message: String,
    /// The certificate's state: valid until, waiting for quota until, failed with its
    /// reason, or why there is none.
    pub certificate: String,
    pub last_error: String,
    /// With sharding: the live member that owns the environment (set by `envctl status`
    /// from the member Leases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Every environment of `instance` with its recorded status, its health judged now (a
/// rollout without progress for `deadline` is `Degraded`) and its certificate's state.
pub async fn read_all(
    client: &Client,
    instance: &str,
    deadline: std::time::Duration,
    pods: bool,
) -> Result<Vec<StatusRow>, StatusError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let selector = owned_selector(instance);
    let secrets: Api<Secret> = Api::all(client.clone());
    let (list, inputs, tls) = futures::try_join!(
        async {
            api.list(&ListParams::default().labels(&selector))
                .await
                .map_err(StatusError::List)
        },
        async {
            crate::observe::read_health_inputs(client, instance, pods)
                .await
                .map_err(StatusError::Health)
        },
        async {
            // Metadata only: the certificate's expiry is an annotation; no key is read. Who
            // may not list Secrets sees no expiry, and the rest of the status.
            match secrets
                .list_metadata(
                    &ListParams::default()
                        .labels(&selector)
                        .fields(&format!("metadata.name={TLS_SECRET}")),
                )
                .await
            {
                Ok(list) => Ok(list.items),
                Err(kube::Error::Api(s)) if s.code == 403 => Ok(Vec::new()),
                Err(e) => Err(StatusError::List(e)),
            }
        },
    )?;
    let not_after: BTreeMap<String, String> = tls
        .into_iter()
        .filter_map(|s| {
            let ns = s.metadata.namespace?;
            let at = s.metadata.annotations?.get(NOT_AFTER_ANNOTATION)?.clone();
            Some((ns, at))
        })
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    let health = crate::health::assess_all(&inputs, now, deadline);
    let mut rows: Vec<StatusRow> = list
        .items
        .into_iter()
        .map(|ns| {
            let labels = ns.metadata.labels.unwrap_or_default();
            let ann = ns.metadata.annotations.unwrap_or_default();
            let get = |k: &str| ann.get(k).cloned().unwrap_or_default();
            let terminating = ns.metadata.deletion_timestamp.is_some();
            let environment = labels.get(ENVIRONMENT_LABEL).cloned().unwrap_or_default();
            let namespace = ns.metadata.name.unwrap_or_default();
            let h = health
                .get(&environment)
                .cloned()
                .unwrap_or_else(|| Health::unknown("no StatefulSet observed yet"));
            StatusRow {
                revision: get(REVISION_ANNOTATION),
                state: if terminating {
                    "deleting".to_string()
                } else {
                    get(STATE_ANNOTATION)
                },
                applied_at: get(APPLIED_AT_ANNOTATION),
                health: h.state,
                reason: h.reason,
                message: h.message,
                certificate: certificate_state(&ann, not_after.get(&namespace)),
                last_error: get(ERROR_ANNOTATION),
                owner: None,
                region: get(REGION_ANNOTATION),
                environment,
                namespace,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.environment.cmp(&b.environment));
    Ok(rows)
}

/// What the namespace's annotations and its TLS Secret say of its certificate.
fn certificate_state(annotations: &BTreeMap<String, String>, not_after: Option<&String>) -> String {
    if let Some(note) = annotations.get(CERTIFICATE_ANNOTATION) {
        return note.clone();
    }
    match (
        annotations.get(WAIT_UNTIL_ANNOTATION),
        annotations.get(WAIT_REASON_ANNOTATION),
        not_after,
    ) {
        (Some(until), Some(reason), Some(valid)) => {
            format!("valid until {valid}; renewal waits for quota ({reason}) until {until}")
        }
        (Some(until), Some(reason), None) => format!("waiting for quota ({reason}) until {until}"),
        (Some(until), None, _) => format!("waiting for quota until {until}"),
        (None, _, Some(valid)) => format!("valid until {valid}"),
        _ => String::new(),
    }
}

/// The rows as an aligned text table (the health's message and the last error go last,
/// unpadded). The OWNER column (sharding) shows only when some row has an owner.
pub fn table(rows: &[StatusRow]) -> String {
    let sharded = rows.iter().any(|r| r.owner.is_some());
    // The REGION column shows when the rows span more than one region.
    let regions = rows.iter().any(|r| r.region != rows[0].region);
    let mut header = vec!["ENVIRONMENT"];
    if regions {
        header.push("REGION");
    }
    header.extend([
        "REVISION",
        "STATE",
        "APPLIED",
        "HEALTH",
        "CERTIFICATE",
        "REASON",
    ]);
    if sharded {
        header.push("OWNER");
    }
    header.push("MESSAGE");
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.replace('\n', " ")
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let message = match (r.health, r.last_error.is_empty()) {
                (HealthState::Ready, false) | (HealthState::Unknown, false) => {
                    format!("last error: {}", r.last_error)
                }
                (_, false) => format!("{}; last error: {}", r.message, r.last_error),
                (_, true) => r.message.clone(),
            };
            let mut row = vec![r.environment.clone()];
            if regions {
                row.push(dash(&r.region));
            }
            row.extend([
                dash(&r.revision.chars().take(12).collect::<String>()),
                dash(&r.state),
                dash(&r.applied_at),
                r.health.as_str().to_string(),
                dash(&r.certificate),
                dash(&r.reason),
            ]);
            if sharded {
                row.push(dash(r.owner.as_deref().unwrap_or("")));
            }
            row.push(message.replace('\n', " "));
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let last = header.len() - 1;
    let mut out = String::new();
    let mut line = |vals: &[&str]| {
        for (i, v) in vals.iter().enumerate() {
            if i == last {
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
    line(&header);
    for c in &cells {
        line(&c.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}
