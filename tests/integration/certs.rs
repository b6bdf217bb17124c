//! Certificates against Let's Encrypt's test CA (the current pebble, built and started by
//! `scripts/pebble`)
//! and the local control plane: issuance, verification against pebble's root, quota, reuse,
//! renewal, real HTTP-01, and the crash-loop quota test.
//!
//! Pebble enforces no rate limits, so the tests count the orders that reach it in its log
//! ("Added order"). Certificate tests hold one lock so that the counts are theirs alone.
//! Without pebble a test FAILS, unless `ENVCTL_SKIP_CLUSTER_TESTS=1` explicitly skips it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, PostParams};

use crate::cluster::{self, TestCluster, cleanup_instance, unique, wait_namespace_gone};
use crate::support::{Controller, repo_root, required, script_last_line, wait_until};

/// One running pebble: its directory, the CA of its listener, its management address, log.
pub struct Pebble {
    pub directory: String,
    pub ca: PathBuf,
    pub management: String,
    pub http_port: u16,
    pub log: PathBuf,
}

/// How a test pebble is configured: its state folder's name and `scripts/pebble`'s settings.
struct Flavour {
    state: &'static str,
    env: &'static [(&'static str, &'static str)],
}

const ALWAYS_VALID: Flavour = Flavour {
    state: "pebble-always-valid",
    env: &[("PEBBLE_VA_ALWAYS_VALID", "1")],
};
const VALIDATING: Flavour = Flavour {
    state: "pebble-validating",
    env: &[],
};
/// The profiles Let's Encrypt offers (`shortlived` for 6 days here), validation skipped.
pub const PROFILES: &[(&str, &str)] = &[
    ("PEBBLE_VA_ALWAYS_VALID", "1"),
    (
        "ENVCTL_PEBBLE_PROFILES",
        "classic=7776000,tlsserver=7776000,shortlived=518400",
    ),
];
/// The key id and HMAC key (base64url) that a pebble requiring EAB accepts: `KID=KEY`.
pub const EAB_ACCOUNT: &str =
    "kid-envctl=zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
const EAB: &[(&str, &str)] = &[
    ("PEBBLE_VA_ALWAYS_VALID", "1"),
    ("ENVCTL_PEBBLE_EAB", EAB_ACCOUNT),
];

fn start_pebble(flavour: &Flavour) -> Result<Pebble, String> {
    let state = std::env::var_os("ENVCTL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/envctl")))
        .ok_or("no HOME")?
        .join(flavour.state);
    let mut cmd = Command::new(repo_root().join("scripts/pebble"));
    cmd.arg("up").env("ENVCTL_PEBBLE_STATE_DIR", &state);
    for var in [
        "PEBBLE_VA_ALWAYS_VALID",
        "ENVCTL_PEBBLE_PROFILES",
        "ENVCTL_PEBBLE_EAB",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(flavour.env.iter().copied());
    let env_file = script_last_line(cmd, "scripts/pebble up")?;
    let text = std::fs::read_to_string(&env_file).map_err(|e| format!("{env_file}: {e}"))?;
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| {
        vars.get(k)
            .map(|v| v.to_string())
            .ok_or(format!("{env_file} lacks {k}"))
    };
    Ok(Pebble {
        directory: get("PEBBLE_DIRECTORY")?,
        ca: PathBuf::from(get("PEBBLE_CA")?),
        management: get("PEBBLE_MANAGEMENT")?,
        http_port: get("PEBBLE_HTTP_PORT")?.parse().map_err(|_| "bad port")?,
        log: state.join("logs/pebble.log"),
    })
}

/// Pebble (always-valid or validating HTTP-01 for real), or `None` (skipped) when it cannot
/// start and nothing requires it.
pub fn pebble(always_valid: bool) -> Option<&'static Pebble> {
    static VALID: OnceLock<Result<Pebble, String>> = OnceLock::new();
    static REAL: OnceLock<Result<Pebble, String>> = OnceLock::new();
    let (cell, flavour) = if always_valid {
        (&VALID, &ALWAYS_VALID)
    } else {
        (&REAL, &VALIDATING)
    };
    required("pebble", cell.get_or_init(|| start_pebble(flavour)))
}

/// A pebble that offers `classic`, `tlsserver` and a 6-day `shortlived` profile.
pub fn pebble_with_profiles() -> Option<&'static Pebble> {
    static CELL: OnceLock<Result<Pebble, String>> = OnceLock::new();
    let flavour = Flavour {
        state: "pebble-profiles",
        env: PROFILES,
    };
    required("pebble", CELL.get_or_init(|| start_pebble(&flavour)))
}

