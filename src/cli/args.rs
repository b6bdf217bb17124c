//! Argument groups that several commands share (the manifests, the source, the cluster,
//! prune policy), each defined once with the validated settings it turns into.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::CliError;
use super::output::PlanFormat;
use crate::manifest::{self, Limits, LoadOptions, Loaded};
use crate::pass::PassOptions;
use crate::plan::{MaxPrune, PrunePolicy};
use crate::render::RenderOptions;
use crate::source;

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
    /// A namespace whose pods may connect to every environment's pods (the platform's
    /// ingress; repeatable). Each environment's NetworkPolicy admits its own pods and these.
    #[arg(
        long = "ingress-namespace",
        value_name = "NAMESPACE",
        env = "ENVCTL_INGRESS_NAMESPACES",
        value_delimiter = ',',
        value_parser = parse_namespace
    )]
    pub ingress_namespaces: Vec<String>,
    /// The ClusterRole that grants envctl what it does inside each environment (its TLS
    /// Secret; the chart's `<release>-in-environments`). With --envctl-service-account, each
    /// environment gets a RoleBinding `envctl` of it to that ServiceAccount, so envctl needs
    /// no cluster-wide Secret access.
    #[arg(
        long,
        env = "ENVCTL_ENVCTL_CLUSTER_ROLE",
        requires = "envctl_service_account"
    )]
    pub envctl_cluster_role: Option<String>,
    /// envctl's ServiceAccount, NAMESPACE/NAME, bound in each environment to
    /// --envctl-cluster-role.
    #[arg(
        long,
        env = "ENVCTL_ENVCTL_SERVICE_ACCOUNT",
        value_name = "NAMESPACE/NAME",
        value_parser = parse_service_account,
        requires = "envctl_cluster_role"
    )]
    pub envctl_service_account: Option<(String, String)>,
    #[command(flatten)]
    pub regions: RegionArgs,
}

/// `--region`: the regions whose environments this process serves.
#[derive(Debug, Args, Clone)]
pub struct RegionArgs {
    /// Serve only the environments whose `spec.region` is PROVIDER/REGION (repeatable, or
    /// separated by commas): one controller per regional cluster. The others are left to
    /// their regions: never applied, and never pruned here for being elsewhere. Without it,
    /// every region's environments (one cluster for the whole fleet).
    #[arg(
        long = "region",
        value_name = "PROVIDER/REGION",
        env = "ENVCTL_REGIONS",
        value_delimiter = ',',
        value_parser = parse_region
    )]
    pub regions: Vec<String>,
}

impl RegionArgs {
    /// The regions served, or `None` for all.
    pub fn set(&self) -> Option<std::collections::BTreeSet<String>> {
        (!self.regions.is_empty()).then(|| self.regions.iter().cloned().collect())
    }

    /// `set`, as a pass's options hold it.
    pub fn for_pass(&self) -> Option<std::sync::Arc<std::collections::BTreeSet<String>>> {
        self.set().map(std::sync::Arc::new)
    }
}

fn parse_region(s: &str) -> Result<String, String> {
    // REGION_PATTERN, the manifest schema's: two parts of lowercase letters, digits and
    // inner dashes.
    if s.split_once('/')
        .is_some_and(|(a, b)| is_label(a, usize::MAX) && is_label(b, usize::MAX))
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a region: it must be <provider>/<region>, such as aws/us-east-1, as manifests name it in spec.region"
        ))
    }
}

/// Lowercase letters, digits and inner dashes, at most `max` long (a DNS-1123 label's shape).
fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_namespace(s: &str) -> Result<String, String> {
    if is_label(s, 63) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (a DNS-1123 label: at most 63 lowercase letters, digits and '-')"
        ))
    }
}

fn parse_service_account(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("expected NAMESPACE/NAME, got {s:?}"))?;
    let ns = parse_namespace(ns)?;
    if name.is_empty() || name.len() > 253 || name.contains('/') {
        return Err(format!("{name:?} is not a ServiceAccount name"));
    }
    Ok((ns, name.to_string()))
}

pub(super) fn parse_instance(s: &str) -> Result<String, String> {
    match manifest::check::label_value_problem("instance", s) {
        Some(m) => Err(m),
        None if s.is_empty() => Err("the instance name must not be empty".into()),
        None => Ok(s.to_string()),
    }
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
            regions: self.regions.set(),
        }
    }

    pub fn render_options(&self) -> RenderOptions {
        RenderOptions {
            orchestrator_service_labels: self.platform_labels(),
            instance: self.instance.clone(),
            environmentd_cluster_role: self.environmentd_cluster_role.clone(),
            ingress_namespaces: self.ingress_namespaces.clone(),
            envctl_binding: self
                .envctl_cluster_role
                .clone()
                .zip(self.envctl_service_account.clone())
                .map(
                    |(cluster_role, service_account)| crate::render::EnvctlBinding {
                        cluster_role,
                        service_account,
                    },
                ),
        }
    }

    /// Reads and validates every manifest under `paths`; reading problems become
    /// diagnostics too.
    pub fn load(&self, paths: &[PathBuf]) -> Loaded {
        let (files, problems) = source::read_paths(paths, self.max_file_size);
        manifest::load_with_unread(
            &files,
            &problems,
            &self.load_options(),
            &mut manifest::Validated::default(),
        )
    }
}

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if let Some(m) =
        manifest::check::label_key_problem(k).or_else(|| manifest::check::label_value_problem(k, v))
    {
        return Err(m);
    }
    if let Some(m) = manifest::check::reserved_key_problem("label", k) {
        return Err(m.replace("a manifest may not set it", "it cannot be given here"));
    }
    Ok((k.to_string(), v.to_string()))
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

