//! `envctl run` against a real `git daemon` on loopback and the test cluster: pushes,
//! drift, invalid manifests, prune guards, the webhook, leader failover and an unreachable
//! remote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use crate::cluster::{TestCluster, cleanup_instance, require, unique, wait_namespace_gone};
use crate::support::{free_port, git, wait_until};

/// A bare repository served by `git daemon` on loopback, and a work clone to push from.
struct GitServer {
    _dir: tempfile::TempDir,
    base: PathBuf,
    work: PathBuf,
    port: u16,
    daemon: Option<Child>,
}

impl GitServer {
    fn start() -> GitServer {
        let dir = tempfile::tempdir().expect("a temp dir");
        let base = dir.path().join("srv");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&base).expect("mkdir");
        std::fs::create_dir_all(work.join("environments")).expect("mkdir");
        git(&base, &["init", "-q", "--bare", "-b", "main", "envs.git"]);
        git(&work, &["init", "-q", "-b", "main"]);
        git(
            &work,
            &[
                "remote",
                "add",
                "origin",
                base.join("envs.git").to_str().expect("utf-8 path"),
            ],
        );
        std::fs::write(work.join("README.md"), "environments\n").expect("write");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "init"]);
        git(&work, &["push", "-q", "origin", "main"]);
        let mut server = GitServer {
            _dir: dir,
            base,
            work,
            port: free_port(),
            daemon: None,
        };
        server.serve();
        server
    }

    fn serve(&mut self) {
        // Run git-daemon itself: `git daemon` would fork it, and killing `git` would leave the
        // server running.
        let exec_path = Command::new("git")
            .arg("--exec-path")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .expect("git --exec-path");
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .args([
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={}", self.port),
                &format!("--base-path={}", self.base.display()),
            ])
            .arg(&self.base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting git daemon (Debian package git)");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("git://127.0.0.1:{}/envs.git", self.port)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.work.join("environments").join(name), text)
            .expect("writing a manifest");
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.work.join("environments").join(name));
    }

    /// Commits everything and pushes it; returns the commit id.
    fn push(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&self.work)
            .output()
            .expect("running git rev-parse");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub use crate::support::Controller;

/// `envctl run` on the Git server's `environments` folder as `instance`, polling every second.
fn run_on_git(
    cluster: &TestCluster,
    git: &GitServer,
    instance: &str,
    extra: &[&str],
) -> Controller {
    run_on_git_every(cluster, git, instance, "1s", extra)
}

/// `run_on_git`, polling every `interval`.
fn run_on_git_every(
    cluster: &TestCluster,
    git: &GitServer,
    instance: &str,
    interval: &str,
    extra: &[&str],
) -> Controller {
    let url = git.url();
    let source = [
        "--source",
        url.as_str(),
        "--ref",
        "main",
        "--path",
        "environments",
    ];
    run_on(cluster, &source, instance, interval, extra)
}

/// `envctl run` on any source, as `instance`, with a Git cache of its own.
pub fn run_on(
    cluster: &TestCluster,
    source: &[&str],
    instance: &str,
    interval: &str,
    extra: &[&str],
) -> Controller {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cache = std::env::temp_dir().join(format!("{instance}-{}-{n}-cache", std::process::id()));
    let mut args: Vec<String> = source.iter().map(|s| s.to_string()).collect();
    args.extend(["--instance", instance, "--interval", interval].map(String::from));
    args.extend(["--cache-dir".to_string(), cache.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Controller::run(&cluster.kubeconfig, args).start()
}

fn env_yaml(name: &str, scale: i64, services: &[&str]) -> String {
    let mut compute = String::new();
    for id in services {
        compute.push_str(&format!(
            "      - {{id: {id}, image: \"materialize/clusterd:v0.130.0\", scale: {scale}}}\n"
        ));
    }
    format!(
        "apiVersion: envctl.materialize.cloud/v1alpha1
kind: Environment
metadata:
  name: {name}
spec:
  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11
  region: aws/us-east-1
  hostname: {name}.us-east-1.aws.example.cloud
  tls: {{enabled: false}}
  environmentd:
    image: materialize/environmentd:v0.130.0
  services:
    compute:
{compute}  serviceLabels: {{tier: gold}}
"
    )
}

/// Whether the controller's log shows a finished pass of `commit`.
fn reconciled(log: &str, commit: &str) -> bool {
    log.lines()
        .any(|l| l.contains("reconciled") && l.contains(commit))
}

async fn replicas(client: &Client, env: &str, name: &str) -> Option<i32> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{env}"));
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.spec.and_then(|s| s.replicas))
}

