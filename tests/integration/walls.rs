//! Every environment a walled tenant, tried from the attacker's side with the chart installed
//! by Helm: what envctl's ServiceAccount and an environment's environmentd could misuse
//! (pod templates, Services, ServiceAccounts, namespace labels, the release namespace, other
//! instances' Secrets) is refused, each by the rule that names it; Pod Security and the
//! ResourceQuota hold what gets past an admission policy. Called from the chart test, which
//! holds the release.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, ResourceQuota, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// A kube client that authenticates with `token` to the test cluster.
pub async fn client_with_token(kubeconfig: &std::path::Path, token: &str) -> kube::Client {
    let mut config = kube::config::Kubeconfig::read_from(kubeconfig).expect("the admin kubeconfig");
    for user in &mut config.auth_infos {
        if let Some(auth) = user.auth_info.as_mut() {
            auth.token = Some(token.to_string().into());
            auth.client_certificate_data = None;
            auth.client_key_data = None;
        }
    }
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .expect("a config from the kubeconfig");
    kube::Client::try_from(config).expect("a client")
}

/// A StatefulSet in the shape envctl renders (restricted), which each attack changes in one
/// place.
fn statefulset(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 999,
                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "c", "image": "busybox",
                        "securityContext": {"allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]}}
                    }]
                }
            }
        }
    })
}

/// `base` with the JSON merge patch `patch` applied (RFC 7386: objects merge, null removes,
/// anything else replaces).
fn merged(base: &Value, patch: &Value) -> Value {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            let mut out = b.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let next = merged(out.get(k).unwrap_or(&Value::Null), v);
                    out.insert(k.clone(), next);
                }
            }
            Value::Object(out)
        }
        (_, p) => p.clone(),
    }
}

fn api_for(client: &kube::Client, namespace: Option<&str>, obj: &Value) -> Api<DynamicObject> {
    let (group, version) = match obj["apiVersion"]
        .as_str()
        .expect("apiVersion")
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap_or("v1").to_string(),
        ),
    };
    let kind = obj["kind"].as_str().expect("kind");
    let plural = match kind {
        "StatefulSet" => "statefulsets",
        "Service" => "services",
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "Secret" => "secrets",
        "RoleBinding" => "rolebindings",
        other => panic!("no plural for {other}"),
    };
    let ar = ApiResource {
        group: group.clone(),
        version: version.clone(),
        api_version: obj["apiVersion"].as_str().unwrap_or("v1").to_string(),
        kind: kind.to_string(),
        plural: plural.to_string(),
    };
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// Creates `obj` as `client`, server-side dry run (admission runs; nothing is stored).
async fn try_create(client: &kube::Client, obj: &Value) -> Result<(), kube::Error> {
    let ns = obj["metadata"]["namespace"].as_str();
    let api = api_for(client, ns, obj);
    let dynamic: DynamicObject = serde_json::from_value(obj.clone()).expect("an object");
    api.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &dynamic,
    )
    .await
    .map(|_| ())
}

/// `what` was refused by an admission policy with a message that contains `rule`.
async fn refused(client: &kube::Client, what: &str, obj: &Value, rule: &str) {
    match try_create(client, obj).await {
        Err(kube::Error::Api(s)) if s.message.contains("denied request") => assert!(
            s.message.contains(rule),
            "{what} was refused, but not by the rule {rule:?}: {}",
            s.message
        ),
        other => panic!("{what} was not refused by the admission policy: {other:?}"),
    }
}

/// `what` was refused by RBAC (403 without an admission message).
fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 && !s.message.contains("denied request") => {}
        other => panic!("{what} was not refused by RBAC: {other:?}"),
    }
}

/// What the release gives envctl's identity, and where.
pub struct Release<'a> {
    pub admin: &'a kube::Client,
    /// As envctl's ServiceAccount.
    pub envctl: &'a kube::Client,
    pub release: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub instance: &'a str,
    /// The in-environments ClusterRole.
    pub in_environments: &'a str,
    /// An environment namespace envctl applied.
    pub env_ns: &'a str,
}

