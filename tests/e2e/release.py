"""pgrelief as users install it, on the e2e cluster: the project's image (built here from the
repository's Dockerfile), ``helm install`` of charts/pgrelief, and what the tests need around
it — application pods, the operator pods' logs and audit, metrics scraped from inside the
cluster, and the operator's process as the machine sees it (for ``kill -9``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.fixtures.e2e import E2ECluster, NetnsPostgres, deployment
from tests.kube.chart import CHART, helm

T = TypeVar("T")
S = TypeVar("S", bound=Sized)
APP_LABEL = "app.kubernetes.io/instance"
TXN_CLIENT = Path(__file__).resolve().parent / "txn_client.py"


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 90, every: float = 0.5
) -> T:
    """``probe()`` once it is truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_for_len(what: str, probe: Callable[[], S], count: int, timeout: float = 90) -> S:
    """``probe()`` once it has ``count`` elements."""
    found: list[S] = []

    def counted() -> bool:
        found[:] = [probe()]
        return len(found[0]) == count

    wait_for(what, counted, timeout)
    return found[0]


def get(cluster: E2ECluster, *args: str) -> dict[str, Any]:
    """``kubectl get ... -o json``; {} when it does not exist."""
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    if out.returncode != 0:
        if "NotFound" in out.stderr:
            return {}
        raise AssertionError(f"kubectl get {' '.join(args)}: {out.stderr}")
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def items(cluster: E2ECluster, *args: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get(cluster, *args).get("items", [])
    return found


def events(cluster: E2ECluster, namespace: str, policy: str, reason: str) -> list[dict[str, Any]]:
    """The Events of ``reason`` about ConnectionPolicy ``policy``."""
    return [
        e
        for e in items(cluster, "events", "-n", namespace)
        if e["reason"] == reason
        and e["involvedObject"]["kind"] == "ConnectionPolicy"
        and e["involvedObject"]["name"] == policy
    ]


@dataclass
class Release:
    """A ``helm install`` of charts/pgrelief in ``namespace``, watching ``apps``."""

    cluster: E2ECluster
    name: str
    namespace: str
    apps: str
    image: str

    def install(self) -> None:
        repository, _, tag = self.image.rpartition(":")
        helm(
            "install", self.name, str(CHART), "--namespace", self.namespace,
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            # Nothing is pulled: the image is the one built here and loaded into the node.
            "--set", "image.pullPolicy=Never",
            "--set-json", f"watch.namespaces={json.dumps([self.apps])}",
            "--wait", "--timeout", "180s",
            kubeconfig=self.cluster.kubeconfig, timeout=240,
        )  # fmt: skip

    def uninstall(self) -> None:
        helm(
            "uninstall", self.name, "--namespace", self.namespace, "--wait", "--timeout", "180s",
            kubeconfig=self.cluster.kubeconfig, timeout=240,
        )  # fmt: skip

    def installed(self) -> bool:
        out = helm(
            "status", self.name, "--namespace", self.namespace,
            kubeconfig=self.cluster.kubeconfig, check=False,
        )  # fmt: skip
        return out.returncode == 0

    @property
    def service_account(self) -> str:
        return self.name if "pgrelief" in self.name else f"{self.name}-pgrelief"

    def pods(self) -> list[dict[str, Any]]:
        """The operator's pods (not those of a terminating ReplicaSet)."""
        return [
            p
            for p in items(
                self.cluster, "pods", "-n", self.namespace, "-l", f"{APP_LABEL}={self.name}"
            )
            if not p["metadata"].get("deletionTimestamp")
        ]

    def logs(self, pod: str, *, previous: bool = False) -> str:
        args = ["logs", "-n", self.namespace, pod, "-c", "operator"]
        return self.cluster.kubectl(*args, *(["--previous"] if previous else [])).stdout

    def audit(self, pod: str, *, previous: bool = False) -> list[dict[str, Any]]:
        """The audit records (JSON lines on stdout with an ``outcome``) of one container."""
        records = []
        for line in self.logs(pod, previous=previous).splitlines():
            if line.startswith("{") and '"outcome"' in line:
                record = json.loads(line)
                if "action" in record and "outcome" in record:
                    records.append(record)
        return records

    def refusals(self, pod: str) -> list[str]:
        """Log lines of a refused API call (kopf's or pgrelief's)."""
        markers = ("HTTP 403", "Forbidden", "forbidden", "Not enough permissions")
        return [line for line in self.logs(pod).splitlines() if any(m in line for m in markers)]


# ------------------------------------------------------------------ application pods
def client_pod(cluster: E2ECluster, namespace: str, name: str = "client") -> str:
    """An application pod (the client image: psql, pgbench, python3-psycopg) to run clients
    from; returns its name once Ready."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "containers": [
                {
                    "name": "client",
                    "image": cluster.image("client"),
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "infinity"],
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }
    cluster.apply(pod, namespace=namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}", "--timeout=120s"
    )
    return name


def in_pod(
    cluster: E2ECluster,
    namespace: str,
    pod: str,
    *command: str,
    input: str | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "exec",
        "-i",
        "-n",
        namespace,
        pod,
        "--",
        *command,
        input=input,
        timeout=timeout,
        check=check,
    )


def http_get(cluster: E2ECluster, namespace: str, pod: str, url: str) -> str:
    """GET ``url`` from inside ``pod`` (cluster addresses are reachable only from pods)."""
    code = (
        "import sys, urllib.request\n"
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    )
    return in_pod(cluster, namespace, pod, "python3", "-c", code, url).stdout


def leaky_deployment(
    name: str, image: str, replicas: int, pg: NetnsPostgres, *, user: str, application: str
) -> dict[str, Any]:
    """Application pods that each open one session, leave it idle in a transaction and never
    come back to it (a leaked connection), and never reconnect."""
    code = (
        "import sys, time, psycopg\n"
        f"c = psycopg.connect(host={pg.host!r}, port={pg.port}, user={user!r}, "
        f"dbname='postgres', application_name={application!r})\n"
        "c.execute('select 1')  # BEGIN ... and nothing more: idle in transaction\n"
        "print('leaking backend', c.info.backend_pid, flush=True)\n"
        "time.sleep(10**6)\n"
    )
    return deployment(name, image, replicas, grace_s=0, command=["python3", "-c", code])


def pod_ips(cluster: E2ECluster, namespace: str, selector: str) -> dict[str, str]:
    """Pod name -> IP of the running pods matching ``selector``."""
    return {
        p["metadata"]["name"]: p["status"]["podIP"]
        for p in items(cluster, "pods", "-n", namespace, "-l", selector)
        if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
    }


# ------------------------------------------------------------------ PostgreSQL side
def sessions_of(pg: NetnsPostgres, role: str) -> dict[int, str]:
    """pid -> client address of ``role``'s client sessions, as the server sees them."""
    with pg.connect() as conn:
        rows = conn.execute(
            "select pid, host(client_addr) from pg_stat_activity "
            "where usename = %s and backend_type = 'client backend'",
            (role,),
        ).fetchall()
    return {int(str(pid)): str(addr) for pid, addr in rows}


def new_role(pg: NetnsPostgres, prefix: str, *, password: str | None = None) -> str:
    role = f"{prefix}_{uuid.uuid4().hex[:6]}"
    with pg.connect() as conn:
        if password is None:
            conn.execute(f'create role "{role}" login')
        else:
            conn.execute(f"create role \"{role}\" login password '{password}'")
    return role


# ------------------------------------------------------------------ the operator's process
def kill_operator_process(pod: str) -> int:
    """SIGKILL the operator's process in ``pod``, found from the machine (the node's PID
    namespace is a child of ours) by its environment; returns the PID it had here.

    From inside the container it is PID 1, which SIGKILL from its own namespace cannot stop.
    """
    marker = f"POD_NAME={pod}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and b"operator" in argv:
            found.append(int(entry.name))
    if len(found) != 1:
        raise AssertionError(f"expected one operator process of pod {pod}, found {found}")
    os.kill(found[0], signal.SIGKILL)
    return found[0]
