//! `envctl run`: the controller's arguments, turned into `RunOptions`, and its start.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::args::{ClusterArgs, HealthArgs, PruneArgs, SourceArgs, parse_duration};
use super::cert_args::CertArgs;
use super::{CliError, Exit, runtime};
use crate::certs::reconcile::CertSettings;
use crate::cluster;
use std::path::Path;

use crate::cluster::WriteFence;
use crate::controller::leader::LeaseConfig;
use crate::controller::run::{RunOptions, RunSource};
use crate::pass::PassOptions;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub prune: PruneArgs,
    #[command(flatten)]
    pub health: HealthArgs,
    /// How often to ask the source whether it moved.
    #[arg(long, env = "ENVCTL_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// How often to plan every environment afresh (a full pass), however busy the controller.
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
    /// Share the environments among the replicas: each holds a member Lease and writes the
    /// environments that rendezvous hashing of their names gives it (see the README's
    /// "Sharding"). Uses the `--leader-elect-*` settings for its own Lease.
    #[arg(long, env = "ENVCTL_SHARD")]
    pub shard: bool,
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

pub fn handle(args: RunArgs) -> Result<Exit, CliError> {
    init_logging(args.log_format);
    let options = args.options()?;
    let identity = args.identity();
    // The User-Agent names the replica and, with a Lease, this process's instance id, so
    // that audit logs tell apart even two processes started with one identity.
    let agent = match options.leader.as_ref().or(options.shard.as_ref()) {
        Some(cfg) => format!("{identity}; instance {}", cfg.instance_id),
        None => identity,
    };
    let identity = agent;
    let (self_instance, self_namespace) = (
        args.source.policy.instance.clone(),
        args.leader_elect_namespace.clone(),
    );
    tracing::info!(replica = %identity, "starting");
    runtime()?.block_on(async {
        let kubeconfig = args.cluster.kubeconfig.as_deref();
        // With a Lease, writes wait for it (the fence opens at each renewal); alone, a
        // process always writes.
        let fence = if options.leader.is_some() || options.shard.is_some() {
            WriteFence::new_closed()
        } else {
            WriteFence::always_open()
        };
        let writer = cluster::connect_fenced(kubeconfig, Some(&identity), fence.clone())
            .await
            .map_err(CliError::Connect)?;
        let leases = cluster::connect_as(kubeconfig, Some(&identity))
            .await
            .map_err(CliError::Connect)?;
        // Before anything is written: this instance is not another release's.
        crate::controller::claim::check(&leases, &self_instance, &self_namespace)
            .await
            .map_err(CliError::Claim)?;
        let clients = crate::controller::run::Clients {
            writer,
            leases,
            fence,
            lease_connect: crate::controller::run::LeaseConnect {
                kubeconfig: kubeconfig.map(Path::to_path_buf),
                agent: identity.clone(),
            },
        };
        crate::controller::run::run(clients, options)
            .await
            .map_err(CliError::Run)
    })?;
    Ok(Exit::Ok)
}

impl RunArgs {
    /// The controller's settings, validated (files read, the Git source opened).
    fn options(&self) -> Result<RunOptions, CliError> {
        if self.shard && self.leader_elect {
            return Err(CliError::Setting {
                setting: "--shard",
                message: "sharding and leader election are alternatives: with --shard every replica writes its own share, so leave --leader-elect (ENVCTL_LEADER_ELECT) off".into(),
            });
        }
        let source = if self.source.is_git() {
            RunSource::Git(Box::new(self.source.git()?))
        } else {
            RunSource::Directory(self.source.root())
        };
        let policy = &self.source.policy;
        Ok(RunOptions {
            source,
            watch: self.watch,
            load: policy.load_options(),
            max_file_size: policy.max_file_size,
            pass: PassOptions {
                render: policy.render_options(),
                prune: self.prune.policy(),
                concurrency: self.cluster.concurrency,
                diffs: false,
                scope: None,
                adopt: self.prune.adopt,
                writable: None,
                progress: None,
                in_sync: None,
                regions: policy.regions.for_pass(),
            },
            interval: self.interval,
            resync: self.resync_interval,
            listen: self.listen,
            webhook_secret: self.webhook_secret()?,
            leader: self.leader_elect.then(|| self.lease()),
            shard: self.shard.then(|| self.lease()),
            shutdown_grace: self.shutdown_grace,
            health: crate::controller::options::Judging {
                deadline: self.health.progress_deadline,
                pods: self.health.pods(),
            },
            certs: self.certs.mode()?,
            cert_settings: CertSettings {
                writer: format!("controller/{}", policy.instance),
                ..self
                    .certs
                    .ledger
                    .settings(&policy.instance, self.cluster.concurrency)
            },
        })
    }

    fn webhook_secret(&self) -> Result<Option<Vec<u8>>, CliError> {
        let Some(p) = &self.webhook_secret_file else {
            return Ok(None);
        };
        let secret = std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).trim().as_bytes().to_vec())
            .map_err(|source| CliError::WebhookSecret {
                path: p.display().to_string(),
                source,
            })?;
        // An empty key would make every signature computable by anyone.
        if secret.is_empty() {
            return Err(CliError::Setting {
                setting: "--webhook-secret-file",
                message: format!(
                    "{} is empty: the webhook's HMAC key must not be empty (leave the flag out to turn the webhook off)",
                    p.display()
                ),
            });
        }
        Ok(Some(secret))
    }

    /// This replica's identity: `--leader-elect-identity`, else host name and process id.
    fn identity(&self) -> String {
        self.leader_elect_identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "envctl".into());
            format!("{host}-{}", std::process::id())
        })
    }

    fn lease(&self) -> LeaseConfig {
        let identity = self.identity();
        LeaseConfig {
            namespace: self.leader_elect_namespace.clone(),
            name: format!("envctl-{}", self.source.policy.instance),
            identity,
            instance_id: crate::controller::leader::new_instance_id(),
            duration: self.leader_elect_lease,
            // client-go's retry period: a standby notices a released lease within 2 s.
            renew_every: (self.leader_elect_lease / 3).min(std::time::Duration::from_secs(2)),
        }
    }
}
