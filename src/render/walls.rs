//! The walls around each environment, so that it holds by itself whatever runs inside it:
//! its namespace (enforcing Pod Security's `restricted` level), a ResourceQuota sized from
//! the manifest with headroom (with a LimitRange giving a default request to any container
//! that states none, so that the quota counts every pod), and a NetworkPolicy that lets in
//! only the environment's own pods and the platform's ingress namespaces.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LimitRange, LimitRangeItem, LimitRangeSpec, Namespace, ResourceQuota, ResourceQuotaSpec,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::parts::{Part, RenderOptions, meta, to_value};
use super::quantity::{cpu_millis, format_cpu, format_memory, memory_bytes};
use crate::manifest::Environment;
use crate::vocab::{
    CLOUD_PROVIDER_LABEL, CLOUD_REGION_LABEL, HOSTNAME_ANNOTATION, ORGANIZATION_ANNOTATION,
    ObjectKind, POD_SECURITY_LABELS, REGION_ANNOTATION, WALLS,
};

/// What the LimitRange gives a container that requests no CPU or memory (and so what the
/// quota counts for it).
pub const DEFAULT_CPU_REQUEST: &str = "100m";
pub const DEFAULT_MEMORY_REQUEST: &str = "256Mi";

/// The label Kubernetes sets on every namespace to its name (a selector for one namespace).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The environment's namespace: its labels (the manifest's, ownership, the cloud's, Pod
/// Security's) and annotations (region, organization, hostname).
pub fn namespace(env: &Environment, owner: &BTreeMap<String, String>) -> Namespace {
    let mut ns_labels = env.metadata.labels.clone();
    ns_labels.extend(owner.clone());
    if let Some((provider, region)) = env.spec.region.split_once('/') {
        ns_labels.insert(CLOUD_PROVIDER_LABEL.into(), provider.into());
        ns_labels.insert(CLOUD_REGION_LABEL.into(), region.into());
    }
    for (k, v) in POD_SECURITY_LABELS {
        ns_labels.insert(k.into(), v.into());
    }
    let mut ns_annotations = env.metadata.annotations.clone();
    ns_annotations.insert(REGION_ANNOTATION.into(), env.spec.region.clone());
    ns_annotations.insert(
        ORGANIZATION_ANNOTATION.into(),
        env.spec.organization.clone(),
    );
    ns_annotations.insert(HOSTNAME_ANNOTATION.into(), env.spec.hostname.clone());
    Namespace {
        metadata: ObjectMeta {
            name: Some(env.namespace()),
            labels: Some(ns_labels),
            annotations: Some(ns_annotations),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// What the manifest's workloads request in all: pods, milli-CPUs and bytes of memory.
struct Requests {
    pods: u128,
    cpu: u128,
    memory: u128,
}

fn requests(env: &Environment) -> Requests {
    let cpu = |q: &Option<String>| {
        q.as_deref()
            .and_then(cpu_millis)
            .or_else(|| cpu_millis(DEFAULT_CPU_REQUEST))
            .unwrap_or(0)
    };
    let memory = |q: &Option<String>| {
        q.as_deref()
            .and_then(memory_bytes)
            .or_else(|| memory_bytes(DEFAULT_MEMORY_REQUEST))
            .unwrap_or(0)
    };
    let envd = &env.spec.environmentd;
    let mut total = Requests {
        pods: 1,
        cpu: cpu(&envd.cpu),
        memory: memory(&envd.memory),
    };
    for (_, _, svc) in env.spec.services.iter() {
        let n = u128::from(svc.scale);
        total.pods += n;
        total.cpu += n * cpu(&svc.cpu);
        total.memory += n * memory(&svc.memory);
    }
    total
}

/// The ResourceQuota: what the workloads request plus the manifest's headroom (rounded up),
/// and as many claims as pods.
fn resource_quota(env: &Environment, owner: &BTreeMap<String, String>) -> ResourceQuota {
    let r = requests(env);
    let grown = |n: u128| (n * (100 + u128::from(env.spec.quota_headroom_percent()))).div_ceil(100);
    let pods = grown(r.pods).to_string();
    let hard = BTreeMap::from([
        ("pods".to_string(), Quantity(pods.clone())),
        ("persistentvolumeclaims".to_string(), Quantity(pods)),
        (
            "requests.cpu".to_string(),
            Quantity(format_cpu(grown(r.cpu))),
        ),
        (
            "requests.memory".to_string(),
            Quantity(format_memory(grown(r.memory))),
        ),
    ]);
    ResourceQuota {
        metadata: meta(env, WALLS, owner.clone()),
        spec: Some(ResourceQuotaSpec {
            hard: Some(hard),
            ..ResourceQuotaSpec::default()
        }),
        ..ResourceQuota::default()
    }
}

fn limit_range(env: &Environment, owner: &BTreeMap<String, String>) -> LimitRange {
    LimitRange {
        metadata: meta(env, WALLS, owner.clone()),
        spec: Some(LimitRangeSpec {
            limits: vec![LimitRangeItem {
                type_: "Container".into(),
                default_request: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity(DEFAULT_CPU_REQUEST.into())),
                    (
                        "memory".to_string(),
                        Quantity(DEFAULT_MEMORY_REQUEST.into()),
                    ),
                ])),
                ..LimitRangeItem::default()
            }],
        }),
    }
}

/// Ingress to every pod of the environment from its own pods and from the platform's
/// ingress namespaces; nothing else (other environments included).
fn network_policy(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    options: &RenderOptions,
) -> NetworkPolicy {
    let mut from = vec![NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    }];
    from.extend(
        options
            .ingress_namespaces
            .iter()
            .map(|ns| NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        NAMESPACE_NAME_LABEL.to_string(),
                        ns.clone(),
                    )])),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            }),
    );
    NetworkPolicy {
        metadata: meta(env, WALLS, owner.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The quota, the limit range and the network policy, in apply order.
pub fn walls(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    options: &RenderOptions,
) -> [Part; 3] {
    [
        (
            ObjectKind::ResourceQuota,
            WALLS.into(),
            to_value(ObjectKind::ResourceQuota, &resource_quota(env, owner)),
        ),
        (
            ObjectKind::LimitRange,
            WALLS.into(),
            to_value(ObjectKind::LimitRange, &limit_range(env, owner)),
        ),
        (
            ObjectKind::NetworkPolicy,
            WALLS.into(),
            to_value(
                ObjectKind::NetworkPolicy,
                &network_policy(env, owner, options),
            ),
        ),
    ]
}
