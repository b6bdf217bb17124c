//! The ACME client: an account on the directory (its credentials kept by the caller), orders
//! answered with HTTP-01 through `Challenges` (kept in the cluster, served by every replica's
//! listener), and answers
//! classified for the ledger. Wraps instant-acme with our own HTTP client so that one rustls
//! crypto provider (ring) is used, extra roots can be trusted, and the `Retry-After` of a 429
//! (which instant-acme drops) is kept.
//!
//! Sends ACME requests only; never decides whether an order may be sent (the ledger does).

use std::cell::RefCell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse,
    CertificateIdentifier, ChallengeType, ExternalAccountKey, HttpClient, Identifier, NewAccount,
    NewOrder, Order, OrderStatus, RetryPolicy,
};

use super::challenges::Challenges;
use super::ledger::Limit;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (untrusted certificates, far higher limits).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("reading the ACME CA bundle {path}")]
    CaBundle {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the ACME CA bundle {path} holds no certificate")]
    EmptyCaBundle { path: String },
    #[error("setting up TLS for the ACME client: {0}")]
    Tls(String),
    #[error("the ACME server refused for rate limit {limit:?} until {retry_after:?}: {detail}")]
    RateLimited {
        /// Which limit, when the problem's detail names one envctl models.
        limit: Option<Limit>,
        /// Unix seconds from `Retry-After`.
        retry_after: Option<u64>,
        detail: String,
    },
    #[error("authorization for {name} failed: {detail}")]
    AuthorizationFailed { name: String, detail: String },
    #[error("the ACME server does not offer an HTTP-01 challenge for {name}")]
    NoHttpChallenge { name: String },
    #[error(
        "publishing the HTTP-01 answer for {name} (the CA was not asked to validate): {message}"
    )]
    Challenge { name: String, message: String },
    #[error(
        "the order was finalized with a key this instance does not hold (its certificate is of no use): it is abandoned, and the next round places a new order"
    )]
    FinalizedWithAnotherKey,
    #[error("the order ended as {status}")]
    OrderFailed { status: String },
    #[error("making the order's key or certificate request: {message}")]
    Key { message: String },
    #[error(
        "{what}: the ACME server requires external account binding; give its key id with --acme-eab-kid and the HMAC key in a file with --acme-eab-hmac-key-file"
    )]
    ExternalAccountRequired { what: &'static str },
    #[error("{what}")]
    Acme {
        what: &'static str,
        #[source]
        source: instant_acme::Error,
    },
}

/// How many times a step refused with badNonce is tried (each try is itself retried by
/// instant-acme).
const NONCE_ATTEMPTS: usize = 4;

const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";

impl AcmeError {
    /// A stale or refused nonce: the request did nothing and can be sent again.
    pub fn is_bad_nonce(&self) -> bool {
        matches!(self, AcmeError::Acme { source: instant_acme::Error::Api(p), .. } if p.r#type.as_deref() == Some(BAD_NONCE))
    }

    fn from_acme(what: &'static str, source: instant_acme::Error) -> AcmeError {
        if let instant_acme::Error::Api(p) = &source
            && p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited")
        {
            let detail = p.detail.clone().unwrap_or_default();
            return AcmeError::RateLimited {
                limit: limit_named_in(&detail),
                retry_after: RETRY_AFTER.try_with(|r| *r.borrow()).ok().flatten(),
                detail,
            };
        }
        if let instant_acme::Error::Api(p) = &source
            && p.r#type.as_deref() == Some("urn:ietf:params:acme:error:externalAccountRequired")
        {
            return AcmeError::ExternalAccountRequired { what };
        }
        AcmeError::Acme { what, source }
    }
}

/// The limit a rate-limit problem's detail names (Let's Encrypt's wording).
pub fn limit_named_in(detail: &str) -> Option<Limit> {
    let d = detail.to_ascii_lowercase();
    if d.contains("exact set") {
        Some(Limit::NewCertificatesPerExactSet)
    } else if d.contains("failed authorization") {
        Some(Limit::AuthorizationFailuresPerIdentifier)
    } else if d.contains("new orders") {
        Some(Limit::NewOrdersPerAccount)
    } else if d.contains("certificates") && d.contains("registered domain")
        || d.contains("already issued for")
    {
        Some(Limit::NewCertificatesPerRegisteredDomain)
    } else {
        None
    }
}

tokio::task_local! {
    /// The `Retry-After` (unix seconds) of the last 429 seen by requests of this task.
    static RETRY_AFTER: RefCell<Option<u64>>;
}

/// Parses `Retry-After`: delay seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: u64) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(now + secs);
    }
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// Counts what reaches the ACME server.
#[derive(Debug, Default)]
pub struct AcmeCounters {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// Longest the ACME server may take to accept a connection (answering: `--acme-request-timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from the ACME server (a certificate chain is a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

type Hyper = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// Cheap to clone: clones share the connection pool, the counters and the turn.
#[derive(Clone)]
struct Http {
    inner: Hyper,
    counters: Arc<AcmeCounters>,
    /// Longest one request may take, its answer's body included.
    timeout: Duration,
    /// One request in flight per account and process: orders proceed side by side, their
    /// requests take turns (see `fetch`).
    turn: Arc<tokio::sync::Semaphore>,
}

impl HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.fetch(req);
        Box::pin(async move {
            let rsp = fut.await?;
            Ok(BytesResponse::from(rsp))
        })
    }
}