/// A pebble that requires external account binding (`EAB_KID`, `EAB_KEY`).
pub fn pebble_with_eab() -> Option<&'static Pebble> {
    static CELL: OnceLock<Result<Pebble, String>> = OnceLock::new();
    let flavour = Flavour {
        state: "pebble-eab",
        env: EAB,
    };
    required("pebble", CELL.get_or_init(|| start_pebble(&flavour)))
}

/// What every certificate test starts from: the cluster, a pebble, the certificate lock
/// (held while this lives), a client and a temp dir.
pub struct Setup {
    pub cluster: &'static TestCluster,
    pub pebble: &'static Pebble,
    pub _guard: tokio::sync::MutexGuard<'static, ()>,
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
}

pub async fn setup(always_valid: bool) -> Option<Setup> {
    setup_on(|| pebble(always_valid)).await
}

/// `setup` on the pebble that `pebble` starts (or finds running).
pub async fn setup_on(pebble: impl FnOnce() -> Option<&'static Pebble>) -> Option<Setup> {
    let cluster = cluster::require()?;
    let pebble = pebble()?;
    let guard = lock().await;
    Some(Setup {
        cluster,
        pebble,
        _guard: guard,
        client: cluster.client().await,
        dir: tempfile::tempdir().expect("a temp dir"),
    })
}

/// Certificate tests run one at a time, so that pebble's order counts are theirs.
pub async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

impl Pebble {
    /// Orders pebble has received so far.
    pub fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Added order")
            .count()
    }

    /// Certificates pebble has issued so far.
    pub fn issued(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Issued certificate serial")
            .count()
    }

    /// Accounts pebble has registered so far (a known key registering again is not counted).
    pub fn accounts(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("accounts in memory")
            .count()
    }

    /// Pebble's root certificate, as a PEM file.
    pub fn root(&self, dir: &Path) -> PathBuf {
        let out = Command::new("curl")
            .args(["-fsS", "--cacert"])
            .arg(&self.ca)
            .arg(format!("{}/roots/0", self.management))
            .output()
            .expect("running curl");
        assert!(out.status.success(), "fetching pebble's root failed");
        let path = dir.join("pebble-root.pem");
        std::fs::write(&path, out.stdout).expect("writing the root");
        path
    }

    /// The flags that point envctl at this pebble.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--acme-directory".into(),
            self.directory.clone(),
            "--acme-ca-bundle".into(),
            self.ca.display().to_string(),
            "--acme-email".into(),
            "ops@example.test".into(),
        ]
    }
}

/// Verifies `chain_pem` (leaf first) against `root` with openssl.
pub fn verify_chain(chain_pem: &[u8], root: &Path, dir: &Path) {
    let chain = dir.join("chain.pem");
    std::fs::write(&chain, chain_pem).expect("writing the chain");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&chain)
        .output()
        .expect("running openssl verify");
    assert!(
        out.status.success(),
        "the stored chain does not verify against pebble's root: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `n` minimal TLS environments `<prefix>-<i>` with hostnames under `domain`.
pub fn write_envs(dir: &Path, prefix: &str, domain: &str, n: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("a manifest folder");
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let text = format!(
                "apiVersion: envctl.materialize.cloud/v1alpha1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11\n  region: aws/us-east-1\n  hostname: {name}.us-east-1.{domain}\n  environmentd:\n    image: materialize/environmentd:v0.130.0\n"
            );
            std::fs::write(dir.join(format!("{name}.yaml")), text).expect("writing a manifest");
            name
        })
        .collect()
}

/// One test's world: an envctl instance, its controller namespace, `n` TLS environments
/// under a registered domain of its own, and the flags that name them.
#[derive(Clone)]
pub struct Case {
    pub instance: String,
    pub ctl_ns: String,
    pub src: PathBuf,
    pub domain: String,
    pub names: Vec<String>,
    /// `--instance I --controller-namespace NS`.
    pub common: Vec<String>,
}

impl Case {
    pub async fn new(client: &kube::Client, dir: &Path, prefix: &str, n: usize) -> Case {
        let instance = unique(prefix);
        let ctl_ns = format!("{instance}-ctl");
        controller_namespace(client, &ctl_ns).await;
        let src = dir.join(&instance);
        let domain = format!("{instance}.test");
        let names = write_envs(&src, &instance, &domain, n);
        let common = vec![
            "--instance".to_string(),
            instance.clone(),
            "--controller-namespace".into(),
            ctl_ns.clone(),
        ];
        Case {
            instance,
            ctl_ns,
            src,
            domain,
            names,
            common,
        }
    }

