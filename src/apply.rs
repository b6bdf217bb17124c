//! Apply: the only writer of desired objects. Executes a `Plan` exactly: server-side apply
//! (field manager `envctl`, forced) for creates and updates in kind order, then deletes in
//! reverse order, guarded by the live object's uid. Environments run concurrently up to a
//! bound; it never re-decides what the plan said. The certificate step's TLS Secrets go
//! through the same server-side apply (`server_side_apply`).

use std::collections::BTreeMap;

use futures::{StreamExt, stream};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions, PropagationPolicy};

use crate::cluster::{FIELD_MANAGER, FailureReason, api, is_unreachable_or_refused, with_retries};
use crate::plan::{Action, Change, Plan};

/// One object that could not be written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub object: String,
    /// The environment the object belongs to.
    pub environment: String,
    pub action: Action,
    pub error: String,
    #[serde(skip)]
    pub unreachable: bool,
    #[serde(skip)]
    pub reason: Option<FailureReason>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub applied: usize,
    pub deleted: usize,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn unreachable(&self) -> bool {
        !self.failures.is_empty() && self.failures.iter().all(|f| f.unreachable)
    }
}

/// An API error as one line: the server's message and code, or the error chain.
pub fn error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => {
            let mut text = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(s) = src {
                text.push_str(": ");
                text.push_str(&s.to_string());
                src = s.source();
            }
            text
        }
    }
}

/// Server-side apply of one object, forced, with field manager `envctl`: how envctl writes
/// every object it wants to exist.
pub async fn server_side_apply<K>(
    api: &Api<K>,
    name: &str,
    object: &(impl serde::Serialize + std::fmt::Debug),
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(object);
    with_retries(|| api.patch(name, &params, &patch))
        .await
        .map(|_| ())
}

async fn execute_one(client: &Client, change: &Change) -> Result<(), kube::Error> {
    let key = &change.key;
    let api = api(client, key.kind, key.namespace.as_deref());
    match change.action {
        Action::Create | Action::Update => {
            let Some(object) = &change.object else {
                return Ok(());
            };
            server_side_apply(&api, &key.name, object).await?;
        }
        Action::Replace => {
            let Some(object) = &change.object else {
                return Ok(());
            };
            delete_guarded(&api, &key.name, change.uid.as_deref(), None).await?;
            server_side_apply(&api, &key.name, object).await?;
        }
        Action::Delete => {
            delete_guarded(
                &api,
                &key.name,
                change.uid.as_deref(),
                Some(PropagationPolicy::Background),
            )
            .await?;
        }
    }
    Ok(())
}

/// Deletes the object the plan saw (its uid, when known, is a precondition); already gone
/// counts as done.
async fn delete_guarded(
    api: &kube::Api<kube::api::DynamicObject>,
    name: &str,
    uid: Option<&str>,
    propagation_policy: Option<PropagationPolicy>,
) -> Result<(), kube::Error> {
    let params = DeleteParams {
        propagation_policy,
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match with_retries(|| api.delete(name, &params)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// One environment's changes: each kind's objects concurrently, kinds in order; a failure
/// stops the later kinds of that environment (a StatefulSet without its Service is worse
/// than neither).
async fn execute_environment(client: &Client, changes: Vec<&Change>) -> Report {
    let mut report = Report::default();
    let mut groups: Vec<Vec<&Change>> = Vec::new();
    for c in changes {
        match groups.last_mut() {
            Some(g) if g[0].key.kind == c.key.kind && g[0].action == c.action => g.push(c),
            _ => groups.push(vec![c]),
        }
    }
    for group in groups {
        let results = futures::future::join_all(group.iter().map(|c| execute_one(client, c))).await;
        let mut failed = false;
        for (c, r) in group.iter().zip(results) {
            match r {
                Ok(()) if c.action == Action::Delete => report.deleted += 1,
                Ok(()) => report.applied += 1,
                Err(e) => {
                    failed = true;
                    report.failures.push(Failure {
                        object: c.key.to_string(),
                        environment: c.environment.clone(),
                        action: c.action,
                        error: error_text(&e),
                        unreachable: is_unreachable_or_refused(&e),
                        reason: Some(FailureReason::of(&e)),
                    });
                }
            }
        }
        if failed {
            break;
        }
    }
    report
}

/// Executes every change of `plan`, `concurrency` environments at a time.
pub async fn execute(
    client: &Client,
    plan: &Plan,
    concurrency: usize,
    progress: Option<&crate::vocab::ProgressHandle>,
) -> Report {
    let mut by_env: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in &plan.changes {
        by_env.entry(c.environment.as_str()).or_default().push(c);
    }
    let reports: Vec<Report> = stream::iter(by_env.into_values())
        .map(|changes| async move {
            let n = changes.len() as u64;
            let report = execute_environment(client, changes).await;
            if let Some(p) = progress {
                p.advance(n);
            }
            report
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut total = Report::default();
    for r in reports {
        total.applied += r.applied;
        total.deleted += r.deleted;
        total.failures.extend(r.failures);
    }
    total.failures.sort_by(|a, b| a.object.cmp(&b.object));
    total
}