/// Every write of the attacks, as envctl's ServiceAccount, refused by name.
pub async fn envctl_is_walled_in(r: &Release<'_>) {
    let sa = r.envctl;
    let ns = r.env_ns;
    // The shape envctl renders is accepted: each refusal below is for the one change made.
    let base = statefulset("attack", ns);
    try_create(sa, &base)
        .await
        .unwrap_or_else(|e| panic!("a StatefulSet in envctl's shape was refused: {e}"));
    let container = |sc: Value| {
        json!({"spec": {"template": {"spec": {"containers": [merged(
            &base["spec"]["template"]["spec"]["containers"][0], &json!({"securityContext": sc}))]}}}})
    };
    let pod = |p: Value| json!({"spec": {"template": {"spec": p}}});
    let attacks: Vec<(&str, Value, &str)> = vec![
        (
            "a privileged container",
            container(json!({"privileged": true, "allowPrivilegeEscalation": null})),
            "privileged:",
        ),
        (
            "CAP_SYS_ADMIN",
            container(json!({"capabilities": {"add": ["SYS_ADMIN"], "drop": null}})),
            "privileged:",
        ),
        (
            "privilege escalation",
            container(json!({"allowPrivilegeEscalation": true})),
            "privilege escalation:",
        ),
        (
            "running as root",
            container(json!({"runAsUser": 0})),
            "root:",
        ),
        (
            "no seccomp profile",
            container(json!({"seccompProfile": {"type": "Unconfined"}})),
            "seccomp:",
        ),
        (
            "a hostPath of /",
            pod(json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]})),
            "volumes:",
        ),
        (
            "hostNetwork",
            pod(json!({"hostNetwork": true})),
            "host namespaces:",
        ),
        ("hostPID", pod(json!({"hostPID": true})), "host namespaces:"),
        ("hostIPC", pod(json!({"hostIPC": true})), "host namespaces:"),
        (
            "a hostPort",
            json!({"spec": {"template": {"spec": {"containers": [merged(
                &base["spec"]["template"]["spec"]["containers"][0],
                &json!({"ports": [{"containerPort": 80, "hostPort": 80}]}))]}}}}),
            "host ports:",
        ),
        (
            "nodeName",
            pod(json!({"nodeName": "kwok-node-0"})),
            "nodeName:",
        ),
        (
            "tolerating every taint",
            pod(json!({"tolerations": [{"operator": "Exists"}]})),
            "tolerations:",
        ),
        (
            "priority class system-node-critical",
            pod(json!({"priorityClassName": "system-node-critical"})),
            "priorityClassName:",
        ),
        (
            "running as envctl's own ServiceAccount",
            pod(json!({"serviceAccountName": r.service_account})),
            "serviceAccountName:",
        ),
        (
            "running as environmentd from another StatefulSet",
            pod(json!({"serviceAccountName": "environmentd"})),
            "serviceAccountName:",
        ),
        (
            "the deprecated serviceAccount field",
            pod(json!({"serviceAccount": "default-admin"})),
            "serviceAccountName:",
        ),
        (
            "a volume claim naming a PersistentVolume",
            json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"volumeName": "someone-elses", "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}}}}]}}),
            "volumeClaimTemplates:",
        ),
        (
            "a storage class the chart does not allow",
            json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"storageClassName": "unencrypted", "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}}}}]}}),
            "volumeClaimTemplates:",
        ),
    ];
    for (what, patch, rule) in &attacks {
        refused(sa, what, &merged(&base, patch), rule).await;
    }

    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "attack", "namespace": ns},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}], "selector": {"app": "x"}}});
    try_create(sa, &service)
        .await
        .unwrap_or_else(|e| panic!("a headless Service was refused: {e}"));
    let ip = json!({"spec": {"clusterIP": null, "externalIPs": ["8.8.8.8"]}});
    refused(sa, "externalIPs", &merged(&service, &ip), "externalIPs:").await;
    for kind in ["LoadBalancer", "NodePort"] {
        let typed = json!({"spec": {"clusterIP": null, "type": kind}});
        refused(sa, kind, &merged(&service, &typed), "Service type:").await;
    }
    let external = json!({"spec": {"clusterIP": null, "type": "ExternalName",
        "externalName": "example.com", "selector": null}});
    refused(
        sa,
        "ExternalName",
        &merged(&service, &external),
        "Service type:",
    )
    .await;

    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "environmentd", "namespace": ns}});
    for key in [
        "eks.amazonaws.com/role-arn",
        "iam.gke.io/gcp-service-account",
        "azure.workload.identity/client-id",
    ] {
        let annotated = json!({"metadata": {"annotations": {key: "admin"}}});
        refused(
            sa,
            &format!("a ServiceAccount with {key}"),
            &merged(&account, &annotated),
            "workload identity:",
        )
        .await;
    }
    let other = json!({"metadata": {"name": "builder"}});
    refused(
        sa,
        "another ServiceAccount",
        &merged(&account, &other),
        "ServiceAccounts:",
    )
    .await;

    // The environment's namespace: its Pod Security labels and the reserved prefixes.
    let namespaces: Api<Namespace> = Api::all(sa.clone());
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    for (what, patch, rule) in [
        (
            "relabelling Pod Security to privileged",
            json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}}),
            "Pod Security:",
        ),
        (
            "removing the Pod Security label",
            json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": null}}}),
            "Pod Security:",
        ),
        (
            "a label under a prefix Kubernetes owns",
            json!({"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "trusted"}}}),
            "reserved labels:",
        ),
    ] {
        match namespaces.patch(ns, &dry, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(s)) if s.message.contains("denied request") => {
                assert!(s.message.contains(rule), "{what}: {}", s.message)
            }
            other => panic!("{what} was not refused: {other:?}"),
        }
    }

    // envctl's own RoleBinding: only to the in-environments role, only for itself.
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "envctl", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": r.in_environments},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]
    });
    refused(
        sa,
        "the envctl RoleBinding for another subject",
        &binding,
        "envctl binds only",
    )
    .await;

    // The release namespace: only envctl's named objects and Events.
    let own = r.namespace;
    let in_own = json!({"metadata": {"namespace": own}});
    for (what, obj) in [
        (
            "a StatefulSet",
            merged(&statefulset("attack", own), &json!({})),
        ),
        ("a Service", merged(&service, &in_own)),
        (
            "a ServiceAccount",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": format!("envctl-{}-sa", r.instance), "namespace": own}}),
        ),
        (
            "a Secret of another name",
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "stash", "namespace": own}, "stringData": {"k": "v"}}),
        ),
        (
            "Helm's release record",
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("sh.helm.release.v1.{}.v9", r.release), "namespace": own},
                "type": "helm.sh/release.v1", "stringData": {"release": "x"}}),
        ),
        (
            "a ConfigMap of another name",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "app-settings", "namespace": own}, "data": {"k": "v"}}),
        ),
    ] {
        refused(
            sa,
            &format!("{what} in the release namespace"),
            &obj,
            "release namespace:",
        )
        .await;
    }
    // Its own ServiceAccount and Service there: not to be deleted or re-pointed.
    let dry_delete = kube::api::DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    let own_accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(sa.clone(), own);
    match own_accounts.delete(r.service_account, &dry_delete).await {
        Err(kube::Error::Api(s)) if s.message.contains("release namespace:") => {}
        other => panic!("deleting envctl's own ServiceAccount was not refused: {other:?}"),
    }
    let own_services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(sa.clone(), own);
    let repoint = json!({"spec": {"selector": {"app": "attacker"}}});
    match own_services
        .patch(r.service_account, &dry, &Patch::Merge(&repoint))
        .await
    {
        Err(kube::Error::Api(s)) if s.message.contains("release namespace:") => {}
        other => panic!("re-pointing envctl's own Service was not refused: {other:?}"),
    }
    // envctl's own names pass (the Role and the policy agree on them).
    let mine = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("envctl-{}-order-keys", r.instance), "namespace": own}});
    match try_create(sa, &mine).await {
        Ok(()) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("envctl's own order-keys Secret was refused: {e}"),
    }
    // Reading: no Secret of the release namespace but envctl's, by name; no list.
    let own_secrets: Api<Secret> = Api::namespaced(sa.clone(), own);
    forbidden(
        "listing the release namespace's Secrets",
        own_secrets.list(&ListParams::default()).await,
    );
    let helm_record = format!("sh.helm.release.v1.{}.v1", r.release);
    forbidden(
        "reading Helm's release record",
        own_secrets.get(&helm_record).await,
    );
    forbidden(
        "rewriting Helm's release record",
        own_secrets
            .patch(
                &helm_record,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
    );
    let admin_own: Api<Secret> = Api::namespaced(r.admin.clone(), own);
    assert!(
        admin_own
            .get_opt(&helm_record)
            .await
            .expect("reading as the admin")
            .is_some(),
        "the release record {helm_record} exists (so the refusals above mean something)"
    );

    // Another instance's environment: its TLS Secret is out of reach (no cluster-wide get).
    let other_ns = format!("environment-{}-other", r.instance);
    let admin_ns: Api<Namespace> = Api::all(r.admin.clone());
    admin_ns
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": other_ns, "labels": {
                "app.kubernetes.io/managed-by": "envctl",
                "envctl.materialize.cloud/instance": format!("{}-other", r.instance)}}}))
            .expect("a namespace"),
        )
        .await
        .expect("creating another instance's namespace");
    let admin_secrets: Api<Secret> = Api::namespaced(r.admin.clone(), &other_ns);
    admin_secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "environment-tls"},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": "x", "tls.key": "private"}}))
            .expect("a secret"),
        )
        .await
        .expect("creating another instance's TLS Secret");
    let theirs: Api<Secret> = Api::namespaced(sa.clone(), &other_ns);
    forbidden(
        "reading another instance's TLS Secret",
        theirs.get("environment-tls").await,
    );
    let mine: Api<Secret> = Api::namespaced(sa.clone(), ns);
    mine.get_opt("environment-tls")
        .await
        .expect("envctl reads its own environment's TLS Secret through its RoleBinding");
    let _ = admin_ns.delete(&other_ns, &Default::default()).await;
}

