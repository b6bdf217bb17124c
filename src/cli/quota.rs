//! `envctl quota`: the certificate quota ledger, bucket by bucket.

use std::io::Write;

use clap::Args;

use super::args::{ClusterArgs, InstanceArgs};
use super::cert_args::LedgerArgs;
use super::output::PlanFormat;
use super::{CliError, Exit, runtime};
use crate::certs::store::LedgerStore;
use crate::cluster;

#[derive(Debug, Args)]
pub struct QuotaArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
}

pub fn handle(args: &QuotaArgs) -> Result<Exit, CliError> {
    let instance = &args.instance.instance;
    let settings = args.ledger.settings(instance, args.cluster.concurrency);
    let (doc, store) = runtime()?.block_on(async {
        let client = cluster::connect(args.cluster.kubeconfig.as_deref())
            .await
            .map_err(CliError::Connect)?;
        let store = LedgerStore::new(
            &client,
            &settings.namespace,
            instance,
            settings.overrides.clone(),
            settings.margin,
        );
        let (doc, _) = store
            .load()
            .await
            .map_err(|e| CliError::Quota(Box::new(e)))?;
        Ok::<_, CliError>((doc, store))
    })?;
    let json = args.output == PlanFormat::Json;
    let text = crate::certs::reconcile::quota_report(&doc, &store, json).map_err(|message| {
        CliError::Encode {
            what: "the quota",
            format: "JSON",
            message,
        }
    })?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(CliError::Output)?;
    Ok(Exit::Ok)
}
