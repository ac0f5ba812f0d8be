"""The operator end to end under exactly the chart's RBAC: ``helm install`` on the test API
server, then ``pgrelief`` started with the Deployment's own arguments and a token of the
chart's ServiceAccount (never the admin's). Every test also fails on any refused API call in
the operator's log, so a rule the chart lacks cannot hide behind kopf's retries.

The test API server runs no pods: the operator runs as a local process, as in test_operator.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from tests.fixtures.kube import KubeApiServer, build_testenv, start_apiserver
from tests.fixtures.postgres import SessionFactory
from tests.kube.chart import ChartOperator, Release, find, installed, operator_args, render
from tests.kube.operator_harness import (
    CRD_FILES,
    PAUSED_LOG,
    apply,
    condition,
    events,
    get_policy,
    policy_manifest,
    secret_manifest,
    wait_condition,
    wait_peered,
    wait_until,
)
from tests.kube.promql import Exported, problems
from tests.runs import alive

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def crds(kube_apiserver: KubeApiServer) -> None:
    for path in CRD_FILES:
        kube_apiserver.kubectl("apply", "--server-side", "-f", str(path))
    kube_apiserver.kubectl(
        "wait", "--for=condition=Established", "crd/connectionpolicies.pgrelief.dev"
    )


@dataclass
class Installed:
    """A release watching its own namespace, and how to start operators under its account."""

    kube: KubeApiServer
    release: Release
    kubeconfig: Path
    work_dir: Path
    started: list[ChartOperator]

    @property
    def namespace(self) -> str:
        return self.release.namespace

    def operator(self, *extra: str) -> ChartOperator:
        args = (*operator_args(self.release.manifests()), *extra)
        process = ChartOperator(
            self.kube, self.namespace, self.work_dir, kubeconfig=self.kubeconfig, chart_args=args
        )
        self.started.append(process.start())
        return process


@pytest.fixture
def chart(
    kube_apiserver: KubeApiServer, kube_namespace: str, crds: None, tmp_path: Path
) -> Iterator[Installed]:
    with installed(kube_apiserver, kube_namespace) as release:
        apply(kube_apiserver, secret_manifest("pg-login", kube_namespace, "postgres", "unused"))
        setup = Installed(
            kube_apiserver, release, release.service_account_kubeconfig(), tmp_path, []
        )
        try:
            yield setup
        finally:
            for process in setup.started:
                process.stop()


def _no_refusals(*operators: ChartOperator) -> None:
    for process in operators:
        assert process.forbidden() == [], process.logs()[-3000:]


def _scrape(operator: ChartOperator) -> str:
    try:
        return operator.metrics()
    except OSError:  # not listening yet
        return ""


def _leak(sessions: SessionFactory, count: int) -> list[int]:
    pids = [sessions.idle_in_transaction("app_backend", "checkout-api").pid for _ in range(count)]
    time.sleep(1.2)
    return pids


def _named(kube: KubeApiServer, ns: str, policy: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events(kube, ns, reason) if e["involvedObject"]["name"] == policy]


def test_terminations_events_status_and_probes_under_the_chart_rbac(
    chart: Installed, pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    kube, ns = chart.kube, chart.namespace
    operator = chart.operator()
    leaked = _leak(sessions, 3)
    apply(kube, policy_manifest("orders", ns, host=pg_server.host, port=pg_server.port))
    wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
    terminated = wait_until(
        "BackendTerminated Events", lambda: _named(kube, ns, "orders", "BackendTerminated")
    )
    assert {e["reportingInstance"] for e in terminated} == {operator.pod_name}
    messages = " ".join(e["message"] for e in terminated)
    assert all(f"pid {pid}" in messages for pid in leaked)
    policy = wait_condition(kube, ns, "orders", status="True")
    assert policy["status"]["terminationsTotal"] >= 3
    assert "pgrelief.dev/finalizer" in policy["metadata"]["finalizers"]
    audit = operator.audit()
    assert {r["target"] for r in audit if r["outcome"] == "done"} >= {f"pid {p}" for p in leaked}
    with urllib.request.urlopen(
        f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5
    ) as probe:
        assert probe.status == 200
    assert f'pgrelief_policy_ready{{namespace="{ns}",policy="orders"}} 1.0' in operator.metrics()
    _no_refusals(operator)


@pytest.fixture
def limited_role(pg_server: EmbeddedPostgres) -> Iterator[str]:
    role = f"limits_{uuid.uuid4().hex[:6]}"
    pg_server.create_role(role)
    yield role
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def _connection_limit(server: EmbeddedPostgres, role: str) -> int:
    with server.connect() as conn:
        row = conn.execute("select rolconnlimit from pg_roles where rolname = %s", (role,))
        found = row.fetchone()
    assert found is not None
    return int(str(found[0]))


def test_limits_applied_then_reverted_on_delete_under_the_chart_rbac(
    chart: Installed, pg_server: EmbeddedPostgres, limited_role: str
) -> None:
    kube, ns = chart.kube, chart.namespace
    operator = chart.operator()
    apply(
        kube,
        policy_manifest(
            "limits",
            ns,
            host=pg_server.host,
            port=pg_server.port,
            spec={
                "remediation": {"mode": "Enforce"},
                "limits": {
                    "onDelete": "Revert",
                    "roles": [{"name": limited_role, "connectionLimit": 7}],
                },
            },
        ),
    )
    wait_until("the role limit", lambda: _connection_limit(pg_server, limited_role) == 7)
    wait_until("RoleLimitApplied", lambda: _named(kube, ns, "limits", "RoleLimitApplied"))
    wait_until(
        "originals in status",
        lambda: get_policy(kube, ns, "limits").get("status", {}).get("originals"),
    )
    kube.kubectl("delete", "cpol", "limits", "-n", ns, "--timeout=60s")
    assert _connection_limit(pg_server, limited_role) == -1
    wait_until("LimitsReverted", lambda: _named(kube, ns, "limits", "LimitsReverted"))
    _no_refusals(operator)


def test_dry_run_and_a_missing_secret_under_the_chart_rbac(
    chart: Installed, pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    kube, ns = chart.kube, chart.namespace
    operator = chart.operator()
    leaked = _leak(sessions, 2)
    apply(
        kube,
        policy_manifest(
            "dry",
            ns,
            host=pg_server.host,
            port=pg_server.port,
            spec={
                "remediation": {
                    "mode": "DryRun",
                    "onlyUnderPressure": False,
                    "terminate": {"idleInTransactionAfter": "1s"},
                }
            },
        ),
    )
    apply(
        kube,
        policy_manifest("nosecret", ns, host=pg_server.host, port=pg_server.port, secret="later"),
    )
    wait_until("WouldTerminateBackend", lambda: _named(kube, ns, "dry", "WouldTerminateBackend"))
    assert alive(sessions.admin, leaked) == set(leaked)
    assert condition(get_policy(kube, ns, "dry"), "Remediating")["reason"] == "DryRun"
    policy = wait_condition(kube, ns, "nosecret", reason="CredentialsMissing")
    assert f"Secret {ns}/later" in condition(policy, "Ready")["message"]
    assert len(_named(kube, ns, "nosecret", "CredentialsMissing")) == 1
    apply(kube, secret_manifest("later", ns, "postgres", "unused"))
    wait_condition(kube, ns, "nosecret", status="True", timeout=60)
    _no_refusals(operator)


def test_two_replicas_peer_under_the_chart_rbac(
    chart: Installed, pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    """The chart's KopfPeering object and peering rules: exactly one replica acts."""
    kube, ns = chart.kube, chart.namespace
    kube.kubectl("get", "kopfpeering", "pgrelief", "-n", ns)
    replicas = [chart.operator(), chart.operator()]
    wait_peered(kube, ns, list(replicas))
    leaked = _leak(sessions, 4)
    apply(kube, policy_manifest("peered", ns, host=pg_server.host, port=pg_server.port))
    wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
    time.sleep(1.0)
    acting = [r for r in replicas if any(a["outcome"] == "done" for a in r.audit())]
    assert len(acting) == 1, [r.logs()[-2000:] for r in replicas]
    done = [a["target"] for r in replicas for a in r.audit() if a["outcome"] == "done"]
    assert sorted(done) == sorted(f"pid {p}" for p in leaked)
    peering = json.loads(
        kube.kubectl("get", "kopfpeering", "pgrelief", "-n", ns, "-o", "json").stdout
    )
    assert len(peering.get("status", {})) == 2  # both replicas keep their entry alive
    _no_refusals(*replicas)