/// As an environment's environmentd: its writes are held to the same shapes; Pod Security
/// keeps a privileged pod from existing even when an admin writes the StatefulSet; the
/// ResourceQuota caps its pods.
pub async fn environmentd_is_walled_in(r: &Release<'_>, kubeconfig: &std::path::Path) {
    let ns = r.env_ns;
    let token = crate::cluster::service_account_token(r.admin, ns, "environmentd").await;
    let envd = client_with_token(kubeconfig, &token).await;
    let base = statefulset("clusterd-extra", ns);
    try_create(&envd, &base).await.unwrap_or_else(|e| {
        panic!("environmentd's StatefulSet in the restricted shape was refused: {e}")
    });
    let privileged = json!({"spec": {"template": {"spec": {"containers": [merged(
        &base["spec"]["template"]["spec"]["containers"][0],
        &json!({"securityContext": {"privileged": true, "allowPrivilegeEscalation": null}}))]}}}});
    refused(
        &envd,
        "environmentd's privileged StatefulSet",
        &merged(&base, &privileged),
        "privileged:",
    )
    .await;
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "clusterd-extra", "namespace": ns},
        "spec": {"ports": [{"port": 80}], "externalIPs": ["8.8.8.8"]}});
    refused(
        &envd,
        "environmentd's Service with externalIPs",
        &service,
        "externalIPs:",
    )
    .await;
    let lb = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "clusterd-extra", "namespace": ns},
        "spec": {"ports": [{"port": 80}], "type": "LoadBalancer"}});
    refused(&envd, "environmentd's LoadBalancer", &lb, "Service type:").await;
    let owned = json!({"metadata": {"labels": {"envctl.materialize.cloud/instance": r.instance}}});
    refused(
        &envd,
        "environmentd labelling its StatefulSet as envctl's",
        &merged(&base, &owned),
        "ownership labels:",
    )
    .await;

    // Pod Security, past any policy: the admin writes a privileged StatefulSet; no pod exists.
    let sts_admin: Api<StatefulSet> = Api::namespaced(r.admin.clone(), ns);
    let rooted: StatefulSet = serde_json::from_value(merged(
        &merged(&base, &privileged),
        &json!({"metadata": {"name": "rooted"},
            "spec": {"serviceName": "rooted", "selector": {"matchLabels": {"app": "rooted"}},
                "template": {"metadata": {"labels": {"app": "rooted"}},
                    "spec": {"hostPID": true}}}}),
    ))
    .expect("a StatefulSet");
    sts_admin
        .create(&PostParams::default(), &rooted)
        .await
        .expect("the admin creates a privileged StatefulSet (no policy holds the admin)");
    let message = wait_for_failed_create(r.admin, ns, "rooted", "PodSecurity").await;
    assert!(message.contains("restricted"), "{message}");
    let pods: Api<Pod> = Api::namespaced(r.admin.clone(), ns);
    let rooted_pods = pods
        .list(&ListParams::default().labels("app=rooted"))
        .await
        .expect("listing pods");
    assert!(
        rooted_pods.items.is_empty(),
        "a privileged pod exists despite Pod Security: {:?}",
        rooted_pods
            .items
            .iter()
            .map(|p| &p.metadata.name)
            .collect::<Vec<_>>()
    );
    let _ = sts_admin.delete("rooted", &Default::default()).await;

    // The quota: environmentd asks for far more pods than the environment was sized for.
    let quotas: Api<ResourceQuota> = Api::namespaced(r.admin.clone(), ns);
    let hard: i64 = quotas
        .get("environment")
        .await
        .expect("the environment's ResourceQuota")
        .spec
        .and_then(|s| s.hard)
        .and_then(|h| h.get("pods").map(|q| q.0.clone()))
        .and_then(|p| p.parse().ok())
        .expect("a pod count in the quota");
    let wanted = hard + 10;
    // All at once (not one by one, each waiting for the last to be Ready).
    let greedy = merged(
        &base,
        &json!({"spec": {"replicas": wanted, "podManagementPolicy": "Parallel"}}),
    );
    let api = api_for(&envd, Some(ns), &greedy);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(greedy).expect("an object"),
    )
    .await
    .expect("environmentd creates a StatefulSet in the restricted shape");
    let message = wait_for_failed_create(r.admin, ns, "clusterd-extra", "exceeded quota").await;
    assert!(message.contains("pods"), "{message}");
    let all = pods
        .list(&ListParams::default())
        .await
        .expect("listing pods");
    assert!(
        (all.items.len() as i64) <= hard,
        "{} pods in {ns}, past the quota's {hard}",
        all.items.len()
    );
    let extra = all
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("app").map(String::as_str) == Some("clusterd-extra"))
        })
        .count() as i64;
    assert!(
        extra < wanted,
        "all {wanted} pods were created past the quota"
    );
    let _ = sts_admin
        .delete("clusterd-extra", &Default::default())
        .await;
}

