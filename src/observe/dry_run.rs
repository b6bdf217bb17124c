//! Dry-runs and field pruning: what a server-side apply would make of a desired object
//! (`dryRun=All`, which persists nothing), and the parts of a live object envctl's field
//! manager owns (what the cache keeps, and what the plan compares).

use std::collections::BTreeMap;

use futures::{StreamExt, stream};
use kube::Client;
use kube::api::{Patch, PatchParams};
use serde_json::Value;

use crate::cluster::{FIELD_MANAGER, api, with_retries};
use crate::render::DesiredObject;
use crate::vocab::ObjectKey;

/// A dry-run that the server refused or did not answer: it fails its environment alone.
#[derive(Debug)]
pub struct DryRunFailure {
    pub environment: String,
    pub key: ObjectKey,
    pub error: kube::Error,
}

/// The server's answer to a dry-run server-side apply of each object, `concurrency` at a
/// time, each retried on transient errors. An object whose dry-run fails is returned among
/// the failures, and every other object still gets its answer.
pub async fn dry_run(
    client: &Client,
    objects: &[&DesiredObject],
    concurrency: usize,
    progress: Option<&crate::vocab::ProgressHandle>,
) -> (BTreeMap<ObjectKey, Value>, Vec<DryRunFailure>) {
    let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
    let results: Vec<Result<(ObjectKey, Value), DryRunFailure>> =
        stream::iter(objects.iter().map(|d| {
            let params = params.clone();
            async move {
                let key = ObjectKey::of(d);
                let api = api(client, d.kind, d.namespace.as_deref());
                let fail = |error| DryRunFailure {
                    environment: d.environment.clone(),
                    key: key.clone(),
                    error,
                };
                let patch = Patch::Apply(&d.object);
                let result = with_retries(|| api.patch(&d.name, &params, &patch)).await;
                if let Some(p) = progress {
                    p.advance(1);
                }
                let result = result.map_err(fail)?;
                let v =
                    serde_json::to_value(&result).map_err(|e| fail(kube::Error::SerdeError(e)))?;
                Ok((key, v))
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut answers = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((k, v)) => {
                answers.insert(k, v);
            }
            Err(f) => failures.push(f),
        }
    }
    failures.sort_by(|a, b| a.key.cmp(&b.key));
    (answers, failures)
}

/// The union of the fields envctl's field manager owns in an object (fieldsV1 trees).
pub fn envctl_fields(
    managed: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry]>,
) -> Option<serde_json::Value> {
    let mut union: Option<serde_json::Value> = None;
    for entry in managed?
        .iter()
        .filter(|e| e.manager.as_deref() == Some(crate::cluster::FIELD_MANAGER))
    {
        if let Some(f) = &entry.fields_v1 {
            match &mut union {
                None => union = Some(f.0.clone()),
                Some(u) => merge_fields(u, &f.0),
            }
        }
    }
    union
}

fn merge_fields(into: &mut serde_json::Value, from: &serde_json::Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            match a.get_mut(k) {
                Some(existing) => merge_fields(existing, v),
                None => {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// Keeps only the parts of `value` that a fieldsV1 tree names (`f:` fields, `k:` keyed list
/// items, `v:` set values, `i:` indexes); an empty tree (or one holding only `.`) keeps the
/// whole value. The cache holds what envctl owns, not the server's defaults: the plan only
/// ever compares desired fields, and an object it cannot prove unchanged from what is left
/// gets a server-side dry-run, so dropping fields can cost a request but never hide a change.
pub fn prune_to_fields(value: &mut serde_json::Value, fields: &serde_json::Value) {
    use serde_json::Value;
    let Some(tree) = fields.as_object() else {
        return;
    };
    if tree.keys().all(|k| k == ".") {
        return;
    }
    match value {
        Value::Object(m) => m.retain(|k, child| match tree.get(&format!("f:{k}")) {
            Some(sub) => {
                prune_to_fields(child, sub);
                true
            }
            None => false,
        }),
        Value::Array(items) => {
            let mut keep = vec![false; items.len()];
            for (key, sub) in tree {
                if let Some(k) = key.strip_prefix("k:") {
                    let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(k) else {
                        // Unreadable key: keep everything rather than guess.
                        return;
                    };
                    for (i, item) in items.iter_mut().enumerate() {
                        if wanted.iter().all(|(f, v)| item.get(f) == Some(v)) {
                            keep[i] = true;
                            prune_to_fields(item, sub);
                        }
                    }
                } else if let Some(v) = key.strip_prefix("v:") {
                    let Ok(wanted) = serde_json::from_str::<Value>(v) else {
                        return;
                    };
                    for (i, item) in items.iter().enumerate() {
                        if *item == wanted {
                            keep[i] = true;
                        }
                    }
                } else if let Some(n) = key.strip_prefix("i:").and_then(|n| n.parse::<usize>().ok())
                    && n < items.len()
                {
                    keep[n] = true;
                    prune_to_fields(&mut items[n], sub);
                }
            }
            let mut i = 0;
            items.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::prune_to_fields;
    use serde_json::json;

    #[test]
    fn pruning_keeps_what_envctl_owns_and_drops_server_defaults() {
        let mut live = json!({
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 10,
                "podManagementPolicy": "OrderedReady",
                "template": {"spec": {
                    "dnsPolicy": "ClusterFirst",
                    "containers": [
                        {"name": "clusterd", "image": "c:1", "imagePullPolicy": "IfNotPresent",
                         "ports": [{"containerPort": 2100, "protocol": "TCP", "name": "compute"}]},
                        {"name": "sidecar", "image": "s:1"}
                    ]
                }}
            }
        });
        let fields = json!({
            "f:spec": {
                "f:replicas": {},
                "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"clusterd\"}": {
                        ".": {}, "f:name": {}, "f:image": {},
                        "f:ports": {"k:{\"containerPort\":2100,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:protocol": {}, "f:name": {}}}
                    }
                }}}
            }
        });
        prune_to_fields(&mut live, &fields);
        assert_eq!(
            live,
            json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "clusterd", "image": "c:1",
                 "ports": [{"containerPort": 2100, "protocol": "TCP", "name": "compute"}]}
            ]}}}})
        );
        // A field another manager took over (kubectl scale) is gone, so the plan cannot
        // call the object unchanged from the cache and asks the server.
        let mut scaled = json!({"spec": {"replicas": 7}});
        prune_to_fields(&mut scaled, &json!({"f:spec": {"f:template": {}}}));
        assert_eq!(scaled, json!({"spec": {}}));
    }
}