async fn ns_annotations(client: &Client, env: &str) -> Option<BTreeMap<String, String>> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.get_opt(&format!("environment-{env}"))
        .await
        .ok()
        .flatten()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| n.metadata.annotations.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn gitops_lifecycle() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("ops");
    let (a, b) = (unique("a"), unique("b"));
    let git = GitServer::start();
    git.write("a.yaml", &env_yaml(&a, 2, &["cluster-0", "cluster-1"]));
    git.write("b.yaml", &env_yaml(&b, 1, &["cluster-0"]));
    git.push("two environments");
    let ctl = run_on_git(cluster, &git, &instance, &["--prune", "--max-prune", "1"]);
    let log = || ctl.log();
    let t = Duration::from_secs(30);

    wait_until("both environments applied", t, &log, || async {
        replicas(&client, &a, "compute-cluster-1").await == Some(2)
            && replicas(&client, &b, "compute-cluster-0").await == Some(1)
    })
    .await;

    // Drift: a manual scale, a deleted Service and a removed label come back.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{a}"));
    sts.patch(
        "compute-cluster-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 7}})),
    )
    .await
    .expect("scaling by hand");
    let svc: Api<Service> = Api::namespaced(client.clone(), &format!("environment-{a}"));
    svc.delete("compute-cluster-1", &DeleteParams::default())
        .await
        .expect("deleting a Service by hand");
    sts.patch(
        "compute-cluster-1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"tier": null}}})),
    )
    .await
    .expect("removing a label by hand");
    wait_until("drift reverted", Duration::from_secs(15), &log, || async {
        let label = sts
            .get_opt("compute-cluster-1")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.metadata.labels)
            .and_then(|l| l.get("tier").cloned());
        replicas(&client, &a, "compute-cluster-0").await == Some(2)
            && svc
                .get_opt("compute-cluster-1")
                .await
                .ok()
                .flatten()
                .is_some()
            && label.as_deref() == Some("gold")
    })
    .await;

    // A pushed scale change, then a removed service.
    git.write("a.yaml", &env_yaml(&a, 3, &["cluster-0", "cluster-1"]));
    git.push("scale a");
    wait_until("scale 3 applied", t, &log, || async {
        replicas(&client, &a, "compute-cluster-0").await == Some(3)
    })
    .await;
    git.write("a.yaml", &env_yaml(&a, 3, &["cluster-0"]));
    git.push("remove cluster-1");
    wait_until("cluster-1 pruned", t, &log, || async {
        replicas(&client, &a, "compute-cluster-1").await.is_none()
            && svc
                .get_opt("compute-cluster-1")
                .await
                .ok()
                .flatten()
                .is_none()
    })
    .await;

    // One invalid manifest among valid ones: it keeps its state, the other proceeds.
    git.write(
        "a.yaml",
        &env_yaml(&a, 3, &["cluster-0"]).replace("scale: 3", "scale: -1"),
    );
    git.write("b.yaml", &env_yaml(&b, 2, &["cluster-0"]));
    git.push("a broken, b scaled");
    wait_until("b applied while a is invalid", t, &log, || async {
        let ann = ns_annotations(&client, &a).await.unwrap_or_default();
        replicas(&client, &b, "compute-cluster-0").await == Some(2)
            && ann
                .get("envctl.materialize.cloud/state")
                .map(String::as_str)
                == Some("invalid")
    })
    .await;
    assert_eq!(
        replicas(&client, &a, "compute-cluster-0").await,
        Some(3),
        "an invalid manifest changed its environment"
    );
    let ann = ns_annotations(&client, &a).await.unwrap_or_default();
    let err = ann
        .get("envctl.materialize.cloud/last-error")
        .cloned()
        .unwrap_or_default();
    assert!(
        err.contains("environments/a.yaml:") && err.contains("/spec/services/compute/0/scale"),
        "{err}"
    );

    // Removing an environment's file prunes it (with --prune).
    git.write("a.yaml", &env_yaml(&a, 3, &["cluster-0"]));
    git.remove("b.yaml");
    git.push("a fixed, b removed");
    wait_namespace_gone(
        &client,
        &format!("environment-{b}"),
        Duration::from_secs(120),
    )
    .await;
    let ann = ns_annotations(&client, &a).await.unwrap_or_default();
    assert_eq!(
        ann.get("envctl.materialize.cloud/state")
            .map(String::as_str),
        Some("applied")
    );

    // An empty tree prunes nothing.
    git.remove("a.yaml");
    git.push("empty");
    wait_until(
        "the controller to see the empty tree",
        Duration::from_secs(30),
        &log,
        || async { ctl.log().contains("the source has no valid environment") },
    )
    .await;
    assert!(
        ns_annotations(&client, &a).await.is_some(),
        "an empty source pruned an environment\n{}",
        ctl.log()
    );
    assert!(
        ctl.log().contains("the source has no valid environment"),
        "{}",
        ctl.log()
    );

    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gitops_without_prune_keeps_removed_environments() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("noprune");
    let (a, b) = (unique("a"), unique("b"));
    let git = GitServer::start();
    git.write("a.yaml", &env_yaml(&a, 1, &["cluster-0"]));
    git.write("b.yaml", &env_yaml(&b, 1, &["cluster-0"]));
    git.push("two");
    let ctl = run_on_git(cluster, &git, &instance, &[]);
    let log = || ctl.log();
    wait_until("applied", Duration::from_secs(30), &log, || async {
        replicas(&client, &b, "compute-cluster-0").await == Some(1)
    })
    .await;
    git.remove("b.yaml");
    let removed = git.push("remove b");
    wait_until(
        "the pass of the commit that removed b",
        Duration::from_secs(30),
        &log,
        || async { reconciled(&ctl.log(), &removed) },
    )
    .await;
    assert!(
        ns_annotations(&client, &b).await.is_some(),
        "removed without --prune\n{}",
        ctl.log()
    );
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_needs_a_valid_signature() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("hook");
    let a = unique("a");
    let git = GitServer::start();
    git.write("a.yaml", &env_yaml(&a, 1, &["cluster-0"]));
    git.push("one");
    let secret_dir = tempfile::tempdir().expect("temp dir");
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret\n").expect("write");
    // A long interval: only the first poll and the webhook can bring changes.
    let secret = secret_file.to_str().expect("utf-8 path");
    let ctl = run_on_git_every(
        cluster,
        &git,
        &instance,
        "1h",
        &["--webhook-secret-file", secret, "--resync-interval", "1h"],
    );
    let log = || ctl.log();
    wait_until(
        "first revision applied",
        Duration::from_secs(30),
        &log,
        || async { replicas(&client, &a, "compute-cluster-0").await == Some(1) },
    )
    .await;

    git.write("a.yaml", &env_yaml(&a, 4, &["cluster-0"]));
    git.push("scale to 4");
    let body = br#"{"ref":"refs/heads/main"}"#;
    let (code, _) = ctl.http(
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", sign(b"wrong", body))],
        body,
    );
    assert_eq!(code, 401);
    let (code, _) = ctl.http("POST", "/hooks/git", &[], body);
    assert_eq!(code, 401);

    let (code, _) = ctl.http(
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", sign(b"s3cret", body))],
        body,
    );
    assert_eq!(code, 202);
    wait_until(
        "webhook-triggered apply",
        Duration::from_secs(10),
        &log,
        || async { replicas(&client, &a, "compute-cluster-0").await == Some(4) },
    )
    .await;
    let (code, metrics) = ctl.http("GET", "/metrics", &[], b"");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("envctl_reconciles_total{trigger=\"Webhook\"} 1"),
        "{metrics}"
    );
    // Two polls in all, the first and the signed webhook's: the refused calls started none
    // (a poll they started would have come before the signed one's).
    let polls: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("envctl_polls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        polls, 2.0,
        "a refused webhook call started a poll\n{metrics}"
    );
    // The README's metrics table is what this controller exports.
    crate::support::check_metrics_table(&metrics);
    let (code, _) = ctl.http("GET", "/readyz", &[], b"");
    assert_eq!(code, 200);
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_failover() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("ha");
    let a = unique("a");
    let git = GitServer::start();
    git.write("a.yaml", &env_yaml(&a, 1, &["cluster-0"]));
    git.push("one");
    let lease = [
        "--leader-elect",
        "--leader-elect-namespace",
        "default",
        "--leader-elect-lease",
        "3s",
    ];
    let mut one = run_on_git(
        cluster,
        &git,
        &instance,
        &[&lease[..], &["--leader-elect-identity", "one"]].concat(),
    );
    let mut two = run_on_git(
        cluster,
        &git,
        &instance,
        &[&lease[..], &["--leader-elect-identity", "two"]].concat(),
    );
    let (log_one, log_two) = (one.log_path(), two.log_path());
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let log = || {
        format!(
            "--- one ---\n{}\n--- two ---\n{}",
            read(&log_one),
            read(&log_two)
        )
    };
    wait_until(
        "applied by the leader",
        Duration::from_secs(30),
        &log,
        || async { replicas(&client, &a, "compute-cluster-0").await == Some(1) },
    )
    .await;
    let leaders = [
        one.log().contains("became the leader"),
        two.log().contains("became the leader"),
    ];
    assert_eq!(
        leaders.iter().filter(|l| **l).count(),
        1,
        "exactly one leader expected\n{}",
        log()
    );
    let standby_reconciled = if leaders[0] { two.log() } else { one.log() };
    assert!(
        !standby_reconciled.contains("reconciled"),
        "the standby wrote\n{}",
        log()
    );

    if leaders[0] {
        one.kill()
    } else {
        two.kill()
    }
    git.write("a.yaml", &env_yaml(&a, 5, &["cluster-0"]));
    git.push("scale to 5 after failover");
    wait_until(
        "applied by the new leader",
        Duration::from_secs(30),
        &log,
        || async { replicas(&client, &a, "compute-cluster-0").await == Some(5) },
    )
    .await;
    drop(one);
    drop(two);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    let _ = leases
        .delete(&format!("envctl-{instance}"), &DeleteParams::default())
        .await;
    cleanup_instance(&client, &instance).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_remote_prunes_nothing_and_resumes() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("down");
    let a = unique("a");
    let mut git = GitServer::start();
    git.write("a.yaml", &env_yaml(&a, 1, &["cluster-0"]));
    git.push("one");
    let ctl = run_on_git(cluster, &git, &instance, &["--prune"]);
    let log = || ctl.log();
    wait_until("applied", Duration::from_secs(30), &log, || async {
        replicas(&client, &a, "compute-cluster-0").await == Some(1)
    })
    .await;
    git.stop();
    wait_until(
        "a poll of the stopped server to fail",
        Duration::from_secs(30),
        &log,
        || async { ctl.log().contains("polling the source failed") },
    )
    .await;
    assert!(
        ns_annotations(&client, &a).await.is_some(),
        "pruned while the remote was down"
    );
    git.write("a.yaml", &env_yaml(&a, 2, &["cluster-0"]));
    git.push("while the daemon is down");
    git.serve();
    wait_until("resumed", Duration::from_secs(30), &log, || async {
        replicas(&client, &a, "compute-cluster-0").await == Some(2)
    })
    .await;
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

