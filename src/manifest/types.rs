//! The manifest's Rust types: the single source of `schemas/environment.schema.json`.
//!
//! Shape only (what serde and the JSON Schema can say); rules that need more than one
//! field or outside knowledge live in `check`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
pub const UUID_PATTERN: &str =
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
pub const REGION_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
pub const CPU_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$";
pub const MEMORY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
pub const IMAGE_PATTERN: &str = r"^[^\s]+$";

/// What a schema pattern means, in words, for error messages.
pub fn pattern_meaning(pattern: &str) -> Option<&'static str> {
    match pattern {
        NAME_PATTERN => Some(
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit",
        ),
        UUID_PATTERN => Some("must be a UUID such as 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11"),
        REGION_PATTERN => Some("must be <provider>/<region>, such as aws/us-east-1"),
        CPU_PATTERN => Some("must be a CPU quantity such as 2, 0.5 or 500m"),
        MEMORY_PATTERN => Some("must be a memory quantity such as 8Gi or 512Mi"),
        IMAGE_PATTERN => Some("must be an image reference without whitespace"),
        _ => None,
    }
}

/// The only `apiVersion` this envctl reads.
pub const API_VERSION: &str = "envctl.materialize.cloud/v1alpha1";
/// The only `kind` this envctl reads.
pub const KIND: &str = "Environment";

/// One customer environment: one Kubernetes namespace, one environmentd, its clusterd services
/// and (optionally) one TLS certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Environment")]
pub struct Environment {
    /// Always `envctl.materialize.cloud/v1alpha1`.
    pub api_version: ApiVersion,
    /// Always `Environment`.
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: EnvironmentSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "envctl.materialize.cloud/v1alpha1")]
    V1Alpha1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Kind {
    Environment,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The environment's name, a DNS-1123 label; its namespace is `environment-<name>`, so at
    /// most 51 characters.
    #[schemars(length(min = 1, max = 51), pattern(NAME_PATTERN))]
    pub name: String,
    /// Labels copied onto the environment's namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations copied onto the environment's namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvironmentSpec {
    /// The owning organization's UUID.
    #[schemars(pattern(UUID_PATTERN))]
    pub organization: String,
    /// The cloud region, `<provider>/<region>`, e.g. `aws/us-east-1`.
    #[schemars(pattern(REGION_PATTERN))]
    pub region: String,
    /// The environment's DNS name; the TLS certificate is issued for it.
    #[schemars(length(min = 1, max = 253))]
    pub hostname: String,
    #[serde(default)]
    pub tls: Tls,
    pub environmentd: Environmentd,
    #[serde(default)]
    pub services: Services,
    /// Labels put on every pod and Service of the environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_labels: BTreeMap<String, String>,
    /// The environment's ResourceQuota: what its workloads request, plus headroom for what
    /// environmentd starts itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

/// How the environment's ResourceQuota is sized. Its pods, CPU and memory are what the
/// manifest's workloads request (a container that states no request counts as the default
/// the namespace's LimitRange gives it), plus `headroom`; its claims are as many as its pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// A share added on top of what the workloads request, e.g. `"50%"` (default `"100%"`:
    /// environmentd may start as much again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,4}%$"))]
    pub headroom: Option<String>,
}

/// The quota's headroom when a manifest sets none.
pub const DEFAULT_QUOTA_HEADROOM_PERCENT: u32 = 100;

impl EnvironmentSpec {
    /// The quota's headroom in percent.
    pub fn quota_headroom_percent(&self) -> u32 {
        self.quota
            .as_ref()
            .and_then(|q| q.headroom.as_deref())
            .and_then(|h| h.trim_end_matches('%').parse().ok())
            .unwrap_or(DEFAULT_QUOTA_HEADROOM_PERCENT)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Whether envctl obtains a certificate for `spec.hostname` (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The ACME certificate profile to ask for (e.g. `classic`, `tlsserver`, `shortlived`),
    /// overriding `--acme-profile`. It must be one the directory offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub profile: Option<String>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            enabled: true,
            profile: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Environmentd {
    /// Container image of environmentd.
    #[schemars(length(min = 1, max = 512), pattern(IMAGE_PATTERN))]
    pub image: String,
    /// Kubernetes CPU quantity requested, e.g. `2` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(CPU_PATTERN))]
    pub cpu: Option<String>,
    /// Kubernetes memory quantity, requested and the limit, e.g. `8Gi` or `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MEMORY_PATTERN))]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Extra command-line arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Services per orchestrator namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Services {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute: Vec<Service>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<Service>,
}

impl Services {
    /// Every service with its orchestrator namespace, in manifest order.
    pub fn iter(&self) -> impl Iterator<Item = (OrchestratorNamespace, usize, &Service)> {
        let compute = self
            .compute
            .iter()
            .enumerate()
            .map(|(i, s)| (OrchestratorNamespace::Compute, i, s));
        let storage = self
            .storage
            .iter()
            .enumerate()
            .map(|(i, s)| (OrchestratorNamespace::Storage, i, s));
        compute.chain(storage)
    }
}

/// The orchestrator "subnamespace" a service lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OrchestratorNamespace {
    Compute,
    Storage,
}

impl OrchestratorNamespace {
    pub fn as_str(self) -> &'static str {
        match self {
            OrchestratorNamespace::Compute => "compute",
            OrchestratorNamespace::Storage => "storage",
        }
    }
}

/// One clusterd service: a StatefulSet plus a headless Service named `<namespace>-<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    /// The service's id within its orchestrator namespace, e.g. `cluster-0` or `runtime`.
    #[schemars(length(min = 1, max = 43), pattern(NAME_PATTERN))]
    pub id: String,
    /// Container image of clusterd.
    #[schemars(length(min = 1, max = 512), pattern(IMAGE_PATTERN))]
    pub image: String,
    /// Number of clusterd processes (StatefulSet replicas).
    #[schemars(range(min = 0))]
    pub scale: u32,
    /// Kubernetes CPU quantity requested, e.g. `2` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(CPU_PATTERN))]
    pub cpu: Option<String>,
    /// Kubernetes memory quantity, requested and the limit, e.g. `8Gi` or `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MEMORY_PATTERN))]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Labels given to the service at creation; rendered as
    /// `<namespace>.environmentd.materialize.cloud/<key>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Named ports; default storagectl 2100, computectl 2101, timely 2102.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub ports: Option<Vec<Port>>,
    /// Extra command-line arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// IANA service name: at most 15 characters of a-z, 0-9 and `-`.
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
}

