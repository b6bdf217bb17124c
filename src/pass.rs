//! The reconcile pass shared by `envctl diff`, `envctl apply` and `envctl run`: loaded
//! manifests -> render -> observe -> plan, and optionally -> apply. (The certificate step
//! and status bookkeeping follow it in `cli::apply` and `controller::run`.)
//!
//! Owns the order of the named steps and their timings, nothing else: each step's logic
//! lives in its module. Never loops, sleeps or keeps state between passes (the controller
//! does).

use std::collections::BTreeMap;
use std::time::Instant;

use kube::Client;

use crate::apply::{self, Report};
use crate::cluster::FailureReason;
use crate::manifest::Loaded;
use crate::observe::{self, ObserveError};
use crate::plan::{self, Live, Plan, PrunePolicy, SourceHealth};
use crate::render::{self, RenderOptions};
use crate::vocab::{Phase, ProgressHandle};

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
    pub scope: Option<std::collections::BTreeSet<String>>,
    /// `--adopt`: take over existing namespaces that no envctl instance owns.
    pub adopt: bool,
    /// With sharding: the environments this replica may write (see `crate::shard`).
    pub writable: Option<crate::shard::Writable>,
    /// Where the pass reports its progress (the CLI's bar on a terminal).
    pub progress: Option<ProgressHandle>,
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

/// What a pass found, with timings of its steps.
#[derive(Debug)]
pub struct PassPlan {
    pub plan: Plan,
    pub dry_runs: usize,
    /// Annotations of the live namespaces, by namespace name (for status bookkeeping).
    pub live_namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub timings: BTreeMap<&'static str, std::time::Duration>,
    /// Why each environment in `plan.failed` failed (a metric label).
    pub failure_reasons: BTreeMap<String, FailureReason>,
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
    let mut timings = BTreeMap::new();
    let t = Instant::now();
    // A pass that plans a few environments (a push's, or a shard's) renders and reads only
    // those; the plan still knows every environment of the source, so none is pruned.
    let narrowed = options.scope.is_some() || options.writable.is_some();
    let envs: Vec<&crate::manifest::Environment> = loaded
        .environments
        .iter()
        .map(|e| &e.environment)
        .filter(|e| !narrowed || options.plans(&e.metadata.name))
        .collect();
    let desired = render::render(&envs, &options.render);
    timings.insert("render", t.elapsed());

    let t = Instant::now();
    let progress = options.progress.as_ref();
    let environments = loaded.environments.len();
    if let Some(p) = progress {
        p.phase(Phase::Observe, environments, 0);
    }
    let live = match (cache, client) {
        (Some(cache), _) if narrowed => {
            // Every namespace (for prune and ownership), and the objects of the planned
            // environments and of those no longer in the source.
            let source: std::collections::HashSet<String> = loaded
                .environments
                .iter()
                .map(|e| e.environment.namespace())
                .collect();
            let planned: std::collections::HashSet<String> =
                envs.iter().map(|e| e.namespace()).collect();
            cache.live_where(|ns| planned.contains(ns) || !source.contains(ns))?
        }
        (Some(cache), _) => cache.live()?,
        (None, Some(c)) => observe::list_owned(c, &options.render.instance).await?,
        (None, None) => Live::default(),
    };
    timings.insert("observe", t.elapsed());

    // Namespaces about to be created may exist already, unowned or another instance's:
    // read their labels so that the plan can refuse those environments.
    let t = Instant::now();
    let missing: Vec<&str> = desired
        .iter()
        .filter(|d| {
            d.kind == crate::render::ObjectKind::Namespace
                && !live.objects.contains_key(&plan::ObjectKey::of(d))
                && options.plans(&d.environment)
        })
        .map(|d| d.name.as_str())
        .collect();
    let lookup = match client {
        Some(c) if !missing.is_empty() => {
            observe::namespace_labels(c, &missing, options.concurrency).await?
        }
        _ => observe::NamespaceLookup::default(),
    };
    timings.insert("ownership", t.elapsed());
    // Environments that could not be observed fail alone; the rest are planned as usual.
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut failure_reasons: BTreeMap<String, FailureReason> = BTreeMap::new();
    for d in desired
        .iter()
        .filter(|d| d.kind == crate::render::ObjectKind::Namespace)
    {
        if let Some(e) = lookup.failed.get(&d.name) {
            failed.insert(
                d.environment.clone(),
                format!(
                    "reading namespace {}: {}",
                    d.name,
                    crate::apply::error_text(e)
                ),
            );
            failure_reasons.insert(d.environment.clone(), FailureReason::of(e));
        }
    }
    let mut health = SourceHealth {
        invalid_environments: loaded.invalid_names.clone(),
        unattributed_files: loaded.unattributed_files.clone(),
        scope: options.scope.clone(),
        existing_namespaces: lookup.labels,
        instance: options.render.instance.clone(),
        adopt: options.adopt,
        failed,
        writable: options.writable.clone(),
        environments: loaded
            .environments
            .iter()
            .map(|e| e.environment.metadata.name.clone())
            .collect(),
    };
    let t = Instant::now();
    let to_check = plan::needs_dry_run(&desired, &live, &health);
    let dry_runs = to_check.len();
    let answers = match client {
        Some(c) if !to_check.is_empty() => {
            if let Some(p) = progress {
                let envs: std::collections::BTreeSet<&str> =
                    to_check.iter().map(|d| d.environment.as_str()).collect();
                p.phase(Phase::DryRun, envs.len(), dry_runs as u64);
            }
            let (answers, failures) =
                observe::dry_run(c, &to_check, options.concurrency, progress).await;
            for f in failures {
                failure_reasons
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
    timings.insert("dry-run", t.elapsed());

    let t = Instant::now();
    let plan = plan::build(
        desired,
        &live,
        &answers,
        &health,
        &options.prune,
        options.diffs,
    );
    timings.insert("plan", t.elapsed());
    let live_namespaces = live
        .objects
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
        .collect();
    Ok(PassPlan {
        plan,
        dry_runs,
        live_namespaces,
        timings,
        failure_reasons,
    })
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
