//! Fault injection on the real control plane (issue 12): an admission webhook that denies one
//! environment, a TCP proxy that cuts connections to the API server, an API-server restart
//! during a pass, `kill -9` of the controller mid-pass, and a quota ledger that cannot be
//! written. Every case checks that the rest of the fleet converges and nothing is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};

use crate::cluster::{OwnPlane, cleanup_instance, require, unique};
use crate::support::{Controller, repo_root, wait_until};

pub fn env_yaml(name: &str, scale: i64, tls: bool) -> String {
    format!(
        "apiVersion: envctl.materialize.cloud/v1alpha1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11\n  region: aws/us-east-1\n  hostname: {name}.us-east-1.faults.test\n  tls: {{enabled: {tls}}}\n  environmentd:\n    image: materialize/environmentd:v0.130.0\n  services:\n    compute:\n      - {{id: cluster-0, image: \"materialize/clusterd:v0.130.0\", scale: {scale}}}\n"
    )
}

/// Writes `n` environments `<prefix>-<i>` with `scale` into `dir`; returns their names.
pub fn write_fleet(dir: &Path, prefix: &str, n: usize, scale: i64) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("a folder");
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            std::fs::write(
                dir.join(format!("{name}.yaml")),
                env_yaml(&name, scale, false),
            )
            .expect("a manifest");
            name
        })
        .collect()
}

async fn replicas(client: &kube::Client, env: &str) -> Option<i32> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &format!("environment-{env}"));
    api.get_opt("compute-cluster-0")
        .await
        .ok()
        .flatten()
        .and_then(|s| s.spec.and_then(|s| s.replicas))
}

/// How many of `names` have compute-cluster-0 at `scale`, read with one LIST.
pub async fn converged(
    client: &kube::Client,
    instance: &str,
    names: &[String],
    scale: i32,
) -> usize {
    let api: Api<StatefulSet> = Api::all(client.clone());
    let Ok(list) = api
        .list(
            &ListParams::default().labels(&format!("envctl.materialize.cloud/instance={instance}")),
        )
        .await
    else {
        return 0;
    };
    let at: BTreeMap<String, i32> = list
        .items
        .into_iter()
        .filter(|s| s.metadata.name.as_deref() == Some("compute-cluster-0"))
        .filter_map(|s| {
            Some((
                s.metadata
                    .namespace?
                    .trim_start_matches("environment-")
                    .to_string(),
                s.spec?.replicas?,
            ))
        })
        .collect();
    names.iter().filter(|n| at.get(*n) == Some(&scale)).count()
}

fn envctl(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("NO_COLOR", "1")
        .env("ENVCTL_SKIP_CERTIFICATES", "1")
        .env_remove("KUBECONFIG")
        .output()
        .expect("running envctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `envctl run ARGS` on `kubeconfig`, appending to `log`, with `extra_env`.
fn spawn_run(
    kubeconfig: &Path,
    args: &[&str],
    log: &Path,
    extra_env: &[(&str, &str)],
) -> Controller {
    let mut command = Controller::run(kubeconfig, args).log(log);
    for (k, v) in extra_env {
        command = command.env(k, v);
    }
    command.start()
}

// ---------------------------------------------------------------------------------------
// A validating admission webhook on loopback, the way a policy engine refuses writes.

struct Webhook {
    name: String,
    denied: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    /// Denies every write to objects whose namespace (or, for a Namespace, itself) carries
    /// label `key=value`.
    async fn deny(
        client: &kube::Client,
        key: &str,
        value: &str,
        message: &str,
        resources: &[&str],
    ) -> Webhook {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::TokioIo;
        use rustls_pki_types::PrivateKeyDer;

        let key_pair = rcgen::KeyPair::generate().expect("a key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(std::net::IpAddr::from([
            127, 0, 0, 1,
        ]))];
        let cert = params.self_signed(&key_pair).expect("a certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
            )
            .expect("a server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("an address").port();
        let denied = Arc::new(AtomicUsize::new(0));
        let count = denied.clone();
        let message = message.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, count, message) = (acceptor.clone(), count.clone(), message.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (count, message) = (count.clone(), message.clone());
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let review: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                // Count envctl's requests, not the controller-manager's.
                                let user = review["request"]["userInfo"]["username"]
                                    .as_str()
                                    .unwrap_or("");
                                if !user.starts_with("system:") {
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                                let answer = serde_json::json!({
                                    "apiVersion": "admission.k8s.io/v1",
                                    "kind": "AdmissionReview",
                                    "response": {
                                        "uid": review["request"]["uid"],
                                        "allowed": false,
                                        "status": {"code": 403, "message": message}
                                    }
                                });
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(answer.to_string())))
                                        .expect("a response"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        use base64::Engine;
        let name = unique("deny");
        let config: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "deny.envctl.test",
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{port}/validate"),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(cert.pem()),
                },
                "rules": [{
                    "apiGroups": ["", "apps", "rbac.authorization.k8s.io"],
                    "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": resources,
                }],
                "namespaceSelector": {"matchLabels": {key: value}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }]
        }))
        .expect("a webhook configuration");
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingWebhookConfiguration",
            )),
        );
        api.create(&PostParams::default(), &config)
            .await
            .expect("registering the webhook");
        Webhook { name, denied, task }
    }

    async fn remove(self, client: &kube::Client) {
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingWebhookConfiguration",
            )),
        );
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
        self.task.abort();
    }
}

