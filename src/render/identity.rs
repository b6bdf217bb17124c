//! The identities in an environment: environmentd's ServiceAccount and its RoleBinding to
//! the platform's fixed ClusterRole, and envctl's own RoleBinding (when configured), through
//! which envctl reaches its environments' TLS Secrets and no other namespace's.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};

use super::parts::{Part, RenderOptions, meta, to_value};
use crate::manifest::Environment;
use crate::vocab::{ENVCTL_BINDING, ENVIRONMENTD, ObjectKind};

/// environmentd's identity (it orchestrates clusterd in its own namespace), then envctl's
/// binding.
pub fn identities(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    options: &RenderOptions,
) -> Vec<Part> {
    let sa = ServiceAccount {
        metadata: meta(env, ENVIRONMENTD, owner.clone()),
        ..ServiceAccount::default()
    };
    // environmentd's powers are a fixed ClusterRole that the platform installs (the chart
    // ships it); envctl only binds it here, so it never writes a Role and cannot grant
    // anything it was not given to grant.
    let environmentd = binding(
        env,
        owner,
        ENVIRONMENTD,
        &options.environmentd_cluster_role,
        (env.namespace(), ENVIRONMENTD.to_string()),
    );
    let mut out = vec![
        (
            ObjectKind::ServiceAccount,
            ENVIRONMENTD.into(),
            to_value(ObjectKind::ServiceAccount, &sa),
        ),
        (
            ObjectKind::RoleBinding,
            ENVIRONMENTD.into(),
            to_value(ObjectKind::RoleBinding, &environmentd),
        ),
    ];
    if let Some(b) = &options.envctl_binding {
        let envctl = binding(
            env,
            owner,
            ENVCTL_BINDING,
            &b.cluster_role,
            b.service_account.clone(),
        );
        out.push((
            ObjectKind::RoleBinding,
            ENVCTL_BINDING.into(),
            to_value(ObjectKind::RoleBinding, &envctl),
        ));
    }
    out
}

/// RoleBinding `name` of the ClusterRole `role` to one ServiceAccount `(namespace, name)`.
fn binding(
    env: &Environment,
    owner: &BTreeMap<String, String>,
    name: &str,
    role: &str,
    (sa_namespace, sa_name): (String, String),
) -> RoleBinding {
    RoleBinding {
        metadata: meta(env, name, owner.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa_name,
            namespace: Some(sa_namespace),
            ..Subject::default()
        }]),
    }
}
