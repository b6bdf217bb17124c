//! Safe as the chart deploys it (issue 11): two replicas answer HTTP-01 and relay webhooks,
//! SIGTERM hands the Lease over at once, credentials never reach any output, instances never
//! take over each other's environments, and the README's quickstart runs as written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::certs::{Case, Setup, setup};
use crate::cluster::{TestCluster, cleanup_instance, require, unique, wait_namespace_gone};
use crate::support::{Controller, examples_renamed, free_port, git, repo_root, wait_until};

/// One `envctl run` replica with leader election as `identity`, logging to
/// `DIR/IDENTITY.log`, with a Git cache of its own (as each pod has).
fn replica(cluster: &TestCluster, identity: &str, args: &[String], dir: &Path) -> Controller {
    let mut all = args.to_vec();
    all.extend(["--leader-elect", "--leader-elect-identity", identity].map(String::from));
    all.push("--cache-dir".into());
    all.push(dir.join(format!("cache-{identity}")).display().to_string());
    Controller::run(&cluster.kubeconfig, all)
        .log(&dir.join(format!("{identity}.log")))
        .start()
}

/// Whether this replica has led (its log says so).
fn leads(r: &Controller) -> bool {
    r.log().contains("became the leader")
}

/// A TCP proxy on `listen` that hands connections to `backends` in turn (what a Service in
/// front of two Ready replicas does); counts the connections each backend got.
async fn round_robin(
    listen: u16,
    backends: Vec<u16>,
) -> (tokio::task::JoinHandle<()>, Arc<Vec<AtomicUsize>>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
        .await
        .expect("binding pebble's HTTP-01 port for the proxy");
    let counts: Arc<Vec<AtomicUsize>> =
        Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut inbound, _)) = listener.accept().await {
            let i = n % backends.len();
            n += 1;
            c[i].fetch_add(1, Ordering::Relaxed);
            let port = backends[i];
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (task, counts)
}

/// Failed validations in pebble's log since `from` bytes.
fn failed_validations(log: &Path, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("validation") && (l.contains("fail") || l.contains("invalid"))
                || l.contains("status 404")
                || l.contains("unauthorized")
        })
        .map(str::to_string)
        .collect()
}

/// Item 1: two replicas behind a round-robin proxy that is pebble's HTTP-01 port, with real
/// validation: every TLS environment gets its certificate, both replicas answered, and
/// pebble saw no failed validation.
#[tokio::test(flavor = "multi_thread")]
async fn http01_is_answered_by_every_replica() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(false).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "ha01", 3).await;
    let log_start = std::fs::metadata(&pebble.log).map_or(0, |m| m.len() as usize);
    let mut args: Vec<String> = vec![
        "--source".into(),
        case.src.display().to_string(),
        "--interval".into(),
        "1s".into(),
        "--leader-elect-namespace".into(),
        case.ctl_ns.clone(),
        "--certificate-timeout".into(),
        "60s".into(),
    ];
    args.extend(case.common.iter().cloned());
    args.extend(pebble.flags());
    let a = replica(cluster, "a", &args, dir.path());
    let b = replica(cluster, "b", &args, dir.path());
    let (proxy, counts) = round_robin(pebble.http_port, vec![a.port(), b.port()]).await;
    let log = || format!("--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    let took = case
        .wait_certificates(&client, Duration::from_secs(150), &log)
        .await;
    proxy.abort();
    let served: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let failures = failed_validations(&pebble.log, log_start);
    eprintln!(
        "http01 with two replicas: {} certificates in {took:?}; validation connections per replica {served:?}; failed validations {}",
        case.names.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "pebble logged failed validations: {failures:#?}\n{}",
        log()
    );
    assert!(
        served.iter().all(|n| *n > 0),
        "both replicas must have answered validations: {served:?}"
    );
    assert_eq!(
        [leads(&a), leads(&b)].iter().filter(|l| **l).count(),
        1,
        "exactly one leader\n{}",
        log()
    );
    // Answers are withdrawn once their authorization ended.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &case.ctl_ns);
    let store = cms
        .get_opt(&format!("envctl-{}-http01", case.instance))
        .await
        .expect("reading the challenge store")
        .expect("the challenge store exists");
    assert!(
        store.data.unwrap_or_default().is_empty(),
        "every HTTP-01 answer is removed after its order"
    );
    drop(a);
    drop(b);
    case.cleanup(&client).await;
}

