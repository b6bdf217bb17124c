//! The quota ledger: a model of Let's Encrypt's rate limits as GCRA token buckets (the
//! algorithm Let's Encrypt itself uses), keyed as Let's Encrypt keys them. Pure: the caller
//! passes the clock in, and persists the ledger (write-ahead, before an order is sent).
//!
//! Charging follows DESIGN.md: a new order spends the account's order token; an issuance
//! spends the registered domain's token (not for renewals of the same name set) and the exact
//! name set's token; ARI-guided renewals are exempt from all of these.
//!
//! Let's Encrypt counts an issuance when the certificate is issued, not when it is ordered.
//! So an order holds its issuance tokens as a reservation, charged (and persisted) before it
//! is sent, so that a crash can only leave the ledger above what the CA counted; an order
//! that ends without a certificate `release`s them, and only the order token stays spent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::vocab::Limit;

impl Limit {
    /// Let's Encrypt's default capacity and window (seconds).
    pub fn default_spec(self) -> BucketSpec {
        match self {
            Limit::NewOrdersPerAccount => BucketSpec::new(300, 3 * 3600),
            Limit::NewCertificatesPerRegisteredDomain => BucketSpec::new(50, 7 * 86_400),
            Limit::NewCertificatesPerExactSet => BucketSpec::new(5, 7 * 86_400),
            Limit::AuthorizationFailuresPerIdentifier => BucketSpec::new(5, 3600),
            Limit::ConsecutiveAuthorizationFailuresPerIdentifier => {
                BucketSpec::new(1152, 1152 * 86_400)
            }
        }
    }
}

/// The wait after `failures` consecutive failed authorizations of one identifier. The first
/// four are governed by the hourly failure limit alone (a person fixing a route retries at
/// once); then two minutes, doubling with each failure, at most a day. From the fifteenth
/// failure on, an identifier fails at most once a day, which is what Let's Encrypt's pause
/// limit refills (one a day): consecutive failures stay near fifteen, never near the 1,152
/// that pause the identifier.
pub fn failure_backoff(failures: u32) -> u64 {
    if failures <= 4 {
        return 0;
    }
    60u64
        .saturating_mul(1 << (failures - 4).min(20))
        .min(86_400)
}

/// The limits in force: Let's Encrypt's defaults, with the registered-domain overrides and
/// the safety margin. Recorded in the ledger itself, so that `envctl quota`, `quota plan`
/// and every replica read the same limits without repeating flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// New certificates per registered domain, where Let's Encrypt raised the limit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, BucketSpec>,
    /// Tokens kept in reserve in every bucket.
    #[serde(default)]
    pub margin: u32,
    /// `--acme-limit-share K/N`: this region's fixed share of every fleet-wide limit, for a
    /// fleet without a home cluster. `None`: the whole limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
}

/// A fixed share K/N of Let's Encrypt's fleet-wide limits (new certificates per registered
/// domain and per exact set of names, which count every order for the domain whichever
/// account sends it). A region with share K/N may spend floor(capacity × K / N) tokens at a
/// refill of K/N of the limit's: regions whose shares sum to at most 1 together never go
/// past the limit in any window, so no region needs to know what another spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub part: u32,
    pub of: u32,
}

impl Share {
    /// Parses `K/N`, 1 <= K <= N.
    pub fn parse(s: &str) -> Result<Share, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected K/N such as 1/3, got {s:?}"))?;
        let number = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{v:?} in {s:?} is not a whole number"))
        };
        let (part, of) = (number(k)?, number(n)?);
        if part == 0 || part > of {
            return Err(format!(
                "{s:?}: the share must be K/N with 1 <= K <= N (this region's K parts of N)"
            ));
        }
        Ok(Share { part, of })
    }

    /// This share of `spec`: its capacity scaled down (rounded down) over the same window.
    pub fn of_spec(self, spec: BucketSpec) -> BucketSpec {
        let capacity = u64::from(spec.capacity) * u64::from(self.part) / u64::from(self.of);
        BucketSpec::new(capacity as u32, spec.window)
    }
}

