//! How envctl reaches the Kubernetes API: client construction (kubeconfig or in-cluster, with
//! timeouts), the mapping from envctl's closed set of kinds to API resources, and the retry
//! policy for transient errors (jittered exponential backoff, bounded, counted by reason).
//! Makes no decisions and sends no requests of its own beyond building the client.

use std::path::Path;

use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::vocab::ObjectKind;

pub mod fence;
pub use fence::{FenceLayer, FencedConnector, WriteFence};

/// The one server-side apply field manager envctl uses.
pub const FIELD_MANAGER: &str = "envctl";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}")]
    ReadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("loading kubeconfig {path}")]
    LoadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("finding cluster credentials (no --kubeconfig, no KUBECONFIG, not in a cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Installs ring as rustls's one crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client from `kubeconfig`, else `$KUBECONFIG`/`~/.kube/config`, else in-cluster.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, ConnectError> {
    connect_as(kubeconfig, None).await
}

/// `connect`, with the User-Agent `envctl/<version>`, followed by ` (<identity>)` when given
/// (a replica's identity, so that audit logs tell the replicas apart).
pub async fn connect_as(
    kubeconfig: Option<&Path>,
    identity: Option<&str>,
) -> Result<Client, ConnectError> {
    let config = config(kubeconfig, identity).await?;
    Client::try_from(config).map_err(ConnectError::Client)
}

/// `connect_as`, with every write request held to `fence` (see `fence`): while it is closed,
/// writes fail with `fence::FenceClosed` before anything is sent.
pub async fn connect_fenced(
    kubeconfig: Option<&Path>,
    identity: Option<&str>,
    fence: WriteFence,
) -> Result<Client, ConnectError> {
    use kube::client::ConfigExt;
    let config = config(kubeconfig, identity).await?;
    // kube's own stack (`ClientBuilder::try_from`), with a fenced connector under it.
    let mut plain = hyper_util::client::legacy::connect::HttpConnector::new();
    plain.enforce_http(false);
    let tls = config
        .rustls_https_connector_with_connector(plain)
        .map_err(ConnectError::Client)?;
    let mut connector =
        hyper_timeout::TimeoutConnector::new(FencedConnector::new(tls, fence.clone()));
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer().map_err(ConnectError::Client)?)
        .layer(config.extra_headers_layer().map_err(ConnectError::Client)?)
        .layer(FenceLayer(fence))
        .service(http);
    Ok(Client::new(service, config.default_namespace.clone()))
}

/// Longest a connection to the API server may take to open (TLS included).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest the API server may stay silent while sending or answering one request.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The API server this process connected to first (credentials redacted).
static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What to tell someone whose API server could not be reached: which server, and how long
/// each request was given. `None` before any connection was set up.
pub fn unreachable_hint() -> Option<String> {
    SERVER.get().map(|server| {
        format!(
            "the API server was {server}; each request is given {}s to connect and {}s to answer, and is tried {ATTEMPTS} times",
            CONNECT_TIMEOUT.as_secs(),
            ANSWER_TIMEOUT.as_secs()
        )
    })
}

async fn config(kubeconfig: Option<&Path>, identity: Option<&str>) -> Result<Config, ConnectError> {
    install_crypto_provider();
    let mut config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let kc =
                Kubeconfig::read_from(path).map_err(|source| ConnectError::ReadKubeconfig {
                    path: shown.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ConnectError::LoadKubeconfig {
                    path: shown,
                    source,
                })?
        }
        None => Config::infer().await.map_err(ConnectError::Infer)?,
    };
    let _ = SERVER.set(crate::vocab::redact_urls(&config.cluster_url.to_string()));
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(ANSWER_TIMEOUT);
    config.write_timeout = Some(ANSWER_TIMEOUT);
    let agent = match identity {
        Some(id) => format!("envctl/{} ({id})", env!("CARGO_PKG_VERSION")),
        None => format!("envctl/{}", env!("CARGO_PKG_VERSION")),
    };
    if let Ok(value) = http::HeaderValue::from_str(&agent) {
        config.headers.push((http::header::USER_AGENT, value));
    }
    Ok(config)
}

pub fn api_resource(kind: ObjectKind) -> ApiResource {
    let (group, version) = match kind.api_version().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), kind.api_version().to_string()),
    };
    ApiResource {
        group,
        version,
        api_version: kind.api_version().to_string(),
        kind: kind.as_str().to_string(),
        plural: kind.plural().to_string(),
    }
}