fn env_yaml(name: &str, scale: i64) -> String {
    format!(
        "apiVersion: envctl.materialize.cloud/v1alpha1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11\n  region: aws/us-east-1\n  hostname: {name}.us-east-1.aws.example.cloud\n  tls: {{enabled: false}}\n  environmentd:\n    image: materialize/environmentd:v0.130.0\n  services:\n    compute:\n      - {{id: cluster-0, image: \"materialize/clusterd:v0.130.0\", scale: {scale}}}\n"
    )
}

/// A local repository with `environments/<name>.yaml`, read through a `file://` URL.
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().expect("a temp dir");
        git(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(dir.path().join("environments")).expect("a folder");
        Repo { dir }
    }
    fn commit(&self, name: &str, text: &str, message: &str) {
        std::fs::write(
            self.dir
                .path()
                .join("environments")
                .join(format!("{name}.yaml")),
            text,
        )
        .expect("a manifest");
        git(self.dir.path(), &["add", "-A"]);
        git(self.dir.path(), &["commit", "-q", "-m", message]);
    }
    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }
}

async fn replicas_of(client: &kube::Client, env: &str) -> Option<i32> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{env}"));
    api.get_opt("compute-cluster-0")
        .await
        .ok()
        .flatten()
        .and_then(|s| s.spec.and_then(|s| s.replicas))
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let hex: String = ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// Items 2 and 4: a webhook call that reaches the standby leads to a pass on the leader
/// within 2 s; SIGTERM to the leader makes it exit 0 and the standby holds the Lease in
/// under 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn standby_relays_webhooks_and_sigterm_hands_over() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("relay");
    let env = unique("r");
    let ns = format!("{instance}-ctl");
    crate::certs::controller_namespace(&client, &ns).await;
    let repo = Repo::new();
    repo.commit(&env, &env_yaml(&env, 1), "one");
    let dir = tempfile::tempdir().expect("a temp dir");
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "s3cret\n").expect("a secret");
    let args: Vec<String> = [
        "--source",
        &repo.url(),
        "--ref",
        "main",
        "--path",
        "environments",
        "--instance",
        &instance,
        "--interval",
        "1h",
        "--resync-interval",
        "1h",
        "--leader-elect-namespace",
        &ns,
        "--leader-elect-lease",
        "15s",
        "--webhook-secret-file",
        secret.to_str().expect("utf-8"),
        "--skip-certificates",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a = replica(cluster, "a", &args, dir.path());
    let mut b = replica(cluster, "b", &args, dir.path());
    let (log_a, log_b) = (a.log_path(), b.log_path());
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let log = || format!("--- a ---\n{}\n--- b ---\n{}", read(&log_a), read(&log_b));
    wait_until(
        "the first revision applied",
        Duration::from_secs(60),
        &log,
        || async { replicas_of(&client, &env).await == Some(1) },
    )
    .await;
    wait_until(
        "a standby that is ready",
        Duration::from_secs(30),
        &log,
        || async {
            let standby = if leads(&a) { &b } else { &a };
            standby.http("GET", "/readyz", &[], b"").0 == 200
        },
    )
    .await;
    let a_leads = leads(&a);
    let (leader, standby) = if a_leads { (&a, &b) } else { (&b, &a) };
    assert!(!leads(standby), "two leaders\n{}", log());

    repo.commit(&env, &env_yaml(&env, 3), "scale to 3");
    let body = br#"{"ref":"refs/heads/main"}"#;
    let webhook_passes = |r: &Controller| {
        let (_, m) = r.http("GET", "/metrics", &[], b"");
        m.lines()
            .find(|l| l.starts_with("envctl_reconciles_total{trigger=\"Webhook\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = webhook_passes(leader);
    let sent = Instant::now();
    let (code, resp) = standby.http(
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", sign(b"s3cret", body))],
        body,
    );
    assert_eq!(code, 202, "{resp}");
    assert!(resp.contains("relayed"), "{resp}");
    wait_until(
        "a webhook pass on the leader",
        Duration::from_secs(10),
        &log,
        || async { webhook_passes(leader) > before },
    )
    .await;
    let to_pass = sent.elapsed();
    wait_until(
        "the change applied",
        Duration::from_secs(10),
        &log,
        || async { replicas_of(&client, &env).await == Some(3) },
    )
    .await;
    let to_applied = sent.elapsed();
    eprintln!(
        "webhook on the standby: leader's pass started after {to_pass:?}, applied after {to_applied:?}"
    );
    assert!(
        to_pass < Duration::from_secs(2),
        "the relayed webhook took {to_pass:?}\n{}",
        log()
    );

    // SIGTERM to the leader.
    let standby_id = if a_leads { "b" } else { "a" };
    let leader = if a_leads { &mut a } else { &mut b };
    let pid = leader.pid().to_string();
    let sent = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_name = format!("envctl-{instance}");
    let handover = wait_until(
        "the standby holding the Lease",
        Duration::from_secs(20),
        &|| String::new(),
        || async {
            leases
                .get_opt(&lease_name)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                .as_deref()
                == Some(standby_id)
        },
    )
    .await;
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = leader.exited() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = sent.elapsed();
    eprintln!(
        "SIGTERM: the standby held the Lease after {handover:?}; the old leader exited after {exited:?} with {status:?}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the leader must exit 0 on SIGTERM\n{}",
        log()
    );
    assert!(
        handover < Duration::from_secs(5),
        "hand-over took {handover:?}\n{}",
        log()
    );
    let text = log();
    assert!(text.contains("released the lease"), "{text}");

    // The new leader applies the next change.
    repo.commit(&env, &env_yaml(&env, 2), "scale to 2");
    let new_leader = if a_leads { &b } else { &a };
    let (code, _) = new_leader.http(
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", sign(b"s3cret", body))],
        body,
    );
    assert_eq!(code, 202);
    wait_until(
        "the new leader applied",
        Duration::from_secs(20),
        &log,
        || async { replicas_of(&client, &env).await == Some(2) },
    )
    .await;
    drop(a);
    drop(b);
    cleanup_instance(&client, &instance).await;
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}

/// Item 5: a token in the URL, or in a token file, never appears in any output (errors,
/// debug logs, metrics).
#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_reach_output() {
    let token = "tok3n-Zq9XvW2pL7";
    let dir = tempfile::tempdir().expect("a temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("a token file");
    // Nothing listens on this port: connecting fails at once.
    let dead = free_port();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "diff".into(),
            "--live".into(),
            "none".into(),
            "--source".into(),
            format!("https://bot:{token}@127.0.0.1:{dead}/envs.git"),
        ],
        vec![
            "diff".into(),
            "--live".into(),
            "none".into(),
            "--source".into(),
            format!("http://{token}@127.0.0.1:{dead}/envs.git"),
        ],
        vec![
            "diff".into(),
            "--live".into(),
            "none".into(),
            "--source".into(),
            format!("http://127.0.0.1:{dead}/envs.git"),
            "--git-token-file".into(),
            token_file.display().to_string(),
        ],
    ];
    for args in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
            .args(&args)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .env("ENVCTL_LOG", "trace")
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running envctl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(0), "{text}");
        assert!(!text.contains(token), "the token leaked:\n{text}");
        assert!(
            text.contains("127.0.0.1"),
            "the error names the remote:\n{text}"
        );
    }

    // The controller, with debug logs and metrics, polling a URL with a token.
    let Some(cluster) = require() else { return };
    let log = dir.path().join("run.log");
    let source = format!("https://bot:{token}@127.0.0.1:{dead}/envs.git");
    let cache = dir.path().join("cache").display().to_string();
    let instance = unique("cred");
    let mut run = Controller::run(
        &cluster.kubeconfig,
        [
            "--source",
            &source,
            "--interval",
            "1s",
            "--skip-certificates",
            "--instance",
            &instance,
            "--cache-dir",
            &cache,
        ],
    )
    .log(&log)
    .env("ENVCTL_LOG", "debug")
    .start();
    let port = run.port();
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("polling the source failed")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no poll error logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    run.kill();
    let _ = run.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains(token),
        "the token leaked into the log:\n{text}"
    );
    assert!(!metrics.contains(token), "the token leaked into metrics");
    assert!(
        text.contains("https://***@127.0.0.1"),
        "the redacted URL is named:\n{text}"
    );
}

