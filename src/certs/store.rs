//! Where certificate state lives in the cluster: the quota ledger (a ConfigMap in the
//! controller's namespace, updated with resourceVersion compare-and-swap), the ACME account
//! (a Secret there), each environment's `environment-tls` Secret and the controller's copy of
//! it, and the namespace annotations of waiting certificates. Reads and writes only these;
//! the TLS Secrets are written through `apply::server_side_apply`.
//!
//! Every object of the controller's namespace has a name fixed by the instance, so that
//! envctl's Role there can name each one (`resourceNames`) and needs no `list` of Secrets
//! (which would read every Secret of that namespace, Helm's release records among them):
//! the copies live in `COPY_SHARDS` Secrets `envctl-<instance>-certs-<NN>` (an environment's
//! shard from a hash of its name), the keys of orders in flight in one Secret
//! `envctl-<instance>-order-keys`, both updated with compare-and-swap.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::ledger::{Ledger, Limits, OrderKind};
use super::{CertInfo, NAMES_ANNOTATION, NOT_AFTER_ANNOTATION, SERIAL_ANNOTATION, TLS_SECRET};
use crate::cluster::FIELD_MANAGER;
use crate::render::{ENVIRONMENT_LABEL, INSTANCE_LABEL, MANAGED_BY_KEY as MANAGED_BY_LABEL};

const LEDGER_KEY: &str = "ledger.json";
/// How many Secrets hold the certificate copies. A copy (chain and key) takes about 4 KiB
/// and a Secret at most 1 MiB, so they hold about 60,000 environments; the chart's Role
/// names each of them.
pub const COPY_SHARDS: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {namespace}/{name}")]
    Kube {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the quota ledger {namespace}/{name} is not valid JSON ({message}); no order is placed until it is fixed or deleted"
    )]
    CorruptLedger {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("{namespace}/{name} kept changing under us ({tries} tries)")]
    Contended {
        namespace: String,
        name: String,
        tries: usize,
    },
}

impl StoreError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Kube { source, .. } if crate::cluster::is_unreachable_or_refused(source))
    }
}

/// Names the object a failed request was about.
fn kube_err<'a>(
    what: &'static str,
    namespace: &'a str,
    name: &'a str,
) -> impl FnOnce(kube::Error) -> StoreError + 'a {
    move |source| StoreError::Kube {
        what,
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    }
}

/// An order charged in the ledger and (once `order_url` is set) sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub names: Vec<String>,
    pub kind: OrderKind,
    pub charged_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_url: Option<String>,
    /// Who placed it (`CertSettings::writer`): only that writer works on the order until it
    /// is settled or has outlived any order's time. Absent in ledgers written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl Pending {
    /// Whether `writer` may work on this order at `now`: its own, one of a ledger that did
    /// not record writers, or one its writer has left for longer than `abandoned_after`.
    pub fn workable_by(&self, writer: &str, now: u64, abandoned_after: u64) -> bool {
        match &self.writer {
            None => true,
            Some(w) if w == writer => true,
            Some(_) => now >= self.charged_at.saturating_add(abandoned_after),
        }
    }
}

/// The stored ledger: bucket state, orders in flight and the queue's arrival times.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerDoc {
    #[serde(default)]
    pub buckets: Ledger,
    /// Environment -> its order in flight.
    #[serde(default)]
    pub pending: BTreeMap<String, Pending>,
    /// Environment -> when it first asked for a certificate not yet served (unix seconds).
    #[serde(default)]
    pub queued: BTreeMap<String, u64>,
}

/// The ledger ConfigMap and the configuration applied to it on load.
#[derive(Clone)]
pub struct LedgerStore {
    api: Api<ConfigMap>,
    pub namespace: String,
    pub name: String,
    instance: String,
    /// The limits this process was given: a writer (`apply`, `run`) records them in the
    /// ledger; `None` (a reader given no limit flags) uses the ones recorded there.
    pub limits: Option<Limits>,
}

impl LedgerStore {
    pub fn new(
        client: &Client,
        namespace: &str,
        instance: &str,
        limits: Option<Limits>,
    ) -> LedgerStore {
        LedgerStore {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_string(),
            name: format!("envctl-{instance}-acme-ledger"),
            instance: instance.to_string(),
            limits,
        }
    }

