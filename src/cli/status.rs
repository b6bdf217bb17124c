//! `envctl status`: every environment with what was last applied (revision, state, time), its
//! health judged now, its certificate's state and its last error.

use std::io::Write;

use clap::Args;

use super::args::{ClusterArgs, HealthArgs, InstanceArgs};
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
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
}

pub fn handle(args: &StatusArgs) -> Result<Exit, CliError> {
    let rows = runtime()?.block_on(async {
        let client = cluster::connect(args.cluster.kubeconfig.as_deref())
            .await
            .map_err(CliError::Connect)?;
        crate::status::read_all(
            &client,
            &args.instance.instance,
            args.health.progress_deadline,
        )
        .await
        .map_err(CliError::Status)
    })?;
    let text = match args.output {
        PlanFormat::Json => encode_json("the status", &rows)?,
        PlanFormat::Text => crate::status::table(&rows),
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(CliError::Output)?;
    Ok(Exit::Ok)
}
