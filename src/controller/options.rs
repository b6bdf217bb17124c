//! What `envctl run` is given: its settings (`RunOptions`, from the command line) and its
//! clients (`Clients`, one fenced writer and one for Leases). Plain data, read by the loop's
//! parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;

use super::leader::LeaseConfig;
use crate::certs::CertMode;
use crate::certs::reconcile::CertSettings;
use crate::cluster::WriteFence;
use crate::manifest::LoadOptions;
use crate::pass::PassOptions;
use crate::source::git::GitBackend;

/// Where `run` reads manifests.
pub enum RunSource {
    Git(Box<dyn GitBackend>),
    Directory(PathBuf),
}

pub struct RunOptions {
    pub source: RunSource,
    /// With a directory source: reconcile on file changes (debounced), not only each interval.
    pub watch: bool,
    pub load: LoadOptions,
    pub max_file_size: u64,
    pub pass: PassOptions,
    pub interval: Duration,
    pub resync: Duration,
    pub listen: SocketAddr,
    pub webhook_secret: Option<Vec<u8>>,
    pub leader: Option<LeaseConfig>,
    /// `--shard`: this replica's member Lease; environments are shared among the members.
    pub shard: Option<LeaseConfig>,
    /// How long a pass in flight may take to finish after SIGTERM or SIGINT.
    pub shutdown_grace: Duration,
    /// A rollout without progress for this long is Degraded.

    /// How health is judged (`--progress-deadline`, `--health-without-pods`).
    pub health: Judging,
    /// Certificates: skipped, unconfigured (reported only) or from an ACME directory.
    pub certs: CertMode,
    /// Where certificate state lives (used with `CertMode::Acme`).
    pub cert_settings: CertSettings,
}

/// The controller's clients. `writer` holds every write to `fence` (passes, prunes, status,
/// Events, certificates); `leases` writes only what a standby writes too (the webhook relay,
/// releasing the Lease on shutdown). The Lease tasks connect on their own thread with
/// `lease_connect`.
pub struct Clients {
    pub writer: Client,
    pub leases: Client,
    pub fence: WriteFence,
    pub lease_connect: LeaseConnect,
}

/// How the Lease thread reaches the API server: the kubeconfig and the User-Agent's replica.
#[derive(Debug, Clone)]
pub struct LeaseConnect {
    pub kubeconfig: Option<PathBuf>,
    pub agent: String,
}

/// How health is judged: the progress deadline, and whether pods are read.
#[derive(Debug, Clone, Copy)]
pub struct Judging {
    pub deadline: Duration,
    pub pods: bool,
}
