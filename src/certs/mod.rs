//! Certificates: one TLS certificate per environment from an ACME server (the directory is
//! always named explicitly; there is no default CA), planned against a model of Let's Encrypt's rate limits so that no order is ever
//! refused for quota.
//!
//! This file holds the pure decisions: what a certificate says (`inspect`), whether an
//! environment needs nothing, a reused copy or an order (`need`), and in which order and at
//! what time waiting orders will be served (`schedule`). `ledger` models the buckets; `acme`
//! speaks ACME; `store` keeps the ledger, the account and the certificates in the cluster;
//! `reconcile` runs the steps. Certificates never touch an environment's objects other than
//! its TLS Secret (and the namespace's certificate annotations).

pub mod acme;
pub mod challenges;
pub mod ledger;
pub mod plan;
pub mod reconcile;
pub mod store;

use ledger::{BucketKey, Decision, Ledger, Limit, OrderKind, OrderRequest};

pub use acme::CertMode;

pub use crate::vocab::{CERTIFICATE_ANNOTATION, WAIT_REASON_ANNOTATION, WAIT_UNTIL_ANNOTATION};

/// The value of `CERTIFICATE_ANNOTATION` while no ACME directory is configured.
pub const UNCONFIGURED_NOTE: &str =
    "none: no ACME directory is configured (--acme-directory letsencrypt|letsencrypt-staging|URL)";

/// The Secret holding an environment's certificate, in the environment's namespace.
pub use crate::vocab::{NOT_AFTER_ANNOTATION, TLS_SECRET};
pub const NAMES_ANNOTATION: &str = "envctl.materialize.cloud/certificate-names";
pub const SERIAL_ANNOTATION: &str = "envctl.materialize.cloud/certificate-serial";

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("parsing the certificate: {0}")]
    Parse(String),
}

/// What envctl needs to know about an issued certificate (its leaf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names, sorted, lower-cased.
    pub names: Vec<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Validity, unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The RFC 9773 certificate identifier (for ARI), when the leaf has an AKI.
    pub ari_id: Option<String>,
}

impl CertInfo {
    /// When a third of the lifetime remains (the renewal time without ARI).
    pub fn renew_at(&self) -> i64 {
        self.not_after - (self.not_after - self.not_before) / 3
    }

    pub fn covers(&self, names: &[String]) -> bool {
        self.names == sorted_names(names)
    }
}

/// The wall clock in unix seconds (the one clock of the certificate step; the pure
/// functions here take `now` as an argument).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sorted, lower-cased, de-duplicated names.
pub fn sorted_names(names: &[String]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    v.sort();
    v.dedup();
    v
}

/// Whether the leaf (first certificate) of a PEM chain is for the private key `key_pem`
/// (their public keys are the same). False when either cannot be read.
pub fn chain_matches_key(chain_pem: &[u8], key_pem: &str) -> bool {
    use rcgen::PublicKeyData;
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(chain_pem) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    cert.public_key().raw == key.subject_public_key_info().as_slice()
}

/// Reads the leaf (first certificate) of a PEM chain.
pub fn inspect(chain_pem: &[u8]) -> Result<CertInfo, InspectError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(chain_pem).map_err(|_| InspectError::NoCertificate)?;
    let cert = pem
        .parse_x509()
        .map_err(|e| InspectError::Parse(e.to_string()))?;
    let mut names = Vec::new();
    let mut aki = None;
    for ext in cert.iter_extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::DNSName(d) = n {
                        names.push(d.to_string());
                    }
                }
            }
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            _ => {}
        }
    }
    let serial_raw = cert.tbs_certificate.raw_serial();
    let serial = cert
        .tbs_certificate
        .serial
        .to_str_radix(16)
        .to_ascii_lowercase();
    let ari_id = aki.map(|aki| {
        instant_acme::CertificateIdentifier::new(aki.as_slice().into(), serial_raw.into())
            .to_string()
    });
    Ok(CertInfo {
        names: sorted_names(&names),
        serial,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        ari_id,
    })
}

