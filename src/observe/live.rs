//! The folder's vocabulary: `Live` (the owned objects as the server has them, as the plan
//! reads them), the kinds observed, and `ObserveError`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::cluster::is_unreachable_or_refused;
use crate::vocab::{ENVIRONMENT_LABEL, ObjectKey, ObjectKind, REGION_ANNOTATION};

/// One object envctl owns, as the server has it.
#[derive(Debug, Clone)]
pub struct LiveObject {
    pub key: ObjectKey,
    /// The `envctl.materialize.cloud/environment` label.
    pub environment: Option<String>,
    pub object: Value,
}

impl LiveObject {
    /// A listed object (list items come without `apiVersion` and `kind`; they are set from
    /// `kind`). `managedFields` and `status`, which no plan reads, are dropped to save
    /// memory. `None` for an object without a name.
    pub fn listed(kind: ObjectKind, mut object: Value) -> Option<LiveObject> {
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
        let name = s("name")?;
        let environment = meta
            .and_then(|m| m.get("labels")?.get(ENVIRONMENT_LABEL))
            .and_then(Value::as_str)
            .map(str::to_string);
        let namespace = if kind.namespaced() {
            s("namespace")
        } else {
            None
        };
        Some(LiveObject {
            key: ObjectKey {
                kind,
                namespace,
                name,
            },
            environment,
            object,
        })
    }
}

/// Every live object envctl owns.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub objects: BTreeMap<ObjectKey, LiveObject>,
}

impl Live {
    /// Adds a listed object (see `LiveObject::listed`).
    pub fn insert(&mut self, kind: ObjectKind, object: Value) {
        if let Some(o) = LiveObject::listed(kind, object) {
            self.add(o);
        }
    }

    /// Adds an object.
    pub fn add(&mut self, o: LiveObject) {
        self.objects.insert(o.key.clone(), o);
    }

    /// Environments that have a live namespace.
    pub fn environments(&self) -> BTreeSet<String> {
        self.objects
            .values()
            .filter(|o| o.key.kind == ObjectKind::Namespace)
            .filter_map(|o| o.environment.clone())
            .collect()
    }

    /// Environments whose live namespace names a region outside `regions` (or none, as
    /// namespaces written before regions were recorded): another region's.
    pub fn environments_outside(&self, regions: &BTreeSet<String>) -> BTreeSet<String> {
        self.objects
            .values()
            .filter(|o| o.key.kind == ObjectKind::Namespace)
            .filter(|o| {
                o.object
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(REGION_ANNOTATION))
                    .and_then(Value::as_str)
                    .is_none_or(|r| !regions.contains(r))
            })
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

/// Kinds observed: every kind whose `ObjectKind::watched` says so.
pub const OBSERVED_KINDS: &[ObjectKind] = &ObjectKind::WATCHED;