/// Item 7: instance B refuses every environment instance A owns and writes nothing; an
/// existing namespace no instance owns is taken over only with --adopt.
#[tokio::test(flavor = "multi_thread")]
async fn instances_never_take_over_each_other() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let (a, b) = (unique("own-a"), unique("own-b"));
    let names = examples_renamed(&dir.path().join("envs"), &a[a.len() - 4..]);
    let src = dir.path().join("envs");
    let src = src.to_str().expect("utf-8");
    let (code, out, err) =
        cluster.envctl(&repo_root(), &["apply", "--source", src, "--instance", &a]);
    assert_eq!(code, 0, "{out}{err}");
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let labels_of = |n: &str| {
        let nsapi = nsapi.clone();
        let n = format!("environment-{n}");
        async move {
            nsapi
                .get(&n)
                .await
                .expect("a namespace")
                .metadata
                .labels
                .unwrap_or_default()
        }
    };
    let before = labels_of(&names[0]).await;

    for cmd in ["diff", "apply"] {
        let (code, out, err) =
            cluster.envctl(&repo_root(), &[cmd, "--source", src, "--instance", &b]);
        assert_eq!(code, 4, "{cmd} by another instance must fail:\n{out}{err}");
        for n in &names {
            assert!(
                out.contains(&format!("refused environment {n}: namespace environment-{n} belongs to envctl instance \"{a}\"")),
                "{cmd} names the owner of {n}:\n{out}"
            );
        }
        assert!(
            out.contains("0 to create, 0 to update, 0 to delete"),
            "{out}"
        );
    }
    let (code, out, _) = cluster.envctl(
        &repo_root(),
        &["diff", "-o", "json", "--source", src, "--instance", &b],
    );
    assert_eq!(code, 4);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(doc["summary"]["refused"], names.len());
    // Nothing carries B's label; A's labels are as they were.
    for kind in ["namespaces"] {
        let _ = kind;
        let owned_by_b = nsapi
            .list(&ListParams::default().labels(&format!("envctl.materialize.cloud/instance={b}")))
            .await
            .expect("listing");
        assert!(owned_by_b.items.is_empty(), "B wrote a namespace");
    }
    let ssapi: Api<StatefulSet> = Api::all(client.clone());
    let owned_by_b = ssapi
        .list(&ListParams::default().labels(&format!("envctl.materialize.cloud/instance={b}")))
        .await
        .expect("listing");
    assert!(owned_by_b.items.is_empty(), "B wrote a StatefulSet");
    assert_eq!(
        labels_of(&names[0]).await,
        before,
        "A's namespace labels changed"
    );
    let (code, out, err) =
        cluster.envctl(&repo_root(), &["diff", "--source", src, "--instance", &a]);
    assert_eq!(code, 0, "A still sees no change:\n{out}{err}");

    // A namespace nobody owns: refused, then adopted with --adopt.
    let c = unique("own-c");
    let orphan_dir = dir.path().join("orphan");
    std::fs::create_dir_all(&orphan_dir).expect("a folder");
    std::fs::write(orphan_dir.join("c.yaml"), env_yaml(&c, 1)).expect("a manifest");
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("environment-{c}"), "labels": {"team": "other"}}})).expect("ns");
    nsapi
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating an unowned namespace");
    let orphan = orphan_dir.to_str().expect("utf-8");
    let (code, out, err) = cluster.envctl(
        &repo_root(),
        &["apply", "--source", orphan, "--instance", &b],
    );
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        out.contains("no envctl instance owns it") && out.contains("--adopt"),
        "{out}"
    );
    assert!(
        replicas_of(&client, &c).await.is_none(),
        "nothing is written without --adopt"
    );
    let (code, out, err) = cluster.envctl(
        &repo_root(),
        &["apply", "--source", orphan, "--instance", &b, "--adopt"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(replicas_of(&client, &c).await, Some(1));

    cleanup_instance(&client, &a).await;
    cleanup_instance(&client, &b).await;
    let _ = nsapi
        .delete(&format!("environment-{c}"), &DeleteParams::default())
        .await;
    wait_namespace_gone(
        &client,
        &format!("environment-{c}"),
        Duration::from_secs(120),
    )
    .await;
}

/// Item 6: the README's quickstart runs exactly as written, with no network: its commands
/// are taken from the README and run one by one, checking the exit codes its comments state.
/// (`cargo build --release` is the test's own build; `scripts/control-plane down` is left to
/// the suite.) Without an ACME directory the TLS examples are applied without certificates,
/// with a warning, and `envctl status` says why.
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_runs_as_written() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Quickstart")
        .nth(1)
        .expect("a Quickstart section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in the quickstart");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_envctl"))
        .parent()
        .expect("a folder")
        .to_path_buf();
    let mut ran = 0;
    let mut transcript = String::new();
    for line in block.lines() {
        let command = line.split(" #").next().unwrap_or("").trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        if command.starts_with("cargo build") || command.contains("control-plane down") {
            continue;
        }
        let command = command.replace(
            "target/release/envctl",
            &format!("{}/envctl", bin_dir.display()),
        );
        let command = if command.starts_with("export KUBECONFIG=") {
            format!("export KUBECONFIG={}", cluster.kubeconfig.display())
        } else {
            command
        };
        let expected = line
            .split("# exit ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse::<i32>().ok())
            .unwrap_or(0);
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "export KUBECONFIG={}; {command}",
                    cluster.kubeconfig.display()
                ),
            ])
            .current_dir(repo_root())
            .env_remove("ENVCTL_SKIP_CERTIFICATES")
            .env_remove("ENVCTL_ACME_DIRECTORY")
            .stdin(Stdio::null())
            .output()
            .expect("running a quickstart command");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        transcript.push_str(&format!("$ {command}\n{text}"));
        assert_eq!(
            out.status.code(),
            Some(expected),
            "the quickstart's `{command}`:\n{transcript}"
        );
        if command.contains("envctl apply") {
            assert!(
                text.contains("warning: 3 TLS environment(s) applied without certificates: no ACME directory is configured"),
                "{text}"
            );
        }
        ran += 1;
    }
    assert!(ran >= 6, "the quickstart has its commands:\n{block}");
    let (code, out, err) = cluster.envctl(&repo_root(), &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("acme-prod")
                && l.contains("none: no ACME directory is configured")),
        "status shows why acme-prod has no certificate:\n{out}"
    );
    let nsapi: Api<Namespace> = Api::all(client.clone());
    for n in [
        "acme-prod",
        "globex-staging",
        "initech-analytics",
        "umbrella-dev",
    ] {
        let _ = nsapi
            .delete(&format!("environment-{n}"), &DeleteParams::default())
            .await;
    }
    for n in [
        "acme-prod",
        "globex-staging",
        "initech-analytics",
        "umbrella-dev",
    ] {
        wait_namespace_gone(
            &client,
            &format!("environment-{n}"),
            Duration::from_secs(120),
        )
        .await;
    }
}