impl SourceArgs {
    /// Whether the source is a Git repository rather than a plain directory.
    pub fn is_git(&self) -> bool {
        self.source.contains("://") || self.reference.is_some()
    }

    pub(super) fn root(&self) -> PathBuf {
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
        self.load_revision().map(|(loaded, _)| loaded)
    }

    /// Reads and validates the source once, with its revision: the Git commit, or
    /// `dir-<digest>` of a directory's files.
    pub fn load_revision(&self) -> Result<(Loaded, String), CliError> {
        if !self.is_git() {
            let (files, problems) = source::read_paths(&[self.root()], self.policy.max_file_size);
            let revision = source::directory_revision(&files, &problems);
            let loaded = manifest::load_with_unread(
                &files,
                &problems,
                &self.policy.load_options(),
                &mut manifest::Validated::default(),
            );
            return Ok((loaded, revision));
        }
        use crate::source::git::GitBackend;
        let mut git = self.git()?;
        let commit = git.fetch().map_err(CliError::Git)?;
        let (files, problems) = git
            .read(&commit, self.policy.max_file_size)
            .map_err(CliError::Git)?;
        let loaded = manifest::load_with_unread(
            &files,
            &problems,
            &self.policy.load_options(),
            &mut manifest::Validated::default(),
        );
        Ok((loaded, commit))
    }
}

pub(super) fn default_cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").or_else(|| std::env::var_os("HOME")) {
        Some(base) if std::env::var_os("XDG_CACHE_HOME").is_some() => {
            PathBuf::from(base).join("envctl")
        }
        Some(home) => PathBuf::from(home).join(".cache").join("envctl"),
        None => std::env::temp_dir().join("envctl"),
    }
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

impl PruneArgs {
    pub(super) fn policy(&self) -> PrunePolicy {
        PrunePolicy {
            enabled: self.prune,
            allow_mass_prune: self.allow_mass_prune,
            max_prune: self.max_prune,
        }
    }
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
    pub(super) fn prepare(&self) -> Result<(Loaded, PassOptions), CliError> {
        Ok((self.source.load()?, self.options()))
    }

    /// `prepare` with the source's revision.
    pub(super) fn prepare_revision(&self) -> Result<(Loaded, String, PassOptions), CliError> {
        let (loaded, revision) = self.source.load_revision()?;
        Ok((loaded, revision, self.options()))
    }

    pub(super) fn options(&self) -> PassOptions {
        PassOptions {
            render: self.source.policy.render_options(),
            prune: self.prune.policy(),
            concurrency: self.cluster.concurrency,
            diffs: true,
            scope: None,
            adopt: self.prune.adopt,
            writable: None,
            progress: super::progress::bar(self.output),
            in_sync: None,
            regions: self.source.policy.regions.for_pass(),
        }
    }
}

/// `--instance`, for the commands that read one instance's state (`status`, `quota`).
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// This envctl's instance name.
    #[arg(long, env = "ENVCTL_INSTANCE", default_value = crate::render::DEFAULT_INSTANCE, value_parser = parse_instance)]
    pub instance: String,
}

/// How health is judged (`status`, `apply --wait`, `run`).
#[derive(Debug, Args, Clone)]
pub struct HealthArgs {
    /// A rollout that has made no progress (no pod created, scheduled or turned ready) for
    /// this long counts as Degraded.
    #[arg(long, env = "ENVCTL_PROGRESS_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    pub progress_deadline: std::time::Duration,
    /// Judge health from StatefulSets alone, reading no pod: envctl then needs no
    /// cluster-wide pod read (the chart's `health.readPods: false`), and health names no
    /// pod-level reason (image pull failures, crash loops, unschedulable pods) and sees
    /// rollout progress only as the StatefulSet reports it.
    #[arg(long, env = "ENVCTL_HEALTH_WITHOUT_PODS")]
    pub health_without_pods: bool,
}

impl HealthArgs {
    /// Whether health reads pods.
    pub fn pods(&self) -> bool {
        !self.health_without_pods
    }
}

pub(super) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(s)
}