impl Http {
    /// Sends one request and reads the whole answer, all within `timeout` (a server
    /// that accepts and then goes silent, before or during the body, is given up on).
    ///
    /// Requests take turns: the next is sent when the last answer is read (or given up
    /// on), so a wait for a turn is bounded by the requests ahead of it, each by `timeout`.
    /// Issuance is bounded by the CA's limits (300 new orders per 3 hours per account at
    /// Let's Encrypt), not by round trips, so taking turns costs nothing that counts; and
    /// Let's Encrypt's test CA (pebble 2.10) can deadlock under concurrent requests from
    /// one client: a new order scans every authorization under its store's read lock while
    /// an authorization fetch, holding that authorization, waits behind a queued writer.
    fn fetch(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> impl Future<Output = Result<http::Response<Full<Bytes>>, instant_acme::Error>> + Send + 'static
    {
        let fut = self.inner.request(req);
        let counters = self.counters.clone();
        let timeout = self.timeout;
        let turn = self.turn.clone();
        async move {
            // Never closed, so acquiring only waits.
            let _turn = turn.acquire_owned().await.ok();
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let whole = async {
                let rsp = fut
                    .await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                let (parts, body) = rsp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE)
                    .collect()
                    .await
                    .map_err(instant_acme::Error::Other)?
                    .to_bytes();
                Ok::<_, instant_acme::Error>(http::Response::from_parts(parts, Full::new(body)))
            };
            let rsp = tokio::time::timeout(timeout, whole).await.map_err(|_| {
                instant_acme::Error::Other(
                    format!("the ACME server did not answer within {timeout:?}").into(),
                )
            })??;
            if rsp.status() == http::StatusCode::TOO_MANY_REQUESTS {
                counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                let at = rsp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, super::unix_now()));
                let _ = RETRY_AFTER.try_with(|r| *r.borrow_mut() = at);
            }
            Ok(rsp)
        }
    }
}

fn http_client(
    ca_bundle: Option<&Path>,
    counters: Arc<AcmeCounters>,
    timeout: Duration,
) -> Result<Http, AcmeError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_bundle {
        use rustls_pki_types::pem::PemObject;
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| AcmeError::CaBundle {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&bytes).flatten() {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(AcmeError::EmptyCaBundle { path: shown });
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AcmeError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut plain = HttpConnector::new();
    plain.set_connect_timeout(Some(CONNECT_TIMEOUT));
    plain.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(plain);
    Ok(Http {
        inner: HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector),
        counters,
        timeout,
        turn: Arc::new(tokio::sync::Semaphore::new(1)),
    })
}

/// What the certificate step of `apply` and `run` does.
#[derive(Debug, Clone)]
pub enum CertMode {
    /// `--skip-certificates`: certificates are left alone.
    Skip,
    /// No ACME directory: TLS environments are applied without certificates, and reported so.
    Unconfigured,
    /// Certificates from this ACME directory.
    Acme(AcmeConfig),
}