/// A server on loopback that accepts every connection and never answers; its port.
fn silent_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = listener.local_addr().expect("an address").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// An API server that accepts connections and never answers: `diff` gives up within its
/// bound (each request: 10 s to connect, 5 tries), exits 3, and names the server.
#[test]
fn a_silent_api_server_is_given_up_on() {
    let port = silent_server();
    let dir = tempfile::tempdir().expect("a temp dir");
    let kubeconfig = dir.path().join("silent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: silent\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\nusers:\n- name: u\n  user: {{token: not-a-token}}\ncontexts:\n- name: c\n  context: {{cluster: silent, user: u}}\ncurrent-context: c\n"
        ),
    )
    .expect("writing a kubeconfig");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["diff", "--source"])
        .arg(repo_root().join("examples/environments"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .expect("running envctl");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!(
        "silent API server: exit {:?} after {took:?}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(took < Duration::from_secs(120), "took {took:?}: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("10s to connect"),
        "the error names the server and its bound: {text}"
    );
}

/// A Git server that accepts the connection and never answers: `diff` gives a clear error
/// within `--git-timeout`, for git:// and http://, instead of hanging.
#[test]
fn a_hung_git_server_times_out() {
    let port = silent_server();
    let dir = tempfile::tempdir().expect("a temp dir");
    for url in [
        format!("git://127.0.0.1:{port}/envs.git"),
        format!("http://127.0.0.1:{port}/envs.git"),
    ] {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
            .args([
                "diff",
                "--live",
                "none",
                "--git-timeout",
                "3s",
                "--source",
                &url,
            ])
            .arg("--cache-dir")
            .arg(dir.path())
            .output()
            .expect("running envctl");
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        eprintln!(
            "hung Git server ({url}): exit {:?} after {took:?}",
            out.status.code()
        );
        assert_ne!(out.status.code(), Some(0), "{text}");
        assert!(
            took < Duration::from_secs(30),
            "{url} took {took:?}: {text}"
        );
        assert!(
            text.contains(&format!("127.0.0.1:{port}")),
            "the error names the server: {text}"
        );
    }

    // The controller: each poll gives up within the timeout and the next one proceeds.
    let Some(cluster) = require() else { return };
    let log = dir.path().join("run.log");
    let source = format!("git://127.0.0.1:{port}/envs.git");
    let cache = dir.path().join("run-cache").display().to_string();
    let instance = unique("hung");
    let mut run = Controller::run(
        &cluster.kubeconfig,
        [
            "--source",
            &source,
            "--git-timeout",
            "2s",
            "--interval",
            "1s",
            "--skip-certificates",
            "--instance",
            &instance,
            "--cache-dir",
            &cache,
        ],
    )
    .log(&log)
    .start();
    let started = Instant::now();
    let failed_polls = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("polling the source failed")
            .count()
    };
    while failed_polls() < 3 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    run.kill();
    let _ = run.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("hung Git server, controller: 3 polls failed and moved on within {took:?}");
    assert!(
        failed_polls() >= 3,
        "the controller's polls must fail and go on:\n{text}"
    );
}

