//! Render: the pure builder of desired Kubernetes objects from validated environments.
//!
//! Deterministic (sorted maps, fixed order) and free of I/O and clocks, so golden files stay
//! byte-stable. It trusts its input to have passed `manifest::check`; it never reads the
//! cluster (`observe`) and never writes it (`apply`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Namespace, PodSpec, PodTemplateSpec, ResourceRequirements,
    Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde_json::Value;

use crate::manifest::{ENVIRONMENTD_PORTS, Environment};
pub use crate::vocab::{
    CLOUD_PROVIDER_LABEL, CLOUD_REGION_LABEL, DEFAULT_INSTANCE, ENVIRONMENT_LABEL, Fnv64,
    HASH_ANNOTATION, HOSTNAME_ANNOTATION, INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE,
    ORGANIZATION_ANNOTATION, ObjectKind, PROTECT_ANNOTATION, REGION_ANNOTATION, owned_selector,
};

const ORCH_NAMESPACE_LABEL: &str = "environmentd.materialize.cloud/namespace";
const ORCH_SERVICE_ID_LABEL: &str = "environmentd.materialize.cloud/service-id";
const ENVIRONMENTD: &str = "environmentd";

/// One desired object.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    pub environment: String,
    pub kind: ObjectKind,
    pub namespace: Option<String>,
    pub name: String,
    /// The full object (apiVersion, kind, metadata, spec) as it is sent to the server.
    pub object: Value,
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
}

/// The ClusterRole environmentd is bound to unless told otherwise (the chart's, for a
/// release named `envctl`).
pub const DEFAULT_ENVIRONMENTD_CLUSTER_ROLE: &str = "envctl-environmentd";

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            orchestrator_service_labels: BTreeMap::new(),
            instance: DEFAULT_INSTANCE.to_string(),
            environmentd_cluster_role: DEFAULT_ENVIRONMENTD_CLUSTER_ROLE.to_string(),
        }
    }
}

/// The object as JSON (keys sorted: apiVersion, kind, metadata, spec...).
fn to_value<T: Serialize>(kind: ObjectKind, obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("apiVersion".into(), Value::from(kind.api_version()));
        map.insert("kind".into(), Value::from(kind.as_str()));
    }
    v
}

fn ownership(env: &Environment, options: &RenderOptions) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
        (ENVIRONMENT_LABEL.to_string(), env.metadata.name.clone()),
        (INSTANCE_LABEL.to_string(), options.instance.clone()),
    ])
}