    /// `apply --source SRC` with the common flags and `extra`.
    pub fn apply(&self, extra: &[String]) -> Vec<String> {
        let mut a = vec![
            "apply".to_string(),
            "--source".into(),
            self.src.display().to_string(),
        ];
        a.extend(self.common.iter().cloned());
        a.extend(extra.iter().cloned());
        a
    }

    /// Waits (at most `timeout`) until every environment of the case has its certificate;
    /// `log` is shown if it does not. Returns how long it took.
    pub async fn wait_certificates(
        &self,
        client: &kube::Client,
        timeout: Duration,
        log: &dyn Fn() -> String,
    ) -> Duration {
        wait_until(
            "a certificate for every environment",
            timeout,
            log,
            || async {
                for n in &self.names {
                    if tls_secret(client, &format!("environment-{n}"))
                        .await
                        .is_none()
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await
    }

    pub async fn cleanup(&self, client: &kube::Client) {
        cleanup_instance(client, &self.instance).await;
        let nsapi: Api<Namespace> = Api::all(client.clone());
        let _ = nsapi.delete(&self.ctl_ns, &DeleteParams::default()).await;
    }
}

/// `envctl ARGS` with certificates on: (exit code, stdout, stderr).
pub fn envctl(cluster: &TestCluster, args: &[String]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(args)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .env("NO_COLOR", "1")
        .env_remove("ENVCTL_SKIP_CERTIFICATES")
        .env_remove("KUBECONFIG")
        .output()
        .expect("running envctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `envctl` run on a blocking thread, so that the test's own servers (the proxy) keep
/// serving meanwhile.
pub async fn envctl_off_runtime(
    cluster: &'static TestCluster,
    args: Vec<String>,
) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || envctl(cluster, &args))
        .await
        .expect("running envctl")
}

/// A namespace for the controller's state (account, ledger, copies) of one test.
pub async fn controller_namespace(client: &kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}
    }))
    .expect("a namespace");
    api.create(&PostParams::default(), &ns)
        .await
        .expect("creating the controller namespace");
}

pub async fn tls_secret(client: &kube::Client, namespace: &str) -> Option<Secret> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.get_opt("environment-tls")
        .await
        .expect("reading a Secret")
}

pub fn chain_of(secret: &Secret) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

pub fn serial_of(secret: &Secret) -> String {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("envctl.materialize.cloud/certificate-serial"))
        .cloned()
        .unwrap_or_default()
}

pub fn quota(cluster: &TestCluster, common: &[String]) -> serde_json::Value {
    let mut args = vec!["quota".to_string(), "-o".into(), "json".into()];
    args.extend(common.iter().cloned());
    let (code, out, err) = envctl(cluster, &args);
    assert_eq!(code, 0, "envctl quota failed: {err}");
    serde_json::from_str(&out).expect("quota JSON")
}

pub fn bucket(q: &serde_json::Value, limit: &str, key: &str) -> (u64, u64) {
    bucket_if_any(q, limit, key).unwrap_or_else(|| panic!("no bucket {limit} {key} in {q}"))
}

