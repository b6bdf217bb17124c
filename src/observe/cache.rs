//! The controller's watch cache of every owned object (one watched map per kind), so a pass
//! needs no LIST: compact JSON of what the plan reads, digests per namespace, and a drift
//! signal when what can drift moves. A pass reads it through one `Snapshot`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kube::Client;
use kube::api::DynamicObject;
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::Notify;

use super::dry_run::{envctl_fields, prune_to_fields};
use super::live::{Live, LiveObject, OBSERVED_KINDS, ObserveError};
use super::watched::{Key, Rules, Watched};
use crate::cluster::api;
use crate::vocab::{ObjectKind, owned_selector};

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

/// One cached object: what can drift (a change wakes a drift pass), its compact JSON, and a
/// digest of that JSON with its kind and key (what a pass reads of it).
struct Cached {
    fingerprint: u64,
    /// Shared with pass snapshots, which hold it without copying.
    text: Arc<str>,
    digest: u64,
}

/// A watch-fed cache of every owned object, so a controller pass needs no LIST. Objects are
/// kept as compact JSON of only what the plan reads (status, managedFields and the fields
/// envctl does not own dropped), and parsed when a pass asks for them: a parsed tree is
/// several times larger than its text. A change to what can drift wakes `drift`.
pub struct Cache {
    stores: Vec<(ObjectKind, Watched<Cached>)>,
}

/// The namespace an object belongs to: a Namespace's own name, else its namespace.
fn home(kind: ObjectKind, key: &Key) -> &str {
    if kind == ObjectKind::Namespace {
        &key.1
    } else {
        &key.0
    }
}

/// Digests of the objects of each namespace (the namespace itself included): equal digests,
/// equal objects as a pass reads them. Order-free, so it is the same however the objects
/// were listed.
pub type NamespaceDigests = HashMap<String, u64>;

/// What the cache keeps of a watched object.
fn compact(kind: ObjectKind, mut o: DynamicObject) -> Option<Cached> {
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
    Some(Cached {
        fingerprint,
        text: text.into(),
        digest: h.mixed(),
    })
}

/// A change of what can drift wakes a drift pass; a new object (envctl's own create) and
/// the first list do not.
const DRIFT: Rules<Cached> = Rules {
    differ: |a, b| a.fingerprint != b.fingerprint,
    wake_on_new: false,
    wake_on_first_list: false,
};

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
        let stores = OBSERVED_KINDS
            .iter()
            .map(|&kind| {
                let config = watcher::Config::default().labels(&owned_selector(instance));
                let watch_errors = watch_errors.clone();
                let broke = move |e: &watcher::Error| {
                    watch_errors
                        .get_or_create(&crate::metrics::KindLabels { kind })
                        .inc();
                    tracing::warn!(kind = kind.as_str(), error = %e, "the watch of owned objects broke; it resumes with backoff")
                };
                let watched = Watched::start(
                    api(client, kind, None),
                    config,
                    move |o| compact(kind, o),
                    DRIFT,
                    drift.clone(),
                    broke,
                );
                (kind, watched)
            })
            .collect();
        Cache { stores }
    }

    /// Waits until every watch has listed once, at most `timeout`; the error names the
    /// kinds still missing.
    pub async fn ready(&self, timeout: std::time::Duration) -> Result<(), ObserveError> {
        let all = async {
            for (_, w) in &self.stores {
                w.wait_ready().await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_ok() {
            return Ok(());
        }
        let missing: Vec<&'static str> = self
            .stores
            .iter()
            .filter(|(_, w)| !w.is_ready())
            .map(|(k, _)| k.as_str())
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
            for ((_, name), cached) in store.read().iter() {
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

    /// The cached objects as they are now, grouped by the namespace they belong to (a
    /// Namespace with what is in it). Texts are shared, not copied: one walk of the cache,
    /// however many parts a pass reads.
    pub fn snapshot(&self) -> Snapshot {
        let mut by_namespace: HashMap<String, Vec<Entry>> = HashMap::new();
        for (kind, store) in &self.stores {
            for (key, cached) in store.read().iter() {
                let ns = home(*kind, key);
                let entry = Entry {
                    kind: *kind,
                    text: cached.text.clone(),
                    digest: cached.digest,
                };
                match by_namespace.get_mut(ns) {
                    Some(v) => v.push(entry),
                    None => {
                        by_namespace.insert(ns.to_string(), vec![entry]);
                    }
                }
            }
        }
        Snapshot { by_namespace }
    }
}

/// One cached object in a snapshot.
struct Entry {
    kind: ObjectKind,
    text: Arc<str>,
    digest: u64,
}

/// The watch cache at one moment (`Cache::snapshot`), by namespace: what one pass plans
/// against, parsed a part at a time.
pub struct Snapshot {
    by_namespace: HashMap<String, Vec<Entry>>,
}

impl Snapshot {
    /// The digests of every namespace's cached objects.
    pub fn digests(&self) -> NamespaceDigests {
        self.by_namespace
            .iter()
            .map(|(ns, entries)| (ns.clone(), digest_of(entries)))
            .collect()
    }

    /// Every Namespace, and the namespaced objects whose namespace `keep` accepts (the
    /// objects of environments no longer in the source), as `Live`.
    pub fn live_where(&self, keep: impl Fn(&str) -> bool) -> Result<Live, ObserveError> {
        let mut texts: Vec<(ObjectKind, &str)> = Vec::new();
        for (ns, entries) in &self.by_namespace {
            let all = keep(ns);
            texts.extend(
                entries
                    .iter()
                    .filter(|e| all || e.kind == ObjectKind::Namespace)
                    .map(|e| (e.kind, &*e.text)),
            );
        }
        parse(&texts)
    }

    /// The objects of `namespaces` (each Namespace and what is in it) as `Live`, with their
    /// digests.
    pub fn live_of<'a>(
        &self,
        namespaces: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Live, NamespaceDigests), ObserveError> {
        let mut digests = NamespaceDigests::new();
        let mut texts: Vec<(ObjectKind, &str)> = Vec::new();
        for ns in namespaces {
            let Some(entries) = self.by_namespace.get(ns) else {
                continue;
            };
            digests.insert(ns.to_string(), digest_of(entries));
            texts.extend(entries.iter().map(|e| (e.kind, &*e.text)));
        }
        Ok((parse(&texts)?, digests))
    }
}

/// A namespace's digest: order-free, the same however its objects were listed.
fn digest_of(entries: &[Entry]) -> u64 {
    entries.iter().fold(0, |d, e| d.wrapping_add(e.digest))
}

/// Parses cached texts into `Live` on every core (a pass with little to do is mostly this).
fn parse(texts: &[(ObjectKind, &str)]) -> Result<Live, ObserveError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = texts.len().div_ceil(threads).max(256);
    let parsed: Vec<Vec<LiveObject>> = std::thread::scope(|scope| {
        let handles: Vec<_> = texts
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|(k, t)| {
                            LiveObject::listed(*k, serde_json::from_str::<Value>(t).ok()?)
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
    for o in parsed.into_iter().flatten() {
        live.add(o);
    }
    Ok(live)
}