/// The moment to renew a certificate inside the CA's ARI window `[start, end)` (unix
/// seconds), as RFC 9773 asks: a uniformly spread point of the window, so that a fleet's
/// renewals do not all land at its start. The point is drawn from the certificate's identifier,
/// not from a random source, so every pass and every replica pick the same moment. A window
/// that lies in the past (after a mass revocation, say) gives a moment in the past: renew now.
pub fn renewal_time(ari_id: &str, start: i64, end: i64) -> i64 {
    let span = end.saturating_sub(start);
    if span <= 0 {
        return start;
    }
    // FNV-1a of the identifier.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ari_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    start + (h % span as u64) as i64
}

/// What an environment's certificate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// The Secret holds a certificate for these names that is not due for renewal.
    Current,
    /// The controller's copy is valid and not due: write it back (no quota spent).
    Reuse,
    /// Order one.
    Order(OrderKind),
}

/// Decides what an environment needs at `now`. `renew_from` is the start of the server's ARI
/// window for the existing certificate, when the server offers ARI.
pub fn need(
    names: &[String],
    current: Option<&CertInfo>,
    copy: Option<&CertInfo>,
    renew_from: Option<i64>,
    now: i64,
) -> Need {
    let due =
        |c: &CertInfo| now >= renew_from.unwrap_or_else(|| c.renew_at()) || now >= c.not_after;
    if let Some(c) = current.filter(|c| c.covers(names))
        && !due(c)
    {
        return Need::Current;
    }
    if let Some(c) = copy.filter(|c| c.covers(names))
        && !due(c)
    {
        return Need::Reuse;
    }
    let previous = current
        .filter(|c| c.covers(names))
        .or(copy.filter(|c| c.covers(names)));
    match (previous, renew_from) {
        (Some(_), Some(from)) if now >= from => Need::Order(OrderKind::AriRenewal),
        (Some(_), _) => Need::Order(OrderKind::Renewal),
        (None, _) => Need::Order(OrderKind::New),
    }
}

/// An order waiting to be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub environment: String,
    pub names: Vec<String>,
    pub kind: OrderKind,
    /// Expiry of the certificate it renews.
    pub expires: Option<i64>,
    /// When the environment first asked (unix seconds).
    pub since: u64,
}

/// When a request is served.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// Now: spend these buckets (write-ahead), then send.
    Now(Vec<BucketKey>),
    /// Not before `at` (estimated from the queue ahead of it), waiting for `limit`.
    Later { at: u64, limit: Limit },
}