/// How to reach the ACME server. Its `Debug` shows the directory without credentials and
/// never the EAB key.
#[derive(Clone)]
pub struct AcmeConfig {
    pub directory: String,
    pub email: Option<String>,
    pub ca_bundle: Option<std::path::PathBuf>,
    /// External account binding: key id and the HMAC key (raw bytes).
    pub eab: Option<(String, Vec<u8>)>,
    /// How long an order may take from challenge to certificate.
    pub order_timeout: Duration,
    /// How long the server may take to answer one request, its body included.
    pub request_timeout: Duration,
    /// The certificate profile every order asks for (`--acme-profile`), unless an
    /// environment names its own.
    pub profile: Option<String>,
}

impl std::fmt::Debug for AcmeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeConfig")
            .field("directory", &crate::vocab::redact_urls(&self.directory))
            .field("email", &self.email)
            .field("ca_bundle", &self.ca_bundle)
            .field("eab", &self.eab.as_ref().map(|(kid, _)| (kid, "(masked)")))
            .field("order_timeout", &self.order_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("profile", &self.profile)
            .finish()
    }
}

/// A ready account.
pub struct Acme {
    account: Account,
    pub config: AcmeConfig,
    pub counters: Arc<AcmeCounters>,
    /// Whether the server offers ARI (RFC 9773).
    pub ari: bool,
    /// The certificate profiles the directory offers, sorted.
    pub profiles: Vec<String>,
}

