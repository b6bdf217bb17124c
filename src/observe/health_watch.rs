//! The health watches, for the controller: StatefulSets (their status), pods and
//! namespaces, kept current so that health is read on every change, with no polling per
//! environment. Each keeps a projection of what health reads, not the typed objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::watcher;
use tokio::sync::Notify;

use super::live::ObserveError;
use super::read::{applied_at, environment_of, group_for_health};
use super::watched::{Rules, Watched};
use crate::health::{PodView, StatefulSetView};
use crate::vocab::owned_selector;

/// Watches of what health is judged from (StatefulSets with their status, pods, namespaces).
pub struct HealthWatch {
    stateful_sets: Watched<(String, Arc<StatefulSetView>)>,
    /// None when health reads no pod (`--health-without-pods`).
    pods: Option<Watched<(String, Arc<PodView>)>>,
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

impl HealthWatch {
    /// Starts the watches; `changed` is notified on every event.
    pub fn start(client: &Client, instance: &str, pods: bool, changed: Arc<Notify>) -> HealthWatch {
        let selector = owned_selector(instance);
        HealthWatch {
            stateful_sets: project(
                client,
                &selector,
                changed.clone(),
                "StatefulSet",
                |s: &StatefulSet| Arc::new(StatefulSetView::from(s)),
            ),
            pods: pods.then(|| {
                project(client, &selector, changed.clone(), "Pod", |p: &Pod| {
                    Arc::new(PodView::from(p))
                })
            }),
            namespaces: project(client, &selector, changed, "Namespace", applied_at),
        }
    }

    /// Waits until every watch has listed once, at most `timeout`.
    pub async fn ready(&self, timeout: std::time::Duration) -> Result<(), ObserveError> {
        let all = async {
            self.stateful_sets.wait_ready().await;
            if let Some(pods) = &self.pods {
                pods.wait_ready().await;
            }
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
        let pods: Vec<(String, Arc<PodView>)> = self
            .pods
            .as_ref()
            .map(|p| p.read().values().cloned().collect())
            .unwrap_or_default();
        group_for_health(stateful_sets, pods, namespaces)
    }
}