/// Case 1: a webhook denies one environment. `diff` and `apply` finish the whole fleet, name
/// that environment with the server's message and exit 4; the controller applies every other
/// environment in the same pass and records the failure in the environment's status.
#[tokio::test(flavor = "multi_thread")]
async fn admission_denial_fails_one_environment_alone() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("deny");
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 6, 1);
    let s = src.to_str().expect("utf-8");
    let (code, out, err) = envctl(
        &cluster.kubeconfig,
        &["apply", "--source", s, "--instance", &instance],
    );
    assert_eq!(code, 0, "{out}{err}");

    let frozen = names[2].clone();
    let hook = Webhook::deny(
        &client,
        "envctl.materialize.cloud/environment",
        &frozen,
        "policy: this environment is frozen",
        // The environment's workloads, as a policy engine would; its namespace stays
        // writable, so envctl can record the failure on it.
        &[
            "serviceaccounts",
            "services",
            "statefulsets",
            "rolebindings",
        ],
    )
    .await;
    // Webhooks take effect after the API server's configuration refresh.
    let _ = write_fleet(&src, &instance, 6, 2);
    let mut diff = (0, String::new(), String::new());
    for _ in 0..40 {
        diff = envctl(
            &cluster.kubeconfig,
            &["diff", "--source", s, "--instance", &instance],
        );
        if diff.0 == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (code, out, err) = diff;
    assert_eq!(code, 4, "diff with one environment denied:\n{out}{err}");
    assert!(
        out.contains(&format!("failed environment {frozen}: dry-run of"))
            && out.contains("this environment is frozen"),
        "diff names the environment and the server's message:\n{out}"
    );
    for n in names.iter().filter(|n| **n != frozen) {
        assert!(
            out.contains(&format!(
                "update StatefulSet environment-{n}/compute-cluster-0"
            )),
            "{n} is planned:\n{out}"
        );
    }
    let (code, out, err) = envctl(
        &cluster.kubeconfig,
        &["apply", "--source", s, "--instance", &instance],
    );
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains(&format!("environment {frozen} failed:")) && err.contains("frozen"),
        "{err}"
    );
    assert!(
        err.contains("1 environment(s) failed (the others were applied)"),
        "{err}"
    );
    for n in &names {
        let want = if *n == frozen { 1 } else { 2 };
        assert_eq!(replicas(&client, n).await, Some(want), "{n}");
    }

    // The controller: every other environment is applied in the same pass; the frozen one
    // is failed with the server's message, and retried with backoff.
    let _ = write_fleet(&src, &instance, 6, 3);
    let log = dir.path().join("run.log");
    let mut run = spawn_run(
        &cluster.kubeconfig,
        &["--source", s, "--instance", &instance, "--interval", "1s"],
        &log,
        &[],
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "the other environments applied",
        Duration::from_secs(60),
        &read,
        || async { converged(&client, &instance, &names, 3).await == names.len() - 1 },
    )
    .await;
    let nsapi: Api<Namespace> = Api::all(client.clone());
    wait_until(
        "the frozen environment's status",
        Duration::from_secs(30),
        &read,
        || async {
            let ann = nsapi
                .get(&format!("environment-{frozen}"))
                .await
                .ok()
                .and_then(|n| n.metadata.annotations)
                .unwrap_or_default();
            ann.get("envctl.materialize.cloud/state")
                .map(String::as_str)
                == Some("failed")
                && ann
                    .get("envctl.materialize.cloud/last-error")
                    .is_some_and(|e| e.contains("frozen"))
        },
    )
    .await;
    // Backoff: the frozen environment is not retried on every 1 s poll. Its third failure
    // is awaited; each came only after the previous one's backoff ran out.
    wait_until(
        "the frozen environment's third failure",
        Duration::from_secs(60),
        &read,
        || async { failures(&read(), &frozen).len() >= 3 },
    )
    .await;
    let seen = failures(&read(), &frozen);
    for pair in seen.windows(2) {
        let ((t0, attempt0, backoff0), (t1, attempt1, _)) = (pair[0], pair[1]);
        assert_eq!(attempt1, attempt0 + 1, "{seen:?}\n{}", read());
        assert!(
            t1 - t0 >= backoff0 - 0.25,
            "retried {:.2} s after a failure whose backoff is {backoff0} s: {seen:?}\n{}",
            t1 - t0,
            read()
        );
    }
    hook.remove(&client).await;
    wait_until(
        "the frozen environment applied once allowed",
        Duration::from_secs(90),
        &read,
        || async { replicas(&client, &frozen).await == Some(3) },
    )
    .await;
    run.kill();
    let _ = run.wait();
    let text = read();
    assert!(
        text.contains("environment failed; the others go on"),
        "{text}"
    );
    cleanup_instance(&client, &instance).await;
}

