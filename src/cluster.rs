//! How envctl reaches the Kubernetes API: client construction (kubeconfig or in-cluster) and
//! the mapping from envctl's closed set of kinds to API resources. Makes no decisions and
//! sends no requests of its own beyond building the client.

use std::path::Path;

use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::render::ObjectKind;

/// The one server-side apply field manager envctl uses.
pub const FIELD_MANAGER: &str = "envctl";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}")]
    ReadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("loading kubeconfig {path}")]
    LoadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("finding cluster credentials (no --kubeconfig, no KUBECONFIG, not in a cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Installs ring as rustls's one crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client from `kubeconfig`, else `$KUBECONFIG`/`~/.kube/config`, else in-cluster.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, ConnectError> {
    install_crypto_provider();
    let mut config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let kc =
                Kubeconfig::read_from(path).map_err(|source| ConnectError::ReadKubeconfig {
                    path: shown.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ConnectError::LoadKubeconfig {
                    path: shown,
                    source,
                })?
        }
        None => Config::infer().await.map_err(ConnectError::Infer)?,
    };
    config.read_timeout = Some(std::time::Duration::from_secs(60));
    Client::try_from(config).map_err(ConnectError::Client)
}

pub fn api_resource(kind: ObjectKind) -> ApiResource {
    let (group, version) = match kind.api_version().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), kind.api_version().to_string()),
    };
    ApiResource {
        group,
        version,
        api_version: kind.api_version().to_string(),
        kind: kind.as_str().to_string(),
        plural: kind.plural().to_string(),
    }
}

/// The API for one kind, in one namespace or (for namespaces, or for listing) cluster-wide.
pub fn api(client: &Client, kind: ObjectKind, namespace: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match namespace {
        Some(ns) if kind.namespaced() => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// Whether a kube error means the cluster could not be reached or refused us (exit code 3)
/// rather than rejecting one object.
pub fn is_unreachable_or_refused(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 401 || status.code == 403,
        _ => true,
    }
}