impl Limit {
    /// Whether Let's Encrypt counts this limit across every account (the fleet), rather
    /// than per ACME account.
    pub fn fleet_wide(self) -> bool {
        matches!(
            self,
            Limit::NewCertificatesPerRegisteredDomain | Limit::NewCertificatesPerExactSet
        )
    }
}

impl Limits {
    /// One line for people: `Let's Encrypt's defaults, overrides a.cloud=5/168h, safety
    /// margin 2`.
    pub fn describe(&self) -> String {
        let mut out = "Let's Encrypt's defaults".to_string();
        if !self.overrides.is_empty() {
            let o: Vec<String> = self
                .overrides
                .iter()
                .map(|(d, s)| format!("{d}={}/{}h", s.capacity, s.window / 3600))
                .collect();
            out.push_str(&format!(", overrides {}", o.join(", ")));
        }
        if self.margin > 0 {
            out.push_str(&format!(", safety margin {}", self.margin));
        }
        if let Some(share) = self.share {
            out.push_str(&format!(
                ", this region's share {}/{} of the fleet-wide limits",
                share.part, share.of
            ));
        }
        out
    }
}

/// A bucket of `capacity` tokens refilled evenly over `window` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSpec {
    pub capacity: u32,
    pub window: u64,
}

impl BucketSpec {
    pub fn new(capacity: u32, window: u64) -> BucketSpec {
        BucketSpec { capacity, window }
    }

    /// Seconds between two tokens.
    fn interval(self) -> f64 {
        self.window as f64 / f64::from(self.capacity.max(1))
    }

    /// Parses an override such as `1000/168h`.
    pub fn parse(s: &str) -> Result<BucketSpec, String> {
        let (count, window) = s
            .split_once('/')
            .ok_or_else(|| format!("expected COUNT/WINDOW such as 1000/168h, got {s:?}"))?;
        let capacity: u32 = count
            .parse()
            .map_err(|_| format!("{count:?} is not a count"))?;
        let secs = crate::duration::parse(window)?.as_secs();
        if capacity == 0 || secs == 0 {
            return Err(format!("{s:?}: count and window must be above zero"));
        }
        Ok(BucketSpec::new(capacity, secs))
    }
}

/// One bucket's identity: the limit and what it counts (account, registered domain, name set
/// or identifier).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BucketKey {
    pub limit: Limit,
    pub key: String,
}

/// The registered domain (eTLD+1) of a hostname, by the Public Suffix List, private section
/// included (as Let's Encrypt counts).
pub fn registered_domain(hostname: &str) -> Option<String> {
    psl::domain_str(&hostname.to_ascii_lowercase()).map(str::to_string)
}

/// The exact-set key: sorted, lower-cased, de-duplicated names.
pub fn name_set_key(names: &[String]) -> String {
    let mut v: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    v.sort();
    v.dedup();
    v.join(",")
}

/// What kind of request an order is, for charging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderKind {
    /// A certificate for a name set not issued before.
    New,
    /// A renewal of the same name set.
    Renewal,
    /// A renewal inside the server's ARI window (RFC 9773): exempt from all limits.
    AriRenewal,
}

/// An order envctl wants to place.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub account: String,
    pub names: Vec<String>,
    pub kind: OrderKind,
}

/// The ledger's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Spend these tokens (write the ledger first), then send the order.
    Allowed { charges: Vec<BucketKey> },
    /// Not before `at` (unix seconds): `limit` is exhausted.
    Wait { at: u64, limit: Limit },
}

/// Every bucket's state: its theoretical arrival time (GCRA), in unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Theoretical arrival time per bucket.
    pub tat: BTreeMap<String, f64>,
    /// The limits the buckets are measured against (see `retune`).
    #[serde(default)]
    pub limits: Limits,
    /// Consecutive failed authorizations per identifier (`ACCOUNT/NAME`): how many, and when
    /// the last one was (unix seconds). A successful authorization clears it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consecutive_failures: BTreeMap<String, (u32, u64)>,
}

fn storage_key(k: &BucketKey) -> String {
    format!("{}:{}", k.limit.as_str(), k.key)
}

