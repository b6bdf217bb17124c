//! `envctl apply`: one pass that writes, records each environment's status on its namespace
//! (revision, state, time), then the certificate step; with `--wait`, waits until every
//! environment it changed is Ready.

use std::io::Write;

use clap::Args;

use super::args::{HealthArgs, PassArgs, parse_duration};
use super::cert_args::CertArgs;
use super::output::{PlanFormat, print_plan};
use super::{CliError, Exit, runtime};
use crate::certs::CertMode;
use crate::certs::acme::AcmeConfig;
use crate::certs::reconcile::Target;
use crate::cluster;
use crate::manifest::Loaded;
use crate::pass::{self, Outcome, PassOptions, PassPlan};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub pass: PassArgs,
    #[command(flatten)]
    pub certs: CertArgs,
    /// Wait until every environment this apply changed is Ready; exit non-zero, naming each
    /// one that is not with its reason, when one is Degraded or `--timeout` passes.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "5m", value_parser = parse_duration, requires = "wait")]
    pub timeout: std::time::Duration,
    #[command(flatten)]
    pub health: HealthArgs,
}

pub fn handle(args: &ApplyArgs) -> Result<Exit, CliError> {
    let (loaded, revision, options) = args.pass.prepare_revision()?;
    // Settings are checked before anything is written.
    let mode = args.certs.mode()?;
    let done = runtime()?.block_on(apply_then_certify(args, &loaded, &revision, &options, mode));
    if let Some(p) = &options.progress {
        p.finish();
    }
    done?;
    Ok(if loaded.is_valid() {
        Exit::Ok
    } else {
        Exit::Invalid
    })
}

