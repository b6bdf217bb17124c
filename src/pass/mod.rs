//! The reconcile pass shared by `envctl diff`, `envctl apply` and `envctl run`: loaded
//! manifests -> render -> observe -> plan, and optionally -> apply; then `outcome` (pure):
//! what the pass came to per environment, and which environments get certificates. (Status
//! bookkeeping and the certificate step follow it in `cli::apply` and the controller's
//! `reconcile`.)
//!
//! Owns the order of the named steps and their timings, nothing else: each step's logic
//! lives in its module. Never loops, sleeps or keeps state between passes (the controller
//! does).

mod outcome;
pub use outcome::{Failure, Outcome, Touched};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kube::Client;

use crate::apply::{self, Report};
use crate::cluster::FailureReason;
use crate::manifest::Environment;
use crate::manifest::Loaded;
use crate::observe::{self, ObserveError};
use crate::plan::{self, Live, Plan, PrunePolicy, SourceHealth};
use crate::render::{self, RenderOptions};
use crate::vocab::{Fnv64, Phase, ProgressHandle};

/// How many environments a controller pass renders, reads and plans at a time: a full pass
/// holds one chunk's objects in memory, never the whole fleet's.
const CHUNK: usize = 512;

/// Settings of one pass.
#[derive(Debug, Clone)]
pub struct PassOptions {
    pub render: RenderOptions,
    pub prune: PrunePolicy,
    /// Concurrent requests (dry-runs) and concurrently applied environments.
    pub concurrency: usize,
    /// Render a unified diff per change (for `diff` and `apply` output).
    pub diffs: bool,
    /// Plan only these environments (see `SourceHealth::scope`); `None` plans all.
    pub scope: Option<BTreeSet<String>>,
    /// `--adopt`: take over existing namespaces that no envctl instance owns.
    pub adopt: bool,
    /// With sharding: the environments this replica may write (see `crate::shard`).
    pub writable: Option<crate::shard::Writable>,
    /// Where the pass reports its progress (the CLI's bar on a terminal).
    pub progress: Option<ProgressHandle>,
    /// What earlier passes found in sync (a controller's; see `InSync`).
    pub in_sync: Option<Arc<InSync>>,
    /// `--region`: the regions this process serves. Live environments of other regions that
    /// are not in this region's source are never pruned. `None`: all.
    pub regions: Option<Arc<BTreeSet<String>>>,
}

impl PassOptions {
    /// Whether environment `env` is planned in this pass.
    pub fn plans(&self, env: &str) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(env)) && self.writes(env)
    }

    /// Whether this replica may write environment `env` at all (always, without sharding).
    pub fn writes(&self, env: &str) -> bool {
        self.writable.as_ref().is_none_or(|w| w.may_write(env))
    }
}

/// Environments that passes found in sync, remembered between a controller's passes. An
/// environment's part of a plan is a function of its manifest, the render settings and its
/// live objects as the watch cache has them, so when the digests of those are as they were
/// when it was found in sync, it is still in sync: it is counted unchanged without being
/// rendered, read or planned. Only an environment that needed no dry-run is remembered (a
/// dry-run's answer is the server's, not a function of those inputs).
#[derive(Debug, Default)]
pub struct InSync(std::sync::Mutex<HashMap<String, Remembered>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remembered {
    desired: u64,
    live: u64,
    objects: usize,
}

impl InSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Remembered>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many environments are remembered in sync.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every environment: the next pass plans all of them in full.
    pub fn forget(&self) {
        self.lock().clear();
    }

    /// After a chunk of environments was planned: remembers the ones found in sync (nothing
    /// to write, no dry-run, live objects as `digests` has them), forgets the others.
    fn note(
        &self,
        chunk: &[(&Environment, u64)],
        not_in_sync: &HashSet<String>,
        digests: &observe::NamespaceDigests,
        objects: &HashMap<String, usize>,
    ) {
        let mut known = self.lock();
        for (e, d) in chunk {
            let name = &e.metadata.name;
            let ns = e.namespace();
            match digests.get(&ns) {
                Some(live) if !not_in_sync.contains(name) && !not_in_sync.contains(&ns) => {
                    known.insert(
                        name.clone(),
                        Remembered {
                            desired: *d,
                            live: *live,
                            objects: objects.get(name).copied().unwrap_or(0),
                        },
                    );
                }
                _ => {
                    known.remove(name);
                }
            }
        }
    }
}

