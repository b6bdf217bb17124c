"""The Helm chart, checked with real Helm (the Helm v4 SDK in helm-python-sdk)."""
import os

import helm_python as helm
import pytest
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "charts", "envctl")
BASE = {"source": {"url": "https://git.example.com/platform/environments.git"}}


def render(values=None, namespace="envctl-system"):
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values if values is not None else BASE, name="envctl", namespace=namespace, is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_lint_is_clean():
    report = helm.lint(CHART, BASE, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_default_render_has_the_controller_and_its_rbac():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    for kind in ["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service"]:
        assert kind in kinds, kinds
    assert "ServiceMonitor" not in kinds
    deploy = by_kind(docs, "Deployment")[0]
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ENVCTL_SOURCE"] == BASE["source"]["url"]
    assert env["ENVCTL_LEADER_ELECT"] == "true"
    assert env["ENVCTL_PRUNE"] == "false"


def test_no_rule_has_a_wildcard():
    for role in by_kind(render(), "ClusterRole") + by_kind(render(), "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)


def test_non_default_values():
    values = {
        "source": {"url": "ssh://git@git.example.com/envs.git", "ref": "v1.2.3", "path": "prod",
                   "interval": "10s", "credentials": {"secretName": "git-creds", "username": "bot"}},
        "replicas": 3,
        "instance": "prod-eu",
        "prune": {"enabled": True, "maxPrune": "2"},
        "orchestratorServiceLabels": {"cloud.example/stack": "prod-1", "tier": "gold"},
        "webhook": {"secretName": "hook"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    }
    docs = render(values)
    assert len(by_kind(docs, "ServiceMonitor")) == 1
    deploy = by_kind(docs, "Deployment")[0]
    assert deploy["spec"]["replicas"] == 3
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ENVCTL_REF"] == "v1.2.3"
    assert env["ENVCTL_PRUNE"] == "true"
    assert env["ENVCTL_MAX_PRUNE"] == "2"
    assert env["ENVCTL_INSTANCE"] == "prod-eu"
    assert env["ENVCTL_ORCHESTRATOR_SERVICE_LABELS"] == "cloud.example/stack=prod-1,tier=gold"
    assert env["ENVCTL_GIT_TOKEN_FILE"] == "/etc/envctl/git/token"
    assert env["ENVCTL_WEBHOOK_SECRET_FILE"] == "/etc/envctl/webhook/secret"
    volumes = {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert {"cache", "git-credentials", "webhook"} <= volumes
    lease_rule = [r for r in by_kind(docs, "Role")[0]["rules"] if r.get("resourceNames")][0]
    assert lease_rule["resourceNames"] == ["envctl-prod-eu"]


def test_sharding_replaces_leader_election():
    docs = render({"source": {"url": "https://git.example.com/envs.git"},
                   "sharding": {"enabled": True, "replicas": 4}})
    deploy = by_kind(docs, "Deployment")[0]
    assert deploy["spec"]["replicas"] == 4
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ENVCTL_SHARD"] == "true"
    assert "ENVCTL_LEADER_ELECT" not in env
    rules = by_kind(docs, "Role")[0]["rules"]
    members = [r for r in rules if r["resources"] == ["leases"] and "list" in r["verbs"]]
    assert members and not members[0].get("resourceNames"), rules
    # Without sharding, no replica may list or delete Leases.
    plain = by_kind(render({"source": {"url": "https://git.example.com/envs.git"}}), "Role")[0]["rules"]
    assert not [r for r in plain if r["resources"] == ["leases"] and "list" in r["verbs"]]


@pytest.mark.parametrize(
    "bad",
    [
        {"replicas": 0},
        {"sharding": {"enabled": True, "replicas": 0}},
        {"source": {"url": "https://x", "interval": "soon"}},
        {"prune": {"maxPrune": "a lot"}},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"unknownSetting": True},
        {"instance": "no/slashes"},
        {"instance": "Upper_Case"},
        {"instance": "x" * 41},
        {"networkPolicy": {"ingressNamespaces": ["Not A Namespace"]}},
        {"admissionPolicy": {"allowedWorkloadIdentities": {"example.com/role": "x"}}},
        {"certificates": {"limitOverrides": {"example.cloud": "lots"}}},
        {"certificates": {"acme": {"directory": "ftp://acme"}}},
        {"certificates": {"acme": {"directory": "letsencrypt-production"}}},
        {"image": {"repository": "x", "digest": "latest"}},
        {"terminationGracePeriodSeconds": 5},
        {"certificates": {"safetyMargin": -1}},
        {"regions": ["us-east-1"]},
        {"regions": ["AWS/us-east-1"]},
        {"certificates": {"limitShare": "half"}},
        {"certificates": {"limitShare": "0/2"}},
    ],
)
def test_schema_rejects_bad_values(bad):
    values = {**BASE, **bad}
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).validate_schema(values)


def test_certificate_values():
    values = {
        "certificates": {
            "acme": {"directory": "https://acme-staging-v02.api.letsencrypt.org/directory",
                     "email": "ops@example.cloud",
                     "caBundle": {"configMapName": "acme-roots", "key": "roots.pem"},
                     "externalAccountBinding": {"keyId": "kid-1", "secretName": "eab"}},
            "limitOverrides": {"example.cloud": "1000/168h", "example.org": "300/168h"},
            "safetyMargin": 2,
        },
    }
    docs = render({**BASE, **values})
    deploy = by_kind(docs, "Deployment")[0]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ENVCTL_ACME_DIRECTORY"].startswith("https://acme-staging-v02")
    assert env["ENVCTL_ACME_EMAIL"] == "ops@example.cloud"
    assert env["ENVCTL_ACME_CA_BUNDLE"] == "/etc/envctl/acme-ca/roots.pem"
    assert env["ENVCTL_ACME_EAB_KID"] == "kid-1"
    assert env["ENVCTL_ACME_LIMIT_OVERRIDES"] == "example.cloud=1000/168h,example.org=300/168h"
    assert env["ENVCTL_ACME_SAFETY_MARGIN"] == "2"
    assert "ENVCTL_SKIP_CERTIFICATES" not in env
    volumes = {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert {"acme-ca", "acme-eab"} <= volumes
    ledger_rule = [r for r in by_kind(docs, "Role")[0]["rules"]
                   if r.get("resourceNames") == ["envctl-envctl-system-envctl-acme-ledger"]]
    assert ledger_rule and ledger_rule[0]["verbs"] == ["get", "update"]

    off = render({**BASE, "certificates": {"enabled": False}})
    container = by_kind(off, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ENVCTL_SKIP_CERTIFICATES"] == "true"
    assert "ENVCTL_ACME_DIRECTORY" not in env
    names = {n for r in by_kind(off, "Role")[0]["rules"] for n in r.get("resourceNames", [])}
    assert "envctl-default-acme-ledger" not in names and "envctl-default-http01" not in names


def test_schema_accepts_the_defaults_with_a_source():
    helm.Chart.load(CHART).validate_schema(BASE)


def test_missing_source_url_is_refused():
    with pytest.raises(helm.HelmError):
        render({})


def env_of(docs):
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_no_production_ca_by_default():
    env = env_of(render())
    assert "ENVCTL_ACME_DIRECTORY" not in env
    assert "ENVCTL_SKIP_CERTIFICATES" not in env
    for name in ["letsencrypt", "letsencrypt-staging"]:
        env = env_of(render({**BASE, "certificates": {"acme": {"directory": name}}}))
        assert env["ENVCTL_ACME_DIRECTORY"] == name


def test_rbac_grants_no_escalate_no_role_writes_and_binds_one_cluster_role():
    docs = render()
    envctl_role = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == "envctl"][0]
    environmentd = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == "envctl-environmentd"]
    assert environmentd, [d["metadata"]["name"] for d in by_kind(docs, "ClusterRole")]
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in role["rules"]:
            assert "escalate" not in rule["verbs"], rule
            assert "roles" not in rule["resources"], rule
    binds = [r for r in envctl_role["rules"] if "bind" in r["verbs"]]
    assert binds == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                      "resourceNames": [name], "verbs": ["bind"]}
                     for name in ["envctl-environmentd", "envctl-in-environments"]]
    # The ClusterRole envctl binds is the one the Deployment tells it to bind.
    assert env_of(docs)["ENVCTL_ENVIRONMENTD_CLUSTER_ROLE"] == "envctl-environmentd"
    # environmentd's ClusterRole is never bound cluster-wide by the chart.
    for b in by_kind(docs, "ClusterRoleBinding"):
        assert b["roleRef"]["name"] != "envctl-environmentd"