/// An issued certificate.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Acme {
    /// Restores the account from `stored` credentials (JSON), or registers a new one and
    /// returns its credentials to store.
    pub async fn connect(
        config: AcmeConfig,
        stored: Option<&[u8]>,
    ) -> Result<(Acme, Option<Vec<u8>>), AcmeError> {
        let counters = Arc::new(AcmeCounters::default());
        // One client (the system roots are read once), shared by the account and the
        // directory lookup below.
        let http = http_client(
            config.ca_bundle.as_deref(),
            counters.clone(),
            config.request_timeout,
        )?;
        let builder =
            || -> Result<_, AcmeError> { Ok(Account::builder_with_http(Box::new(http.clone()))) };
        let restored = match stored.map(serde_json::from_slice::<AccountCredentials>) {
            Some(Ok(creds)) => Some(
                builder()?
                    .from_credentials(creds)
                    .await
                    .map_err(|e| AcmeError::from_acme("restoring the ACME account", e))?,
            ),
            _ => None,
        };
        let (account, new_credentials) = match restored {
            Some(a) => (a, None),
            None => {
                let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let eab = config
                    .eab
                    .as_ref()
                    .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
                let (account, creds) = RETRY_AFTER
                    .scope(
                        RefCell::new(None),
                        builder()?.create(
                            &NewAccount {
                                contact: &contacts,
                                terms_of_service_agreed: true,
                                only_return_existing: false,
                            },
                            config.directory.clone(),
                            eab.as_ref(),
                        ),
                    )
                    .await
                    .map_err(|e| AcmeError::from_acme("registering an ACME account", e))?;
                let encoded = serde_json::to_vec(&creds).map_err(|e| AcmeError::Acme {
                    what: "encoding the account credentials",
                    source: e.into(),
                })?;
                (account, Some(encoded))
            }
        };
        // ARI: whether the directory names a renewalInfo endpoint. instant-acme only says so
        // by refusing `replaces`, so ask for the directory ourselves.
        let ari = directory_has_ari(&http, &config.directory).await;
        let mut profiles: Vec<String> = account.profiles().map(|p| p.name.to_string()).collect();
        profiles.sort();
        Ok((
            Acme {
                account,
                config,
                counters,
                ari,
                profiles,
            },
            new_credentials,
        ))
    }

    /// The account's URL (its identity in the ledger).
    pub fn id(&self) -> &str {
        self.account.id()
    }

    /// The profile an order for an environment asks for: its own (`spec.tls.profile`), else
    /// `--acme-profile`, else none (the CA's default). An error (no order may be placed) when
    /// the directory does not offer it.
    pub fn profile_for<'a>(&'a self, own: Option<&'a str>) -> Result<Option<&'a str>, String> {
        let (profile, setting) = match (own, self.config.profile.as_deref()) {
            (Some(p), _) => (p, "spec.tls.profile"),
            (None, Some(p)) => (p, "--acme-profile"),
            (None, None) => return Ok(None),
        };
        if self.profiles.iter().any(|p| p == profile) {
            return Ok(Some(profile));
        }
        Err(if self.profiles.is_empty() {
            format!(
                "{setting} {profile:?}: the ACME directory {} offers no certificate profiles",
                self.config.directory
            )
        } else {
            format!(
                "{setting} {profile:?} is not a profile the ACME directory offers (it offers: {})",
                self.profiles.join(", ")
            )
        })
    }

    /// When to renew a certificate by the CA's ARI window (unix seconds): a time within the
    /// window (`certs::renewal_time`). `None` without ARI or when the CA cannot say.
    pub async fn renewal_time(&self, ari_id: &str) -> Option<i64> {
        if !self.ari {
            return None;
        }
        let (aki, serial) = ari_id.split_once('.')?;
        let id = CertificateIdentifier {
            authority_key_identifier: aki.to_string().into(),
            serial: serial.to_string().into(),
        };
        match self.account.renewal_info(&id).await {
            Ok((info, _)) => Some(super::renewal_time(
                ari_id,
                info.suggested_window.start.unix_timestamp(),
                info.suggested_window.end.unix_timestamp(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "asking for renewal information");
                None
            }
        }
    }

    /// Places a new order (this is what the ledger charged for) and returns its URL.
    pub async fn new_order(
        &self,
        names: &[String],
        replaces: Option<&str>,
        profile: Option<&str>,
    ) -> Result<Order, AcmeError> {
        let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
        let replaced = replaces.and_then(|r| {
            let (aki, serial) = r.split_once('.')?;
            Some(CertificateIdentifier {
                authority_key_identifier: aki.to_string().into(),
                serial: serial.to_string().into(),
            })
        });
        let mut new = NewOrder::new(&identifiers);
        if let Some(r) = replaced.filter(|_| self.ari) {
            new = new.replaces(r);
        }
        if let Some(p) = profile {
            new = new.profile(p);
        }
        // A badNonce refusal is not an order (the server counted nothing): ask again.
        let mut attempt = 0;
        loop {
            let result = RETRY_AFTER
                .scope(RefCell::new(None), self.account.new_order(&new))
                .await
                .map_err(|e| AcmeError::from_acme("placing the order", e));
            attempt += 1;
            match result {
                Err(e) if e.is_bad_nonce() && attempt < NONCE_ATTEMPTS => continue,
                other => return other,
            }
        }
    }

    /// Picks up an order placed earlier (by a process that stopped before finishing it).
    pub async fn resume(&self, url: &str) -> Result<Order, AcmeError> {
        RETRY_AFTER
            .scope(RefCell::new(None), self.account.order(url.to_string()))
            .await
            .map_err(|e| AcmeError::from_acme("resuming the order", e))
    }

    /// Sees a placed order through to its certificate, with `key` (PEM) as the certificate's
    /// key, whatever state the CA returns it in: `pending` is authorized (HTTP-01) and
    /// finalized, `ready` finalized, `processing` or `valid` downloaded, and kept only if
    /// the certificate is for `key` (the caller keeps an order's key before it is finalized,
    /// so an order finalized by an earlier process, or by this call before a retry, was
    /// finalized with it).
    pub async fn complete(
        &self,
        order: &mut Order,
        challenges: &Challenges,
        key: &str,
    ) -> Result<Issued, AcmeError> {
        let mut served = Vec::new();
        let mut attempt = 0;
        let result = loop {
            let result = RETRY_AFTER
                .scope(
                    RefCell::new(None),
                    self.complete_inner(order, challenges, &mut served, key),
                )
                .await;
            attempt += 1;
            match result {
                // A badNonce (Let's Encrypt sends them; pebble refuses 5% of nonces on
                // purpose) survived instant-acme's own retries: pick the order up where it
                // is and go on.
                Err(e) if e.is_bad_nonce() && attempt < NONCE_ATTEMPTS => {
                    let _ = order.refresh().await;
                }
                other => break other,
            }
        };
        for token in served {
            if let Err(e) = challenges.remove(&token).await {
                tracing::warn!(error = %crate::vocab::error_chain(&e), "withdrawing an HTTP-01 answer; it is swept once stale");
            }
        }
        result
    }

    async fn complete_inner(
        &self,
        order: &mut Order,
        challenges: &Challenges,
        served: &mut Vec<String>,
        key: &str,
    ) -> Result<Issued, AcmeError> {
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(self.config.order_timeout);
        // Finalized already (by a process that stopped before storing the result, or by this
        // call before a badNonce retry): the certificate is only downloaded (no new order, no
        // quota), and used only if it is for the key kept for this order.
        if matches!(
            order.state().status,
            OrderStatus::Processing | OrderStatus::Valid
        ) {
            let chain_pem = order
                .poll_certificate(&retries)
                .await
                .map_err(|e| AcmeError::from_acme("downloading the certificate", e))?;
            if !super::chain_matches_key(chain_pem.as_bytes(), key) {
                return Err(AcmeError::FinalizedWithAnotherKey);
            }
            return Ok(Issued {
                chain_pem,
                key_pem: key.to_string(),
            });
        }
        self.authorize(order, challenges, served, &retries).await?;
        finalize(order, &retries, key).await
    }

    /// Authorize: publish every pending HTTP-01 answer (where every replica reads it), tell
    /// the CA to validate, and wait until the order is ready. A validation's verdict is an
    /// `AuthorizationFailed` (Let's Encrypt counts those).
    async fn authorize(
        &self,
        order: &mut Order,
        challenges: &Challenges,
        served: &mut Vec<String>,
        retries: &RetryPolicy,
    ) -> Result<(), AcmeError> {
        let fail = |what| move |e| AcmeError::from_acme(what, e);
        if order.state().status == OrderStatus::Pending {
            let mut authorizations = order.authorizations();
            while let Some(result) = authorizations.next().await {
                let mut authz = result.map_err(fail("reading an authorization"))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::AuthorizationFailed {
                            name: authz.identifier().to_string(),
                            detail: format!("the authorization is {other:?}"),
                        });
                    }
                }
                let name = authz.identifier().to_string();
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or(AcmeError::NoHttpChallenge { name: name.clone() })?;
                let token = challenge.token.clone();
                // Published where every replica reads it before the CA is told to look; if
                // it cannot be published, the CA is not asked (a failed validation would
                // spend the authorization-failure limit).
                let now = super::unix_now();
                let ttl = self.config.order_timeout.as_secs() * 2 + 300;
                challenges
                    .put(
                        &token,
                        challenge.key_authorization().as_str(),
                        now,
                        now + ttl,
                    )
                    .await
                    .map_err(|e| AcmeError::Challenge {
                        name: name.clone(),
                        message: crate::vocab::error_chain(&e),
                    })?;
                served.push(token);
                challenge
                    .set_ready()
                    .await
                    .map_err(fail("answering a challenge"))?;
            }
        }
        // A problem document here is the validation's verdict (connection, DNS, wrong
        // answer...): an authorization failure, which Let's Encrypt counts.
        let status = match order.poll_ready(retries).await {
            Ok(s) => s,
            Err(instant_acme::Error::Api(p))
                if !matches!(
                    p.r#type.as_deref(),
                    Some("urn:ietf:params:acme:error:rateLimited") | Some(BAD_NONCE)
                ) =>
            {
                let mut names = Vec::new();
                let mut identifiers = order.identifiers();
                while let Some(Ok(i)) = identifiers.next().await {
                    names.push(i.to_string());
                }
                return Err(AcmeError::AuthorizationFailed {
                    name: names.join(","),
                    detail: p.to_string(),
                });
            }
            Err(e) => return Err(fail("waiting for the order to be ready")(e)),
        };
        match status {
            OrderStatus::Ready => {}
            OrderStatus::Invalid => {
                let mut detail = String::from("the order became invalid");
                let mut name = String::new();
                let mut authorizations = order.authorizations();
                while let Some(Ok(a)) = authorizations.next().await {
                    if a.status == AuthorizationStatus::Invalid {
                        name = a.identifier().to_string();
                        if let Some(e) = a.challenges.iter().find_map(|c| c.error.as_ref()) {
                            detail = e.to_string();
                        }
                    }
                }
                if name.is_empty() {
                    let mut identifiers = order.identifiers();
                    let mut names = Vec::new();
                    while let Some(Ok(i)) = identifiers.next().await {
                        names.push(i.to_string());
                    }
                    name = names.join(",");
                }
                return Err(AcmeError::AuthorizationFailed { name, detail });
            }
            other => {
                return Err(AcmeError::OrderFailed {
                    status: format!("{other:?}"),
                });
            }
        }
        Ok(())
    }
}

