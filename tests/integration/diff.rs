//! Cluster tests of apply and diff against a real kube-apiserver (see `cluster`).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::{cleanup_instance, require, unique, wait_namespace_gone};
use crate::support::{check_golden, examples_renamed, repo_root};

/// Copies manifests from `from` to `to`, replacing `{{KEY}}` placeholders.
fn instantiate(from: &Path, to: &Path, vars: &[(&str, &str)]) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("creating a manifest folder");
    for entry in std::fs::read_dir(from).expect("listing manifests") {
        let path = entry.expect("reading an entry").path();
        let mut text = std::fs::read_to_string(&path).expect("reading a manifest");
        for (k, v) in vars {
            text = text.replace(&format!("{{{{{k}}}}}"), v);
        }
        let name = path.file_name().expect("a file name");
        std::fs::write(to.join(name), text).expect("writing a manifest");
    }
}

/// Puts placeholders back in place of this run's unique names and hashes.
fn placeholders(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out.replace(v, &format!("{{{{{k}}}}}"));
    }
    let marker = "desired-hash: ";
    let mut result = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find(marker) {
        result.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        let hex = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
        if hex == 16 {
            result.push_str("{{HASH}}");
            rest = &rest[hex..];
        }
    }
    result.push_str(rest);
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_apply_read_back_delete() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("cp");
    let env = unique("cp");
    let dir = tempfile::tempdir().expect("a temp dir");
    instantiate(
        &repo_root().join("tests/golden/diff-lifecycle/01-create/in"),
        dir.path(),
        &[("A", &env), ("B", &format!("{env}-b"))],
    );
    let (code, out, err) = cluster.envctl(
        dir.path(),
        &["apply", "--source", ".", "--instance", &instance],
    );
    assert_eq!(code, 0, "apply failed:\n{out}\n{err}");

    let ns = format!("environment-{env}");
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let got = sts
        .get("compute-cluster-0")
        .await
        .expect("reading the StatefulSet back");
    let labels = got.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("envctl")
    );
    assert_eq!(
        labels
            .get("environmentd.materialize.cloud/service-id")
            .map(String::as_str),
        Some("cluster-0")
    );
    assert_eq!(got.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let managers: Vec<(String, String)> = got
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("envctl".to_string(), "Apply".to_string())),
        "field manager envctl (Apply) missing: {managers:?}"
    );

    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    nsapi
        .delete(&ns, &Default::default())
        .await
        .expect("deleting the namespace");
    wait_namespace_gone(&client, &ns, Duration::from_secs(120)).await;
    cleanup_instance(&client, &instance).await;
}

/// The acceptance path of `envctl diff`: changes before apply, none after (no false
/// positives from server defaults), and a manual scale shows as a `replicas` change.
#[tokio::test(flavor = "multi_thread")]
async fn diff_is_exact_before_and_after_apply() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("exact");
    let dir = tempfile::tempdir().expect("a temp dir");
    // The examples, under names unique to this run.
    let names = examples_renamed(dir.path(), &unique("x"));
    let args = ["--source", ".", "--instance", instance.as_str()];
    let diff = |extra: &[&str]| {
        let mut a = vec!["diff"];
        a.extend(args);
        a.extend(extra);
        cluster.envctl(dir.path(), &a)
    };
    let (code, out, _) = diff(&[]);
    assert_eq!(code, 1, "diff before apply must report changes:\n{out}");
    assert!(
        out.contains("0 to update, 0 to delete, 0 unchanged"),
        "{out}"
    );

    let mut a = vec!["apply"];
    a.extend(args);
    let (code, out, err) = cluster.envctl(dir.path(), &a);
    assert_eq!(code, 0, "apply failed:\n{out}\n{err}");

    let (code, out, err) = diff(&[]);
    assert_eq!(
        code, 0,
        "diff right after apply must be empty:\n{out}\n{err}"
    );
    assert!(!out.contains("---"), "diff printed an object:\n{out}");
    assert!(
        out.starts_with("0 to create, 0 to update, 0 to delete, "),
        "{out}"
    );

    // A manual scale is drift: exactly one replicas change.
    let ns = format!(
        "environment-{}",
        names
            .iter()
            .find(|n| n.starts_with("acme-prod"))
            .expect("acme-prod")
    );
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    sts.patch(
        "compute-cluster-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 7}})),
    )
    .await
    .expect("scaling by hand");
    let (code, out, _) = diff(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("-  replicas: 7\n+  replicas: 2\n"), "{out}");
    assert!(
        out.contains("0 to create, 1 to update, 0 to delete"),
        "{out}"
    );

    cleanup_instance(&client, &instance).await;
}

