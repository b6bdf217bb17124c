//! What a command can fail with, and the exit code of each failure. Owns the mapping from
//! errors to exit codes; nothing else.

use crate::cluster::ConnectError;
use crate::observe::ObserveError;

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
    #[error("checking who owns the instance")]
    Claim(#[source] crate::controller::claim::ClaimError),
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
    #[error("{count} environment(s) did not become Ready{after}:\n{details}")]
    NotReady {
        count: usize,
        /// Empty when one was Degraded; " within TIMEOUT" when the wait timed out.
        after: String,
        /// One line per environment: `NAME: HEALTH (REASON): MESSAGE`.
        details: String,
    },
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
            CliError::Claim(crate::controller::claim::ClaimError::Taken { .. }) => Exit::Invalid,
            CliError::Quota(e) if e.is_unreachable() => Exit::Cluster,
            CliError::Certificates(e) if e.is_unreachable() => Exit::Cluster,
            _ => Exit::Failure,
        }
    }
}