/// A new private key for an order (PEM). It is kept before the order is finalized.
pub fn new_order_key() -> Result<String, AcmeError> {
    rcgen::KeyPair::generate()
        .map(|k| k.serialize_pem())
        .map_err(|e| AcmeError::Key {
            message: e.to_string(),
        })
}

/// Finalize: send a certificate request for the order's names, signed with `key`, and
/// download the certificate chain.
async fn finalize(
    order: &mut Order,
    retries: &RetryPolicy,
    key: &str,
) -> Result<Issued, AcmeError> {
    let fail = |what| move |e| AcmeError::from_acme(what, e);
    let key_err = |e: rcgen::Error| AcmeError::Key {
        message: e.to_string(),
    };
    let mut names = Vec::new();
    let mut identifiers = order.identifiers();
    while let Some(i) = identifiers.next().await {
        names.push(
            i.map_err(fail("reading the order's identifiers"))?
                .to_string(),
        );
    }
    let pair = rcgen::KeyPair::from_pem(key).map_err(key_err)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(key_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&pair).map_err(key_err)?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(fail("finalizing the order"))?;
    let chain_pem = order
        .poll_certificate(retries)
        .await
        .map_err(fail("downloading the certificate"))?;
    Ok(Issued {
        chain_pem,
        key_pem: key.to_string(),
    })
}

