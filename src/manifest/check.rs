//! Semantic rules on one environment document: Kubernetes name and label syntax, port
//! names and numbers, hostnames, scale limits and reserved names. Pure: returns problems as
//! (JSON pointer, message) pairs and never reads anything but its arguments.

use std::collections::{BTreeMap, BTreeSet};

use super::positions::escape_segment;
use serde_json::Value;

use super::types::OrchestratorNamespace;

/// Who owns a reserved key prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOwner {
    Envctl,
    Kubernetes,
}

impl KeyOwner {
    fn as_str(self) -> &'static str {
        match self {
            KeyOwner::Envctl => "envctl",
            KeyOwner::Kubernetes => "Kubernetes",
        }
    }
}

/// The reserved prefix a label or annotation key falls under, and who owns it; `None` for a
/// key a manifest may set. envctl owns `envctl.materialize.cloud/`,
/// `environmentd.materialize.cloud/` (and its `<namespace>.` subdomains) and
/// `app.kubernetes.io/managed-by`; Kubernetes owns `kubernetes.io/` and `k8s.io/` with every
/// subdomain (`pod-security.kubernetes.io/` among them), except `app.kubernetes.io/`, whose
/// recommended labels are meant for users.
pub fn reserved_prefix(key: &str) -> Option<(String, KeyOwner)> {
    if key == crate::vocab::MANAGED_BY_KEY {
        return Some((key.to_string(), KeyOwner::Envctl));
    }
    let (prefix, _) = key.split_once('/')?;
    let under = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
    let owner = if under("envctl.materialize.cloud") || under("environmentd.materialize.cloud") {
        KeyOwner::Envctl
    } else if prefix == "app.kubernetes.io" {
        return None;
    } else if under("kubernetes.io") || under("k8s.io") {
        KeyOwner::Kubernetes
    } else {
        return None;
    };
    Some((format!("{prefix}/"), owner))
}

/// Why a manifest may not set the label or annotation `key` (`what` says which), if it may not.
pub fn reserved_key_problem(what: &str, key: &str) -> Option<String> {
    let (prefix, owner) = reserved_prefix(key)?;
    let why = if prefix == "pod-security.kubernetes.io/" {
        ": every environment enforces the Pod Security level restricted, which a manifest cannot change"
    } else {
        ""
    };
    Some(format!(
        "{what} key {key:?} is under the prefix {prefix:?}, which {} owns; a manifest may not set it{why}",
        owner.as_str()
    ))
}

/// Longest StatefulSet name: its pods' `controller-revision-hash` label must stay within 63.
pub const MAX_STATEFULSET_NAME: usize = 52;

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The name part of a label key, or a label value: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn is_qualified_name_part(s: &str) -> bool {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
    match (s.bytes().next(), s.bytes().last()) {
        (Some(first), Some(last)) => {
            s.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && s.bytes().all(ok_char)
        }
        _ => false,
    }
}

