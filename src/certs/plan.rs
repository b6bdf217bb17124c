//! Certificate capacity planning (`envctl quota plan`): simulates the next days of a fleet's
//! certificates against the quota ledger, with the very functions the controller decides
//! with (`certs::schedule`, `Ledger::decide` and `charge`, `CertInfo::renew_at`), so a plan
//! and the controller cannot disagree. Pure: the ledger, the fleet and the clock come in;
//! nothing is read or written. It finds when each environment gets its first certificate,
//! when each renewal falls due and is placed, who goes without a valid certificate and when,
//! and the smallest registered-domain limit that would let the fleet fit.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::ledger::{BucketSpec, Ledger, Limit, OrderKind, registered_domain};
use super::{CertInfo, Request, Slot, schedule, sorted_names};

/// A week: the window of the registered-domain limit an override is suggested for.
const WEEK: u64 = 7 * 86_400;

/// One environment as the plan starts it.
#[derive(Debug, Clone)]
pub struct Member {
    pub environment: String,
    pub names: Vec<String>,
    /// The profile its orders ask for (`None`: the CA's default).
    pub profile: Option<String>,
    /// Lifetime of the certificates its profile gives, seconds.
    pub lifetime: u64,
    /// Its certificate now, if it has one for these names.
    pub current: Option<CertInfo>,
    /// When it first asked for a certificate it has not got yet (unix seconds).
    pub waiting_since: Option<u64>,
}

/// What the plan assumes of the CA.
#[derive(Debug, Clone, Copy)]
pub struct Assumptions {
    /// Renewals are ARI-coordinated (Let's Encrypt offers ARI): exempt from every limit.
    pub ari: bool,
}

/// One environment's future.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnvPlan {
    pub environment: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// When its first certificate is placed (unix seconds), if it has none now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_certificate: Option<u64>,
    /// When each renewal is placed.
    pub renewals: Vec<u64>,
    /// Spans (from, until) without a valid certificate; `until` is the horizon when none
    /// comes in time.
    pub without_certificate: Vec<(u64, u64)>,
}

/// The smallest limit that lets the fleet fit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suggestion {
    pub registered_domain: String,
    pub limit: Limit,
    /// Certificates per week to ask Let's Encrypt for.
    pub capacity: u32,
    pub window_seconds: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    pub from: u64,
    pub until: u64,
    pub ari: bool,
    /// Every environment has a valid certificate for the whole horizon.
    pub fits: bool,
    pub new_orders: usize,
    pub renewals: usize,
    pub environments: Vec<EnvPlan>,
    /// Per registered domain that falls short: the smallest weekly limit that fits.
    pub suggestions: Vec<Suggestion>,
    /// Registered domains that fall short for a reason no override fixes.
    pub unfixable: Vec<String>,
}

/// Simulates `days` from `now`.
pub fn plan(
    members: &[Member],
    ledger: &Ledger,
    account: &str,
    now: u64,
    days: u64,
    assume: Assumptions,
) -> Plan {
    let until = now + days * 86_400;
    let envs = simulate(members, ledger, account, now, until, assume);
    let short: BTreeSet<String> = envs
        .iter()
        .zip(members)
        .filter(|(e, _)| !e.without_certificate.is_empty())
        .filter_map(|(_, m)| domain_of(m))
        .collect();
    let mut suggestions = Vec::new();
    let mut unfixable = Vec::new();
    for domain in short {
        match smallest_fitting(members, ledger, account, now, until, assume, &domain) {
            Some(capacity) => suggestions.push(Suggestion {
                registered_domain: domain,
                limit: Limit::NewCertificatesPerRegisteredDomain,
                capacity,
                window_seconds: WEEK,
            }),
            None => unfixable.push(domain),
        }
    }
    Plan {
        from: now,
        until,
        ari: assume.ari,
        fits: envs.iter().all(|e| e.without_certificate.is_empty()),
        new_orders: envs
            .iter()
            .filter(|e| e.first_certificate.is_some())
            .count(),
        renewals: envs.iter().map(|e| e.renewals.len()).sum(),
        environments: envs,
        suggestions,
        unfixable,
    }
}

fn domain_of(m: &Member) -> Option<String> {
    m.names.first().and_then(|n| registered_domain(n))
}

