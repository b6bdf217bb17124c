//! The workloads: environmentd's and each clusterd service's headless Service and
//! StatefulSet, with the orchestrator's label scheme, and pod templates that pass Pod
//! Security's `restricted` level (non-root, seccomp `RuntimeDefault`, no privilege
//! escalation, every capability dropped, a read-only root filesystem with a scratch
//! `emptyDir` at `/tmp`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::parts::{meta, to_value};
use crate::manifest::{ENVIRONMENTD_PORTS, Environment};
use crate::vocab::{ENVIRONMENT_LABEL, ENVIRONMENTD, ObjectKind};

const ORCH_NAMESPACE_LABEL: &str = "environmentd.materialize.cloud/namespace";
const ORCH_SERVICE_ID_LABEL: &str = "environmentd.materialize.cloud/service-id";
/// The user and group environmentd and clusterd run as (Materialize's images' own).
const RUN_AS: i64 = 999;
/// The writable scratch folder of every container (the root filesystem is read-only).
const SCRATCH: (&str, &str) = ("tmp", "/tmp");

/// A workload: its headless Service and its StatefulSet, under one name.
pub struct Workload {
    pub name: String,
    pub service: Value,
    pub stateful_set: Value,
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

/// What every container runs with: `restricted`'s rules, and a read-only root filesystem.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        read_only_root_filesystem: Some(true),
        ..SecurityContext::default()
    }
}

/// A pod of `container`: non-root, seccomp `RuntimeDefault`, the scratch folder mounted.
fn restricted_pod(mut container: Container, service_account: Option<&str>) -> PodSpec {
    container.security_context = Some(container_security());
    container.volume_mounts = Some(vec![VolumeMount {
        name: SCRATCH.0.into(),
        mount_path: SCRATCH.1.into(),
        ..VolumeMount::default()
    }]);
    PodSpec {
        service_account_name: service_account.map(str::to_string),
        // clusterd needs no API access: no token in its pods.
        automount_service_account_token: service_account.is_none().then_some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: SCRATCH.0.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
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

/// environmentd's Service and StatefulSet.
pub fn environmentd(
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
    let container = Container {
        name: ENVIRONMENTD.into(),
        image: Some(envd.image.clone()),
        image_pull_policy: envd.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(args),
        env: env_vars(&envd.env),
        ports: Some(container_ports(&envd_ports)),
        resources: resources(&envd.cpu, &envd.memory),
        ..Container::default()
    };
    let envd_pod = restricted_pod(container, Some(ENVIRONMENTD));
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
pub fn clusterd(
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
    let container = Container {
        name: "clusterd".into(),
        image: Some(svc.image.clone()),
        image_pull_policy: svc.image_pull_policy.map(|p| p.as_str().to_string()),
        args: (!svc.args.is_empty()).then(|| svc.args.clone()),
        env: env_vars(&svc.env),
        ports: Some(container_ports(&ports)),
        resources: resources(&svc.cpu, &svc.memory),
        ..Container::default()
    };
    let pod = restricted_pod(container, None);
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
