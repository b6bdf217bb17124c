//! Render: the pure builder of desired Kubernetes objects from validated environments.
//!
//! Deterministic (sorted maps, fixed order) and free of I/O and clocks, so golden files stay
//! byte-stable. It trusts its input to have passed `manifest::check`; it never reads the
//! cluster (`observe`) and never writes it (`apply`). Its parts: `walls` (the namespace, its
//! quota and network policy), `identity` (environmentd's and envctl's bindings), `workload`
//! (Services and StatefulSets) and `quantity` (CPU and memory arithmetic).

mod identity;
mod parts;
pub mod quantity;
mod walls;
mod workload;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::manifest::Environment;
pub use crate::vocab::{
    CLOUD_PROVIDER_LABEL, CLOUD_REGION_LABEL, DEFAULT_INSTANCE, ENVIRONMENT_LABEL, Fnv64,
    HASH_ANNOTATION, HOSTNAME_ANNOTATION, INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE,
    ORGANIZATION_ANNOTATION, ObjectKind, PROTECT_ANNOTATION, REGION_ANNOTATION, owned_selector,
};
pub use parts::{DEFAULT_ENVIRONMENTD_CLUSTER_ROLE, EnvctlBinding, RenderOptions};
pub use walls::{DEFAULT_CPU_REQUEST, DEFAULT_MEMORY_REQUEST};

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

/// Labels every pod and Service of the environment gets beyond ownership.
fn pod_and_service_labels(env: &Environment, options: &RenderOptions) -> BTreeMap<String, String> {
    let mut labels = options.orchestrator_service_labels.clone();
    labels.extend(env.spec.service_labels.clone());
    labels
}

/// The desired objects of one environment, in apply order: the namespace, the identities,
/// the walls (quota, limit range, network policy), then the workloads' Services and
/// StatefulSets.
pub fn render_environment(env: &Environment, options: &RenderOptions) -> Vec<DesiredObject> {
    let ns = env.namespace();
    let owner = parts::ownership(env, options);
    let shared = pod_and_service_labels(env, options);
    let mut out: Vec<parts::Part> = vec![(
        ObjectKind::Namespace,
        ns.clone(),
        parts::to_value(ObjectKind::Namespace, &walls::namespace(env, &owner)),
    )];
    out.extend(identity::identities(env, &owner, options));
    out.extend(walls::walls(env, &owner, options));
    // environmentd, then the clusterd services, with the orchestrator's label scheme.
    let mut workloads = vec![workload::environmentd(env, &owner, &shared)];
    workloads.extend(
        env.spec
            .services
            .iter()
            .map(|(orch, _, svc)| workload::clusterd(env, &owner, &shared, orch.as_str(), svc)),
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