def _drop_rule(
    kube: KubeApiServer, release: Release, keep: Callable[[dict[str, Any]], bool]
) -> None:
    ns, name = release.namespace, release.fullname
    role = json.loads(kube.kubectl("get", "role", name, "-n", ns, "-o", "json").stdout)
    before = len(role["rules"])
    role["rules"] = [rule for rule in role["rules"] if keep(rule)]
    assert len(role["rules"]) == before - 1
    kube.kubectl("replace", "-f", "-", input=json.dumps(role))


def test_without_reading_secrets_the_policy_says_403(
    chart: Installed, pg_server: EmbeddedPostgres
) -> None:
    kube, ns = chart.kube, chart.namespace
    _drop_rule(kube, chart.release, lambda rule: rule["resources"] != ["secrets"])
    operator = chart.operator()
    apply(kube, policy_manifest("blind", ns, host=pg_server.host, port=pg_server.port))
    policy = wait_condition(kube, ns, "blind", status="False")
    message = condition(policy, "Ready")["message"]
    assert f"reading Secret {ns}/pg-login: HTTP 403 Forbidden" in message, message
    assert operator.alive()


def test_without_writing_status_ready_never_comes_and_the_log_says_403(
    chart: Installed, pg_server: EmbeddedPostgres
) -> None:
    kube, ns = chart.kube, chart.namespace
    _drop_rule(kube, chart.release, lambda rule: rule["resources"] != ["connectionpolicies/status"])
    operator = chart.operator()
    apply(kube, policy_manifest("mute", ns, host=pg_server.host, port=pg_server.port))
    refusal = f"could not write the status: patching the status of ConnectionPolicy {ns}/mute"
    wait_until("the refused status write in the log", lambda: refusal in operator.logs())
    assert "HTTP 403 Forbidden" in operator.logs()
    assert "status" not in get_policy(kube, ns, "mute")  # Ready never appears, let alone True
    assert operator.forbidden()


