//! Plan: the pure comparison of desired objects with live ones. Decides, for every object,
//! create / update / delete / unchanged, applies the prune guards, and renders the diff.
//!
//! No I/O and no clock: `observe` supplies the live objects and the server's dry-run answers,
//! `apply` executes the result exactly. Secret data never reaches a diff.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;
use serde_json::Value;

pub use crate::observe::{Live, LiveObject};
use crate::render::{DesiredObject, HASH_ANNOTATION, PROTECT_ANNOTATION};
pub use crate::vocab::ObjectKey;
use crate::vocab::ObjectKind;

impl ObjectKey {
    pub fn of(d: &DesiredObject) -> ObjectKey {
        ObjectKey {
            kind: d.kind,
            namespace: d.namespace.clone(),
            name: d.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    /// Delete the live object (guarded by its uid), then create the desired one: for fields
    /// the server never lets change (a RoleBinding's `roleRef`).
    Replace,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Delete => "delete",
        }
    }
}

/// Whether `desired` changes a field that the server refuses to update in place, so the
/// object must be replaced (a RoleBinding's `roleRef` is immutable).
fn needs_replace(kind: ObjectKind, desired: &Value, live: &Value) -> bool {
    kind == ObjectKind::RoleBinding && desired.get("roleRef") != live.get("roleRef")
}

fn live_uid(live: &Value) -> Option<String> {
    live.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub action: Action,
    #[serde(flatten)]
    pub key: ObjectKey,
    pub environment: String,
    /// Unified diff of the normalised objects (Secret data masked).
    pub diff: String,
    /// What `apply` sends (create and update).
    #[serde(skip)]
    pub object: Option<Value>,
    /// The live object's uid: a delete only removes the object the plan saw.
    #[serde(skip)]
    pub uid: Option<String>,
}

/// A deletion the guards refused.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    #[serde(flatten)]
    pub key: ObjectKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub delete: usize,
    pub unchanged: usize,
    pub held: usize,
    pub orphaned: usize,
    pub refused: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub summary: Summary,
    /// Creates and updates in apply order, then deletes in reverse order.
    pub changes: Vec<Change>,
    pub held: Vec<Held>,
    /// Owned objects no longer desired, left alone because pruning is off.
    pub orphaned: Vec<ObjectKey>,
    /// Environments not planned at all (their namespace is another's).
    pub refused: Vec<EnvironmentError>,
    /// Environments not planned because the server refused or did not answer a read or
    /// dry-run of theirs; every other environment is planned as usual.
    pub failed: Vec<EnvironmentError>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Joins the plans of disjoint sets of environments into one: creates and updates in
    /// their order, then every delete in reverse apply order.
    pub fn join(parts: Vec<Plan>) -> Plan {
        let mut plan = Plan::default();
        let mut deletes = Vec::new();
        for part in parts {
            let (d, other): (Vec<Change>, Vec<Change>) = part
                .changes
                .into_iter()
                .partition(|c| c.action == Action::Delete);
            plan.changes.extend(other);
            deletes.extend(d);
            plan.held.extend(part.held);
            plan.orphaned.extend(part.orphaned);
            plan.refused.extend(part.refused);
            plan.failed.extend(part.failed);
            plan.summary.unchanged += part.summary.unchanged;
        }
        deletes.sort_by(delete_order);
        plan.changes.extend(deletes);
        plan.count();
        plan
    }

    /// Every environment name and every namespace that this plan changes, holds back,
    /// refuses or failed to plan: an environment in neither is in sync.
    pub fn touched(&self) -> HashSet<String> {
        let home = |k: &ObjectKey| match k.kind {
            ObjectKind::Namespace => Some(k.name.clone()),
            _ => k.namespace.clone(),
        };
        let mut out = HashSet::new();
        for c in &self.changes {
            out.insert(c.environment.clone());
            out.extend(home(&c.key));
        }
        for h in &self.held {
            out.extend(h.environment.clone());
            out.extend(home(&h.key));
        }
        out.extend(self.orphaned.iter().filter_map(home));
        out.extend(self.refused.iter().map(|r| r.environment.clone()));
        out.extend(self.failed.iter().map(|r| r.environment.clone()));
        out
    }

    /// Sets the summary's counts (all but `unchanged`) from the lists.
    fn count(&mut self) {
        let mut summary = Summary {
            unchanged: self.summary.unchanged,
            ..Summary::default()
        };
        for c in &self.changes {
            match c.action {
                Action::Create => summary.create += 1,
                Action::Update | Action::Replace => summary.update += 1,
                Action::Delete => summary.delete += 1,
            }
        }
        summary.held = self.held.len();
        summary.orphaned = self.orphaned.len();
        summary.refused = self.refused.len();
        summary.failed = self.failed.len();
        self.summary = summary;
    }
}

/// Deletes go in reverse apply order: StatefulSets before Services ... Namespaces last.
fn delete_order(a: &Change, b: &Change) -> std::cmp::Ordering {
    b.key.kind.cmp(&a.key.kind).then_with(|| a.key.cmp(&b.key))
}

/// `--max-prune`: how many environments one revision may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxPrune {
    Count(usize),
    Percent(u8),
}

impl std::str::FromStr for MaxPrune {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_suffix('%') {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .map(MaxPrune::Percent)
                .ok_or_else(|| format!("expected a percentage 0-100%, got {s:?}")),
            None => s
                .parse::<usize>()
                .map(MaxPrune::Count)
                .map_err(|_| format!("expected a count or a percentage such as 25%, got {s:?}")),
        }
    }
}