/// `--watch` on a directory source: an edit is applied within seconds, long before the
/// (one-hour) interval.
/// `envctl run` (polling hourly, with `extra`) on a directory holding one environment,
/// once its first apply is done: the controller, the directory, the instance and the
/// environment's name.
async fn run_on_one_environment(
    cluster: &TestCluster,
    client: &Client,
    prefix: &str,
    extra: &[&str],
) -> (Controller, tempfile::TempDir, String, String) {
    let instance = unique(prefix);
    let a = unique("a");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("a.yaml"), env_yaml(&a, 1, &["cluster-0"])).expect("write");
    let dir_arg = dir.path().to_str().expect("utf-8 path").to_string();
    let ctl = run_on(cluster, &["--source", &dir_arg], &instance, "1h", extra);
    let log = || ctl.log();
    wait_until("first apply", Duration::from_secs(30), &log, || async {
        replicas(client, &a, "compute-cluster-0").await == Some(1)
    })
    .await;
    (ctl, dir, instance, a)
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_applies_directory_edits() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let (ctl, dir, instance, a) =
        run_on_one_environment(cluster, &client, "watch", &["--watch"]).await;
    let log = || ctl.log();
    std::fs::write(dir.path().join("a.yaml"), env_yaml(&a, 3, &["cluster-0"])).expect("write");
    wait_until(
        "the edit applied",
        // Seconds when idle; the deadline allows for a loaded CI machine (the property
        // tests keep both cores busy for minutes).
        Duration::from_secs(30),
        &log,
        || async { replicas(&client, &a, "compute-cluster-0").await == Some(3) },
    )
    .await;
    // The edit's pass is labelled Watch, or Drift when the watch events of the objects the
    // first pass created woke the loop first (the poll of that pass then finds the edit). Its
    // line is logged when the pass ends, after the objects were written.
    wait_until(
        "the edit's pass to end",
        Duration::from_secs(30),
        &log,
        || async { ctl.log().matches(" reconciled ").count() >= 2 },
    )
    .await;
    let text = ctl.log();
    assert!(
        text.contains("trigger=Watch") || text.matches("trigger=Drift").count() > 0,
        "{text}"
    );
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

