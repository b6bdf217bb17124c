//! The command line: argument definitions and one `run` that dispatches to the pipeline's
//! stages. Owns printing and exit codes; holds no reconcile logic of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::certs::CertMode;
use crate::certs::acme::AcmeConfig;
use crate::certs::ledger::BucketSpec;
use crate::certs::reconcile::CertSettings;
use crate::cluster::{self, ConnectError};
use crate::diagnostic::Diagnostic;
use crate::manifest::{self, Limits, LoadOptions, Loaded};
use crate::observe::ObserveError;
use crate::pass::{self, PassOptions, PassPlan};
use crate::plan::{MaxPrune, PrunePolicy};
use crate::render::{self, RenderOptions};
use crate::source;

/// Exit codes, as kubectl diff's: 0 nothing to do, 1 changes, 2 invalid input, 3 cluster
/// unreachable or refused, 4 any other failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Changes = 1,
    Invalid = 2,
    Cluster = 3,
    Failure = 4,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("writing output")]
    Output(#[source] std::io::Error),
    #[error("encoding {what} as {format}: {message}")]
    Encode {
        what: &'static str,
        format: &'static str,
        message: String,
    },
    #[error("{count} invalid input file(s); nothing was rendered")]
    Invalid { count: usize },
    #[error("connecting to the cluster")]
    Connect(#[source] ConnectError),
    #[error("reading the cluster")]
    Observe(#[source] ObserveError),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("{what} failed: a worker thread panicked (a bug; please report it)")]
    Panicked { what: &'static str },
    #[error("{count} environment(s) failed (the others were applied): {names}")]
    EnvironmentsFailed { count: usize, names: String },
    #[error("{count} environment(s) were refused: their namespace is not this instance's")]
    Refused { count: usize },
    #[error("{failed} object(s) could not be written")]
    Apply { failed: usize, unreachable: bool },
    #[error("reading the Git source")]
    Git(#[source] crate::source::git::GitError),
    #[error("creating the cache folder {path}")]
    CacheDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the webhook secret from {path}")]
    WebhookSecret {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("running the controller")]
    Run(#[source] crate::controller::run::RunError),
    #[error("reading environment status")]
    Status(#[source] crate::status::StatusError),
    #[error("{setting}: {message}")]
    Setting {
        setting: &'static str,
        message: String,
    },
    #[error("bringing certificates up to date")]
    Certificates(#[source] Box<crate::certs::reconcile::CertError>),
    #[error("reading the quota ledger")]
    Quota(#[source] Box<crate::certs::store::StoreError>),
    #[error("{failed} certificate(s) could not be issued")]
    CertificatesFailed { failed: usize },
    #[error("answering HTTP-01 challenges on {addr}")]
    ChallengeListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    pub fn exit_code(&self) -> Exit {
        match self {
            CliError::Invalid { .. } => Exit::Invalid,
            CliError::Connect(_) => Exit::Cluster,
            CliError::Observe(e) if e.is_unreachable() => Exit::Cluster,
            CliError::Apply {
                unreachable: true, ..
            } => Exit::Cluster,
            CliError::Status(_) => Exit::Cluster,
            CliError::Git(_) => Exit::Invalid,
            CliError::Setting { .. } => Exit::Invalid,
            CliError::Quota(e) if e.is_unreachable() => Exit::Cluster,
            CliError::Certificates(e) if matches!(&**e, crate::certs::reconcile::CertError::Store(s) if s.is_unreachable()) => {
                Exit::Cluster
            }
            _ => Exit::Failure,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "envctl",
    version,
    about = "GitOps controller for Materialize-style cloud environments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests and report every problem as FILE:LINE:COL: error: MESSAGE.
    Validate(ManifestArgs),
    /// Print the desired Kubernetes objects of every environment, in apply order.
    Render {
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Yaml)]
        output: Format,
    },
    /// Show what `apply` would change: a unified diff per object and a summary.
    /// Exit 0: nothing to change; 1: changes; 2: invalid input; 3: cluster unreachable.
    Diff {
        #[command(flatten)]
        pass: Box<PassArgs>,
        /// What to compare with: the cluster, or `none` (an empty cluster; no cluster needed).
        #[arg(long, value_enum, default_value_t = LiveMode::Cluster)]
        live: LiveMode,
    },
    /// One reconcile pass: server-side apply what changed, delete what is gone (with --prune),
    /// then bring every TLS environment's certificate up to date (unless --skip-certificates).
    Apply {
        #[command(flatten)]
        pass: Box<PassArgs>,
        #[command(flatten)]
        certs: Box<CertArgs>,
    },
    /// The GitOps controller: poll the source, reconcile every new revision, revert drift.
    Run(Box<RunArgs>),
    /// Print every environment with its applied revision, state and last error.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// This envctl's instance name.
        #[arg(long, env = "ENVCTL_INSTANCE", default_value = crate::render::DEFAULT_INSTANCE)]
        instance: String,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Print the certificate quota ledger: every bucket with used and remaining tokens and
    /// when the next token frees up, per ACME account, registered domain, name set and name.
    Quota {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// This envctl's instance name.
        #[arg(long, env = "ENVCTL_INSTANCE", default_value = crate::render::DEFAULT_INSTANCE)]
        instance: String,
        #[command(flatten)]
        ledger: LedgerArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Print the manifest's JSON Schema (the committed schemas/environment.schema.json).
    Schema,
}

/// Where the quota ledger lives and how it is configured.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// A registered domain's new-certificates limit, when Let's Encrypt raised it:
    /// DOMAIN=COUNT/WINDOW, e.g. example.cloud=1000/168h (repeat, or separate with commas).
    #[arg(
        long = "acme-limit-override",
        env = "ENVCTL_ACME_LIMIT_OVERRIDES",
        value_delimiter = ',',
        value_parser = parse_limit_override
    )]
    pub overrides: Vec<(String, BucketSpec)>,
    /// Tokens kept in reserve in every quota bucket (for issuance outside envctl).
    #[arg(long, env = "ENVCTL_ACME_SAFETY_MARGIN", default_value_t = 0)]
    pub acme_safety_margin: u32,
    /// The controller's namespace, holding the ACME account, the ledger and certificate copies.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub controller_namespace: String,
}

fn parse_limit_override(s: &str) -> Result<(String, BucketSpec), String> {
    let (domain, spec) = s
        .split_once('=')
        .ok_or_else(|| format!("expected DOMAIN=COUNT/WINDOW, got {s:?}"))?;
    let domain = domain.trim().to_ascii_lowercase();
    if crate::certs::ledger::registered_domain(&domain).as_deref() != Some(domain.as_str()) {
        return Err(format!(
            "{domain:?} is not a registered domain (limits are per registered domain, e.g. example.cloud)"
        ));
    }
    Ok((domain, BucketSpec::parse(spec.trim())?))
}

impl LedgerArgs {
    /// `concurrency` is the API concurrency; orders run at most 16 at once.
    fn settings(&self, instance: &str, concurrency: usize) -> CertSettings {
        CertSettings {
            namespace: self.controller_namespace.clone(),
            instance: instance.to_string(),
            overrides: self.overrides.iter().cloned().collect(),
            margin: self.acme_safety_margin,
            concurrency: concurrency.min(16),
        }
    }
}

/// Certificates from an ACME server.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// Leave certificates alone.
    #[arg(
        long,
        env = "ENVCTL_SKIP_CERTIFICATES",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub skip_certificates: bool,
    /// The ACME directory: a URL, or `letsencrypt` (production) or `letsencrypt-staging`.
    /// There is no default: without one, TLS environments are applied without certificates
    /// (and reported so), never sent to a production CA by accident.
    #[arg(long, env = "ENVCTL_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// Contact address registered with the ACME account.
    #[arg(long, env = "ENVCTL_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// PEM file of extra roots to trust for the ACME server (e.g. a test CA).
    #[arg(long, env = "ENVCTL_ACME_CA_BUNDLE")]
    pub acme_ca_bundle: Option<PathBuf>,
    /// External account binding: the key id given by the CA.
    #[arg(long, env = "ENVCTL_ACME_EAB_KID", requires = "acme_eab_hmac_key_file")]
    pub acme_eab_kid: Option<String>,
    /// External account binding: file holding the HMAC key (base64url, as CAs give it).
    #[arg(long, env = "ENVCTL_ACME_EAB_HMAC_KEY_FILE", requires = "acme_eab_kid")]
    pub acme_eab_hmac_key_file: Option<PathBuf>,
    /// Longest one order may take, from answering its challenges to the certificate.
    #[arg(long, env = "ENVCTL_CERTIFICATE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub certificate_timeout: std::time::Duration,
    /// `apply` only: answer HTTP-01 challenges on this address while it runs (`run` answers
    /// on --listen).
    #[arg(long, env = "ENVCTL_ACME_HTTP01_LISTEN")]
    pub acme_http01_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub ledger: LedgerArgs,
}

impl CertArgs {
    /// What the certificate step does: nothing (`--skip-certificates`), nothing but report
    /// (no directory), or order from the directory.
    fn mode(&self) -> Result<CertMode, CliError> {
        if self.skip_certificates {
            return Ok(CertMode::Skip);
        }
        Ok(match self.acme_config()? {
            Some(config) => CertMode::Acme(config),
            None => CertMode::Unconfigured,
        })
    }

    fn acme_config(&self) -> Result<Option<AcmeConfig>, CliError> {
        let Some(directory) = self.acme_directory.as_deref().map(str::trim) else {
            return Ok(None);
        };
        let directory = match directory {
            "" => return Ok(None),
            "letsencrypt" => crate::certs::acme::LETS_ENCRYPT.to_string(),
            "letsencrypt-staging" => crate::certs::acme::LETS_ENCRYPT_STAGING.to_string(),
            url => url.to_string(),
        };
        let plain_http_ok = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| directory.starts_with(p));
        if !directory.starts_with("https://") && !plain_http_ok {
            return Err(CliError::Setting {
                setting: "--acme-directory",
                message: format!(
                    "{directory:?} must be an https:// URL, `letsencrypt` or `letsencrypt-staging` (plain http only on loopback, for tests)"
                ),
            });
        }
        let eab = match (&self.acme_eab_kid, &self.acme_eab_hmac_key_file) {
            (Some(kid), Some(path)) => {
                use base64::Engine;
                let text = std::fs::read_to_string(path).map_err(|e| CliError::Setting {
                    setting: "--acme-eab-hmac-key-file",
                    message: format!("reading {}: {e}", path.display()),
                })?;
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text.trim().trim_end_matches('='))
                    .map_err(|_| CliError::Setting {
                        setting: "--acme-eab-hmac-key-file",
                        message: format!("{} does not hold a base64url key", path.display()),
                    })?;
                Some((kid.clone(), key))
            }
            _ => None,
        };
        Ok(Some(AcmeConfig {
            directory,
            email: self.acme_email.clone(),
            ca_bundle: self.acme_ca_bundle.clone(),
            eab,
            order_timeout: self.certificate_timeout,
        }))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// How often to ask the source whether it moved.
    #[arg(long, env = "ENVCTL_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// How often to reconcile everything even when nothing moved.
    #[arg(long, env = "ENVCTL_RESYNC_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub resync_interval: std::time::Duration,
    /// Address of the HTTP listener (/healthz, /readyz, /metrics, /hooks/git).
    #[arg(long, env = "ENVCTL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// File holding the shared secret of the Git webhook (HMAC-SHA256); without it the
    /// webhook is off.
    #[arg(long, env = "ENVCTL_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Elect a leader on a Lease so that only one replica writes.
    #[arg(long, env = "ENVCTL_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_elect_namespace: String,
    /// This replica's identity in the Lease (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub leader_elect_identity: Option<String>,
    /// How long a lease lasts without renewal.
    #[arg(long, env = "ENVCTL_LEADER_ELECT_LEASE", default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease: std::time::Duration,
    /// After SIGTERM or SIGINT: how long the pass in flight may take to finish before the
    /// Lease is released and the process exits (keep it below the pod's
    /// terminationGracePeriodSeconds).
    #[arg(long, env = "ENVCTL_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: std::time::Duration,
    /// Log format.
    #[arg(long, env = "ENVCTL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// With a directory source: reconcile as soon as files change (a fast edit loop).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub certs: CertArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENVCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn run_controller(args: RunArgs) -> Result<Exit, CliError> {
    use crate::controller::leader::LeaseConfig;
    use crate::controller::run::{RunOptions, RunSource};
    init_logging(args.log_format);
    let webhook_secret = match &args.webhook_secret_file {
        Some(p) => Some(
            std::fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).trim().as_bytes().to_vec())
                .map_err(|source| CliError::WebhookSecret {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let source = if args.source.is_git() {
        RunSource::Git(Box::new(args.source.git()?))
    } else {
        RunSource::Directory(args.source.root())
    };
    let identity = args.leader_elect_identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "envctl".into());
        format!("{host}-{}", std::process::id())
    });
    let instance = args.source.policy.instance.clone();
    let options = RunOptions {
        source,
        watch: args.watch,
        load: args.source.policy.load_options(),
        max_file_size: args.source.policy.max_file_size,
        pass: PassOptions {
            render: args.source.policy.render_options(),
            prune: args.prune.policy(),
            concurrency: args.cluster.concurrency,
            diffs: false,
            scope: None,
            adopt: args.prune.adopt,
        },
        interval: args.interval,
        resync: args.resync_interval,
        listen: args.listen,
        webhook_secret,
        leader: args.leader_elect.then(|| LeaseConfig {
            namespace: args.leader_elect_namespace.clone(),
            name: format!("envctl-{instance}"),
            identity,
            duration: args.leader_elect_lease,
            // client-go's retry period: a standby notices a released lease within 2 s.
            renew_every: (args.leader_elect_lease / 3).min(std::time::Duration::from_secs(2)),
        }),
        shutdown_grace: args.shutdown_grace,
        certs: args.certs.mode()?,
        cert_settings: args
            .certs
            .ledger
            .settings(&instance, args.cluster.concurrency),
    };
    runtime()?.block_on(async {
        let client = cluster::connect(args.cluster.kubeconfig.as_deref())
            .await
            .map_err(CliError::Connect)?;
        crate::controller::run::run(client, options)
            .await
            .map_err(CliError::Run)
    })?;
    Ok(Exit::Ok)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LiveMode {
    Cluster,
    None,
}

/// Platform settings that judge and shape manifests.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Highest `scale` a service may ask for.
    #[arg(long, env = "ENVCTL_MAX_SCALE", default_value_t = 64)]
    pub max_scale: u32,
    /// Largest manifest file read, in bytes.
    #[arg(long, env = "ENVCTL_MAX_FILE_SIZE", default_value_t = source::DEFAULT_MAX_FILE_SIZE)]
    pub max_file_size: u64,
    /// A label KEY=VALUE for every pod and Service (repeatable), as environmentd's
    /// --orchestrator-service-label.
    #[arg(
        long = "orchestrator-service-label",
        value_name = "KEY=VALUE",
        value_parser = parse_label,
        env = "ENVCTL_ORCHESTRATOR_SERVICE_LABELS",
        value_delimiter = ','
    )]
    pub orchestrator_service_labels: Vec<(String, String)>,
    /// This envctl's instance name: it owns (and prunes) only objects labelled with it, so
    /// several instances can share a cluster.
    #[arg(long, env = "ENVCTL_INSTANCE", default_value = crate::render::DEFAULT_INSTANCE, value_parser = parse_instance)]
    pub instance: String,
    /// The ClusterRole that each environment's RoleBinding `environmentd` grants environmentd
    /// (the chart installs it as `<release>-environmentd`). envctl binds it; it never writes
    /// Roles.
    #[arg(long, env = "ENVCTL_ENVIRONMENTD_CLUSTER_ROLE", default_value = crate::render::DEFAULT_ENVIRONMENTD_CLUSTER_ROLE)]
    pub environmentd_cluster_role: String,
}

fn parse_instance(s: &str) -> Result<String, String> {
    match manifest::check::label_value_problem("instance", s) {
        Some(m) => Err(m),
        None if s.is_empty() => Err("the instance name must not be empty".into()),
        None => Ok(s.to_string()),
    }
}

/// Manifests named as paths.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Manifest files or directories (searched recursively for *.yaml and *.yml).
    #[arg(default_value = ".")]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Manifests from a source: a directory, or a Git repository (a URL, or a local repository
/// with --ref).
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// A directory of manifests, or a Git repository: file://, git://, http(s)://, ssh:// URL,
    /// or a local repository path together with --ref.
    #[arg(long, env = "ENVCTL_SOURCE", default_value = ".")]
    pub source: String,
    /// Git branch, tag, full ref or commit id (default for Git URLs: main).
    #[arg(long = "ref", env = "ENVCTL_REF")]
    pub reference: Option<String>,
    /// A folder of the source holding the manifests.
    #[arg(long, env = "ENVCTL_PATH")]
    pub path: Option<String>,
    /// Git user name (default: from the URL, else "git").
    #[arg(long, env = "ENVCTL_GIT_USERNAME")]
    pub git_username: Option<String>,
    /// File holding an HTTPS token for Git.
    #[arg(long, env = "ENVCTL_GIT_TOKEN_FILE")]
    pub git_token_file: Option<PathBuf>,
    /// Name of an environment variable holding an HTTPS token for Git.
    #[arg(long)]
    pub git_token_env: Option<String>,
    /// SSH private key file for ssh:// sources.
    #[arg(long, env = "ENVCTL_GIT_SSH_KEY_FILE")]
    pub git_ssh_key_file: Option<PathBuf>,
    /// Where fetched Git objects are kept.
    #[arg(long, env = "ENVCTL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Longest a Git server may take to accept a connection, or stay silent while answering.
    #[arg(long, env = "ENVCTL_GIT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub git_timeout: std::time::Duration,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "ENVCTL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Concurrent requests to the API server.
    #[arg(long, env = "ENVCTL_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete owned objects and environments that are no longer in the source.
    #[arg(long, env = "ENVCTL_PRUNE")]
    pub prune: bool,
    /// Most environments one pass may delete: a count or a share of the live ones (`25%`).
    #[arg(long, env = "ENVCTL_MAX_PRUNE", default_value = "25%")]
    pub max_prune: MaxPrune,
    /// Delete even when more environments would go than --max-prune allows.
    #[arg(long)]
    pub allow_mass_prune: bool,
    /// Take over an environment's namespace that exists but that no envctl instance owns
    /// (a namespace of another instance is never taken over).
    #[arg(long, env = "ENVCTL_ADOPT")]
    pub adopt: bool,
}

