//! Health on the kwok nodes of the local control plane (kube-scheduler places pods, kwok
//! plays their lifecycle from `scripts/kwok/stages.yaml`): `envctl apply --wait` until the
//! example fleet is Ready, an unschedulable environment, an image that cannot be had, a
//! container that crash-loops, a pod that never becomes Ready, and what `envctl status`
//! says of each.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::cluster::{cleanup_instance, require, unique};

/// A small environment (the kwok nodes have 96 CPUs each by default).
pub fn small_env(name: &str, labels: &str, image_tag: &str, cpu: &str, extra: &str) -> String {
    format!(
        "apiVersion: envctl.materialize.cloud/v1alpha1
kind: Environment
metadata:
  name: {name}
  labels: {{{labels}}}
spec:
  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11
  region: aws/us-east-1
  hostname: {name}.example.cloud
  tls: {{enabled: false}}
  environmentd:
    image: materialize/environmentd:{image_tag}
    cpu: 10m
    memory: 16Mi{extra}
  services:
    compute:
      - {{id: cluster-0, image: \"materialize/clusterd:{image_tag}\", scale: 2, cpu: \"{cpu}\", memory: 16Mi}}
    storage:
      - {{id: runtime, image: \"materialize/clusterd:{image_tag}\", scale: 1, cpu: 10m, memory: 16Mi}}
"
    )
}

fn status_json(
    cluster: &crate::cluster::TestCluster,
    dir: &Path,
    instance: &str,
) -> serde_json::Value {
    let (code, out, err) = cluster.envctl(dir, &["status", "--instance", instance, "-o", "json"]);
    assert_eq!(code, 0, "envctl status failed: {err}");
    serde_json::from_str(&out).expect("status -o json is JSON")
}

fn health_of<'a>(status: &'a serde_json::Value, env: &str) -> (&'a str, &'a str, &'a str) {
    let row = status["environments"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["environment"] == env))
        .unwrap_or_else(|| panic!("{env} is not in envctl status: {status}"));
    (
        row["health"].as_str().unwrap_or(""),
        row["reason"].as_str().unwrap_or(""),
        row["message"].as_str().unwrap_or(""),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_waits_for_ready_and_names_what_is_not() {
    let Some(cluster) = require() else { return };
    let _pods = crate::cluster::pods_lock().await;
    let client = cluster.client().await;
    let instance = unique("hw");
    let dir = tempfile::tempdir().expect("a temp dir");
    // The example fleet as the README's quickstart applies it: every service, scale and
    // request as written (the default nodes are sized for it).
    let fleet = crate::support::examples_renamed(dir.path(), &unique("h"));
    // One environmentd per environment plus every service's scale.
    let mut pods_wanted = fleet.len();
    for entry in std::fs::read_dir(dir.path()).expect("the fleet") {
        let text = std::fs::read_to_string(entry.expect("an entry").path()).expect("a manifest");
        pods_wanted += text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("scale: "))
            .filter_map(|n| n.parse::<usize>().ok())
            .sum::<usize>();
    }
    let source = dir.path().to_str().expect("utf-8 path");
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "apply",
            "--source",
            source,
            "--instance",
            &instance,
            "--skip-certificates",
        ];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let out = cluster.envctl(dir.path(), &args);
        (out, started.elapsed())
    };

    // 1. The fleet: every environment becomes Ready, and apply says so.
    let ((code, _, err), took) = apply(&["--wait", "--timeout", "180s"]);
    assert_eq!(code, 0, "apply --wait failed: {err}");
    assert!(
        err.contains(&format!("{} environment(s) Ready after", fleet.len())),
        "{err}"
    );
    let pods: Api<Pod> = Api::all(client.clone());
    let running = pods
        .list(
            &ListParams::default().labels(&format!("envctl.materialize.cloud/instance={instance}")),
        )
        .await
        .expect("listing pods")
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    assert_eq!(running, pods_wanted, "every pod of the fleet runs");
    eprintln!(
        "measure: apply --wait of the example fleet ({} environments, {running} pods) to all Ready: {took:.1?}",
        fleet.len()
    );
    let status = status_json(cluster, dir.path(), &instance);
    for name in &fleet {
        let (health, reason, _) = health_of(&status, name);
        assert_eq!((health, reason), ("Ready", "AllReady"), "{status}");
        let row = status["environments"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["environment"] == name.as_str()))
            .expect("a row");
        assert!(
            row["revision"]
                .as_str()
                .is_some_and(|r| r.starts_with("dir-")),
            "apply records the directory's digest as the revision: {row}"
        );
        assert_eq!(row["state"], "applied", "{row}");
        assert!(row["applied_at"].as_str().is_some_and(|t| !t.is_empty()));
    }

    // 2. A CPU request no node has: --wait fails and names it with the scheduler's reason,
    // while the fleet stays Ready.
    let hungry = unique("cpu");
    std::fs::write(
        dir.path().join(format!("{hungry}.yaml")),
        small_env(&hungry, "team: data", "v1", "500", ""),
    )
    .expect("writing a manifest");
    let ((code, _, err), took) = apply(&["--wait", "--timeout", "20s"]);
    assert_ne!(
        code, 0,
        "apply --wait succeeded with an unschedulable environment"
    );
    assert!(
        err.contains("did not become Ready within 20s") && err.contains(&hungry),
        "{err}"
    );
    assert!(
        err.contains("Insufficient cpu"),
        "the scheduler's reason: {err}"
    );
    assert!(
        took >= Duration::from_secs(20),
        "waited the timeout: {took:?}"
    );
    for name in &fleet {
        assert!(
            !err.contains(name.as_str()),
            "only the unready one is named: {err}"
        );
    }
    let status = status_json(cluster, dir.path(), &instance);
    let (health, reason, message) = health_of(&status, &hungry);
    assert_eq!(
        (health, reason),
        ("Progressing", "Unschedulable"),
        "{status}"
    );
    assert!(message.contains("Insufficient cpu"), "{message}");
    // Past the progress deadline the same environment is Degraded.
    let (code, out, err) = cluster.envctl(
        dir.path(),
        &[
            "status",
            "--instance",
            &instance,
            "--progress-deadline",
            "1s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(hungry.as_str()))
        .unwrap_or_else(|| panic!("{hungry} in the table: {out}"));
    assert!(
        line.contains("Degraded") && line.contains("past the 1s deadline"),
        "{line}"
    );
    std::fs::remove_file(dir.path().join(format!("{hungry}.yaml"))).expect("removing");

    // 3. An image the node cannot have (pull policy Never, never pulled there): Degraded at
    // once, and --wait stops without waiting for its timeout.
    let broken = unique("img");
    let tag = format!("never-pulled-{broken}");
    std::fs::write(
        dir.path().join(format!("{broken}.yaml")),
        small_env(
            &broken,
            "team: data",
            &tag,
            "10m",
            "\n    imagePullPolicy: Never",
        ),
    )
    .expect("writing a manifest");
    let ((code, _, err), took) = apply(&["--wait", "--timeout", "120s"]);
    assert_ne!(
        code, 0,
        "apply --wait succeeded with an image that cannot be had"
    );
    assert!(
        err.contains(&broken)
            && err.contains("Degraded (ImagePull)")
            && err.contains("ErrImageNeverPull"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(100),
        "stopped at Degraded, not the timeout: {took:?}"
    );
    eprintln!("measure: apply --wait to Degraded for an image that cannot be had: {took:.1?}");
    std::fs::remove_file(dir.path().join(format!("{broken}.yaml"))).expect("removing");

    // 4. A container that crash-loops (kwok's crash-loop stage, chosen by the image tag):
    // Degraded at once with the kubelet's reason.
    let crashing = unique("crash");
    std::fs::write(
        dir.path().join(format!("{crashing}.yaml")),
        small_env(&crashing, "team: data", "v1-crash-loop", "10m", ""),
    )
    .expect("writing a manifest");
    let ((code, _, err), took) = apply(&["--wait", "--timeout", "120s"]);
    assert_ne!(
        code, 0,
        "apply --wait succeeded with a crash-looping container"
    );
    assert!(
        err.contains(&crashing)
            && err.contains("Degraded (CrashLoop)")
            && err.contains("CrashLoopBackOff"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(100),
        "stopped at Degraded, not the timeout: {took:?}"
    );
    std::fs::remove_file(dir.path().join(format!("{crashing}.yaml"))).expect("removing");

    // 5. Pods that run but never become Ready: --wait names them when its time is up, and
    // past the progress deadline the environment is Degraded.
    let unready = unique("unready");
    std::fs::write(
        dir.path().join(format!("{unready}.yaml")),
        small_env(&unready, "team: data", "never-ready", "10m", ""),
    )
    .expect("writing a manifest");
    let ((code, _, err), _) = apply(&["--wait", "--timeout", "15s"]);
    assert_ne!(
        code, 0,
        "apply --wait succeeded with pods that are never Ready"
    );
    assert!(
        err.contains("did not become Ready within 15s")
            && err.contains(&unready)
            && err.contains("not ready"),
        "{err}"
    );
    let status = status_json(cluster, dir.path(), &instance);
    let (health, reason, message) = health_of(&status, &unready);
    assert_eq!((health, reason), ("Progressing", "PodNotReady"), "{status}");
    assert!(message.contains("Running and not ready"), "{message}");
    let (code, out, err) = cluster.envctl(
        dir.path(),
        &[
            "status",
            "--instance",
            &instance,
            "--progress-deadline",
            "1s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(unready.as_str()))
        .unwrap_or_else(|| panic!("{unready} in the table: {out}"));
    assert!(
        line.contains("Degraded") && line.contains("ProgressDeadlineExceeded"),
        "{line}"
    );

    cleanup_instance(&client, &instance).await;
}
