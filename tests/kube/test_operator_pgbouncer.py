"""The operator reconciles a policy's PgBouncer, and what it writes runs as a real pooler.

The operator (a local process) writes the ConfigMap, Service, PodDisruptionBudget and
Deployment into the test API server; the test then runs Debian's pgbouncer with exactly the
ConfigMap and Deployment read back from the server (``LocalPgBouncer.from_pod``) and pushes
real clients through it.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from psycopg import sql

from pgrelief import act
from pgrelief._dev.pgbouncer import LocalPgBouncer, pgbouncer_version
from pgrelief.manifests.common import object_name
from pgrelief.pgbouncer_auth import install_statements
from pgrelief.pgbouncer_ini import format_version
from pgrelief.policy import validate_spec
from tests.fixtures.kube import KubeApiServer
from tests.fixtures.pgbouncer import AUTH_SECRET, PooledServer
from tests.kube.operator_harness import (
    OperatorProcess,
    apply,
    condition,
    events,
    get_policy,
    policy_manifest,
    secret_manifest,
    wait_condition,
    wait_until,
)

pytestmark = [pytest.mark.kube, pytest.mark.pgbouncer]

KINDS = ("configmap", "service", "poddisruptionbudget", "deployment")


def _get(kube: KubeApiServer, kind: str, name: str, namespace: str) -> dict[str, Any]:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _pgbouncer_spec(server: PooledServer, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "enabled": True,
        "replicas": 1,
        "version": format_version(pgbouncer_version()),
        "databases": [server.database],
        "users": [server.app_role],
        "maxClientConn": 200,
        "auth": {
            "authQuery": {
                "user": server.auth_role,
                "passwordSecret": {"name": AUTH_SECRET[0], "key": AUTH_SECRET[1]},
            }
        },
    }
    spec.update(changes)
    return spec


def test_the_operator_reconciles_a_pgbouncer_that_really_pools(
    kube_apiserver: KubeApiServer, operator: OperatorProcess, pooled_server: PooledServer
) -> None:
    kube, ns, pg = kube_apiserver, operator.namespace, pooled_server.pg
    name = object_name("shop")
    apply(kube, secret_manifest(AUTH_SECRET[0], ns, "unused", pooled_server.auth_password))
    kube.kubectl("patch", "secret", AUTH_SECRET[0], "-n", ns, "--type=json", "-p", json.dumps(
        [{"op": "add", "path": f"/data/{AUTH_SECRET[1]}",
          "value": base64.b64encode(pooled_server.auth_password.encode()).decode()}]
    ))  # fmt: skip
    query = validate_spec({"pgbouncer": _pgbouncer_spec(pooled_server)}).pgbouncer.auth.auth_query
    assert query is not None
    with pg.connect(dbname=pooled_server.database) as conn:  # a DBA has not installed it yet
        conn.execute(
            sql.SQL("drop function if exists {}.{}(text)").format(
                sql.Identifier(query.schema_name), sql.Identifier(query.function)
            )
        )
    policy = policy_manifest(
        "shop", ns, host=pg.host, port=pg.port,
        spec={"remediation": {"mode": "DryRun"}, "pgbouncer": _pgbouncer_spec(pooled_server)},
    )  # fmt: skip
    apply(kube, policy)

    # 1. The lookup function is missing: a condition with the SQL, and nothing applied.
    missing = wait_condition(kube, ns, "shop", "PgBouncerReady", reason="AuthFunctionMissing")
    message = condition(missing, "PgBouncerReady")["message"]
    assert "security definer" in message and _get(kube, "configmap", name, ns) == {}
    with pg.connect(dbname=pooled_server.database) as conn:
        for statement in install_statements(query):
            conn.execute(act.composed(statement))

    # 2. Installed: the four objects, owned by the policy, and the Event saying so.
    wait_until("the Deployment", lambda: _get(kube, "deployment", name, ns), timeout=60)
    uid = get_policy(kube, ns, "shop")["metadata"]["uid"]
    stored = {kind: _get(kube, kind, name, ns) for kind in KINDS}
    for kind, body in stored.items():
        assert body["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    reconciled = wait_until("PgBouncerReconciled", lambda: events(kube, ns, "PgBouncerReconciled"))
    assert "server connections at most" in reconciled[0]["message"]
    waiting = wait_condition(kube, ns, "shop", "PgBouncerReady", reason="ReplicasUnavailable")
    assert "0/1 PgBouncer replicas available" in condition(waiting, "PgBouncerReady")["message"]

    # 3. What the operator wrote runs: real clients through Debian's pgbouncer, and the
    # server never sees more connections than the pool the budget computed.
    with LocalPgBouncer.from_pod(
        stored["configmap"], stored["deployment"], secrets=pooled_server.secrets()
    ) as pod:
        run = pooled_server.pgbench(["-S", "-t", "20"], port=pod.port, clients=50)
        assert run.completed, run.stderr[-500:]

    # 4. A hand edit of the ConfigMap is put back.
    ini = stored["configmap"]["data"]
    kube.kubectl("patch", "configmap", name, "-n", ns, "--type=merge",
                 "-p", json.dumps({"data": {"pgbouncer.ini": "[pgbouncer]\n"}}))  # fmt: skip
    wait_until("the ConfigMap put back", lambda: _get(kube, "configmap", name, ns)["data"] == ini)

    # 5. A spec change rewrites the config and rolls the pods (a new config checksum).
    before = stored["deployment"]["spec"]["template"]["metadata"]["annotations"]
    policy["spec"]["pgbouncer"]["maxClientConn"] = 300
    apply(kube, policy)

    def ini_now() -> str:
        return str(_get(kube, "configmap", name, ns)["data"]["pgbouncer.ini"])

    wait_until("max_client_conn = 300", lambda: "max_client_conn = 300" in ini_now())
    after = _get(kube, "deployment", name, ns)["spec"]["template"]["metadata"]["annotations"]
    assert after != before
    # The controller manager really rolls it: a new ReplicaSet for the new config.
    wait_until("a second ReplicaSet", lambda: len(_replica_sets(kube, name, ns)) == 2)

    # 6. Oversubscribed: a condition and a Warning saying by how much; nothing applied.
    current = _get(kube, "configmap", name, ns)
    policy["spec"]["pgbouncer"]["defaultPoolSize"] = 500
    apply(kube, policy)
    over = wait_condition(kube, ns, "shop", "PgBouncerReady", reason="PoolOversubscribed")
    assert "fit" in condition(over, "PgBouncerReady")["message"]
    assert len(events(kube, ns, "PoolOversubscribed")) == 1
    time.sleep(1.0)
    assert _get(kube, "configmap", name, ns)["data"] == current["data"]

    # 7. Disabled: the objects are removed and the condition is gone.
    policy["spec"]["pgbouncer"] = {"enabled": False}
    apply(kube, policy)
    wait_until(
        "the objects removed", lambda: all(_get(kube, kind, name, ns) == {} for kind in KINDS)
    )
    policy_now = get_policy(kube, ns, "shop")
    assert condition(policy_now, "PgBouncerReady") == {}

    # 8. Enabled again, then the policy deleted: garbage collection takes the pooler with it.
    policy["spec"]["pgbouncer"] = _pgbouncer_spec(pooled_server)
    apply(kube, policy)
    wait_until("the Deployment again", lambda: _get(kube, "deployment", name, ns), timeout=60)
    kube.kubectl("delete", "cpol", "shop", "-n", ns, "--timeout=60s")
    wait_until(
        "the pooler collected with its policy",
        lambda: (
            all(_get(kube, kind, name, ns) == {} for kind in KINDS)
            and not _replica_sets(kube, name, ns)
        ),
        timeout=60,
    )


def _replica_sets(kube: KubeApiServer, name: str, namespace: str) -> list[dict[str, Any]]:
    out = kube.kubectl(
        "get", "replicasets", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}",
        "-o", "json",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items
