//! `envctl diff`: the dry-run plan against the live cluster (or against nothing).

use clap::Args;

use super::args::{LiveMode, PassArgs};
use super::output::print_plan;
use super::{CliError, Exit, runtime};
use crate::{cluster, pass};

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub pass: PassArgs,
    /// What to compare with: the cluster, or `none` (an empty cluster; no cluster needed).
    #[arg(long, value_enum, default_value_t = LiveMode::Cluster)]
    pub live: LiveMode,
}

pub fn handle(args: &DiffArgs) -> Result<Exit, CliError> {
    let (loaded, options) = args.pass.prepare()?;
    let kubeconfig = args.pass.cluster.kubeconfig.as_deref();
    let planned = runtime()?.block_on(async {
        let client = match args.live {
            LiveMode::None => None,
            LiveMode::Cluster => Some(
                cluster::connect(kubeconfig)
                    .await
                    .map_err(CliError::Connect)?,
            ),
        };
        pass::plan_pass(client.as_ref(), None, &loaded, &options)
            .await
            .map_err(CliError::Observe)
    });
    if let Some(p) = &options.progress {
        p.finish();
    }
    let planned = planned?;
    print_plan(
        &mut std::io::stdout().lock(),
        &planned,
        &loaded,
        args.pass.output,
        None,
    )?;
    let plan = &planned.plan;
    Ok(if !plan.refused.is_empty() || !plan.failed.is_empty() {
        Exit::Failure
    } else if !loaded.is_valid() {
        Exit::Invalid
    } else if plan.has_changes() {
        Exit::Changes
    } else {
        Exit::Ok
    })
}