/// The message of a FailedCreate Event of StatefulSet `name` that mentions `needle`, within
/// 60 s.
async fn wait_for_failed_create(
    client: &kube::Client,
    ns: &str,
    name: &str,
    needle: &str,
) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let list = events
            .list(&ListParams::default().fields(&format!(
                "involvedObject.name={name},involvedObject.kind=StatefulSet,reason=FailedCreate"
            )))
            .await
            .expect("listing Events");
        if let Some(m) = list
            .items
            .iter()
            .filter_map(|e| e.message.clone())
            .find(|m| m.contains(needle))
        {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no FailedCreate Event mentioning {needle:?} for StatefulSet {ns}/{name} within 60 s: {:?}",
            list.items.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Migration: environments applied before their walls (no Pod Security labels, no quota,
/// LimitRange or NetworkPolicy) gain them on the next pass, and nothing else changes.
#[tokio::test(flavor = "multi_thread")]
async fn existing_environments_gain_their_walls_on_the_next_pass() {
    let Some(cluster) = crate::cluster::require() else {
        return;
    };
    let client = cluster.client().await;
    let instance = crate::cluster::unique("walls");
    let dir = tempfile::tempdir().expect("a temp dir");
    let names = crate::support::examples_renamed(dir.path(), &instance[instance.len() - 4..]);
    let args = ["--instance", instance.as_str(), "--source", "."];
    let run = |cmd: &str| {
        let mut a = vec![cmd];
        a.extend(args);
        cluster.envctl(dir.path(), &a)
    };
    let (code, out, err) = run("apply");
    assert_eq!(code, 0, "{out}\n{err}");

    // Take each environment back to what an envctl without walls left: the namespace's Pod
    // Security labels removed, the quota, LimitRange and NetworkPolicy deleted.
    let unlabel = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": null, "pod-security.kubernetes.io/enforce-version": null,
        "pod-security.kubernetes.io/warn": null, "pod-security.kubernetes.io/warn-version": null,
        "pod-security.kubernetes.io/audit": null, "pod-security.kubernetes.io/audit-version": null}}});
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in &names {
        let ns = format!("environment-{name}");
        namespaces
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&unlabel))
            .await
            .expect("removing the Pod Security labels");
        let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
        let ranges: Api<k8s_openapi::api::core::v1::LimitRange> =
            Api::namespaced(client.clone(), &ns);
        let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
            Api::namespaced(client.clone(), &ns);
        quotas
            .delete("environment", &Default::default())
            .await
            .expect("deleting the quota");
        ranges
            .delete("environment", &Default::default())
            .await
            .expect("deleting the LimitRange");
        policies
            .delete("environment", &Default::default())
            .await
            .expect("deleting the NetworkPolicy");
    }

    // The next pass: exactly the walls, one update (the namespace) and three creates per
    // environment, and nothing else.
    let (code, out, err) = run("diff");
    assert_eq!(code, 1, "{out}\n{err}");
    let n = names.len();
    assert!(
        out.contains(&format!("{} to create, {n} to update, 0 to delete", 3 * n)),
        "{out}"
    );
    for line in out
        .lines()
        .filter(|l| l.starts_with("create ") || l.starts_with("update "))
    {
        let kind = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            ["ResourceQuota", "LimitRange", "NetworkPolicy", "Namespace"].contains(&kind),
            "the migration changes more than the walls: {line}"
        );
    }
    let (code, out, err) = run("apply");
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run("diff");
    assert_eq!(code, 0, "{out}\n{err}");
    for name in &names {
        let ns = namespaces
            .get(&format!("environment-{name}"))
            .await
            .expect("the namespace");
        let labels = ns.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("restricted"),
            "{name}"
        );
    }
    crate::cluster::cleanup_instance(&client, &instance).await;
}
