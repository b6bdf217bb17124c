//! One instance, one owner: the chart claims each instance name cluster-wide with an empty
//! ClusterRole `envctl-instance-<instance>` that names the release's namespace. A controller
//! that finds its instance claimed from another namespace refuses to start, so two releases
//! never prune, fence or charge quota as one instance.

use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::{Api, Client};

/// The annotation on the claim that names the namespace of the controller owning it.
pub const CLAIM_NAMESPACE_ANNOTATION: &str = "envctl.materialize.cloud/controller-namespace";
/// The annotation on the claim that names the Helm release owning it.
const CLAIM_RELEASE_ANNOTATION: &str = "meta.helm.sh/release-name";

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "instance {instance:?} already belongs to {owner} (ClusterRole {claim} says so); this controller runs in namespace {namespace}: give it another --instance (ENVCTL_INSTANCE), or uninstall the other release"
    )]
    Taken {
        instance: String,
        claim: String,
        owner: String,
        namespace: String,
    },
    #[error("reading the instance claim ClusterRole {claim}")]
    Read {
        claim: String,
        #[source]
        source: kube::Error,
    },
}

/// The claim's name for `instance`.
pub fn claim_name(instance: &str) -> String {
    format!("envctl-instance-{instance}")
}

/// Refuses to go on when `instance` is claimed by a controller in another namespace than
/// `namespace`. No claim (envctl run outside the chart), or no right to read it, is no
/// conflict: nothing says another owner exists.
pub async fn check(client: &Client, instance: &str, namespace: &str) -> Result<(), ClaimError> {
    let claim = claim_name(instance);
    let api: Api<ClusterRole> = Api::all(client.clone());
    let found = match api.get_opt(&claim).await {
        Ok(found) => found,
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::info!(%claim, "cannot read the instance claim; not checking who owns the instance");
            return Ok(());
        }
        Err(source) => return Err(ClaimError::Read { claim, source }),
    };
    let Some(role) = found else {
        return Ok(());
    };
    let annotations = role.metadata.annotations.unwrap_or_default();
    let Some(owner_ns) = annotations.get(CLAIM_NAMESPACE_ANNOTATION) else {
        return Ok(());
    };
    if owner_ns == namespace {
        tracing::info!(%claim, "this controller's namespace holds the instance claim");
        return Ok(());
    }
    let owner = match annotations.get(CLAIM_RELEASE_ANNOTATION) {
        Some(release) => format!("release {release} in namespace {owner_ns}"),
        None => format!("the controller in namespace {owner_ns}"),
    };
    Err(ClaimError::Taken {
        instance: instance.to_string(),
        claim,
        owner,
        namespace: namespace.to_string(),
    })
}