/// What a pass found, with timings of its steps.
#[derive(Debug, Default)]
pub struct PassPlan {
    pub plan: Plan,
    pub dry_runs: usize,
    /// Annotations of the live namespaces, by namespace name (for status bookkeeping).
    pub live_namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub timings: BTreeMap<&'static str, std::time::Duration>,
    /// Why each environment in `plan.failed` failed (a metric label).
    pub failure_reasons: BTreeMap<String, FailureReason>,
}

impl PassPlan {
    fn time(&mut self, step: &'static str, since: Instant) {
        *self.timings.entry(step).or_default() += since.elapsed();
    }

    /// Adds what was learned of other environments, but for their plan (returned).
    fn absorb(&mut self, part: PassPlan) -> Plan {
        self.dry_runs += part.dry_runs;
        self.live_namespaces.extend(part.live_namespaces);
        for (step, d) in part.timings {
            *self.timings.entry(step).or_default() += d;
        }
        self.failure_reasons.extend(part.failure_reasons);
        part.plan
    }
}

/// Renders the valid environments and plans them against the cluster (or against an empty
/// cluster when `client` is `None`). Live objects come from `cache` when given (a
/// controller's watches), else from LISTs.
pub async fn plan_pass(
    client: Option<&Client>,
    cache: Option<&observe::Cache>,
    loaded: &Loaded,
    options: &PassOptions,
) -> Result<PassPlan, ObserveError> {
    if let Some(cache) = cache {
        return plan_from_cache(client, cache, loaded, options).await;
    }
    let t = Instant::now();
    let envs: Vec<&Environment> = loaded
        .environments
        .iter()
        .map(|e| &e.environment)
        .filter(|e| options.plans(&e.metadata.name))
        .collect();
    let desired = render::render(&envs, &options.render);
    let render_time = t.elapsed();

    let t = Instant::now();
    if let Some(p) = &options.progress {
        p.phase(Phase::Observe, loaded.environments.len(), 0);
    }
    let live = match client {
        Some(c) => observe::list_owned(c, &options.render.instance).await?,
        None => Live::default(),
    };
    let observe_time = t.elapsed();
    let part = Part {
        desired,
        live: &live,
        scope: options.scope.clone(),
    };
    let source = Arc::new(source_environments(loaded));
    let (mut pass, _) = plan_part(client, part, loaded, &source, options).await?;
    pass.timings.insert("render", render_time);
    pass.timings.insert("observe", observe_time);
    pass.live_namespaces = namespace_annotations(&live);
    Ok(pass)
}

/// A controller's pass, from its watch cache: environments remembered in sync (`InSync`)
/// are counted unchanged; the others are rendered, read and planned `CHUNK` at a time; then
/// the environments that left the source are planned (pruned) on their own.
async fn plan_from_cache(
    client: Option<&Client>,
    cache: &observe::Cache,
    loaded: &Loaded,
    options: &PassOptions,
) -> Result<PassPlan, ObserveError> {
    let t = Instant::now();
    let remember = options.in_sync.as_deref();
    let snapshot = cache.snapshot();
    let (unchanged, stale) = in_sync_or_stale(&snapshot, loaded, options);
    let source = Arc::new(source_environments(loaded));
    let mut pass = PassPlan::default();
    let mut plans = vec![Plan::default()];
    plans[0].summary.unchanged = unchanged;
    pass.time("in-sync", t);

    for chunk in stale.chunks(CHUNK) {
        let t = Instant::now();
        let envs: Vec<&Environment> = chunk.iter().map(|(e, _)| *e).collect();
        let desired = render::render(&envs, &options.render);
        let mut objects: HashMap<String, usize> = HashMap::new();
        for d in &desired {
            *objects.entry(d.environment.clone()).or_default() += 1;
        }
        pass.time("render", t);
        let t = Instant::now();
        let namespaces: Vec<String> = envs.iter().map(|e| e.namespace()).collect();
        let (live, digests) = snapshot.live_of(namespaces.iter().map(String::as_str))?;
        pass.time("observe", t);
        let scope = envs.iter().map(|e| e.metadata.name.clone()).collect();
        let part = Part {
            desired,
            live: &live,
            scope: Some(scope),
        };
        let (part, dry_run) = plan_part(client, part, loaded, &source, options).await?;
        crate::vocab::drop_elsewhere(live);
        if let Some(remember) = remember {
            let mut not_in_sync = part.plan.touched();
            not_in_sync.extend(dry_run);
            remember.note(chunk, &not_in_sync, &digests, &objects);
        }
        plans.push(pass.absorb(part));
    }

    // Environments no longer in the source: every namespace (for prune's count and guards)
    // and the objects of namespaces that no source environment has.
    let t = Instant::now();
    let source_namespaces: HashSet<String> = loaded
        .environments
        .iter()
        .map(|e| e.environment.namespace())
        .collect();
    let live = snapshot.live_where(|ns| !source_namespaces.contains(ns))?;
    drop(snapshot);
    pass.time("observe", t);
    let part = Part {
        desired: Vec::new(),
        live: &live,
        scope: Some(BTreeSet::new()),
    };
    let (mut gone, _) = plan_part(client, part, loaded, &source, options).await?;
    gone.live_namespaces = namespace_annotations(&live);
    plans.push(pass.absorb(gone));
    pass.plan = Plan::join(plans);
    Ok(pass)
}

