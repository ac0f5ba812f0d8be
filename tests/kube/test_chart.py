"""The Helm chart itself: it lints strictly, its values schema refuses typos, what it renders
is locked down and accepted by a real API server, and install / upgrade / uninstall behave
(the CRDs and the users' ConnectionPolicies outlive the release).

The operator running under the chart's RBAC is tests/kube/test_chart_rbac.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeApiServer
from tests.kube.chart import CHART, Release, find, helm, operator_args, render, set_args
from tests.kube.operator_harness import CRD_FILES, apply, policy_manifest

pytestmark = pytest.mark.kube

STANDINS = Path(__file__).parent / "data" / "monitoring-standins.yaml"
EVERYTHING_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True, "folder": "Databases"},
    }
}


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watch": {"allNamespaces": True}, **EVERYTHING_ON},
        {"watch": {"namespaces": ["prod", "shop"]}, "rbac": {"secretNames": ["orders-db"]}},
        {"peering": {"enabled": False}, "replicas": 1, "rbac": {"pgbouncer": False}},
    ],
    ids=["defaults", "cluster-wide+monitoring", "namespaces", "standalone"],
)
def test_the_chart_lints_strictly(values: dict[str, Any]) -> None:
    out = helm("lint", "--strict", str(CHART), *set_args(values), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replica": 3}, "additional properties 'replica' not allowed"),
        ({"watch": {"namespace": ["prod"]}}, "additional properties 'namespace' not allowed"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "'enable' not allowed"),
        ({"operator": {"logFormat": "xml"}}, "logFormat"),
        ({"watch": {"namespaces": ["team-*"]}}, "does not match pattern"),
        ({"terminationGracePeriodSeconds": 10}, "minimum"),
    ],
)
def test_the_values_schema_refuses_typos_and_bad_values(
    values: dict[str, Any], complaint: str
) -> None:
    out = helm("template", "t", str(CHART), *set_args(values), check=False)
    assert out.returncode != 0, f"{values} was accepted"
    assert complaint in out.stderr, out.stderr


def test_standalone_with_two_replicas_is_refused() -> None:
    out = helm("template", "t", str(CHART), *set_args({"peering": {"enabled": False}}), check=False)
    assert out.returncode != 0
    assert "replicas must be 1" in out.stderr


def test_the_operator_pod_is_locked_down() -> None:
    docs = render()
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # A cycle's 30 s deadline plus a daemon's 60 s cancellation fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 90
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert f"--liveness=http://0.0.0.0:{ports[probe['port']]}{probe['path']}" in args
    assert f"--metrics-port={ports['metrics']}" in args
    assert args[0] == "operator" and "--log-format=json" in args
    assert "--namespace=ops" in args and "--peering=pgrelief" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (service,) = find(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_without_peering_one_pod_never_overlaps_another() -> None:
    docs = render({"peering": {"enabled": False}, "replicas": 1})
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in operator_args(docs)
    assert not find(docs, "KopfPeering")
    rules = find(docs, "Role")[0]["rules"]
    assert not [r for r in rules if "kopf.dev" in r["apiGroups"]]


def test_secrets_can_be_restricted_to_the_policies_logins() -> None:
    docs = render({"rbac": {"secretNames": ["orders-db-pgrelief"]}})
    (secret_rule,) = [r for r in find(docs, "Role")[0]["rules"] if r["resources"] == ["secrets"]]
    assert secret_rule == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["orders-db-pgrelief"],
    }


def test_no_rule_grants_more_than_it_names() -> None:
    for values in ({}, {"watch": {"allNamespaces": True}}):
        docs = render(values)
        for role in find(docs, "Role") + find(docs, "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
                assert "*" not in rule["apiGroups"], rule
                assert not {"list", "watch"} & set(rule["verbs"]) or rule["resources"] != [
                    "secrets"
                ], "the operator reads only the Secrets its policies name"


def _apply_dry_run(kube: KubeApiServer, docs: list[dict[str, Any]]) -> str:
    out = kube.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def api_with_crds(kube_apiserver: KubeApiServer) -> KubeApiServer:
    for path in [*CRD_FILES, STANDINS]:
        kube_apiserver.kubectl("apply", "--server-side", "-f", str(path))
    for crd in (
        "connectionpolicies.pgrelief.dev",
        "kopfpeerings.kopf.dev",
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ):
        kube_apiserver.kubectl("wait", "--for=condition=Established", f"crd/{crd}")
    return kube_apiserver


@pytest.mark.parametrize(
    "values",
    [{"watch": {"namespaces": ["WATCHED"]}}, {"watch": {"allNamespaces": True}}],
    ids=["namespaced", "cluster-wide"],
)
def test_what_the_chart_renders_is_accepted_by_the_api_server(
    api_with_crds: KubeApiServer, kube_namespace: str, values: dict[str, Any]
) -> None:
    kube = api_with_crds
    watched = f"w-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", watched)
    values = json.loads(json.dumps({**values, **EVERYTHING_ON}).replace("WATCHED", watched))
    docs = render(values, namespace=kube_namespace)
    kinds = {d["kind"] for d in docs}
    assert {
        "ServiceAccount",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
    } <= kinds
    out = _apply_dry_run(kube, docs)
    assert out.count("(server dry run)") == len(docs)
    dashboard = find(docs, "ConfigMap")[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["pgrelief.json"])["panels"]


def test_install_upgrade_and_uninstall_keep_the_crds_and_the_policies(
    api_with_crds: KubeApiServer, kube_namespace: str
) -> None:
    kube = api_with_crds
    ns = kube_namespace
    release = Release(kube, f"r{uuid.uuid4().hex[:8]}", ns).install()
    try:
        name = release.fullname
        kube.kubectl("get", "serviceaccount,deployment,role,rolebinding", name, "-n", ns)
        kube.kubectl("get", "service", f"{name}-metrics", "-n", ns)
        kube.kubectl("get", "kopfpeering", "pgrelief", "-n", ns)
        kube.kubectl("get", "clusterrole,clusterrolebinding", f"{name}-observer")
        apply(kube, policy_manifest("kept", ns, host="127.0.0.1", port=9))

        other = f"w-{uuid.uuid4().hex[:8]}"
        kube.kubectl("create", "namespace", other)
        release.upgrade(
            {"watch": {"namespaces": [ns, other]}, "replicas": 3, "operator": {"logFormat": "text"}}
        )
        kube.kubectl("get", "role,rolebinding,kopfpeering", "-n", other)
        deployment = json.loads(
            kube.kubectl("get", "deployment", name, "-n", ns, "-o", "json").stdout
        )
        assert deployment["spec"]["replicas"] == 3
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert {f"--namespace={ns}", f"--namespace={other}", "--log-format=text"} <= set(args)

        release.upgrade({})  # back to the release's namespace only: the other Role goes
        gone = kube.kubectl("get", "role", name, "-n", other, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
    finally:
        release.uninstall()
    for kind in ("deployment", "serviceaccount", "role", "rolebinding"):
        left = kube.kubectl("get", kind, release.fullname, "-n", ns, check=False)
        assert left.returncode != 0 and "NotFound" in left.stderr, kind
    left = kube.kubectl("get", "clusterrole", f"{release.fullname}-observer", check=False)
    assert left.returncode != 0
    # Helm never deletes what crds/ installed, and the users' policies stay with it.
    kube.kubectl("get", "crd", "connectionpolicies.pgrelief.dev", "kopfpeerings.kopf.dev")
    kube.kubectl("get", "cpol", "kept", "-n", ns)


def test_the_crds_install_separately_then_the_chart_skips_them(
    api_with_crds: KubeApiServer, kube_namespace: str
) -> None:
    """The README's way for clusters where CRDs are managed apart from releases."""
    kube = api_with_crds
    crds = helm("show", "crds", str(CHART)).stdout
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(crds) if d}
    assert names == {
        "connectionpolicies.pgrelief.dev",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    applied = kube.kubectl("apply", "--server-side", "-f", "-", input=crds).stdout
    assert all(name in applied for name in names)
    release = Release(kube, f"r{uuid.uuid4().hex[:8]}", kube_namespace)
    helm(
        "install",
        release.name,
        str(CHART),
        "--namespace",
        kube_namespace,
        "--skip-crds",
        kubeconfig=kube.kubeconfig,
    )
    try:
        kube.kubectl("get", "deployment,role", release.fullname, "-n", kube_namespace)
    finally:
        release.uninstall()
