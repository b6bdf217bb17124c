//! One fleet across regions (issue 34): the main test cluster is region A's, a control plane
//! of its own is region B's. One source for both; each region's envctl (`--region`) holds
//! exactly its own environments, and a move between regions creates the environment in the
//! new region and deletes it in the old one only with `--prune`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::certs::{Setup, controller_namespace, setup};
use crate::cluster::{OwnPlane, TestCluster, cleanup_instance, require, unique};
use crate::support::{Controller, wait_until};

const A: &str = "aws/us-east-1";
const B: &str = "aws/eu-west-1";

/// Region B's control plane, started once for the fleet tests (stopped by scripts/test).
pub async fn region_b() -> tokio::sync::MutexGuard<'static, Option<OwnPlane>> {
    static PLANE: tokio::sync::Mutex<Option<OwnPlane>> = tokio::sync::Mutex::const_new(None);
    let mut guard = PLANE.lock().await;
    if guard.is_none() {
        *guard = Some(
            tokio::task::spawn_blocking(|| OwnPlane::start("region-b", &[]))
                .await
                .expect("starting region B's control plane"),
        );
    }
    guard
}

/// Writes environment `name` of `region`, without TLS.
fn write_env(dir: &Path, name: &str, region: &str) {
    write_tls_env(dir, name, region, None);
}

/// Writes environment `name` of `region`, with a certificate for `hostname` if given.
fn write_tls_env(dir: &Path, name: &str, region: &str, hostname: Option<&str>) {
    let host = match hostname {
        Some(h) => format!("  hostname: {h}\n"),
        None => format!("  hostname: {name}.example.test\n  tls: {{enabled: false}}\n"),
    };
    let text = format!(
        "apiVersion: envctl.materialize.cloud/v1alpha1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11\n  region: {region}\n{host}  environmentd:\n    image: materialize/environmentd:v0.130.0\n"
    );
    std::fs::write(dir.join(format!("{name}.yaml")), text).expect("writing a manifest");
}