def test_pod_disruption_budget_and_spread():
    docs = render()
    pdb = by_kind(docs, "PodDisruptionBudget")
    assert len(pdb) == 1 and pdb[0]["spec"]["minAvailable"] == 1
    deploy = by_kind(docs, "Deployment")[0]
    assert pdb[0]["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    spread = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
    assert spread[0]["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    off = render({**BASE, "podDisruptionBudget": {"enabled": False}, "topologySpread": {"enabled": False}})
    assert not by_kind(off, "PodDisruptionBudget")
    assert "topologySpreadConstraints" not in by_kind(off, "Deployment")[0]["spec"]["template"]["spec"]


def test_image_pinned_by_digest():
    digest = "sha256:" + "ab" * 32
    docs = render({**BASE, "image": {"repository": "registry.example.com/envctl", "tag": "0.1.0", "digest": digest}})
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example.com/envctl@{digest}"
    container = by_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":0.1.0")


def test_shutdown_grace_fits_inside_the_termination_grace_period():
    for seconds in [30, 15, 120]:
        docs = render({**BASE, "terminationGracePeriodSeconds": seconds})
        pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == seconds
        grace = env_of(docs)["ENVCTL_SHUTDOWN_GRACE"]
        assert grace.endswith("s") and 0 < int(grace[:-1]) < seconds, grace


def test_ssh_key_credentials_are_wired():
    docs = render({"source": {"url": "ssh://git@git.example.com/envs.git",
                              "credentials": {"secretName": "git-creds", "sshKey": True}}})
    env = env_of(docs)
    assert env["ENVCTL_GIT_SSH_KEY_FILE"] == "/etc/envctl/git/ssh-privatekey"
    assert "ENVCTL_GIT_TOKEN_FILE" not in env
    mounts = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "git-credentials", "mountPath": "/etc/envctl/git", "readOnly": True} in mounts


