//! The health watches, for the controller: StatefulSets (their status), pods and
//! namespaces, kept current so that health is read on every change, with no polling per
//! environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::Notify;

use super::live::ObserveError;
use super::read::{applied_at, environment_of, group_for_health};
use super::watched::{Rules, Watched};
use crate::health::StatefulSetView;
use crate::vocab::{ENVIRONMENT_LABEL, owned_selector};

/// Watches of what health is judged from (StatefulSets with their status, pods, namespaces).
pub struct HealthWatch {
    stateful_sets: Watched<(String, Arc<StatefulSetView>)>,
    pods: reflector::Store<Pod>,
    namespaces: Watched<(String, Option<Timestamp>)>,
}

/// Every event wakes the tracker, which judges again.
fn every_event<V>() -> Rules<V> {
    Rules {
        differ: |_, _| true,
        wake_on_new: true,
        wake_on_first_list: true,
    }
}

/// Keeps a small projection `view` of each object with its environment (objects without
/// the environment label are left out).
fn project<K, V>(
    client: &Client,
    selector: &str,
    changed: Arc<Notify>,
    kind: &'static str,
    view: fn(&K) -> V,
) -> Watched<(String, V)>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    V: Send + Sync + 'static,
{
    Watched::start(
        kube::Api::<K>::all(client.clone()),
        watcher::Config::default().labels(selector),
        move |o: K| Some((environment_of(o.meta())?, view(&o))),
        every_event(),
        changed,
        move |e| tracing::warn!(kind, error = %e, "the health watch broke; it resumes with backoff"),
    )
}

/// Keeps a store of pods without what health never reads: managedFields (most of a listed
/// object's size), the spec, and every label but the environment's and every annotation.
fn reflect_pods(
    api: kube::Api<Pod>,
    selector: &str,
    changed: Arc<Notify>,
) -> reflector::Store<Pod> {
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(selector);
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|p: &mut Pod| {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            if let Some(labels) = p.metadata.labels.as_mut() {
                labels.retain(|k, _| k == ENVIRONMENT_LABEL);
            }
            p.spec = None;
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(kind = "Pod", error = %e, "the health watch broke; it resumes with backoff")
                }
            }
        }
    });
    reader
}

impl HealthWatch {
    /// Starts the watches; `changed` is notified on every event.
    pub fn start(client: &Client, instance: &str, changed: Arc<Notify>) -> HealthWatch {
        let selector = owned_selector(instance);
        HealthWatch {
            stateful_sets: project(
                client,
                &selector,
                changed.clone(),
                "StatefulSet",
                |s: &StatefulSet| Arc::new(StatefulSetView::from(s)),
            ),
            pods: reflect_pods(kube::Api::all(client.clone()), &selector, changed.clone()),
            namespaces: project(client, &selector, changed, "Namespace", applied_at),
        }
    }

    /// Waits until every watch has listed once, at most `timeout`.
    pub async fn ready(&self, timeout: std::time::Duration) -> Result<(), ObserveError> {
        let all = async {
            self.stateful_sets.wait_ready().await;
            let _ = self.pods.wait_until_ready().await;
            self.namespaces.wait_ready().await;
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| ObserveError::NotReady {
                timeout,
                kinds: "StatefulSet, Pod, Namespace (health)".into(),
            })
    }

    /// The health inputs as the watches have them now.
    pub fn observed(&self) -> BTreeMap<String, crate::health::Observed> {
        let stateful_sets: Vec<(String, Arc<StatefulSetView>)> =
            self.stateful_sets.read().values().cloned().collect();
        let namespaces: Vec<(String, Option<Timestamp>)> =
            self.namespaces.read().values().cloned().collect();
        group_for_health(stateful_sets, self.pods.state(), namespaces)
    }
}