/// The instance's environments with a namespace in the cluster that is not being deleted.
async fn held(client: &Client, instance: &str) -> BTreeSet<String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let selector = format!("{}={instance}", envctl::render::INSTANCE_LABEL);
    api.list(&ListParams::default().labels(&selector))
        .await
        .expect("listing namespaces")
        .items
        .into_iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| {
            ns.metadata
                .labels?
                .get(envctl::render::ENVIRONMENT_LABEL)
                .cloned()
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `envctl ARGS --instance I --source DIR` against `cluster`, which must exit `code`.
fn envctl(cluster: &TestCluster, dir: &Path, instance: &str, args: &[&str], code: i32) -> String {
    let mut all = args.to_vec();
    all.extend(["--instance", instance, "--source", "src"]);
    let (got, out, err) = cluster.envctl(dir, &all);
    assert_eq!(got, code, "envctl {all:?}: exit {got}\n{out}\n{err}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn each_region_holds_exactly_its_own_environments() {
    let Some(a) = require() else { return };
    let plane = region_b().await;
    let b = &plane.as_ref().expect("region B's plane").cluster;
    let (ca, cb) = (a.client().await, b.client().await);
    let instance = unique("fleet");
    let tmp = tempfile::tempdir().expect("a temporary folder");
    let dir = tmp.path();
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("a manifest folder");
    let (a0, a1, b0, b1) = (
        format!("{instance}-a0"),
        format!("{instance}-a1"),
        format!("{instance}-b0"),
        format!("{instance}-b1"),
    );
    for (name, region) in [(&a0, A), (&a1, A), (&b0, B), (&b1, B)] {
        write_env(&src, name, region);
    }

    // Each region's apply creates its own environments, and nothing of the other region's.
    let out = envctl(a, dir, &instance, &["apply", "--region", A], 0);
    assert!(!out.contains(&b0) && !out.contains(&b1), "{out}");
    envctl(b, dir, &instance, &["apply", "--region", B], 0);
    assert_eq!(held(&ca, &instance).await, set(&[&a0, &a1]));
    assert_eq!(held(&cb, &instance).await, set(&[&b0, &b1]));
    // A diff of one region sees nothing to do, and says nothing of the other's.
    let out = envctl(a, dir, &instance, &["diff", "--region", A], 0);
    assert!(
        out.contains("0 to create, 0 to update, 0 to delete"),
        "{out}"
    );
    // `status --region` shows the region's environments only; `-o json` names the region.
    let (code, out, err) = a.envctl(
        dir,
        &[
            "status",
            "--instance",
            &instance,
            "--region",
            A,
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let rows: Vec<(String, String)> = json["environments"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["environment"].as_str().unwrap_or("").to_string(),
                r["region"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [(a0.clone(), A.to_string()), (a1.clone(), A.to_string())]
    );
    let (code, out, _) = a.envctl(dir, &["status", "--instance", &instance, "--region", B]);
    assert_eq!(code, 0);
    assert!(!out.contains(&a0), "{out}");

    // a1 moves to region B: created there; in A it stays until a --prune run deletes it.
    write_env(&src, &a1, B);
    envctl(b, dir, &instance, &["apply", "--region", B], 0);
    assert_eq!(held(&cb, &instance).await, set(&[&a1, &b0, &b1]));
    let out = envctl(a, dir, &instance, &["apply", "--region", A], 0);
    assert!(out.contains("would be deleted with --prune"), "{out}");
    assert!(
        out.contains(&format!("note: environment {a1} is now in region {B}")),
        "{out}"
    );
    assert_eq!(held(&ca, &instance).await, set(&[&a0, &a1]));
    // The usual guards hold: --max-prune 0 holds the delete.
    let out = envctl(
        a,
        dir,
        &instance,
        &["apply", "--region", A, "--prune", "--max-prune", "0"],
        0,
    );
    assert!(
        out.contains(&format!("held Namespace environment-{a1}: not deleted")),
        "{out}"
    );
    assert_eq!(held(&ca, &instance).await, set(&[&a0, &a1]));
    envctl(a, dir, &instance, &["apply", "--region", A, "--prune"], 0);
    assert_eq!(held(&ca, &instance).await, set(&[&a0]));

    // One cluster that held every region's environments (applied without --region): a
    // region's --prune leaves the other region's alone, though it does not serve them.
    envctl(b, dir, &instance, &["apply"], 0);
    let out = envctl(b, dir, &instance, &["apply", "--region", B, "--prune"], 0);
    assert!(out.contains("0 to delete"), "{out}");
    assert_eq!(held(&cb, &instance).await, set(&[&a0, &a1, &b0, &b1]));

    // `envctl run --region` serves its region alone too (environments of its own: a
    // namespace is named after its environment, whatever the instance).
    let run_instance = unique("fleet-run");
    let run_src = dir.join("run-src");
    std::fs::create_dir_all(&run_src).expect("a manifest folder");
    let (x, y) = (format!("{run_instance}-x"), format!("{run_instance}-y"));
    write_env(&run_src, &x, B);
    write_env(&run_src, &y, A);
    let log = dir.join("run.log");
    let mut run = Controller::run(
        &a.kubeconfig,
        [
            "--instance",
            &run_instance,
            "--source",
            &run_src.display().to_string(),
            "--region",
            B,
            "--interval",
            "1s",
        ],
    )
    .log(&log)
    .start();
    let want = set(&[&x]);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        &format!("run --region {B} to hold region B's environments"),
        Duration::from_secs(60),
        &logged,
        || async { held(&ca, &run_instance).await == want },
    )
    .await;
    run.kill();

    for i in [&instance, &run_instance] {
        cleanup_instance(&ca, i).await;
        cleanup_instance(&cb, i).await;
    }
}

/// Static shares (`--acme-limit-share 1/2` in each of two regions, no home cluster): with a
/// registered-domain limit of 5 and 12 TLS environments across the two regions, each
/// region issues its share, floor(5 / 2) = 2, and the fleet 4 in all (pebble's own log is
/// the record); `quota` shows each region's share.
#[tokio::test(flavor = "multi_thread")]
async fn static_shares_keep_the_fleet_within_the_limit() {
    let Some(Setup {
        cluster: a,
        pebble,
        _guard,
        client: ca,
        dir,
    }) = setup(true).await
    else {
        return;
    };
    let plane = region_b().await;
    let b = &plane.as_ref().expect("region B's plane").cluster;
    let cb = b.client().await;
    let instance = unique("share");
    let domain = format!("{instance}.test");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("a manifest folder");
    for i in 0..12 {
        let (region, tag) = if i % 2 == 0 { (A, "a") } else { (B, "b") };
        let name = format!("{instance}-{tag}{i}");
        write_tls_env(&src, &name, region, Some(&format!("{name}.{domain}")));
    }
    let ctl = format!("{instance}-ctl");
    controller_namespace(&ca, &ctl).await;
    controller_namespace(&cb, &ctl).await;
    let common = |region: &str| {
        let mut v: Vec<String> = [
            "--instance",
            &instance,
            "--controller-namespace",
            &ctl,
            "--region",
            region,
            "--acme-limit-override",
            &format!("{domain}=5/168h"),
            "--acme-limit-share",
            "1/2",
        ]
        .map(String::from)
        .to_vec();
        v.extend(pebble.flags());
        v
    };
    let before = pebble.issued();
    let apply_in = |cluster: &TestCluster, region: &str| {
        let mut args = vec![
            "apply".to_string(),
            "--source".into(),
            src.display().to_string(),
        ];
        args.extend(common(region));
        let (code, out, err) = crate::certs::envctl(cluster, &args);
        assert_eq!(code, 0, "apply in {region}:\n{out}\n{err}");
        out
    };
    for (cluster, region) in [(a, A), (b, B)] {
        let out = apply_in(cluster, region);
        assert!(out.contains("2 issued, 4 waiting"), "{region}: {out}");
    }
    assert_eq!(
        pebble.issued() - before,
        4,
        "each region issues its share of 5 (2), no more"
    );
    // Again in both: nothing more is issued.
    for (cluster, region) in [(a, A), (b, B)] {
        apply_in(cluster, region);
    }
    assert_eq!(pebble.issued() - before, 4, "a second apply issued more");
    // Each region's ledger measures the domain against its share, and records it.
    let q = crate::certs::quota(
        b,
        &["--instance", &instance, "--controller-namespace", &ctl].map(String::from),
    );
    assert_eq!(
        crate::certs::bucket(&q, "new-certificates-per-registered-domain", &domain),
        (2, 0),
        "{q}"
    );
    assert_eq!(
        q["limits"]["share"],
        serde_json::json!({"part": 1, "of": 2}),
        "{q}"
    );

    for c in [&ca, &cb] {
        cleanup_instance(c, &instance).await;
        let api: Api<Namespace> = Api::all(c.clone());
        let _ = api.delete(&ctl, &Default::default()).await;
    }
}
