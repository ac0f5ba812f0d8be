"""The Helm chart as tests use it: helm itself, rendered manifests, releases on the test API
server, and the operator started with exactly the arguments the chart's Deployment gives it.

helm comes from the same cache as kubectl (``make kube-tools``); every call names the test
server's kubeconfig explicitly, so nothing here can touch another cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.kube import KubeApiServer, KubeTestenvError, cache_dir, find_kubectl
from tests.kube.operator_harness import OperatorProcess, free_port

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pgrelief"


def find_helm() -> str:
    """helm from $HELM, or the cache's bin/ (installed there with kubectl when missing)."""
    explicit = os.environ.get("HELM")
    if explicit:
        return explicit
    cached = cache_dir() / "bin" / "helm"
    if not os.access(cached, os.X_OK):
        find_kubectl()  # installs kubectl and helm together
    if not os.access(cached, os.X_OK):
        raise KubeTestenvError(f"no helm at {cached}: run `make kube-tools`")
    return str(cached)


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run helm; with ``kubeconfig`` against that server only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "HELM_"))}
    cmd = [find_helm(), *args]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any]) -> list[str]:
    """``--set-json`` arguments for a (nested) dict of values."""
    return [
        arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")
    ]


def render(values: dict[str, Any] | None = None, namespace: str = "ops") -> list[dict[str, Any]]:
    """The chart's templates rendered (no CRDs), as a list of objects."""
    out = helm("template", "t", str(CHART), "--namespace", namespace, *set_args(values or {}))
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(
    docs: Sequence[dict[str, Any]], kind: str, name: str | None = None
) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def operator_args(docs: Sequence[dict[str, Any]]) -> list[str]:
    """The operator container's arguments in the rendered Deployment."""
    (deployment,) = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


@dataclass
class Release:
    """A release of the chart on the test API server."""

    kube: KubeApiServer
    name: str
    namespace: str
    values: dict[str, Any] = field(default_factory=dict)

    def install(self) -> Release:
        helm(
            "install",
            self.name,
            str(CHART),
            "--namespace",
            self.namespace,
            *set_args(self.values),
            kubeconfig=self.kube.kubeconfig,
        )
        return self

    def upgrade(self, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        self.values = values
        return helm(
            "upgrade",
            self.name,
            str(CHART),
            "--namespace",
            self.namespace,
            "--reset-values",
            *set_args(values),
            kubeconfig=self.kube.kubeconfig,
        )

    def uninstall(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        return helm(
            "uninstall",
            self.name,
            "--namespace",
            self.namespace,
            kubeconfig=self.kube.kubeconfig,
            check=check,
        )

    @property
    def fullname(self) -> str:
        return self.name if "pgrelief" in self.name else f"{self.name}-pgrelief"

    def manifests(self) -> list[dict[str, Any]]:
        out = helm(
            "get",
            "manifest",
            self.name,
            "--namespace",
            self.namespace,
            kubeconfig=self.kube.kubeconfig,
        )
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    def service_account_kubeconfig(self) -> Path:
        """A kubeconfig holding a token of the chart's ServiceAccount (never the admin's)."""
        return self.kube.kubeconfig_for_service_account(self.namespace, self.fullname)


@contextmanager
def installed(
    kube: KubeApiServer, namespace: str, values: dict[str, Any] | None = None
) -> Iterator[Release]:
    """A release for the duration of a test; uninstalled afterwards (its ClusterRoles too)."""
    release = Release(kube, f"r{uuid.uuid4().hex[:8]}", namespace, values or {}).install()
    try:
        yield release
    finally:
        release.uninstall(check=False)


@dataclass
class ChartOperator(OperatorProcess):
    """``pgrelief`` run with the chart Deployment's own arguments, as its ServiceAccount.

    Only the two ports differ (every local replica needs its own); the liveness endpoint
    listens on loopback.
    """

    chart_args: tuple[str, ...] = ()
    liveness_port: int = field(default_factory=free_port)
    pod_name: str = field(default_factory=lambda: f"pgrelief-{uuid.uuid4().hex[:5]}")

    def start(self) -> ChartOperator:
        args = [a for a in self.chart_args if not a.startswith(("--metrics-port", "--liveness"))]
        args += [
            f"--metrics-port={self.metrics_port}",
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_NAME": self.pod_name}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pgrelief", *args],
            stdout=self.audit_file.open("wb"),
            stderr=self.log_file.open("wb"),
            env=env,
        )
        return self

    def forbidden(self) -> list[str]:
        """Every log line that reports a refused API call (kopf's or pgrelief's)."""
        # Not a bare "403": timestamps contain it (…20.024031).
        markers = ("HTTP 403", "Forbidden", "forbidden", "Not enough permissions")
        return [line for line in self.logs().splitlines() if any(m in line for m in markers)]
