//! What every builder of the folder shares: the render settings that come from flags, not
//! manifests (`RenderOptions`), the ownership labels, and turning a typed object into the
//! JSON that is sent.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::Value;

use crate::manifest::Environment;
use crate::vocab::{
    DEFAULT_INSTANCE, ENVIRONMENT_LABEL, INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE,
    ObjectKind,
};

/// The ClusterRole environmentd is bound to unless told otherwise (the chart's, for a
/// release named `envctl`).
pub const DEFAULT_ENVIRONMENTD_CLUSTER_ROLE: &str = "envctl-environmentd";

/// envctl's own RoleBinding in each environment: what envctl does inside its environments
/// (their TLS Secrets) is granted there and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvctlBinding {
    /// `--envctl-cluster-role`: the ClusterRole bound (the chart's `<release>-in-environments`).
    pub cluster_role: String,
    /// `--envctl-service-account`: envctl's ServiceAccount, `(namespace, name)`.
    pub service_account: (String, String),
}

/// Settings that are not part of any manifest.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// `--orchestrator-service-label KEY=VALUE`: on every pod and Service.
    pub orchestrator_service_labels: BTreeMap<String, String>,
    /// `--instance`: the value of `INSTANCE_LABEL`.
    pub instance: String,
    /// `--environmentd-cluster-role`: the ClusterRole each environment's RoleBinding grants
    /// environmentd.
    pub environmentd_cluster_role: String,
    /// `--ingress-namespace`: namespaces whose pods may reach every environment's pods (the
    /// platform's ingress), besides the environment's own namespace.
    pub ingress_namespaces: Vec<String>,
    /// `--envctl-cluster-role` with `--envctl-service-account`: envctl's RoleBinding in each
    /// environment (none when not given, as for an admin running the CLI).
    pub envctl_binding: Option<EnvctlBinding>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            orchestrator_service_labels: BTreeMap::new(),
            instance: DEFAULT_INSTANCE.to_string(),
            environmentd_cluster_role: DEFAULT_ENVIRONMENTD_CLUSTER_ROLE.to_string(),
            ingress_namespaces: Vec::new(),
            envctl_binding: None,
        }
    }
}

/// One rendered object before its hash is stamped: its kind, name and JSON.
pub type Part = (ObjectKind, String, Value);

/// The object as JSON (keys sorted: apiVersion, kind, metadata, spec...).
pub fn to_value<T: Serialize>(kind: ObjectKind, obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("apiVersion".into(), Value::from(kind.api_version()));
        map.insert("kind".into(), Value::from(kind.as_str()));
    }
    v
}

/// The labels that say who owns an object: envctl, this instance, this environment.
pub fn ownership(env: &Environment, options: &RenderOptions) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
        (ENVIRONMENT_LABEL.to_string(), env.metadata.name.clone()),
        (INSTANCE_LABEL.to_string(), options.instance.clone()),
    ])
}

/// The metadata of an object named `name` in the environment's namespace.
pub fn meta(env: &Environment, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(env.namespace()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}