pub fn bucket_if_any(q: &serde_json::Value, limit: &str, key: &str) -> Option<(u64, u64)> {
    let b = q["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .find(|b| b["limit"] == limit && b["key"] == key)?;
    Some((
        b["used"].as_u64().expect("used"),
        b["remaining"].as_u64().expect("remaining"),
    ))
}

/// A certificate for `name` valid from `not_before` to `not_after` (unix seconds), self-signed.
fn near_expiry_cert(name: &str, not_before: i64, not_after: i64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).expect("time");
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).expect("time");
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a certificate");
    (cert.pem(), key.serialize_pem())
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `envctl apply` against pebble: every TLS environment gets a Secret whose chain verifies
/// against pebble's root; a second apply orders nothing; a re-created environment gets its
/// certificate back from the controller's copy without an order; a near-expiry certificate
/// is renewed as a renewal (the registered domain's bucket is not charged).
#[tokio::test(flavor = "multi_thread")]
async fn certificates_issue_verify_reuse_renew() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "certs", 3).await;
    let (instance, ctl_ns, domain, names) =
        (&case.instance, &case.ctl_ns, &case.domain, &case.names);
    let apply = case.apply(&pebble.flags());
    let common = &case.common;

    let before = pebble.orders();
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "apply failed:\n{out}\n{err}");
    assert!(out.contains("3 issued"), "{out}");
    assert_eq!(pebble.orders() - before, 3, "one order per environment");
    let root = pebble.root(dir.path());
    for n in names.iter() {
        let s = tls_secret(&client, &format!("environment-{n}"))
            .await
            .unwrap_or_else(|| panic!("no environment-tls in {n}"));
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        verify_chain(&chain_of(&s), &root, dir.path());
        let annotations = s.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations
                .get("envctl.materialize.cloud/certificate-names")
                .map(String::as_str),
            Some(format!("{n}.us-east-1.{domain}").as_str())
        );
        assert!(annotations.contains_key("envctl.materialize.cloud/certificate-not-after"));
    }
    let q = quota(cluster, common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", domain),
        (3, 47),
        "{q}"
    );

    // Nothing to do: no order.
    let before = pebble.orders();
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("3 current"), "{out}");
    assert_eq!(pebble.orders(), before, "a second apply ordered");

    // Re-created environment: its certificate comes back from the copy, no order.
    let first_ns = format!("environment-{}", names[0]);
    let old_serial = serial_of(&tls_secret(&client, &first_ns).await.expect("a Secret"));
    let nsapi: Api<Namespace> = Api::all(client.clone());
    nsapi
        .delete(&first_ns, &DeleteParams::default())
        .await
        .expect("deleting a namespace");
    wait_namespace_gone(&client, &first_ns, Duration::from_secs(120)).await;
    let before = pebble.orders();
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 reused"), "{out}");
    assert_eq!(
        pebble.orders(),
        before,
        "re-creating an environment spent quota"
    );
    let back = tls_secret(&client, &first_ns)
        .await
        .expect("the Secret is back");
    assert_eq!(serial_of(&back), old_serial);
    verify_chain(&chain_of(&back), &root, dir.path());

    // Renewal: a certificate with less than a third of its life left is renewed with the
    // same names, which does not spend the registered domain's quota.
    let second_ns = format!("environment-{}", names[1]);
    let host = format!("{}.us-east-1.{domain}", names[1]);
    let (cert, key) = near_expiry_cert(&host, now() - 80 * 86_400, now() + 5 * 86_400);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &second_ns);
    let mut s = tls_secret(&client, &second_ns).await.expect("a Secret");
    let data = s.data.get_or_insert_with(Default::default);
    data.insert("tls.crt".into(), k8s_openapi::ByteString(cert.into_bytes()));
    data.insert("tls.key".into(), k8s_openapi::ByteString(key.into_bytes()));
    secrets
        .replace("environment-tls", &PostParams::default(), &s)
        .await
        .expect("planting a near-expiry certificate");
    // The controller's copy is as old (else it would be reused instead of renewing).
    let copies: Api<Secret> = Api::namespaced(client.clone(), ctl_ns);
    let copy_name = envctl::certs::store::copy_shard_name(instance, &names[1]);
    let mut c = copies.get(&copy_name).await.expect("the controller's copy");
    let planted = s.data.clone().unwrap_or_default();
    let copy = c.data.get_or_insert_with(Default::default);
    for (from, to) in [("tls.crt", "crt"), ("tls.key", "key")] {
        copy.insert(format!("{}.{to}", names[1]), planted[from].clone());
    }
    copies
        .replace(&copy_name, &PostParams::default(), &c)
        .await
        .expect("planting a near-expiry copy");
    // As if an earlier process had announced a wait for it: served, the note must go.
    let nsapi: Api<Namespace> = Api::all(client.clone());
    nsapi
        .patch(
            &second_ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                "envctl.materialize.cloud/certificate-wait-until": "2030-01-01T00:00:00Z",
                "envctl.materialize.cloud/certificate-wait-reason": "new-certificates-per-registered-domain"
            }}})),
        )
        .await
        .expect("planting a stale wait");
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("certificate {}: issued (renewal)", names[1])),
        "{out}"
    );
    let renewed = tls_secret(&client, &second_ns).await.expect("a Secret");
    let annotations = nsapi
        .get(&second_ns)
        .await
        .expect("the namespace")
        .metadata
        .annotations
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("envctl.materialize.cloud/certificate-wait-until"),
        "a served certificate still says it waits: {annotations:?}"
    );
    verify_chain(&chain_of(&renewed), &root, dir.path());
    let q = quota(cluster, common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", domain),
        (3, 47),
        "a renewal spent the registered domain's quota: {q}"
    );
    assert_eq!(
        bucket(&q, "new-certificates-per-exact-set", &host).0,
        2,
        "{q}"
    );

    case.cleanup(&client).await;
}

