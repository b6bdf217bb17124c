//! `envctl quota`: the certificate quota ledger, bucket by bucket; `envctl quota plan`: the
//! fleet's certificates simulated against it (`certs::plan`). Reads; never writes.

use std::io::Write;

use clap::Args;

use super::args::{ClusterArgs, InstanceArgs, SourceArgs};
use super::cert_args::LedgerArgs;
use super::output::{PlanFormat, encode_json, print_diagnostics};
use super::{CliError, Exit, runtime};
use crate::certs::ledger::Limit;
use crate::certs::plan::{Assumptions, EnvPlan, Member, Plan, Suggestion};
use crate::certs::store::{CertStore, LedgerDoc, LedgerStore, rfc3339};
use crate::cluster;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QuotaArgs {
    #[command(subcommand)]
    pub command: Option<QuotaCommand>,
    #[command(flatten)]
    pub ledger: LedgerView,
}

#[derive(Debug, clap::Subcommand)]
pub enum QuotaCommand {
    /// Simulate the next days of the fleet's certificates against the ledger and the limits
    /// recorded in it: when each environment gets its first certificate, when each renewal
    /// is placed, whether the fleet fits, and if not, who goes without a certificate and
    /// the smallest registered-domain limit to ask Let's Encrypt for.
    /// Exit 0: the fleet fits; 1: it does not; 2: invalid input.
    Plan(Box<PlanArgs>),
}

/// Where the ledger is, and how to print.
#[derive(Debug, Args)]
pub struct LedgerView {
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

/// Connects and reads the ledger as a reader sees it (`LedgerArgs::reader`).
async fn read_ledger(
    cluster: &ClusterArgs,
    ledger: &LedgerArgs,
    instance: &str,
) -> Result<(kube::Client, LedgerStore, LedgerDoc), CliError> {
    let client = cluster::connect(cluster.kubeconfig.as_deref())
        .await
        .map_err(CliError::Connect)?;
    let store = ledger.reader(&client, instance);
    let (doc, _) = store
        .load()
        .await
        .map_err(|e| CliError::Quota(Box::new(e)))?;
    Ok((client, store, doc))
}

pub fn handle(args: &QuotaArgs) -> Result<Exit, CliError> {
    match &args.command {
        Some(QuotaCommand::Plan(plan)) => handle_plan(plan),
        None => handle_quota(&args.ledger),
    }
}

fn handle_quota(args: &LedgerView) -> Result<Exit, CliError> {
    let instance = &args.instance.instance;
    let (_, store, doc) =
        runtime()?.block_on(read_ledger(&args.cluster, &args.ledger, instance))?;
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

/// `envctl quota plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// How many days to simulate.
    #[arg(long, default_value_t = 90)]
    pub days: u64,
    /// The profile of environments that name none (as `apply` and `run` are given it).
    #[arg(long, env = "ENVCTL_ACME_PROFILE")]
    pub acme_profile: Option<String>,
    /// A profile's certificate lifetime, PROFILE=DURATION (repeatable); known: classic
    /// 90 days (also no profile), tlsserver 45 days, shortlived 160 hours.
    #[arg(long = "lifetime", value_name = "PROFILE=DURATION", value_parser = parse_lifetime)]
    pub lifetimes: Vec<(String, u64)>,
    /// Plan for a CA without ARI: renewals are then charged to their exact set of names.
    #[arg(long)]
    pub no_ari: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
}

fn parse_lifetime(s: &str) -> Result<(String, u64), String> {
    let (name, d) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PROFILE=DURATION such as shortlived=160h, got {s:?}"))?;
    let secs = crate::duration::parse(d.trim())?.as_secs();
    if secs == 0 {
        return Err(format!("{s:?}: the lifetime must be above zero"));
    }
    Ok((name.trim().to_string(), secs))
}

/// Let's Encrypt's profiles and their certificates' lifetimes (docs/profiles, 2026).
const KNOWN_LIFETIMES: [(&str, u64); 3] = [
    ("classic", 90 * 86_400),
    ("tlsserver", 45 * 86_400),
    ("shortlived", 160 * 3_600),
];

impl PlanArgs {
    fn lifetime(&self, profile: Option<&str>) -> Option<u64> {
        let name = profile.unwrap_or("classic");
        self.lifetimes
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .or_else(|| {
                KNOWN_LIFETIMES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| *s)
            })
    }
}

