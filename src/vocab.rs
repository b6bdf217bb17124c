//! Vocabulary: the names and small types every layer shares: label and annotation keys, the
//! kinds of object envctl owns and their keys, Let's Encrypt's limit names, a stable hash and
//! error-chain formatting.
//!
//! The bottom of the crate: it imports nothing from it, holds no logic beyond naming and
//! formatting, and never does I/O.

use serde::{Deserialize, Serialize};

pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "envctl";
pub const ENVIRONMENT_LABEL: &str = "envctl.materialize.cloud/environment";
/// Which envctl instance owns the object: instances sharing a cluster never touch each
/// other's objects.
pub const INSTANCE_LABEL: &str = "envctl.materialize.cloud/instance";
pub const DEFAULT_INSTANCE: &str = "default";
pub const PROTECT_ANNOTATION: &str = "envctl.materialize.cloud/protect";
pub const REGION_ANNOTATION: &str = "envctl.materialize.cloud/region";
pub const ORGANIZATION_ANNOTATION: &str = "envctl.materialize.cloud/organization";
pub const HOSTNAME_ANNOTATION: &str = "envctl.materialize.cloud/hostname";
/// Hash of the object envctl last applied; lets `plan` prove "unchanged" without a request.
pub const HASH_ANNOTATION: &str = "envctl.materialize.cloud/desired-hash";
/// environmentd's ServiceAccount, RoleBinding, Service and StatefulSet in each environment.
pub const ENVIRONMENTD: &str = "environmentd";
/// envctl's own RoleBinding in each environment (with `--envctl-cluster-role`).
pub const ENVCTL_BINDING: &str = "envctl";
/// The environment's ResourceQuota, LimitRange and NetworkPolicy.
pub const WALLS: &str = "environment";
/// Pod Security Admission's namespace labels, each set to `POD_SECURITY_LEVEL` or
/// `POD_SECURITY_VERSION`: every environment enforces (and warns and audits) `restricted`.
pub const POD_SECURITY_LABELS: [(&str, &str); 6] = [
    ("pod-security.kubernetes.io/enforce", POD_SECURITY_LEVEL),
    (
        "pod-security.kubernetes.io/enforce-version",
        POD_SECURITY_VERSION,
    ),
    ("pod-security.kubernetes.io/warn", POD_SECURITY_LEVEL),
    (
        "pod-security.kubernetes.io/warn-version",
        POD_SECURITY_VERSION,
    ),
    ("pod-security.kubernetes.io/audit", POD_SECURITY_LEVEL),
    (
        "pod-security.kubernetes.io/audit-version",
        POD_SECURITY_VERSION,
    ),
];
pub const POD_SECURITY_LEVEL: &str = "restricted";
pub const POD_SECURITY_VERSION: &str = "latest";
pub const CLOUD_PROVIDER_LABEL: &str = "envctl.materialize.cloud/cloud-provider";
pub const CLOUD_REGION_LABEL: &str = "envctl.materialize.cloud/cloud-region";

pub const REVISION_ANNOTATION: &str = "envctl.materialize.cloud/revision";
pub const STATE_ANNOTATION: &str = "envctl.materialize.cloud/state";
pub const ERROR_ANNOTATION: &str = "envctl.materialize.cloud/last-error";
pub const APPLIED_AT_ANNOTATION: &str = "envctl.materialize.cloud/applied-at";
/// Every bookkeeping annotation envctl writes on namespaces (none of them is drift).
pub const STATUS_ANNOTATIONS: [&str; 7] = [
    REVISION_ANNOTATION,
    CERTIFICATE_ANNOTATION,
    STATE_ANNOTATION,
    ERROR_ANNOTATION,
    APPLIED_AT_ANNOTATION,
    WAIT_UNTIL_ANNOTATION,
    WAIT_REASON_ANNOTATION,
];

/// On a TLS environment's namespace: why it has no certificate (set while no ACME directory
/// is configured; removed once a certificate is stored).
pub const CERTIFICATE_ANNOTATION: &str = "envctl.materialize.cloud/certificate";
/// The Secret holding an environment's certificate, in its namespace.
pub const TLS_SECRET: &str = "environment-tls";
/// On the TLS Secret: when its certificate expires (RFC 3339).
pub const NOT_AFTER_ANNOTATION: &str = "envctl.materialize.cloud/certificate-not-after";
/// On a namespace whose certificate waits for quota: when it will be ordered.
pub const WAIT_UNTIL_ANNOTATION: &str = "envctl.materialize.cloud/certificate-wait-until";
/// On a namespace whose certificate waits for quota: the limit it waits for.
pub const WAIT_REASON_ANNOTATION: &str = "envctl.materialize.cloud/certificate-wait-reason";

