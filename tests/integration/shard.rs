//! `envctl run --shard`: replicas share the fleet over member Leases. Three real controller
//! processes against the real API server: shares that add up to the fleet, a kill -9 whose
//! environments the others take over, the API server's audit log as the record of which
//! replica wrote what and when, and the certificate quota held across replicas.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{cleanup_instance, require, unique};
use crate::faults::{converged as at_scale, write_fleet};
use crate::support::{Controller, wait_until};

/// The member Lease lasts this long in these tests (renewed every 2 s).
const LEASE: &str = "6s";

/// One `envctl run --shard` member: its identity and the running controller (killed when
/// dropped).
struct Replica {
    identity: String,
    run: Controller,
}

impl Replica {
    fn start(
        kubeconfig: &Path,
        identity: &str,
        args: &[String],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Replica {
        let mut all = args.to_vec();
        all.extend(["--shard", "--leader-elect-identity", identity].map(String::from));
        all.extend(["--leader-elect-lease", LEASE, "--interval", "1s"].map(String::from));
        let mut command =
            Controller::run(kubeconfig, all).log(&dir.join(format!("{identity}.log")));
        for (k, v) in env {
            command = command.env(k, v);
        }
        Replica {
            identity: identity.to_string(),
            run: command.start(),
        }
    }

    /// A gauge's value from /metrics, if served.
    fn gauge(&self, name: &str) -> Option<i64> {
        self.run.gauge(name)
    }
}

fn logs(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .map(|r| {
            let text = r.run.log();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            format!(
                "--- {} ---\n{}",
                r.identity,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One write recorded by the API server's audit log.
#[derive(Debug)]
struct Write {
    at: f64,
    replica: String,
    verb: String,
    object: String,
}

/// Every write into the environments `<prefix>-*` by one of the replicas, by environment,
/// from the audit log of the control plane (`scripts/control-plane` keeps one of every
/// write). Events are left out: they are reports about an environment, not its objects.
fn audited_writes(kubeconfig: &Path, prefix: &str) -> BTreeMap<String, Vec<Write>> {
    let ns_prefix = format!("environment-{prefix}-");
    let mut by_env: BTreeMap<String, Vec<Write>> = BTreeMap::new();
    for w in crate::cluster::audited_writes(kubeconfig) {
        if !w.replica.starts_with(prefix) || w.resource == "events" {
            continue;
        }
        let namespace = if w.resource == "namespaces" {
            &w.name
        } else {
            &w.namespace
        };
        if !namespace.starts_with(&ns_prefix) {
            continue;
        }
        let Some(env) = namespace.strip_prefix("environment-") else {
            continue;
        };
        by_env.entry(env.to_string()).or_default().push(Write {
            at: w.at,
            replica: w.replica.clone(),
            verb: w.verb.clone(),
            object: format!("{}/{}", w.resource, w.name),
        });
    }
    for writes in by_env.values_mut() {
        writes.sort_by(|a, b| a.at.total_cmp(&b.at));
    }
    by_env
}

/// No environment was written by two replicas at once: whenever the writer of an
/// environment changes, the new writer's first write comes at least `gap` after the old
/// writer's last one (a handover waits for the old owner to stop; two replicas that both
/// believed they owned it would interleave within a pass).
fn assert_one_writer_at_a_time(by_env: &BTreeMap<String, Vec<Write>>, gap: f64) -> usize {
    let mut handovers = 0;
    for (env, writes) in by_env {
        for pair in writes.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.replica != b.replica {
                handovers += 1;
                assert!(
                    b.at - a.at >= gap,
                    "environment {env} was written by {} ({} {}) and {} ({} {}) {:.3} s apart: two replicas at once\nall writes: {writes:#?}",
                    a.replica,
                    a.verb,
                    a.object,
                    b.replica,
                    b.verb,
                    b.object,
                    b.at - a.at
                );
            }
        }
    }
    handovers
}

/// 3 replicas and 40 environments: each owns a share and the shares add up to the fleet;
/// `envctl status` names each owner; kill -9 of one replica, then a change to every
/// environment is applied within 60 s; the audit log shows no environment written by two
/// replicas at once.
#[tokio::test(flavor = "multi_thread")]
async fn shards_share_the_fleet_and_take_over_after_kill_9() {
    let Some(cluster) = require() else {
        return;
    };
    let client = cluster.client().await;
    let instance = unique("shard");
    let ctl_ns = format!("{instance}-ctl");
    crate::certs::controller_namespace(&client, &ctl_ns).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 40, 1);
    let args: Vec<String> = [
        "--source",
        src.to_str().expect("utf-8"),
        "--instance",
        &instance,
        "--controller-namespace",
        &ctl_ns,
        "--leader-elect-namespace",
        &ctl_ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| {
            Replica::start(
                &cluster.kubeconfig,
                &format!("{instance}-r{i}"),
                &args,
                dir.path(),
                &[],
            )
        })
        .collect();

    // Every environment applied, and each replica's share stable: three members seen, the
    // owned counts adding up to the fleet.
    let took = wait_until(
        "40 environments applied by 3 replicas",
        Duration::from_secs(120),
        &|| logs(&replicas),
        || async { at_scale(&client, &instance, &names, 1).await == names.len() },
    )
    .await;
    eprintln!("3 replicas applied 40 environments in {took:?}");
    let mut shares = Vec::new();
    wait_until(
        "each replica to report its share",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || {
            shares = replicas
                .iter()
                .map(|r| {
                    (
                        r.gauge("envctl_shard_environments").unwrap_or(-1),
                        r.gauge("envctl_shard_members").unwrap_or(-1),
                    )
                })
                .collect();
            let ok = shares
                .iter()
                .all(|(owned, members)| *owned > 0 && *members == 3)
                && shares.iter().map(|(o, _)| o).sum::<i64>() == names.len() as i64;
            async move { ok }
        },
    )
    .await;
    eprintln!("shares (owned, members seen): {shares:?}");

    // `envctl status` names the owner of each environment, as the replicas count them.
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["status", "-o", "json", "--instance", &instance])
        .args(["--controller-namespace", &ctl_ns, "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .output()
        .expect("envctl status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut owners: BTreeMap<String, i64> = BTreeMap::new();
    for row in status["environments"].as_array().expect("rows") {
        let owner = row["owner"].as_str().expect("an owner on every row");
        *owners.entry(owner.to_string()).or_default() += 1;
    }
    let counted: BTreeMap<String, i64> = replicas
        .iter()
        .zip(&shares)
        .map(|(r, (owned, _))| (r.identity.clone(), *owned))
        .collect();
    assert_eq!(
        owners, counted,
        "status's owners differ from the replicas' shares"
    );
    let text = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["status", "--instance", &instance])
        .args(["--controller-namespace", &ctl_ns, "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .output()
        .expect("envctl status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().next().is_some_and(|h| h.contains("OWNER")),
        "{text}"
    );

    // kill -9 of the second replica; then every environment changes.
    let victim = replicas.remove(1);
    let victim_id = victim.identity.clone();
    drop(victim); // SIGKILL
    let killed_at = Instant::now();
    write_fleet(&src, &instance, 40, 2);
    let took = wait_until(
        "every environment changed after the kill",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || async { at_scale(&client, &instance, &names, 2).await == names.len() },
    )
    .await;
    eprintln!(
        "after kill -9 of {victim_id}: all 40 changes applied {:?} after the kill",
        killed_at.elapsed()
    );
    assert!(took <= Duration::from_secs(60));
    wait_until(
        "the survivors to own the whole fleet",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || {
            let total: i64 = replicas
                .iter()
                .map(|r| r.gauge("envctl_shard_environments").unwrap_or(0))
                .sum();
            async move { total == 40 }
        },
    )
    .await;
    drop(replicas);

    // The audit log: who wrote what, when. The lease is 6 s and members renew every 2 s, so
    // a handover leaves at least 4 s between the old owner's last write and the new owner's
    // first; 1 s is a margin that two replicas writing at once would not keep.
    let by_env = audited_writes(&cluster.kubeconfig, &instance);
    assert_eq!(by_env.len(), names.len(), "every environment was written");
    let handovers = assert_one_writer_at_a_time(&by_env, 1.0);
    let writes: usize = by_env.values().map(Vec::len).sum();
    let victims: Vec<&String> = by_env
        .iter()
        .filter(|(_, w)| w.iter().any(|w| w.replica == victim_id))
        .map(|(e, _)| e)
        .collect();
    assert!(!victims.is_empty(), "the killed replica wrote nothing");
    for env in &victims {
        let last = by_env[*env].last().expect("a write");
        assert_ne!(last.replica, victim_id, "{env} was not taken over");
    }
    eprintln!(
        "audit log: {writes} writes to 40 environments, {handovers} handovers, {} environments taken over from the killed replica",
        victims.len()
    );
    cleanup_instance(&client, &instance).await;
}

/// 3 replicas, 60 TLS environments under one registered domain and Let's Encrypt's limit of
/// 50 new certificates per registered domain: at most 50 orders reach pebble, and the
/// ledger they share records exactly 50.
#[tokio::test(flavor = "multi_thread")]
async fn shards_stay_within_the_certificate_quota() {
    let Some(crate::certs::Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = crate::certs::setup(true).await
    else {
        return;
    };
    let case = crate::certs::Case::new(&client, dir.path(), "shardq", 60).await;
    let mut args = vec!["--source".to_string(), case.src.display().to_string()];
    args.extend(case.common.iter().cloned());
    args.extend(["--leader-elect-namespace".to_string(), case.ctl_ns.clone()]);
    args.extend(pebble.flags());
    let before = pebble.orders();
    let replicas: Vec<Replica> = (1..=3)
        .map(|i| {
            Replica::start(
                &cluster.kubeconfig,
                &format!("{}-r{i}", case.instance),
                &args,
                dir.path(),
                &[("ENVCTL_SKIP_CERTIFICATES", "0")],
            )
        })
        .collect();
    let start = Instant::now();
    let settled = loop {
        let q = crate::certs::quota(cluster, &case.common);
        let used =
            crate::certs::bucket_if_any(&q, "new-certificates-per-registered-domain", &case.domain)
                .map_or(0, |(used, _)| used);
        let queued = q["queued"].as_object().map_or(0, |o| o.len());
        let pending = q["pending"].as_object().map_or(0, |o| o.len());
        if used == 50 && pending == 0 && queued == 10 {
            break true;
        }
        if start.elapsed() > Duration::from_secs(180) {
            eprintln!("quota at the timeout: {q}");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let sent = pebble.orders() - before;
    let log = logs(&replicas);
    drop(replicas);
    assert!(
        settled,
        "the shared ledger did not settle at 50 issued, 10 queued\n{log}"
    );
    assert!(
        sent <= 50,
        "{sent} orders reached pebble from 3 replicas\n{log}"
    );
    eprintln!("3 replicas, 60 TLS environments, limit 50: {sent} orders reached pebble");
    case.cleanup(&client).await;
}

/// Prune guards per writer: three shards, 40 environments, a revision that removes 30 (75%)
/// under `--max-prune 25%`. Each shard measures the limit against its own share, so each
/// holds its deletions (with the limit measured against the whole fleet, each shard's ten or
/// so stayed under it and most of the fleet went).
#[tokio::test(flavor = "multi_thread")]
async fn three_shards_hold_a_mass_removal_under_max_prune() {
    let Some(cluster) = require() else {
        return;
    };
    let client = cluster.client().await;
    let instance = unique("sprune");
    let ctl_ns = format!("{instance}-ctl");
    crate::certs::controller_namespace(&client, &ctl_ns).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 40, 1);
    let args: Vec<String> = [
        "--source",
        src.to_str().expect("utf-8"),
        "--instance",
        &instance,
        "--controller-namespace",
        &ctl_ns,
        "--leader-elect-namespace",
        &ctl_ns,
        "--prune",
        "--max-prune",
        "25%",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let replicas: Vec<Replica> = (1..=3)
        .map(|i| {
            Replica::start(
                &cluster.kubeconfig,
                &format!("{instance}-r{i}"),
                &args,
                dir.path(),
                &[],
            )
        })
        .collect();
    wait_until(
        "40 environments applied by 3 replicas",
        Duration::from_secs(120),
        &|| logs(&replicas),
        || async { at_scale(&client, &instance, &names, 1).await == names.len() },
    )
    .await;
    wait_until(
        "each replica to own a share of three members",
        Duration::from_secs(30),
        &|| logs(&replicas),
        || {
            let ok = replicas.iter().all(|r| {
                r.gauge("envctl_shard_members") == Some(3)
                    && r.gauge("envctl_shard_environments").unwrap_or(0) > 0
            });
            async move { ok }
        },
    )
    .await;
    let logged: Vec<usize> = replicas.iter().map(|r| r.run.log().len()).collect();
    for name in names.iter().skip(10) {
        std::fs::remove_file(src.join(format!("{name}.yaml"))).expect("removing a manifest");
    }
    // Every replica's pass after the removal held its share's deletions.
    wait_until(
        "every replica to hold its deletions",
        Duration::from_secs(60),
        &|| logs(&replicas),
        || {
            let ok = replicas.iter().zip(&logged).all(|(r, from)| {
                let text = r.run.log();
                text.get(*from..).is_some_and(|t| {
                    t.lines()
                        .any(|l| l.contains("held") && l.contains("--max-prune allows"))
                })
            });
            async move { ok }
        },
    )
    .await;
    let nsapi: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let mut gone = Vec::new();
    for name in &names {
        match nsapi.get_opt(&format!("environment-{name}")).await {
            Ok(Some(ns)) if ns.metadata.deletion_timestamp.is_none() => {}
            _ => gone.push(name.clone()),
        }
    }
    assert!(
        gone.is_empty(),
        "a 75% removal under --max-prune 25% deleted {} environments: {gone:?}\n{}",
        gone.len(),
        logs(&replicas)
    );
    drop(replicas);
    cleanup_instance(&client, &instance).await;
    let _ = nsapi
        .delete(&ctl_ns, &kube::api::DeleteParams::default())
        .await;
}
