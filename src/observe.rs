//! Observe: reads what is live, never changes it. Lists the objects envctl owns (labels
//! `app.kubernetes.io/managed-by=envctl` and its instance) into `Live`, keeps the controller's
//! watch cache of them, and asks the server what a server-side apply would make of a desired
//! object (`dryRun=All`), which persists nothing.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::Value;
use tokio::sync::Notify;

use crate::cluster::{FIELD_MANAGER, api, is_unreachable_or_refused, with_retries};
use crate::health::StatefulSetView;
use crate::render::DesiredObject;
use crate::vocab::ObjectKey;
use crate::vocab::{ENVIRONMENT_LABEL, ObjectKind, owned_selector};

/// One object envctl owns, as the server has it.
#[derive(Debug, Clone)]
pub struct LiveObject {
    pub key: ObjectKey,
    /// The `envctl.materialize.cloud/environment` label.
    pub environment: Option<String>,
    pub object: Value,
}

/// Every live object envctl owns.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub objects: BTreeMap<ObjectKey, LiveObject>,
}

impl Live {
    /// Adds a listed object (list items come without `apiVersion` and `kind`; they are set
    /// from `kind`). `managedFields` and `status`, which no plan reads, are dropped to save
    /// memory.
    pub fn insert(&mut self, kind: ObjectKind, mut object: Value) {
        if let Value::Object(map) = &mut object {
            map.insert("apiVersion".into(), Value::from(kind.api_version()));
            map.insert("kind".into(), Value::from(kind.as_str()));
            map.remove("status");
            if let Some(Value::Object(meta)) = map.get_mut("metadata") {
                meta.remove("managedFields");
            }
        }
        let meta = object.get("metadata");
        let s = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let Some(name) = s("name") else { return };
        let environment = meta
            .and_then(|m| m.pointer(&format!("/labels/{}", ENVIRONMENT_LABEL.replace('/', "~1"))))
            .and_then(Value::as_str)
            .map(str::to_string);
        let key = ObjectKey {
            kind,
            namespace: if kind.namespaced() {
                s("namespace")
            } else {
                None
            },
            name,
        };
        self.objects.insert(
            key.clone(),
            LiveObject {
                key,
                environment,
                object,
            },
        );
    }

    /// Environments that have a live namespace.
    pub fn environments(&self) -> BTreeSet<String> {
        self.objects
            .values()
            .filter(|o| o.key.kind == ObjectKind::Namespace)
            .filter_map(|o| o.environment.clone())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("listing {kind} objects owned by envctl")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("dry-run server-side apply of {key}")]
    DryRun {
        key: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the watches of owned objects did not list within {timeout:?} (still missing: {kinds}); is the API server reachable and are list/watch allowed?"
    )]
    NotReady {
        timeout: std::time::Duration,
        kinds: String,
    },
    #[error("{what} failed: a worker thread panicked (a bug; please report it)")]
    Panicked { what: &'static str },
    #[error("encoding a listed {kind}")]
    Encode {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ObserveError {
    /// The cluster could not be reached or refused envctl's credentials.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ObserveError::List { source, .. } | ObserveError::DryRun { source, .. } => {
                is_unreachable_or_refused(source)
            }
            ObserveError::Encode { .. } => false,
            ObserveError::NotReady { .. } => true,
            ObserveError::Panicked { .. } => false,
        }
    }
}

/// Kinds observed: every kind envctl applies but Secrets (they join with certificates).
pub const OBSERVED_KINDS: &[ObjectKind] = ObjectKind::ALL.split_at(ObjectKind::ALL.len() - 1).0;

