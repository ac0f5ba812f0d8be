"""The e2e cluster is a real one: pods run from the locally built images, readiness probes
gate a Deployment, a ClusterIP Service balances across its pods, ``kubectl logs`` and ``exec``
reach the containers, and a PgBouncer pod from the Debian image serves real PostgreSQL
connections from an application pod."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fixtures.e2e import E2ECluster, NetnsPostgres, deployment

pytestmark = pytest.mark.e2e

WEB_PORT = 8080


def service(name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target}]},
    }


def probe_pod(cluster: E2ECluster, ns: str) -> str:
    """An application pod to run clients from; returns its name once Ready."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "containers": [
                {
                    "name": "probe",
                    "image": cluster.image("client"),
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "infinity"],
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }
    cluster.apply(pod, namespace=ns)
    cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/probe", "--timeout=120s")
    return "probe"


def in_pod(cluster: E2ECluster, ns: str, pod: str, code: str) -> str:
    return cluster.kubectl("exec", "-n", ns, pod, "--", "python3", "-c", code).stdout


def test_deployment_becomes_ready_and_its_service_balances_across_pods(
    e2e_cluster: E2ECluster, e2e_namespace: str
) -> None:
    cluster, ns = e2e_cluster, e2e_namespace
    web = deployment(
        "web",
        cluster.image("client"),
        2,
        # Each pod serves its own name, so the test can tell which one answered.
        command=["sh", "-c", f"hostname > index.html && exec python3 -m http.server {WEB_PORT}"],
        readinessProbe={"httpGet": {"path": "/", "port": WEB_PORT}, "periodSeconds": 1},
        securityContext={"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    )
    cluster.apply(web, service("web", 80, WEB_PORT), namespace=ns)
    cluster.kubectl("rollout", "status", "-n", ns, "deployment/web", "--timeout=120s")
    deploy = json.loads(cluster.kubectl("get", "-n", ns, "deployment/web", "-o", "json").stdout)
    assert deploy["status"]["readyReplicas"] == 2
    pods = json.loads(
        cluster.kubectl("get", "-n", ns, "pods", "-l", "app=web", "-o", "json").stdout
    )
    names = {p["metadata"]["name"] for p in pods["items"]}
    assert len(names) == 2
    assert all(p["status"]["podIP"].startswith("10.244.0.") for p in pods["items"])

    cluster_ip = json.loads(cluster.kubectl("get", "-n", ns, "svc/web", "-o", "json").stdout)[
        "spec"
    ]["clusterIP"]
    probe = probe_pod(cluster, ns)
    answers = in_pod(
        cluster,
        ns,
        probe,
        "import urllib.request\n"
        f"for _ in range(40): print(urllib.request.urlopen('http://{cluster_ip}/').read().decode().strip())",
    ).split()
    assert set(answers) == names  # kube-proxy spread 40 requests over both ready pods

    # The Service's address reaches pods as the kubelet's environment variables too.
    env = in_pod(cluster, ns, probe, "import os; print(os.environ['WEB_SERVICE_HOST'])")
    assert env.strip() == cluster_ip

    some_pod = sorted(names)[0]
    logs = cluster.kubectl("logs", "-n", ns, some_pod).stdout
    assert '"GET / HTTP/1.1" 200' in logs
    uid = cluster.kubectl("exec", "-n", ns, some_pod, "--", "id", "-u").stdout
    assert uid.strip() == "1000"


def test_pgbouncer_pod_serves_postgres_to_an_application_pod(
    e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres, e2e_namespace: str
) -> None:
    cluster, ns, pg = e2e_cluster, e2e_namespace, e2e_postgres
    role = f"app_{ns.replace('-', '_')}"
    with pg.connect() as conn:
        conn.execute(f'create role "{role}" login')
    ini = (
        "[databases]\n"
        f"appdb = host={pg.host} port={pg.port} dbname=postgres\n"
        "[pgbouncer]\n"
        "listen_addr = 0.0.0.0\nlisten_port = 6432\n"
        "auth_type = trust\nauth_file = /etc/pgbouncer/userlist.txt\n"
        "pool_mode = transaction\ndefault_pool_size = 2\n"
        "unix_socket_dir =\nlogfile =\npidfile =\n"
    )
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "pgbouncer"},
        "data": {"pgbouncer.ini": ini, "userlist.txt": f'"{role}" ""\n'},
    }
    pooler = deployment(
        "pgbouncer",
        cluster.image("pgbouncer"),
        1,
        readinessProbe={"tcpSocket": {"port": 6432}, "periodSeconds": 1},
        securityContext={
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        volumeMounts=[{"name": "config", "mountPath": "/etc/pgbouncer"}],
    )
    pooler["spec"]["template"]["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "pgbouncer"}}
    ]
    cluster.apply(config_map, pooler, service("pgbouncer", 6432, 6432), namespace=ns)
    cluster.kubectl("rollout", "status", "-n", ns, "deployment/pgbouncer", "--timeout=120s")
    pooler_ip = json.loads(
        cluster.kubectl("get", "-n", ns, "pods", "-l", "app=pgbouncer", "-o", "json").stdout
    )["items"][0]["status"]["podIP"]

    probe = probe_pod(cluster, ns)
    out = in_pod(
        cluster,
        ns,
        probe,
        "import json, os, psycopg\n"
        "with psycopg.connect(host=os.environ['PGBOUNCER_SERVICE_HOST'], port=6432,"
        f" dbname='appdb', user='{role}') as c:\n"
        "    row = c.execute('select current_user, host(inet_client_addr()), 6*7').fetchone()\n"
        "print(json.dumps(row))",
    )
    # A real server answered, and it saw the PgBouncer pod as its client.
    assert json.loads(out) == [role, pooler_ip, 42]
    with pg.connect() as conn:
        seen = conn.execute(
            "select host(client_addr) from pg_stat_activity where usename = %s", (role,)
        ).fetchall()
    assert seen and {addr for (addr,) in seen} == {pooler_ip}  # the pooled server connection
