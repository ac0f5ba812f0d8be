"""Running the real operator as a local process against the test API server, and reading back
what it did: the policy's status, its Events, its audit lines and its metrics.

The operator is started exactly as a user would (``python -m pgrelief operator``) with a
kubeconfig; tests then drive it only through the API server (kubectl) and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.fixtures.kube import KubeApiServer

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
T = TypeVar("T")


def wait_until(
    what: str, probe: Callable[[], T | None], timeout: float = 40, every: float = 0.25
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def policy_manifest(
    name: str,
    namespace: str,
    *,
    host: str,
    port: int,
    secret: str | None = "pg-login",
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    postgres: dict[str, Any] = {"host": host, "port": port, "database": "postgres"}
    if secret:
        postgres["credentialsSecret"] = {"name": secret}
    body: dict[str, Any] = {
        "interval": "250ms",
        "remediation": {
            "mode": "Enforce",
            "onlyUnderPressure": False,
            "terminate": {"idleInTransactionAfter": "1s", "idleAfter": "1s"},
            "budget": {"maxPerCycle": 50, "maxPerHour": 500},
        },
    }
    for key, value in (spec or {}).items():
        body[key] = value
    body["postgres"] = {**postgres, **body.get("postgres", {})}
    return {
        "apiVersion": "pgrelief.dev/v1alpha1",
        "kind": "ConnectionPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def secret_manifest(name: str, namespace: str, user: str, password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": {"username": user, "password": password},
    }


def apply(kube: KubeApiServer, manifest: dict[str, Any], **kwargs: Any) -> str:
    return kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), **kwargs).stdout


def get_policy(kube: KubeApiServer, namespace: str, name: str) -> dict[str, Any]:
    out = kube.kubectl("get", "cpol", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def condition(policy: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in policy.get("status", {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def wait_condition(
    kube: KubeApiServer,
    namespace: str,
    name: str,
    kind: str = "Ready",
    timeout: float = 40,
    **expected: str,
) -> dict[str, Any]:
    """The policy, once its ``kind`` condition has every ``expected`` field (status=...)."""

    def matches() -> dict[str, Any] | None:
        policy = get_policy(kube, namespace, name)
        found = condition(policy, kind)
        return policy if all(found.get(k) == v for k, v in expected.items()) else None

    return wait_until(f"{kind} {expected} on {namespace}/{name}", matches, timeout=timeout)


def events(kube: KubeApiServer, namespace: str, reason: str | None = None) -> list[dict[str, Any]]:
    out = kube.kubectl(
        "get", "events", "-n", namespace, "-o", "json",
        "--field-selector", "involvedObject.kind=ConnectionPolicy",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return [e for e in items if reason is None or e["reason"] == reason]


def free_port() -> int:
    import socket  # noqa: PLC0415 - only this helper needs it

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class OperatorProcess:
    """``pgrelief operator`` as a child process; stdout (the audit) and stderr to files."""

    kube: KubeApiServer
    namespace: str
    work_dir: Path
    args: tuple[str, ...] = ()
    kubeconfig: Path | None = None
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Added to the environment (bench/operator_scale.py runs an older tree by its PYTHONPATH).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def audit_file(self) -> Path:
        return self.work_dir / f"operator-{self.metrics_port}.audit.jsonl"

    @property
    def log_file(self) -> Path:
        return self.work_dir / f"operator-{self.metrics_port}.log"

    def start(self) -> OperatorProcess:
        kubeconfig = str(self.kubeconfig or self.kube.kubeconfig)
        env = {**os.environ, **self.env, "KUBECONFIG": kubeconfig}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pgrelief", "operator", "--namespace", self.namespace,
             "--metrics-port", str(self.metrics_port), *self.args],
            stdout=self.audit_file.open("wb"), stderr=self.log_file.open("wb"), env=env,
        )  # fmt: skip
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def audit(self) -> list[dict[str, Any]]:
        lines = self.audit_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def logs(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


PAUSED_LOG = "Pausing operations in favour of"
RESUMED_LOG = "Resuming operations after the pause"


def acting_replicas(replicas: list[OperatorProcess]) -> list[OperatorProcess]:
    """The replicas whose peering says they act now. kopf starts a peering replica paused and
    logs only changes: "Resuming" once it sees no higher priority, "Pausing" when one appears.
    A replica that starts when a higher priority is already there stays paused silently."""

    def acting(replica: OperatorProcess) -> bool:
        logs = replica.logs()
        return logs.rfind(RESUMED_LOG) > logs.rfind(PAUSED_LOG)

    return [replica for replica in replicas if acting(replica)]


def wait_peered(kube: KubeApiServer, namespace: str, replicas: list[OperatorProcess]) -> None:
    """Until every replica keeps an entry in the KopfPeering object and exactly one acts: a
    fixed sleep lost this race on a loaded machine (the second replica had not joined when
    the first one acted alone)."""
    status: dict[str, Any] = {}

    def peered() -> bool:
        nonlocal status
        peering = json.loads(
            kube.kubectl("get", "kopfpeering", "pgrelief", "-n", namespace, "-o", "json").stdout
        )
        status = peering.get("status", {})
        return len(status) == len(replicas) and len(acting_replicas(replicas)) == 1

    try:
        # Two operators starting at once take long on a loaded 2-core machine.
        wait_until("every replica peered, exactly one acting", peered, timeout=120)
    except AssertionError as timed_out:
        logs = "\n---\n".join(replica.logs()[-3000:] for replica in replicas)
        raise AssertionError(f"{timed_out}; peering status {status}; logs:\n{logs}") from None