/// A controller woken every second by drift still resyncs `--resync-interval` after its
/// last full pass (it used to wait for a quiet poll, which a busy loop never has).
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_controller_still_resyncs() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let extra = ["--resync-interval", "6s", "--skip-certificates"];
    let (ctl, _dir, instance, a) = run_on_one_environment(cluster, &client, "resync", &extra).await;
    // Drift every second: each wakes a pass that reverts it.
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{a}"));
    let started = Instant::now();
    let mut drifts = 0;
    while !ctl.log().contains("trigger=Resync") && started.elapsed() < Duration::from_secs(40) {
        let patch = serde_json::json!({"spec": {"replicas": 2 + drifts % 2}});
        let params = PatchParams::default();
        if api
            .patch("compute-cluster-0", &params, &Patch::Merge(&patch))
            .await
            .is_ok()
        {
            drifts += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let text = ctl.log();
    assert!(
        text.contains("trigger=Resync"),
        "no resync in {:?} with {drifts} drifts:\n{text}",
        started.elapsed()
    );
    assert!(
        text.contains("trigger=Drift"),
        "the loop was not kept busy:\n{text}"
    );
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}

/// The image environmentd runs in `env`, and whether every StatefulSet there is Ready.
async fn rollout_state(client: &Client, env: &str) -> (String, bool) {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{env}"));
    let list = api.list(&Default::default()).await.ok();
    let items = list.map(|l| l.items).unwrap_or_default();
    let image = items
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("environmentd"))
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let observed = envctl::observe::group_for_health(
        items.iter().map(|s| {
            let view = envctl::health::StatefulSetView::from(s);
            (env.to_string(), std::sync::Arc::new(view))
        }),
        pods(client, env).await.iter().map(|p| {
            let view = envctl::health::PodView::from(p);
            (env.to_string(), std::sync::Arc::new(view))
        }),
        [],
    );
    let ready = observed.get(env).is_some_and(|o| {
        envctl::health::assess(
            o,
            k8s_openapi::jiff::Timestamp::now(),
            Duration::from_secs(600),
        )
        .state
            == envctl::health::HealthState::Ready
    });
    (image, ready)
}