// ---------------------------------------------------------------------------------------
// A TCP proxy in front of the API server that cuts a share of the connections.

async fn cutting_proxy(
    upstream: u16,
    share_percent: u64,
) -> (u16, tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let port = listener.local_addr().expect("an address").port();
    let cut = Arc::new(AtomicUsize::new(0));
    let counter = cut.clone();
    let task = tokio::spawn(async move {
        let mut n: u64 = 0x2545_f491_4f6c_dd1d;
        while let Ok((mut inbound, _)) = listener.accept().await {
            // xorshift: a deterministic spread of cuts.
            n ^= n << 13;
            n ^= n >> 7;
            n ^= n << 17;
            let roll = n % 100;
            let life = Duration::from_millis(200 + (n >> 8) % 3000);
            let counter = counter.clone();
            tokio::spawn(async move {
                if roll < share_percent {
                    counter.fetch_add(1, Ordering::Relaxed);
                    // Half are refused at once, half cut mid-stream.
                    if roll.is_multiple_of(2) {
                        return;
                    }
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::time::timeout(
                            life,
                            tokio::io::copy_bidirectional(&mut inbound, &mut outbound),
                        )
                        .await;
                    }
                    return;
                }
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, task, cut)
}

/// A kubeconfig like `base` whose server is `127.0.0.1:port`.
pub fn kubeconfig_via(base: &Path, port: u16, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(base).expect("the kubeconfig");
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("a server line")
        .to_string();
    let path = dir.join("via-proxy.kubeconfig");
    std::fs::write(
        &path,
        text.replace(&server, &format!("https://127.0.0.1:{port}")),
    )
    .expect("a kubeconfig");
    path
}

pub fn api_port(kubeconfig: &Path) -> u16 {
    let text = std::fs::read_to_string(kubeconfig).expect("the kubeconfig");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .and_then(|s| s.rsplit(':').next())
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a server port")
}

/// Case 3: 30% of the connections to the API server are cut; the controller converges.
#[tokio::test(flavor = "multi_thread")]
async fn the_controller_converges_through_cut_connections() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("cut");
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 12, 2);
    let (port, proxy, cut) = cutting_proxy(api_port(&cluster.kubeconfig), 30).await;
    let via = kubeconfig_via(&cluster.kubeconfig, port, dir.path());
    let log = dir.path().join("run.log");
    let s = src.to_str().expect("utf-8");
    let started = Instant::now();
    let mut run = spawn_run(
        &via,
        &["--source", s, "--instance", &instance, "--interval", "1s"],
        &log,
        &[],
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "12 environments through the cutting proxy",
        Duration::from_secs(150),
        &read,
        || async { converged(&client, &instance, &names, 2).await == names.len() },
    )
    .await;
    let took = started.elapsed();
    // And a change after that.
    let _ = write_fleet(&src, &instance, 12, 3);
    wait_until(
        "a change through the cutting proxy",
        Duration::from_secs(120),
        &read,
        || async { converged(&client, &instance, &names, 3).await == names.len() },
    )
    .await;
    run.kill();
    let _ = run.wait();
    proxy.abort();
    eprintln!(
        "cutting proxy: 12 environments converged in {took:?}, then a change in {:?}; {} connections cut",
        started.elapsed() - took,
        cut.load(Ordering::Relaxed)
    );
    assert!(cut.load(Ordering::Relaxed) > 0, "the proxy cut nothing");
    cleanup_instance(&client, &instance).await;
}

// ---------------------------------------------------------------------------------------
// A control plane of the fault tests' own, which they may restart at will.

/// kill -9 of the fault plane's API server, then started again (waits until ready).
fn restart_apiserver(state: &Path) {
    let out = Command::new(repo_root().join("scripts/control-plane"))
        .arg("restart-apiserver")
        .env("ENVCTL_CP_STATE_DIR", state)
        .output()
        .expect("restarting the API server");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fault plane is shared by the tests that restart or kill things, one at a time.
async fn own_plane() -> tokio::sync::MutexGuard<'static, Option<OwnPlane>> {
    static PLANE: tokio::sync::Mutex<Option<OwnPlane>> = tokio::sync::Mutex::const_new(None);
    let mut guard = PLANE.lock().await;
    if guard.is_none() {
        *guard = Some(
            // The fault cases watch objects, not pods: no kwok nodes there, so the 200
            // environments' pods cost nothing.
            tokio::task::spawn_blocking(|| OwnPlane::start("faults", &[("ENVCTL_NODES", "0")]))
                .await
                .expect("starting"),
        );
    }
    guard
}

/// Case 4: the API server restarts (kill -9, then started again) during a pass over 200
/// environments; the controller converges.
#[tokio::test(flavor = "multi_thread")]
async fn the_controller_converges_after_an_api_server_restart() {
    if require().is_none() {
        return;
    }
    let plane = own_plane().await;
    let plane = plane.as_ref().expect("the fault plane");
    let client = envctl::cluster::connect(Some(&plane.cluster.kubeconfig))
        .await
        .expect("a client");
    let instance = unique("restart");
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 200, 1);
    let log = dir.path().join("run.log");
    let s = src.to_str().expect("utf-8");
    let started = Instant::now();
    let mut run = spawn_run(
        &plane.cluster.kubeconfig,
        &["--source", s, "--instance", &instance, "--interval", "1s"],
        &log,
        &[],
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // Restart once the pass is under way.
    wait_until(
        "the pass under way",
        Duration::from_secs(60),
        &read,
        || async { converged(&client, &instance, &names, 1).await >= 10 },
    )
    .await;
    let restarted_at = started.elapsed();
    let state = plane.state.clone();
    tokio::task::spawn_blocking(move || restart_apiserver(&state))
        .await
        .expect("restart");
    let client = envctl::cluster::connect(Some(&plane.cluster.kubeconfig))
        .await
        .expect("a client");
    let took = wait_until(
        "200 environments after the restart",
        Duration::from_secs(240),
        &read,
        || async { converged(&client, &instance, &names, 1).await == names.len() },
    )
    .await;
    run.kill();
    let _ = run.wait();
    eprintln!(
        "API server restart after {restarted_at:?} of the pass: all 200 converged {took:?} after it came back"
    );
    cleanup_instance(&client, &instance).await;
}

/// Case 5: `kill -9` of `envctl run` at random points of a 200-environment pass, five times;
/// after a restart everything converges, nothing is left orphaned, nothing is duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_pass_five_times_then_converge() {
    if require().is_none() {
        return;
    }
    let plane = own_plane().await;
    let plane = plane.as_ref().expect("the fault plane");
    let client = envctl::cluster::connect(Some(&plane.cluster.kubeconfig))
        .await
        .expect("a client");
    // Five of the environments want certificates from pebble (always valid), whose orders
    // are counted; the certificate tests' lock keeps the count ours.
    let Some(pebble) = crate::certs::pebble(true) else {
        return;
    };
    let _certs = crate::certs::lock().await;
    let instance = unique("kill");
    let ctl_ns = format!("{instance}-ctl");
    crate::certs::controller_namespace(&client, &ctl_ns).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("envs");
    let names = write_fleet(&src, &instance, 200, 1);
    let tls: Vec<String> = names[..5].to_vec();
    let write_round = |scale: i64| {
        let _ = write_fleet(&src, &instance, 200, scale);
        for n in &tls {
            std::fs::write(src.join(format!("{n}.yaml")), env_yaml(n, scale, true))
                .expect("a manifest");
        }
    };
    let s = src.to_str().expect("utf-8");
    let log = dir.path().join("run.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut args: Vec<String> = [
        "--source",
        s,
        "--instance",
        &instance,
        "--interval",
        "1s",
        "--controller-namespace",
        &ctl_ns,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(pebble.flags());
    let certs_on = [("ENVCTL_SKIP_CERTIFICATES", "0")];
    let orders_before = pebble.orders();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = Vec::new();
    for round in 0..5 {
        // Each round changes the fleet (scale round+1), so every restart has work mid-way.
        write_round(round + 1);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut run = spawn_run(&plane.cluster.kubeconfig, &argv, &log, &certs_on);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = Duration::from_millis(1000 + seed % 7000);
        tokio::time::sleep(at).await;
        run.kill(); // SIGKILL
        let _ = run.wait();
        kills.push((
            at,
            converged(&client, &instance, &names, (round + 1) as i32).await,
        ));
    }
    // Removing some environments meanwhile: a restart must prune them, leaving nothing behind.
    for n in &names[190..] {
        let _ = std::fs::remove_file(src.join(format!("{n}.yaml")));
    }
    let kept = &names[..190];
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend(["--prune", "--max-prune", "10"]);
    let mut run = spawn_run(&plane.cluster.kubeconfig, &argv, &log, &certs_on);
    let took = wait_until(
        "convergence after five kill -9",
        Duration::from_secs(240),
        &read,
        || async { converged(&client, &instance, kept, 5).await == kept.len() },
    )
    .await;
    let nsapi: Api<Namespace> = Api::all(client.clone());
    wait_until(
        "the removed environments pruned",
        Duration::from_secs(120),
        &read,
        || async {
            let list = nsapi
                .list(
                    &ListParams::default()
                        .labels(&format!("envctl.materialize.cloud/instance={instance}")),
                )
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            list.iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .count()
                == kept.len()
        },
    )
    .await;
    let secrets: Vec<Api<k8s_openapi::api::core::v1::Secret>> = tls
        .iter()
        .map(|n| Api::namespaced(client.clone(), &format!("environment-{n}")))
        .collect();
    wait_until(
        "a certificate for each TLS environment",
        Duration::from_secs(120),
        &read,
        || async {
            let mut all = true;
            for api in &secrets {
                all &= api
                    .get_opt("environment-tls")
                    .await
                    .ok()
                    .flatten()
                    .is_some();
            }
            all
        },
    )
    .await;
    run.kill();
    let _ = run.wait();
    let orders = pebble.orders() - orders_before;
    // No orphans: every owned StatefulSet belongs to a kept environment, exactly once each.
    let sts: Api<StatefulSet> = Api::all(client.clone());
    let owned = sts
        .list(
            &ListParams::default().labels(&format!("envctl.materialize.cloud/instance={instance}")),
        )
        .await
        .expect("listing");
    let mut per_env: BTreeMap<String, usize> = BTreeMap::new();
    for s in &owned.items {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        // Only namespaces that exist and are not being deleted count (a pruned namespace can
        // finish deleting between the list above and this read).
        if nsapi
            .get_opt(&ns)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| n.metadata.deletion_timestamp.is_none())
        {
            *per_env.entry(ns).or_default() += 1;
        }
    }
    eprintln!(
        "kill -9 at {kills:?} (time, environments converged then); converged {took:?} after the last restart; {orders} ACME orders for {} TLS environments",
        tls.len()
    );
    assert_eq!(
        per_env.len(),
        kept.len(),
        "StatefulSets outside the kept environments"
    );
    assert!(
        per_env.values().all(|n| *n == 2),
        "each environment has environmentd and compute-cluster-0: {per_env:?}"
    );
    // Orders: one per TLS environment, plus at most those a kill cut off between sending
    // newOrder and recording its URL (ACME cannot list an account's orders, so such an order
    // is lost; its charge stays). An order placed and recorded is never lost: not even one
    // finalized just before a kill (its key was kept first).
    assert!(
        orders >= tls.len(),
        "{orders} orders for {} TLS environments",
        tls.len()
    );
    assert!(
        !read().contains("whose key is lost"),
        "a finalized order was lost to a kill:\n{}",
        read()
    );
    // The quota ledger never undercounts: every order pebble saw was charged first.
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["quota", "-o", "json", "--instance", &instance])
        .args(["--controller-namespace", &ctl_ns, "--kubeconfig"])
        .arg(&plane.cluster.kubeconfig)
        .output()
        .expect("running envctl quota");
    let quota: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "envctl quota: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let charged: u64 = quota["buckets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["limit"] == "new-orders-per-account")
        .filter_map(|b| b["used"].as_u64())
        .sum();
    eprintln!("kill -9: {orders} orders reached pebble, {charged} charged in the ledger");
    assert!(
        charged as usize >= orders,
        "the ledger charged {charged} orders but pebble saw {orders}\n{quota}"
    );
    cleanup_instance(&client, &instance).await;
    let _ = nsapi.delete(&ctl_ns, &DeleteParams::default()).await;
}

