"""The operator names the workload behind every connection (issue 13), end to end.

Workloads are real objects in the test API server (the controller manager makes a
Deployment's ReplicaSet and Pod; StatefulSet and CronJob Pods are made as their controllers
would); each Pod "runs" with a loopback IP of its own, and real PostgreSQL sessions come from
that address through a source-bound forwarder. Only kubectl, the metrics endpoint and SQL are
used to see what the operator (a local process) did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.manifests.events import REPORTING_CONTROLLER
from tests.fixtures.kube import KubeApiServer
from tests.fixtures.postgres import SessionFactory
from tests.kube import pods
from tests.kube.operator_harness import (
    OperatorProcess,
    apply,
    events,
    get_policy,
    policy_manifest,
    secret_manifest,
    wait_until,
)
from tests.runs import alive

pytestmark = pytest.mark.kube

IDLE_IN_TX = "idle in transaction"
T = TypeVar("T")


def pgrelief_events(kube: KubeApiServer, namespace: str, kind: str) -> list[dict[str, Any]]:
    """pgrelief's Events on objects of ``kind`` (what ``kubectl describe`` shows there; the
    controller manager posts its own on a Deployment, they are left out)."""
    out = kube.kubectl(
        "get", "events", "-n", namespace, "-o", "json",
        "--field-selector", f"involvedObject.kind={kind}",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return [e for e in items if e.get("reportingComponent") == REPORTING_CONTROLLER]


def status_workloads(kube: KubeApiServer, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    status = get_policy(kube, namespace, name).get("status") or {}
    return {f"{w['kind']} {w['namespace']}/{w['name']}": w for w in status.get("workloads") or []}


def workload_series(metrics: str, namespace: str) -> dict[tuple[str, str, str], float]:
    """pgrelief_workload_connections of the policy ``orders``: (kind, name, state) -> value."""
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "pgrelief_workload_connections" and labels["policy"] == "orders":
                assert labels["namespace"] == namespace
                key = (labels["workload_kind"], labels["workload"], labels["state"])
                found[key] = sample.value
    return found


@pytest.fixture
def clients() -> Iterator[dict[str, pods.PodClient]]:
    opened: dict[str, pods.PodClient] = {}
    yield opened
    for client in opened.values():
        client.close()


def test_sessions_are_placed_on_the_workloads_of_their_pods(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    clients: dict[str, pods.PodClient],
) -> None:
    kube, ns = kube_apiserver, operator.namespace
    target = (pg_server.host, pg_server.port)
    made = {
        "checkout-api": pods.deployment(kube, ns, "checkout-api"),
        "ledger": pods.stateful_set(kube, ns, "ledger"),
        "nightly-report": pods.cron_job(kube, ns, "nightly-report"),
    }
    ips = _distinct_ips(4)
    for (name, pod), ip in zip(made.items(), ips, strict=False):
        pods.run(kube, pod, ip)
        clients[name] = pods.PodClient(target, ip)
    checkout = [clients["checkout-api"].idle_in_transaction("app_backend", "shop") for _ in "abc"]
    ledger = clients["ledger"].idle_in_transaction("app_backend", "ledger")
    nightly = clients["nightly-report"].idle_in_transaction("batch_worker", "report")
    # A session from an address that a Pod began to hold only after the session began: the
    # Pod it really came from is gone and unknown, and the newcomer must not be blamed.
    clients["old"] = pods.PodClient(target, ips[3])
    reused = clients["old"].idle_in_transaction("app_backend", "old")
    time.sleep(3.5)
    newcomer = pods.bare_pod(kube, ns, "newcomer")
    pods.run(kube, newcomer, ips[3], started=datetime.now(UTC))
    time.sleep(1.2)  # every session is idle in transaction for longer than the rule's 1s

    protect = {"workloads": [{"kind": "statefulset", "namespace": ns, "name": "led*"}]}
    policy = policy_manifest(
        "orders", ns, host=pg_server.host, port=pg_server.port,
        spec={"remediation": {"mode": "DryRun", "onlyUnderPressure": False,
                              "terminate": {"idleInTransactionAfter": "1s"},
                              "protect": protect}},
    )  # fmt: skip
    apply(kube, policy)

    # 1. DryRun: status, metrics and Events name the workloads; nothing is terminated.
    deployment, stateful, cron = (
        f"Deployment {ns}/checkout-api",
        f"StatefulSet {ns}/ledger",
        f"CronJob {ns}/nightly-report",
    )
    found = wait_until(
        "the three workloads in status.workloads",
        lambda: _if(
            (w := status_workloads(kube, ns, "orders")).keys() >= {deployment, stateful, cron}, w
        ),
        timeout=60,
    )
    assert found[deployment]["count"] == 3 and found[deployment]["byState"] == {IDLE_IN_TX: 3}
    assert found[deployment]["oldestStateAgeSeconds"] >= 1
    assert found[stateful]["count"] == 1 and found[cron]["count"] == 1
    assert not any("newcomer" in key for key in found), found  # the reused address: unknown
    # The metrics are set after the status is written, in the same cycle.
    held = wait_until(
        "the workload series",
        lambda: _if(
            ("Deployment", "checkout-api", IDLE_IN_TX)
            in (h := workload_series(operator.metrics(), ns)),
            h,
        ),
    )
    assert held[("Deployment", "checkout-api", IDLE_IN_TX)] == 3
    assert held[("StatefulSet", "ledger", IDLE_IN_TX)] == 1
    assert held[("CronJob", "nightly-report", IDLE_IN_TX)] == 1
    assert held[("", "", IDLE_IN_TX)] >= 1  # the reused address's session, unknown
    assert not any(name == "newcomer" for _, name, _ in held)

    def would_all() -> list[dict[str, Any]] | None:
        found = events(kube, ns, "WouldTerminateBackend")
        text = " ".join(e["message"] for e in found)
        return _if(all(f"pid {p} " in text for p in [*checkout, nightly, reused]), found)

    would = wait_until("WouldTerminateBackend Events naming the workloads", would_all)
    by_pid = {pid: next(e["message"] for e in would if f"pid {pid} " in e["message"])
              for pid in [*checkout, nightly, reused]}  # fmt: skip
    checkout_pod = made["checkout-api"]["metadata"]["name"]
    assert f"{deployment} pod {checkout_pod}" in by_pid[checkout[0]]
    assert cron in by_pid[nightly]
    assert "unknown workload" in by_pid[reused] and "reused address" in by_pid[reused]
    assert "newcomer" in by_pid[reused]  # says which Pod holds the address now, and why not it
    assert not [e["message"] for e in would if f"pid {ledger} " in e["message"]]  # protected
    on_deployment = wait_until(
        "an Event on the Deployment itself",
        lambda: pgrelief_events(kube, ns, "Deployment"),
    )
    assert on_deployment[0]["involvedObject"]["name"] == "checkout-api"
    assert on_deployment[0]["involvedObject"]["uid"]
    assert on_deployment[0]["reason"] == "WouldTerminateBackend"
    assert (
        "would terminate (DryRun) 3 leaked connection(s) of this Deployment's pods"
        in (on_deployment[0]["message"])
    )
    assert pgrelief_events(kube, ns, "StatefulSet") == []  # protected: nothing would be done
    assert pgrelief_events(kube, ns, "Pod") == []  # the newcomer is not blamed
    assert alive(sessions.admin, [*checkout, ledger, nightly, reused]) == {
        *checkout,
        ledger,
        nightly,
        reused,
    }

    # 2. Enforce: the leaked sessions go, the protected workload's survives, and the owning
    # teams see it on their own objects.
    policy["spec"]["remediation"]["mode"] = "Enforce"
    apply(kube, policy)
    wait_until(
        "the leaked sessions terminated",
        lambda: not alive(sessions.admin, [*checkout, nightly, reused]),
    )
    assert alive(sessions.admin, [ledger]) == {ledger}
    terminated = wait_until(
        "BackendTerminated Events", lambda: events(kube, ns, "BackendTerminated")
    )
    text = " ".join(e["message"] for e in terminated)
    assert f"{deployment} pod {checkout_pod}" in text and cron in text
    on_cron = wait_until(
        "an Event on the CronJob",
        lambda: [e for e in pgrelief_events(kube, ns, "CronJob") if e["type"] == "Warning"],
    )
    assert on_cron[0]["involvedObject"]["name"] == "nightly-report"
    assert on_cron[0]["message"].startswith(
        "pgrelief terminated 1 leaked connection(s) of this CronJob's pods to database postgres"
    )
    assert f"ConnectionPolicy {ns}/orders" in on_cron[0]["message"]
    assert any(
        e["reason"] == "BackendsTerminated" and "pgrelief terminated 3 leaked" in e["message"]
        for e in pgrelief_events(kube, ns, "Deployment")
    )
    audit = [r for r in operator.audit() if r["outcome"] == "done"]
    assert {r["target"] for r in audit} >= {f"pid {p}" for p in [*checkout, nightly, reused]}


def test_no_workload_events_keeps_the_events_on_the_policy(
    kube_apiserver: KubeApiServer,
    kube_namespace: str,
    crds: None,
    tmp_path: Path,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    clients: dict[str, pods.PodClient],
) -> None:
    kube, ns = kube_apiserver, kube_namespace
    apply(kube, secret_manifest("pg-login", ns, "postgres", "unused"))
    process = OperatorProcess(kube, ns, tmp_path, args=("--standalone", "--no-workload-events"))
    process.start()
    try:
        pod = pods.deployment(kube, ns, "checkout-api")
        (ip,) = _distinct_ips(1)
        pods.run(kube, pod, ip)
        clients["app"] = pods.PodClient((pg_server.host, pg_server.port), ip)
        leaked = clients["app"].idle_in_transaction("app_backend", "shop")
        time.sleep(1.2)
        apply(kube, policy_manifest("orders", ns, host=pg_server.host, port=pg_server.port))
        wait_until("the leaked session terminated", lambda: not alive(sessions.admin, [leaked]))
        terminated = wait_until(
            "a BackendTerminated Event", lambda: events(kube, ns, "BackendTerminated")
        )
        assert f"Deployment {ns}/checkout-api" in terminated[0]["message"]
        time.sleep(1.5)  # the workload Event would follow in the same cycle
        assert pgrelief_events(kube, ns, "Deployment") == []
    finally:
        process.stop()


def _if(ok: bool, value: T) -> T | None:
    """``value`` once ``ok`` (a probe for wait_until that keeps its type)."""
    return value if ok else None


def _distinct_ips(count: int) -> list[str]:
    chosen: list[str] = []
    while len(chosen) < count:
        ip = pods.loopback_ip()
        if ip not in chosen:
            chosen.append(ip)
    return chosen