async fn list_kind(
    client: &Client,
    kind: ObjectKind,
    selector: &str,
) -> Result<Vec<Value>, ObserveError> {
    let api = api(client, kind, None);
    let mut params = ListParams::default().labels(selector).limit(500);
    let mut out = Vec::new();
    loop {
        let page =
            with_retries(|| api.list(&params))
                .await
                .map_err(|source| ObserveError::List {
                    kind: kind.as_str(),
                    source,
                })?;
        for item in page.items {
            let v = serde_json::to_value(&item).map_err(|source| ObserveError::Encode {
                kind: kind.as_str(),
                source,
            })?;
            out.push(v);
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(out)
}

/// Every object envctl's `instance` owns.
pub async fn list_owned(client: &Client, instance: &str) -> Result<Live, ObserveError> {
    let selector = owned_selector(instance);
    let lists = futures::future::try_join_all(
        OBSERVED_KINDS
            .iter()
            .map(|k| list_kind(client, *k, &selector)),
    )
    .await?;
    let mut live = Live::default();
    for (kind, items) in OBSERVED_KINDS.iter().zip(lists) {
        for item in items {
            live.insert(*kind, item);
        }
    }
    Ok(live)
}

/// What was learned of the namespaces about to be created: the labels of those that exist
/// (ownership is judged from them), and the ones that could not be read, with the error.
#[derive(Debug, Default)]
pub struct NamespaceLookup {
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    pub failed: BTreeMap<String, kube::Error>,
}

/// Reads each of `names` that exists as a namespace. A few are read one by one (a failure is
/// that name's alone); many at once are read with one metadata LIST.
pub async fn namespace_labels(
    client: &Client,
    names: &[&str],
    concurrency: usize,
) -> Result<NamespaceLookup, ObserveError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let mut lookup = NamespaceLookup::default();
    if names.len() > 32 {
        let wanted: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        let lp = kube::api::ListParams::default();
        let list = with_retries(|| api.list_metadata(&lp))
            .await
            .map_err(|source| ObserveError::List {
                kind: "Namespace",
                source,
            })?;
        lookup.labels = list
            .items
            .into_iter()
            .filter_map(|m| {
                let name = m.metadata.name?;
                wanted
                    .contains(name.as_str())
                    .then(|| (name, m.metadata.labels.unwrap_or_default()))
            })
            .collect();
        return Ok(lookup);
    }
    type Found = (
        String,
        Result<Option<BTreeMap<String, String>>, kube::Error>,
    );
    let found: Vec<Found> = stream::iter(names.iter().map(|n| {
        let api = api.clone();
        async move {
            let got = with_retries(|| api.get_metadata_opt(n)).await;
            (
                n.to_string(),
                got.map(|m| m.map(|m| m.metadata.labels.unwrap_or_default())),
            )
        }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect()
    .await;
    for (name, result) in found {
        match result {
            Ok(Some(labels)) => {
                lookup.labels.insert(name, labels);
            }
            Ok(None) => {}
            Err(e) => {
                lookup.failed.insert(name, e);
            }
        }
    }
    Ok(lookup)
}

/// A dry-run that the server refused or did not answer: it fails its environment alone.
#[derive(Debug)]
pub struct DryRunFailure {
    pub environment: String,
    pub key: ObjectKey,
    pub error: kube::Error,
}

/// The server's answer to a dry-run server-side apply of each object, `concurrency` at a
/// time, each retried on transient errors. An object whose dry-run fails is returned among
/// the failures, and every other object still gets its answer.
pub async fn dry_run(
    client: &Client,
    objects: &[&DesiredObject],
    concurrency: usize,
    progress: Option<&crate::vocab::ProgressHandle>,
) -> (BTreeMap<ObjectKey, Value>, Vec<DryRunFailure>) {
    let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
    let results: Vec<Result<(ObjectKey, Value), DryRunFailure>> =
        stream::iter(objects.iter().map(|d| {
            let params = params.clone();
            async move {
                let key = ObjectKey::of(d);
                let api = api(client, d.kind, d.namespace.as_deref());
                let fail = |error| DryRunFailure {
                    environment: d.environment.clone(),
                    key: key.clone(),
                    error,
                };
                let patch = Patch::Apply(&d.object);
                let result = with_retries(|| api.patch(&d.name, &params, &patch)).await;
                if let Some(p) = progress {
                    p.advance(1);
                }
                let result = result.map_err(fail)?;
                let v =
                    serde_json::to_value(&result).map_err(|e| fail(kube::Error::SerdeError(e)))?;
                Ok((key, v))
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut answers = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((k, v)) => {
                answers.insert(k, v);
            }
            Err(f) => failures.push(f),
        }
    }
    failures.sort_by(|a, b| a.key.cmp(&b.key));
    (answers, failures)
}

/// What of an owned object can drift: labels, annotations (but envctl's status ones), and
/// the spec (through `metadata.generation` where the kind has one). Status-only updates, such
/// as the StatefulSet controller's, leave it unchanged.
fn drift_fingerprint(obj: &DynamicObject) -> u64 {
    let mut h = crate::render::Fnv64::new();
    let meta = &obj.metadata;
    if let Some(labels) = &meta.labels {
        h.write(serde_json::to_string(labels).unwrap_or_default().as_bytes());
    }
    if let Some(annotations) = &meta.annotations {
        for (k, v) in annotations {
            if !crate::vocab::STATUS_ANNOTATIONS.contains(&k.as_str()) {
                h.write(k.as_bytes());
                h.write(v.as_bytes());
            }
        }
    }
    match meta.generation {
        Some(g) => h.write(&g.to_le_bytes()),
        None => h.write(
            obj.data
                .get("spec")
                .map(|s| s.to_string())
                .unwrap_or_default()
                .as_bytes(),
        ),
    }
    h.write(&[u8::from(meta.deletion_timestamp.is_some())]);
    h.finish()
}

/// The union of the fields envctl's field manager owns in an object (fieldsV1 trees).
fn envctl_fields(
    managed: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry]>,
) -> Option<serde_json::Value> {
    let mut union: Option<serde_json::Value> = None;
    for entry in managed?
        .iter()
        .filter(|e| e.manager.as_deref() == Some(crate::cluster::FIELD_MANAGER))
    {
        if let Some(f) = &entry.fields_v1 {
            match &mut union {
                None => union = Some(f.0.clone()),
                Some(u) => merge_fields(u, &f.0),
            }
        }
    }
    union
}

fn merge_fields(into: &mut serde_json::Value, from: &serde_json::Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            match a.get_mut(k) {
                Some(existing) => merge_fields(existing, v),
                None => {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// Keeps only the parts of `value` that a fieldsV1 tree names (`f:` fields, `k:` keyed list
/// items, `v:` set values, `i:` indexes); an empty tree (or one holding only `.`) keeps the
/// whole value. The cache holds what envctl owns, not the server's defaults: the plan only
/// ever compares desired fields, and an object it cannot prove unchanged from what is left
/// gets a server-side dry-run, so dropping fields can cost a request but never hide a change.
pub fn prune_to_fields(value: &mut serde_json::Value, fields: &serde_json::Value) {
    use serde_json::Value;
    let Some(tree) = fields.as_object() else {
        return;
    };
    if tree.keys().all(|k| k == ".") {
        return;
    }
    match value {
        Value::Object(m) => m.retain(|k, child| match tree.get(&format!("f:{k}")) {
            Some(sub) => {
                prune_to_fields(child, sub);
                true
            }
            None => false,
        }),
        Value::Array(items) => {
            let mut keep = vec![false; items.len()];
            for (key, sub) in tree {
                if let Some(k) = key.strip_prefix("k:") {
                    let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(k) else {
                        // Unreadable key: keep everything rather than guess.
                        return;
                    };
                    for (i, item) in items.iter_mut().enumerate() {
                        if wanted.iter().all(|(f, v)| item.get(f) == Some(v)) {
                            keep[i] = true;
                            prune_to_fields(item, sub);
                        }
                    }
                } else if let Some(v) = key.strip_prefix("v:") {
                    let Ok(wanted) = serde_json::from_str::<Value>(v) else {
                        return;
                    };
                    for (i, item) in items.iter().enumerate() {
                        if *item == wanted {
                            keep[i] = true;
                        }
                    }
                } else if let Some(n) = key.strip_prefix("i:").and_then(|n| n.parse::<usize>().ok())
                    && n < items.len()
                {
                    keep[n] = true;
                    prune_to_fields(&mut items[n], sub);
                }
            }
            let mut i = 0;
            items.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        _ => {}
    }
}

/// One cached object: what can drift (a change wakes a drift pass), its compact JSON, and a
/// digest of that JSON with its kind and key (what a pass reads of it).
struct Cached {
    fingerprint: u64,
    text: Box<str>,
    digest: u64,
}

/// (namespace, name) -> the object.
type Objects = std::collections::HashMap<(String, String), Cached>;

/// One kind's cached objects.
#[derive(Default)]
struct KindStore {
    objects: Objects,
}

/// A watch-fed cache of every owned object, so a controller pass needs no LIST. Objects are
/// kept as compact JSON of only what the plan reads (status, managedFields and the fields
/// envctl does not own dropped), and parsed when a pass asks for them: a parsed tree is
/// several times larger than its text. A change to what can drift wakes `drift`.
pub struct Cache {
    stores: Vec<(ObjectKind, Arc<std::sync::RwLock<KindStore>>)>,
    ready: Vec<tokio::sync::watch::Receiver<bool>>,
}

/// The namespace an object belongs to: a Namespace's own name, else its namespace.
fn home(kind: ObjectKind, key: &(String, String)) -> &str {
    if kind == ObjectKind::Namespace {
        &key.1
    } else {
        &key.0
    }
}

/// Digests of the objects of each namespace (the namespace itself included): equal digests,
/// equal objects as a pass reads them. Order-free, so it is the same however the objects
/// were listed.
pub type NamespaceDigests = std::collections::HashMap<String, u64>;

/// What the cache keeps of a watched object.
fn compact(kind: ObjectKind, mut o: DynamicObject) -> Option<((String, String), Cached)> {
    let managed = o.metadata.managed_fields.take();
    if let Some(m) = o.data.as_object_mut() {
        m.remove("status");
    }
    if let Some(fields) = envctl_fields(managed.as_deref()) {
        prune_to_fields(&mut o.data, &fields);
    }
    let key = (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone()?,
    );
    let fingerprint = drift_fingerprint(&o);
    // What changes on every write, status ones included, and no plan reads (the drift
    // fingerprint has the generation): without them, an object's text and digest stay the
    // same until something envctl compares moves.
    o.metadata.resource_version = None;
    o.metadata.generation = None;
    o.metadata.creation_timestamp = None;
    o.metadata.self_link = None;
    let text = serde_json::to_string(&o).ok()?;
    let mut h = crate::vocab::Fnv64::new();
    for part in [kind.as_str(), &key.0, &key.1, &text] {
        h.write(part.as_bytes());
        h.write(&[0]);
    }
    let cached = Cached {
        fingerprint,
        text: text.into_boxed_str(),
        digest: h.mixed(),
    };
    Some((key, cached))
}

impl Cache {
    /// Starts one watch per owned kind.
    pub fn start(
        client: &Client,
        instance: &str,
        drift: Arc<Notify>,
        watch_errors: prometheus_client::metrics::family::Family<
            crate::metrics::KindLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Cache {
        let mut stores = Vec::new();
        let mut ready = Vec::new();
        for &kind in OBSERVED_KINDS {
            let api = api(client, kind, None);
            let store = Arc::new(std::sync::RwLock::new(KindStore::default()));
            stores.push((kind, store.clone()));
            let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
            ready.push(ready_rx);
            let config = watcher::Config::default().labels(&owned_selector(instance));
            let drift = drift.clone();
            let watch_errors = watch_errors.clone();
            // A broken watch is re-established with exponential backoff.
            let mut events = watcher(api, config).default_backoff().boxed();
            tokio::spawn(async move {
                // A (re)list is gathered apart and swapped in whole when it is complete.
                let mut relist: Option<Objects> = None;
                while let Some(event) = events.next().await {
                    let mut moved = false;
                    match event {
                        Ok(watcher::Event::Init) => relist = Some(Default::default()),
                        Ok(watcher::Event::InitApply(obj)) => {
                            if let (Some(r), Some((k, c))) = (relist.as_mut(), compact(kind, obj)) {
                                r.insert(k, c);
                            }
                        }
                        Ok(watcher::Event::InitDone) => {
                            if let Some(new) = relist.take() {
                                let mut st = store.write().unwrap_or_else(|e| e.into_inner());
                                moved = st.objects.len() != new.len()
                                    || new.iter().any(|(k, c)| {
                                        st.objects
                                            .get(k)
                                            .is_none_or(|old| old.fingerprint != c.fingerprint)
                                    });
                                st.objects = new;
                            }
                            let first = !*ready_tx.borrow();
                            ready_tx.send_replace(true);
                            if first {
                                moved = false;
                            }
                        }
                        Ok(watcher::Event::Apply(obj)) => {
                            if let Some((k, c)) = compact(kind, obj) {
                                let mut st = store.write().unwrap_or_else(|e| e.into_inner());
                                moved = st
                                    .objects
                                    .get(&k)
                                    .is_some_and(|old| old.fingerprint != c.fingerprint);
                                st.objects.insert(k, c);
                            }
                        }
                        Ok(watcher::Event::Delete(obj)) => {
                            let key = (
                                obj.metadata.namespace.clone().unwrap_or_default(),
                                obj.metadata.name.clone().unwrap_or_default(),
                            );
                            store
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .objects
                                .remove(&key);
                            moved = true;
                        }
                        Err(e) => {
                            watch_errors
                                .get_or_create(&crate::metrics::KindLabels { kind })
                                .inc();
                            tracing::warn!(kind = kind.as_str(), error = %e, "the watch of owned objects broke; it resumes with backoff")
                        }
                    }
                    if moved {
                        drift.notify_one();
                    }
                }
            });
        }
        Cache { stores, ready }
    }

    /// Waits until every watch has listed once.
    /// Waits until every watch has listed once, at most `timeout`; the error names the
    /// kinds still missing.
    pub async fn ready(&self, timeout: std::time::Duration) -> Result<(), ObserveError> {
        let all = async {
            for r in &self.ready {
                let mut r = r.clone();
                let _ = r.wait_for(|ready| *ready).await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_ok() {
            return Ok(());
        }
        let missing: Vec<&'static str> = self
            .stores
            .iter()
            .zip(&self.ready)
            .filter(|(_, r)| !*r.borrow())
            .map(|((k, _), _)| k.as_str())
            .collect();
        Err(ObserveError::NotReady {
            timeout,
            kinds: missing.join(", "),
        })
    }

    /// The annotations of every owned namespace, by namespace name (parses only those).
    pub fn namespace_annotations(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (kind, store) in &self.stores {
            if *kind != ObjectKind::Namespace {
                continue;
            }
            let st = store.read().unwrap_or_else(|e| e.into_inner());
            for ((_, name), cached) in &st.objects {
                let annotations = serde_json::from_str::<Value>(&cached.text)
                    .ok()
                    .and_then(|v| {
                        v.pointer("/metadata/annotations")
                            .and_then(Value::as_object)
                            .map(|m| {
                                m.iter()
                                    .filter_map(|(k, v)| {
                                        v.as_str().map(|s| (k.clone(), s.to_string()))
                                    })
                                    .collect::<BTreeMap<String, String>>()
                            })
                    })
                    .unwrap_or_default();
                out.insert(name.clone(), annotations);
            }
        }
        out
    }

    /// The digests of every namespace's cached objects.
    pub fn digests(&self) -> NamespaceDigests {
        let mut out = NamespaceDigests::new();
        for (kind, store) in &self.stores {
            let st = store.read().unwrap_or_else(|e| e.into_inner());
            for (key, cached) in &st.objects {
                let d = out.entry(home(*kind, key).to_string()).or_default();
                *d = d.wrapping_add(cached.digest);
            }
        }
        out
    }

    /// Every Namespace, and the namespaced objects whose namespace `keep` accepts (the
    /// objects of environments no longer in the source), as `Live`.
    pub fn live_where(&self, keep: impl Fn(&str) -> bool) -> Result<Live, ObserveError> {
        Ok(self
            .read(|kind, ns| kind == ObjectKind::Namespace || keep(ns))?
            .0)
    }

    /// The objects of `namespaces` (each Namespace and what is in it) as `Live`, with their
    /// digests as read.
    pub fn live_of(
        &self,
        namespaces: &std::collections::HashSet<String>,
    ) -> Result<(Live, NamespaceDigests), ObserveError> {
        self.read(|_, ns| namespaces.contains(ns))
    }

    /// The cached objects that `keep(kind, namespace)` accepts, parsed on every core (a pass
    /// with little to do is mostly this parse), with the digests of what was read.
    fn read(
        &self,
        keep: impl Fn(ObjectKind, &str) -> bool,
    ) -> Result<(Live, NamespaceDigests), ObserveError> {
        let mut digests = NamespaceDigests::new();
        let mut texts: Vec<(ObjectKind, Box<str>)> = Vec::new();
        for (kind, store) in &self.stores {
            let st = store.read().unwrap_or_else(|e| e.into_inner());
            for (key, cached) in &st.objects {
                let ns = home(*kind, key);
                if keep(*kind, ns) {
                    let d = digests.entry(ns.to_string()).or_default();
                    *d = d.wrapping_add(cached.digest);
                    texts.push((*kind, cached.text.clone()));
                }
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = texts.len().div_ceil(threads).max(256);
        let parsed: Vec<Vec<(ObjectKind, Value)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = texts
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .filter_map(|(k, t)| {
                                serde_json::from_str::<Value>(t).ok().map(|v| (*k, v))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok())
                .collect::<Option<Vec<_>>>()
        })
        .ok_or(ObserveError::Panicked {
            what: "parsing the watch cache",
        })?;
        let mut live = Live::default();
        for (kind, v) in parsed.into_iter().flatten() {
            live.insert(kind, v);
        }
        Ok((live, digests))
    }
}

/// Groups StatefulSets, pods and namespaces (each StatefulSet and namespace with its
/// environment; a namespace with its `applied-at`) by environment into health inputs. Every
/// environment with a namespace gets an entry (an environment without StatefulSets is
/// `Unknown`).
pub fn group_for_health(
    stateful_sets: impl IntoIterator<Item = (String, Arc<StatefulSetView>)>,
    pods: impl IntoIterator<Item = Arc<Pod>>,
    namespaces: impl IntoIterator<Item = (String, Option<Timestamp>)>,
) -> BTreeMap<String, crate::health::Observed> {
    let mut out: BTreeMap<String, crate::health::Observed> = BTreeMap::new();
    for (env, applied_at) in namespaces {
        out.entry(env).or_default().applied_at = applied_at;
    }
    for (env, sts) in stateful_sets {
        out.entry(env).or_default().stateful_sets.push(sts);
    }
    for pod in pods {
        if let Some(env) = environment_of(&pod.metadata) {
            out.entry(env).or_default().pods.push(pod);
        }
    }
    out
}

fn environment_of(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.labels.as_ref()?.get(ENVIRONMENT_LABEL).cloned()
}

/// A namespace's `applied-at` annotation (when envctl last applied a change to it).
fn applied_at(ns: &Namespace) -> Option<Timestamp> {
    ns.metadata
        .annotations
        .as_ref()?
        .get(crate::vocab::APPLIED_AT_ANNOTATION)?
        .parse()
        .ok()
}

async fn list_typed<K>(
    client: &Client,
    selector: &str,
    kind: &'static str,
) -> Result<Vec<K>, ObserveError>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: kube::Api<K> = kube::Api::all(client.clone());
    list_pages(&api, selector, kind).await
}

async fn list_pages<K>(
    api: &kube::Api<K>,
    selector: &str,
    kind: &'static str,
) -> Result<Vec<K>, ObserveError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().labels(selector).limit(500);
    let mut out = Vec::new();
    loop {
        let page = with_retries(|| api.list(&params))
            .await
            .map_err(|source| ObserveError::List { kind, source })?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(out)
}

/// Reads what health is judged from, once: the instance's StatefulSets, pods and namespaces.
pub async fn read_health_inputs(
    client: &Client,
    instance: &str,
) -> Result<BTreeMap<String, crate::health::Observed>, ObserveError> {
    let selector = owned_selector(instance);
    let sts_api: kube::Api<StatefulSet> = kube::Api::all(client.clone());
    let pod_api: kube::Api<Pod> = kube::Api::all(client.clone());
    let (stateful_sets, pods, namespaces) = futures::try_join!(
        list_pages(&sts_api, &selector, "StatefulSet"),
        list_pages(&pod_api, &selector, "Pod"),
        list_typed::<Namespace>(client, &selector, "Namespace"),
    )?;
    Ok(group_for_health(
        stateful_sets.iter().filter_map(|s| {
            Some((
                environment_of(&s.metadata)?,
                Arc::new(StatefulSetView::from(s)),
            ))
        }),
        pods.into_iter().map(Arc::new),
        namespaces
            .iter()
            .filter_map(|n| Some((environment_of(&n.metadata)?, applied_at(n)))),
    ))
}

/// Watches of what health is judged from (StatefulSets with their status, pods, namespaces),
/// for the controller: it reads them on every change, with no polling per environment.
pub struct HealthWatch {
    stateful_sets: Projection<StatefulSetView>,
    pods: reflector::Store<Pod>,
    namespaces: Projection<Option<Timestamp>>,
}

/// (namespace, name) -> (environment, projection).
type Entries<V> = std::collections::HashMap<(String, String), (String, Arc<V>)>;

/// A watch-fed map of a small projection `V` of each object, with the object's environment
/// (objects without the environment label are left out).
struct Projection<V> {
    items: Arc<std::sync::RwLock<Entries<V>>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<V> Projection<V> {
    fn start<K>(
        api: kube::Api<K>,
        selector: &str,
        changed: Arc<Notify>,
        kind: &'static str,
        view: fn(&K) -> V,
    ) -> Projection<V>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        V: Send + Sync + 'static,
    {
        let items: Arc<std::sync::RwLock<Entries<V>>> = Arc::default();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let config = watcher::Config::default().labels(selector);
        let mut events = watcher(api, config).default_backoff().boxed();
        let store = items.clone();
        tokio::spawn(async move {
            let entry = |o: &K| {
                let meta = o.meta();
                let key = (
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone()?,
                );
                Some((key, (environment_of(meta)?, Arc::new(view(o)))))
            };
            let key = |o: &K| {
                let meta = o.meta();
                (
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                )
            };
            // A (re)list is gathered apart and swapped in whole when it is complete.
            let mut relist: Option<Entries<V>> = None;
            while let Some(event) = events.next().await {
                let write = || store.write().unwrap_or_else(|e| e.into_inner());
                match event {
                    Ok(watcher::Event::Init) => relist = Some(Entries::default()),
                    Ok(watcher::Event::InitApply(o)) => {
                        if let (Some(r), Some((k, v))) = (relist.as_mut(), entry(&o)) {
                            r.insert(k, v);
                        }
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(new) = relist.take() {
                            *write() = new;
                        }
                        ready_tx.send_replace(true);
                    }
                    Ok(watcher::Event::Apply(o)) => match entry(&o) {
                        Some((k, v)) => {
                            write().insert(k, v);
                        }
                        None => {
                            write().remove(&key(&o));
                        }
                    },
                    Ok(watcher::Event::Delete(o)) => {
                        write().remove(&key(&o));
                    }
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "the health watch broke; it resumes with backoff");
                        continue;
                    }
                }
                changed.notify_one();
            }
        });
        Projection { items, ready }
    }

    async fn wait_until_ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|ready| *ready).await;
    }

    /// Every object's environment and projection.
    fn entries(&self) -> Vec<(String, Arc<V>)> {
        self.items
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Keeps a store of pods without what health never reads: managedFields (most of a listed
/// object's size), the spec, and every label but the environment's and every annotation.
fn reflect_pods(
    api: kube::Api<Pod>,
    selector: &str,
    changed: Arc<Notify>,
) -> reflector::Store<Pod> {
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(selector);
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|p: &mut Pod| {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            if let Some(labels) = p.metadata.labels.as_mut() {
                labels.retain(|k, _| k == ENVIRONMENT_LABEL);
            }
            p.spec = None;
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(kind = "Pod", error = %e, "the health watch broke; it resumes with backoff")
                }
            }
        }
    });
    reader
}

impl HealthWatch {
    /// Starts the watches; `changed` is notified on every event.
    pub fn start(client: &Client, instance: &str, changed: Arc<Notify>) -> HealthWatch {
        let selector = owned_selector(instance);
        HealthWatch {
            stateful_sets: Projection::start(
                kube::Api::all(client.clone()),
                &selector,
                changed.clone(),
                "StatefulSet",
                |s: &StatefulSet| StatefulSetView::from(s),
            ),
            pods: reflect_pods(kube::Api::all(client.clone()), &selector, changed.clone()),
            namespaces: Projection::start(
                kube::Api::all(client.clone()),
                &selector,
                changed,
                "Namespace",
                applied_at,
            ),
        }
    }

    /// Waits until every watch has listed once, at most `timeout`.
    pub async fn ready(&self, timeout: std::time::Duration) -> Result<(), ObserveError> {
        let all = async {
            self.stateful_sets.wait_until_ready().await;
            let _ = self.pods.wait_until_ready().await;
            self.namespaces.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| ObserveError::NotReady {
                timeout,
                kinds: "StatefulSet, Pod, Namespace (health)".into(),
            })
    }

    /// The health inputs as the watches have them now.
    pub fn observed(&self) -> BTreeMap<String, crate::health::Observed> {
        group_for_health(
            self.stateful_sets.entries(),
            self.pods.state(),
            self.namespaces
                .entries()
                .into_iter()
                .map(|(env, at)| (env, *at)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::prune_to_fields;
    use serde_json::json;

    #[test]
    fn pruning_keeps_what_envctl_owns_and_drops_server_defaults() {
        let mut live = json!({
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 10,
                "podManagementPolicy": "OrderedReady",
                "template": {"spec": {
                    "dnsPolicy": "ClusterFirst",
                    "containers": [
                        {"name": "clusterd", "image": "c:1", "imagePullPolicy": "IfNotPresent",
                         "ports": [{"containerPort": 2100, "protocol": "TCP", "name": "compute"}]},
                        {"name": "sidecar", "image": "s:1"}
                    ]
                }}
            }
        });
        let fields = json!({
            "f:spec": {
                "f:replicas": {},
                "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"clusterd\"}": {
                        ".": {}, "f:name": {}, "f:image": {},
                        "f:ports": {"k:{\"containerPort\":2100,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:protocol": {}, "f:name": {}}}
                    }
                }}}
            }
        });
        prune_to_fields(&mut live, &fields);
        assert_eq!(
            live,
            json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "clusterd", "image": "c:1",
                 "ports": [{"containerPort": 2100, "protocol": "TCP", "name": "compute"}]}
            ]}}}})
        );
        // A field another manager took over (kubectl scale) is gone, so the plan cannot
        // call the object unchanged from the cache and asks the server.
        let mut scaled = json!({"spec": {"replicas": 7}});
        prune_to_fields(&mut scaled, &json!({"f:spec": {"f:template": {}}}));
        assert_eq!(scaled, json!({"spec": {}}));
    }
}