/// Golden diffs (text and JSON) through a lifecycle: create, nothing to do, scale and label
/// change, removal of a service, a held and then an allowed removal of an environment.
#[tokio::test(flavor = "multi_thread")]
async fn diff_lifecycle_golden() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("life");
    let (a, b) = (unique("a"), unique("b"));
    let vars = [
        ("INSTANCE", instance.as_str()),
        ("A", a.as_str()),
        ("B", b.as_str()),
    ];
    let root = repo_root().join("tests/golden/diff-lifecycle");
    let mut steps: Vec<_> = std::fs::read_dir(&root)
        .expect("steps")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("in").is_dir())
        .collect();
    steps.sort();
    assert!(steps.len() >= 7, "{steps:?}");
    let work = tempfile::tempdir().expect("a temp dir");
    let mut failures = Vec::new();
    for step in &steps {
        instantiate(&step.join("in"), &work.path().join("in"), &vars);
        let extra: Vec<String> = std::fs::read_to_string(step.join("args"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let mut base = vec![
            "--source".to_string(),
            "in".into(),
            "--instance".into(),
            instance.clone(),
        ];
        base.extend(extra);
        for (format, file) in [("text", "diff.out"), ("json", "diff.json.out")] {
            let mut args = vec!["diff".to_string(), "-o".into(), format.into()];
            args.extend(base.iter().cloned());
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = cluster.envctl(work.path(), &argv);
            let transcript = placeholders(
                &format!("exit: {code}\n--- stdout\n{out}--- stderr\n{err}"),
                &vars,
            );
            if let Err(e) = check_golden(&step.join(file), &transcript) {
                failures.push(e);
            }
        }
        let mut args = vec!["apply".to_string()];
        args.extend(base.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = cluster.envctl(work.path(), &argv);
        assert_eq!(
            code,
            0,
            "apply of step {} failed:\n{out}\n{err}",
            step.display()
        );
        // A deleted environment's namespace must be gone before the next step reads.
        if step.ends_with("06-remove-environment") {
            wait_namespace_gone(
                &client,
                &format!("environment-{b}"),
                Duration::from_secs(120),
            )
            .await;
        }
    }
    cleanup_instance(&client, &instance).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn refs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// Runs `envctl ARGS` on a pseudo-terminal (util-linux `script`), where stdout and stderr
/// both are the terminal: (exit code, everything the terminal showed).
fn envctl_on_a_terminal(kubeconfig: &Path, dir: &Path, args: &[&str]) -> (i32, String) {
    let mut line = vec![env!("CARGO_BIN_EXE_envctl").to_string()];
    line.extend(args.iter().map(|a| a.to_string()));
    line.extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    let quoted: Vec<String> = line.iter().map(|a| format!("'{a}'")).collect();
    let out = std::process::Command::new("script")
        .args(["-qefc", &quoted.join(" "), "/dev/null"])
        .current_dir(dir)
        .env("ENVCTL_SKIP_CERTIFICATES", "1")
        .env("TERM", "xterm")
        .env_remove("KUBECONFIG")
        .output()
        .expect("running script (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `apply` and `diff` show their progress (phase, objects, environments) on a terminal, and
/// print nothing extra when the output is not a terminal or is JSON.
#[tokio::test(flavor = "multi_thread")]
async fn progress_shows_on_a_terminal_only() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let instance = unique("progress");
    let dir = tempfile::tempdir().expect("a temp dir");
    let names = crate::faults::write_fleet(dir.path(), &instance, 60, 1);
    let args = ["--source", ".", "--instance", instance.as_str()];
    let with = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut a = vec![cmd.to_string()];
        a.extend(args.iter().chain(extra).map(|s| s.to_string()));
        a
    };

    // On a terminal: the bar, with its phases, then the summary.
    let apply = with("apply", &[]);
    let (code, shown) = envctl_on_a_terminal(&cluster.kubeconfig, dir.path(), &refs(&apply));
    assert_eq!(code, 0, "{shown}");
    for phase in [
        "observe: 60 environment(s)",
        "apply: 60 environment(s)",
        "/600 objects",
    ] {
        assert!(
            shown.contains(phase),
            "no {phase:?} on the terminal:\n{shown}"
        );
    }
    // A change to every environment: diff asks the server (dry-run) about each one.
    let _ = crate::faults::write_fleet(dir.path(), &instance, 60, 2);
    let diff = with("diff", &[]);
    let (code, shown) = envctl_on_a_terminal(&cluster.kubeconfig, dir.path(), &refs(&diff));
    assert_eq!(code, 1, "{shown}");
    assert!(shown.contains("dry-run: 60 environment(s)"), "{shown}");

    // On a terminal with -o json: JSON and nothing else.
    let json = with("diff", &["-o", "json"]);
    let (code, shown) = envctl_on_a_terminal(&cluster.kubeconfig, dir.path(), &refs(&json));
    assert_eq!(code, 1, "{shown}");
    assert!(!shown.contains("environment(s)"), "{shown}");
    let parsed: serde_json::Value =
        serde_json::from_str(shown.trim()).unwrap_or_else(|e| panic!("{e}: {shown:?}"));
    assert!(parsed.is_object());

    // Not a terminal: stderr stays empty.
    let (code, out, err) = cluster.envctl(dir.path(), &refs(&diff));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.trim().is_empty(), "stderr without a terminal: {err:?}");
    // Each environment's StatefulSet, and its ResourceQuota, which follows the scale.
    assert!(
        out.contains(&format!("{} to update", 2 * names.len())),
        "{out}"
    );
    cleanup_instance(&client, &instance).await;
}