/// Orders requests by need (renewals of the certificates expiring first, then the oldest
/// request) and decides each against the ledger at `now`: the ones that fit are charged in
/// turn; the others get the time they will fit, counting the queue ahead of them.
pub fn schedule(
    mut requests: Vec<Request>,
    ledger: &Ledger,
    account: &str,
    now: u64,
) -> Vec<(Request, Slot)> {
    requests.sort_by(|a, b| {
        let renewal = |r: &Request| r.kind == OrderKind::New;
        (
            renewal(a),
            a.expires.unwrap_or(i64::MAX),
            a.since,
            &a.environment,
        )
            .cmp(&(
                renewal(b),
                b.expires.unwrap_or(i64::MAX),
                b.since,
                &b.environment,
            ))
    });
    let mut now_ledger = ledger.clone();
    // Estimates for waiting requests are simulated on their own copy, so that a simulated
    // future charge never holds back a request that fits now.
    let mut future = ledger.clone();
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        let req = OrderRequest {
            account: account.to_string(),
            names: r.names.clone(),
            kind: r.kind,
        };
        match now_ledger.decide(&req, now) {
            Decision::Allowed { charges } => {
                now_ledger.charge(&charges, now);
                future.charge(&charges, now);
                out.push((r, Slot::Now(charges)));
            }
            Decision::Wait { at, limit } => {
                let mut t = at;
                for _ in 0..64 {
                    match future.decide(&req, t) {
                        Decision::Allowed { charges } => {
                            future.charge(&charges, t);
                            break;
                        }
                        Decision::Wait { at, .. } => t = at.max(t + 1),
                    }
                }
                out.push((r, Slot::Later { at: t, limit }));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(names: &[&str], not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            names: names.iter().map(|s| s.to_string()).collect(),
            serial: "1".into(),
            not_before,
            not_after,
            ari_id: None,
        }
    }

    #[test]
    fn needs_follow_validity_names_and_copies() {
        let names = vec!["a.example.cloud".to_string()];
        let fresh = info(&["a.example.cloud"], 0, 90);
        assert_eq!(need(&names, Some(&fresh), None, None, 10), Need::Current);
        // A third of the lifetime left: renew, same names so a renewal.
        assert_eq!(
            need(&names, Some(&fresh), None, None, 60),
            Need::Order(OrderKind::Renewal)
        );
        // Lost Secret, valid copy: reuse.
        assert_eq!(need(&names, None, Some(&fresh), None, 10), Need::Reuse);
        // Different names: new.
        let other = info(&["b.example.cloud"], 0, 90);
        assert_eq!(
            need(&names, Some(&other), None, None, 10),
            Need::Order(OrderKind::New)
        );
        assert_eq!(
            need(&names, None, None, None, 10),
            Need::Order(OrderKind::New)
        );
        // ARI: renew inside the window, exempt.
        assert_eq!(
            need(&names, Some(&fresh), None, Some(20), 10),
            Need::Current
        );
        assert_eq!(
            need(&names, Some(&fresh), None, Some(20), 30),
            Need::Order(OrderKind::AriRenewal)
        );
    }

    #[test]
    fn schedule_serves_renewals_first_and_dates_the_rest() {
        let mut ledger = Ledger::default();
        ledger.limits.overrides.insert(
            "example.cloud".into(),
            ledger::BucketSpec::new(2, 7 * 86_400),
        );
        let req = |env: &str, kind, expires, since| Request {
            environment: env.into(),
            names: vec![format!("{env}.example.cloud")],
            kind,
            expires,
            since,
        };
        let requests = vec![
            req("new-old", OrderKind::New, None, 1),
            req("new-young", OrderKind::New, None, 5),
            req("new-mid", OrderKind::New, None, 3),
            req("renew", OrderKind::Renewal, Some(100), 9),
        ];
        let out = schedule(requests, &ledger, "acct", 1000);
        let order: Vec<&str> = out.iter().map(|(r, _)| r.environment.as_str()).collect();
        assert_eq!(order, ["renew", "new-old", "new-mid", "new-young"]);
        assert!(matches!(out[0].1, Slot::Now(_)));
        assert!(matches!(out[1].1, Slot::Now(_)));
        assert!(matches!(out[2].1, Slot::Now(_)));
        // Two per week: the third new certificate waits half a week from the first tokens.
        let Slot::Later { at, limit } = &out[3].1 else {
            panic!("{:?}", out[3])
        };
        assert_eq!(*limit, Limit::NewCertificatesPerRegisteredDomain);
        assert_eq!(*at, 1000 + 7 * 86_400 / 2);
    }

    #[test]
    fn waiting_estimates_count_the_queue_ahead() {
        let mut ledger = Ledger::default();
        ledger
            .limits
            .overrides
            .insert("example.cloud".into(), ledger::BucketSpec::new(1, 100));
        let requests = (0..3)
            .map(|i| Request {
                environment: format!("e{i}"),
                names: vec![format!("e{i}.example.cloud")],
                kind: OrderKind::New,
                expires: None,
                since: i,
            })
            .collect();
        let out = schedule(requests, &ledger, "acct", 0);
        let times: Vec<Option<u64>> = out
            .iter()
            .map(|(_, s)| match s {
                Slot::Now(_) => None,
                Slot::Later { at, .. } => Some(*at),
            })
            .collect();
        assert_eq!(times, [None, Some(100), Some(200)]);
    }

    #[test]
    fn renewal_time_spreads_over_the_window_and_is_stable() {
        let (start, end) = (1_000_000, 1_000_000 + 2 * 86_400);
        let times: Vec<i64> = (0..200)
            .map(|i| renewal_time(&format!("aki.{i:04x}"), start, end))
            .collect();
        assert!(times.iter().all(|t| (start..end).contains(t)));
        // Spread: both halves of the window get a fair share.
        let early = times.iter().filter(|t| **t < start + 86_400).count();
        assert!(
            (60..=140).contains(&early),
            "{early} of 200 in the first half"
        );
        // Stable: the same certificate gets the same moment.
        assert_eq!(
            renewal_time("aki.00ff", start, end),
            renewal_time("aki.00ff", start, end)
        );
        // An empty or inverted window: its start.
        assert_eq!(renewal_time("aki.1", start, start), start);
        assert_eq!(renewal_time("aki.1", start, start - 5), start);
    }
}