def test_admission_policy_renders_and_lints():
    values = {**BASE, "instance": "prod"}
    docs = render(values)
    policy = by_kind(docs, "ValidatingAdmissionPolicy")
    binding = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert len(policy) == 2 and len(binding) == 2, "on by default: envctl's and environmentd's"
    assert [b["spec"]["policyName"] for b in binding] == [p["metadata"]["name"] for p in policy]
    condition = policy[0]["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:envctl-system:envctl" in condition
    variables = {v["name"]: v["expression"] for v in policy[0]["spec"]["variables"]}
    assert variables["instance"] == "'prod'" and variables["own"] == "'envctl-system'"
    rules = " ".join(v["expression"] for v in policy[0]["spec"]["validations"])
    for needle in ["'environment-'", "'environmentd'", "'envctl-environmentd'", "'kubernetes.io/tls'",
                   "'kubernetes.io/service-account-token'", "oldObject"]:
        assert needle in rules or needle in " ".join(variables.values()), needle
    report = helm.lint(CHART, values, strict=True)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report


def test_the_chart_refuses_to_install_without_the_policy_unless_told():
    off = {**BASE, "admissionPolicy": {"enabled": False}}
    with pytest.raises(Exception) as refused:
        render(off)
    assert "acceptUnconfinedServiceAccount" in str(refused.value)
    accepted = render({**BASE, "admissionPolicy": {"enabled": False, "acceptUnconfinedServiceAccount": True}})
    assert not by_kind(accepted, "ValidatingAdmissionPolicy")


def test_no_cluster_wide_secret_rule_and_named_secrets_in_the_release_namespace():
    docs = render()
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    for role in by_kind(docs, "ClusterRole"):
        if role["metadata"]["name"] in bound:
            for rule in role["rules"]:
                assert "secrets" not in rule["resources"], rule
    role = by_kind(docs, "Role")[0]
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert [r["verbs"] for r in secret_rules if "resourceNames" not in r] == [["create"]]
    named = [r for r in secret_rules if "resourceNames" in r]
    assert len(named) == 1 and "list" not in named[0]["verbs"]
    names = named[0]["resourceNames"]
    assert len(names) == 258 and all(n.startswith("envctl-envctl-system-envctl-") for n in names)
    inside = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == "envctl-in-environments"][0]
    assert inside["rules"][1]["resourceNames"] == ["environment-tls"]
    env = env_of(docs)
    assert env["ENVCTL_ENVCTL_CLUSTER_ROLE"] == "envctl-in-environments"
    assert env["ENVCTL_ENVCTL_SERVICE_ACCOUNT"] == "envctl-system/envctl"


