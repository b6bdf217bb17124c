//! Step 4, plan and apply: the shared pass (`crate::pass`) plans from the watch cache and
//! applies; with `--shard`, a change of the member set mid-pass stops its writes (some of
//! its environments may have become another replica's) and the next pass plans again.

use std::time::{Duration, Instant};

use super::parts::{Cluster, Shard};
use crate::apply::Report;
use crate::manifest::Loaded;
use crate::metrics::{ApiVerb, Metrics};
use crate::observe::ObserveError;
use crate::pass::{PassOptions, PassPlan, apply_pass, plan_pass};
use crate::plan::Action;

#[derive(Debug, thiserror::Error)]
#[error("planning from the watch cache")]
pub struct PlanError(#[source] ObserveError);

/// How the pass's writes went.
pub enum Applied {
    /// Every write was made or failed on its own.
    Done { report: Report, took: Duration },
    /// The shard's members changed mid-pass: the remaining writes are left to the next one.
    Cancelled,
}

/// Plans the pass and applies it; counts its requests.
pub async fn plan_and_apply(
    cluster: &Cluster,
    shard: Option<&Shard>,
    metrics: &Metrics,
    loaded: &Loaded,
    options: &PassOptions,
) -> Result<(PassPlan, Applied), PlanError> {
    let pass = plan_pass(Some(&cluster.client), Some(&cluster.cache), loaded, options)
        .await
        .map_err(PlanError)?;
    metrics.count_api(ApiVerb::DryRun, pass.dry_runs as u64);
    let applying = Instant::now();
    let apply = apply_pass(&cluster.client, &pass, options);
    let report = match shard {
        Some(shard) => {
            let mut generation = shard.generation.clone();
            generation.borrow_and_update();
            let changed = async move {
                if generation.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                report = apply => report,
                _ = changed => return Ok((pass, Applied::Cancelled)),
            }
        }
        None => apply.await,
    };
    let took = applying.elapsed();
    let writes = pass
        .plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Delete)
        .count();
    metrics.count_api(ApiVerb::Apply, writes as u64);
    metrics.count_api(ApiVerb::Delete, (pass.plan.changes.len() - writes) as u64);
    Ok((pass, Applied::Done { report, took }))
}