# Series Prometheus adds itself for every target a ServiceMonitor scrapes.
PROMETHEUS_SERIES = {"up": {"job", "namespace", "instance", "pod", "service"}}
_LABEL_VALUES = re.compile(r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)")


def test_every_alert_and_panel_names_what_the_operator_exports(
    chart: Installed, pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    """Scrape an operator that has terminated sessions and failed cycles, then read every
    metric, label and label value the PrometheusRule and the dashboard refer to in it."""
    kube, ns = chart.kube, chart.namespace
    operator = chart.operator()
    leaked = _leak(sessions, 2)
    apply(kube, policy_manifest("busy", ns, host=pg_server.host, port=pg_server.port))
    apply(
        kube, policy_manifest("lost", ns, host=pg_server.host, port=pg_server.port, secret="absent")
    )
    wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
    wait_condition(kube, ns, "lost", reason="CredentialsMissing")
    exported = Exported.parse(operator.metrics())
    assert {
        "pgrelief_actions_total",
        "pgrelief_cycle_failures_total",
        "pgrelief_cycle_duration_seconds_bucket",
    } <= set(exported.labels)

    docs = render(
        {
            "metrics": {
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
                "dashboard": {"enabled": True},
            }
        }
    )
    found: list[str] = []
    (rule_object,) = find(docs, "PrometheusRule")
    alerts = [r for g in rule_object["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 6
    for alert in alerts:
        for problem in problems(
            alert["expr"],
            exported,
            extra=PROMETHEUS_SERIES,
            templates=json.dumps(alert["annotations"]),
        ):
            found.append(f"alert {alert['alert']}: {problem}")
    dashboard = json.loads(find(docs, "ConfigMap")[0]["data"]["pgrelief.json"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            found += [f"panel {panel['title']!r}: {p}" for p in problems(expr, exported)]
    for variable in dashboard["templating"]["list"]:
        for metric, label in _LABEL_VALUES.findall(json.dumps(variable.get("query", ""))):
            if label not in exported.labels.get(metric, {}):
                found.append(f"variable {variable['name']}: {metric} has no label {label}")
    assert found == []
    _no_refusals(operator)


def test_a_replica_paused_by_peering_stops_exporting_the_policy(
    chart: Installed, pg_server: EmbeddedPostgres
) -> None:
    """The alerts take the max over replicas: a standby must not keep its last values."""
    kube, ns = chart.kube, chart.namespace
    first = chart.operator("--priority=10")
    apply(kube, policy_manifest("handover", ns, host=pg_server.host, port=pg_server.port))
    series = f'pgrelief_utilization_ratio{{namespace="{ns}",policy="handover"}}'
    wait_until("the first replica's series", lambda: series in _scrape(first))
    second = chart.operator("--priority=100")
    wait_until("the second replica's series", lambda: series in _scrape(second), timeout=60)
    wait_until("the paused replica to drop its series", lambda: series not in first.metrics())
    assert PAUSED_LOG in first.logs()
    _no_refusals(first, second)


@pytest.fixture(scope="module")
def own_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    """An API server of its own: an operator watching every namespace must not meet the
    policies other tests leave behind (it would add its finalizer to them, and dial them)."""
    server = start_apiserver(build_testenv(), tmp_path_factory.mktemp("own-apiserver"))
    try:
        yield server
    finally:
        server.stop()


def test_cluster_wide_under_the_chart_cluster_role(
    own_apiserver: KubeApiServer,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    kube = own_apiserver
    for path in CRD_FILES:
        kube.kubectl("apply", "--server-side", "-f", str(path))
    kube.kubectl("wait", "--for=condition=Established", "crd/connectionpolicies.pgrelief.dev")
    kube.kubectl("create", "namespace", "ops")
    kube.kubectl("create", "namespace", "team-a")
    with installed(kube, "ops", {"watch": {"allNamespaces": True}}) as release:
        assert (
            kube.kubectl(
                "get", "role", "-A", "-l", f"app.kubernetes.io/instance={release.name}"
            ).stdout
            == ""
        )
        kube.kubectl("get", "clusterkopfpeering", "pgrelief")
        args = operator_args(release.manifests())
        assert "--all-namespaces" in args
        operator = ChartOperator(
            kube,
            "team-a",
            tmp_path,
            chart_args=tuple(args),
            kubeconfig=release.service_account_kubeconfig(),
        ).start()
        try:
            apply(kube, secret_manifest("pg-login", "team-a", "postgres", "unused"))
            leaked = _leak(sessions, 2)
            apply(kube, policy_manifest("wide", "team-a", host=pg_server.host, port=pg_server.port))
            wait_until("the leaked sessions to be gone", lambda: not alive(sessions.admin, leaked))
            wait_condition(kube, "team-a", "wide", status="True")
            wait_until(
                "BackendTerminated", lambda: _named(kube, "team-a", "wide", "BackendTerminated")
            )
            kube.kubectl("delete", "cpol", "wide", "-n", "team-a", "--timeout=60s")
            _no_refusals(operator)
        finally:
            operator.stop()


PGBOUNCER_KINDS = ("configmap", "service", "poddisruptionbudget", "deployment")


def _stored(kube: KubeApiServer, kind: str, name: str, ns: str) -> dict[str, Any]:
    out = kube.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def test_pgbouncer_reconcile_under_the_chart_rbac(
    chart: Installed, pg_server: EmbeddedPostgres
) -> None:
    """The four PgBouncer objects created, a hand edit put back, and all removed when the
    policy turns PgBouncer off: server-side apply, reads, watches and deletes the Role allows."""
    kube, ns = chart.kube, chart.namespace
    operator = chart.operator()
    bouncer = {
        "enabled": True,
        "replicas": 1,
        "maxClientConn": 50,
        "defaultPoolSize": 2,
        "reservePoolSize": 0,
        "databases": ["postgres"],
        "users": ["app_backend"],
        "auth": {"userlistSecret": {"name": "userlist", "key": "userlist.txt"}},
    }
    policy = policy_manifest(
        "shop",
        ns,
        host=pg_server.host,
        port=pg_server.port,
        spec={"remediation": {"mode": "DryRun"}, "pgbouncer": bouncer},
    )
    apply(kube, policy)
    name = "shop-pgbouncer"
    wait_until(
        "the four objects",
        lambda: all(_stored(kube, k, name, ns) for k in PGBOUNCER_KINDS),
        timeout=60,
    )
    uid = get_policy(kube, ns, "shop")["metadata"]["uid"]
    assert _stored(kube, "deployment", name, ns)["metadata"]["ownerReferences"][0]["uid"] == uid
    ini = _stored(kube, "configmap", name, ns)["data"]
    kube.kubectl(
        "patch",
        "configmap",
        name,
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"data": {"pgbouncer.ini": "[pgbouncer]\n"}}),
    )
    wait_until(
        "the ConfigMap put back", lambda: _stored(kube, "configmap", name, ns)["data"] == ini
    )
    policy["spec"]["pgbouncer"] = {"enabled": False}
    apply(kube, policy)
    wait_until(
        "the objects removed", lambda: not any(_stored(kube, k, name, ns) for k in PGBOUNCER_KINDS)
    )
    _no_refusals(operator)
