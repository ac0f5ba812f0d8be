"""Playing Pods on the test API server: workloads whose Pods have loopback IPs.

The test API server runs the Deployment and ReplicaSet controllers but no kubelet, so a
Deployment's Pods exist and stay Pending. A test makes one "run" as a kubelet would: it sets
``status.podIP``, ``podIPs`` and ``startTime`` through the status subresource, with a random
127.x.y.z address. Connections made through a ``Forwarder`` bound to that source address then
reach PostgreSQL (or PgBouncer) from the Pod's IP. StatefulSet, Job and CronJob controllers
do not run here: their Pods (and a CronJob's Job) are created with the ownerReferences those
controllers would set.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.fixtures.forwarder import Forwarder
from tests.fixtures.kube import KubeApiServer
from tests.kube.operator_harness import apply, wait_until

CONTAINER = [{"name": "app", "image": "registry.invalid/app:1"}]


def loopback_ip() -> str:
    """A random loopback address other tests are unlikely to use (never 127.0.0.1)."""
    return f"127.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def get(kube: KubeApiServer, kind: str, name: str, namespace: str) -> dict[str, Any]:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    body: dict[str, Any] = json.loads(out.stdout)
    return body


def deployment(kube: KubeApiServer, namespace: str, name: str) -> dict[str, Any]:
    """A Deployment of one replica; its Pod, once the controllers have made it."""
    labels = {"app": name}
    apply(kube, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": CONTAINER}}},
    })  # fmt: skip
    return pod_of(kube, namespace, labels)


def pod_of(kube: KubeApiServer, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    selector = ",".join(f"{k}={v}" for k, v in labels.items())

    def found() -> dict[str, Any] | None:
        out = kube.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items[0] if items else None

    return wait_until(f"a Pod with {selector}", found, timeout=60)


def owned_pod(
    kube: KubeApiServer, namespace: str, name: str, owner: dict[str, Any]
) -> dict[str, Any]:
    """A Pod controlled by ``owner`` (an object as stored), as its controller would make it."""
    meta = owner["metadata"]
    apply(kube, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name},
                     "ownerReferences": [{"apiVersion": owner["apiVersion"],
                                          "kind": owner["kind"], "name": meta["name"],
                                          "uid": meta["uid"], "controller": True}]},
        "spec": {"containers": CONTAINER},
    })  # fmt: skip
    return get(kube, "pod", name, namespace)


def stateful_set(kube: KubeApiServer, namespace: str, name: str) -> dict[str, Any]:
    """A StatefulSet and its Pod ``<name>-0``."""
    labels = {"app": name}
    apply(kube, {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"serviceName": name, "replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": CONTAINER}}},
    })  # fmt: skip
    return owned_pod(kube, namespace, f"{name}-0", get(kube, "statefulset", name, namespace))


def cron_job(kube: KubeApiServer, namespace: str, name: str) -> dict[str, Any]:
    """A CronJob, one Job it started and that Job's Pod."""
    template = {"spec": {"restartPolicy": "Never", "containers": CONTAINER}}
    apply(kube, {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": template}}},
    })  # fmt: skip
    cron = get(kube, "cronjob", name, namespace)
    job_name = f"{name}-29400000"
    apply(kube, {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name, "namespace": namespace,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                                          "name": name, "uid": cron["metadata"]["uid"],
                                          "controller": True}]},
        "spec": {"manualSelector": True, "selector": {"matchLabels": {"job": job_name}},
                 "template": {"metadata": {"labels": {"job": job_name}}, **template}},
    })  # fmt: skip
    return owned_pod(kube, namespace, f"{job_name}-x7k2p", get(kube, "job", job_name, namespace))


def bare_pod(kube: KubeApiServer, namespace: str, name: str) -> dict[str, Any]:
    apply(kube, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": CONTAINER},
    })  # fmt: skip
    return get(kube, "pod", name, namespace)


def run(
    kube: KubeApiServer, pod: dict[str, Any], ip: str, *, started: datetime | None = None
) -> None:
    """What a kubelet does when the Pod starts: its IP and start time, phase Running."""
    when = started or datetime.now(UTC) - timedelta(minutes=5)
    status = {
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "phase": "Running",
    }
    meta = pod["metadata"]
    kube.kubectl(
        "patch", "pod", meta["name"], "-n", meta["namespace"], "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status}),
    )  # fmt: skip


class PodClient:
    """Connections from a Pod's IP: a forwarder bound to it, and the sessions opened."""

    def __init__(self, target: tuple[str, int], ip: str) -> None:
        self.ip = ip
        self.forwarder = Forwarder(target, source=ip).open()
        self.sessions: list[psycopg.Connection[Any]] = []

    def connect(self, user: str, application: str, **extra: Any) -> psycopg.Connection[Any]:
        """A session from the Pod (``dbname`` postgres unless given); closed by ``close``."""
        conn = psycopg.connect(
            **{"dbname": "postgres", **extra}, host="127.0.0.1", port=self.forwarder.port,
            user=user, application_name=application, autocommit=False,
        )  # fmt: skip
        self.sessions.append(conn)
        return conn

    def idle_in_transaction(self, user: str, application: str, **extra: Any) -> int:
        """A session left idle in transaction; its backend pid (PgBouncer's own, through it)."""
        conn = self.connect(user, application, **extra)
        conn.execute("select 1")
        return int(conn.info.backend_pid)

    def close(self) -> None:
        for conn in self.sessions:
            conn.close()
        self.forwarder.release()