/// Item 6 in the controller: without an ACME directory, `run` applies the TLS examples,
/// warns, annotates why there is no certificate, and counts them in
/// `envctl_certificates_unconfigured`.
#[tokio::test(flavor = "multi_thread")]
async fn run_without_a_directory_reports_unconfigured_certificates() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("nodir");
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = examples_renamed(&src, &instance[instance.len() - 4..]);
    let log = dir.path().join("run.log");
    let source = src.display().to_string();
    // No ACME directory and certificates not skipped: they are reported unconfigured.
    let mut run = Controller::run(
        &cluster.kubeconfig,
        [
            "--source",
            &source,
            "--instance",
            &instance,
            "--interval",
            "1h",
        ],
    )
    .log(&log)
    .env_remove("ENVCTL_SKIP_CERTIFICATES")
    .env_remove("ENVCTL_ACME_DIRECTORY")
    .start();
    let port = run.port();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    let mut metrics = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        metrics = Command::new("curl")
            .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if metrics.contains("envctl_certificates_unconfigured 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        metrics.contains("envctl_certificates_unconfigured 3"),
        "three TLS examples without a directory:\n{metrics}\n{}",
        read()
    );
    // The gauge is set when the pass decides; the namespaces are annotated after it. The
    // controller is stopped only once the annotation it writes is there.
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let tls_example = names
        .iter()
        .find(|n| n.starts_with("acme-prod"))
        .expect("acme-prod");
    let note = || async {
        nsapi
            .get(&format!("environment-{tls_example}"))
            .await
            .ok()
            .and_then(|ns| ns.metadata.annotations)
            .and_then(|a| a.get("envctl.materialize.cloud/certificate").cloned())
    };
    wait_until(
        "the namespace's certificate note",
        Duration::from_secs(60),
        &read,
        || async { note().await.is_some() },
    )
    .await;
    run.kill();
    let _ = run.wait();
    assert!(
        read().contains("no ACME directory is configured"),
        "{}",
        read()
    );
    assert_eq!(
        note().await.as_deref(),
        Some(envctl::certs::UNCONFIGURED_NOTE)
    );
    cleanup_instance(&client, &instance).await;
}

/// An empty webhook key would let anyone sign a webhook: `run` refuses it before it starts.
#[test]
fn an_empty_webhook_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "\n").expect("an empty secret file");
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["run", "--source"])
        .arg(dir.path())
        .arg("--webhook-secret-file")
        .arg(&secret)
        .args(["--kubeconfig", "/nonexistent/kubeconfig"])
        .env_remove("KUBECONFIG")
        .output()
        .expect("running envctl run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "run started with an empty webhook secret: {err}"
    );
    assert!(
        err.contains("--webhook-secret-file") && err.contains("is empty"),
        "{err}"
    );
}
