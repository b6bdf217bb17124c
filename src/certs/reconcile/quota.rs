//! The quota ledger as people see it: `envctl quota`'s table and JSON, and the quota metrics.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::certs::ledger::{BucketKey, BucketStatus, Ledger, Limit};
use crate::certs::store::{LedgerDoc, LedgerStore, Pending, rfc3339};
use crate::certs::unix_now;
use crate::metrics::{LimitLabels, Metrics};

/// Every bucket's state, for `envctl quota` and the metrics.
pub fn quota(buckets: &Ledger, account: &str, now: u64) -> Vec<BucketStatus> {
    let mut keys: BTreeSet<BucketKey> = buckets.keys().into_iter().collect();
    if !account.is_empty() {
        keys.insert(BucketKey {
            limit: Limit::NewOrdersPerAccount,
            key: account.to_string(),
        });
    }
    for d in buckets.limits.overrides.keys() {
        keys.insert(BucketKey {
            limit: Limit::NewCertificatesPerRegisteredDomain,
            key: d.clone(),
        });
    }
    keys.into_iter().map(|k| buckets.status(&k, now)).collect()
}

pub(super) fn set_quota_metrics(m: &Metrics, buckets: &Ledger, account: &str, now: u64) {
    let mut least: BTreeMap<Limit, u32> = BTreeMap::new();
    for s in quota(buckets, account, now) {
        let e = least.entry(s.limit).or_insert(s.remaining);
        *e = (*e).min(s.remaining);
    }
    for (limit, remaining) in least {
        m.certs
            .quota_remaining
            .get_or_create(&LimitLabels { limit })
            .set(i64::from(remaining));
    }
}

#[derive(Serialize)]
struct BucketRow {
    limit: Limit,
    key: String,
    capacity: u32,
    used: u32,
    remaining: u32,
    next_token_at: Option<String>,
}

#[derive(Serialize)]
struct QuotaDoc<'a> {
    ledger: String,
    buckets: Vec<BucketRow>,
    /// Orders charged and not finished, by environment.
    pending: &'a BTreeMap<String, Pending>,
    /// Environments waiting for a certificate, with when they first asked.
    queued: BTreeMap<&'a str, String>,
    /// The limits the buckets are measured against, as recorded in the ledger.
    limits: &'a crate::certs::ledger::Limits,
    /// Identifiers whose validation keeps failing: how many times in a row, and when the
    /// next try may be.
    consecutive_failures: BTreeMap<&'a str, FailureRow>,
}

#[derive(Serialize)]
struct FailureRow {
    failures: u32,
    last: String,
    next_try: String,
}

/// `envctl quota`: every bucket of the ledger, as a table or JSON.
pub fn quota_report(doc: &LedgerDoc, store: &LedgerStore, json: bool) -> Result<String, String> {
    let now = unix_now();
    let buckets: Vec<BucketRow> = quota(&doc.buckets, "", now)
        .into_iter()
        .map(|s| BucketRow {
            limit: s.limit,
            key: s.key,
            capacity: s.capacity,
            used: s.used,
            remaining: s.remaining,
            next_token_at: s.next_token_at.map(|t| rfc3339(t as i64)),
        })
        .collect();
    let q = QuotaDoc {
        ledger: format!("{}/{}", store.namespace, store.name),
        buckets,
        pending: &doc.pending,
        queued: doc
            .queued
            .iter()
            .map(|(e, t)| (e.as_str(), rfc3339(*t as i64)))
            .collect(),
        limits: &doc.buckets.limits,
        consecutive_failures: doc
            .buckets
            .consecutive_failures
            .iter()
            .map(|(id, (n, last))| {
                let row = FailureRow {
                    failures: *n,
                    last: rfc3339(*last as i64),
                    next_try: rfc3339((last + crate::certs::ledger::failure_backoff(*n)) as i64),
                };
                (id.as_str(), row)
            })
            .collect(),
    };
    if json {
        return serde_json::to_string_pretty(&q)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string());
    }
    let mut out = format!("ledger {}\nlimits: {}\n", q.ledger, q.limits.describe());
    out.push_str(&bucket_table(&q.buckets));
    if q.buckets.is_empty() {
        out.push_str("(no bucket has been charged yet)\n");
    }
    if !q.pending.is_empty() {
        out.push_str(&format!("{} order(s) in flight\n", q.pending.len()));
    }
    for (id, f) in &q.consecutive_failures {
        out.push_str(&format!(
            "{id}: {} failed authorization(s) in a row, the last at {}; next try not before {}\n",
            f.failures, f.last, f.next_try
        ));
    }
    if !q.queued.is_empty() {
        out.push_str(&format!(
            "{} environment(s) waiting for a certificate\n",
            q.queued.len()
        ));
    }
    Ok(out)
}

/// The buckets as an aligned table, one line each, with a header.
fn bucket_table(buckets: &[BucketRow]) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 6]> = buckets
        .iter()
        .map(|b| {
            [
                b.limit.to_string(),
                b.key.clone(),
                b.used.to_string(),
                b.remaining.to_string(),
                b.capacity.to_string(),
                b.next_token_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "LIMIT",
        "KEY",
        "USED",
        "REMAINING",
        "CAPACITY",
        "NEXT FREE TOKEN",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