/// The pass that writes, then the certificate step for the environments `pass::Outcome`
/// certifies.
async fn apply_then_certify(
    args: &ApplyArgs,
    loaded: &Loaded,
    revision: &str,
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
    if let Some(p) = &options.progress {
        p.finish(); // the plan is printed next
    }
    let mut out = std::io::stdout().lock();
    print_plan(&mut out, &planned, loaded, args.pass.output, Some(&report))?;
    if report.unreachable() && planned.plan.failed.is_empty() {
        return Err(CliError::Apply {
            failed: report.failures.len(),
            unreachable: true,
        });
    }
    // What the pass came to: every environment that failed (with its reason), the refused
    // ones, and those to certify (see `pass::Outcome`).
    let outcome = Outcome::of(loaded, &planned, &report, options);
    let changed = record_status(&client, loaded, revision, &planned, &outcome, options).await;
    let targets = &outcome.certificates;
    if let (Some(p), CertMode::Acme(_), false) = (&options.progress, &mode, targets.is_empty()) {
        p.phase(crate::vocab::Phase::Certificates, targets.len(), 0);
    }
    certificate_step(&client, args, mode, targets, &mut out, options).await?;
    if args.wait && outcome.failed.is_empty() {
        wait_until_ready(&client, args, &changed).await?;
    }
    if !outcome.failed.is_empty() {
        return Err(CliError::EnvironmentsFailed {
            count: outcome.failed.len(),
            names: outcome
                .failed
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if !outcome.refused.is_empty() {
        return Err(CliError::Refused {
            count: outcome.refused.len(),
        });
    }
    Ok(())
}

/// Records on each planned environment's namespace what this apply did: the revision, the
/// state, the error and (when it changed anything) the time. An environment with nothing
/// to change keeps the revision it was last applied at. Returns the environments changed.
async fn record_status(
    client: &kube::Client,
    loaded: &Loaded,
    revision: &str,
    planned: &PassPlan,
    outcome: &Outcome,
    options: &PassOptions,
) -> Vec<String> {
    use crate::status::{EnvState, EnvStatus};
    let touched = |name: &str| outcome.touched.get(name).is_some_and(|t| t.applied > 0);
    let mut statuses = Vec::new();
    for env in loaded.environments.iter().map(|e| &e.environment) {
        let name = env.metadata.name.as_str();
        if outcome.refused.contains_key(name) {
            continue;
        }
        let namespace = env.namespace();
        let recorded = planned.live_namespaces.get(&namespace);
        let failure = outcome.failed.get(name);
        let state = if failure.is_some() {
            EnvState::Failed
        } else {
            EnvState::Applied
        };
        let at = |k: &str| recorded.and_then(|a| a.get(k)).cloned();
        let unchanged = !touched(name)
            && at(crate::status::STATE_ANNOTATION).as_deref() == Some(state.as_str())
            && at(crate::status::REVISION_ANNOTATION).is_some()
            && state == EnvState::Applied;
        if unchanged || (recorded.is_none() && !touched(name)) {
            continue;
        }
        statuses.push(EnvStatus {
            environment: name.to_string(),
            namespace,
            revision: revision.to_string(),
            state,
            error: failure.map(|f| f.message.clone()),
            certificate: None,
        });
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let concurrency = options.concurrency.max(1);
    let results: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter(
            statuses
                .iter()
                .map(|s| crate::status::annotate(client, s, &now)),
        ),
        concurrency,
    ))
    .await;
    for e in results.into_iter().filter_map(Result::err) {
        eprintln!(
            "warning: {}",
            crate::vocab::error_chain(&e).replace('\n', " ")
        );
    }
    outcome
        .touched
        .iter()
        .filter(|(n, t)| t.applied > 0 && !outcome.failed.contains_key(*n))
        .map(|(n, _)| n.clone())
        .collect()
}

/// `--wait`: polls the environments' health once a second until every one is Ready, one is
/// Degraded, or the timeout passes; prints each change of the waiting set to stderr.
async fn wait_until_ready(
    client: &kube::Client,
    args: &ApplyArgs,
    environments: &[String],
) -> Result<(), CliError> {
    use crate::health::HealthState;
    if environments.is_empty() {
        return Ok(());
    }
    let instance = &args.pass.source.policy.instance;
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last_line = String::new();
    loop {
        let inputs = crate::observe::read_health_inputs(client, instance, args.health.pods())
            .await
            .map_err(CliError::Observe)?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let health: Vec<(&String, crate::health::Health)> = environments
            .iter()
            .map(|e| {
                let h = inputs.get(e).map_or_else(
                    || crate::health::Health::unknown("no StatefulSet observed yet"),
                    |o| crate::health::assess(o, now, args.health.progress_deadline),
                );
                (e, h)
            })
            .collect();
        let not_ready: Vec<&(&String, crate::health::Health)> = health
            .iter()
            .filter(|(_, h)| h.state != HealthState::Ready)
            .collect();
        if not_ready.is_empty() {
            eprintln!(
                "{} environment(s) Ready after {:.1}s",
                environments.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let details = || {
            not_ready
                .iter()
                .map(|(e, h)| format!("  {e}: {} ({}): {}", h.state, h.reason, h.message))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let degraded = not_ready
            .iter()
            .any(|(_, h)| h.state == HealthState::Degraded);
        let timed_out = tokio::time::Instant::now() >= deadline;
        if degraded || timed_out {
            return Err(CliError::NotReady {
                count: not_ready.len(),
                after: if degraded {
                    String::new()
                } else {
                    format!(" within {}s", args.timeout.as_secs())
                },
                details: details(),
            });
        }
        let line = format!(
            "waiting for {} of {} environment(s): {}",
            not_ready.len(),
            environments.len(),
            not_ready
                .iter()
                .map(|(e, h)| format!("{e} {} ({})", h.state, h.reason))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + std::time::Duration::from_secs(1)),
        )
        .await;
    }
}

/// Orders, reports or skips certificates as `mode` says; prints the outcome.
async fn certificate_step(
    client: &kube::Client,
    args: &ApplyArgs,
    mode: CertMode,
    targets: &[Target],
    out: &mut impl Write,
    options: &PassOptions,
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
        apply_certificates(client, &args.certs, config, instance, concurrency, targets).await;
    if let Some(p) = &options.progress {
        p.finish(); // the certificates' report is printed next
    }
    let report = report?;
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