    fn kube_err(&self, what: &'static str) -> impl FnOnce(kube::Error) -> StoreError + '_ {
        kube_err(what, &self.namespace, &self.name)
    }

    /// Records this process's limits in the ledger when they differ from the recorded ones,
    /// re-expressing the used tokens of every bucket whose limit changed (`Ledger::retune`).
    /// Writes nothing when they match, or for a reader (`limits` is `None`).
    pub async fn record_limits(&self) -> Result<(), StoreError> {
        self.update(|_| ()).await
    }

    /// The ledger with this process's limits applied, and its resourceVersion (`None` when
    /// it does not exist yet).
    pub async fn load(&self) -> Result<(LedgerDoc, Option<String>), StoreError> {
        let (mut doc, rv) = self.load_recorded().await?;
        self.apply_limits(&mut doc);
        Ok((doc, rv))
    }

    /// Measures `doc` against this process's limits, if it was given any.
    fn apply_limits(&self, doc: &mut LedgerDoc) {
        if let Some(limits) = &self.limits {
            doc.buckets.retune(limits.clone(), super::unix_now());
        }
    }

    /// The ledger as stored, with the limits recorded in it.
    async fn load_recorded(&self) -> Result<(LedgerDoc, Option<String>), StoreError> {
        let cm = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.kube_err("reading the quota ledger"))?;
        let (doc, rv) = match cm {
            None => (LedgerDoc::default(), None),
            Some(cm) => {
                let rv = cm.resource_version();
                let text = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(LEDGER_KEY))
                    .map_or("{}", String::as_str);
                let doc: LedgerDoc =
                    serde_json::from_str(text).map_err(|e| StoreError::CorruptLedger {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        message: e.to_string(),
                    })?;
                (doc, rv)
            }
        };
        Ok((doc, rv))
    }

    /// Writes `doc` if the stored ledger is still at `rv`; `Ok(false)` when it moved.
    async fn save(&self, doc: &LedgerDoc, rv: Option<String>) -> Result<bool, StoreError> {
        let text = serde_json::to_string(doc).map_err(|e| StoreError::CorruptLedger {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            message: e.to_string(),
        })?;
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv.clone(),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_string(), "envctl".to_string()),
                    (INSTANCE_LABEL.to_string(), self.instance.clone()),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(LEDGER_KEY.to_string(), text)])),
            ..ConfigMap::default()
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let result = match rv {
            None => self.api.create(&pp, &cm).await,
            Some(_) => self.api.replace(&self.name, &pp, &cm).await,
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.kube_err("writing the quota ledger")(e)),
        }
    }

    /// Applies `change` to the stored ledger with compare-and-swap, re-running it on a fresh
    /// copy whenever another writer got there first. The write is durable when this returns.
    pub async fn update<T>(
        &self,
        mut change: impl FnMut(&mut LedgerDoc) -> T,
    ) -> Result<T, StoreError> {
        // Many orders record their outcome at once (16 in flight per replica): on a loaded
        // machine a write can lose the race many times in a row.
        const TRIES: usize = 60;
        for attempt in 0..TRIES {
            // Compared with the ledger as recorded: a change of this process's limits is
            // itself a change to write (`load` applies them).
            let (mut doc, rv) = self.load_recorded().await?;
            let before = doc.clone();
            self.apply_limits(&mut doc);
            let out = change(&mut doc);
            if doc == before {
                return Ok(out);
            }
            // Buckets that are full again are dropped with every write, so the ConfigMap
            // stays far below its 1 MiB limit.
            doc.buckets.compact(super::unix_now());
            if self.save(&doc, rv).await? {
                return Ok(out);
            }
            tokio::time::sleep(std::time::Duration::from_millis(
                20 * (attempt as u64 + 1).min(10),
            ))
            .await;
        }
        Err(StoreError::Contended {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            tries: TRIES,
        })
    }
}

/// The Secret holding the ACME account's credentials, one key per directory.
pub struct AccountStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

fn directory_key(directory: &str) -> String {
    let mut h = crate::render::Fnv64::new();
    h.write(directory.as_bytes());
    format!("account-{}.json", h.hex())
}