/// clusterd's conventional ports.
pub const CLUSTERD_PORTS: [(&str, u16); 3] =
    [("storagectl", 2100), ("computectl", 2101), ("timely", 2102)];

/// environmentd's conventional ports.
pub const ENVIRONMENTD_PORTS: [(&str, u16); 5] = [
    ("sql", 6875),
    ("http", 6876),
    ("internal-sql", 6877),
    ("internal-http", 6878),
    ("persist-pubsub", 6879),
];

impl Service {
    /// The service's ports, its own or clusterd's defaults.
    pub fn effective_ports(&self) -> Vec<(String, u16)> {
        match &self.ports {
            Some(ports) => ports
                .iter()
                .map(|p| (p.name.clone(), u16::try_from(p.port).unwrap_or(u16::MAX)))
                .collect(),
            None => CLUSTERD_PORTS
                .iter()
                .map(|(n, p)| ((*n).to_string(), *p))
                .collect(),
        }
    }
}

impl Environment {
    /// The environment's Kubernetes namespace.
    pub fn namespace(&self) -> String {
        namespace_for(&self.metadata.name)
    }
}

/// The namespace of the environment called `name`.
pub fn namespace_for(name: &str) -> String {
    format!("environment-{name}")
}

/// The JSON Schema (2020-12) of a manifest, as committed in `schemas/environment.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<Environment>();
    schema.to_value()
}

/// The `kind` of the rollout policy document.
pub const POLICY_KIND: &str = "RolloutPolicy";

/// How a revision that changes many environments rolls out: in waves, each wave only once
/// every environment of the waves before it is Ready. At most one per source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "RolloutPolicy")]
pub struct RolloutPolicy {
    /// Always `envctl.materialize.cloud/v1alpha1`.
    pub api_version: ApiVersion,
    /// Always `RolloutPolicy`.
    pub kind: PolicyKind,
    pub metadata: PolicyMetadata,
    pub spec: RolloutSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyKind {
    RolloutPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyMetadata {
    #[schemars(length(min = 1, max = 63), pattern(NAME_PATTERN))]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The waves in order. An environment belongs to the first wave whose selector matches
    /// its labels; environments no wave selects form one last wave.
    #[schemars(length(min = 1, max = 64))]
    pub waves: Vec<Wave>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Wave {
    /// Shown in status and logs; `wave-<n>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(NAME_PATTERN))]
    pub name: Option<String>,
    /// Which environments the wave holds, by their `metadata.labels`.
    #[serde(default)]
    pub selector: Selector,
    /// How many environments of the wave may roll out at once: a count (`2`) or a share of
    /// the wave (`"25%"`, rounded up, at least 1). Default: the whole wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<MaxInFlight>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Labels an environment must all have; empty selects every environment.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MaxInFlight {
    Count(#[schemars(range(min = 1))] u32),
    Percent(#[schemars(pattern(r"^(100|[1-9][0-9]?)%$"))] String),
}

impl MaxInFlight {
    /// How many of a wave of `size` may be in flight at once (at least 1).
    pub fn resolve(&self, size: usize) -> usize {
        match self {
            MaxInFlight::Count(n) => usize::try_from(*n).unwrap_or(usize::MAX).max(1),
            MaxInFlight::Percent(p) => {
                let pct: usize = p.trim_end_matches('%').parse().unwrap_or(100);
                (size * pct).div_ceil(100).max(1)
            }
        }
    }
}

/// The JSON Schema (2020-12) of a `RolloutPolicy` document.
pub fn policy_json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<RolloutPolicy>();
    schema.to_value()
}