/// Whether the rollout the controller recorded (in its namespace, `default` here) matches.
async fn rollout_is(
    client: &Client,
    instance: &str,
    want: impl Fn(&envctl::rollout::RolloutStatus) -> bool,
) -> bool {
    envctl::status::read_rollout(client, "default", instance)
        .await
        .ok()
        .flatten()
        .is_some_and(|r| want(&r))
}

async fn pods(client: &Client, env: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    let api: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), &format!("environment-{env}"));
    api.list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_in_waves_halts_on_degraded_and_converges_after_a_fix() {
    use crate::health::small_env;
    let Some(cluster) = require() else { return };
    let _pods = crate::cluster::pods_lock().await;
    let client = cluster.client().await;
    let instance = unique("wave");
    let envs = [unique("w1"), unique("w2"), unique("w3")];
    let waves = ["wave: one", "wave: two", "wave: three"];
    let git = GitServer::start();
    git.write(
        "rollout.yaml",
        "apiVersion: envctl.materialize.cloud/v1alpha1
kind: RolloutPolicy
metadata: {name: fleet}
spec:
  waves:
    - {name: canary, selector: {matchLabels: {wave: one}}}
    - {name: early, selector: {matchLabels: {wave: two}}, maxInFlight: 1}
    - {name: rest, selector: {matchLabels: {wave: three}}, maxInFlight: \"50%\"}
",
    );
    let write_all = |tag: &str, canary_cpu: &str| {
        for (i, (env, labels)) in envs.iter().zip(waves).enumerate() {
            let cpu = if i == 0 { canary_cpu } else { "10m" };
            git.write(
                &format!("{env}.yaml"),
                &small_env(env, labels, tag, cpu, ""),
            );
        }
    };
    write_all("v1", "10m");
    let r0 = git.push("v1 everywhere");
    let ctl = run_on_git(cluster, &git, &instance, &["--progress-deadline", "30s"]);
    let log = || ctl.log();
    let image = |tag: &str| format!("materialize/environmentd:{tag}");
    async fn all_run(client: &Client, envs: &[String], tag: &str) -> bool {
        let want = (format!("materialize/environmentd:{tag}"), true);
        for env in envs {
            if rollout_state(client, env).await != want {
                return false;
            }
        }
        true
    }

    wait_until(
        "the fleet runs v1, Ready",
        Duration::from_secs(120),
        &log,
        || all_run(&client, &envs, "v1"),
    )
    .await;

    // v2 everywhere, but the canary asks for a CPU no node has: it degrades at the deadline
    // and the rollout halts there; waves 2 and 3 keep serving v1.
    write_all("v2", "500");
    let r1 = git.push("v2, canary unschedulable");
    let pushed = Instant::now();
    wait_until(
        "the rollout halts at the canary",
        Duration::from_secs(90),
        &log,
        || {
            rollout_is(&client, &instance, |r| {
                r.revision == r1
                    && r.halted
                        .as_ref()
                        .is_some_and(|h| h.environment == envs[0] && h.reason == "Unschedulable")
            })
        },
    )
    .await;
    eprintln!(
        "measure: push to halt (degraded canary, 30s progress deadline): {:.1?}",
        pushed.elapsed()
    );
    for env in &envs[1..] {
        assert_eq!(
            rollout_state(&client, env).await,
            (image("v1"), true),
            "{env} keeps serving v1 while the rollout is halted"
        );
        let ann = ns_annotations(&client, env).await.unwrap_or_default();
        assert_eq!(
            ann.get(envctl::status::REVISION_ANNOTATION),
            Some(&r0),
            "{env} is recorded at the revision it runs"
        );
    }
    let (code, out, err) = cluster.envctl(
        &crate::support::repo_root(),
        &["status", "--instance", &instance],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("HALTED by {}", envs[0])), "{out}");
    // The canary's namespace holds the Events: its health turned Degraded, and it halted the
    // rollout (they are published as the halt is recorded; wait for the API to show them).
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &format!("environment-{}", envs[0]));
    wait_until(
        "Degraded and RolloutHalted Events on the canary",
        Duration::from_secs(15),
        &log,
        || async {
            let reasons: Vec<String> = events
                .list(&Default::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| e.reason)
                .collect();
            ["Degraded", "RolloutHalted"]
                .iter()
                .all(|r| reasons.iter().any(|x| x == r))
        },
    )
    .await;
    let (_, metrics) = ctl.http("GET", "/metrics", &[], b"");
    assert!(metrics.contains("envctl_rollout_halted 1"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "envctl_environment_health{{environment=\"{}\",health=\"Degraded\"}} 1",
            envs[0]
        )),
        "{metrics}"
    );

    // The fix rolls forward from the canary, wave by wave, to v2 everywhere.
    write_all("v2", "10m");
    let r2 = git.push("v2, canary fixed");
    let fixed = Instant::now();
    wait_until(
        "every wave runs v2, Ready",
        Duration::from_secs(180),
        &log,
        || all_run(&client, &envs, "v2"),
    )
    .await;
    eprintln!(
        "measure: fix to all three waves Ready at v2: {:.1?}",
        fixed.elapsed()
    );
    wait_until(
        "the rollout is complete",
        Duration::from_secs(30),
        &log,
        || {
            rollout_is(&client, &instance, |r| {
                r.revision == r2 && r.current_wave.is_none() && r.halted.is_none()
            })
        },
    )
    .await;
    // Wave order: each wave was applied only after the one before it.
    let mut applied = Vec::new();
    for env in &envs {
        let ann = ns_annotations(&client, env).await.unwrap_or_default();
        assert_eq!(
            ann.get(envctl::status::REVISION_ANNOTATION),
            Some(&r2),
            "{env}"
        );
        applied.push(
            ann.get(envctl::status::APPLIED_AT_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
        );
    }
    assert!(
        applied[0] < applied[1] && applied[1] < applied[2],
        "applied in wave order: {applied:?}"
    );
    drop(ctl);
    cleanup_instance(&client, &instance).await;
}
