//! One-shot reads: the owned objects by LIST (for `diff` and `apply`), the labels of
//! namespaces about to be created (ownership), and what health is judged from (for
//! `apply --wait`), grouped by environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::ListParams;
use serde_json::Value;

use super::live::{Live, OBSERVED_KINDS, ObserveError};
use crate::cluster::{api, with_retries};
use crate::health::{PodView, StatefulSetView};
use crate::vocab::{ENVIRONMENT_LABEL, ObjectKind, owned_selector};

async fn list_kind(
    client: &Client,
    kind: ObjectKind,
    selector: &str,
) -> Result<Vec<Value>, ObserveError> {
    let api = api(client, kind, None);
    let mut params = ListParams::default().labels(selector).limit(500);
    let mut out = Vec::new();
    loop {
        let page =
            with_retries(|| api.list(&params))
                .await
                .map_err(|source| ObserveError::List {
                    kind: kind.as_str(),
                    source,
                })?;
        for item in page.items {
            let v = serde_json::to_value(&item).map_err(|source| ObserveError::Encode {
                kind: kind.as_str(),
                source,
            })?;
            out.push(v);
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(out)
}

/// Every object envctl's `instance` owns.
pub async fn list_owned(client: &Client, instance: &str) -> Result<Live, ObserveError> {
    let selector = owned_selector(instance);
    let lists = futures::future::try_join_all(
        OBSERVED_KINDS
            .iter()
            .map(|k| list_kind(client, *k, &selector)),
    )
    .await?;
    let mut live = Live::default();
    for (kind, items) in OBSERVED_KINDS.iter().zip(lists) {
        for item in items {
            live.insert(*kind, item);
        }
    }
    Ok(live)
}

/// What was learned of the namespaces about to be created: the labels of those that exist
/// (ownership is judged from them), and the ones that could not be read, with the error.
#[derive(Debug, Default)]
pub struct NamespaceLookup {
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    pub failed: BTreeMap<String, kube::Error>,
}

/// Reads each of `names` that exists as a namespace. A few are read one by one (a failure is
/// that name's alone); many at once are read with one metadata LIST.
pub async fn namespace_labels(
    client: &Client,
    names: &[&str],
    concurrency: usize,
) -> Result<NamespaceLookup, ObserveError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let mut lookup = NamespaceLookup::default();
    if names.len() > 32 {
        let wanted: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        let lp = kube::api::ListParams::default();
        let list = with_retries(|| api.list_metadata(&lp))
            .await
            .map_err(|source| ObserveError::List {
                kind: "Namespace",
                source,
            })?;
        lookup.labels = list
            .items
            .into_iter()
            .filter_map(|m| {
                let name = m.metadata.name?;
                wanted
                    .contains(name.as_str())
                    .then(|| (name, m.metadata.labels.unwrap_or_default()))
            })
            .collect();
        return Ok(lookup);
    }
    type Found = (
        String,
        Result<Option<BTreeMap<String, String>>, kube::Error>,
    );
    let found: Vec<Found> = stream::iter(names.iter().map(|n| {
        let api = api.clone();
        async move {
            let got = with_retries(|| api.get_metadata_opt(n)).await;
            (
                n.to_string(),
                got.map(|m| m.map(|m| m.metadata.labels.unwrap_or_default())),
            )
        }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect()
    .await;
    for (name, result) in found {
        match result {
            Ok(Some(labels)) => {
                lookup.labels.insert(name, labels);
            }
            Ok(None) => {}
            Err(e) => {
                lookup.failed.insert(name, e);
            }
        }
    }
    Ok(lookup)
}

/// Groups StatefulSets, pods and namespaces (each with its
/// environment; a namespace with its `applied-at`) by environment into health inputs. Every
/// environment with a namespace gets an entry (an environment without StatefulSets is
/// `Unknown`).
pub fn group_for_health(
    stateful_sets: impl IntoIterator<Item = (String, Arc<StatefulSetView>)>,
    pods: impl IntoIterator<Item = (String, Arc<PodView>)>,
    namespaces: impl IntoIterator<Item = (String, Option<Timestamp>)>,
) -> BTreeMap<String, crate::health::Observed> {
    let mut out: BTreeMap<String, crate::health::Observed> = BTreeMap::new();
    for (env, applied_at) in namespaces {
        out.entry(env).or_default().applied_at = applied_at;
    }
    for (env, sts) in stateful_sets {
        out.entry(env).or_default().stateful_sets.push(sts);
    }
    for (env, pod) in pods {
        out.entry(env).or_default().pods.push(pod);
    }
    out
}

pub fn environment_of(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.labels.as_ref()?.get(ENVIRONMENT_LABEL).cloned()
}

/// A namespace's `applied-at` annotation (when envctl last applied a change to it).
pub fn applied_at(ns: &Namespace) -> Option<Timestamp> {
    ns.metadata
        .annotations
        .as_ref()?
        .get(crate::vocab::APPLIED_AT_ANNOTATION)?
        .parse()
        .ok()
}

async fn list_typed<K>(
    client: &Client,
    selector: &str,
    kind: &'static str,
) -> Result<Vec<K>, ObserveError>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: kube::Api<K> = kube::Api::all(client.clone());
    list_pages(&api, selector, kind).await
}

async fn list_pages<K>(
    api: &kube::Api<K>,
    selector: &str,
    kind: &'static str,
) -> Result<Vec<K>, ObserveError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().labels(selector).limit(500);
    let mut out = Vec::new();
    loop {
        let page = with_retries(|| api.list(&params))
            .await
            .map_err(|source| ObserveError::List { kind, source })?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(out)
}

/// Reads what health is judged from, once: the instance's StatefulSets, pods and namespaces.
/// With `pods` false, no pod is read (health is judged from StatefulSets alone).
pub async fn read_health_inputs(
    client: &Client,
    instance: &str,
    pods: bool,
) -> Result<BTreeMap<String, crate::health::Observed>, ObserveError> {
    let selector = owned_selector(instance);
    let sts_api: kube::Api<StatefulSet> = kube::Api::all(client.clone());
    let pod_api: kube::Api<Pod> = kube::Api::all(client.clone());
    let (stateful_sets, pods, namespaces) = futures::try_join!(
        list_pages(&sts_api, &selector, "StatefulSet"),
        async {
            if pods {
                list_pages(&pod_api, &selector, "Pod").await
            } else {
                Ok(Vec::new())
            }
        },
        list_typed::<Namespace>(client, &selector, "Namespace"),
    )?;
    Ok(group_for_health(
        stateful_sets.iter().filter_map(|s| {
            Some((
                environment_of(&s.metadata)?,
                Arc::new(StatefulSetView::from(s)),
            ))
        }),
        pods.iter()
            .filter_map(|p| Some((environment_of(&p.metadata)?, Arc::new(PodView::from(p))))),
        namespaces
            .iter()
            .filter_map(|n| Some((environment_of(&n.metadata)?, applied_at(n)))),
    ))
}
