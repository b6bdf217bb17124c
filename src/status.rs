//! Status: what envctl tells people about each environment — namespace annotations
//! (revision, state, last error, certificate notes) and Kubernetes Events — and the table of
//! `envctl status`. Writes only status annotations and Events; objects are `apply`'s, and the
//! metrics it updates are defined in `metrics`.

use std::collections::BTreeMap;

use futures::StreamExt;

use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::cluster::FIELD_MANAGER;
pub use crate::metrics::{
    ApiLabels, ApiVerb, CertMetrics, EnvState, ExpiryLabels, ExpiryRange, FailureLabels,
    KindLabels, LimitLabels, Metrics, OrderLabels, OrderOutcome, PollLabels, PollResult,
    RevisionLabels, StateLabels, Trigger, TriggerLabels,
};
pub use crate::vocab::{
    APPLIED_AT_ANNOTATION, ERROR_ANNOTATION, REVISION_ANNOTATION, STATE_ANNOTATION,
    STATUS_ANNOTATIONS,
};
use crate::vocab::{
    CERTIFICATE_ANNOTATION, ENVIRONMENT_LABEL, WAIT_REASON_ANNOTATION, WAIT_UNTIL_ANNOTATION,
    owned_selector,
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
                environment: labels.get(ENVIRONMENT_LABEL).cloned().unwrap_or_default(),
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
    if let Some(note) = annotations.get(CERTIFICATE_ANNOTATION) {
        return note.clone();
    }
    match (
        annotations.get(WAIT_UNTIL_ANNOTATION),
        annotations.get(WAIT_REASON_ANNOTATION),
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