/// The smallest weekly capacity of `domain`'s registered-domain limit with which none of its
/// environments goes without a certificate; `None` when even a limit as large as the
/// domain's orders does not help (another limit holds them back).
fn smallest_fitting(
    members: &[Member],
    ledger: &Ledger,
    account: &str,
    now: u64,
    until: u64,
    assume: Assumptions,
    domain: &str,
) -> Option<u32> {
    let fits = |capacity: u32| {
        let mut l = ledger.clone();
        let mut limits = l.limits.clone();
        limits
            .overrides
            .insert(domain.to_string(), BucketSpec::new(capacity, WEEK));
        l.retune(limits, now);
        simulate(members, &l, account, now, until, assume)
            .iter()
            .zip(members)
            .filter(|(_, m)| domain_of(m).as_deref() == Some(domain))
            .all(|(e, _)| e.without_certificate.is_empty())
    };
    // Every new certificate of the horizon at once, plus what the ledger has used: enough
    // if any limit is.
    let orders = members
        .iter()
        .filter(|m| domain_of(m).as_deref() == Some(domain))
        .count() as u32;
    let mut high = orders
        .saturating_mul(u32::try_from((until - now) / WEEK + 1).unwrap_or(u32::MAX))
        .saturating_add(ledger.limits.margin)
        .max(1);
    if !fits(high) {
        return None;
    }
    let mut low = 0u32;
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(high)
}

/// A certificate the plan issues at `t`.
fn issued(names: &[String], t: u64, lifetime: u64) -> CertInfo {
    CertInfo {
        names: sorted_names(names),
        serial: String::new(),
        not_before: t as i64,
        not_after: (t + lifetime) as i64,
        ari_id: None,
    }
}

