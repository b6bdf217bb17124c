//! The cluster harness: a real kube-apiserver for every test that needs one.
//!
//! `ENVCTL_TEST_KUBECONFIG` names any cluster to use; otherwise `scripts/control-plane up`
//! starts (or reuses) the local control plane once per test run. Without a cluster a test
//! FAILS, unless `ENVCTL_SKIP_CLUSTER_TESTS=1` explicitly skips it on a developer machine.
//! Every test works under its own envctl instance and environment names, and cleans up.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};

use crate::support::{repo_root, required, script_last_line};

pub struct TestCluster {
    pub kubeconfig: PathBuf,
}

fn start() -> Result<TestCluster, String> {
    if let Some(path) = std::env::var_os("ENVCTL_TEST_KUBECONFIG") {
        return Ok(TestCluster {
            kubeconfig: PathBuf::from(path),
        });
    }
    let mut command = Command::new(repo_root().join("scripts/control-plane"));
    command.arg("up");
    let kubeconfig = script_last_line(command, "scripts/control-plane up")?;
    Ok(TestCluster {
        kubeconfig: PathBuf::from(kubeconfig),
    })
}

/// The test cluster, or `None` (test skipped) when there is none and none is required.
pub fn require() -> Option<&'static TestCluster> {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    required("cluster", CLUSTER.get_or_init(start))
}

/// A control plane of a test's own (`scripts/control-plane` with its own state folder
/// `$ENVCTL_CACHE_DIR/control-plane-NAME` and the settings in `env`), stopped on drop. The
/// fault tests restart theirs at will; the compatibility smoke runs another Kubernetes.
pub struct OwnPlane {
    pub cluster: TestCluster,
    pub state: PathBuf,
}

impl OwnPlane {
    /// Starts it, or panics: a plane that cannot start fails the test.
    pub fn start(name: &str, env: &[(&str, &str)]) -> OwnPlane {
        let base = std::env::var_os("ENVCTL_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/envctl")))
            .expect("HOME");
        let state = base.join(format!("control-plane-{name}"));
        let mut cmd = Command::new(repo_root().join("scripts/control-plane"));
        cmd.arg("up").env("ENVCTL_CP_STATE_DIR", &state);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let kubeconfig = script_last_line(cmd, &format!("scripts/control-plane up ({name} plane)"))
            .unwrap_or_else(|e| panic!("a control plane for the {name} tests: {e}"));
        OwnPlane {
            cluster: TestCluster {
                kubeconfig: PathBuf::from(kubeconfig),
            },
            state,
        }
    }
}

impl Drop for OwnPlane {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/control-plane"))
            .arg("down")
            .env("ENVCTL_CP_STATE_DIR", &self.state)
            .output();
    }
}

/// One write the API server's audit log recorded (`scripts/control-plane` logs every write at
/// Metadata level, with the client's User-Agent).
#[derive(Debug, Clone)]
pub struct AuditedWrite {
    /// When the API server received it (unix seconds).
    pub received: f64,
    /// When it answered (unix seconds).
    pub at: f64,
    /// The envctl replica's identity from `envctl/VERSION (IDENTITY; ...)`, or the whole
    /// User-Agent of any other client.
    pub replica: String,
    /// The whole User-Agent.
    pub agent: String,
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

/// Every completed write in the audit log of the plane whose kubeconfig is `kubeconfig`.
pub fn audited_writes(kubeconfig: &std::path::Path) -> Vec<AuditedWrite> {
    let path = kubeconfig
        .parent()
        .expect("the kubeconfig's folder")
        .join("logs/audit.log");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading the API server's audit log {}: {e}", path.display()));
    let seconds = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map_or(0.0, |t| t.as_microsecond() as f64 / 1e6)
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .map(|e| {
            let agent = e["userAgent"].as_str().unwrap_or("");
            let replica = agent
                .strip_prefix("envctl/")
                .and_then(|rest| rest.split_once(" ("))
                .map(|(_, id)| {
                    id.trim_end_matches(')')
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_else(|| agent.to_string());
            let o = &e["objectRef"];
            let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            AuditedWrite {
                received: seconds(&e["requestReceivedTimestamp"]),
                at: seconds(&e["stageTimestamp"]),
                replica,
                agent: agent.to_string(),
                verb: text(&e["verb"]),
                resource: text(&o["resource"]),
                namespace: text(&o["namespace"]),
                name: text(&o["name"]),
            }
        })
        .collect()
}

/// Now, as unix seconds (the audit log's clock is this machine's).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Held by the tests that wait for pods to run and turn Ready (health, rollouts in waves),
/// so that the capacity they measure against (an environment that fits no node) is theirs.
pub async fn pods_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A name unique to this test run and call: `<prefix>-<pid><n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}{n}", (std::process::id() ^ nanos) & 0xfffff)
}

impl TestCluster {
    pub async fn client(&self) -> Client {
        envctl::cluster::connect(Some(&self.kubeconfig))
            .await
            .expect("connecting to the test cluster")
    }

    /// `envctl ARGS --kubeconfig K` in `cwd`: (exit code, stdout, stderr).
    pub fn envctl(&self, cwd: &std::path::Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            // Certificates have their own tests (certs.rs), against pebble.
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
}

/// A token for ServiceAccount `namespace/name`, valid for an hour, from the TokenRequest API.
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer: TokenRequest = api
        .create_subresource("token", name, &kube::api::PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("requesting a token for {namespace}/{name}: {e}"));
    answer
        .status
        .map(|s| s.token)
        .unwrap_or_else(|| panic!("no token in the TokenRequest answer for {namespace}/{name}"))
}

/// Waits until the namespace is gone (deletion finished), or panics after `timeout`.
pub async fn wait_namespace_gone(client: &Client, name: &str, timeout: Duration) {
    let api: Api<Namespace> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        match api.get_opt(name).await.expect("reading a namespace") {
            None => return,
            Some(_) if start.elapsed() > timeout => {
                panic!("namespace {name} still exists after {timeout:?}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Deletes every namespace of envctl instance `instance` and waits until they are gone.
pub async fn cleanup_instance(client: &Client, instance: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let selector = format!("{}={instance}", envctl::render::INSTANCE_LABEL);
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("listing test namespaces");
    for ns in &list.items {
        if let Some(name) = &ns.metadata.name {
            let _ = api.delete(name, &DeleteParams::default()).await;
        }
    }
    for ns in &list.items {
        if let Some(name) = &ns.metadata.name {
            wait_namespace_gone(client, name, Duration::from_secs(120)).await;
        }
    }
}