async fn directory_has_ari(http: &Http, directory: &str) -> bool {
    // ACME servers may refuse a request without a User-Agent (RFC 8555 6.1; pebble does).
    let Ok(req) = Request::get(directory)
        .header(
            http::header::USER_AGENT,
            concat!("envctl/", env!("CARGO_PKG_VERSION")),
        )
        .body(BodyWrapper::<Bytes>::default())
    else {
        return false;
    };
    let Ok(rsp) = http.fetch(req).await else {
        return false;
    };
    let Ok(body) = rsp.into_body().collect().await;
    serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
        .ok()
        .and_then(|v| v.get("renewalInfo").map(|u| u.is_string()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eab_key_never_shows_in_debug() {
        let config = AcmeConfig {
            directory: "https://bot:t0ken-xyz@acme.example/dir".into(),
            email: None,
            ca_bundle: None,
            eab: Some(("kid-1".into(), b"hmac-s3cret-bytes".to_vec())),
            order_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            profile: None,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("t0ken-xyz"), "{shown}");
        assert!(!shown.contains("hmac"), "{shown}");
        assert!(!shown.contains("104, 109"), "the key's bytes: {shown}");
        assert!(
            shown.contains("kid-1") && shown.contains("(masked)"),
            "{shown}"
        );
    }

    type Answer = http::Response<Full<Bytes>>;

    /// A server on loopback that accepts connections: `answer` says what to send back for a
    /// method and path, `None` meaning never to answer (the request hangs).
    async fn server(answer: fn(&http::Method, &str, u16) -> Option<Answer>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| async move {
                            match answer(req.method(), req.uri().path(), port) {
                                Some(rsp) => Ok::<_, std::convert::Infallible>(rsp),
                                None => std::future::pending().await,
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        port
    }

    fn config(port: u16) -> AcmeConfig {
        AcmeConfig {
            directory: format!("http://127.0.0.1:{port}/dir"),
            email: None,
            ca_bundle: None,
            eab: None,
            order_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(1),
            profile: None,
        }
    }

    /// Answers the directory, nonces and account registration; never orders or ARI.
    fn registers_only(method: &http::Method, path: &str, port: u16) -> Option<Answer> {
        let base = format!("http://127.0.0.1:{port}");
        let rsp = http::Response::builder().header("Replay-Nonce", "bm9uY2U");
        let json = |status: u16, v: serde_json::Value| {
            rsp.status(status)
                .header("Content-Type", "application/json")
                .header("Location", format!("{base}/acct/1"))
                .body(Full::new(Bytes::from(v.to_string())))
                .ok()
        };
        match (method.as_str(), path) {
            ("GET", "/dir") => json(
                200,
                serde_json::json!({
                    "newNonce": format!("{base}/nonce"),
                    "newAccount": format!("{base}/account"),
                    "newOrder": format!("{base}/order"),
                    "revokeCert": format!("{base}/revoke"),
                    "keyChange": format!("{base}/key-change"),
                    "renewalInfo": format!("{base}/ari"),
                }),
            ),
            ("HEAD" | "GET", "/nonce") => json(200, serde_json::json!({})),
            ("POST", "/account") => json(201, serde_json::json!({"status": "valid"})),
            _ => None,
        }
    }

    /// Every request to the ACME server has a bound: a directory that is never answered, an
    /// order POST and an ARI lookup that are never answered each end within the request
    /// timeout, with an error that says so (ARI: no renewal time).
    #[tokio::test]
    async fn requests_to_a_server_that_never_answers_are_bounded() {
        let silent = server(|_, _, _| None).await;
        let started = std::time::Instant::now();
        let Err(e) = Acme::connect(config(silent), None).await else {
            panic!("connected to a server that never answers");
        };
        assert!(started.elapsed() < Duration::from_secs(5), "{e:?}");
        assert!(
            crate::vocab::error_chain(&e).contains("did not answer within 1s"),
            "{}",
            crate::vocab::error_chain(&e)
        );

        let port = server(registers_only).await;
        let (acme, created) = Acme::connect(config(port), None).await.expect("an account");
        assert!(created.is_some() && acme.ari, "registered, ARI offered");
        let started = std::time::Instant::now();
        let Err(e) = acme
            .new_order(&["a.example.cloud".into()], None, None)
            .await
        else {
            panic!("an order from a server that never answers orders");
        };
        assert!(started.elapsed() < Duration::from_secs(5), "{e:?}");
        assert!(
            crate::vocab::error_chain(&e).contains("did not answer within 1s"),
            "{}",
            crate::vocab::error_chain(&e)
        );
        let started = std::time::Instant::now();
        assert_eq!(acme.renewal_time("YWtp.AQID").await, None);
        // It asked, and gave up at the bound.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    /// Requests take turns: three orders sent at once to a CA that never answers orders
    /// end one request timeout apart (side by side, all three would end after one).
    #[tokio::test]
    async fn requests_take_turns() {
        let port = server(registers_only).await;
        let (acme, _) = Acme::connect(config(port), None).await.expect("an account");
        let started = std::time::Instant::now();
        let names = ["a.example.cloud".to_string()];
        let order = || acme.new_order(&names, None, None);
        let (a, b, c) = tokio::join!(order(), order(), order());
        let waited = started.elapsed();
        assert!(
            a.is_err() && b.is_err() && c.is_err(),
            "orders never answered"
        );
        assert!(
            waited >= Duration::from_millis(2900) && waited < Duration::from_secs(10),
            "three requests of at most 1 s each, in turn: {waited:?}"
        );
    }

    /// The chain the fake CA below hands out for its finalized orders.
    static CHAIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    /// How many times the fake CA was asked for order 2 (`processing` the first time).
    static ORDER2_ASKED: AtomicU64 = AtomicU64::new(0);
    /// How many times an order was finalized at the fake CA (order 3: `ready` until then).
    static FINALIZED: AtomicU64 = AtomicU64::new(0);

    /// A CA whose orders 1 (`valid`) and 2 (`processing`, then `valid`) were finalized
    /// before this process picked them up, whose order 3 is `ready` (valid once finalized:
    /// its certificate is `CHAIN`, made for the key the test finalizes with), and whose
    /// order 4 is `invalid`. It never orders anew.
    fn finalized_orders(method: &http::Method, path: &str, port: u16) -> Option<Answer> {
        let base = format!("http://127.0.0.1:{port}");
        let order = |status: &str| {
            serde_json::json!({
                "status": status,
                "identifiers": [{"type": "dns", "value": "a.example.cloud"}],
                "authorizations": [],
                "finalize": format!("{base}/finalize"),
                "certificate": format!("{base}/cert"),
            })
        };
        let json = |v: serde_json::Value| {
            http::Response::builder()
                .header("Replay-Nonce", "bm9uY2U")
                .header("Content-Type", "application/json")
                .body(Full::new(Bytes::from(v.to_string())))
                .ok()
        };
        match (method.as_str(), path) {
            ("POST", "/order/1") => json(order("valid")),
            ("POST", "/order/2") => {
                let asked = ORDER2_ASKED.fetch_add(1, Ordering::SeqCst);
                json(order(if asked == 0 { "processing" } else { "valid" }))
            }
            ("POST", "/order/3") => json(order(if FINALIZED.load(Ordering::SeqCst) == 0 {
                "ready"
            } else {
                "valid"
            })),
            ("POST", "/order/4") => json(order("invalid")),
            ("POST", "/finalize") => {
                FINALIZED.fetch_add(1, Ordering::SeqCst);
                json(order("valid"))
            }
            ("POST", "/cert") => http::Response::builder()
                .header("Replay-Nonce", "bm9uY2U")
                .header("Content-Type", "application/pem-certificate-chain")
                .body(Full::new(Bytes::from(CHAIN.get()?.clone())))
                .ok(),
            _ => registers_only(method, path, port),
        }
    }

    /// Every order state the CA may hand back (pebble cannot be made to return most of them
    /// on demand): an order already finalized (`valid`, or `processing` until it is) is
    /// downloaded, not finalized again, and its certificate is used only if it is for the key
    /// this process holds for the order, else the order is abandoned; a `ready` order is
    /// finalized once, with the key given; an `invalid` one fails. (`pending` is every
    /// pebble test's.)
    #[tokio::test]
    async fn every_order_state_is_taken_from_where_it_is() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example.cloud".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let _ = CHAIN.set(cert.pem());
        let port = server(finalized_orders).await;
        let (acme, _) = Acme::connect(config(port), None).await.expect("an account");
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        // Never used: no challenge is answered for a finalized order.
        let challenges = Challenges::new(&client, "unused", "unused");
        let base = format!("http://127.0.0.1:{port}");

        let mut valid = acme.resume(&format!("{base}/order/1")).await.unwrap();
        let issued = acme
            .complete(&mut valid, &challenges, &key.serialize_pem())
            .await
            .expect("the certificate of a valid order, for our key");
        assert_eq!(issued.chain_pem, cert.pem());

        let mut processing = acme.resume(&format!("{base}/order/2")).await.unwrap();
        assert_eq!(processing.state().status, OrderStatus::Processing);
        acme.complete(&mut processing, &challenges, &key.serialize_pem())
            .await
            .expect("the certificate of a processing order, once valid");

        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let mut valid = acme.resume(&format!("{base}/order/1")).await.unwrap();
        let err = acme
            .complete(&mut valid, &challenges, &other)
            .await
            .expect_err("a certificate for a key this process does not hold");
        assert!(matches!(err, AcmeError::FinalizedWithAnotherKey), "{err:?}");
        assert_eq!(
            FINALIZED.load(Ordering::SeqCst),
            0,
            "nothing finalized again"
        );

        let mut ready = acme.resume(&format!("{base}/order/3")).await.unwrap();
        assert_eq!(ready.state().status, OrderStatus::Ready);
        let issued = acme
            .complete(&mut ready, &challenges, &key.serialize_pem())
            .await
            .expect("a ready order, finalized");
        assert_eq!(issued.chain_pem, cert.pem());
        assert_eq!(FINALIZED.load(Ordering::SeqCst), 1, "finalized once");

        let mut invalid = acme.resume(&format!("{base}/order/4")).await.unwrap();
        let err = acme
            .complete(&mut invalid, &challenges, &key.serialize_pem())
            .await
            .expect_err("an invalid order");
        assert!(
            matches!(
                err,
                AcmeError::AuthorizationFailed { .. } | AcmeError::OrderFailed { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_chain_matches_only_its_own_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example.cloud".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let chain = cert.pem();
        assert!(super::super::chain_matches_key(
            chain.as_bytes(),
            &key.serialize_pem()
        ));
        assert!(!super::super::chain_matches_key(
            chain.as_bytes(),
            &other.serialize_pem()
        ));
        assert!(!super::super::chain_matches_key(
            b"not a chain",
            &key.serialize_pem()
        ));
    }

    #[test]
    fn rate_limit_details_name_their_limit() {
        assert_eq!(
            limit_named_in(
                "too many certificates (50) already issued for \"example.cloud\" in the last 168h0m0s, retry after 2025-01-01 00:00:00 UTC"
            ),
            Some(Limit::NewCertificatesPerRegisteredDomain)
        );
        assert_eq!(
            limit_named_in(
                "too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s"
            ),
            Some(Limit::NewCertificatesPerExactSet)
        );
        assert_eq!(
            limit_named_in(
                "too many failed authorizations (5) for \"a.example.cloud\" in the last 1h0m0s"
            ),
            Some(Limit::AuthorizationFailuresPerIdentifier)
        );
        assert_eq!(
            limit_named_in("too many new orders (300) from this account in the last 3h0m0s"),
            Some(Limit::NewOrdersPerAccount)
        );
        assert_eq!(limit_named_in("slow down"), None);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("120", 1000), Some(1120));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0),
            Some(1_445_412_480)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }
}
