"""Attribution under exactly the chart's RBAC: the pod index lists and watches Pods,
ReplicaSets and Jobs, and the Events land on workloads, in the watched namespace and in an
applications' namespace given by ``attribution.namespaces``, with no refused API call.

As in test_chart_rbac: ``helm install`` on the test API server, then ``pgrelief`` started with
the chart Deployment's own arguments and a token of the chart's ServiceAccount.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.manifests.events import REPORTING_CONTROLLER
from tests.fixtures.kube import KubeApiServer, wait_for_default_service_account
from tests.fixtures.postgres import SessionFactory
from tests.kube import pods
from tests.kube.chart import ChartOperator, installed, operator_args
from tests.kube.operator_harness import (
    CRD_FILES,
    apply,
    events,
    get_policy,
    policy_manifest,
    secret_manifest,
    wait_until,
)
from tests.runs import alive

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def crds(kube_apiserver: KubeApiServer) -> None:
    for path in CRD_FILES:
        kube_apiserver.kubectl("apply", "--server-side", "-f", str(path))
    kube_apiserver.kubectl(
        "wait", "--for=condition=Established", "crd/connectionpolicies.pgrelief.dev"
    )


@pytest.fixture
def apps_namespace(kube_apiserver: KubeApiServer) -> Iterator[str]:
    """Where the applications run: not watched for policies, only indexed."""
    name = f"apps-{uuid.uuid4().hex[:8]}"
    kube_apiserver.kubectl("create", "namespace", name)
    wait_for_default_service_account(kube_apiserver, name)
    yield name
    kube_apiserver.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def clients() -> Iterator[list[pods.PodClient]]:
    opened: list[pods.PodClient] = []
    yield opened
    for client in opened:
        client.close()


def _pgrelief_events(kube: KubeApiServer, namespace: str, kind: str) -> list[dict[str, Any]]:
    out = kube.kubectl(
        "get", "events", "-n", namespace, "-o", "json",
        "--field-selector", f"involvedObject.kind={kind}",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return [e for e in items if e.get("reportingComponent") == REPORTING_CONTROLLER]


def _start(kube: KubeApiServer, release: Any, namespace: str, work: Path) -> ChartOperator:
    args = tuple(operator_args(release.manifests()))
    return ChartOperator(
        kube, namespace, work, kubeconfig=release.service_account_kubeconfig(), chart_args=args
    ).start()


def test_workloads_in_the_watched_and_an_applications_namespace_under_the_chart_rbac(
    kube_apiserver: KubeApiServer,
    kube_namespace: str,
    apps_namespace: str,
    crds: None,
    tmp_path: Path,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    clients: list[pods.PodClient],
) -> None:
    kube, ns, apps = kube_apiserver, kube_namespace, apps_namespace
    values = {"attribution": {"namespaces": [apps]}}
    with installed(kube, ns, values) as release:
        args = operator_args(release.manifests())
        assert f"--attribute-namespace={apps}" in args
        apply(kube, secret_manifest("pg-login", ns, "postgres", "unused"))
        operator = _start(kube, release, ns, tmp_path)
        try:
            local, remote = pods.deployment(kube, ns, "ops-tool"), pods.cron_job(kube, apps, "etl")
            ips = [pods.loopback_ip(), pods.loopback_ip()]
            leaked = []
            for pod, ip in zip((local, remote), ips, strict=True):
                pods.run(kube, pod, ip)
                clients.append(pods.PodClient((pg_server.host, pg_server.port), ip))
                leaked.append(clients[-1].idle_in_transaction("app_backend", "job"))
            apply(kube, policy_manifest("orders", ns, host=pg_server.host, port=pg_server.port))
            wait_until("the leaked sessions terminated", lambda: not alive(sessions.admin, leaked))
            terminated = wait_until(
                "BackendTerminated Events naming both workloads",
                lambda: (
                    (found := " ".join(e["message"] for e in events(kube, ns, "BackendTerminated")))
                    and f"Deployment {ns}/ops-tool" in found
                    and f"CronJob {apps}/etl" in found
                ),
            )
            assert terminated
            on_local = wait_until(
                "the Event on the Deployment", lambda: _pgrelief_events(kube, ns, "Deployment")
            )
            on_remote = wait_until(
                "the Event on the CronJob", lambda: _pgrelief_events(kube, apps, "CronJob")
            )
            assert on_local[0]["involvedObject"]["name"] == "ops-tool"
            assert on_remote[0]["involvedObject"]["name"] == "etl"
            assert "pgrelief terminated 1 leaked connection(s)" in on_remote[0]["message"]
            assert operator.forbidden() == [], operator.logs()[-3000:]
        finally:
            operator.stop()


def test_attribution_off_asks_for_no_pod_rights(
    kube_apiserver: KubeApiServer,
    kube_namespace: str,
    crds: None,
    tmp_path: Path,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    kube, ns = kube_apiserver, kube_namespace
    with installed(kube, ns, {"attribution": {"enabled": False}}) as release:
        assert "--no-attribution" in operator_args(release.manifests())
        can = kube.kubectl(
            "auth", "can-i", "list", "pods", "-n", ns,
            f"--as=system:serviceaccount:{ns}:{release.fullname}", check=False,
        )  # fmt: skip
        assert can.stdout.strip() == "no"
        apply(kube, secret_manifest("pg-login", ns, "postgres", "unused"))
        operator = _start(kube, release, ns, tmp_path)
        try:
            leaked = sessions.idle_in_transaction("app_backend", "x").pid
            apply(kube, policy_manifest("orders", ns, host=pg_server.host, port=pg_server.port))
            wait_until("the leaked session terminated", lambda: not alive(sessions.admin, [leaked]))
            policy = wait_until(
                "a status", lambda: (p := get_policy(kube, ns, "orders")).get("status") and p
            )
            assert "workloads" not in policy["status"]  # not indexed: no breakdown by workload
            assert operator.forbidden() == [], operator.logs()[-3000:]
        finally:
            operator.stop()
