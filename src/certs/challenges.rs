//! HTTP-01 answers shared by every replica. The replica that places an order publishes each
//! challenge's key authorization in the ConfigMap `envctl-<instance>-http01` of the
//! controller's namespace (data: token -> `{"keyAuthorization", "expires"}`), and removes it
//! when the authorization ends. Any replica answers `GET /.well-known/acme-challenge/<token>`
//! by reading that ConfigMap, so a validation request is answered whichever replica it
//! reaches, including one started after the order.
//!
//! Owns that ConfigMap and nothing else; never decides whether an order is placed. A key
//! authorization is public by design (the CA fetches it over plain HTTP); nothing secret is
//! kept here.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};

use crate::cluster::FIELD_MANAGER;
use crate::render::{INSTANCE_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE};

#[derive(Debug, thiserror::Error)]
#[error("{what} the HTTP-01 challenge store {namespace}/{name}")]
pub struct ChallengeError {
    what: &'static str,
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

/// One published answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    key_authorization: String,
    /// Unix seconds after which the entry is stale (its order is long over) and swept.
    expires: u64,
}

/// A challenge token as ACME issues it (base64url), which is also a valid ConfigMap key.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 253
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The cluster-backed store of HTTP-01 answers.
#[derive(Clone)]
pub struct Challenges {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    instance: String,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Challenges({}/{})", self.namespace, self.name)
    }
}

impl Challenges {
    pub fn new(client: &Client, namespace: &str, instance: &str) -> Challenges {
        Challenges {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_string(),
            name: format!("envctl-{instance}-http01"),
            instance: instance.to_string(),
        }
    }

    fn err(&self, what: &'static str) -> impl FnOnce(kube::Error) -> ChallengeError + '_ {
        move |source| ChallengeError {
            what,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Publishes `key_authorization` for `token` until `expires` (unix seconds), sweeping
    /// entries that went stale (their process stopped before removing them).
    pub async fn put(
        &self,
        token: &str,
        key_authorization: &str,
        now: u64,
        expires: u64,
    ) -> Result<(), ChallengeError> {
        let entry = serde_json::to_string(&Entry {
            key_authorization: key_authorization.to_string(),
            expires,
        })
        .unwrap_or_default();
        let mut data = serde_json::Map::new();
        if let Some(cm) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.err("reading"))?
        {
            for (k, v) in cm.data.unwrap_or_default() {
                let stale = serde_json::from_str::<Entry>(&v).map_or(true, |e| e.expires < now);
                if stale {
                    data.insert(k, serde_json::Value::Null);
                }
            }
        } else {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([
                        (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
                        (INSTANCE_LABEL.to_string(), self.instance.clone()),
                    ])),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            };
            match self.api.create(&PostParams::default(), &cm).await {
                Ok(_) => {}
                // Another replica created it meanwhile.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(self.err("creating")(e)),
            }
        }
        data.insert(token.to_string(), entry.into());
        self.patch(data).await
    }

    /// Withdraws the answer for `token` (its authorization ended).
    pub async fn remove(&self, token: &str) -> Result<(), ChallengeError> {
        let mut data = serde_json::Map::new();
        data.insert(token.to_string(), serde_json::Value::Null);
        match self.patch(data).await {
            Err(ChallengeError {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 => Ok(()),
            other => other,
        }
    }

    /// A merge patch of the data: each key is set or (null) removed on its own, so replicas
    /// never overwrite each other's entries.
    async fn patch(
        &self,
        data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ChallengeError> {
        let patch = serde_json::json!({ "data": data });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        self.api
            .patch(&self.name, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(self.err("updating"))
    }

    /// The key authorization published for `token`, if any and not stale.
    pub async fn get(&self, token: &str, now: u64) -> Result<Option<String>, ChallengeError> {
        if !valid_token(token) {
            return Ok(None);
        }
        let cm = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.err("reading"))?;
        Ok(cm
            .and_then(|cm| cm.data)
            .and_then(|mut d| d.remove(token))
            .and_then(|v| serde_json::from_str::<Entry>(&v).ok())
            .filter(|e| e.expires >= now)
            .map(|e| e.key_authorization))
    }
}

/// The route every listener of envctl adds: `GET /.well-known/acme-challenge/{token}`,
/// answered from the cluster.
pub fn challenge_router(challenges: Arc<Challenges>) -> axum::Router {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    async fn answer(
        State(c): State<Arc<Challenges>>,
        UrlPath(token): UrlPath<String>,
    ) -> (StatusCode, String) {
        match c.get(&token, super::unix_now()).await {
            Ok(Some(k)) => (StatusCode::OK, k),
            Ok(None) => (StatusCode::NOT_FOUND, "no such challenge\n".into()),
            Err(e) => {
                tracing::warn!(error = %crate::vocab::error_chain(&e), "answering an HTTP-01 challenge");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the challenge store cannot be read\n".into(),
                )
            }
        }
    }
    axum::Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(answer),
        )
        .with_state(challenges)
}

#[cfg(test)]
mod tests {
    use super::valid_token;

    #[test]
    fn tokens_are_checked_before_lookup() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!valid_token(""));
        assert!(!valid_token("../x"));
        assert!(!valid_token("a.b"));
    }
}