impl MaxPrune {
    fn allowed(self, live_environments: usize) -> usize {
        match self {
            MaxPrune::Count(n) => n,
            // Rounded up, so that a share of any fleet allows at least one deletion.
            MaxPrune::Percent(p) => (live_environments * usize::from(p)).div_ceil(100),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PrunePolicy {
    pub enabled: bool,
    pub allow_mass_prune: bool,
    pub max_prune: MaxPrune,
}

/// What the source said beyond its valid environments.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    /// Environments found but invalid: keep their last applied state, never prune them.
    pub invalid_environments: BTreeSet<String>,
    /// Files that could not be attributed to an environment: no prune at all while any exist.
    pub unattributed_files: BTreeSet<String>,
    /// When set, only these environments are planned (their objects created, updated or
    /// deleted); the others are left as they are. Removed environments are still pruned.
    pub scope: Option<BTreeSet<String>>,
    /// Namespaces of desired environments that exist but are not this instance's, with their
    /// labels: each such environment is refused (see `ownership`).
    pub existing_namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// This instance's name.
    pub instance: String,
    /// `--adopt`: take over existing namespaces that no envctl instance owns.
    pub adopt: bool,
    /// Environments that could not be observed (a dry-run or a read refused or unanswered),
    /// with the reason: each fails alone and is not planned.
    pub failed: BTreeMap<String, String>,
    /// With sharding: the environments this replica may write. The others (in the source or
    /// only live) are neither changed nor pruned.
    pub writable: Option<crate::shard::Writable>,
    /// Every valid environment of the source, whether rendered in this pass or not (a pass
    /// that plans a few renders only those): none of them is ever pruned as gone. Shared by
    /// every part of a pass.
    pub environments: std::sync::Arc<BTreeSet<String>>,
    /// `--region`: the regions this writer serves. A live environment that is not in this
    /// region's source and whose namespace names another region (or none) is never pruned:
    /// it is another region's. `None`: all.
    pub regions: Option<std::sync::Arc<BTreeSet<String>>>,
}

/// Why an environment whose namespace already exists may not be applied by `instance`, if
/// it may not: another instance owns it (never taken over), or nothing owns it (taken over
/// only with `--adopt`).
pub fn ownership(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    instance: &str,
    adopt: bool,
) -> Option<String> {
    let managed = labels
        .get(crate::render::MANAGED_BY_KEY)
        .map(String::as_str)
        == Some(crate::render::MANAGED_BY_VALUE);
    match labels.get(crate::render::INSTANCE_LABEL) {
        Some(owner) if managed && owner != instance => Some(format!(
            "namespace {namespace} belongs to envctl instance {owner:?}, not {instance:?}; nothing of it is written (change the environment's name, or remove it from that instance first)"
        )),
        Some(_) if managed => None,
        _ if adopt => None,
        _ => Some(format!(
            "namespace {namespace} already exists and no envctl instance owns it; nothing of it is written (pass --adopt to take it over)"
        )),
    }
}

/// An environment that was not planned at all, and why.
#[derive(Debug, Clone, Serialize)]
pub struct EnvironmentError {
    pub environment: String,
    pub reason: String,
}

impl SourceHealth {
    /// Whether environment `env` is planned in this pass.
    pub fn in_scope(&self, env: &str) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(env)) && self.writes(env)
    }

    /// Whether this replica may write environment `env` at all (always, without sharding).
    pub fn writes(&self, env: &str) -> bool {
        self.writable.as_ref().is_none_or(|w| w.may_write(env))
    }
}

/// Every field of `desired` is in `live` with the same value (lists: same length, element-wise).
fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            // Both maps iterate in key order: one walk of each, not a search per key. (Were
            // they ever unordered, a key would go unmatched: "not provable", never a false
            // "unchanged".)
            let mut l = l.iter();
            d.iter().all(|(k, v)| {
                l.by_ref()
                    .find(|(lk, _)| lk.as_str() >= k.as_str())
                    .is_some_and(|(lk, lv)| lk == k && is_subset(v, lv))
            })
        }
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (d, l) => d == l,
    }
}

/// Deletion has begun (`metadata.deletionTimestamp` is set).
fn is_terminating(object: &Value) -> bool {
    object
        .get("metadata")
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|v| !v.is_null())
}

fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
}

/// True when applying `desired` provably changes nothing: envctl last applied exactly this
/// object (same hash) and every desired field still holds its value. Anything else needs the
/// server's dry-run to decide.
pub fn provably_unchanged(desired: &Value, live: &Value) -> bool {
    annotation(desired, HASH_ANNOTATION).is_some()
        && annotation(desired, HASH_ANNOTATION) == annotation(live, HASH_ANNOTATION)
        && is_subset(desired, live)
}

/// The desired objects of a part, each judged once (on every core: a full pass compares
/// every object) for whether it is provably unchanged against its live object: both the
/// choice of dry-runs and the plan need that answer.
pub struct Desired {
    pub objects: Vec<DesiredObject>,
    /// `unchanged[i]`: `objects[i]` exists live and is `provably_unchanged`.
    unchanged: Vec<bool>,
}