fn handle_plan(args: &PlanArgs) -> Result<Exit, CliError> {
    let loaded = args.source.load()?;
    if !loaded.is_valid() {
        print_diagnostics(&mut std::io::stderr().lock(), &loaded.diagnostics)?;
        let files: std::collections::BTreeSet<&String> =
            loaded.diagnostics.iter().map(|d| &d.file).collect();
        return Err(CliError::Invalid { count: files.len() });
    }
    let instance = &args.source.policy.instance;
    let settings = args.ledger.settings(instance, args.cluster.concurrency);
    let (doc, copies, ledger_name) = runtime()?.block_on(async {
        let (client, store, doc) = read_ledger(&args.cluster, &args.ledger, instance).await?;
        let tls = loaded
            .environments
            .iter()
            .filter(|e| e.environment.spec.tls.enabled)
            .map(|e| e.environment.metadata.name.as_str());
        let copies = CertStore::new(&client, &settings.namespace, instance)
            .copies(tls)
            .await
            .map_err(|e| CliError::Quota(Box::new(e)))?;
        Ok::<_, CliError>((doc, copies, format!("{}/{}", store.namespace, store.name)))
    })?;
    let mut members = Vec::new();
    for e in &loaded.environments {
        let env = &e.environment;
        if !env.spec.tls.enabled {
            continue;
        }
        let profile = env
            .spec
            .tls
            .profile
            .clone()
            .or_else(|| args.acme_profile.clone());
        let lifetime = self_lifetime(args, profile.as_deref(), &e.origin.file)?;
        let names = crate::certs::sorted_names(std::slice::from_ref(&env.spec.hostname));
        members.push(Member {
            environment: env.metadata.name.clone(),
            current: copies
                .get(&env.metadata.name)
                .and_then(|c| c.info.clone())
                .filter(|c| c.covers(&names)),
            names,
            profile,
            lifetime,
            waiting_since: doc.queued.get(&env.metadata.name).copied(),
        });
    }
    let account = doc
        .buckets
        .keys()
        .into_iter()
        .find(|k| k.limit == Limit::NewOrdersPerAccount)
        .map_or_else(|| "account".to_string(), |k| k.key);
    let assume = Assumptions { ari: !args.no_ari };
    let plan = crate::certs::plan::plan(
        &members,
        &doc.buckets,
        &account,
        crate::certs::unix_now(),
        args.days,
        assume,
    );
    let text = match args.output {
        PlanFormat::Json => encode_json(
            "the quota plan",
            &PlanView::of(&plan, &doc.buckets, &ledger_name),
        )?,
        PlanFormat::Text => plan_text(&plan, &doc.buckets, &ledger_name),
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(CliError::Output)?;
    Ok(if plan.fits { Exit::Ok } else { Exit::Changes })
}

fn self_lifetime(args: &PlanArgs, profile: Option<&str>, file: &str) -> Result<u64, CliError> {
    args.lifetime(profile).ok_or_else(|| CliError::Setting {
        setting: "--lifetime",
        message: format!(
            "{file}: profile {:?} has no known lifetime; give it with --lifetime {}=DURATION",
            profile.unwrap_or_default(),
            profile.unwrap_or_default()
        ),
    })
}

/// The plan as JSON: times in RFC 3339.
#[derive(serde::Serialize)]
struct PlanView<'a> {
    ledger: &'a str,
    from: String,
    until: String,
    ari: bool,
    fits: bool,
    limits: &'a crate::certs::ledger::Limits,
    new_orders: usize,
    renewals: usize,
    environments: Vec<EnvView<'a>>,
    suggestions: Vec<SuggestionView<'a>>,
    unfixable: &'a [String],
}

#[derive(serde::Serialize)]
struct EnvView<'a> {
    environment: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_certificate: Option<String>,
    renewals: Vec<String>,
    without_certificate: Vec<[String; 2]>,
}

#[derive(serde::Serialize)]
struct SuggestionView<'a> {
    registered_domain: &'a str,
    limit: Limit,
    capacity: u32,
    window: String,
    /// The flag that plans (and runs) with it, once Let's Encrypt grants it.
    flag: String,
}