/// Real HTTP-01: pebble resolves every name to 127.0.0.1 (challtestsrv) and fetches the
/// token from envctl's listener. Without a listener the authorization fails, the order is
/// reported failed and the failure is booked in the ledger.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_real_http01() {
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
    let case = Case::new(&client, dir.path(), "http01", 1).await;
    let mut flags = pebble.flags();
    flags.extend(["--certificate-timeout".to_string(), "30s".into()]);
    let mut apply = case.apply(&flags);
    let names = &case.names;

    // No listener: pebble cannot fetch the token.
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 4, "apply without a challenge listener:\n{out}\n{err}");
    assert!(out.contains("failed"), "{out}");
    let q = quota(cluster, &case.common);
    let failures: u64 = q["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .filter(|b| b["limit"] == "authorization-failures-per-identifier")
        .map(|b| b["used"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        failures, 1,
        "the failed authorization is booked: {q}\n{out}"
    );

    // With envctl answering on pebble's HTTP-01 port.
    apply.push("--acme-http01-listen".into());
    apply.push(format!("127.0.0.1:{}", pebble.http_port));
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "apply with HTTP-01:\n{out}\n{err}");
    assert!(out.contains("1 issued"), "{out}");
    let s = tls_secret(&client, &format!("environment-{}", names[0]))
        .await
        .expect("a Secret");
    verify_chain(&chain_of(&s), &pebble.root(dir.path()), dir.path());
    case.cleanup(&client).await;
}

/// `envctl run` on `src` against `pebble`, polling every second, appending to `log`.
fn spawn_run(
    cluster: &TestCluster,
    src: &Path,
    common: &[String],
    pebble: &Pebble,
    log: &Path,
) -> Controller {
    let mut args = vec![
        "--source".to_string(),
        src.display().to_string(),
        "--interval".into(),
        "1s".into(),
    ];
    args.extend(common.iter().cloned());
    args.extend(pebble.flags());
    Controller::run(&cluster.kubeconfig, args).log(log).start()
}

/// The quota acceptance: 60 TLS environments under one registered domain with Let's
/// Encrypt's default 50 per week. `envctl apply` sends exactly 50 orders and states when the
/// other 10 will be served; then, on a fresh ledger, `envctl run` killed and restarted again
/// and again during issuance never sends more than 50.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_quota_holds_through_crash_loops() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };

    // Part 1: one apply.
    let case = Case::new(&client, dir.path(), "quota", 60).await;
    let (names, domain, common) = (&case.names, &case.domain, &case.common);
    let apply = case.apply(&pebble.flags());
    let before = pebble.orders();
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "apply failed:\n{out}\n{err}");
    assert_eq!(
        pebble.orders() - before,
        50,
        "exactly 50 orders reach pebble"
    );
    assert!(out.contains("50 issued, 10 waiting"), "{out}");
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let mut waiting = 0;
    for n in names.iter() {
        let ns = nsapi
            .get(&format!("environment-{n}"))
            .await
            .expect("a namespace");
        let a = ns.metadata.annotations.unwrap_or_default();
        if let Some(until) = a.get("envctl.materialize.cloud/certificate-wait-until") {
            waiting += 1;
            assert_eq!(
                a.get("envctl.materialize.cloud/certificate-wait-reason")
                    .map(String::as_str),
                Some("new-certificates-per-registered-domain")
            );
            assert!(until.starts_with("20"), "a stated time: {until}");
        }
    }
    assert_eq!(waiting, 10, "10 environments say when they will be served");
    let q = quota(cluster, common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", domain),
        (50, 0),
        "{q}"
    );
    assert_eq!(q["queued"].as_object().map(|o| o.len()), Some(10), "{q}");
    // Again: nothing more is sent.
    let before = pebble.orders();
    let (code, out, err) = envctl(cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        pebble.orders(),
        before,
        "a second apply sent orders beyond quota"
    );
    case.cleanup(&client).await;

    // Part 2: the controller, killed and restarted during issuance.
    let case = Case::new(&client, dir.path(), "crash", 60).await;
    let (src, domain, common) = (&case.src, &case.domain, &case.common);
    let log = dir.path().join("run.log");
    let before = pebble.orders();
    let issued_before = pebble.issued();
    let kills = [1500u64, 700, 1200, 400, 900, 1600, 300, 1100];
    for ms in kills {
        let mut child = spawn_run(cluster, src, common, pebble, &log);
        std::thread::sleep(Duration::from_millis(ms));
        // SIGKILL, wherever the process is: charging, ordering, finalizing or recording.
        child.kill();
        let _ = child.wait();
        let sent = pebble.orders() - before;
        assert!(sent <= 50, "{sent} orders reached pebble after a restart");
        // The ledger never ends below what the CA counted (reservations released only by
        // an outcome that was recorded).
        let issued = pebble.issued() - issued_before;
        let q = quota(cluster, common);
        let used = bucket_if_any(&q, "new-certificates-per-registered-domain", domain)
            .map_or(0, |(used, _)| used);
        assert!(
            used >= issued as u64,
            "after a kill: {issued} certificates issued, the ledger counts {used}\n{q}"
        );
    }
    // Finally let it settle: 10 wait, and never more than 50 orders in all.
    let mut child = spawn_run(cluster, src, common, pebble, &log);
    let start = Instant::now();
    let settled = loop {
        let q = quota(cluster, common);
        // No bucket yet: nothing was charged so far (the runs may all have been killed
        // before their first order).
        let used = bucket_if_any(&q, "new-certificates-per-registered-domain", domain)
            .map_or(0, |(used, _)| used);
        let pending = q["pending"].as_object().map_or(0, |o| o.len());
        if used == 50 && pending == 0 {
            break true;
        }
        if start.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    child.kill();
    let _ = child.wait();
    let sent = pebble.orders() - before;
    assert!(
        settled,
        "the ledger did not settle; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        sent <= 50,
        "{sent} orders reached pebble through the crash loop"
    );
    let q = quota(cluster, common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", domain),
        (50, 0),
        "{q}"
    );
    eprintln!("crash loop: {sent} orders reached pebble for 60 environments (limit 50)");
    case.cleanup(&client).await;
}

