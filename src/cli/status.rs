//! `envctl status`: every environment with what was last applied (revision, state, time), its
//! health judged now, its certificate's state and its last error.

use std::io::Write;

use clap::Args;

use super::args::{ClusterArgs, HealthArgs, InstanceArgs, RegionArgs};
use super::output::{PlanFormat, encode_json};
use super::{CliError, Exit, runtime};
use crate::cluster;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub regions: RegionArgs,
    /// The controller's namespace, where it records the rollout's status.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub controller_namespace: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
}

pub fn handle(args: &StatusArgs) -> Result<Exit, CliError> {
    let (mut rows, rollout, members) = runtime()?.block_on(async {
        let client = cluster::connect(args.cluster.kubeconfig.as_deref())
            .await
            .map_err(CliError::Connect)?;
        let members = async {
            crate::controller::shard::members_now(
                &client,
                Some(&args.controller_namespace),
                &args.instance.instance,
            )
            .await
            .map_err(crate::status::StatusError::List)
        };
        futures::try_join!(
            crate::status::read_all(
                &client,
                &args.instance.instance,
                args.health.progress_deadline,
                args.health.pods(),
            ),
            crate::status::read_rollout(
                &client,
                &args.controller_namespace,
                &args.instance.instance
            ),
            members,
        )
        .map_err(CliError::Status)
    })?;
    if let Some(regions) = args.regions.set() {
        rows.retain(|r| regions.contains(&r.region));
    }
    // Sharded: each environment's owner among the live members (as the replicas compute it).
    if !members.is_empty() {
        for r in &mut rows {
            r.owner = Some(
                crate::shard::owner(&r.environment, &members)
                    .unwrap_or("-")
                    .to_string(),
            );
        }
    }
    // A rollout that was recorded but whose policy is gone is no longer news.
    let rollout = rollout.filter(|r| !r.policy.is_empty());
    let text = match args.output {
        PlanFormat::Json => encode_json(
            "the status",
            &serde_json::json!({"environments": rows, "rollout": rollout}),
        )?,
        PlanFormat::Text => {
            let mut text = String::new();
            if let Some(r) = &rollout {
                text.push_str(&r.summary());
                text.push('\n');
                for (i, w) in r.waves.iter().enumerate() {
                    text.push_str(&format!(
                        "  wave {} {}: {} environment(s), {} done, {} in flight, {} waiting\n",
                        i + 1,
                        w.name,
                        w.environments,
                        w.done,
                        w.in_flight,
                        w.waiting
                    ));
                }
                text.push('\n');
            }
            text.push_str(&crate::status::table(&rows));
            text
        }
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(CliError::Output)?;
    Ok(Exit::Ok)
}