fn at(t: u64) -> String {
    rfc3339(t as i64)
}

fn override_flag(s: &Suggestion) -> String {
    format!(
        "--acme-limit-override {}={}/{}h",
        s.registered_domain,
        s.capacity,
        s.window_seconds / 3600
    )
}

impl<'a> PlanView<'a> {
    fn of(p: &'a Plan, ledger: &'a crate::certs::ledger::Ledger, name: &'a str) -> Self {
        PlanView {
            ledger: name,
            from: at(p.from),
            until: at(p.until),
            ari: p.ari,
            fits: p.fits,
            limits: &ledger.limits,
            new_orders: p.new_orders,
            renewals: p.renewals,
            environments: p
                .environments
                .iter()
                .map(|e| EnvView {
                    environment: &e.environment,
                    profile: e.profile.as_deref(),
                    first_certificate: e.first_certificate.map(at),
                    renewals: e.renewals.iter().copied().map(at).collect(),
                    without_certificate: e
                        .without_certificate
                        .iter()
                        .map(|(a, b)| [at(*a), at(*b)])
                        .collect(),
                })
                .collect(),
            suggestions: p
                .suggestions
                .iter()
                .map(|s| SuggestionView {
                    registered_domain: &s.registered_domain,
                    limit: s.limit,
                    capacity: s.capacity,
                    window: format!("{}h", s.window_seconds / 3600),
                    flag: override_flag(s),
                })
                .collect(),
            unfixable: &p.unfixable,
        }
    }
}

fn plan_text(p: &Plan, ledger: &crate::certs::ledger::Ledger, name: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let days = (p.until - p.from) / 86_400;
    let _ = writeln!(
        out,
        "quota plan: {} TLS environment(s), {days} days from {} to {}; ledger {name}",
        p.environments.len(),
        at(p.from),
        at(p.until)
    );
    let renewals = if p.ari {
        "renewals by ARI (exempt from every limit)"
    } else {
        "renewals without ARI (charged to their exact set of names)"
    };
    let _ = writeln!(out, "limits: {}; {renewals}", ledger.limits.describe());
    let short: Vec<&EnvPlan> = p
        .environments
        .iter()
        .filter(|e| !e.without_certificate.is_empty())
        .collect();
    let _ = writeln!(
        out,
        "{}: {} new certificate(s) and {} renewal(s) placed; {} of {} environment(s) go without a valid certificate",
        if p.fits { "FITS" } else { "DOES NOT FIT" },
        p.new_orders,
        p.renewals,
        short.len(),
        p.environments.len()
    );
    let _ = writeln!(
        out,
        "\n{:<40} {:<11} {:<21} {:>8}  {:<21} WITHOUT A VALID CERTIFICATE",
        "ENVIRONMENT", "PROFILE", "FIRST CERTIFICATE", "RENEWALS", "NEXT RENEWAL"
    );
    for e in &p.environments {
        let without: Vec<String> = e
            .without_certificate
            .iter()
            .map(|(a, b)| {
                let hours = (b - a) as f64 / 3600.0;
                format!("{} to {} ({hours:.1} h)", at(*a), at(*b))
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<40} {:<11} {:<21} {:>8}  {:<21} {}",
            e.environment,
            e.profile.as_deref().unwrap_or("-"),
            e.first_certificate.map_or_else(|| "-".to_string(), at),
            e.renewals.len(),
            e.renewals
                .first()
                .map_or_else(|| "-".to_string(), |t| at(*t)),
            if without.is_empty() {
                "-".to_string()
            } else {
                without.join(", ")
            }
        );
    }
    for s in &p.suggestions {
        let _ = writeln!(
            out,
            "\nto fit: ask Let's Encrypt to raise {} for {} to {} per {} hours; then plan and run with {}",
            s.limit,
            s.registered_domain,
            s.capacity,
            s.window_seconds / 3600,
            override_flag(s)
        );
    }
    for d in &p.unfixable {
        let _ = writeln!(
            out,
            "\n{d}: no registered-domain limit makes it fit; another limit (the exact set's 5 a week, or the account's orders) holds it back"
        );
    }
    out
}