impl Desired {
    pub fn judge(objects: Vec<DesiredObject>, live: &Live) -> Desired {
        let judge = |d: &DesiredObject| {
            live.objects
                .get(&ObjectKey::of(d))
                .is_some_and(|l| provably_unchanged(&d.object, &l.object))
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = objects.len().div_ceil(threads).max(256);
        let unchanged = std::thread::scope(|scope| {
            let parts: Vec<_> = objects
                .chunks(chunk)
                .map(|part| {
                    (
                        part.len(),
                        scope.spawn(move || part.iter().map(judge).collect()),
                    )
                })
                .collect();
            // A part whose thread failed proves nothing: its objects are dry-run.
            parts
                .into_iter()
                .flat_map(|(n, h)| h.join().unwrap_or_else(|_| vec![false; n]))
                .collect()
        });
        Desired { objects, unchanged }
    }

    /// The objects (of environments in scope) that exist live but are not provably
    /// unchanged: they need a dry-run.
    pub fn needs_dry_run(&self, live: &Live, health: &SourceHealth) -> Vec<&DesiredObject> {
        self.objects
            .iter()
            .zip(&self.unchanged)
            .filter(|(d, unchanged)| !**unchanged && health.in_scope(&d.environment))
            .filter(|(d, _)| {
                live.objects
                    .get(&ObjectKey::of(d))
                    .is_some_and(|l| !needs_replace(d.kind, &d.object, &l.object))
            })
            .map(|(d, _)| d)
            .collect()
    }
}

const SERVER_METADATA: [&str; 8] = [
    "managedFields",
    "resourceVersion",
    "uid",
    "generation",
    "creationTimestamp",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Drops what the server owns (managedFields, resourceVersion, status...), and envctl's own
/// bookkeeping annotation, so that only meaningful differences remain (JSON maps keep their
/// keys sorted, so both sides of a diff line up).
pub fn normalize(object: &Value) -> Value {
    let mut v = object.clone();
    if let Value::Object(map) = &mut v {
        map.remove("status");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            for k in SERVER_METADATA {
                meta.remove(k);
            }
            if let Some(Value::Object(ann)) = meta.get_mut("annotations") {
                ann.remove(HASH_ANNOTATION);
                if ann.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
    v
}

/// Replaces Secret values by markers; a value that differs between the two sides is marked
/// as changed without revealing either.
fn mask_secrets(old: &mut Value, new: &mut Value) {
    for field in ["data", "stringData"] {
        let old_map = old
            .get(field)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let new_map = new
            .get(field)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(Value::Object(m)) = old.get_mut(field) {
            for v in m.values_mut() {
                *v = Value::from("(masked)");
            }
        }
        if let Some(Value::Object(m)) = new.get_mut(field) {
            for (k, v) in m.iter_mut() {
                let changed = old_map.get(k) != new_map.get(k);
                *v = Value::from(if changed && !old_map.is_empty() {
                    "(masked, changed)"
                } else {
                    "(masked)"
                });
            }
        }
    }
}

/// Drops the status annotations (bookkeeping that changes with every pass, never drift)
/// from an object shown in a diff.
fn without_status(object: &mut Value) {
    let Some(Value::Object(annotations)) = object.pointer_mut("/metadata/annotations") else {
        return;
    };
    annotations.retain(|k, _| !crate::vocab::STATUS_ANNOTATIONS.contains(&k.as_str()));
    if annotations.is_empty()
        && let Some(Value::Object(meta)) = object.get_mut("metadata")
    {
        meta.remove("annotations");
    }
}

fn unified(key: &ObjectKey, old: &Value, new: &Value) -> String {
    let (mut old, mut new) = (old.clone(), new.clone());
    if key.kind == ObjectKind::Secret {
        mask_secrets(&mut old, &mut new);
    }
    without_status(&mut old);
    without_status(&mut new);
    let (a, b) = (crate::yaml::to_yaml(&old), crate::yaml::to_yaml(&new));
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("live/{key}"), &format!("desired/{key}"))
        .to_string()
}

/// Builds the plan, taking the desired objects (they move into the changes that apply
/// them). `dry_run` holds the server's would-be object for every object
/// `Desired::needs_dry_run` returned. `with_diffs`: render the unified diff of every change (for people; a
/// controller skips it).
pub fn build(
    desired: Desired,
    live: &Live,
    dry_run: &BTreeMap<ObjectKey, Value>,
    health: &SourceHealth,
    prune: &PrunePolicy,
    with_diffs: bool,
) -> Plan {
    let mut plan = Plan::default();
    let Desired {
        objects: desired,
        unchanged,
    } = desired;
    let rendered: BTreeSet<String> = desired.iter().map(|d| d.environment.clone()).collect();
    let desired_envs = DesiredEnvironments {
        rendered: &rendered,
        source: &health.environments,
    };
    let desired_keys: BTreeSet<ObjectKey> = desired.iter().map(ObjectKey::of).collect();
    let diffs = Diffs(with_diffs);
    let refused = refusals(&desired, live, health);
    let listed = |m: &BTreeMap<String, String>| -> Vec<EnvironmentError> {
        m.iter()
            .map(|(environment, reason)| EnvironmentError {
                environment: environment.clone(),
                reason: reason.clone(),
            })
            .collect()
    };
    plan.refused = listed(&refused);
    plan.failed = listed(
        &health
            .failed
            .iter()
            .filter(|(e, _)| !refused.contains_key(*e))
            .map(|(e, r)| (e.clone(), r.clone()))
            .collect(),
    );
    let planned = desired.into_iter().zip(unchanged).filter(|(d, _)| {
        health.in_scope(&d.environment)
            && !refused.contains_key(&d.environment)
            && !health.failed.contains_key(&d.environment)
    });
    plan_desired(&mut plan, planned, live, dry_run, diffs);
    let gone = Gone::find(live, &desired_keys, desired_envs, health, &refused);
    let deletes = gone.prune(&mut plan, health, prune, desired_envs.is_empty(), diffs);
    plan.changes.extend(deletes);
    plan.count();
    plan
}

/// The environments that are desired: rendered in this part, or valid in the source.
#[derive(Clone, Copy)]
struct DesiredEnvironments<'a> {
    rendered: &'a BTreeSet<String>,
    source: &'a BTreeSet<String>,
}

impl DesiredEnvironments<'_> {
    fn contains(&self, env: &str) -> bool {
        self.rendered.contains(env) || self.source.contains(env)
    }

    fn is_empty(&self) -> bool {
        self.rendered.is_empty() && self.source.is_empty()
    }
}

/// Whether changes carry their unified diff.
#[derive(Clone, Copy)]
struct Diffs(bool);

impl Diffs {
    fn of(self, key: &ObjectKey, old: &Value, new: &Value) -> String {
        if self.0 {
            unified(key, old, new)
        } else {
            String::new()
        }
    }
}

/// Environments whose namespace exists but is not ours to write, with why.
fn refusals(
    desired: &[DesiredObject],
    live: &Live,
    health: &SourceHealth,
) -> BTreeMap<String, String> {
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    for d in desired
        .iter()
        .filter(|d| d.kind == ObjectKind::Namespace && health.in_scope(&d.environment))
    {
        if live.objects.contains_key(&ObjectKey::of(d)) {
            continue;
        }
        if let Some(reason) = health
            .existing_namespaces
            .get(&d.name)
            .and_then(|labels| ownership(&d.name, labels, &health.instance, health.adopt))
        {
            refused.insert(d.environment.clone(), reason);
        }
    }
    refused
}

/// Creates, replaces and updates for the desired objects planned in this pass (each with
/// whether it is provably unchanged); what is unchanged is counted (and its object dropped
/// off this thread); what is being deleted waits.
fn plan_desired(
    plan: &mut Plan,
    planned: impl Iterator<Item = (DesiredObject, bool)>,
    live: &Live,
    dry_run: &BTreeMap<ObjectKey, Value>,
    diffs: Diffs,
) {
    // Environments whose namespace is being deleted: nothing can be created in it until it
    // is gone, so the whole environment waits.
    let terminating_envs: BTreeSet<&str> = live
        .objects
        .values()
        .filter(|l| l.key.kind == ObjectKind::Namespace && is_terminating(&l.object))
        .filter_map(|l| l.environment.as_deref())
        .collect();
    let mut spent: Vec<DesiredObject> = Vec::new();
    for (d, proven) in planned {
        let key = ObjectKey::of(&d);
        let terminating = terminating_envs.contains(d.environment.as_str())
            || live
                .objects
                .get(&key)
                .is_some_and(|l| is_terminating(&l.object));
        if terminating {
            if key.kind == ObjectKind::Namespace
                || d.kind.namespaced() && !terminating_envs.contains(d.environment.as_str())
            {
                plan.held.push(Held {
                    key,
                    environment: Some(d.environment.clone()),
                    reason: "it is being deleted; it is re-created once it is gone".to_string(),
                });
            }
            continue;
        }
        match live.objects.get(&key) {
            None => plan.changes.push(Change {
                action: Action::Create,
                diff: diffs.of(&key, &Value::Null, &normalize(&d.object)),
                key,
                environment: d.environment,
                object: Some(d.object),
                uid: None,
            }),
            Some(l) if needs_replace(d.kind, &d.object, &l.object) => plan.changes.push(Change {
                action: Action::Replace,
                diff: diffs.of(&key, &normalize(&l.object), &normalize(&d.object)),
                key,
                environment: d.environment,
                object: Some(d.object),
                uid: live_uid(&l.object),
            }),
            Some(l) => {
                let new = match dry_run.get(&key) {
                    Some(w) => normalize(w),
                    None if proven => {
                        plan.summary.unchanged += 1;
                        spent.push(d);
                        continue;
                    }
                    // Not provable and no dry-run answer: show the rendered object (never
                    // claim "unchanged" without proof).
                    None => normalize(&d.object),
                };
                let old = normalize(&l.object);
                if old == new {
                    plan.summary.unchanged += 1;
                } else {
                    plan.changes.push(Change {
                        action: Action::Update,
                        diff: diffs.of(&key, &old, &new),
                        key,
                        environment: d.environment,
                        object: Some(d.object),
                        uid: None,
                    });
                }
            }
        }
    }
    crate::vocab::drop_elsewhere(spent);
}

/// Owned live objects that are no longer desired: whole environments (their namespace), and
/// objects on their own.
struct Gone<'a> {
    envs: Vec<&'a LiveObject>,
    objects: Vec<&'a LiveObject>,
    /// Environments that have a live namespace.
    live_envs: BTreeSet<String>,
}