/// A small TLS proxy in front of pebble that refuses the first `times` POSTs to paths
/// starting with `path` with an ACME problem, and forwards everything else. It keeps the
/// Host header, so pebble writes the proxy's address into the URLs it hands out.
struct Proxy {
    directory: String,
    bundle: PathBuf,
    /// POSTs seen on the refused path.
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// What the proxy refuses, and how.
#[derive(Clone)]
struct Refusal {
    path: &'static str,
    times: usize,
    status: u16,
    problem: &'static str,
    detail: String,
    retry_after: Option<&'static str>,
}

async fn start_proxy(pebble: &Pebble, dir: &Path, refusal: Refusal) -> Proxy {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::pem::PemObject;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The proxy's own certificate, trusted by envctl through the CA bundle.
    let key = rcgen::KeyPair::generate().expect("a key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("a certificate");
    let bundle = dir.join("proxy-bundle.pem");
    let mut pem = std::fs::read(&pebble.ca).expect("pebble's CA");
    pem.extend_from_slice(cert.pem().as_bytes());
    std::fs::write(&bundle, pem).expect("writing the bundle");
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("a server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

    // Upstream: pebble, trusted through its listener CA.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&pebble.ca).expect("pebble CA") {
        roots.add(c.expect("a certificate")).expect("a root");
    }
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_only()
        .enable_http1()
        .build();
    let upstream: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    let pebble_base = pebble.directory.trim_end_matches("/dir").to_string();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a proxy port");
    let port = listener.local_addr().expect("an address").port();
    let seen = Arc::new(AtomicUsize::new(0));
    let hits = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream, base, hits, refusal) = (
                acceptor.clone(),
                upstream.clone(),
                pebble_base.clone(),
                hits.clone(),
                refusal.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (upstream, base, hits, refusal) = (
                            upstream.clone(),
                            base.clone(),
                            hits.clone(),
                            refusal.clone(),
                        );
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let path = parts
                                .uri
                                .path_and_query()
                                .map_or("/", |p| p.as_str())
                                .to_string();
                            if parts.method == hyper::Method::POST
                                && parts.uri.path().starts_with(refusal.path)
                                && hits.fetch_add(1, Ordering::SeqCst) < refusal.times
                            {
                                let problem = serde_json::json!({
                                    "type": refusal.problem,
                                    "detail": refusal.detail,
                                    "status": refusal.status,
                                });
                                let mut rsp = hyper::Response::builder()
                                    .status(refusal.status)
                                    .header("Content-Type", "application/problem+json");
                                if let Some(r) = refusal.retry_after {
                                    rsp = rsp.header("Retry-After", r);
                                }
                                return Ok::<_, std::convert::Infallible>(
                                    rsp.body(Full::new(Bytes::from(problem.to_string())))
                                        .expect("a response"),
                                );
                            }
                            let mut up = hyper::Request::builder()
                                .method(parts.method.clone())
                                .uri(format!("{base}{path}"));
                            for (k, v) in &parts.headers {
                                up = up.header(k, v);
                            }
                            let rsp = match upstream
                                .request(up.body(Full::new(body)).expect("a request"))
                                .await
                            {
                                Ok(r) => r,
                                Err(e) => {
                                    return Ok(hyper::Response::builder()
                                        .status(502)
                                        .body(Full::new(Bytes::from(e.to_string())))
                                        .expect("a response"));
                                }
                            };
                            let (parts, body) = rsp.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            Ok(hyper::Response::from_parts(parts, Full::new(body)))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Proxy {
        directory: format!("https://127.0.0.1:{port}/dir"),
        bundle,
        hits: seen,
    }
}

/// A 429 from the server defers the bucket it names until its Retry-After: the environment
/// waits with a stated time, and the next pass sends no order at all.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_429_defers_the_bucket() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "limited", 1).await;
    let (names, domain, common) = (&case.names, &case.domain, &case.common);
    let proxy = start_proxy(
        pebble,
        dir.path(),
        Refusal {
            path: "/order-plz",
            times: 1,
            status: 429,
            problem: "urn:ietf:params:acme:error:rateLimited",
            detail: format!(
                "too many certificates (50) already issued for \"{domain}\" in the last 168h0m0s"
            ),
            retry_after: Some("3600"),
        },
    )
    .await;
    let apply = case.apply(&[
        "--acme-directory".into(),
        proxy.directory.clone(),
        "--acme-ca-bundle".into(),
        proxy.bundle.display().to_string(),
    ]);
    let before = pebble.orders();
    let started = now();
    let (code, out, err) = envctl_off_runtime(cluster, apply.clone()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("waiting for quota (new-certificates-per-registered-domain)"),
        "{out}\n{err}"
    );
    assert_eq!(proxy.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        pebble.orders(),
        before,
        "the refused order never reached pebble"
    );
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let ns = nsapi
        .get(&format!("environment-{}", names[0]))
        .await
        .expect("the namespace");
    let a = ns.metadata.annotations.unwrap_or_default();
    let until = a
        .get("envctl.materialize.cloud/certificate-wait-until")
        .expect("a stated time");
    let until_secs = k8s_openapi::jiff::Timestamp::from_str(until)
        .expect("RFC 3339")
        .as_second();
    assert!(
        (started + 3590..=now() + 3610).contains(&until_secs),
        "waits until Retry-After: {until}"
    );
    let q = quota(cluster, common);
    let (_, remaining) = bucket(&q, "new-certificates-per-registered-domain", domain);
    assert_eq!(remaining, 0, "the bucket is resynchronised to empty: {q}");

    // The next pass sends nothing: the ledger already knows.
    let (code, out, err) = envctl_off_runtime(cluster, apply).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 waiting"), "{out}");
    assert_eq!(
        proxy.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a deferred bucket was asked again"
    );
    case.cleanup(&client).await;
}

/// Let's Encrypt answers badNonce now and then (pebble on purpose, 5% of nonces): more in a
/// row than instant-acme retries must not fail the order nor spend quota on a new one.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_survive_bad_nonces() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "nonce", 1).await;
    let proxy = start_proxy(
        pebble,
        dir.path(),
        Refusal {
            path: "/authZ/",
            times: 6,
            status: 400,
            problem: "urn:ietf:params:acme:error:badNonce",
            detail: "JWS has an invalid anti-replay nonce".into(),
            retry_after: None,
        },
    )
    .await;
    let apply = case.apply(&[
        "--acme-directory".into(),
        proxy.directory.clone(),
        "--acme-ca-bundle".into(),
        proxy.bundle.display().to_string(),
    ]);
    let before = pebble.orders();
    let (code, stdout, stderr) = envctl_off_runtime(cluster, apply).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 issued"), "{stdout}");
    assert!(
        proxy.hits.load(std::sync::atomic::Ordering::SeqCst) > 6,
        "the refusals were exercised"
    );
    assert_eq!(
        pebble.orders() - before,
        1,
        "one order, however many refusals"
    );
    case.cleanup(&client).await;
}

