//! The compatibility smoke: the oldest Kubernetes the project supports
//! (`ENVCTL_K8S_OLDEST_VERSION` in `scripts/versions`), on a control plane of its own
//! (`ENVCTL_TEST_COMPAT_KUBECONFIG`, which `scripts/test` starts, or one started here).
//! Validate, apply with a certificate from pebble, `diff` exiting 0 after it, `run`
//! reverting drift, and prune.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::{OwnPlane, TestCluster, wait_namespace_gone};
use crate::support::{repo_root, wait_until};

/// The oldest supported version, as `scripts/versions` pins it.
fn oldest_version() -> String {
    let text = std::fs::read_to_string(repo_root().join("scripts/versions"))
        .expect("reading scripts/versions");
    text.lines()
        .find_map(|l| l.strip_prefix("ENVCTL_K8S_OLDEST_VERSION="))
        .map(|v| v.trim().to_string())
        .expect("ENVCTL_K8S_OLDEST_VERSION in scripts/versions")
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_on_the_oldest_supported_kubernetes() {
    let version = oldest_version();
    let Some(pebble) = crate::certs::pebble(true) else {
        return;
    };
    // The plane scripts/test started, or one of this test's own.
    let (cluster, _own) = match std::env::var_os("ENVCTL_TEST_COMPAT_KUBECONFIG") {
        Some(path) => (
            TestCluster {
                kubeconfig: PathBuf::from(path),
            },
            None,
        ),
        None => {
            let v = version.clone();
            let plane = tokio::task::spawn_blocking(move || {
                OwnPlane::start(
                    "compat",
                    &[("ENVCTL_K8S_VERSION", &v), ("ENVCTL_NODES", "1")],
                )
            })
            .await
            .expect("starting the compatibility plane");
            (
                TestCluster {
                    kubeconfig: plane.cluster.kubeconfig.clone(),
                },
                Some(plane),
            )
        }
    };
    let client = cluster.client().await;
    let server = client
        .apiserver_version()
        .await
        .expect("the server's version");
    assert_eq!(
        server.git_version,
        format!("v{version}"),
        "the compatibility plane runs the oldest supported version"
    );
    let _guard = crate::certs::lock().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let case = crate::certs::Case::new(&client, dir.path(), "compat", 2).await;
    let src = case.src.display().to_string();
    let run = |args: Vec<String>| crate::certs::envctl(&cluster, &args);

    // validate, then apply with certificates from pebble.
    let validate = std::process::Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["validate", &src])
        .output()
        .expect("running envctl validate");
    assert!(
        validate.status.success(),
        "validate failed: {}",
        String::from_utf8_lossy(&validate.stderr)
    );
    let orders = pebble.orders();
    let (code, out, err) = run(case.apply(&pebble.flags()));
    assert_eq!(code, 0, "apply failed on v{version}:\n{out}\n{err}");
    for name in &case.names {
        let secret = crate::certs::tls_secret(&client, &format!("environment-{name}")).await;
        assert!(secret.is_some(), "{name} has its certificate on v{version}");
    }
    assert_eq!(pebble.orders() - orders, case.names.len(), "one order each");

    // Nothing to change right after the apply.
    let diff = vec![
        "diff".to_string(),
        "--source".into(),
        src.clone(),
        "--instance".into(),
        case.instance.clone(),
    ];
    let (code, out, err) = run(diff);
    assert_eq!(
        code, 0,
        "diff after apply found changes on v{version}:\n{out}\n{err}"
    );

    // `run` reverts drift.
    let name = &case.names[0];
    let ns = format!("environment-{name}");
    let mut extra: Vec<&str> = vec!["--controller-namespace", &case.ctl_ns];
    extra.push("--skip-certificates");
    let mut controller =
        crate::gitops::run_on(&cluster, &["--source", &src], &case.instance, "1s", &extra);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let replicas = |s: &StatefulSet| s.spec.as_ref().and_then(|s| s.replicas);
    let wanted = replicas(&sts.get("environmentd").await.expect("environmentd"));
    wait_until(
        "the controller's first pass",
        Duration::from_secs(60),
        &|| controller.log(),
        || async { controller.log().contains("reconciled") },
    )
    .await;
    sts.patch(
        "environmentd",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scaling environmentd by hand");
    wait_until(
        "run to revert the drift",
        Duration::from_secs(60),
        &|| controller.log(),
        || async {
            sts.get("environmentd")
                .await
                .is_ok_and(|s| replicas(&s) == wanted)
        },
    )
    .await;
    controller.kill();

    // Prune: the removed environment's namespace goes.
    std::fs::remove_file(case.src.join(format!("{name}.yaml"))).expect("removing a manifest");
    let (code, out, err) = run(case.apply(&[
        "--prune".to_string(),
        "--max-prune".into(),
        "1".into(),
        "--skip-certificates".into(),
    ]));
    assert_eq!(code, 0, "apply --prune failed on v{version}:\n{out}\n{err}");
    wait_namespace_gone(&client, &ns, Duration::from_secs(120)).await;
    case.cleanup(&client).await;
}