/// The environments this pass plans, split: the ones remembered in sync (`InSync`: counted
/// by their objects, returned as that count) and the others, each with the digest of its
/// desired state (0 when nothing is remembered).
fn in_sync_or_stale<'a>(
    cache: &observe::Snapshot,
    loaded: &'a Loaded,
    options: &PassOptions,
) -> (usize, Vec<(&'a Environment, u64)>) {
    let remember = options.in_sync.as_deref();
    let render_digest = {
        let mut h = Fnv64::new();
        h.write(format!("{:?}", options.render).as_bytes());
        h.finish()
    };
    let desired_digest = |e: &Environment| {
        let mut h = Fnv64::new();
        h.write(&render_digest.to_le_bytes());
        h.write(&serde_json::to_vec(e).unwrap_or_default());
        h.mixed()
    };
    let live_digests = match remember {
        Some(_) => cache.digests(),
        None => observe::NamespaceDigests::new(),
    };
    let mut unchanged = 0;
    let mut stale: Vec<(&Environment, u64)> = Vec::new();
    let mut known = remember.map(InSync::lock);
    if let Some(known) = known.as_mut() {
        let names: HashSet<&str> = loaded
            .environments
            .iter()
            .map(|e| e.environment.metadata.name.as_str())
            .collect();
        known.retain(|name, _| names.contains(name.as_str()));
    }
    for e in loaded
        .environments
        .iter()
        .map(|e| &e.environment)
        .filter(|e| options.plans(&e.metadata.name))
    {
        let Some(known) = known.as_ref() else {
            stale.push((e, 0));
            continue;
        };
        let d = desired_digest(e);
        match known.get(&e.metadata.name) {
            Some(r) if r.desired == d && live_digests.get(&e.namespace()) == Some(&r.live) => {
                unchanged += r.objects;
            }
            _ => stale.push((e, d)),
        }
    }
    (unchanged, stale)
}

/// The annotations of the live namespaces, by namespace name.
fn namespace_annotations(live: &Live) -> BTreeMap<String, BTreeMap<String, String>> {
    live.objects
        .values()
        .filter(|o| o.key.kind == crate::render::ObjectKind::Namespace)
        .map(|o| {
            let annotations = o
                .object
                .pointer("/metadata/annotations")
                .and_then(serde_json::Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            (o.key.name.clone(), annotations)
        })
        .collect()
}

/// The names of the source's valid environments (one set per pass, shared by its parts).
fn source_environments(loaded: &Loaded) -> BTreeSet<String> {
    loaded
        .environments
        .iter()
        .map(|e| e.environment.metadata.name.clone())
        .collect()
}

/// One part of a pass: the desired objects of the environments in `scope` (or all), and
/// the live objects they are planned against.
struct Part<'a> {
    desired: Vec<crate::render::DesiredObject>,
    live: &'a Live,
    scope: Option<BTreeSet<String>>,
}

/// Plans a part: reads the labels of namespaces about to be created, dry-runs what is not
/// provably unchanged, and builds the plan. `live_namespaces` is left empty. Also returns
/// the environments that were dry-run. `source`: every valid environment of the source.
async fn plan_part(
    client: Option<&Client>,
    Part {
        desired,
        live,
        scope,
    }: Part<'_>,
    loaded: &Loaded,
    source: &Arc<BTreeSet<String>>,
    options: &PassOptions,
) -> Result<(PassPlan, BTreeSet<String>), ObserveError> {
    let mut pass = PassPlan::default();
    let mut health = SourceHealth {
        invalid_environments: loaded.invalid_names.clone(),
        unattributed_files: loaded.unattributed_files.clone(),
        scope,
        existing_namespaces: BTreeMap::new(),
        instance: options.render.instance.clone(),
        adopt: options.adopt,
        failed: BTreeMap::new(),
        writable: options.writable.clone(),
        environments: source.clone(),
        regions: options.regions.clone(),
    };
    // Namespaces about to be created may exist already, unowned or another instance's:
    // read their labels so that the plan can refuse those environments.
    let t = Instant::now();
    let missing: Vec<&str> = desired
        .iter()
        .filter(|d| {
            d.kind == crate::render::ObjectKind::Namespace
                && !live.objects.contains_key(&plan::ObjectKey::of(d))
                && health.in_scope(&d.environment)
        })
        .map(|d| d.name.as_str())
        .collect();
    let lookup = match client {
        Some(c) if !missing.is_empty() => {
            observe::namespace_labels(c, &missing, options.concurrency).await?
        }
        _ => observe::NamespaceLookup::default(),
    };
    pass.time("ownership", t);
    health.existing_namespaces = lookup.labels;
    // Environments that could not be observed fail alone; the rest are planned as usual.
    for d in desired
        .iter()
        .filter(|d| d.kind == crate::render::ObjectKind::Namespace)
    {
        if let Some(e) = lookup.failed.get(&d.name) {
            health.failed.insert(
                d.environment.clone(),
                format!(
                    "reading namespace {}: {}",
                    d.name,
                    crate::apply::error_text(e)
                ),
            );
            pass.failure_reasons
                .insert(d.environment.clone(), FailureReason::of(e));
        }
    }
    let t = Instant::now();
    let desired = plan::Desired::judge(desired, live);
    pass.time("judge", t);
    let t = Instant::now();
    let to_check = desired.needs_dry_run(live, &health);
    pass.dry_runs = to_check.len();
    let mut dry_run_envs: BTreeSet<String> = BTreeSet::new();
    let answers = match client {
        Some(c) if !to_check.is_empty() => {
            dry_run_envs = to_check.iter().map(|d| d.environment.clone()).collect();
            if let Some(p) = &options.progress {
                p.phase(Phase::DryRun, dry_run_envs.len(), pass.dry_runs as u64);
            }
            let (answers, failures) =
                observe::dry_run(c, &to_check, options.concurrency, options.progress.as_ref())
                    .await;
            for f in failures {
                pass.failure_reasons
                    .entry(f.environment.clone())
                    .or_insert_with(|| FailureReason::of(&f.error));
                health.failed.entry(f.environment).or_insert_with(|| {
                    format!(
                        "dry-run of {}: {}",
                        f.key,
                        crate::apply::error_text(&f.error)
                    )
                });
            }
            answers
        }
        _ => BTreeMap::new(),
    };
    pass.time("dry-run", t);

    let t = Instant::now();
    pass.plan = plan::build(
        desired,
        live,
        &answers,
        &health,
        &options.prune,
        options.diffs,
    );
    pass.time("plan", t);
    Ok((pass, dry_run_envs))
}

/// Executes a planned pass.
pub async fn apply_pass(client: &Client, pass: &PassPlan, options: &PassOptions) -> Report {
    let progress = options.progress.as_ref();
    if let Some(p) = progress {
        let envs: std::collections::BTreeSet<&str> = pass
            .plan
            .changes
            .iter()
            .map(|c| c.environment.as_str())
            .collect();
        p.phase(Phase::Apply, envs.len(), pass.plan.changes.len() as u64);
    }
    apply::execute(client, &pass.plan, options.concurrency, progress).await
}