fn meta(env: &Environment, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(env.namespace()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

fn resources(cpu: &Option<String>, memory: &Option<String>) -> Option<ResourceRequirements> {
    if cpu.is_none() && memory.is_none() {
        return None;
    }
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(c) = cpu {
        requests.insert("cpu".to_string(), Quantity(c.clone()));
    }
    if let Some(m) = memory {
        requests.insert("memory".to_string(), Quantity(m.clone()));
        limits.insert("memory".to_string(), Quantity(m.clone()));
    }
    Some(ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

fn env_vars(env: &BTreeMap<String, String>) -> Option<Vec<EnvVar>> {
    (!env.is_empty()).then(|| {
        env.iter()
            .map(|(k, v)| EnvVar {
                name: k.clone(),
                value: Some(v.clone()),
                ..EnvVar::default()
            })
            .collect()
    })
}

fn container_ports(ports: &[(String, u16)]) -> Vec<ContainerPort> {
    ports
        .iter()
        .map(|(name, port)| ContainerPort {
            name: Some(name.clone()),
            container_port: i32::from(*port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect()
}

fn headless_service(
    env: &Environment,
    name: &str,
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
    ports: &[(String, u16)],
) -> Service {
    Service {
        metadata: meta(env, name, labels.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector.clone()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some(n.clone()),
                        port: i32::from(*p),
                        target_port: Some(IntOrString::Int(i32::from(*p))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn stateful_set(
    env: &Environment,
    name: &str,
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
    replicas: i32,
    pod_spec: PodSpec,
) -> StatefulSet {
    StatefulSet {
        metadata: meta(env, name, labels.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(name.to_string()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// `aws/us-east-1` + org + ordinal: Materialize's environment id, `aws-us-east-1-<org>-0`.
fn environment_id(env: &Environment) -> String {
    format!(
        "{}-{}-0",
        env.spec.region.replace('/', "-"),
        env.spec.organization.to_lowercase()
    )
}

/// Labels every pod and Service of the environment gets beyond ownership.
fn pod_and_service_labels(env: &Environment, options: &RenderOptions) -> BTreeMap<String, String> {
    let mut labels = options.orchestrator_service_labels.clone();
    labels.extend(env.spec.service_labels.clone());
    labels
}

/// The desired objects of one environment, in apply order.
pub fn render_environment(env: &Environment, options: &RenderOptions) -> Vec<DesiredObject> {
    let ns = env.namespace();
    let owner = ownership(env, options);
    let shared = pod_and_service_labels(env, options);
    let mut out: Vec<(ObjectKind, String, Value)> = vec![(
        ObjectKind::Namespace,
        ns.clone(),
        to_value(ObjectKind::Namespace, &namespace(env, &owner)),
    )];
    out.extend(environmentd_identity(env, &owner, options));
    // environmentd, then the clusterd services, with the orchestrator's label scheme.
    let mut workloads = vec![environmentd(env, &owner, &shared)];
    workloads.extend(
        env.spec
            .services
            .iter()
            .map(|(orch, _, svc)| clusterd(env, &owner, &shared, orch.as_str(), svc)),
    );
    workloads.sort_by(|a, b| a.name.cmp(&b.name));
    for w in &mut workloads {
        out.push((
            ObjectKind::Service,
            w.name.clone(),
            std::mem::take(&mut w.service),
        ));
    }
    for w in workloads {
        out.push((ObjectKind::StatefulSet, w.name, w.stateful_set));
    }
    out.into_iter()
        .map(|(kind, obj_name, mut object)| {
            stamp_hash(&mut object);
            DesiredObject {
                environment: env.metadata.name.clone(),
                kind,
                namespace: kind.namespaced().then(|| ns.clone()),
                name: obj_name,
                object,
            }
        })
        .collect()
}

/// The environment's namespace: its labels (ownership, the manifest's, the cloud's) and
/// annotations (region, organization, hostname).
fn namespace(env: &Environment, owner: &BTreeMap<String, String>) -> Namespace {
    let mut ns_labels = env.metadata.labels.clone();
    ns_labels.extend(owner.clone());
    if let Some((provider, region)) = env.spec.region.split_once('/') {
        ns_labels.insert(CLOUD_PROVIDER_LABEL.into(), provider.into());
        ns_labels.insert(CLOUD_REGION_LABEL.into(), region.into());
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

/// environmentd's identity: it orchestrates clusterd in its own namespace.
fn environmentd_identity(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    options: &RenderOptions,
) -> [(ObjectKind, String, Value); 2] {
    let sa = ServiceAccount {
        metadata: meta(env, ENVIRONMENTD, owner.clone()),
        ..ServiceAccount::default()
    };
    let binding = RoleBinding {
        metadata: meta(env, ENVIRONMENTD, owner.clone()),
        // environmentd's powers are a fixed ClusterRole that the platform installs (the
        // chart ships it); envctl only binds it here, so it never writes a Role and cannot
        // grant anything it was not given to grant.
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: options.environmentd_cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: ENVIRONMENTD.into(),
            namespace: Some(env.namespace()),
            ..Subject::default()
        }]),
    };
    [
        (
            ObjectKind::ServiceAccount,
            ENVIRONMENTD.into(),
            to_value(ObjectKind::ServiceAccount, &sa),
        ),
        (
            ObjectKind::RoleBinding,
            ENVIRONMENTD.into(),
            to_value(ObjectKind::RoleBinding, &binding),
        ),
    ]
}

/// A workload: its headless Service and its StatefulSet, under one name.
struct Workload {
    name: String,
    service: Value,
    stateful_set: Value,
}

/// environmentd's Service and StatefulSet.
fn environmentd(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    shared: &BTreeMap<String, String>,
) -> Workload {
    let envd_ports: Vec<(String, u16)> = ENVIRONMENTD_PORTS
        .iter()
        .map(|(n, p)| ((*n).to_string(), *p))
        .collect();
    let envd_selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            ENVIRONMENTD.to_string(),
        ),
        (ENVIRONMENT_LABEL.to_string(), env.metadata.name.clone()),
    ]);
    let mut envd_labels = shared.clone();
    envd_labels.extend(owner.clone());
    envd_labels.extend(envd_selector.clone());
    let envd = &env.spec.environmentd;
    let mut args = vec![
        format!("--environment-id={}", environment_id(env)),
        "--orchestrator=kubernetes".to_string(),
    ];
    args.extend(
        shared
            .iter()
            .map(|(k, v)| format!("--orchestrator-kubernetes-service-label={k}={v}")),
    );
    args.extend(envd.args.iter().cloned());
    let envd_pod = PodSpec {
        service_account_name: Some(ENVIRONMENTD.into()),
        containers: vec![Container {
            name: ENVIRONMENTD.into(),
            image: Some(envd.image.clone()),
            image_pull_policy: envd.image_pull_policy.map(|p| p.as_str().to_string()),
            args: Some(args),
            env: env_vars(&envd.env),
            ports: Some(container_ports(&envd_ports)),
            resources: resources(&envd.cpu, &envd.memory),
            ..Container::default()
        }],
        ..PodSpec::default()
    };
    Workload {
        name: ENVIRONMENTD.to_string(),
        service: to_value(
            ObjectKind::Service,
            &headless_service(env, ENVIRONMENTD, &envd_labels, &envd_selector, &envd_ports),
        ),
        stateful_set: to_value(
            ObjectKind::StatefulSet,
            &stateful_set(env, ENVIRONMENTD, &envd_labels, &envd_selector, 1, envd_pod),
        ),
    }
}

/// One clusterd service's Service and StatefulSet, with the orchestrator's label scheme.
fn clusterd(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    shared: &BTreeMap<String, String>,
    orch: &str,
    svc: &crate::manifest::Service,
) -> Workload {
    let svc_name = format!("{orch}-{}", svc.id);
    let ports = svc.effective_ports();
    let selector = BTreeMap::from([
        (ORCH_NAMESPACE_LABEL.to_string(), orch.to_string()),
        (ORCH_SERVICE_ID_LABEL.to_string(), svc.id.clone()),
    ]);
    let mut labels = shared.clone();
    labels.extend(owner.clone());
    labels.extend(selector.clone());
    for (port_name, _) in &ports {
        labels.insert(
            format!("environmentd.materialize.cloud/port-{port_name}"),
            "true".into(),
        );
    }
    for (k, v) in &svc.labels {
        labels.insert(
            format!("{orch}.environmentd.materialize.cloud/{k}"),
            v.clone(),
        );
    }
    let pod = PodSpec {
        automount_service_account_token: Some(false),
        containers: vec![Container {
            name: "clusterd".into(),
            image: Some(svc.image.clone()),
            image_pull_policy: svc.image_pull_policy.map(|p| p.as_str().to_string()),
            args: (!svc.args.is_empty()).then(|| svc.args.clone()),
            env: env_vars(&svc.env),
            ports: Some(container_ports(&ports)),
            resources: resources(&svc.cpu, &svc.memory),
            ..Container::default()
        }],
        ..PodSpec::default()
    };
    let replicas = i32::try_from(svc.scale).unwrap_or(i32::MAX);
    Workload {
        service: to_value(
            ObjectKind::Service,
            &headless_service(env, &svc_name, &labels, &selector, &ports),
        ),
        stateful_set: to_value(
            ObjectKind::StatefulSet,
            &stateful_set(env, &svc_name, &labels, &selector, replicas, pod),
        ),
        name: svc_name,
    }
}

/// The value of `HASH_ANNOTATION`: `Fnv64` of the object's compact JSON.
pub fn desired_hash(object: &Value) -> String {
    let mut h = Fnv64::new();
    h.write(&serde_json::to_vec(object).unwrap_or_default());
    h.hex()
}

/// Stamps `HASH_ANNOTATION` (computed without it) into the object's annotations.
fn stamp_hash(object: &mut Value) {
    let hash = desired_hash(object);
    let Some(Value::Object(meta)) = object.get_mut("metadata") else {
        return;
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if let Value::Object(a) = annotations {
        a.insert(HASH_ANNOTATION.to_string(), Value::from(hash));
    }
}

/// The desired objects of every environment: environments by name, then apply order.
pub fn render(environments: &[&Environment], options: &RenderOptions) -> Vec<DesiredObject> {
    let mut envs: Vec<&Environment> = environments.to_vec();
    envs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    // Large fleets render on every core, in chunks whose results are joined in order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || envs.len() < 512 {
        return envs
            .into_iter()
            .flat_map(|e| render_environment(e, options))
            .collect();
    }
    let chunk = envs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = envs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .flat_map(|e| render_environment(e, options))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(objects) => objects,
                // A panic in rendering is a bug; it surfaces as it would have on one thread.
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}