/// One order per environment, one writer per order: `envctl apply` beside `envctl run` on
/// the same 12 TLS environments. Whichever charges an environment first orders it; the other
/// reports it in progress and leaves that order alone. The CA sees 12 orders, and apply
/// reports no failure.
#[tokio::test(flavor = "multi_thread")]
async fn apply_beside_run_orders_once_per_environment() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "both", 12).await;
    // The objects first, so that both processes reach their certificate step at once.
    let (code, out, err) = envctl(cluster, &case.apply(&["--skip-certificates".into()]));
    assert_eq!(code, 0, "apply failed:\n{out}\n{err}");
    let before = pebble.orders();
    let log = dir.path().join("run.log");
    let mut run = spawn_run(cluster, &case.src, &case.common, pebble, &log);
    let (code, out, err) = envctl(cluster, &case.apply(&pebble.flags()));
    assert_eq!(
        code, 0,
        "apply beside run failed (a certificate both worked on?):\n{out}\n{err}"
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    case.wait_certificates(&client, Duration::from_secs(180), &read_log)
        .await;
    run.kill();
    let _ = run.wait();
    assert_eq!(
        pebble.orders() - before,
        case.names.len(),
        "one order per environment reached the CA\napply:\n{out}\nrun:\n{}",
        read_log()
    );
    eprintln!(
        "measure: apply beside run, 12 environments: {}",
        out.lines().last().unwrap_or_default()
    );
    case.cleanup(&client).await;
}