impl<'a> Gone<'a> {
    fn find(
        live: &'a Live,
        desired_keys: &BTreeSet<ObjectKey>,
        desired_envs: DesiredEnvironments<'_>,
        health: &SourceHealth,
        refused: &BTreeMap<String, String>,
    ) -> Gone<'a> {
        let mut live_envs = live.environments();
        // With --region: the environments of other regions are theirs, whether or not the
        // source has them.
        if let Some(regions) = &health.regions {
            let foreign = live.environments_outside(regions);
            live_envs.retain(|e| !foreign.contains(e));
        }
        let mut envs: Vec<&LiveObject> = Vec::new();
        let mut objects: Vec<&LiveObject> = Vec::new();
        for l in live.objects.values() {
            if desired_keys.contains(&l.key) || is_terminating(&l.object) {
                continue;
            }
            let env = l.environment.as_deref().unwrap_or("");
            if !health.writes(env) {
                continue; // another replica's (sharding)
            }
            if health.regions.is_some() && !live_envs.contains(env) {
                // Another region's (`live_envs` holds none of them), or an object whose
                // environment's region is unknown here.
                continue;
            }
            if desired_envs.contains(env)
                && (!health.in_scope(env)
                    || refused.contains_key(env)
                    || health.failed.contains_key(env))
            {
                continue; // in the source but not planned this time: leave it as it is
            }
            if desired_envs.contains(env) {
                objects.push(l);
            } else if l.key.kind == ObjectKind::Namespace {
                envs.push(l);
            } else if !live_envs.contains(env) {
                // An owned object whose environment has no namespace of ours: delete it alone.
                objects.push(l);
            }
            // Objects inside a namespace that goes away go with it.
        }
        Gone {
            envs,
            objects,
            live_envs,
        }
    }

    /// The deletes, in delete order; what may not be deleted is held (or, with pruning off,
    /// orphaned), with why.
    fn prune(
        &self,
        plan: &mut Plan,
        health: &SourceHealth,
        prune: &PrunePolicy,
        nothing_desired: bool,
        diffs: Diffs,
    ) -> Vec<Change> {
        let blanket_refusal = if nothing_desired {
            Some("the source has no valid environment; nothing is pruned".to_string())
        } else if !health.unattributed_files.is_empty() {
            Some(format!(
                "{} could not be read, so the environments it holds are unknown; nothing is pruned",
                health
                    .unattributed_files
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else {
            None
        };
        // --max-prune is a share of what this writer writes: with sharding each replica holds
        // its own share to it, so the fleet as a whole loses no more than that share.
        let written = self.live_envs.iter().filter(|e| health.writes(e)).count();
        let allowed = prune.max_prune.allowed(written);
        let deletable_envs = self
            .envs
            .iter()
            .filter(|l| {
                !health
                    .invalid_environments
                    .contains(l.environment.as_deref().unwrap_or(""))
                    && annotation(&l.object, PROTECT_ANNOTATION) != Some("true")
            })
            .count();
        let mass = deletable_envs > allowed && !prune.allow_mass_prune;
        let mut deletes: Vec<Change> = Vec::new();
        for l in self.envs.iter().chain(self.objects.iter()) {
            let env = l.environment.clone();
            let env_name = env.as_deref().unwrap_or("");
            let reason = if !prune.enabled {
                plan.orphaned.push(l.key.clone());
                continue;
            } else if let Some(r) = &blanket_refusal {
                Some(r.clone())
            } else if health.invalid_environments.contains(env_name) {
                Some(format!(
                    "environment {env_name:?} has an invalid manifest; it keeps its last applied state"
                ))
            } else if l.key.kind == ObjectKind::Namespace
                && annotation(&l.object, PROTECT_ANNOTATION) == Some("true")
            {
                Some(format!(
                    "namespace is annotated {PROTECT_ANNOTATION}: \"true\""
                ))
            } else if l.key.kind == ObjectKind::Namespace && mass {
                Some(format!(
                    "this revision would delete {deletable_envs} of the {written} environments this writer writes, more than --max-prune allows ({allowed}); pass --allow-mass-prune to proceed",
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => plan.held.push(Held {
                    key: l.key.clone(),
                    environment: env,
                    reason: format!("not deleted: {reason}"),
                }),
                None => deletes.push(Change {
                    action: Action::Delete,
                    diff: diffs.of(&l.key, &normalize(&l.object), &Value::Null),
                    key: l.key.clone(),
                    environment: env.unwrap_or_default(),
                    object: None,
                    uid: live_uid(&l.object),
                }),
            }
        }
        deletes.sort_by(delete_order);
        deletes
    }
}

/// The plan as text: a unified diff per change, then notes and the summary line.
pub fn render_text(plan: &Plan, color: bool) -> String {
    let mut out = String::new();
    for c in &plan.changes {
        let header = format!(
            "{} {} (environment {})\n",
            c.action.as_str(),
            c.key,
            c.environment
        );
        if color {
            out.push_str(&format!("\x1b[1m{}\x1b[0m", header));
        } else {
            out.push_str(&header);
        }
        for line in c.diff.lines() {
            let painted = match line.as_bytes().first() {
                _ if !color => line.to_string(),
                Some(b'+') if !line.starts_with("+++") => format!("\x1b[32m{line}\x1b[0m"),
                Some(b'-') if !line.starts_with("---") => format!("\x1b[31m{line}\x1b[0m"),
                Some(b'@') => format!("\x1b[36m{line}\x1b[0m"),
                _ => line.to_string(),
            };
            out.push_str(&painted);
            out.push('\n');
        }
    }
    for h in &plan.held {
        out.push_str(&format!("held {}: {}\n", h.key, h.reason));
    }
    for r in &plan.refused {
        out.push_str(&format!(
            "refused environment {}: {}\n",
            r.environment, r.reason
        ));
    }
    for f in &plan.failed {
        out.push_str(&format!(
            "failed environment {}: {}\n",
            f.environment, f.reason
        ));
    }
    if !plan.orphaned.is_empty() {
        out.push_str(&format!(
            "note: {} owned object(s) are no longer in the source and would be deleted with --prune\n",
            plan.orphaned.len()
        ));
    }
    let s = &plan.summary;
    out.push_str(&format!(
        "{} to create, {} to update, {} to delete, {} unchanged\n",
        s.create, s.update, s.delete, s.unchanged
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_walks_both_maps_in_key_order() {
        let live = serde_json::json!({
            "a": 1, "b": {"x": [1, {"y": 2, "z": 3}], "w": "v"}, "c": null, "d": "e", "zz": 0
        });
        for (desired, subset) in [
            (serde_json::json!({}), true),
            (serde_json::json!({"a": 1, "d": "e"}), true),
            (
                serde_json::json!({"b": {"x": [1, {"z": 3}]}, "zz": 0}),
                true,
            ),
            (serde_json::json!({"a": 1, "bb": 1}), false),
            (serde_json::json!({"0": 1, "a": 1}), false),
            (serde_json::json!({"zzz": 0}), false),
            (serde_json::json!({"d": "f"}), false),
            (serde_json::json!({"b": {"x": [1]}}), false),
            (serde_json::json!({"b": {"x": [1, {"y": 3}]}}), false),
        ] {
            assert_eq!(is_subset(&desired, &live), subset, "{desired}");
        }
    }
    use crate::vocab::ENVIRONMENT_LABEL;
    use serde_json::json;

    #[test]
    fn subset_tolerates_server_defaults() {
        let desired = json!({"spec": {"replicas": 2, "ports": [{"name": "a", "port": 1}]}});
        let live = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "ports": [{"name": "a", "port": 1, "targetPort": 1}]}});
        assert!(is_subset(&desired, &live));
        let scaled = json!({"spec": {"replicas": 3, "ports": [{"name": "a", "port": 1}]}});
        assert!(!is_subset(&desired, &scaled));
    }

    fn object(env: &str, kind: ObjectKind, name: &str, replicas: i64) -> Value {
        json!({"apiVersion": kind.api_version(), "kind": kind.as_str(),
            "metadata": {"name": name, "namespace": format!("environment-{env}"),
                "labels": {crate::render::ENVIRONMENT_LABEL: env}},
            "spec": {"replicas": replicas}})
    }

    /// Out-of-scope environments are neither changed nor pruned, even when their live objects
    /// differ from (or are missing in) the desired ones; removed environments still go.
    fn plan_scoped(health: &SourceHealth) -> Vec<String> {
        let desired = vec![
            DesiredObject {
                environment: "a".into(),
                kind: ObjectKind::StatefulSet,
                namespace: Some("environment-a".into()),
                name: "s".into(),
                object: object("a", ObjectKind::StatefulSet, "s", 2),
            },
            DesiredObject {
                environment: "b".into(),
                kind: ObjectKind::StatefulSet,
                namespace: Some("environment-b".into()),
                name: "s".into(),
                object: object("b", ObjectKind::StatefulSet, "s", 2),
            },
        ];
        let mut live = Live::default();
        live.insert(
            ObjectKind::StatefulSet,
            object("a", ObjectKind::StatefulSet, "s", 1),
        );
        live.insert(
            ObjectKind::StatefulSet,
            object("b", ObjectKind::StatefulSet, "s", 1),
        );
        live.insert(
            ObjectKind::StatefulSet,
            object("b", ObjectKind::StatefulSet, "old", 1),
        );
        let mut ns_c = object("c", ObjectKind::Namespace, "environment-c", 0);
        ns_c["metadata"]
            .as_object_mut()
            .map(|m| m.remove("namespace"));
        live.insert(ObjectKind::Namespace, ns_c);
        let prune = PrunePolicy {
            enabled: true,
            allow_mass_prune: true,
            max_prune: MaxPrune::Count(10),
        };
        let plan = build(
            Desired::judge(desired, &live),
            &live,
            &BTreeMap::new(),
            health,
            &prune,
            true,
        );
        plan.changes
            .iter()
            .map(|c| format!("{} {}", c.action.as_str(), c.key))
            .collect()
    }

    /// Environment `env`'s namespace, as rendered and as live.
    fn namespace_of(env: &str) -> Value {
        let mut ns = object(env, ObjectKind::Namespace, &format!("environment-{env}"), 0);
        if let Some(m) = ns["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        ns
    }

    /// Environment `env`'s desired objects: its namespace and a StatefulSet `s` of scale 2.
    fn desired_of(env: &str) -> Vec<DesiredObject> {
        vec![
            DesiredObject {
                environment: env.into(),
                kind: ObjectKind::Namespace,
                namespace: None,
                name: format!("environment-{env}"),
                object: namespace_of(env),
            },
            DesiredObject {
                environment: env.into(),
                kind: ObjectKind::StatefulSet,
                namespace: Some(format!("environment-{env}")),
                name: "s".into(),
                object: object(env, ObjectKind::StatefulSet, "s", 2),
            },
        ]
    }

    #[test]
    fn plans_of_parts_joined_are_the_plan_of_the_whole() {
        // As a controller's pass plans: each environment against its own namespace's objects,
        // then the environments gone from the source against every namespace.
        let (namespace, desired) = (namespace_of, desired_of);
        let mut live = Live::default();
        for (env, name) in [("a", "s"), ("b", "s"), ("b", "old"), ("c", "s")] {
            live.insert(
                ObjectKind::StatefulSet,
                object(env, ObjectKind::StatefulSet, name, 1),
            );
        }
        for env in ["a", "b", "c"] {
            live.insert(ObjectKind::Namespace, namespace(env));
        }
        let only = |keep: &dyn Fn(&ObjectKey) -> bool| Live {
            objects: live
                .objects
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let home = |k: &ObjectKey| k.namespace.clone().unwrap_or_else(|| k.name.clone());
        let health = |scope: Option<&[&str]>| SourceHealth {
            scope: scope.map(|s| s.iter().map(|e| e.to_string()).collect()),
            environments: std::sync::Arc::new(["a", "b"].iter().map(|e| e.to_string()).collect()),
            ..SourceHealth::default()
        };
        let prune = PrunePolicy {
            enabled: true,
            allow_mass_prune: true,
            max_prune: MaxPrune::Count(10),
        };
        let none = BTreeMap::new();
        let both = [desired("a"), desired("b")].concat();
        let whole = build(
            Desired::judge(both, &live),
            &live,
            &none,
            &health(None),
            &prune,
            false,
        );
        let part = |env: &str| {
            let ns = format!("environment-{env}");
            let live = only(&|k| home(k) == ns);
            build(
                Desired::judge(desired(env), &live),
                &live,
                &none,
                &health(Some(&[env])),
                &prune,
                false,
            )
        };
        let gone_live = only(&|k| {
            k.kind == ObjectKind::Namespace
                || !["environment-a", "environment-b"].contains(&home(k).as_str())
        });
        let gone = build(
            Desired::judge(Vec::new(), &gone_live),
            &gone_live,
            &none,
            &health(Some(&[])),
            &prune,
            false,
        );
        let joined = Plan::join(vec![part("a"), part("b"), gone]);
        let show = |p: &Plan| {
            p.changes
                .iter()
                .map(|c| format!("{} {}", c.action.as_str(), c.key))
                .collect::<Vec<_>>()
        };
        assert_eq!(show(&joined), show(&whole));
        assert_eq!(
            show(&whole),
            [
                "update StatefulSet environment-a/s",
                "update StatefulSet environment-b/s",
                "delete StatefulSet environment-b/old",
                "delete Namespace environment-c",
            ]
        );
        assert_eq!(
            format!("{:?}", joined.summary),
            format!("{:?}", whole.summary)
        );
        // Every environment the plan acts on is touched; one in sync would not be.
        let touched = joined.touched();
        for t in ["a", "environment-b", "environment-c"] {
            assert!(touched.contains(t), "{t} in {touched:?}");
        }
    }

    #[test]
    fn scope_limits_what_is_planned() {
        let health = SourceHealth {
            scope: Some(BTreeSet::from(["a".to_string()])),
            ..SourceHealth::default()
        };
        assert_eq!(
            plan_scoped(&health),
            vec![
                "update StatefulSet environment-a/s".to_string(),
                "delete Namespace environment-c".to_string()
            ]
        );
    }

    /// A pass that renders only a few environments still knows every environment of the
    /// source: one it did not render is never pruned as gone.
    #[test]
    fn an_unrendered_environment_of_the_source_is_not_pruned() {
        let health = SourceHealth {
            scope: Some(BTreeSet::from(["a".to_string()])),
            environments: std::sync::Arc::new(BTreeSet::from([
                "a".to_string(),
                "b".to_string(),
                "c".to_string(),
            ])),
            ..SourceHealth::default()
        };
        assert_eq!(
            plan_scoped(&health),
            vec!["update StatefulSet environment-a/s".to_string()]
        );
    }

    /// With sharding, environments another replica writes are neither changed nor pruned,
    /// removed ones included.
    #[test]
    fn a_shard_plans_only_what_it_may_write() {
        let lease = std::time::Duration::from_secs(15);
        let t0 = tokio::time::Instant::now();
        let members: BTreeSet<String> = ["r1", "r2", "r3"].iter().map(|s| s.to_string()).collect();
        let mut expected: Vec<String> = Vec::new();
        for me in &members {
            let mut m = crate::shard::Membership::new(me, lease);
            m.observe(Some(members.clone()), t0);
            let health = SourceHealth {
                writable: Some(m.writable(t0 + lease)),
                ..SourceHealth::default()
            };
            let mine = plan_scoped(&health);
            for line in &mine {
                let env = line.rsplit("environment-").next().unwrap_or("");
                let env = env.split('/').next().unwrap_or("");
                assert!(m.owns(env), "{me} planned {line} of {env}");
            }
            expected.extend(mine);
        }
        expected.sort();
        let mut all = plan_scoped(&SourceHealth::default());
        all.sort();
        assert_eq!(expected, all, "the shards together plan the whole fleet");
    }

    /// With --region, a live environment of another region is neither changed nor pruned,
    /// even under --prune and though the source does not have it; one of this region that
    /// left the source (or moved to another region) is pruned as usual.
    #[test]
    fn a_region_prunes_only_its_own_environments() {
        let regioned = |env: &str, region: Option<&str>| {
            let mut ns = namespace_of(env);
            if let Some(r) = region {
                ns["metadata"]["annotations"] =
                    serde_json::json!({ crate::vocab::REGION_ANNOTATION: r });
            }
            ns
        };
        let mut live = Live::default();
        live.insert(
            ObjectKind::Namespace,
            regioned("mine", Some("aws/us-east-1")),
        );
        live.insert(
            ObjectKind::Namespace,
            regioned("theirs", Some("aws/eu-west-1")),
        );
        live.insert(ObjectKind::Namespace, regioned("unknown", None));
        live.insert(
            ObjectKind::StatefulSet,
            object("theirs", ObjectKind::StatefulSet, "s", 1),
        );
        let prune = PrunePolicy {
            enabled: true,
            allow_mass_prune: true,
            max_prune: MaxPrune::Count(10),
        };
        let plan_for = |regions: Option<&[&str]>| {
            let health = SourceHealth {
                regions: regions
                    .map(|r| std::sync::Arc::new(r.iter().map(|s| s.to_string()).collect())),
                ..SourceHealth::default()
            };
            // A source with one environment (a source with none prunes nothing).
            let plan = build(
                Desired::judge(desired_of("kept"), &live),
                &live,
                &BTreeMap::new(),
                &health,
                &prune,
                false,
            );
            plan.changes
                .iter()
                .map(|c| format!("{} {}", c.action.as_str(), c.key))
                .filter(|c| c.starts_with("delete"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            plan_for(Some(&["aws/us-east-1"])),
            ["delete Namespace environment-mine"]
        );
        assert_eq!(
            plan_for(Some(&["aws/eu-west-1"])),
            ["delete Namespace environment-theirs"]
        );
        // Without --region, one cluster holds the whole fleet: every gone environment goes.
        assert_eq!(plan_for(None).len(), 3);
    }

    #[test]
    fn max_prune_parses() {
        assert_eq!("25%".parse::<MaxPrune>(), Ok(MaxPrune::Percent(25)));
        assert_eq!("3".parse::<MaxPrune>(), Ok(MaxPrune::Count(3)));
        assert!("x".parse::<MaxPrune>().is_err());
        // Shares round up: a fleet of any size may prune one environment.
        assert_eq!(MaxPrune::Percent(25).allowed(10), 3);
        assert_eq!(MaxPrune::Percent(25).allowed(2), 1);
        assert_eq!(MaxPrune::Percent(25).allowed(4), 1);
        assert_eq!(MaxPrune::Percent(1).allowed(1), 1);
        assert_eq!(MaxPrune::Percent(0).allowed(100), 0);
        assert_eq!(MaxPrune::Percent(100).allowed(7), 7);
    }

    #[test]
    fn a_changed_role_ref_is_a_replace() {
        let desired = vec![DesiredObject {
            environment: "a".into(),
            kind: ObjectKind::RoleBinding,
            namespace: Some("environment-a".into()),
            name: "environmentd".into(),
            object: json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "environmentd", "namespace": "environment-a"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "envctl-environmentd"}}),
        }];
        let mut live = Live::default();
        live.insert(
            ObjectKind::RoleBinding,
            json!({"metadata": {"name": "environmentd", "namespace": "environment-a", "uid": "u1",
                "labels": {ENVIRONMENT_LABEL: "a"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "environmentd"}}),
        );
        let health = SourceHealth::default();
        assert!(
            Desired::judge(desired.clone(), &live)
                .needs_dry_run(&live, &health)
                .is_empty(),
            "no dry-run of an immutable change"
        );
        let prune = PrunePolicy {
            enabled: false,
            allow_mass_prune: false,
            max_prune: MaxPrune::Count(1),
        };
        let plan = build(
            Desired::judge(desired, &live),
            &live,
            &BTreeMap::new(),
            &health,
            &prune,
            true,
        );
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].action, Action::Replace);
        assert_eq!(plan.changes[0].uid.as_deref(), Some("u1"));
        assert_eq!(plan.summary.update, 1);
    }

    /// Each shard holds its own share to --max-prune: a revision that removes most of the
    /// fleet is held by every shard, though each share's deletions are few.
    #[test]
    fn a_shard_measures_max_prune_against_its_own_share() {
        let lease = std::time::Duration::from_secs(15);
        let t0 = tokio::time::Instant::now();
        let members: BTreeSet<String> = ["r1", "r2", "r3"].iter().map(|s| s.to_string()).collect();
        let envs: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        let mut live = Live::default();
        for e in &envs {
            live.insert(
                ObjectKind::Namespace,
                json!({"metadata": {"name": format!("environment-{e}"), "uid": format!("u-{e}"),
                    "labels": {ENVIRONMENT_LABEL: e}}}),
            );
        }
        // The source keeps a quarter: three quarters are gone.
        let kept: BTreeSet<String> = envs.iter().take(10).cloned().collect();
        let prune = PrunePolicy {
            enabled: true,
            allow_mass_prune: false,
            max_prune: MaxPrune::Percent(25),
        };
        let mut deleted = 0;
        for me in &members {
            let mut m = crate::shard::Membership::new(me, lease);
            m.observe(Some(members.clone()), t0);
            let health = SourceHealth {
                writable: Some(m.writable(t0 + lease)),
                environments: kept.clone().into(),
                ..SourceHealth::default()
            };
            let plan = build(
                Desired::judge(Vec::new(), &live),
                &live,
                &BTreeMap::new(),
                &health,
                &prune,
                false,
            );
            let mine = envs.iter().filter(|e| m.owns(e)).count();
            deleted += plan.summary.delete;
            assert!(
                plan.held.iter().all(|h| h.reason.contains("--max-prune")),
                "{me}: {:?}",
                plan.held
            );
            assert!(
                plan.summary.delete <= mine.div_ceil(4),
                "{me} deletes {} of its {mine}",
                plan.summary.delete
            );
        }
        assert_eq!(deleted, 0, "every shard held its three quarters");
    }

    #[test]
    fn ownership_of_existing_namespaces() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let theirs = labels(&[
            ("app.kubernetes.io/managed-by", "envctl"),
            ("envctl.materialize.cloud/instance", "eu"),
        ]);
        let ours = labels(&[
            ("app.kubernetes.io/managed-by", "envctl"),
            ("envctl.materialize.cloud/instance", "us"),
        ]);
        let nobody = labels(&[("team", "data")]);
        let refused =
            ownership("environment-x", &theirs, "us", true).expect("refused even with --adopt");
        assert!(
            refused.contains("belongs to envctl instance \"eu\""),
            "{refused}"
        );
        assert_eq!(ownership("environment-x", &ours, "us", false), None);
        assert!(
            ownership("environment-x", &nobody, "us", false).is_some_and(|r| r.contains("--adopt"))
        );
        assert_eq!(ownership("environment-x", &nobody, "us", true), None);
    }

    #[test]
    fn secret_values_never_shown() {
        let key = ObjectKey {
            kind: ObjectKind::Secret,
            namespace: Some("ns".into()),
            name: "s".into(),
        };
        let old = json!({"data": {"tls.key": "c2VjcmV0MQ=="}});
        let new = json!({"data": {"tls.key": "c2VjcmV0Mg=="}});
        let d = unified(&key, &old, &new);
        assert!(!d.contains("c2VjcmV0"), "{d}");
        assert!(d.contains("(masked, changed)"), "{d}");
    }
}