/// Why `key` is not a valid Kubernetes label key, if it is not.
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns1123_subdomain(p)
    {
        return Some(format!(
            "label key {key:?}: prefix {p:?} must be a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    if !is_qualified_name_part(name) {
        return Some(format!(
            "label key {key:?}: name part must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// Why `value` is not a valid Kubernetes label value, if it is not.
pub fn label_value_problem(key: &str, value: &str) -> Option<String> {
    if value.is_empty() || is_qualified_name_part(value) {
        return None;
    }
    let hint = if value.contains('/') {
        " ('/' is not allowed in label values)"
    } else {
        ""
    };
    Some(format!(
        "label {key:?}: value {value:?} must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit{hint}"
    ))
}

/// Problems with a label map at `pointer`, one per bad entry.
pub fn check_labels(
    pointer: &str,
    labels: &BTreeMap<String, String>,
    out: &mut Vec<(String, String)>,
) {
    for (k, v) in labels {
        let p = format!("{pointer}/{}", escape_segment(k));
        if let Some(m) = label_key_problem(k) {
            out.push((p, m));
        } else if let Some(m) = reserved_key_problem("label", k) {
            out.push((p, m));
        } else if let Some(m) = label_value_problem(k, v) {
            out.push((p, m));
        }
    }
}

/// An IANA service name: 1-15 of a-z, 0-9 and '-', at least one letter, no leading, trailing
/// or doubled '-'.
fn port_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        format!(
            "port name {name:?} must be an IANA service name: 1-15 lowercase letters, digits and '-', with at least one letter and no leading, trailing or doubled '-'"
        )
    })
}

fn hostname_problem(host: &str) -> Option<String> {
    if host.ends_with('.') {
        return Some(format!("hostname {host:?} must not end with '.'"));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!("hostname {host:?} must be lowercase"));
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.len() < 2 {
        return Some(format!(
            "hostname {host:?} must be a fully qualified DNS name (at least two labels)"
        ));
    }
    if host.len() > 253 || !labels.iter().all(|l| is_dns1123_label(l)) {
        return Some(format!(
            "hostname {host:?} is not a valid DNS name: each dot-separated label must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        ));
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!(
            "hostname {host:?} looks like an IP address; a DNS name is required"
        ));
    }
    None
}

/// Limits that come from configuration rather than from the manifest.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_scale: u32,
    /// `--orchestrator-service-label`s: a manifest's `serviceLabels` may not contradict them.
    pub platform_labels: BTreeMap<String, String>,
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn services(doc: &Value) -> Vec<(OrchestratorNamespace, usize, &Value)> {
    let mut out = Vec::new();
    for ns in [
        OrchestratorNamespace::Compute,
        OrchestratorNamespace::Storage,
    ] {
        let list = doc
            .pointer(&format!("/spec/services/{}", ns.as_str()))
            .and_then(Value::as_array);
        for (i, svc) in list.into_iter().flatten().enumerate() {
            out.push((ns, i, svc));
        }
    }
    out
}

/// Every semantic problem of one environment document. Works on the decoded JSON so that it
/// can report alongside schema errors; fields of the wrong type are left to the schema.
pub fn check_environment(doc: &Value, limits: &Limits) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(name) = doc.pointer("/metadata/name").and_then(Value::as_str)
        && (name == "default" || name.starts_with("kube-") || name == "system")
    {
        out.push((
            "/metadata/name".to_string(),
            format!("environment name {name:?} is reserved"),
        ));
    }
    check_labels(
        "/metadata/labels",
        &string_map(doc.pointer("/metadata/labels")),
        &mut out,
    );
    for k in string_map(doc.pointer("/metadata/annotations")).keys() {
        let problem = label_key_problem(k)
            .map(|m| m.replacen("label key", "annotation key", 1))
            .or_else(|| reserved_key_problem("annotation", k));
        if let Some(m) = problem {
            out.push((format!("/metadata/annotations/{}", escape_segment(k)), m));
        }
    }
    let service_labels = string_map(doc.pointer("/spec/serviceLabels"));
    check_labels("/spec/serviceLabels", &service_labels, &mut out);
    for (k, v) in &service_labels {
        if let Some(platform) = limits.platform_labels.get(k).filter(|p| *p != v) {
            out.push((
                format!("/spec/serviceLabels/{}", escape_segment(k)),
                format!(
                    "service label {k:?}={v:?} contradicts --orchestrator-service-label {k}={platform}"
                ),
            ));
        }
    }
    if let Some(host) = doc.pointer("/spec/hostname").and_then(Value::as_str)
        && let Some(m) = hostname_problem(host)
    {
        out.push(("/spec/hostname".to_string(), m));
    }
    check_env_vars(
        "/spec/environmentd/env",
        doc.pointer("/spec/environmentd/env"),
        &mut out,
    );

    let mut ids: BTreeSet<(OrchestratorNamespace, String)> = BTreeSet::new();
    for (ns, i, svc) in services(doc) {
        check_service(ns, i, svc, limits, &mut ids, &mut out);
    }
    out
}

/// The problems of one clusterd service (`ids` holds the ids seen so far, per namespace).
fn check_service(
    ns: OrchestratorNamespace,
    i: usize,
    svc: &Value,
    limits: &Limits,
    ids: &mut BTreeSet<(OrchestratorNamespace, String)>,
    out: &mut Vec<(String, String)>,
) {
    let base = format!("/spec/services/{}/{i}", ns.as_str());
    if let Some(id) = svc.get("id").and_then(Value::as_str) {
        if !ids.insert((ns, id.to_string())) {
            out.push((
                format!("{base}/id"),
                format!("duplicate service id {id:?} in {}", ns.as_str()),
            ));
        }
        let sts_name = format!("{}-{id}", ns.as_str());
        if sts_name.len() > MAX_STATEFULSET_NAME {
            out.push((
                format!("{base}/id"),
                format!(
                    "service name {sts_name:?} is {} characters; at most {MAX_STATEFULSET_NAME} are allowed",
                    sts_name.len()
                ),
            ));
        }
    }
    if let Some(scale) = svc.get("scale").and_then(Value::as_u64)
        && scale > u64::from(limits.max_scale)
    {
        out.push((
            format!("{base}/scale"),
            format!(
                "scale {scale} is above the configured maximum of {} (--max-scale)",
                limits.max_scale
            ),
        ));
    }
    for (k, v) in &string_map(svc.get("labels")) {
        let p = format!("{base}/labels/{}", escape_segment(k));
        if k.contains('/') {
            out.push((
                p,
                format!(
                    "service label key {k:?} must not have a prefix: it becomes {}.environmentd.materialize.cloud/<key>",
                    ns.as_str()
                ),
            ));
        } else if let Some(m) = label_key_problem(k).or_else(|| label_value_problem(k, v)) {
            out.push((p, m));
        }
    }
    check_ports(&base, svc, out);
    check_env_vars(&format!("{base}/env"), svc.get("env"), out);
}

/// Port names and numbers of one service: valid and unique.
fn check_ports(base: &str, svc: &Value, out: &mut Vec<(String, String)>) {
    let ports = svc.get("ports").and_then(Value::as_array);
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (j, port) in ports.into_iter().flatten().enumerate() {
        let pp = format!("{base}/ports/{j}");
        if let Some(name) = port.get("name").and_then(Value::as_str) {
            if let Some(m) = port_name_problem(name) {
                out.push((format!("{pp}/name"), m));
            } else if !names.insert(name.to_string()) {
                out.push((
                    format!("{pp}/name"),
                    format!("duplicate port name {name:?} in this service"),
                ));
            }
        }
        if let Some(number) = port.get("port").and_then(Value::as_u64)
            && !numbers.insert(number)
        {
            out.push((
                format!("{pp}/port"),
                format!("duplicate port number {number} in this service"),
            ));
        }
    }
}

fn is_env_var_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn check_env_vars(pointer: &str, env: Option<&Value>, out: &mut Vec<(String, String)>) {
    for k in string_map(env).keys().filter(|k| !is_env_var_name(k)) {
        out.push((
            format!("{pointer}/{}", escape_segment(k)),
            format!(
                "environment variable name {k:?} must be letters, digits, '_', '-' and '.', not starting with a digit"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_syntax() {
        assert!(label_key_problem("team").is_none());
        assert!(label_key_problem("example.com/team").is_none());
        assert!(label_key_problem("Example.com/team").is_some());
        assert!(label_key_problem("-team").is_some());
        assert!(label_key_problem(&"a".repeat(64)).is_some());
        assert!(label_value_problem("k", "aws/us-east-1").is_some());
        assert!(label_value_problem("k", "").is_none());
        let owner = |k: &str| reserved_prefix(k);
        assert_eq!(
            owner("compute.environmentd.materialize.cloud/size"),
            Some((
                "compute.environmentd.materialize.cloud/".into(),
                KeyOwner::Envctl
            ))
        );
        assert_eq!(
            owner("app.kubernetes.io/managed-by"),
            Some(("app.kubernetes.io/managed-by".into(), KeyOwner::Envctl))
        );
        assert_eq!(owner("app.kubernetes.io/part-of"), None);
        assert_eq!(
            owner("pod-security.kubernetes.io/enforce"),
            Some(("pod-security.kubernetes.io/".into(), KeyOwner::Kubernetes))
        );
        assert_eq!(
            owner("kubernetes.io/metadata.name"),
            Some(("kubernetes.io/".into(), KeyOwner::Kubernetes))
        );
        assert_eq!(
            owner("node.k8s.io/x"),
            Some(("node.k8s.io/".into(), KeyOwner::Kubernetes))
        );
        assert_eq!(owner("example.com/team"), None);
        assert_eq!(owner("notkubernetes.io/x"), None);
        assert_eq!(owner("team"), None);
    }

    #[test]
    fn port_names() {
        assert!(port_name_problem("storagectl").is_none());
        assert!(port_name_problem("persist-pubsub").is_none());
        assert!(port_name_problem("a-very-long-port-name").is_some());
        assert!(port_name_problem("1234").is_some());
        assert!(port_name_problem("a--b").is_some());
    }

    #[test]
    fn hostnames() {
        assert!(hostname_problem("acme.us-east-1.aws.example.cloud").is_none());
        assert!(hostname_problem("localhost").is_some());
        assert!(hostname_problem("a_b.example.com").is_some());
        assert!(hostname_problem("10.0.0.1").is_some());
    }
}