/// A ValidatingAdmissionPolicy (with its binding) that refuses creating or updating the
/// Secret `name`: the API server itself refuses envctl's write, as a policy engine would.
struct RefuseSecret {
    client: kube::Client,
    policy: String,
}

impl RefuseSecret {
    fn apis(
        client: &kube::Client,
    ) -> (Api<kube::api::DynamicObject>, Api<kube::api::DynamicObject>) {
        let api = |kind: &str| {
            Api::all_with(
                client.clone(),
                &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                    "admissionregistration.k8s.io",
                    "v1",
                    kind,
                )),
            )
        };
        (
            api("ValidatingAdmissionPolicy"),
            api("ValidatingAdmissionPolicyBinding"),
        )
    }

    /// Installs the policy and waits until the API server enforces it (a dry-run create of
    /// the Secret is refused).
    async fn install(client: &kube::Client, namespace: &str, name: &str) -> RefuseSecret {
        let policy = unique("refuse-secret");
        let (policies, bindings) = Self::apis(client);
        let p: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["secrets"],
                }]},
                "validations": [{
                    "expression": format!("object.metadata.name != '{name}' || object.metadata.namespace != '{namespace}'"),
                    "message": "test: the account store is failing",
                }],
            }
        }))
        .expect("a policy");
        let b: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]}
        }))
        .expect("a binding");
        policies
            .create(&PostParams::default(), &p)
            .await
            .expect("creating the policy");
        bindings
            .create(&PostParams::default(), &b)
            .await
            .expect("creating the binding");
        let refuse = RefuseSecret {
            client: client.clone(),
            policy,
        };
        refuse.wait_enforced(namespace, name, true).await;
        refuse
    }

    /// Whether a dry-run create of the Secret is refused, until it is `refused` (bounded).
    async fn wait_enforced(&self, namespace: &str, name: &str, refused: bool) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let probe: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "stringData": {"probe": "1"}
        }))
        .expect("a secret");
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        wait_until(
            if refused {
                "the policy in force"
            } else {
                "the policy lifted"
            },
            Duration::from_secs(30),
            &String::new,
            || async {
                let r = secrets.create(&dry, &probe).await;
                match r {
                    Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => refused,
                    Err(kube::Error::Api(e)) if e.code == 409 => !refused,
                    Ok(_) => !refused,
                    _ => false,
                }
            },
        )
        .await;
    }

    async fn remove(self, namespace: &str, name: &str) {
        let (policies, bindings) = Self::apis(&self.client);
        let _ = bindings
            .delete(&self.policy, &DeleteParams::default())
            .await;
        let _ = policies
            .delete(&self.policy, &DeleteParams::default())
            .await;
        self.wait_enforced(namespace, name, false).await;
    }
}

/// An account store that fails (the API server refuses to keep the account's Secret):
/// the controller retries with backoff and registers one account at the CA, not one per try;
/// once the store works again the account it registered is kept and certificates follow.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_account_store_registers_one_account() {
    let Some(Setup {
        cluster,
        pebble,
        _guard,
        client,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let case = Case::new(&client, dir.path(), "acct", 2).await;
    let account = format!("envctl-{}-acme-account", case.instance);
    let refuse = RefuseSecret::install(&client, &case.ctl_ns, &account).await;
    let before = pebble.accounts();
    let log = dir.path().join("run.log");
    let mut run = spawn_run(cluster, &case.src, &case.common, pebble, &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let failures = || read_log().matches("setting up certificates failed").count();
    // Three failed tries (at about 0, 5 and 15 s): each would have registered an account.
    wait_until(
        "three failed tries to keep the account",
        Duration::from_secs(90),
        &read_log,
        || async { failures() >= 3 },
    )
    .await;
    assert!(
        read_log().contains("test: the account store is failing"),
        "the refusal's message is in the log:\n{}",
        read_log()
    );
    refuse.remove(&case.ctl_ns, &account).await;
    case.wait_certificates(&client, Duration::from_secs(120), &read_log)
        .await;
    run.kill();
    let _ = run.wait();
    assert_eq!(
        pebble.accounts() - before,
        1,
        "one account registered across {} failed tries\n{}",
        failures(),
        read_log()
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &case.ctl_ns);
    assert!(
        secrets.get_opt(&account).await.expect("reading").is_some(),
        "the registered account is kept"
    );
    case.cleanup(&client).await;
}