/// The label selector of everything one instance owns.
pub fn owned_selector(instance: &str) -> String {
    format!("{MANAGED_BY_KEY}={MANAGED_BY_VALUE},{INSTANCE_LABEL}={instance}")
}

/// The kinds envctl manages, in apply order (deletion goes in reverse).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    prometheus_client::encoding::EncodeLabelValue,
)]
pub enum ObjectKind {
    Namespace,
    ServiceAccount,
    RoleBinding,
    /// The environment's caps (pods, CPU, memory, claims): in place before any pod.
    ResourceQuota,
    /// Default requests for containers that state none, so that the quota can count them.
    LimitRange,
    /// Ingress only from the environment's own namespace and the platform's ingress.
    NetworkPolicy,
    Service,
    StatefulSet,
    Secret,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 9] = [
        ObjectKind::Namespace,
        ObjectKind::ServiceAccount,
        ObjectKind::RoleBinding,
        ObjectKind::ResourceQuota,
        ObjectKind::LimitRange,
        ObjectKind::NetworkPolicy,
        ObjectKind::Service,
        ObjectKind::StatefulSet,
        ObjectKind::Secret,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::ServiceAccount => "ServiceAccount",
            ObjectKind::RoleBinding => "RoleBinding",
            ObjectKind::ResourceQuota => "ResourceQuota",
            ObjectKind::LimitRange => "LimitRange",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::Service => "Service",
            ObjectKind::StatefulSet => "StatefulSet",
            ObjectKind::Secret => "Secret",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            ObjectKind::Namespace
            | ObjectKind::ServiceAccount
            | ObjectKind::Service
            | ObjectKind::ResourceQuota
            | ObjectKind::LimitRange
            | ObjectKind::Secret => "v1",
            ObjectKind::RoleBinding => "rbac.authorization.k8s.io/v1",
            ObjectKind::NetworkPolicy => "networking.k8s.io/v1",
            ObjectKind::StatefulSet => "apps/v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "namespaces",
            ObjectKind::ServiceAccount => "serviceaccounts",
            ObjectKind::RoleBinding => "rolebindings",
            ObjectKind::ResourceQuota => "resourcequotas",
            ObjectKind::LimitRange => "limitranges",
            ObjectKind::NetworkPolicy => "networkpolicies",
            ObjectKind::Service => "services",
            ObjectKind::StatefulSet => "statefulsets",
            ObjectKind::Secret => "secrets",
        }
    }

    pub fn namespaced(self) -> bool {
        self != ObjectKind::Namespace
    }

    /// Whether the controller watches this kind (its watch cache, and so drift and every
    /// pass's reads). A new kind must say: the match has no catch-all.
    pub const fn watched(self) -> bool {
        match self {
            ObjectKind::Namespace
            | ObjectKind::ServiceAccount
            | ObjectKind::RoleBinding
            | ObjectKind::ResourceQuota
            | ObjectKind::LimitRange
            | ObjectKind::NetworkPolicy
            | ObjectKind::Service
            | ObjectKind::StatefulSet => true,
            // TLS Secrets are the certificate step's: it reads them itself.
            ObjectKind::Secret => false,
        }
    }

    /// The kinds of `ALL` that are `watched`, in that order.
    pub const WATCHED: [ObjectKind; Self::count_watched()] = {
        let mut out = [ObjectKind::Namespace; Self::count_watched()];
        let (mut i, mut n) = (0, 0);
        while i < Self::ALL.len() {
            if Self::ALL[i].watched() {
                out[n] = Self::ALL[i];
                n += 1;
            }
            i += 1;
        }
        out
    };

    const fn count_watched() -> usize {
        let (mut i, mut n) = (0, 0);
        while i < Self::ALL.len() {
            if Self::ALL[i].watched() {
                n += 1;
            }
            i += 1;
        }
        n
    }
}

/// Identity of one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.as_str(), self.name),
            None => write!(f, "{} {}", self.kind.as_str(), self.name),
        }
    }
}

