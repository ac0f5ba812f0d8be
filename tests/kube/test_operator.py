"""The operator end to end: the test API server, a real PostgreSQL, ``pgrelief operator`` as a
local process, and only kubectl and SQL to drive and observe it.

Each test gets a namespace of its own and an operator watching just that namespace.
"""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from tests.fixtures.forwarder import Forwarder
from tests.fixtures.kube import KubeApiServer
from tests.fixtures.postgres import SessionFactory
from tests.kube.operator_harness import (
    OperatorProcess,
    apply,
    condition,
    events,
    free_port,
    get_policy,
    policy_manifest,
    secret_manifest,
    wait_condition,
    wait_peered,
    wait_until,
)
from tests.runs import alive

pytestmark = pytest.mark.kube


def _leak(sessions: SessionFactory, count: int) -> list[int]:
    pids = [sessions.idle_in_transaction("app_backend", "checkout-api").pid for _ in range(count)]
    time.sleep(1.2)
    return pids


def test_leaked_sessions_are_terminated_and_audited_as_events(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    ns = operator.namespace
    spared = sessions.idle("reporting", "dashboards")
    leaked = _leak(sessions, 3)
    apply(
        kube_apiserver,
        policy_manifest(
            "orders", ns, host=pg_server.host, port=pg_server.port,
            spec={"remediation": {
                "mode": "Enforce", "onlyUnderPressure": False,
                "terminate": {"idleInTransactionAfter": "1s"},
                "protect": {"roles": ["reporting"]},
            }},
        ),
    )  # fmt: skip
    wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
    assert alive(sessions.admin, [spared.pid]) == {spared.pid}
    terminated = wait_until(
        "BackendTerminated Events", lambda: events(kube_apiserver, ns, "BackendTerminated")
    )
    messages = " ".join(e["message"] for e in terminated)
    for pid in leaked:
        assert f"pid {pid}" in messages
    assert "role app_backend" in messages and "application 'checkout-api'" in messages
    assert "idle in transaction for" in messages and "client 127.0.0.1" in messages
    policy = wait_condition(kube_apiserver, ns, "orders", status="True")
    status = policy["status"]
    assert status["observedGeneration"] == policy["metadata"]["generation"]
    assert status["terminationsTotal"] >= 3 and len(status["recentTerminations"]) >= 3
    assert status["usableSlots"] == pg_server.usable_slots
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(
        condition(policy, "UnderPressure")
    )
    table = kube_apiserver.kubectl("get", "cpol", "-n", ns).stdout
    header = ["NAME", "READY", "PRESSURE", "UTILIZATION", "MODE", "AGE"]
    assert table.split("\n")[0].split() == header
    assert table.split("\n")[1].split()[:2] == ["orders", "True"]
    audit = operator.audit()
    assert {r["target"] for r in audit if r["outcome"] == "intent"} >= {f"pid {p}" for p in leaked}
    assert {r["target"] for r in audit if r["outcome"] == "done"} >= {f"pid {p}" for p in leaked}
    metrics = operator.metrics()
    assert f'pgrelief_actions_total{{action="terminate",namespace="{ns}"' in metrics
    assert "pgrelief_utilization_ratio" in metrics


def test_dry_run_terminates_nothing_and_says_what_it_would_do(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    ns = operator.namespace
    leaked = _leak(sessions, 2)
    apply(
        kube_apiserver,
        policy_manifest("dry", ns, host=pg_server.host, port=pg_server.port,
                        spec={"remediation": {"mode": "DryRun", "onlyUnderPressure": False,
                                              "terminate": {"idleInTransactionAfter": "1s"}}}),
    )  # fmt: skip
    would = wait_until(
        "WouldTerminateBackend Events", lambda: events(kube_apiserver, ns, "WouldTerminateBackend")
    )
    assert all("would terminate (DryRun)" in e["message"] for e in would)
    time.sleep(1.0)
    assert alive(sessions.admin, leaked) == set(leaked)
    assert events(kube_apiserver, ns, "BackendTerminated") == []
    policy = get_policy(kube_apiserver, ns, "dry")
    assert condition(policy, "Remediating")["reason"] == "DryRun"


@pytest.fixture
def limited_role(pg_server: EmbeddedPostgres) -> Iterator[str]:
    role = f"limits_{uuid.uuid4().hex[:6]}"
    pg_server.create_role(role)
    yield role
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def _role_limit(server: EmbeddedPostgres, role: str) -> tuple[int, list[str] | None]:
    with server.connect() as conn:
        row = conn.execute(
            "select rolconnlimit, rolconfig from pg_roles where rolname = %s", (role,)
        ).fetchone()
    assert row is not None
    return int(str(row[0])), row[1]  # type: ignore[return-value]


def test_role_limits_are_applied_then_reverted_on_delete(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    limited_role: str,
) -> None:
    ns = operator.namespace
    apply(
        kube_apiserver,
        policy_manifest("limits", ns, host=pg_server.host, port=pg_server.port, spec={
            "remediation": {"mode": "Enforce"},
            "limits": {"onDelete": "Revert", "roles": [
                {"name": limited_role, "connectionLimit": 7,
                 "idleInTransactionSessionTimeout": "30s"},
            ]},
        }),
    )  # fmt: skip
    wait_until("the role limit", lambda: _role_limit(pg_server, limited_role)[0] == 7)
    applied = wait_until("RoleLimitApplied", lambda: events(kube_apiserver, ns, "RoleLimitApplied"))
    assert limited_role in applied[0]["message"]
    originals = wait_until(
        "originals in status",
        lambda: get_policy(kube_apiserver, ns, "limits").get("status", {}).get("originals"),
    )
    assert originals[f"role:{limited_role}:connection_limit"] == "-1"
    kube_apiserver.kubectl("delete", "cpol", "limits", "-n", ns, "--timeout=60s")
    assert _role_limit(pg_server, limited_role) == (-1, None)
    reverted = wait_until("LimitsReverted", lambda: events(kube_apiserver, ns, "LimitsReverted"))
    assert limited_role in reverted[0]["message"]


def test_an_invalid_policy_is_reported_once_and_a_fix_recovers(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    limited_role: str,
) -> None:
    ns = operator.namespace
    too_long = "é" * 40  # 40 characters pass the CRD's maxLength; 80 bytes fail PostgreSQL's 63
    bad = policy_manifest(
        "invalid", ns, host=pg_server.host, port=pg_server.port,
        spec={"limits": {"roles": [{"name": too_long, "connectionLimit": 5}]}},
    )  # fmt: skip
    apply(kube_apiserver, bad)
    policy = wait_condition(kube_apiserver, ns, "invalid", reason="PolicyInvalid")
    assert "spec.limits.roles[0].name" in condition(policy, "Ready")["message"]
    time.sleep(2.0)  # many cycles' worth: still one Event, no retry storm
    invalid = events(kube_apiserver, ns, "PolicyInvalid")
    assert len(invalid) == 1 and invalid[0]["count"] == 1 and invalid[0]["type"] == "Warning"
    bad["spec"]["limits"]["roles"][0]["name"] = limited_role
    apply(kube_apiserver, bad)
    wait_condition(kube_apiserver, ns, "invalid", status="True")


def test_a_missing_secret_is_a_condition_until_it_is_created(
    kube_apiserver: KubeApiServer, operator: OperatorProcess, pg_server: EmbeddedPostgres
) -> None:
    ns = operator.namespace
    apply(kube_apiserver, policy_manifest("nosecret", ns, host=pg_server.host,
                                          port=pg_server.port, secret="later"))  # fmt: skip
    policy = wait_condition(kube_apiserver, ns, "nosecret", reason="CredentialsMissing")
    assert f"Secret {ns}/later" in condition(policy, "Ready")["message"]
    assert len(events(kube_apiserver, ns, "CredentialsMissing")) == 1
    apply(kube_apiserver, secret_manifest("later", ns, "postgres", "unused"))
    wait_condition(kube_apiserver, ns, "nosecret", status="True", timeout=60)
    assert operator.alive()


def test_a_rotated_password_is_picked_up_without_a_restart(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    ns = operator.namespace
    role = f"monitor_{uuid.uuid4().hex[:6]}"
    pg_server.create_role(
        role, password="first-Secret-1", member_of=["pg_signal_backend", "pg_read_all_stats"]
    )
    try:
        apply(kube_apiserver, secret_manifest("rotating", ns, role, "first-Secret-1"))
        apply(kube_apiserver, policy_manifest("rotate", ns, host=pg_server.host,
                                              port=pg_server.port, secret="rotating"))  # fmt: skip
        wait_condition(kube_apiserver, ns, "rotate", status="True")
        with pg_server.connect() as conn:
            conn.execute(
                sql.SQL("alter role {} password 'second-Secret-2'").format(sql.Identifier(role))
            )
            apply(kube_apiserver, secret_manifest("rotating", ns, role, "second-Secret-2"))
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (role,)
            )
        leaked = _leak(sessions, 1)
        wait_until(
            "a cycle on the new password", lambda: not alive(sessions.admin, leaked), timeout=60
        )
    finally:
        with pg_server.connect() as conn:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (role,)
            )
    logs = operator.logs()
    assert "first-Secret-1" not in logs and "second-Secret-2" not in logs
    for event in events(kube_apiserver, ns):
        assert "Secret-" not in event["message"]


def test_the_database_going_down_and_back_is_followed(
    kube_apiserver: KubeApiServer, operator: OperatorProcess, pg_server: EmbeddedPostgres
) -> None:
    ns = operator.namespace
    proxy = Forwarder((pg_server.host, pg_server.port)).open()
    try:
        apply(kube_apiserver, policy_manifest("flaky", ns, host="127.0.0.1", port=proxy.port))
        wait_condition(kube_apiserver, ns, "flaky", status="True")
        proxy.close()
        policy = wait_condition(kube_apiserver, ns, "flaky", reason="DatabaseUnreachable")
        assert policy["status"]["pressure"] == "unknown"
        wait_until("the Warning Event", lambda: events(kube_apiserver, ns, "DatabaseUnreachable"))
        proxy.open()
        wait_until(
            "DatabaseReachable", lambda: events(kube_apiserver, ns, "DatabaseReachable"), timeout=60
        )
        assert condition(get_policy(kube_apiserver, ns, "flaky"), "Ready")["status"] == "True"
        assert len(events(kube_apiserver, ns, "DatabaseUnreachable")) == 1
    finally:
        proxy.release()


def test_many_terminations_in_one_cycle_emit_bounded_events(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    ns = operator.namespace
    leaked = _leak(sessions, 15)
    apply(kube_apiserver, policy_manifest("storm", ns, host=pg_server.host, port=pg_server.port))
    wait_until("all leaked sessions gone", lambda: not alive(sessions.admin, leaked))
    summary = wait_until(
        "the summary Event", lambda: events(kube_apiserver, ns, "BackendsTerminated")
    )
    assert "terminated 15 sessions" in summary[0]["message"]
    assert len(events(kube_apiserver, ns, "BackendTerminated")) == 10


def test_a_restarted_operator_keeps_the_hourly_budget_from_status(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
) -> None:
    ns = operator.namespace
    leaked = _leak(sessions, 4)
    apply(kube_apiserver, policy_manifest("budget", ns, host=pg_server.host, port=pg_server.port,
          spec={"remediation": {"mode": "Enforce", "onlyUnderPressure": False,
                                "terminate": {"idleInTransactionAfter": "1s"},
                                "budget": {"maxPerCycle": 2, "maxPerHour": 2}}}))  # fmt: skip

    def recorded() -> int:
        status = get_policy(kube_apiserver, ns, "budget").get("status", {})
        return len(status.get("recentTerminations", []))

    wait_until("two terminations in status", lambda: recorded() == 2)
    operator.stop(signal.SIGKILL)
    survivors = alive(sessions.admin, leaked)
    assert len(survivors) == 2
    restarted = OperatorProcess(
        kube_apiserver, ns, operator.work_dir, args=("--standalone",)
    ).start()
    try:
        wait_until(
            "the restarted operator's first cycle", lambda: restarted.audit() or None, timeout=40
        )
        time.sleep(2.0)
        assert alive(sessions.admin, leaked) == survivors
        skipped = [r for r in restarted.audit() if r["outcome"] == "skipped"]
        assert any("maxPerHour 2" in r["detail"] for r in skipped)
    finally:
        restarted.stop()


def test_two_replicas_peer_and_exactly_one_acts(
    kube_apiserver: KubeApiServer,
    kube_namespace: str,
    crds: None,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    ns = kube_namespace
    apply(kube_apiserver, secret_manifest("pg-login", ns, "postgres", "unused"))
    apply(kube_apiserver, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                           "metadata": {"name": "pgrelief", "namespace": ns}})  # fmt: skip
    replicas = [OperatorProcess(kube_apiserver, ns, tmp_path).start() for _ in range(2)]
    try:
        wait_peered(kube_apiserver, ns, replicas)
        leaked = _leak(sessions, 4)
        apply(
            kube_apiserver, policy_manifest("peered", ns, host=pg_server.host, port=pg_server.port)
        )
        wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
        time.sleep(1.0)
        acting = [r for r in replicas if any(a["outcome"] == "done" for a in r.audit())]
        assert len(acting) == 1, [r.logs()[-2000:] for r in replicas]
        done = [a["target"] for r in replicas for a in r.audit() if a["outcome"] == "done"]
        assert sorted(done) == sorted(f"pid {p}" for p in leaked)  # no session killed twice
    finally:
        for replica in replicas:
            replica.stop()


def test_secrets_never_reach_status_events_or_logs(
    kube_apiserver: KubeApiServer, operator: OperatorProcess, pg_server: EmbeddedPostgres
) -> None:
    ns = operator.namespace
    apply(kube_apiserver, secret_manifest("badpw", ns, "no_such_role", "Hunter2-Secret"))
    apply(kube_apiserver, policy_manifest("leaky", ns, host=pg_server.host, port=pg_server.port,
                                          secret="badpw"))  # fmt: skip
    wait_until(
        "Ready=False",
        lambda: (
            condition(get_policy(kube_apiserver, ns, "leaky"), "Ready").get("status") == "False"
        ),
    )
    everything = json.dumps(get_policy(kube_apiserver, ns, "leaky")) + json.dumps(
        events(kube_apiserver, ns)
    )
    everything += operator.logs() + operator.metrics()
    assert "Hunter2-Secret" not in everything
    assert base64.b64encode(b"Hunter2-Secret").decode() not in everything


def test_liveness_endpoint_and_json_logs(
    kube_apiserver: KubeApiServer, kube_namespace: str, crds: None, tmp_path: Path
) -> None:
    port = free_port()
    process = OperatorProcess(
        kube_apiserver,
        kube_namespace,
        tmp_path,
        args=(
            "--standalone",
            "--log-format",
            "json",
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ),
    ).start()
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("kopf's liveness endpoint", healthy)
    finally:
        process.stop()
    lines = [line for line in process.logs().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["message"] for line in lines)
