//! `envctl apply`: one pass that writes, then the certificate step.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use clap::Args;

use super::args::PassArgs;
use super::cert_args::CertArgs;
use super::output::{PlanFormat, failed_environments, print_plan};
use super::{CliError, Exit, runtime};
use crate::certs::CertMode;
use crate::certs::acme::AcmeConfig;
use crate::certs::reconcile::Target;
use crate::cluster;
use crate::manifest::Loaded;
use crate::pass::{self, PassOptions, PassPlan};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub pass: PassArgs,
    #[command(flatten)]
    pub certs: CertArgs,
}

pub fn handle(args: &ApplyArgs) -> Result<Exit, CliError> {
    let (loaded, options) = args.pass.prepare()?;
    // Settings are checked before anything is written.
    let mode = args.certs.mode()?;
    runtime()?.block_on(apply_then_certify(args, &loaded, &options, mode))?;
    Ok(if loaded.is_valid() {
        Exit::Ok
    } else {
        Exit::Invalid
    })
}

/// The pass that writes, then the certificate step for every environment that got through.
async fn apply_then_certify(
    args: &ApplyArgs,
    loaded: &Loaded,
    options: &PassOptions,
    mode: CertMode,
) -> Result<(), CliError> {
    let client = cluster::connect(args.pass.cluster.kubeconfig.as_deref())
        .await
        .map_err(CliError::Connect)?;
    let planned = pass::plan_pass(Some(&client), None, loaded, options)
        .await
        .map_err(CliError::Observe)?;
    let report = pass::apply_pass(&client, &planned, options).await;
    let mut out = std::io::stdout().lock();
    print_plan(&mut out, &planned, loaded, args.pass.output, Some(&report))?;
    if report.unreachable() && planned.plan.failed.is_empty() {
        return Err(CliError::Apply {
            failed: report.failures.len(),
            unreachable: true,
        });
    }
    // Every environment that failed, with its reason; the others were applied.
    let failed = failed_environments(&planned.plan, &report);
    let targets = certificate_targets(loaded, &planned, &failed);
    certificate_step(&client, args, mode, &targets, &mut out).await?;
    if !failed.is_empty() {
        return Err(CliError::EnvironmentsFailed {
            count: failed.len(),
            names: failed.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    if !planned.plan.refused.is_empty() {
        return Err(CliError::Refused {
            count: planned.plan.refused.len(),
        });
    }
    Ok(())
}

/// The TLS environments to certify: a refused or failed environment gets nothing more, its
/// certificate included.
fn certificate_targets(
    loaded: &Loaded,
    planned: &PassPlan,
    failed: &BTreeMap<String, String>,
) -> Vec<Target> {
    let skip: BTreeSet<&str> = planned
        .plan
        .refused
        .iter()
        .map(|r| r.environment.as_str())
        .chain(failed.keys().map(String::as_str))
        .collect();
    let envs = loaded
        .environments
        .iter()
        .map(|e| &e.environment)
        .filter(|e| !skip.contains(e.metadata.name.as_str()));
    crate::certs::reconcile::targets(envs)
}

/// Orders, reports or skips certificates as `mode` says; prints the outcome.
async fn certificate_step(
    client: &kube::Client,
    args: &ApplyArgs,
    mode: CertMode,
    targets: &[Target],
    out: &mut impl Write,
) -> Result<(), CliError> {
    let config = match mode {
        CertMode::Skip => return Ok(()),
        CertMode::Unconfigured => return report_unconfigured(client, targets).await,
        CertMode::Acme(_) if targets.is_empty() => return Ok(()),
        CertMode::Acme(config) => config,
    };
    let instance = &args.pass.source.policy.instance;
    let concurrency = args.pass.cluster.concurrency;
    let report =
        apply_certificates(client, &args.certs, config, instance, concurrency, targets).await?;
    let text = report.text();
    match args.pass.output {
        PlanFormat::Text => out.write_all(text.as_bytes()),
        PlanFormat::Json => std::io::stderr().write_all(text.as_bytes()),
    }
    .map_err(CliError::Output)?;
    match report.tally().failed {
        0 => Ok(()),
        failed => Err(CliError::CertificatesFailed { failed }),
    }
}

/// `apply` without an ACME directory: one warning, and every TLS environment's namespace
/// says why it has no certificate (`envctl status` shows it).
async fn report_unconfigured(client: &kube::Client, targets: &[Target]) -> Result<(), CliError> {
    if targets.is_empty() {
        return Ok(());
    }
    eprintln!(
        "warning: {} TLS environment(s) applied without certificates: no ACME directory is configured (--acme-directory letsencrypt, letsencrypt-staging or a URL; --skip-certificates silences this)",
        targets.len()
    );
    let namespaces: Vec<&str> = targets.iter().map(|t| t.namespace.as_str()).collect();
    crate::status::note_certificates(client, &namespaces, crate::certs::UNCONFIGURED_NOTE)
        .await
        .map_err(CliError::Status)
}

/// The certificate step of `envctl apply`, bounded in time; answers HTTP-01 on
/// `--acme-http01-listen` while it runs.
async fn apply_certificates(
    client: &kube::Client,
    args: &CertArgs,
    config: AcmeConfig,
    instance: &str,
    concurrency: usize,
    targets: &[Target],
) -> Result<crate::certs::reconcile::CertReport, CliError> {
    let settings = args.ledger.settings(instance, concurrency);
    let challenges = std::sync::Arc::new(crate::certs::challenges::Challenges::new(
        client,
        &settings.namespace,
        instance,
    ));
    let server = match args.acme_http01_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CliError::ChallengeListen { addr, source })?;
            let router = crate::certs::challenges::challenge_router(challenges.clone());
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            }))
        }
        None => None,
    };
    let certs = crate::certs::reconcile::Certs::connect(client, config, settings, challenges)
        .await
        .map_err(|e| CliError::Certificates(Box::new(e)))?;
    let events = crate::status::Events::new(client.clone(), instance);
    let result = certs
        .reconcile(targets, Some(&events), None)
        .await
        .map_err(|e| CliError::Certificates(Box::new(e)));
    if let Some(s) = server {
        s.abort();
    }
    result
}