/// A bucket's state at `now`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketStatus {
    pub limit: Limit,
    pub key: String,
    pub capacity: u32,
    pub used: u32,
    pub remaining: u32,
    /// When the next token frees up (unix seconds), if any is used.
    pub next_token_at: Option<u64>,
}

impl Ledger {
    /// The bucket's limit as this process may spend it: Let's Encrypt's (or the override),
    /// and of a fleet-wide limit only this region's share, if it has one.
    pub fn spec(&self, key: &BucketKey) -> BucketSpec {
        let whole = match key.limit {
            Limit::NewCertificatesPerRegisteredDomain => self
                .limits
                .overrides
                .get(&key.key)
                .copied()
                .unwrap_or_else(|| key.limit.default_spec()),
            l => l.default_spec(),
        };
        match self.limits.share {
            Some(share) if key.limit.fleet_wide() => share.of_spec(whole),
            _ => whole,
        }
    }

    /// Usable capacity: the spec's, less the safety margin (at least one, unless a share
    /// leaves this region none of the bucket).
    fn usable(&self, spec: BucketSpec) -> u32 {
        if spec.capacity == 0 {
            return 0;
        }
        spec.capacity.saturating_sub(self.limits.margin).max(1)
    }

    fn tat_of(&self, key: &BucketKey, now: u64) -> f64 {
        self.tat
            .get(&storage_key(key))
            .copied()
            .unwrap_or(now as f64)
            .max(now as f64)
    }

    /// Whether one more token fits in `key` at `now`; else when it will.
    fn check(&self, key: &BucketKey, now: u64) -> Result<(), u64> {
        let spec = self.spec(key);
        if spec.capacity == 0 {
            // A share too small for one token of this bucket: never (asked again each window).
            return Err(now.saturating_add(spec.window));
        }
        let interval = spec.interval();
        let burst = f64::from(self.usable(spec)) * interval;
        let new_tat = self.tat_of(key, now) + interval;
        if new_tat - (now as f64) <= burst + 1e-6 {
            Ok(())
        } else {
            Err((new_tat - burst).ceil() as u64)
        }
    }

    /// The buckets an order spends.
    pub fn charges(&self, req: &OrderRequest) -> Vec<BucketKey> {
        let mut out = Vec::new();
        if req.kind == OrderKind::AriRenewal {
            return out;
        }
        if req.kind == OrderKind::New {
            out.push(BucketKey {
                limit: Limit::NewOrdersPerAccount,
                key: req.account.clone(),
            });
            let mut domains: Vec<String> = req
                .names
                .iter()
                .filter_map(|n| registered_domain(n))
                .collect();
            domains.sort();
            domains.dedup();
            out.extend(domains.into_iter().map(|d| BucketKey {
                limit: Limit::NewCertificatesPerRegisteredDomain,
                key: d,
            }));
        }
        out.push(BucketKey {
            limit: Limit::NewCertificatesPerExactSet,
            key: name_set_key(&req.names),
        });
        out
    }

    /// The authorization-failure buckets of an order's identifiers: not charged by sending,
    /// but an order is only sent while each still has a token, so that one more failure
    /// cannot trip the limit.
    pub fn failure_buckets(req: &OrderRequest) -> Vec<BucketKey> {
        req.names
            .iter()
            .map(|n| BucketKey {
                limit: Limit::AuthorizationFailuresPerIdentifier,
                key: format!("{}/{}", req.account, n.to_ascii_lowercase()),
            })
            .collect()
    }

    /// Decides an order at `now`, without changing anything.
    pub fn decide(&self, req: &OrderRequest, now: u64) -> Decision {
        let charges = self.charges(req);
        let failures = Self::failure_buckets(req);
        let mut wait: Option<(u64, Limit)> = None;
        for c in charges.iter().chain(&failures) {
            if let Err(at) = self.check(c, now)
                && wait.is_none_or(|(w, _)| at > w)
            {
                wait = Some((at, c.limit));
            }
        }
        // An identifier that keeps failing validation waits out its backoff.
        for b in &failures {
            if let Some((n, last)) = self.consecutive_failures.get(&b.key) {
                let at = last + failure_backoff(*n);
                if at > now && wait.is_none_or(|(w, _)| at > w) {
                    wait = Some((at, Limit::ConsecutiveAuthorizationFailuresPerIdentifier));
                }
            }
        }
        match wait {
            Some((at, limit)) => Decision::Wait { at, limit },
            None => Decision::Allowed { charges },
        }
    }