def test_the_default_instance_is_derived_per_release_and_claimed():
    one = env_of(render(namespace="team-a"))["ENVCTL_INSTANCE"]
    two = env_of(render(namespace="team-b"))["ENVCTL_INSTANCE"]
    assert one == "team-a-envctl" and two == "team-b-envctl"
    long = env_of(render(namespace="a-very-long-namespace-name-for-the-platform"))["ENVCTL_INSTANCE"]
    assert len(long) <= 40 and long.startswith("a-very-long-namespace-name-for")
    claim = [d for d in by_kind(render(namespace="team-a"), "ClusterRole")
             if d["metadata"]["name"] == "envctl-instance-team-a-envctl"]
    assert claim and claim[0]["rules"] == []
    assert claim[0]["metadata"]["annotations"]["envctl.materialize.cloud/controller-namespace"] == "team-a"


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", "default"])
def test_the_chart_refuses_system_namespaces(namespace):
    with pytest.raises(Exception) as refused:
        render(namespace=namespace)
    assert "does not install into the namespace " + namespace in str(refused.value)


def test_policy_values_reach_the_rules():
    values = {**BASE, "admissionPolicy": {
        "allowedPriorityClasses": ["environments"], "storageClasses": ["encrypted"],
        "allowedWorkloadIdentities": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/envs"}},
        "networkPolicy": {"ingressNamespaces": ["ingress", "monitoring"]}}
    docs = render(values)
    rules = " ".join(v["expression"] for p in by_kind(docs, "ValidatingAdmissionPolicy")
                     for v in p["spec"]["validations"])
    for needle in ['["environments"]', '["encrypted"]', "'arn:aws:iam::1:role/envs'",
                   "'iam.gke.io/gcp-service-account'", "'azure.workload.identity/client-id'"]:
        assert needle in rules, needle
    assert env_of(docs)["ENVCTL_INGRESS_NAMESPACES"] == "ingress,monitoring"
    report = helm.lint(CHART, values, strict=True)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report


def test_health_without_pods_drops_the_cluster_wide_pod_read():
    def pod_rules(docs):
        role = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == "envctl"][0]
        return [r for r in role["rules"] if "pods" in r["resources"]]
    on = render()
    assert pod_rules(on) and "ENVCTL_HEALTH_WITHOUT_PODS" not in env_of(on)
    off = render({**BASE, "health": {"readPods": False}})
    assert not pod_rules(off)
    assert env_of(off)["ENVCTL_HEALTH_WITHOUT_PODS"] == "true"


def test_regions_and_the_static_share_reach_the_controller():
    docs = render({**BASE, "regions": ["aws/us-east-1", "aws/us-east-2"],
                   "certificates": {"limitShare": "1/3"}})
    env = env_of(docs)
    assert env["ENVCTL_REGIONS"] == "aws/us-east-1,aws/us-east-2"
    assert env["ENVCTL_ACME_LIMIT_SHARE"] == "1/3"
    # By default: every region's environments, and the whole of each limit.
    env = env_of(render())
    assert "ENVCTL_REGIONS" not in env and "ENVCTL_ACME_LIMIT_SHARE" not in env