/// Case 6: the quota ledger cannot be written (a webhook denies ConfigMap writes in the
/// controller namespace): no order is sent; the certificate fails with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_that_cannot_be_written_sends_no_order() {
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
    let case = crate::certs::Case::new(&client, dir.path(), "ledgerfail", 2).await;
    // Label the controller namespace so that the webhook matches it alone.
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let patch =
        serde_json::json!({"metadata": {"labels": {"envctl-test/ledger": case.instance.clone()}}});
    nsapi
        .patch(
            &case.ctl_ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("labelling the controller namespace");
    let hook = Webhook::deny(
        &client,
        "envctl-test/ledger",
        &case.instance,
        "policy: no ConfigMaps here",
        &["configmaps"],
    )
    .await;
    // Wait until the webhook is in force: a probe ConfigMap is denied.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &case.ctl_ns);
    let mut in_force = false;
    for i in 0..60 {
        let probe: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("probe-{i}")}}))
                .expect("cm");
        match cms.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(e)) if e.message.contains("no ConfigMaps here") => {
                in_force = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    assert!(in_force, "the webhook never took effect");
    let before = pebble.orders();
    let (code, stdout, stderr) = crate::certs::envctl(cluster, &case.apply(&pebble.flags()));
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        hook.denied.load(Ordering::Relaxed) > 0,
        "the webhook never denied a write"
    );
    assert!(
        format!("{stdout}{stderr}").contains("no ConfigMaps here"),
        "the reason is reported:\n{stdout}{stderr}"
    );
    assert_eq!(
        pebble.orders(),
        before,
        "an order was sent although the ledger could not be written"
    );
    hook.remove(&client).await;
    case.cleanup(&client).await;
}