/// What `diff` and `apply` share: the source, the cluster, prune policy and output format.
#[derive(Debug, Args)]
pub struct PassArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Output format of the plan.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
}

impl PassArgs {
    /// What `diff` and `apply` start from: the loaded source and the pass options.
    fn prepare(&self) -> Result<(Loaded, PassOptions), CliError> {
        Ok((self.source.load()?, self.options()))
    }

    fn options(&self) -> PassOptions {
        PassOptions {
            render: self.source.policy.render_options(),
            prune: self.prune.policy(),
            concurrency: self.cluster.concurrency,
            diffs: true,
            scope: None,
            adopt: self.prune.adopt,
        }
    }
}

impl PruneArgs {
    fn policy(&self) -> PrunePolicy {
        PrunePolicy {
            enabled: self.prune,
            allow_mass_prune: self.allow_mass_prune,
            max_prune: self.max_prune,
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if let Some(m) =
        manifest::check::label_key_problem(k).or_else(|| manifest::check::label_value_problem(k, v))
    {
        return Err(m);
    }
    if manifest::check::is_reserved_label_key(k) {
        return Err(format!("label key {k:?} is reserved for envctl"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl PolicyArgs {
    pub fn platform_labels(&self) -> BTreeMap<String, String> {
        self.orchestrator_service_labels.iter().cloned().collect()
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            limits: Limits {
                max_scale: self.max_scale,
                platform_labels: self.platform_labels(),
            },
        }
    }

    pub fn render_options(&self) -> RenderOptions {
        RenderOptions {
            orchestrator_service_labels: self.platform_labels(),
            instance: self.instance.clone(),
            environmentd_cluster_role: self.environmentd_cluster_role.clone(),
        }
    }

    /// Reads and validates every manifest under `paths`; reading problems become
    /// diagnostics too.
    pub fn load(&self, paths: &[PathBuf]) -> Loaded {
        let (files, problems) = source::read_paths(paths, self.max_file_size);
        manifest::load_with_unread(&files, &problems, &self.load_options())
    }
}

impl SourceArgs {
    /// Whether the source is a Git repository rather than a plain directory.
    pub fn is_git(&self) -> bool {
        self.source.contains("://") || self.reference.is_some()
    }

    fn root(&self) -> PathBuf {
        let base = PathBuf::from(&self.source);
        match &self.path {
            Some(p) => base.join(p),
            None => base,
        }
    }

    /// The Git backend for this source.
    pub fn git(&self) -> Result<crate::source::git::Git2Source, CliError> {
        use crate::source::git::{Credentials, Git2Source, GitSpec};
        crate::source::git::configure_timeouts(self.git_timeout);
        let credentials = Credentials::load(
            self.git_username.clone(),
            self.git_token_file.as_deref(),
            self.git_token_env.as_deref(),
            self.git_ssh_key_file.clone(),
        )
        .map_err(CliError::Git)?;
        let spec = GitSpec {
            url: self.source.clone(),
            reference: self.reference.clone().unwrap_or_else(|| "main".into()),
            path: self.path.clone(),
        };
        let mut key = crate::render::Fnv64::new();
        key.write(self.source.as_bytes());
        let base = self.cache_dir.clone().unwrap_or_else(default_cache_dir);
        let dir = base.join("git").join(key.hex());
        std::fs::create_dir_all(&dir).map_err(|source| CliError::CacheDir {
            path: dir.display().to_string(),
            source,
        })?;
        Git2Source::open(spec, credentials, &dir).map_err(CliError::Git)
    }

    /// Reads and validates the source once (fetching it when it is Git).
    pub fn load(&self) -> Result<Loaded, CliError> {
        if !self.is_git() {
            return Ok(self.policy.load(&[self.root()]));
        }
        use crate::source::git::GitBackend;
        let mut git = self.git()?;
        let commit = git.fetch().map_err(CliError::Git)?;
        let (files, problems) = git
            .read(&commit, self.policy.max_file_size)
            .map_err(CliError::Git)?;
        Ok(manifest::load_with_unread(
            &files,
            &problems,
            &self.policy.load_options(),
        ))
    }
}

fn default_cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").or_else(|| std::env::var_os("HOME")) {
        Some(base) if std::env::var_os("XDG_CACHE_HOME").is_some() => {
            PathBuf::from(base).join("envctl")
        }
        Some(home) => PathBuf::from(home).join(".cache").join("envctl"),
        None => std::env::temp_dir().join("envctl"),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(s)
}

fn print_diagnostics(out: &mut impl Write, diagnostics: &[Diagnostic]) -> Result<(), CliError> {
    for d in diagnostics {
        writeln!(out, "{d}").map_err(CliError::Output)?;
    }
    Ok(())
}

fn summary(loaded: &Loaded) -> String {
    let bad_files: BTreeSet<&str> = loaded.diagnostics.iter().map(|d| d.file.as_str()).collect();
    if loaded.files == 0 {
        return "no manifest files found (*.yaml, *.yml)".to_string();
    }
    if loaded.diagnostics.is_empty() {
        return format!(
            "ok: {} environment(s) in {} file(s)",
            loaded.environments.len(),
            loaded.files
        );
    }
    format!(
        "{} error(s) in {} of {} file(s); {} valid environment(s)",
        loaded.diagnostics.len(),
        bad_files.len(),
        loaded.files,
        loaded.environments.len()
    )
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

fn encode_json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|e| CliError::Encode {
            what,
            format: "json",
            message: e.to_string(),
        })
}

/// Each environment that failed in a pass, with the first reason: a read or dry-run the
/// server refused or left unanswered, or an object that could not be written.
fn failed_environments(
    plan: &crate::plan::Plan,
    report: &crate::apply::Report,
) -> BTreeMap<String, String> {
    let mut failed: BTreeMap<String, String> = plan
        .failed
        .iter()
        .map(|f| (f.environment.clone(), f.reason.clone()))
        .collect();
    for f in &report.failures {
        failed
            .entry(f.environment.clone())
            .or_insert_with(|| format!("{} {}: {}", f.action.as_str(), f.object, f.error));
    }
    failed
}

/// The plan as `-o json` prints it (documented in the README).
#[derive(serde::Serialize)]
struct PlanDocument<'a> {
    #[serde(flatten)]
    plan: &'a crate::plan::Plan,
    diagnostics: &'a [Diagnostic],
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<&'a crate::apply::Report>,
}

fn print_plan(
    out: &mut impl Write,
    pass: &PassPlan,
    loaded: &Loaded,
    format: PlanFormat,
    applied: Option<&crate::apply::Report>,
) -> Result<(), CliError> {
    match format {
        PlanFormat::Json => {
            let doc = PlanDocument {
                plan: &pass.plan,
                diagnostics: &loaded.diagnostics,
                applied,
            };
            out.write_all(encode_json("the plan", &doc)?.as_bytes())
                .map_err(CliError::Output)
        }
        PlanFormat::Text => {
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let mut err = std::io::stderr().lock();
            print_diagnostics(&mut err, &loaded.diagnostics)?;
            out.write_all(crate::plan::render_text(&pass.plan, color).as_bytes())
                .map_err(CliError::Output)?;
            if let Some(r) = applied {
                for f in &r.failures {
                    writeln!(
                        err,
                        "failed to {} {}: {}",
                        f.action.as_str(),
                        f.object,
                        f.error
                    )
                    .map_err(CliError::Output)?;
                }
                for (env, reason) in failed_environments(&pass.plan, r) {
                    writeln!(err, "environment {env} failed: {reason}")
                        .map_err(CliError::Output)?;
                }
                writeln!(
                    out,
                    "applied {}, deleted {}, failed {}",
                    r.applied,
                    r.deleted,
                    r.failures.len()
                )
                .map_err(CliError::Output)?;
            }
            Ok(())
        }
    }
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<Exit, CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Validate(args) => {
            let loaded = args.policy.load(&args.paths);
            print_diagnostics(&mut out, &loaded.diagnostics)?;
            writeln!(out, "{}", summary(&loaded)).map_err(CliError::Output)?;
            Ok(if loaded.is_valid() && loaded.files > 0 {
                Exit::Ok
            } else {
                Exit::Invalid
            })
        }
        Command::Render { manifests, output } => {
            let loaded = manifests.policy.load(&manifests.paths);
            if !loaded.is_valid() {
                let mut err = std::io::stderr().lock();
                print_diagnostics(&mut err, &loaded.diagnostics)?;
                let files: BTreeSet<&String> = loaded.diagnostics.iter().map(|d| &d.file).collect();
                return Err(CliError::Invalid { count: files.len() });
            }
            let envs: Vec<&manifest::Environment> =
                loaded.environments.iter().map(|e| &e.environment).collect();
            let mut buffered = std::io::BufWriter::with_capacity(1 << 20, out);
            write_rendered(
                &mut buffered,
                &envs,
                &manifests.policy.render_options(),
                output,
            )?;
            buffered.flush().map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
        Command::Diff { pass: args, live } => {
            let (cluster, output) = (&args.cluster, args.output);
            let (loaded, options) = args.prepare()?;
            let pass = runtime()?.block_on(async {
                let client = match live {
                    LiveMode::None => None,
                    LiveMode::Cluster => Some(
                        cluster::connect(cluster.kubeconfig.as_deref())
                            .await
                            .map_err(CliError::Connect)?,
                    ),
                };
                pass::plan_pass(client.as_ref(), None, &loaded, &options)
                    .await
                    .map_err(CliError::Observe)
            })?;
            print_plan(&mut out, &pass, &loaded, output, None)?;
            Ok(
                if !pass.plan.refused.is_empty() || !pass.plan.failed.is_empty() {
                    Exit::Failure
                } else if !loaded.is_valid() {
                    Exit::Invalid
                } else if pass.plan.has_changes() {
                    Exit::Changes
                } else {
                    Exit::Ok
                },
            )
        }
        Command::Apply { pass: args, certs } => {
            let (cluster, output) = (&args.cluster, args.output);
            let (loaded, options) = args.prepare()?;
            runtime()?.block_on(async {
                let client = cluster::connect(cluster.kubeconfig.as_deref())
                    .await
                    .map_err(CliError::Connect)?;
                let pass = pass::plan_pass(Some(&client), None, &loaded, &options)
                    .await
                    .map_err(CliError::Observe)?;
                let report = pass::apply_pass(&client, &pass, &options).await;
                print_plan(&mut out, &pass, &loaded, output, Some(&report))?;
                if report.unreachable() && pass.plan.failed.is_empty() {
                    return Err(CliError::Apply {
                        failed: report.failures.len(),
                        unreachable: true,
                    });
                }
                // Every environment that failed, with its reason; the others were applied.
                let failed = failed_environments(&pass.plan, &report);
                // A refused or failed environment gets nothing more, its certificate included.
                let skip: BTreeSet<&str> = pass
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
                let targets = crate::certs::reconcile::targets(envs);
                match certs.mode()? {
                    CertMode::Skip => {}
                    CertMode::Unconfigured => {
                        report_unconfigured(&client, &targets).await?;
                    }
                    CertMode::Acme(config) if !targets.is_empty() => {
                        let cert_report = apply_certificates(
                            &client,
                            &certs,
                            config,
                            &args.source.policy.instance,
                            cluster.concurrency,
                            &targets,
                        )
                        .await?;
                        let text = cert_report.text();
                        match output {
                            PlanFormat::Text => out.write_all(text.as_bytes()),
                            PlanFormat::Json => std::io::stderr().write_all(text.as_bytes()),
                        }
                        .map_err(CliError::Output)?;
                        let failed = cert_report.tally().failed;
                        if failed > 0 {
                            return Err(CliError::CertificatesFailed { failed });
                        }
                    }
                    CertMode::Acme(_) => {}
                }
                if !failed.is_empty() {
                    return Err(CliError::EnvironmentsFailed {
                        count: failed.len(),
                        names: failed.keys().cloned().collect::<Vec<_>>().join(", "),
                    });
                }
                if !pass.plan.refused.is_empty() {
                    return Err(CliError::Refused {
                        count: pass.plan.refused.len(),
                    });
                }
                Ok::<_, CliError>(())
            })?;
            Ok(if loaded.is_valid() {
                Exit::Ok
            } else {
                Exit::Invalid
            })
        }
        Command::Run(args) => run_controller(*args),
        Command::Status {
            cluster,
            instance,
            output,
        } => {
            let rows = runtime()?.block_on(async {
                let client = cluster::connect(cluster.kubeconfig.as_deref())
                    .await
                    .map_err(CliError::Connect)?;
                crate::status::read_all(&client, &instance)
                    .await
                    .map_err(CliError::Status)
            })?;
            let text = match output {
                PlanFormat::Json => encode_json("the status", &rows)?,
                PlanFormat::Text => crate::status::table(&rows),
            };
            out.write_all(text.as_bytes()).map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
        Command::Quota {
            cluster,
            instance,
            ledger,
            output,
        } => {
            let (doc, store) = runtime()?.block_on(async {
                let client = cluster::connect(cluster.kubeconfig.as_deref())
                    .await
                    .map_err(CliError::Connect)?;
                let settings = ledger.settings(&instance, cluster.concurrency);
                let store = crate::certs::store::LedgerStore::new(
                    &client,
                    &settings.namespace,
                    &instance,
                    settings.overrides,
                    settings.margin,
                );
                let (doc, _) = store
                    .load()
                    .await
                    .map_err(|e| CliError::Quota(Box::new(e)))?;
                Ok::<_, CliError>((doc, store))
            })?;
            let text =
                crate::certs::reconcile::quota_report(&doc, &store, output == PlanFormat::Json)
                    .map_err(|message| CliError::Encode {
                        what: "the quota",
                        format: "JSON",
                        message,
                    })?;
            out.write_all(text.as_bytes()).map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
        Command::Schema => {
            let text = encode_json("the schema", &manifest::json_schema())?;
            out.write_all(text.as_bytes()).map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
    }
}

/// `apply` without an ACME directory: one warning, and every TLS environment's namespace
/// says why it has no certificate (`envctl status` shows it).
async fn report_unconfigured(
    client: &kube::Client,
    targets: &[crate::certs::reconcile::Target],
) -> Result<(), CliError> {
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
    targets: &[crate::certs::reconcile::Target],
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

/// Renders `envs` and writes their objects as a YAML stream (`---` before each document) or
/// a JSON `v1 List`, in batches encoded in parallel, so memory stays bounded.
pub fn write_rendered(
    out: &mut impl Write,
    envs: &[&manifest::Environment],
    options: &RenderOptions,
    format: Format,
) -> Result<(), CliError> {
    let encode = |env: &manifest::Environment, first: bool| -> String {
        let mut text = String::new();
        for (i, o) in render::render_environment(env, options).iter().enumerate() {
            match format {
                Format::Yaml => {
                    text.push_str("---\n");
                    crate::yaml::write_yaml(&mut text, &o.object);
                }
                Format::Json => {
                    if !(first && i == 0) {
                        text.push_str(",\n");
                    }
                    text.push_str(&serde_json::to_string_pretty(&o.object).unwrap_or_default());
                }
            }
        }
        text
    };
    if format == Format::Json {
        out.write_all(b"{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n")
            .map_err(CliError::Output)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (batch_no, batch) in envs.chunks(256 * threads).enumerate() {
        let per_thread = batch.len().div_ceil(threads).max(1);
        let parts: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(per_thread)
                .enumerate()
                .map(|(part_no, part)| {
                    scope.spawn(move || {
                        let mut text = String::new();
                        for (i, env) in part.iter().enumerate() {
                            let first = batch_no == 0 && part_no == 0 && i == 0;
                            text.push_str(&encode(env, first));
                        }
                        text
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok())
                .collect::<Option<Vec<String>>>()
        })
        .ok_or(CliError::Panicked { what: "rendering" })?;
        for p in parts {
            out.write_all(p.as_bytes()).map_err(CliError::Output)?;
        }
    }
    if format == Format::Json {
        out.write_all(b"\n]}\n").map_err(CliError::Output)?;
    }
    Ok(())
}
