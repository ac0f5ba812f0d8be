"""Through the PgBouncer pgrelief manages, sessions are still placed on the applications' Pods.

PostgreSQL sees only the pooler's address. The operator reads the pooler's admin console as
the auth_query role (a ``stats_users`` of the config it writes): SHOW SERVERS links a backend
pid to the client it serves, SHOW CLIENTS gives that client's address (the application Pod),
and SHOW POOLS the clients waiting for a server connection. Debian's pgbouncer runs with the
ConfigMap and Deployment the operator wrote, listening on its Pod's own (loopback) IP; the
application Pod's clients reach it from their Pod IP through a source-bound forwarder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgrelief import act
from pgrelief._dev.pgbouncer import LocalPgBouncer, pgbouncer_version
from pgrelief.manifests.common import object_name
from pgrelief.pgbouncer_auth import install_statements
from pgrelief.pgbouncer_ini import DEFAULT_LISTEN_PORT, format_version
from pgrelief.policy import validate_spec
from tests.fixtures.kube import KubeApiServer
from tests.fixtures.pgbouncer import AUTH_SECRET, PooledServer
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

pytestmark = [pytest.mark.kube, pytest.mark.pgbouncer]


def _get(kube: KubeApiServer, kind: str, name: str, namespace: str) -> dict[str, Any]:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


@pytest.fixture
def clients() -> Iterator[list[pods.PodClient]]:
    opened: list[pods.PodClient] = []
    yield opened
    for client in opened:
        client.close()


def test_sessions_behind_the_pooler_name_the_application_and_waiting_clients_are_pressure(
    kube_apiserver: KubeApiServer,
    operator: OperatorProcess,
    pooled_server: PooledServer,
    clients: list[pods.PodClient],
) -> None:
    kube, ns, pg, server = kube_apiserver, operator.namespace, pooled_server.pg, pooled_server
    apply(kube, secret_manifest(AUTH_SECRET[0], ns, "unused", server.auth_password))
    pgbouncer = {
        "enabled": True, "replicas": 1, "version": format_version(pgbouncer_version()),
        "databases": [server.database], "users": [server.app_role],
        "defaultPoolSize": 1, "reservePoolSize": 0, "maxClientConn": 50,
        "auth": {"authQuery": {"user": server.auth_role,
                               "passwordSecret": {"name": AUTH_SECRET[0], "key": AUTH_SECRET[1]}}},
    }  # fmt: skip
    query = validate_spec({"pgbouncer": pgbouncer}).pgbouncer.auth.auth_query
    assert query is not None
    with pg.connect(dbname=server.database) as conn:
        for statement in install_statements(query):
            conn.execute(act.composed(statement))
    apply(kube, policy_manifest(
        "shop", ns, host=pg.host, port=pg.port,
        spec={"remediation": {"mode": "DryRun", "onlyUnderPressure": False,
                              "terminate": {"idleInTransactionAfter": "1s"}},
              "pgbouncer": pgbouncer},
    ))  # fmt: skip

    # The operator writes the pooler; the controller manager makes its Pod, which "runs" as
    # Debian's pgbouncer on the Pod's IP with what the operator wrote.
    name = object_name("shop")
    deployment = wait_until("the pooler", lambda: _get(kube, "deployment", name, ns), timeout=60)
    config_map = _get(kube, "configmap", name, ns)
    assert "stats_users = " + server.auth_role in config_map["data"]["pgbouncer.ini"]
    pooler_pod = pods.pod_of(kube, ns, {"app.kubernetes.io/instance": name})
    pooler_ip, app_ip = pods.loopback_ip(), pods.loopback_ip()
    assert pooler_ip != app_ip
    pods.run(kube, pooler_pod, pooler_ip)
    app_pod = pods.deployment(kube, ns, "storefront")
    pods.run(kube, app_pod, app_ip)
    with LocalPgBouncer.from_pod(
        config_map, deployment, secrets=server.secrets(), listen=(pooler_ip, DEFAULT_LISTEN_PORT)
    ) as pooler:
        assert pooler.port == DEFAULT_LISTEN_PORT
        app = pods.PodClient((pooler_ip, DEFAULT_LISTEN_PORT), app_ip)
        clients.append(app)
        login = {"dbname": server.database, "password": server.app_password}
        # One client holds the pool's only server connection, idle in transaction ...
        app.idle_in_transaction(server.app_role, "storefront", **login)
        # ... so the next one's query waits in PgBouncer for it (cl_waiting, maxwait).
        waiting = app.connect(server.app_role, "storefront", **login)
        waiting.pgconn.send_query(b"select 1")
        waiting.pgconn.flush()
        with pg.connect() as admin:
            (held,) = admin.execute(
                "select pid from pg_stat_activity where usename = %s and state = %s",
                (server.app_role, "idle in transaction"),
            ).fetchone() or (None,)
        assert held is not None

        workload = f"Deployment {ns}/storefront"
        found = wait_until(
            "the storefront behind the pooler in status.workloads",
            lambda: [
                w for w in (get_policy(kube, ns, "shop").get("status") or {}).get("workloads") or []
                if (w["kind"], w["name"]) == ("Deployment", "storefront")
            ],
            timeout=60,
        )  # fmt: skip
        assert found[0]["count"] == 1 and found[0]["byState"] == {"idle in transaction": 1}
        would = wait_until(
            "a WouldTerminateBackend Event for the pooled session",
            lambda: [
                e for e in events(kube, ns, "WouldTerminateBackend")
                if f"pid {held} " in e["message"]
            ],
        )  # fmt: skip
        pod_name = pooler_pod["metadata"]["name"]
        via = f"{workload} pod {app_pod['metadata']['name']} via PgBouncer {pod_name}"
        assert via in would[0]["message"]
        finding = wait_until(
            "the pooler_waiting finding in status",
            lambda: [
                f for f in (get_policy(kube, ns, "shop").get("status") or {}).get("findings") or []
                if "pooler_waiting" in f
            ],
        )  # fmt: skip
        assert "1 PgBouncer client(s) wait for a server connection in 1 pool(s)" in finding[0]
        samples = {
            (s.name, s.labels.get("pooler_pod")): s.value
            for family in text_string_to_metric_families(operator.metrics())
            for s in family.samples
            if s.labels.get("policy") == "shop"
        }
        assert samples[("pgrelief_pooler_clients_waiting", pod_name)] == 1
        assert samples[("pgrelief_pooler_max_wait_seconds", pod_name)] >= 1
