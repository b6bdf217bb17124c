//! Step 7, report: the pass in the log (one line per pass that changed anything or was not
//! a drift check, with where its time went), held objects and pruned environments, and the
//! pass's duration metric.

use std::time::Duration;

use crate::apply::Report;
use crate::manifest::Loaded;
use crate::metrics::Metrics;
use crate::pass::PassPlan;
use crate::plan::Action;
use crate::status::Trigger;
use crate::vocab::ObjectKind;

/// How long the pass and its parts took.
pub struct Took {
    pub all: Duration,
    /// Loading the revision and deciding the rollout.
    pub load: Duration,
    pub apply: Duration,
}

/// Logs and counts one finished pass.
pub fn report(
    metrics: &Metrics,
    revision: &str,
    trigger: Trigger,
    (loaded, pass, applied): (&Loaded, &PassPlan, &Report),
    in_sync: usize,
    took: &Took,
) {
    for h in &pass.plan.held {
        tracing::warn!(object = %h.key, reason = %h.reason, "held");
    }
    for c in pass
        .plan
        .changes
        .iter()
        .filter(|c| c.action == Action::Delete && c.key.kind == ObjectKind::Namespace)
    {
        tracing::info!(namespace = %c.key.name, "pruned environment");
    }
    metrics.reconcile_seconds.observe(took.all.as_secs_f64());
    if !pass.plan.has_changes() && trigger == Trigger::Drift {
        tracing::debug!(
            ms = took.all.as_millis() as u64,
            "drift check: nothing to change"
        );
        return;
    }
    let step_ms = |step: &str| pass.timings.get(step).map_or(0, |d| d.as_millis() as u64);
    tracing::info!(
        revision = %revision,
        trigger = ?trigger,
        create = pass.plan.summary.create,
        update = pass.plan.summary.update,
        delete = pass.plan.summary.delete,
        unchanged = pass.plan.summary.unchanged,
        in_sync = in_sync,
        held = pass.plan.summary.held,
        invalid = loaded.invalid_names.len(),
        failed = applied.failures.len(),
        ms = took.all.as_millis() as u64,
        load_ms = took.load.as_millis() as u64,
        observe_ms = step_ms("observe"),
        in_sync_ms = step_ms("in-sync"),
        render_ms = step_ms("render"),
        judge_ms = step_ms("judge"),
        plan_ms = step_ms("plan"),
        dry_run_ms = step_ms("dry-run"),
        apply_ms = took.apply.as_millis() as u64,
        "reconciled"
    );
}