/// The API for one kind, in one namespace or (for namespaces, or for listing) cluster-wide.
pub fn api(client: &Client, kind: ObjectKind, namespace: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match namespace {
        Some(ns) if kind.namespaced() => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// Whether a kube error means the cluster could not be reached or refused us (exit code 3)
/// rather than rejecting one object.
pub fn is_unreachable_or_refused(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 401 || status.code == 403,
        _ => true,
    }
}

/// Why a request was retried (a metric label; a closed set).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
pub enum RetryReason {
    /// 5xx from the server.
    ServerError,
    /// 429: the server asked us to slow down.
    Throttled,
    /// The connection failed or was cut.
    Connection,
    /// No answer in time.
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct RetryLabels {
    pub reason: RetryReason,
}

/// Requests retried, by reason (registered into the controller's metrics).
pub static RETRIES: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<
        RetryLabels,
        prometheus_client::metrics::counter::Counter,
    >,
> = std::sync::LazyLock::new(Default::default);

/// Whether `err` is worth sending again, why, and how long the server asked us to wait.
pub fn transient(err: &kube::Error) -> Option<(RetryReason, Option<std::time::Duration>)> {
    match err {
        kube::Error::Api(s) if s.code == 429 => Some((
            RetryReason::Throttled,
            s.details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| std::time::Duration::from_secs(u64::from(s))),
        )),
        kube::Error::Api(s) if s.code == 504 => Some((RetryReason::Timeout, None)),
        kube::Error::Api(s) if s.code >= 500 => Some((RetryReason::ServerError, None)),
        kube::Error::Api(_) => None,
        // Not sending is this replica's decision, not the network's: never retried.
        e if fence::is_fenced(e) => None,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
            let mut text = err.to_string().to_ascii_lowercase();
            let mut src = std::error::Error::source(err);
            while let Some(s) = src {
                text.push_str(&s.to_string().to_ascii_lowercase());
                src = s.source();
            }
            if text.contains("timed out") || text.contains("elapsed") || text.contains("timeout") {
                Some((RetryReason::Timeout, None))
            } else {
                Some((RetryReason::Connection, None))
            }
        }
        _ => None,
    }
}

/// How many times a request is sent at most, and the backoff between tries.
const ATTEMPTS: u32 = 5;
const FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// A factor in [0.5, 1.5) from the clock and a counter: enough to spread retries apart.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos ^ N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    0.5 + (x % 1000) as f64 / 1000.0
}

/// Sends a request until it succeeds, fails for good, or `ATTEMPTS` tries were made: a
/// transient error (5xx, 429, a cut connection, a timeout) is retried after a jittered
/// exponential backoff (or the server's Retry-After), each retry counted in `RETRIES`.
pub async fn with_retries<T, F, Fut>(mut request: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match request().await {
            Ok(v) => return Ok(v),
            Err(e) => match transient(&e) {
                Some((reason, retry_after)) if attempt < ATTEMPTS => {
                    RETRIES.get_or_create(&RetryLabels { reason }).inc();
                    let backoff = FIRST_DELAY
                        .saturating_mul(1 << (attempt - 1))
                        .min(MAX_DELAY)
                        .mul_f64(jitter());
                    let delay = retry_after.map_or(backoff, |r| r.min(MAX_DELAY * 2));
                    tracing::debug!(?reason, attempt, ?delay, error = %e, "retrying a request");
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(e),
            },
        }
    }
}

/// Why an environment failed, from the error of its first failed request (a metric label).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
pub enum FailureReason {
    /// An admission webhook or policy refused the write.
    AdmissionDenied,
    /// 401/403: not allowed.
    Forbidden,
    /// 400/422: the object was refused as invalid.
    Invalid,
    /// 409: someone else holds the object or changed it.
    Conflict,
    /// No answer in time (after retries).
    Timeout,
    /// The server could not be reached (after retries).
    Unreachable,
    /// Anything else.
    Other,
}

impl FailureReason {
    pub fn of(err: &kube::Error) -> FailureReason {
        match err {
            kube::Error::Api(s)
                if s.message.contains("admission webhook")
                    || s.message.contains("denied the request") =>
            {
                FailureReason::AdmissionDenied
            }
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => FailureReason::Forbidden,
            kube::Error::Api(s) if s.code == 400 || s.code == 422 => FailureReason::Invalid,
            kube::Error::Api(s) if s.code == 409 => FailureReason::Conflict,
            e => match transient(e) {
                Some((RetryReason::Timeout, _)) => FailureReason::Timeout,
                Some((RetryReason::Connection, _)) => FailureReason::Unreachable,
                _ => FailureReason::Other,
            },
        }
    }
}