impl AccountStore {
    pub fn new(client: &Client, namespace: &str, instance: &str) -> AccountStore {
        AccountStore {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_string(),
            name: format!("envctl-{instance}-acme-account"),
        }
    }

    fn kube_err(&self, what: &'static str) -> impl FnOnce(kube::Error) -> StoreError + '_ {
        kube_err(what, &self.namespace, &self.name)
    }

    pub async fn load(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.kube_err("reading the ACME account"))?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(&directory_key(directory)))
            .map(|b| b.0))
    }

    /// Stores the credentials unless another process stored some first; returns the ones
    /// that are stored (use those, so that all replicas share one account).
    pub async fn store(
        &self,
        directory: &str,
        credentials: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let key = directory_key(directory);
        for _ in 0..5 {
            let existing = self
                .api
                .get_opt(&self.name)
                .await
                .map_err(self.kube_err("reading the ACME account"))?;
            let result = match existing {
                Some(s) => {
                    if let Some(b) = s.data.as_ref().and_then(|d| d.get(&key)) {
                        return Ok(b.0.clone());
                    }
                    let mut s = s;
                    s.data
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key.clone(), ByteString(credentials.clone()));
                    self.api
                        .replace(&self.name, &PostParams::default(), &s)
                        .await
                }
                None => {
                    let s = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([(
                                MANAGED_BY_LABEL.to_string(),
                                "envctl".to_string(),
                            )])),
                            ..ObjectMeta::default()
                        },
                        data: Some(BTreeMap::from([(
                            key.clone(),
                            ByteString(credentials.clone()),
                        )])),
                        type_: Some("Opaque".into()),
                        ..Secret::default()
                    };
                    self.api.create(&PostParams::default(), &s).await
                }
            };
            match result {
                Ok(_) => return Ok(credentials),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.kube_err("storing the ACME account")(e)),
            }
        }
        Ok(credentials)
    }
}