    /// Spends one token of each bucket (call and persist this BEFORE sending the order).
    pub fn charge(&mut self, charges: &[BucketKey], now: u64) {
        for c in charges {
            let interval = self.spec(c).interval();
            let tat = self.tat_of(c, now) + interval;
            self.tat.insert(storage_key(c), tat);
        }
    }

    /// An order ended without a certificate (its validation failed, or the CA refused or
    /// invalidated it): the issuance tokens it reserved are given back, as if never charged.
    /// The order token stays spent (the CA counted the order).
    pub fn release(&mut self, req: &OrderRequest, now: u64) {
        for c in self.charges(req) {
            if c.limit == Limit::NewOrdersPerAccount {
                continue;
            }
            let interval = self.spec(&c).interval();
            let k = storage_key(&c);
            if let Some(tat) = self.tat.get(&k).copied() {
                let back = tat - interval;
                if back > now as f64 {
                    self.tat.insert(k, back);
                } else {
                    self.tat.remove(&k);
                }
            }
        }
    }

    /// Books failed authorizations of an order's identifiers at `now`: a token of each
    /// failure bucket, and one more consecutive failure each.
    pub fn authorization_failed(&mut self, req: &OrderRequest, now: u64) {
        let buckets = Self::failure_buckets(req);
        self.charge(&buckets, now);
        for b in buckets {
            let e = self.consecutive_failures.entry(b.key).or_insert((0, now));
            e.0 = e.0.saturating_add(1);
            e.1 = now;
        }
    }

    /// A certificate was issued for `req`'s names: their authorizations succeeded, which
    /// ends their runs of consecutive failures.
    pub fn authorized(&mut self, req: &OrderRequest) {
        for b in Self::failure_buckets(req) {
            self.consecutive_failures.remove(&b.key);
        }
    }

    /// Measures the buckets against `limits` from now on. A bucket whose limit changes keeps
    /// the tokens it has used (re-expressed in the new refill interval), so a raised or
    /// lowered override is taken over exactly: 5 used of 5 become 5 used of 1,000, not 50
    /// used of 50. Returns whether anything changed.
    pub fn retune(&mut self, limits: Limits, now: u64) -> bool {
        if self.limits == limits {
            return false;
        }
        let before = self.clone();
        self.limits = limits;
        for key in before.keys() {
            let (old, new) = (before.spec(&key), self.spec(&key));
            if old == new {
                continue;
            }
            let ahead = (before.tat_of(&key, now) - now as f64).max(0.0);
            let used = ahead / old.interval();
            self.tat
                .insert(storage_key(&key), now as f64 + used * new.interval());
        }
        true
    }

    /// Drops the buckets that are full again at `now` (their theoretical arrival time has
    /// passed): a missing bucket reads as full, so every decision stays the same, and the
    /// ledger stays bounded however many names it has seen.
    pub fn compact(&mut self, now: u64) {
        self.tat.retain(|_, tat| *tat > now as f64);
    }

    /// Resynchronises a bucket from the server's 429 answer: nothing before `retry_after`.
    pub fn exhausted_until(&mut self, key: &BucketKey, retry_after: u64) {
        let spec = self.spec(key);
        let burst = f64::from(self.usable(spec)) * spec.interval();
        // The first token is free exactly at `retry_after`.
        let tat = retry_after as f64 + burst - spec.interval();
        let current = self.tat.get(&storage_key(key)).copied().unwrap_or(0.0);
        self.tat.insert(storage_key(key), current.max(tat));
    }

    /// Every bucket the ledger has state for.
    pub fn keys(&self) -> Vec<BucketKey> {
        self.tat
            .keys()
            .filter_map(|k| {
                let (limit, key) = k.split_once(':')?;
                let limit = Limit::ALL.into_iter().find(|l| l.as_str() == limit)?;
                Some(BucketKey {
                    limit,
                    key: key.to_string(),
                })
            })
            .collect()
    }