/// Each "environment failed" line of `env` in a controller's text log: (seconds of the day
/// it was logged, its attempt, its backoff in seconds).
fn failures(log: &str, env: &str) -> Vec<(f64, u32, f64)> {
    let field = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
        Some(rest.split(' ').next()?.to_string())
    };
    log.lines()
        .filter(|l| l.contains("environment failed; the others go on"))
        .filter(|l| field(l, "environment").as_deref() == Some(env))
        .filter_map(|l| {
            // 2026-12-02T02:31:00.123456Z
            let clock = l.split('T').nth(1)?.split('Z').next()?;
            let mut parts = clock.split(':');
            let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
            let at = h.parse::<f64>().ok()? * 3600.0
                + m.parse::<f64>().ok()? * 60.0
                + sec.parse::<f64>().ok()?;
            let attempt = field(l, "attempt")?.parse().ok()?;
            let backoff = field(l, "retry_in")?.trim_end_matches('s').parse().ok()?;
            Some((at, attempt, backoff))
        })
        .collect()
}

/// Case 7: a certificate whose order was finalized but could not be stored (a webhook denies
/// the environments' Secrets, as a stop between finalizing and storing would leave it) is
/// downloaded on the next pass with the key kept before finalizing: no second order.
#[tokio::test(flavor = "multi_thread")]
async fn a_finalized_order_is_downloaded_not_ordered_again() {
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
    let case = crate::certs::Case::new(&client, dir.path(), "keepkey", 2).await;
    let label = "envctl.materialize.cloud/instance";
    // A probe namespace carrying the environments' label, to see the webhook take effect.
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let probe_ns = format!("{}-probe", case.instance);
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": probe_ns, "labels": {label: case.instance}}
    }))
    .expect("a namespace");
    nsapi
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating the probe namespace");
    let hook = Webhook::deny(
        &client,
        label,
        &case.instance,
        "policy: no Secrets in environments",
        &["secrets"],
    )
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &probe_ns);
    let probe = |i: usize| -> k8s_openapi::api::core::v1::Secret {
        serde_json::from_value(serde_json::json!({"metadata": {"name": format!("probe-{i}")}}))
            .expect("a Secret")
    };
    let mut in_force = false;
    for i in 0..120 {
        if let Err(kube::Error::Api(e)) = secrets.create(&PostParams::default(), &probe(i)).await
            && e.message.contains("no Secrets in environments")
        {
            in_force = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(in_force, "the webhook never took effect");

    let before = pebble.orders();
    let (code, out, err) = crate::certs::envctl(cluster, &case.apply(&pebble.flags()));
    assert_ne!(
        code, 0,
        "storing was denied, yet apply succeeded:\n{out}{err}"
    );
    assert!(
        format!("{out}{err}").contains("no Secrets in environments"),
        "the reason is reported:\n{out}{err}"
    );
    let first = pebble.orders() - before;
    assert_eq!(first, case.names.len(), "one order each:\n{out}{err}");
    // The keys were kept, in the controller's namespace, before the orders were finalized.
    let kept: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &case.ctl_ns);
    let keys_name = format!("envctl-{}-order-keys", case.instance);
    let order_keys =
        |s: Option<k8s_openapi::api::core::v1::Secret>| s.and_then(|s| s.data).unwrap_or_default();
    let keys = order_keys(
        kept.get_opt(&keys_name)
            .await
            .expect("reading the order keys"),
    );
    for name in &case.names {
        assert!(
            keys.contains_key(&format!("{name}.key")),
            "no key kept for {name}"
        );
    }

    hook.remove(&client).await;
    let mut stored = false;
    let mut transcript = String::new();
    // The webhook's removal reaches the API server's admission within seconds.
    for _ in 0..60 {
        let (code, out, err) = crate::certs::envctl(cluster, &case.apply(&pebble.flags()));
        transcript = format!("{out}{err}");
        if code == 0 {
            stored = true;
            break;
        }
        assert!(
            transcript.contains("no Secrets in environments"),
            "apply failed for another reason:\n{transcript}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(stored, "the certificates were never stored:\n{transcript}");
    assert_eq!(
        pebble.orders() - before,
        first,
        "a finalized order was ordered again instead of downloaded:\n{transcript}"
    );
    for name in &case.names {
        let ns = format!("environment-{name}");
        let secret = crate::certs::tls_secret(&client, &ns)
            .await
            .unwrap_or_else(|| panic!("no certificate in {ns}"));
        let data = secret.data.unwrap_or_default();
        let (crt, key) = (
            data.get("tls.crt").map(|b| b.0.clone()).unwrap_or_default(),
            data.get("tls.key").map(|b| b.0.clone()).unwrap_or_default(),
        );
        assert_eq!(
            public_key(&crt, "x509"),
            public_key(&key, "pkey"),
            "{ns}: the stored key is not the certificate's"
        );
        let keys = order_keys(
            kept.get_opt(&keys_name)
                .await
                .expect("reading the order keys"),
        );
        assert!(
            !keys.contains_key(&format!("{name}.key")),
            "the order key of {name} outlived its certificate"
        );
    }
    let _ = nsapi.delete(&probe_ns, &DeleteParams::default()).await;
    case.cleanup(&client).await;
}

/// The public key of a PEM certificate (`x509`) or private key (`pkey`), by openssl.
fn public_key(pem: &[u8], kind: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(if kind == "x509" {
            &["x509", "-pubkey", "-noout"][..]
        } else {
            &["pkey", "-pubout"][..]
        })
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pem)
        .expect("writing to openssl");
    let out = child.wait_with_output().expect("openssl's output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