/// A stored certificate: its chain and key, and what the chain says (if it parses).
#[derive(Clone)]
pub struct StoredCert {
    pub info: Option<CertInfo>,
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn stored(secret: Secret) -> StoredCert {
    let mut data = secret.data.unwrap_or_default();
    let chain = data.remove("tls.crt").map(|b| b.0).unwrap_or_default();
    let key = data.remove("tls.key").map(|b| b.0).unwrap_or_default();
    StoredCert {
        info: super::inspect(&chain).ok(),
        chain,
        key,
    }
}

fn tls_secret(
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    cert: &StoredCert,
) -> Secret {
    let mut annotations = BTreeMap::new();
    if let Some(i) = &cert.info {
        annotations.insert(NAMES_ANNOTATION.to_string(), i.names.join(","));
        annotations.insert(SERIAL_ANNOTATION.to_string(), i.serial.clone());
        annotations.insert(NOT_AFTER_ANNOTATION.to_string(), rfc3339(i.not_after));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(cert.chain.clone())),
            ("tls.key".to_string(), ByteString(cert.key.clone())),
        ])),
        ..Secret::default()
    }
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(t: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(t)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The environments' Secrets and the controller's copies.
#[derive(Clone)]
pub struct CertStore {
    client: Client,
    pub namespace: String,
    instance: String,
}

impl CertStore {
    pub fn new(client: &Client, namespace: &str, instance: &str) -> CertStore {
        CertStore {
            client: client.clone(),
            namespace: namespace.to_string(),
            instance: instance.to_string(),
        }
    }

    /// The Secret holding `environment`'s copy.
    fn copy_shard(&self, environment: &str) -> String {
        copy_shard_name(&self.instance, environment)
    }

    fn named(&self, name: String) -> NamedSecret {
        NamedSecret {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            name,
            instance: self.instance.clone(),
        }
    }

    fn order_keys(&self) -> NamedSecret {
        self.named(format!("envctl-{}-order-keys", self.instance))
    }

    /// The private key kept for `environment`'s order `order_url`, if this order has one.
    /// Keys are kept (`keep_order_key`) BEFORE an order is finalized, so a process stopped
    /// between finalizing and storing the certificate loses nothing: the next one downloads
    /// the certificate instead of ordering again.
    pub async fn order_key(
        &self,
        environment: &str,
        order_url: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((mut data, _)) = self.order_keys().read("reading an order's key").await? else {
            return Ok(None);
        };
        let same_order = data
            .get(&format!("{environment}.order"))
            .map(|u| u.0.as_slice())
            == Some(order_url.as_bytes());
        Ok(same_order
            .then(|| data.remove(&format!("{environment}.key")))
            .flatten()
            .map(|k| k.0))
    }

    /// Keeps the private key of `environment`'s order `order_url` (replacing the key of an
    /// earlier order).
    pub async fn keep_order_key(
        &self,
        environment: &str,
        order_url: &str,
        key_pem: &[u8],
    ) -> Result<(), StoreError> {
        self.order_keys()
            .update("keeping an order's key", |data| {
                data.insert(format!("{environment}.key"), ByteString(key_pem.to_vec()));
                data.insert(
                    format!("{environment}.order"),
                    ByteString(order_url.as_bytes().to_vec()),
                );
            })
            .await
    }

    /// Forgets `environment`'s order key once its certificate is stored.
    pub async fn drop_order_key(&self, environment: &str) -> Result<(), StoreError> {
        self.order_keys()
            .update("deleting an order's key", |data| {
                data.remove(&format!("{environment}.key"));
                data.remove(&format!("{environment}.order"));
            })
            .await
    }

    /// An environment's `environment-tls` Secret, if any.
    pub async fn read(&self, namespace: &str) -> Result<Option<StoredCert>, StoreError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(TLS_SECRET)
            .await
            .map(|s| s.map(stored))
            .map_err(|source| StoreError::Kube {
                what: "reading the TLS Secret",
                namespace: namespace.to_string(),
                name: TLS_SECRET.to_string(),
                source,
            })
    }

    /// Whether a namespace exists and is not being deleted (where a Secret can be written).
    pub async fn namespace_ready(&self, namespace: &str) -> bool {
        let api: Api<Namespace> = Api::all(self.client.clone());
        matches!(api.get_opt(namespace).await, Ok(Some(ns)) if ns.metadata.deletion_timestamp.is_none())
    }

    /// The controller's copies of `environments`' certificates, by environment (each shard
    /// they fall in read once).
    pub async fn copies<'a>(
        &self,
        environments: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, StoredCert>, StoreError> {
        let mut wanted: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for env in environments {
            wanted.entry(self.copy_shard(env)).or_default().push(env);
        }
        let mut out = BTreeMap::new();
        for (shard, envs) in wanted {
            let Some((mut data, _)) = self.named(shard).read("reading certificate copies").await?
            else {
                continue;
            };
            for env in envs {
                let chain = data.remove(&format!("{env}.crt"));
                let key = data.remove(&format!("{env}.key"));
                if let (Some(chain), Some(key)) = (chain, key) {
                    let (chain, key) = (chain.0, key.0);
                    let info = super::inspect(&chain).ok();
                    out.insert(env.to_string(), StoredCert { info, chain, key });
                }
            }
        }
        Ok(out)
    }

    /// Writes an environment's Secret (server-side apply, field manager `envctl`).
    pub async fn write(
        &self,
        environment: &str,
        namespace: &str,
        cert: &StoredCert,
    ) -> Result<(), StoreError> {
        let labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), "envctl".to_string()),
            (ENVIRONMENT_LABEL.to_string(), environment.to_string()),
        ]);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        crate::apply::server_side_apply(
            &api,
            TLS_SECRET,
            &tls_secret(TLS_SECRET, namespace, labels, cert),
        )
        .await
        .map_err(|source| StoreError::Kube {
            what: "writing the TLS Secret",
            namespace: namespace.to_string(),
            name: TLS_SECRET.to_string(),
            source,
        })
    }

    /// Writes the controller's copy of an environment's certificate.
    pub async fn write_copy(&self, environment: &str, cert: &StoredCert) -> Result<(), StoreError> {
        self.named(self.copy_shard(environment))
            .update("writing the certificate copy", |data| {
                data.insert(format!("{environment}.crt"), ByteString(cert.chain.clone()));
                data.insert(format!("{environment}.key"), ByteString(cert.key.clone()));
            })
            .await
    }

    /// Notes on the namespace why its certificate failed (`envctl status` shows it; the
    /// next stored certificate or wait replaces the note).
    pub async fn note_failure(&self, namespace: &str, error: &str) -> Result<(), StoreError> {
        let note: String = format!("failed: {error}").chars().take(512).collect();
        let patch = serde_json::json!({"metadata": {"annotations": {
            super::CERTIFICATE_ANNOTATION: note,
        }}});
        let api: Api<Namespace> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match api.patch(namespace, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(StoreError::Kube {
                what: "noting the certificate's failure on the namespace",
                namespace: String::new(),
                name: namespace.to_string(),
                source,
            }),
        }
    }

    /// Sets (or, with `None`, removes) a namespace's certificate wait annotations.
    pub async fn annotate_wait(
        &self,
        namespace: &str,
        wait: Option<(u64, &str)>,
    ) -> Result<(), StoreError> {
        let (until, reason) = match wait {
            Some((at, limit)) => (
                serde_json::Value::String(rfc3339(at as i64)),
                serde_json::Value::String(limit.to_string()),
            ),
            None => (serde_json::Value::Null, serde_json::Value::Null),
        };
        let patch = serde_json::json!({"metadata": {"annotations": {
            super::WAIT_UNTIL_ANNOTATION: until,
            super::WAIT_REASON_ANNOTATION: reason,
            // A directory is configured now: the "no directory" note no longer holds.
            super::CERTIFICATE_ANNOTATION: serde_json::Value::Null,
        }}});
        let api: Api<Namespace> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch(namespace, &pp, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Kube {
                what: "annotating the namespace",
                namespace: String::new(),
                name: namespace.to_string(),
                source,
            })
    }
}

