//! The chart's RBAC is enough, and no more: envctl runs as the chart's ServiceAccount on the
//! test cluster (the chart rendered by real Helm through `tests/chart/render.py`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::discovery::Discovery;

use crate::cluster::{cleanup_instance, require, unique, wait_namespace_gone};
use crate::support::{Controller, examples_renamed, repo_root};

#[tokio::test(flavor = "multi_thread")]
async fn envctl_runs_as_the_charts_service_account() {
    let Some(cluster) = require() else { return };
    let Some(pebble) = crate::certs::pebble(true) else {
        return;
    };
    let _guard = crate::certs::lock().await;
    let client = cluster.client().await;
    let id = unique("chart");
    let (release, namespace, instance) = (id.clone(), format!("{id}-system"), id.clone());

    // Install the chart with the Helm CLI, its admission policy in force: the API server
    // takes every template (the PodDisruptionBudget and the policy with its binding among
    // them) and --wait holds until the Deployment's pods are scheduled on kwok nodes and Ready.
    let install = helm(
        cluster,
        &[
            "install",
            &release,
            &chart_dir(),
            "--namespace",
            &namespace,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
            "--set",
            "source.url=https://git.example.invalid/envs.git",
            "--set",
            &format!("instance={instance}"),
            // Sharding's Lease rules too (leader election's are always there): both modes
            // run as this ServiceAccount below.
            "--set",
            "sharding.enabled=true",
            "--set",
            "admissionPolicy.enabled=true",
        ],
    );
    assert!(install.0, "helm install failed:\n{}", install.1);
    let docs = release_manifest(cluster, &release, &namespace);
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &namespace);
    let running: Vec<_> = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .expect("listing the release's pods")
        .items
        .into_iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n.starts_with("kwok-node-"))
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect();
    assert_eq!(
        running.len(),
        3,
        "the Deployment's 3 replicas run on kwok nodes"
    );

    // A token for the ServiceAccount, from the TokenRequest API (no token Secret is made for
    // a ServiceAccount since Kubernetes 1.24).
    let sa_name = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("a ServiceAccount")
        .to_string();
    let token = crate::cluster::service_account_token(&client, &namespace, &sa_name).await;
    let mut kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig).expect("the admin kubeconfig");
    for user in &mut kubeconfig.auth_infos {
        if let Some(auth) = user.auth_info.as_mut() {
            auth.token = Some(token.clone().into());
            auth.client_certificate_data = None;
            auth.client_key_data = None;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sa_kubeconfig = dir.path().join("sa.kubeconfig");
    std::fs::write(
        &sa_kubeconfig,
        serde_json::to_string(&kubeconfig).expect("kubeconfig"),
    )
    .expect("write");

    // The examples, under names unique to this test.
    let source = dir.path().join("envs");
    let names = examples_renamed(&source, &id[id.len() - 4..]);
    // What the chart's Deployment tells envctl about its roles: environmentd's ClusterRole,
    // and its own RoleBinding in each environment (the in-environments ClusterRole and its
    // ServiceAccount), through which it reaches its TLS Secrets.
    let deployment_env = |name: &str| -> String {
        docs.iter()
            .find(|d| d["kind"] == "Deployment")
            .and_then(|d| d["spec"]["template"]["spec"]["containers"][0]["env"].as_array())
            .and_then(|env| {
                env.iter()
                    .find(|e| e["name"] == name)
                    .and_then(|e| e["value"].as_str())
            })
            .unwrap_or_else(|| panic!("the Deployment sets {name}"))
            .to_string()
    };
    let environmentd_role = deployment_env("ENVCTL_ENVIRONMENTD_CLUSTER_ROLE");
    let role_env: Vec<(&str, String)> = [
        "ENVCTL_ENVIRONMENTD_CLUSTER_ROLE",
        "ENVCTL_ENVCTL_CLUSTER_ROLE",
        "ENVCTL_ENVCTL_SERVICE_ACCOUNT",
    ]
    .into_iter()
    .map(|k| (k, deployment_env(k)))
    .collect();
    assert_eq!(
        role_env[2].1,
        format!("{namespace}/{sa_name}"),
        "envctl binds its own ServiceAccount"
    );
    let envctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_envctl"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&sa_kubeconfig)
            .env_remove("KUBECONFIG")
            .envs(role_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("running envctl")
    };
    let src = source.to_str().expect("utf-8 path");
    // Certificates included: from pebble, with the account, ledger and copies in the
    // release namespace, as the chart's Role allows.
    let acme: Vec<String> = pebble
        .flags()
        .into_iter()
        .chain(["--controller-namespace".to_string(), namespace.clone()])
        .collect();
    let acme: Vec<&str> = acme.iter().map(String::as_str).collect();
    let mut apply = vec!["apply", "--source", src, "--instance", &instance];
    apply.extend(&acme);
    let out = envctl(&apply);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "apply as the ServiceAccount failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tls_envs = names
        .iter()
        .filter(|n| !stdout.contains(&format!("certificate {n}:")))
        .count();
    assert!(
        stdout.contains("3 issued") && tls_envs == names.len() - 3,
        "every TLS example gets a certificate as the ServiceAccount:\n{stdout}"
    );
    for n in &names {
        if stdout.contains(&format!("certificate {n}: issued")) {
            let s: Api<Secret> = Api::namespaced(client.clone(), &format!("environment-{n}"));
            assert!(
                s.get_opt("environment-tls")
                    .await
                    .expect("reading")
                    .is_some(),
                "no environment-tls for {n}"
            );
        }
    }
    // `envctl diff` as the ServiceAccount finds nothing to change.
    let in_sync = || {
        let out = envctl(&["diff", "--source", src, "--instance", &instance]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    in_sync();

    // `envctl run` with leader election in the release namespace, as the ServiceAccount.
    let log = dir.path().join("run.log");
    let mut args: Vec<String> = [
        "--source",
        src,
        "--instance",
        &instance,
        "--interval",
        "1s",
        "--leader-elect",
        "--leader-elect-namespace",
        &namespace,
    ]
    .map(String::from)
    .to_vec();
    args.extend(acme.iter().map(|a| a.to_string()));
    let mut run = Controller::run(&sa_kubeconfig, args)
        .log(&log)
        .envs(&role_env)
        .start();
    let mut led = false;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("became the leader")
            && text.contains("reconciled")
            && text.contains("certificates")
        {
            led = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.kill();
    let _ = run.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        led,
        "envctl run did not lead and reconcile as the ServiceAccount:\n{text}"
    );
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden"),
        "a request was forbidden:\n{text}"
    );

    // `envctl run --shard` as the ServiceAccount: its member Lease created, renewed and
    // listed, a pass once the membership held, and the Lease deleted on SIGTERM.
    let log = dir.path().join("shard.log");
    let args = [
        "--source",
        src,
        "--instance",
        &instance,
        "--interval",
        "1s",
        "--shard",
        "--leader-elect-lease",
        "3s",
        "--leader-elect-namespace",
        &namespace,
        "--leader-elect-identity",
        "chart-replica-0",
        "--controller-namespace",
        &namespace,
    ];
    let mut run = Controller::run(&sa_kubeconfig, args)
        .log(&log)
        .envs(&role_env)
        .start();
    let mut sharded = false;
    for _ in 0..150 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("shard members changed") && text.contains("trigger=Shard") {
            sharded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &run.pid().to_string()])
        .status();
    let _ = run.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        sharded && text.contains("left the shard"),
        "envctl run --shard did not join, reconcile and leave as the ServiceAccount:\n{text}"
    );
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden"),
        "a request was forbidden:\n{text}"
    );

    // The same identity may not read Secrets elsewhere.
    let sa_client = envctl::cluster::connect(Some(Path::new(&sa_kubeconfig)))
        .await
        .expect("SA client");
    let system: Api<Secret> = Api::namespaced(sa_client.clone(), "kube-system");
    match system.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!(
            "listing Secrets in kube-system was not refused: {:?}",
            other.map(|l| l.items.len())
        ),
    }

    // Least privilege: no Role writes, no binding of anything but environmentd's
    // ClusterRole, no Secrets outside what envctl owns.
    let env_ns = format!("environment-{}", names[0]);
    let forbidden = |what: &str, r: Result<serde_json::Value, kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what} was not refused: {other:?}"),
    };
    let roles: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        &env_ns,
        &kube::api::ApiResource::erase::<k8s_openapi::api::rbac::v1::Role>(&()),
    );
    let secret_role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "environmentd", "namespace": env_ns},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]
    });
    let as_dynamic = |v: &serde_json::Value| -> DynamicObject {
        serde_json::from_value(v.clone()).expect("an object")
    };
    forbidden(
        "creating a Role that grants Secrets",
        roles
            .create(&PostParams::default(), &as_dynamic(&secret_role))
            .await
            .map(|o| serde_json::to_value(o).unwrap_or_default()),
    );
    forbidden(
        "server-side applying a Role that grants Secrets",
        roles
            .patch(
                "environmentd",
                &PatchParams::apply("envctl").force(),
                &Patch::Apply(&secret_role),
            )
            .await
            .map(|o| serde_json::to_value(o).unwrap_or_default()),
    );
    let bindings: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        &env_ns,
        &kube::api::ApiResource::erase::<k8s_openapi::api::rbac::v1::RoleBinding>(&()),
    );
    // admin, edit and view are aggregated ClusterRoles: wait until the controller-manager
    // has filled them in (an empty role is trivially "held", so binding it proves nothing).
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    for role in ["admin", "edit", "view"] {
        let mut filled = false;
        for _ in 0..150 {
            filled = cluster_roles
                .get(role)
                .await
                .ok()
                .and_then(|r| r.rules)
                .is_some_and(|r| !r.is_empty());
            if filled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            filled,
            "ClusterRole {role} has no rules: is the clusterrole-aggregation controller running?"
        );
    }
    for role in [
        "cluster-admin",
        "admin",
        "edit",
        "view",
        "system:controller:namespace-controller",
    ] {
        let binding = serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("grab-{}", role.replace(':', "-")), "namespace": env_ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": namespace}]
        });
        forbidden(
            &format!("binding {role}"),
            bindings
                .create(&PostParams::default(), &as_dynamic(&binding))
                .await
                .map(|o| serde_json::to_value(o).unwrap_or_default()),
        );
    }
    // The one binding envctl may make is the one every pass makes (applied above).
    let made = bindings
        .get("environmentd")
        .await
        .expect("the environmentd RoleBinding");
    assert_eq!(made.data["roleRef"]["name"], environmentd_role.as_str());
    assert_eq!(made.data["roleRef"]["kind"], "ClusterRole");
    // The admission policy, from the attacker's side: each write below is one RBAC lets
    // envctl's identity make; the policy refuses it (its message says so).
    let denied = |what: &str, r: Result<serde_json::Value, kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.message.contains("denied request") => {}
        other => panic!("{what} was not refused by the admission policy: {other:?}"),
    };
    let as_value = |r: Result<DynamicObject, kube::Error>| {
        r.map(|o| serde_json::to_value(o).unwrap_or_default())
    };
    let sa_secrets_env: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        &env_ns,
        &kube::api::ApiResource::erase::<Secret>(&()),
    );
    // 1. Minting a token: a service-account-token Secret the token controller would fill in.
    let mint = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "environment-tls", "namespace": env_ns,
            "annotations": {"kubernetes.io/service-account.name": "namespace-controller"}},
        "type": "kubernetes.io/service-account-token"
    });
    denied(
        "a service-account-token Secret named environment-tls",
        as_value(
            sa_secrets_env
                .create(&PostParams::default(), &as_dynamic(&mint))
                .await,
        ),
    );
    let opaque = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stash", "namespace": env_ns}, "stringData": {"k": "v"}
    });
    denied(
        "a Secret of another name in an environment",
        as_value(
            sa_secrets_env
                .create(&PostParams::default(), &as_dynamic(&opaque))
                .await,
        ),
    );
    let kube_system_secrets: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        "kube-system",
        &kube::api::ApiResource::erase::<Secret>(&()),
    );
    let mint_there = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "environment-tls", "namespace": "kube-system",
            "annotations": {"kubernetes.io/service-account.name": "namespace-controller"}},
        "type": "kubernetes.io/service-account-token"
    });
    // RBAC already refuses it: envctl holds no Secret right outside its own namespaces.
    forbidden(
        "a token Secret in kube-system",
        as_value(
            kube_system_secrets
                .create(&PostParams::default(), &as_dynamic(&mint_there))
                .await,
        ),
    );
    // 2. Handing envctl's own powers to everyone: its own ClusterRole bound to
    //    system:authenticated (RBAC allows it: envctl holds that role's permissions), and the
    //    environmentd binding given another subject.
    let own_role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] != environmentd_role.as_str())
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("envctl's ClusterRole")
        .to_string();
    let grab = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "grab", "namespace": env_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": own_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]
    });
    denied(
        "binding envctl's ClusterRole to system:authenticated",
        as_value(
            bindings
                .create(&PostParams::default(), &as_dynamic(&grab))
                .await,
        ),
    );
    let widened = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "environmentd", "namespace": env_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": environmentd_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]
    });
    denied(
        "giving the environmentd binding another subject",
        as_value(
            bindings
                .patch(
                    "environmentd",
                    &PatchParams::apply("envctl").force(),
                    &Patch::Apply(&widened),
                )
                .await,
        ),
    );
    let own_ns_bindings: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        &namespace,
        &kube::api::ApiResource::erase::<k8s_openapi::api::rbac::v1::RoleBinding>(&()),
    );
    let own_grab = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "environmentd", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": environmentd_role},
        "subjects": [{"kind": "ServiceAccount", "name": "environmentd", "namespace": namespace}]
    });
    denied(
        "a RoleBinding in envctl's own namespace",
        as_value(
            own_ns_bindings
                .create(&PostParams::default(), &as_dynamic(&own_grab))
                .await,
        ),
    );
    // 3. Its own namespace's Namespace object: not to be updated or deleted.
    let sa_namespaces: Api<Namespace> = Api::all(sa_client.clone());
    match sa_namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(s)) if s.message.contains("denied request") => {}
        other => panic!("deleting envctl's own namespace was not refused: {other:?}"),
    }
    // A Secret in a namespace envctl does not own.
    let other_ns = format!("{id}-other");
    nsapi
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": other_ns}}))
                .expect("ns"),
        )
        .await
        .expect("creating another namespace");
    // 4. Labelling a namespace that is not its own as its own (which would open it to the
    //    rest of the policy), and writing into it.
    let claim = serde_json::json!({"metadata": {"labels": {
        "app.kubernetes.io/managed-by": "envctl",
        "envctl.materialize.cloud/instance": instance,
    }}});
    match sa_namespaces
        .patch(&other_ns, &PatchParams::default(), &Patch::Merge(&claim))
        .await
    {
        Err(kube::Error::Api(s)) if s.message.contains("denied request") => {}
        other => panic!("labelling a foreign namespace as its own was not refused: {other:?}"),
    }
    match sa_namespaces
        .patch(
            "kube-system",
            &PatchParams::default(),
            &Patch::Merge(&claim),
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.message.contains("denied request") => {}
        other => panic!("labelling kube-system as its own was not refused: {other:?}"),
    }
    let foreign_services: Api<DynamicObject> = Api::namespaced_with(
        sa_client.clone(),
        &other_ns,
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
    );
    let service = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x", "namespace": other_ns},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}});
    denied(
        "a Service in a namespace that is not the instance's",
        as_value(
            foreign_services
                .create(&PostParams::default(), &as_dynamic(&service))
                .await,
        ),
    );
    let admin_secrets: Api<Secret> = Api::namespaced(client.clone(), &other_ns);
    admin_secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "db-password"}, "stringData": {"password": "x"}})).expect("a secret"),
        )
        .await
        .expect("creating a Secret as the admin");
    let sa_secrets: Api<Secret> = Api::namespaced(sa_client.clone(), &other_ns);
    match sa_secrets.get("db-password").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!(
            "reading another namespace's Secret was not refused: {:?}",
            other.map(|s| s.metadata.name)
        ),
    }
    let _ = nsapi.delete(&other_ns, &DeleteParams::default()).await;

    // What it writes, not only where: every attack of the walled-tenant issue, as envctl's
    // ServiceAccount and as an environment's environmentd.
    let release_view = crate::walls::Release {
        admin: &client,
        envctl: &sa_client,
        release: &release,
        namespace: &namespace,
        service_account: &sa_name,
        instance: &instance,
        in_environments: &role_env[1].1,
        env_ns: &env_ns,
    };
    crate::walls::envctl_is_walled_in(&release_view).await;
    crate::walls::environmentd_is_walled_in(&release_view, &cluster.kubeconfig).await;
    // Nothing of the attacks stuck: the pass after them still has nothing to change.
    in_sync();

    // A prune as the ServiceAccount, under the policy: the removed environment's namespace
    // (the instance's own) is deleted.
    let gone = names.last().expect("an environment").clone();
    let original = gone.rsplit_once('-').map_or(gone.as_str(), |(n, _)| n);
    std::fs::remove_file(source.join(format!("{original}.yaml"))).expect("removing a manifest");
    let out = envctl(&[
        "apply",
        "--source",
        src,
        "--instance",
        &instance,
        "--prune",
        "--skip-certificates",
    ]);
    assert!(
        out.status.success(),
        "a prune as the ServiceAccount failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_namespace_gone(
        &client,
        &format!("environment-{gone}"),
        Duration::from_secs(120),
    )
    .await;

    cleanup_instance(&client, &instance).await;

    // An upgrade that changes a value is taken, and uninstall leaves none of the chart's
    // objects behind, in the release namespace or cluster-wide.
    let upgrade = helm(
        cluster,
        &[
            "upgrade",
            &release,
            &chart_dir(),
            "--namespace",
            &namespace,
            "--reuse-values",
            "--set",
            "prune.enabled=true",
            "--set",
            "health.readPods=false",
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    assert!(upgrade.0, "helm upgrade failed:\n{}", upgrade.1);
    let upgraded = release_manifest(cluster, &release, &namespace);
    assert!(
        upgraded
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .filter_map(|d| d["spec"]["template"]["spec"]["containers"][0]["env"].as_array())
            .flatten()
            .any(|e| e["name"] == "ENVCTL_PRUNE" && e["value"] == "true"),
        "the upgrade turned pruning on"
    );
    // Without the cluster-wide pod read, health is judged from StatefulSets alone: the
    // ServiceAccount reads no pod, and `status --health-without-pods` works without one.
    let sa_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(sa_client.clone());
    match sa_pods.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        Ok(_) => panic!("the ServiceAccount still lists pods with health.readPods=false"),
        Err(e) => panic!("listing pods: {e}"),
    }
    let status = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "--instance",
            &instance,
            "--controller-namespace",
            &namespace,
        ];
        args.extend(extra);
        envctl(&args)
    };
    let out = status(&[]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Pod"),
        "status read pods without the right to:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status(&["--health-without-pods"]);
    assert!(
        out.status.success(),
        "status --health-without-pods failed as the ServiceAccount:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uninstall = helm(
        cluster,
        &[
            "uninstall",
            &release,
            "--namespace",
            &namespace,
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    assert!(uninstall.0, "helm uninstall failed:\n{}", uninstall.1);
    let left = objects_of_release(&client, &release).await;
    assert!(
        left.is_empty(),
        "helm uninstall left these behind: {left:?}"
    );
    let _ = nsapi.delete(&namespace, &DeleteParams::default()).await;
    wait_namespace_gone(&client, &namespace, Duration::from_secs(120)).await;
}

/// One instance, one owner: a second release with the same `instance` is refused (by Helm,
/// naming the first release's claim), envctl run in the second namespace refuses to start
/// and names the first, and two releases left at the default instance do not share one.
#[tokio::test(flavor = "multi_thread")]
async fn two_releases_cannot_share_an_instance() {
    let Some(cluster) = require() else { return };
    let client = cluster.client().await;
    let id = unique("claim");
    let (first, second) = (format!("{id}-a"), format!("{id}-b"));
    // Release names unique to the run: the chart's ClusterRoles and policies are named after
    // them, cluster-wide.
    let (one, two) = (format!("{id}-one"), format!("{id}-two"));
    let install = |release: &str, namespace: &str, instance: Option<&str>| {
        let mut args = vec![
            "install".to_string(),
            release.to_string(),
            chart_dir(),
            "--namespace".into(),
            namespace.to_string(),
            "--create-namespace".into(),
            "--set".into(),
            "source.url=https://git.example.invalid/envs.git".into(),
            "--set".into(),
            "replicas=1".into(),
        ];
        if let Some(i) = instance {
            args.extend(["--set".into(), format!("instance={i}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        helm(cluster, &args)
    };
    let (ok, text) = install(&one, &first, Some(&id));
    assert!(ok, "the first release failed to install:\n{text}");
    let (ok, text) = install(&two, &second, Some(&id));
    assert!(!ok, "a second release with instance {id} was installed");
    assert!(
        text.contains(&format!("envctl-instance-{id}")) && text.contains(&first),
        "helm's refusal names neither the claim nor the first release's namespace:\n{text}"
    );

    // envctl run in the second namespace, with the same instance: refuses before any write.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["run", "--source"])
        .arg(dir.path())
        .args(["--instance", &id, "--leader-elect-namespace", &second])
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .expect("running envctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "envctl run started on a claimed instance:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("release {one} in namespace")) && stderr.contains(&first),
        "envctl's refusal does not name the first release:\n{stderr}"
    );

    // Left at its default, the second release derives an instance of its own.
    let (ok, text) = install(&two, &second, None);
    assert!(
        ok,
        "a release at the default instance failed to install:\n{text}"
    );
    let derived = release_manifest(cluster, &two, &second)
        .into_iter()
        .filter(|d| d["kind"] == "Deployment")
        .filter_map(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .cloned()
        })
        .flatten()
        .find(|e| e["name"] == "ENVCTL_INSTANCE")
        .and_then(|e| e["value"].as_str().map(str::to_string))
        .expect("the Deployment names its instance");
    let expected = format!("{second}-{two}");
    let expected = if expected.len() <= 40 {
        expected
    } else {
        derived.clone()
    };
    assert_eq!(derived, expected);
    assert_ne!(
        derived, id,
        "the derived instance is not the first release's"
    );

    for (release, namespace) in [(&one, &first), (&two, &second)] {
        let (ok, text) = helm(
            cluster,
            &["uninstall", release, "--namespace", namespace, "--wait"],
        );
        assert!(ok, "helm uninstall {release} failed:\n{text}");
    }
    let nsapi: Api<Namespace> = Api::all(client.clone());
    for namespace in [&first, &second] {
        let _ = nsapi.delete(namespace, &DeleteParams::default()).await;
        wait_namespace_gone(&client, namespace, Duration::from_secs(120)).await;
    }
}

/// The chart's folder.
fn chart_dir() -> String {
    repo_root()
        .join("charts/envctl")
        .to_string_lossy()
        .into_owned()
}

/// `helm ARGS` with the Helm CLI from its Go module (scripts/go-tool), against the test
/// cluster: (success, stdout and stderr).
fn helm(cluster: &crate::cluster::TestCluster, args: &[&str]) -> (bool, String) {
    static HELM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let binary = HELM.get_or_init(|| {
        let mut command = Command::new(repo_root().join("scripts/go-tool"));
        command.arg("helm");
        crate::support::script_last_line(command, "scripts/go-tool helm")
            .unwrap_or_else(|e| panic!("installing the Helm CLI: {e}"))
    });
    let home = tempfile::tempdir().expect("a Helm home");
    let out = Command::new(binary)
        .args(args)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        // Helm's caches and settings in a folder of this call's own.
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("running helm");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The objects the release holds, as Helm recorded them (`helm get manifest`).
fn release_manifest(
    cluster: &crate::cluster::TestCluster,
    release: &str,
    namespace: &str,
) -> Vec<serde_json::Value> {
    let (ok, text) = helm(
        cluster,
        &["get", "manifest", release, "--namespace", namespace],
    );
    assert!(ok, "helm get manifest failed:\n{text}");
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .expect("the release's manifest is YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Every object of any listable kind, cluster-wide, that carries the release's instance
/// label: `KIND NAMESPACE/NAME`.
async fn objects_of_release(client: &kube::Client, release: &str) -> Vec<String> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("API discovery");
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut left = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !caps.supports_operation(kube::discovery::verbs::LIST) || ar.kind == "Event" {
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let Ok(list) = api.list(&ListParams::default().labels(&selector)).await else {
                continue;
            };
            for o in list.items {
                left.push(format!(
                    "{} {}/{}",
                    ar.kind,
                    o.metadata.namespace.unwrap_or_default(),
                    o.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    left
}