/// The Let's Encrypt rate limits envctl models (its quota ledger keeps one bucket of each per
/// key).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    prometheus_client::encoding::EncodeLabelValue,
)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    NewOrdersPerAccount,
    NewCertificatesPerRegisteredDomain,
    NewCertificatesPerExactSet,
    AuthorizationFailuresPerIdentifier,
    /// Let's Encrypt pauses an identifier for an account after 1,152 consecutive failed
    /// authorizations (refilled one a day, reset by a success). envctl backs off instead.
    ConsecutiveAuthorizationFailuresPerIdentifier,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::NewOrdersPerAccount,
        Limit::NewCertificatesPerRegisteredDomain,
        Limit::NewCertificatesPerExactSet,
        Limit::AuthorizationFailuresPerIdentifier,
        Limit::ConsecutiveAuthorizationFailuresPerIdentifier,
    ];

    /// The stored and printed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::NewOrdersPerAccount => "new-orders-per-account",
            Limit::NewCertificatesPerRegisteredDomain => "new-certificates-per-registered-domain",
            Limit::NewCertificatesPerExactSet => "new-certificates-per-exact-set",
            Limit::AuthorizationFailuresPerIdentifier => "authorization-failures-per-identifier",
            Limit::ConsecutiveAuthorizationFailuresPerIdentifier => {
                "consecutive-authorization-failures-per-identifier"
            }
        }
    }
}

/// FNV-1a (64-bit) over 8-byte little-endian words, then the remaining bytes, with the
/// total length mixed in last. Stable across runs and platforms; not cryptographic.
#[derive(Debug, Clone)]
pub struct Fnv64 {
    h: u64,
    len: u64,
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    const PRIME: u64 = 0x0100_0000_01b3;

    pub fn new() -> Fnv64 {
        Fnv64 {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.h ^= u64::from_le_bytes(word);
            self.h = self.h.wrapping_mul(Self::PRIME);
        }
        for &b in words.remainder() {
            self.h ^= u64::from(b);
            self.h = self.h.wrapping_mul(Self::PRIME);
        }
        self.len = self.len.wrapping_add(bytes.len() as u64);
    }

    pub fn finish(&self) -> u64 {
        (self.h ^ self.len).wrapping_mul(Self::PRIME)
    }

    /// `finish` through splitmix64's finalizer, so that every bit of the input moves every
    /// bit of the output (for weights, and for sums of digests).
    pub fn mixed(&self) -> u64 {
        let mut x = self.finish();
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.finish())
    }
}

/// An error with its chain of causes, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    // A library's error may quote a URL whole, credentials included.
    redact_urls(&s)
}

/// `text` with the userinfo (`user:token@`) of every URL in it replaced by `***@`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | ')' | '"' | '\'' | '>' | ',') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The phases of a long pass that report their progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the live objects.
    Observe,
    /// Asking the API server what each changed object would become.
    DryRun,
    /// Writing the changes.
    Apply,
    /// Bringing certificates up to date.
    Certificates,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Observe => "observe",
            Phase::DryRun => "dry-run",
            Phase::Apply => "apply",
            Phase::Certificates => "certificates",
        }
    }
}

/// Where a long pass reports how far it got (the CLI draws a bar on a terminal). `total` is
/// in objects (0 when unknown); `environments` is how many environments the phase covers.
pub trait Progress: Send + Sync {
    fn phase(&self, phase: Phase, environments: usize, total: u64);
    fn advance(&self, n: u64);
    /// The work is done (or its output is about to be printed): take the progress away.
    fn finish(&self) {}
}

/// A `Progress` that can sit in cloneable, printable settings.
#[derive(Clone)]
pub struct ProgressHandle(pub std::sync::Arc<dyn Progress>);

impl std::fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHandle")
    }
}

impl ProgressHandle {
    pub fn phase(&self, phase: Phase, environments: usize, total: u64) {
        self.0.phase(phase, environments, total);
    }

    pub fn advance(&self, n: u64) {
        self.0.advance(n);
    }

    pub fn finish(&self) {
        self.0.finish();
    }
}

/// Drops `value` on a thread of its own: freeing a large tree of objects (a pass part's
/// parsed live objects, its unchanged desired ones) costs as much as a step, and nothing
/// waits for it.
pub fn drop_elsewhere<T: Send + 'static>(value: T) {
    let dropped = std::thread::Builder::new()
        .name("envctl-drop".into())
        .spawn(move || drop(value));
    // Without a thread (the process is at its limit), the value was dropped here.
    let _ = dropped;
}

#[cfg(test)]
mod redact_tests {
    use super::*;

    #[test]
    fn urls_in_text_lose_their_credentials() {
        assert_eq!(
            redact_urls(
                "error sending request for url (https://bot:s3cr3t@acme.example/dir): refused"
            ),
            "error sending request for url (https://***@acme.example/dir): refused"
        );
        assert_eq!(
            redact_urls("git://h/x and https://tok@h and http://plain/"),
            "git://h/x and https://***@h and http://plain/"
        );
        assert_eq!(redact_urls("no url here"), "no url here");
    }
}
