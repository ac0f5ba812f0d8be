"""Fixtures of the operator tests: the CRDs applied once, an operator per test namespace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeApiServer
from tests.kube.operator_harness import CRD_FILES, OperatorProcess, apply, secret_manifest


@pytest.fixture(scope="session")
def crds(kube_apiserver: KubeApiServer) -> None:
    for path in CRD_FILES:
        kube_apiserver.kubectl("apply", "--server-side", "-f", str(path))
    kube_apiserver.kubectl(
        "wait", "--for=condition=Established", "crd/connectionpolicies.pgrelief.dev"
    )


@pytest.fixture
def operator(
    kube_apiserver: KubeApiServer, kube_namespace: str, crds: None, tmp_path: Path
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kube_apiserver, kube_namespace, tmp_path, args=("--standalone",))
    apply(kube_apiserver, secret_manifest("pg-login", kube_namespace, "postgres", "unused"))
    process.start()
    yield process
    process.stop()