    /// A bucket's used and remaining tokens at `now`.
    pub fn status(&self, key: &BucketKey, now: u64) -> BucketStatus {
        let spec = self.spec(key);
        let interval = spec.interval();
        let usable = self.usable(spec);
        let ahead = (self.tat_of(key, now) - now as f64).max(0.0);
        let used = ((ahead / interval) - 1e-9).ceil().max(0.0) as u32;
        let used = used.min(usable);
        BucketStatus {
            limit: key.limit,
            key: key.key.clone(),
            capacity: usable,
            used,
            remaining: usable - used,
            next_token_at: (used > 0)
                .then(|| (self.tat_of(key, now) - f64::from(used - 1) * interval).ceil() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_order(host: &str) -> OrderRequest {
        OrderRequest {
            account: "acct".into(),
            names: vec![host.into()],
            kind: OrderKind::New,
        }
    }

    #[test]
    fn registered_domains_follow_the_public_suffix_list() {
        assert_eq!(
            registered_domain("acme.us-east-1.aws.example.cloud").as_deref(),
            Some("example.cloud")
        );
        assert_eq!(
            registered_domain("a.b.example.co.uk").as_deref(),
            Some("example.co.uk")
        );
        // Private section: github.io is a public suffix there.
        assert_eq!(
            registered_domain("team.github.io").as_deref(),
            Some("team.github.io")
        );
    }

    #[test]
    fn fifty_new_certificates_per_week_then_wait() {
        let mut ledger = Ledger::default();
        let now = 1_000_000;
        for i in 0..50 {
            let req = new_order(&format!("env-{i}.example.cloud"));
            match ledger.decide(&req, now) {
                Decision::Allowed { charges } => ledger.charge(&charges, now),
                other => panic!("order {i} refused: {other:?}"),
            }
        }
        match ledger.decide(&new_order("env-50.example.cloud"), now) {
            Decision::Wait { at, limit } => {
                assert_eq!(limit, Limit::NewCertificatesPerRegisteredDomain);
                // One token comes back every 7 days / 50 = 12,096 s (about 202 minutes).
                assert_eq!(at, now + 12_096);
            }
            other => panic!("the 51st order was allowed: {other:?}"),
        }
        let key = BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: "example.cloud".into(),
        };
        let s = ledger.status(&key, now);
        assert_eq!((s.used, s.remaining), (50, 0));
        assert_eq!(ledger.status(&key, now + 12_096).remaining, 1);
    }

    /// Five orders whose validations fail: the name set's and the registered domain's
    /// reservations are released, the failures are booked (the identifier waits for the
    /// hourly failure limit, about 12 minutes, not for the name set's week), and once that
    /// limit allows another try the fixed name's order goes.
    #[test]
    fn failed_orders_release_their_issuance_tokens() {
        let mut ledger = Ledger::default();
        let req = new_order("a.example.cloud");
        let now = 1_000_000;
        for i in 0..5 {
            let Decision::Allowed { charges } = ledger.decide(&req, now) else {
                panic!("try {i} refused")
            };
            ledger.charge(&charges, now);
            ledger.authorization_failed(&req, now);
            ledger.release(&req, now);
        }
        let used = |l: &Ledger, limit, key: &str| {
            l.status(
                &BucketKey {
                    limit,
                    key: key.into(),
                },
                now,
            )
            .used
        };
        assert_eq!(
            used(
                &ledger,
                Limit::NewCertificatesPerExactSet,
                "a.example.cloud"
            ),
            0
        );
        assert_eq!(
            used(
                &ledger,
                Limit::NewCertificatesPerRegisteredDomain,
                "example.cloud"
            ),
            0
        );
        assert_eq!(used(&ledger, Limit::NewOrdersPerAccount, "acct"), 5);
        assert_eq!(
            used(
                &ledger,
                Limit::AuthorizationFailuresPerIdentifier,
                "acct/a.example.cloud"
            ),
            5
        );
        let Decision::Wait { at, limit } = ledger.decide(&req, now) else {
            panic!("a sixth try at once")
        };
        assert_eq!(limit, Limit::AuthorizationFailuresPerIdentifier);
        assert_eq!(at, now + 720);
        // Fixed: the next try goes once one failure token is back, and its issuance spends.
        let Decision::Allowed { charges } = ledger.decide(&req, at) else {
            panic!("no try after the failure limit refilled")
        };
        ledger.charge(&charges, at);
        ledger.authorized(&req);
        let set = BucketKey {
            limit: Limit::NewCertificatesPerExactSet,
            key: "a.example.cloud".into(),
        };
        assert_eq!(ledger.status(&set, at).used, 1);
        // A release never frees a token that was not reserved.
        let mut fresh = Ledger::default();
        fresh.release(&req, now);
        assert!(fresh.tat.is_empty());
    }

    /// Regions with static shares that sum to one never, together, go past a fleet-wide
    /// limit as Let's Encrypt measures it, each trying to order every hour for a month; a share too
    /// small for one token orders nothing; per-account limits are not shared.
    #[test]
    fn static_shares_together_stay_within_the_fleet_wide_limit() {
        let limits = |part, of| Limits {
            overrides: BTreeMap::from([("example.cloud".to_string(), BucketSpec::new(5, WEEK))]),
            share: Some(Share { part, of }),
            ..Limits::default()
        };
        const WEEK: u64 = 7 * 86_400;
        for shares in [vec![(1, 2), (1, 2)], vec![(1, 3), (2, 3)], vec![(1, 3); 3]] {
            let mut regions: Vec<Ledger> = shares
                .iter()
                .map(|&(k, n)| Ledger {
                    limits: limits(k, n),
                    ..Ledger::default()
                })
                .collect();
            let mut issued: Vec<u64> = Vec::new();
            let t0 = 1_700_000_000;
            for hour in 0..(30 * 24) {
                let now = t0 + hour * 3600;
                for (r, ledger) in regions.iter_mut().enumerate() {
                    let req = OrderRequest {
                        account: format!("acct-{r}"),
                        names: vec![format!("h{hour}-r{r}.example.cloud")],
                        kind: OrderKind::New,
                    };
                    if let Decision::Allowed { charges } = ledger.decide(&req, now) {
                        ledger.charge(&charges, now);
                        issued.push(now);
                    }
                }
            }
            // Let's Encrypt's own bucket for the domain (GCRA, the whole limit) accepts every
            // one of them, in the order they were sent.
            let mut ca = Ledger {
                limits: Limits {
                    share: None,
                    ..limits(1, 1)
                },
                ..Ledger::default()
            };
            let domain = BucketKey {
                limit: Limit::NewCertificatesPerRegisteredDomain,
                key: "example.cloud".into(),
            };
            for at in &issued {
                assert_eq!(
                    ca.check(&domain, *at),
                    Ok(()),
                    "{shares:?}: Let's Encrypt would refuse the issuance at {at}"
                );
                ca.charge(std::slice::from_ref(&domain), *at);
            }
            assert!(
                issued.len() >= 12,
                "{shares:?}: only {} issued",
                issued.len()
            );
        }
        // 1/6 of 5 is no token: that region never orders under the domain.
        let ledger = Ledger {
            limits: limits(1, 6),
            ..Ledger::default()
        };
        assert!(matches!(
            ledger.decide(&new_order("a.example.cloud"), 1_700_000_000),
            Decision::Wait {
                limit: Limit::NewCertificatesPerRegisteredDomain,
                ..
            }
        ));
        let orders = BucketKey {
            limit: Limit::NewOrdersPerAccount,
            key: "acct".into(),
        };
        assert_eq!(
            ledger.spec(&orders),
            Limit::NewOrdersPerAccount.default_spec()
        );
        assert!(Share::parse("0/2").is_err() && Share::parse("3/2").is_err());
        assert_eq!(Share::parse("2/3"), Ok(Share { part: 2, of: 3 }));
    }

    #[test]
    fn overrides_margin_and_exemptions() {
        let mut ledger = Ledger {
            limits: Limits {
                margin: 2,
                ..Limits::default()
            },
            ..Ledger::default()
        };
        ledger.limits.overrides.insert(
            "example.cloud".into(),
            BucketSpec::parse("1000/168h").expect("spec"),
        );
        let key = BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: "example.cloud".into(),
        };
        assert_eq!(ledger.status(&key, 0).capacity, 998);
        // Renewals skip the registered-domain and order buckets; ARI renewals skip all.
        let mut renewal = new_order("a.example.cloud");
        renewal.kind = OrderKind::Renewal;
        let charges = ledger.charges(&renewal);
        assert_eq!(charges.len(), 1);
        assert_eq!(charges[0].limit, Limit::NewCertificatesPerExactSet);
        renewal.kind = OrderKind::AriRenewal;
        assert!(ledger.charges(&renewal).is_empty());
    }

    #[test]
    fn five_per_exact_set_and_429_resync() {
        let mut ledger = Ledger::default();
        let mut req = new_order("x.example.cloud");
        req.kind = OrderKind::Renewal;
        for _ in 0..5 {
            let Decision::Allowed { charges } = ledger.decide(&req, 0) else {
                panic!("refused early")
            };
            ledger.charge(&charges, 0);
        }
        assert!(matches!(
            ledger.decide(&req, 0),
            Decision::Wait {
                limit: Limit::NewCertificatesPerExactSet,
                ..
            }
        ));
        // A 429 for the registered domain defers it to the server's Retry-After.
        let key = BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: "example.cloud".into(),
        };
        ledger.exhausted_until(&key, 5_000);
        assert!(matches!(
            ledger.decide(&new_order("y.example.cloud"), 100),
            Decision::Wait { at: 5_000, .. }
        ));
        assert!(matches!(
            ledger.decide(&new_order("y.example.cloud"), 5_000),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn ledger_round_trips_through_json() {
        let mut ledger = Ledger::default();
        let Decision::Allowed { charges } = ledger.decide(&new_order("a.example.cloud"), 10) else {
            panic!("refused")
        };
        ledger.charge(&charges, 10);
        let text = serde_json::to_string(&ledger).expect("encode");
        let back: Ledger = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, ledger);
    }

    #[test]
    fn compaction_keeps_the_ledger_small_and_its_decisions() {
        let now = 1_800_000_000u64;
        let mut ledger = Ledger::default();
        // 20,000 historical issuances, long past every window, and a few recent ones.
        for i in 0..20_000u64 {
            let req = new_order(&format!("env-{i}.us-east-1.example.cloud"));
            let charges = ledger.charges(&req);
            ledger.charge(&charges, now - 30 * 24 * 3600 - i);
        }
        for i in 0..40u64 {
            let req = new_order(&format!("fresh-{i}.us-east-1.example.cloud"));
            let charges = ledger.charges(&req);
            ledger.charge(&charges, now - 3600 + i);
        }
        let big = serde_json::to_string(&ledger).expect("json").len();
        let probes: Vec<OrderRequest> = (0..200u64)
            .map(|i| new_order(&format!("probe-{i}.example.cloud")))
            .chain((0..40u64).map(|i| new_order(&format!("fresh-{i}.us-east-1.example.cloud"))))
            .chain((0..50u64).map(|i| new_order(&format!("env-{i}.us-east-1.example.cloud"))))
            .collect();
        let before: Vec<Decision> = probes.iter().map(|r| ledger.decide(r, now)).collect();
        ledger.compact(now);
        let small = serde_json::to_string(&ledger).expect("json").len();
        let after: Vec<Decision> = probes.iter().map(|r| ledger.decide(r, now)).collect();
        assert!(
            big > 1024 * 1024,
            "the test starts above a ConfigMap's limit: {big} bytes"
        );
        assert!(small < 512 * 1024, "compacted: {small} bytes");
        assert_eq!(before, after, "compaction changed a decision");
        assert!(ledger.tat.len() >= 40, "recent buckets are kept");
    }

    #[test]
    fn overrides_parse() {
        assert_eq!(
            BucketSpec::parse("1000/168h"),
            Ok(BucketSpec::new(1000, 168 * 3600))
        );
        assert!(BucketSpec::parse("1000").is_err());
        assert!(BucketSpec::parse("0/1h").is_err());
        assert!(BucketSpec::parse("5/1y").is_err());
    }

    #[test]
    fn a_changed_override_keeps_the_tokens_used() {
        let domain = BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: "example.cloud".into(),
        };
        let limits = |spec: &str| Limits {
            overrides: [(
                "example.cloud".to_string(),
                BucketSpec::parse(spec).expect("spec"),
            )]
            .into(),
            margin: 0,
            share: None,
        };
        let mut ledger = Ledger::default();
        assert!(ledger.retune(limits("5/168h"), 0));
        for i in 0..5 {
            let Decision::Allowed { charges } =
                ledger.decide(&new_order(&format!("e{i}.example.cloud")), 0)
            else {
                panic!("the override allows 5");
            };
            ledger.charge(&charges, 0);
        }
        let s = ledger.status(&domain, 0);
        assert_eq!((s.capacity, s.used, s.remaining), (5, 5, 0));
        // Read with the recorded limits, a reader sees 5 of 5 (not 50 of 50 under the default).
        let stored: Ledger =
            serde_json::from_str(&serde_json::to_string(&ledger).expect("JSON")).expect("JSON");
        assert_eq!(stored.limits, ledger.limits);
        assert_eq!(stored.status(&domain, 0).used, 5);
        // Raised to 1000: the 5 used stay used, 995 remain.
        assert!(ledger.retune(limits("1000/168h"), 0));
        let s = ledger.status(&domain, 0);
        assert_eq!((s.capacity, s.used, s.remaining), (1000, 5, 995));
        // The same limits again change nothing.
        assert!(!ledger.retune(limits("1000/168h"), 0));
        // Back to the default 50: still 5 used.
        assert!(ledger.retune(Limits::default(), 0));
        let s = ledger.status(&domain, 0);
        assert_eq!((s.capacity, s.used, s.remaining), (50, 5, 45));
    }

    #[test]
    fn a_failing_identifier_backs_off_and_never_walks_into_the_pause() {
        // Validation fails every time it is tried, for 60 days; the controller asks again as
        // soon as the ledger allows (as `run` does when a wait falls due).
        let mut ledger = Ledger::default();
        let req = OrderRequest {
            account: "acct".into(),
            names: vec!["broken.example.cloud".into()],
            kind: OrderKind::New,
        };
        let key = "acct/broken.example.cloud".to_string();
        let (mut now, end) = (0u64, 60 * 86_400u64);
        let mut tries = Vec::new();
        while now < end {
            match ledger.decide(&req, now) {
                Decision::Allowed { charges } => {
                    ledger.charge(&charges, now);
                    ledger.authorization_failed(&req, now);
                    tries.push(now);
                    now += 1;
                }
                Decision::Wait { at, .. } => now = at.max(now + 1),
            }
        }
        let (failures, _) = ledger.consecutive_failures[&key];
        let pause = Limit::ConsecutiveAuthorizationFailuresPerIdentifier
            .default_spec()
            .capacity;
        // Refilled one a day, Let's Encrypt's count stays below the pause at every try.
        for (i, t) in tries.iter().enumerate() {
            let refilled = t / 86_400;
            assert!(
                (i as u64 + 1).saturating_sub(refilled) < u64::from(pause),
                "try {i} at day {refilled} would pause the identifier"
            );
        }
        assert_eq!(failures as usize, tries.len());
        // After the first day, at most one try a day.
        let late = tries.iter().filter(|t| **t >= 86_400).count();
        assert!(late <= 60, "{late} tries after day one");
        assert!(tries.len() < 80, "{} tries in 60 days", tries.len());
        // A success ends the run: the next order is not held back.
        ledger.authorized(&req);
        assert!(ledger.consecutive_failures.is_empty());
        ledger.tat.clear();
        assert!(matches!(ledger.decide(&req, now), Decision::Allowed { .. }));
    }
}
