//! Webhook relay between replicas. A push notification may reach any replica (the chart's
//! Service selects them all), but only the leader polls. A replica that is not leading records
//! the request as an annotation on the ConfigMap `envctl-<instance>-hooks` in the Lease's
//! namespace; every replica watches that one object, and the leader polls when the annotation
//! changes. The request goes through the cluster, so it needs no address of the leader.
//!
//! Owns that ConfigMap; decides nothing about polls beyond waking the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

use crate::cluster::FIELD_MANAGER;
use crate::render::{INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE};

/// When a replica last relayed a webhook call, and which one: `<rfc3339>/<identity>`.
pub const POLL_REQUESTED_ANNOTATION: &str = "envctl.materialize.cloud/poll-requested";

#[derive(Debug, thiserror::Error)]
#[error("relaying the webhook call through {namespace}/{name}")]
pub struct RelayError {
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

#[derive(Clone)]
pub struct Relay {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    instance: String,
    identity: String,
}

impl Relay {
    pub fn new(client: &Client, namespace: &str, instance: &str, identity: &str) -> Relay {
        Relay {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_string(),
            name: format!("envctl-{instance}-hooks"),
            instance: instance.to_string(),
            identity: identity.to_string(),
        }
    }

    /// Records a webhook call for the leader (creating the ConfigMap on first use).
    pub async fn forward(&self) -> Result<(), RelayError> {
        let value = format!("{}/{}", k8s_openapi::jiff::Timestamp::now(), self.identity);
        let patch = serde_json::json!({"metadata": {"annotations": {
            POLL_REQUESTED_ANNOTATION: value,
        }}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let err = |source| RelayError {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        };
        match self
            .api
            .patch(&self.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(err(e)),
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
                    (INSTANCE_LABEL.to_string(), self.instance.clone()),
                ])),
                annotations: Some(BTreeMap::from([(
                    POLL_REQUESTED_ANNOTATION.to_string(),
                    value,
                )])),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        match self.api.create(&PostParams::default(), &cm).await {
            Ok(_) => Ok(()),
            // Created by another replica meanwhile: annotate that one.
            Err(kube::Error::Api(s)) if s.code == 409 => self
                .api
                .patch(&self.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(err),
            Err(e) => Err(err(e)),
        }
    }

    /// Watches the relay object for as long as the process lives and wakes `poke` whenever
    /// a replica records a call. The watch re-establishes itself with backoff.
    pub async fn watch(self, poke: Arc<Notify>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut last: Option<String> = None;
        let stream = watcher(self.api.clone(), config)
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        loop {
            match stream.next().await {
                Some(Ok(cm)) => {
                    let value = cm
                        .metadata
                        .annotations
                        .and_then(|mut a| a.remove(POLL_REQUESTED_ANNOTATION));
                    if value.is_some() && value != last {
                        if last.is_some() {
                            tracing::info!(from = ?value, "a webhook call was relayed by another replica");
                        }
                        last = value;
                        poke.notify_one();
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, relay = %self.name, "watching the webhook relay; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => return,
            }
        }
    }
}
