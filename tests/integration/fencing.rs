//! Leases fence writes. A leader paused mid-pass past its lease (SIGSTOP, then SIGCONT), as a
//! stopped process or a starved node is, writes nothing once it resumes while the standby
//! that took over writes; a shard member paused the same way writes nothing of the share the
//! other took over; a second process started with a leader's identity stops without writing.
//! The API server's audit log is the record of who wrote what, and when.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams};

use crate::cluster::{audited_writes, cleanup_instance, require, unique, unix_now};
use crate::gitops::Controller;
use crate::support::wait_until;

/// The lease these tests use: short, so that a pause past it is short too.
const LEASE: &str = "6s";
const LEASE_SECS: f64 = 6.0;

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

async fn namespaces_of(client: &kube::Client, instance: &str) -> usize {
    let api: Api<Namespace> = Api::all(client.clone());
    api.list(
        &ListParams::default().labels(&format!("{}={instance}", envctl::render::INSTANCE_LABEL)),
    )
    .await
    .map_or(0, |l| l.items.len())
}

fn replica_args<'a>(mode: &'a [&'a str], ctl_ns: &'a str, identity: &'a str) -> Vec<&'a str> {
    let mut args = mode.to_vec();
    args.extend([
        "--leader-elect-namespace",
        ctl_ns,
        "--leader-elect-lease",
        LEASE,
        "--leader-elect-identity",
        identity,
    ]);
    args
}

/// One test's world: an instance with its controller namespace and a fleet of `n`
/// environments in a directory, and the replicas it starts.
struct World {
    client: kube::Client,
    instance: String,
    ctl_ns: String,
    src: String,
    dir: tempfile::TempDir,
}

impl World {
    async fn new(cluster: &crate::cluster::TestCluster, prefix: &str, n: usize) -> World {
        let client = cluster.client().await;
        let instance = unique(prefix);
        let ctl_ns = format!("{instance}-ctl");
        crate::certs::controller_namespace(&client, &ctl_ns).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let src = dir.path().join("envs");
        crate::faults::write_fleet(&src, &instance, n, 0);
        World {
            client,
            src: src.display().to_string(),
            instance,
            ctl_ns,
            dir,
        }
    }

    /// `envctl run` in `mode` (`--leader-elect` or `--shard`) as `identity`, on `cluster`
    /// (which may reach the API server another way than the test does).
    fn spawn(
        &self,
        cluster: &crate::cluster::TestCluster,
        mode: &str,
        identity: &str,
    ) -> Controller {
        crate::gitops::run_on(
            cluster,
            &["--source", self.src.as_str()],
            &self.instance,
            "1s",
            &replica_args(&[mode], &self.ctl_ns, identity),
        )
    }

    fn id(&self, replica: &str) -> String {
        format!("{}-{replica}", self.instance)
    }

    async fn cleanup(&self) {
        cleanup_instance(&self.client, &self.instance).await;
        let nsapi: Api<Namespace> = Api::all(self.client.clone());
        let _ = nsapi.delete(&self.ctl_ns, &DeleteParams::default()).await;
    }
}

/// Pauses `a` once its first pass has written some of `n` environments, waits until `b`
/// writes in its place, resumes `a`, and waits until `a` has seen that its lease is gone.
/// Returns (when `a` was stopped, when it was resumed), as unix seconds.
async fn pause_past_the_lease(
    client: &kube::Client,
    instance: &str,
    a: &Controller,
    b: &Controller,
    b_took_over: &str,
    a_noticed: &[&str],
) -> (f64, f64) {
    wait_until(
        "the first replica's pass to write some environments",
        Duration::from_secs(120),
        &|| a.log(),
        || async { namespaces_of(client, instance).await >= 10 },
    )
    .await;
    let stopped = unix_now();
    signal(a.pid(), "STOP");
    // What the other replica logs from now on.
    let from = b.log().len();
    let since = || b.log().get(from..).unwrap_or_default().to_string();
    wait_until(
        "the other replica to take over",
        Duration::from_secs(60),
        &|| b.log(),
        || async { since().contains(b_took_over) },
    )
    .await;
    let took_over = since().find(b_took_over).unwrap_or(0);
    wait_until(
        "the other replica to finish a pass after taking over",
        Duration::from_secs(120),
        &|| b.log(),
        || async {
            since()
                .get(took_over..)
                .unwrap_or_default()
                .contains("reconciled")
        },
    )
    .await;
    let resumed = unix_now();
    assert!(
        resumed - stopped > LEASE_SECS,
        "paused past the lease: {:.1} s",
        resumed - stopped
    );
    signal(a.pid(), "CONT");
    wait_until(
        "the resumed replica to notice its lease is gone",
        Duration::from_secs(30),
        &|| a.log(),
        || async {
            let log = a.log();
            a_noticed.iter().any(|n| log.contains(n))
        },
    )
    .await;
    (stopped, resumed)
}

/// The old writer's writes (Leases aside) the API server received after `after`.
fn writes_after(kubeconfig: &Path, replica: &str, after: f64) -> Vec<String> {
    audited_writes(kubeconfig)
        .into_iter()
        .filter(|w| w.replica == replica && w.resource != "leases" && w.received > after)
        .map(|w| {
            format!(
                "{:.3} {} {} {}/{}",
                w.received, w.verb, w.resource, w.namespace, w.name
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_paused_past_its_lease_writes_nothing_once_it_resumes() {
    let Some(cluster) = require() else { return };
    let w = World::new(cluster, "fence", 300).await;
    let (client, instance) = (&w.client, &w.instance);
    let (id_a, id_b) = (w.id("a"), w.id("b"));
    let a = w.spawn(cluster, "--leader-elect", &id_a);
    wait_until(
        "the first replica to lead",
        Duration::from_secs(30),
        &|| a.log(),
        || async { a.log().contains("became the leader") },
    )
    .await;
    let b = w.spawn(cluster, "--leader-elect", &id_b);
    let (stopped, resumed) = pause_past_the_lease(
        client,
        instance,
        &a,
        &b,
        "became the leader",
        &["stepping down", "lost the lease"],
    )
    .await;
    let all = audited_writes(&cluster.kubeconfig);
    let before = all
        .iter()
        .filter(|w| w.replica == id_a && w.received <= stopped)
        .count();
    let taken_over = all
        .iter()
        .filter(|w| w.replica == id_b && w.resource != "leases" && w.received > stopped)
        .count();
    assert!(before > 0, "the first leader wrote before its pause");
    assert!(taken_over > 0, "the standby wrote after taking over");
    // Nothing after its fence closed (two thirds of the lease after its last renewal, which
    // was before the pause), and so nothing at all after it resumed.
    let late = writes_after(&cluster.kubeconfig, &id_a, stopped + LEASE_SECS * 2.0 / 3.0);
    assert!(
        late.is_empty(),
        "the paused leader wrote after its lease (resumed at {resumed:.3}):\n{}",
        late.join("\n")
    );
    eprintln!(
        "measure: leader paused {:.1} s mid-pass: {before} writes before, {taken_over} by the standby after, 0 by the old leader after its lease",
        resumed - stopped
    );
    drop((a, b));
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_paused_past_its_lease_writes_nothing_once_it_resumes() {
    let Some(cluster) = require() else { return };
    let w = World::new(cluster, "fshard", 300).await;
    let (client, instance) = (&w.client, &w.instance);
    let (id_a, id_b) = (w.id("a"), w.id("b"));
    let b = w.spawn(cluster, "--shard", &id_b);
    let a = w.spawn(cluster, "--shard", &id_a);
    // Both members seen by both, so that each writes its share.
    for r in [&a, &b] {
        wait_until(
            "both members in each view",
            Duration::from_secs(60),
            &|| r.log(),
            || async {
                r.log().lines().any(|l| {
                    l.contains("shard members changed") && l.contains(&id_a) && l.contains(&id_b)
                })
            },
        )
        .await;
    }
    // B takes A's share once A's Lease lapses: its member set becomes B alone.
    let (stopped, resumed) = pause_past_the_lease(
        client,
        instance,
        &a,
        &b,
        &format!("members={{\"{id_b}\"}}"),
        &[
            "its view of the members is dropped",
            "view of the shard members is stale",
        ],
    )
    .await;
    // A writes nothing once its fence closed: not while paused, and not on resuming, until
    // it has renewed its Lease and the member set has held for a lease (its join wait).
    let late: Vec<String> =
        writes_after(&cluster.kubeconfig, &id_a, stopped + LEASE_SECS * 2.0 / 3.0)
            .into_iter()
            .filter(|w| {
                let at: f64 = w
                    .split(' ')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0.0);
                at < resumed + LEASE_SECS
            })
            .collect();
    assert!(
        late.is_empty(),
        "the paused member wrote after its lease (resumed at {resumed:.3}):\n{}",
        late.join("\n")
    );
    drop((a, b));
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_the_same_identity_stops_and_writes_nothing() {
    let Some(cluster) = require() else { return };
    let w = World::new(cluster, "twin", 3).await;
    let id = w.id("same");
    let first = w.spawn(cluster, "--leader-elect", &id);
    wait_until(
        "the first process to lead",
        Duration::from_secs(30),
        &|| first.log(),
        || async { first.log().contains("reconciled") },
    )
    .await;
    let mut second = w.spawn(cluster, "--leader-elect", &id);
    let second_log = second.log_path();
    let mut status = None;
    wait_until(
        "the second process to stop",
        Duration::from_secs(60),
        &|| std::fs::read_to_string(&second_log).unwrap_or_default(),
        || {
            status = status.or_else(|| second.exited());
            let done = status.is_some();
            async move { done }
        },
    )
    .await;
    let status = status.expect("an exit status");
    let log = second.log();
    assert!(!status.success(), "the second process exited 0:\n{log}");
    assert!(
        log.contains(&format!("another process with identity {id}")),
        "it says why:\n{log}"
    );
    // Its own instance id, from its start line, and no write under it.
    let instance_id = log
        .lines()
        .find_map(|l| l.split("; instance ").nth(1))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
        .expect("the second process's instance id in its start line");
    assert!(!instance_id.is_empty());
    let theirs: Vec<_> = audited_writes(&cluster.kubeconfig)
        .into_iter()
        .filter(|w| w.agent.contains(&instance_id))
        .collect();
    assert!(theirs.is_empty(), "the second process wrote: {theirs:#?}");
    assert!(
        !first.log().contains("stopping"),
        "the first process goes on leading"
    );
    drop(first);
    w.cleanup().await;
}

/// A TCP proxy to the API server that can stall: while stalled it forwards nothing, and the
/// connections it held through the stall are dropped when it ends, their bytes discarded (a
/// partition that outlives the client's connections). Returns its port and the switch.
async fn stalling_proxy(upstream: u16) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let port = listener.local_addr().expect("an address").port();
    let (stall, stalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let stalled = stalled.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                // One direction: forward each chunk unless a stall came; a stall ends the
                // connection when it is over.
                async fn pump(
                    from: &mut (impl AsyncReadExt + Unpin),
                    to: &mut (impl AsyncWriteExt + Unpin),
                    mut stalled: tokio::sync::watch::Receiver<bool>,
                ) {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if *stalled.borrow() {
                            let _ = stalled.wait_for(|s| !*s).await;
                            return;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = pump(&mut ri, &mut wo, stalled.clone()) => {}
                    _ = pump(&mut ro, &mut wi, stalled.clone()) => {}
                }
            });
        }
    });
    (port, stall)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_api_server_stalls_writes_nothing_after_its_lease() {
    let Some(cluster) = require() else { return };
    let w = World::new(cluster, "fstall", 300).await;
    let (client, instance) = (&w.client, &w.instance);
    let (id_a, id_b) = (format!("{instance}-a"), format!("{instance}-b"));
    // A reaches the API server through the proxy; B directly.
    let (port, stall) = stalling_proxy(crate::faults::api_port(&cluster.kubeconfig)).await;
    let via = crate::faults::kubeconfig_via(&cluster.kubeconfig, port, w.dir.path());
    let proxied = crate::cluster::TestCluster { kubeconfig: via };
    let a = w.spawn(&proxied, "--leader-elect", &id_a);
    wait_until(
        "the proxied replica to lead",
        Duration::from_secs(30),
        &|| a.log(),
        || async { a.log().contains("became the leader") },
    )
    .await;
    let b = w.spawn(cluster, "--leader-elect", &id_b);
    wait_until(
        "the leader's pass to write some environments",
        Duration::from_secs(120),
        &|| a.log(),
        || async { namespaces_of(client, instance).await >= 10 },
    )
    .await;
    let stalled_at = unix_now();
    stall.send_replace(true);
    wait_until(
        "the other replica to take over",
        Duration::from_secs(60),
        &|| b.log(),
        || async { b.log().contains("became the leader") },
    )
    .await;
    wait_until(
        "the leader cut off to step down",
        Duration::from_secs(30),
        &|| a.log(),
        || async { a.log().contains("stepping down") },
    )
    .await;
    let released_at = unix_now();
    let from = a.log().len();
    stall.send_replace(false);
    // Reaching the API server again, it reads the Lease and stands by.
    wait_until(
        "the old leader to see the new one",
        Duration::from_secs(30),
        &|| a.log(),
        || async {
            a.log()
                .get(from..)
                .is_some_and(|l| l.contains("standing by") && l.contains(&id_b))
        },
    )
    .await;
    let late = writes_after(
        &cluster.kubeconfig,
        &id_a,
        stalled_at + LEASE_SECS * 2.0 / 3.0,
    );
    assert!(
        late.is_empty(),
        "the cut-off leader wrote after its lease (stalled at {stalled_at:.3}, released at {released_at:.3}):\n{}",
        late.join("\n")
    );
    drop((a, b));
    w.cleanup().await;
}