fn simulate(
    members: &[Member],
    ledger: &Ledger,
    account: &str,
    now: u64,
    until: u64,
    assume: Assumptions,
) -> Vec<EnvPlan> {
    let mut ledger = ledger.clone();
    let mut certs: Vec<Option<CertInfo>> = members.iter().map(|m| m.current.clone()).collect();
    // When each environment began to want a certificate it has not got.
    let mut wanting: Vec<Option<u64>> = members
        .iter()
        .map(|m| match &m.current {
            Some(_) => None,
            None => Some(m.waiting_since.unwrap_or(now).min(now)),
        })
        .collect();
    let mut out: Vec<EnvPlan> = members
        .iter()
        .map(|m| EnvPlan {
            environment: m.environment.clone(),
            profile: m.profile.clone(),
            first_certificate: None,
            renewals: Vec::new(),
            without_certificate: Vec::new(),
        })
        .collect();
    let index: BTreeMap<&str, usize> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.environment.as_str(), i))
        .collect();
    let mut t = now;
    // Bounded: every step moves time forward or issues a certificate.
    for _ in 0..1_000_000 {
        let mut requests = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let kind = match &certs[i] {
                None => OrderKind::New,
                Some(c) if t as i64 >= c.renew_at() || t as i64 >= c.not_after => {
                    if assume.ari {
                        OrderKind::AriRenewal
                    } else {
                        OrderKind::Renewal
                    }
                }
                Some(_) => continue,
            };
            if let Some(c) = &certs[i]
                && t as i64 >= c.not_after
                && wanting[i].is_none()
            {
                wanting[i] = Some(c.not_after as u64);
            }
            requests.push(Request {
                environment: m.environment.clone(),
                names: m.names.clone(),
                kind,
                expires: certs[i].as_ref().map(|c| c.not_after),
                since: wanting[i].unwrap_or(t),
            });
        }
        let mut next = until;
        for (r, slot) in schedule(requests, &ledger, account, t) {
            let i = index[r.environment.as_str()];
            match slot {
                Slot::Now(charges) => {
                    ledger.charge(&charges, t);
                    if let Some(from) = wanting[i].take()
                        && t > from
                    {
                        out[i].without_certificate.push((from, t));
                    }
                    if r.kind == OrderKind::New {
                        out[i].first_certificate = Some(t);
                    } else {
                        out[i].renewals.push(t);
                    }
                    certs[i] = Some(issued(&members[i].names, t, members[i].lifetime));
                }
                Slot::Later { at, .. } => next = next.min(at.max(t + 1)),
            }
        }
        for c in certs.iter().flatten() {
            for at in [c.renew_at(), c.not_after] {
                if at > t as i64 {
                    next = next.min(at as u64);
                }
            }
        }
        if next >= until {
            break;
        }
        t = next;
    }
    // Whoever still waits at the horizon goes without until then; so does a certificate
    // that expires before it and is not renewed.
    for (i, e) in out.iter_mut().enumerate() {
        let from = wanting[i].or_else(|| {
            certs[i]
                .as_ref()
                .filter(|c| (c.not_after as u64) < until)
                .map(|c| c.not_after as u64)
        });
        if let Some(from) = from {
            e.without_certificate.push((from, until));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn fleet(n: usize, lifetime: u64) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                environment: format!("env-{i:03}"),
                names: vec![format!("env-{i:03}.us-east-1.example.cloud")],
                profile: None,
                lifetime,
                current: None,
                waiting_since: None,
            })
            .collect()
    }

    fn plan_90_days(members: &[Member]) -> Plan {
        plan(
            members,
            &Ledger::default(),
            "acct",
            0,
            90,
            Assumptions { ari: true },
        )
    }

    #[test]
    fn a_fleet_within_the_limit_fits_and_renews_on_time() {
        let members = fleet(40, 90 * DAY);
        let p = plan_90_days(&members);
        assert!(p.fits, "{p:?}");
        assert_eq!(p.new_orders, 40);
        // Renewed with a third of 90 days left: day 60, once within 90 days.
        assert!(p.environments.iter().all(|e| e.renewals == vec![60 * DAY]));
        assert!(p.suggestions.is_empty());
    }

    #[test]
    fn two_hundred_on_one_domain_wait_weeks_and_the_override_to_ask_for_is_named() {
        let members = fleet(200, 90 * DAY);
        let p = plan_90_days(&members);
        assert!(!p.fits);
        // 50 at once, then one every 202 minutes (7 days / 50).
        let waiting: Vec<&EnvPlan> = p
            .environments
            .iter()
            .filter(|e| !e.without_certificate.is_empty())
            .collect();
        assert_eq!(waiting.len(), 150);
        let last = waiting
            .iter()
            .filter_map(|e| e.first_certificate)
            .max()
            .expect("all get one within 90 days");
        assert_eq!(last, (150.0 * WEEK as f64 / 50.0).ceil() as u64);
        assert_eq!(
            p.suggestions,
            vec![Suggestion {
                registered_domain: "example.cloud".into(),
                limit: Limit::NewCertificatesPerRegisteredDomain,
                capacity: 200,
                window_seconds: WEEK,
            }]
        );
        // With that override, the same fleet fits.
        let mut ledger = Ledger::default();
        let mut limits = ledger.limits.clone();
        limits
            .overrides
            .insert("example.cloud".into(), BucketSpec::new(200, WEEK));
        ledger.retune(limits, 0);
        assert!(plan(&members, &ledger, "acct", 0, 90, Assumptions { ari: true }).fits);
    }

    #[test]
    fn short_lived_certificates_renew_by_their_own_lifetime() {
        let lifetime = 160 * 3600;
        let members = fleet(10, lifetime);
        let p = plan(
            &members,
            &Ledger::default(),
            "acct",
            0,
            30,
            Assumptions { ari: false },
        );
        assert!(p.fits, "{p:?}");
        let every = lifetime - lifetime / 3;
        let e = &p.environments[0];
        assert_eq!(e.renewals.first().copied(), Some(every));
        // Same-set renewals (no ARI) spend the exact set's 5 a week: one every ~4.4 days fits.
        assert_eq!(e.renewals.len() as u64, 30 * DAY / every);
    }

    #[test]
    fn the_plan_waits_exactly_as_the_controller_schedules() {
        let mut ledger = Ledger::default();
        let mut limits = ledger.limits.clone();
        limits
            .overrides
            .insert("example.cloud".into(), BucketSpec::new(3, WEEK));
        ledger.retune(limits, 0);
        let members = fleet(5, 90 * DAY);
        let p = plan(&members, &ledger, "acct", 0, 90, Assumptions { ari: true });
        let requests: Vec<Request> = members
            .iter()
            .map(|m| Request {
                environment: m.environment.clone(),
                names: m.names.clone(),
                kind: OrderKind::New,
                expires: None,
                since: 0,
            })
            .collect();
        for (r, slot) in schedule(requests, &ledger, "acct", 0) {
            let e = p
                .environments
                .iter()
                .find(|e| e.environment == r.environment)
                .expect("planned");
            let at = match slot {
                Slot::Now(_) => 0,
                Slot::Later { at, .. } => at,
            };
            assert_eq!(e.first_certificate, Some(at), "{}", r.environment);
        }
    }
}