/// The Secret of `instance` that holds `environment`'s certificate copy.
pub fn copy_shard_name(instance: &str, environment: &str) -> String {
    let mut h = crate::render::Fnv64::new();
    h.write(environment.as_bytes());
    format!("envctl-{instance}-certs-{:02x}", h.mixed() % COPY_SHARDS)
}

/// One Secret of the controller's namespace, named in advance, read whole and changed with
/// compare-and-swap (its resourceVersion).
struct NamedSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
    instance: String,
}

impl NamedSecret {
    /// Its data and resourceVersion, `None` when it does not exist.
    async fn read(
        &self,
        what: &'static str,
    ) -> Result<Option<(BTreeMap<String, ByteString>, Option<String>)>, StoreError> {
        let secret = self.api.get_opt(&self.name).await.map_err(kube_err(
            what,
            &self.namespace,
            &self.name,
        ))?;
        Ok(secret.map(|s| {
            let rv = s.resource_version();
            (s.data.unwrap_or_default(), rv)
        }))
    }

    /// Applies `change` to its data and writes it if the Secret did not move meanwhile,
    /// trying again on a fresh copy when it did; writes nothing when `change` changes nothing.
    async fn update(
        &self,
        what: &'static str,
        mut change: impl FnMut(&mut BTreeMap<String, ByteString>),
    ) -> Result<(), StoreError> {
        const TRIES: usize = 30;
        for attempt in 0..TRIES {
            let current = self.read(what).await?;
            let exists = current.is_some();
            let (before, rv) = current.unwrap_or_default();
            let mut data = before.clone();
            change(&mut data);
            if data == before {
                return Ok(());
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    resource_version: rv,
                    labels: Some(BTreeMap::from([
                        (MANAGED_BY_LABEL.to_string(), "envctl".to_string()),
                        (INSTANCE_LABEL.to_string(), self.instance.clone()),
                    ])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Secret::default()
            };
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            let result = if exists {
                self.api.replace(&self.name, &pp, &secret).await
            } else {
                self.api.create(&pp, &secret).await
            };
            match result {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tokio::time::sleep(std::time::Duration::from_millis(
                        10 * (attempt as u64 + 1).min(10),
                    ))
                    .await;
                }
                Err(e) => return Err(kube_err(what, &self.namespace, &self.name)(e)),
            }
        }
        Err(StoreError::Contended {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            tries: TRIES,
        })
    }
}
