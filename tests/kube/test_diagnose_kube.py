"""``pgrelief diagnose --kube``: a user's laptop, the current kubeconfig context, one list of
Pods, and the report's breakdown by workload (issue 13, item 5).

The test API server holds a Deployment whose Pod "runs" on a loopback IP; real sessions come
from that address through a source-bound forwarder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgrelief._dev.embedded import EmbeddedPostgres
from tests.fixtures.kube import KubeApiServer
from tests.kube import pods

pytestmark = pytest.mark.kube


def diagnose(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgrelief", "diagnose", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip


@pytest.fixture
def client() -> Iterator[list[pods.PodClient]]:
    opened: list[pods.PodClient] = []
    yield opened
    for one in opened:
        one.close()


def test_diagnose_kube_names_the_workload_behind_the_sessions(
    kube_apiserver: KubeApiServer,
    kube_namespace: str,
    pg_server: EmbeddedPostgres,
    client: list[pods.PodClient],
) -> None:
    kube, ns = kube_apiserver, kube_namespace
    pod = pods.deployment(kube, ns, "checkout-api")
    ip = pods.loopback_ip()
    pods.run(kube, pod, ip)
    client.append(pods.PodClient((pg_server.host, pg_server.port), ip))
    for _ in range(2):
        client[0].idle_in_transaction("app_backend", "shop")
    dsn = pg_server.dsn()

    done = diagnose(kube.kubeconfig, "--dsn", dsn, "--kube", "--kube-namespace", ns,
                    "--format", "json")  # fmt: skip
    assert done.returncode in (0, 1, 2), done.stderr
    report = json.loads(done.stdout)
    assert report["attribution"] == {"scope": f"namespaces {ns}"}
    [group] = [g for g in report["breakdown"]["by_workload"] if g["kind"] == "Deployment"]
    assert (group["namespace"], group["name"], group["count"]) == (ns, "checkout-api", 2)
    assert group["by_state"] == {"idle in transaction": 2} and group["pods"] == 1

    time.sleep(1.2)
    brief = diagnose(kube.kubeconfig, "--dsn", dsn, "--kube", "--idle-in-transaction-after", "1s")
    verdict = " ".join(brief.stdout.split())  # the report wraps at the terminal's width
    assert "(user 'app_backend'), the oldest since" in verdict
    assert f"from Deployment {ns}/checkout-api" in verdict, brief.stdout[-3000:]
    text = diagnose(kube.kubeconfig, "--dsn", dsn, "--kube", "--verbose")  # every namespace
    assert "By workload (all namespaces)" in text.stdout, text.stdout[-3000:]
    assert f"Deployment {ns}/checkout-api" in text.stdout

    plain = diagnose(kube.kubeconfig, "--dsn", dsn, "--format", "json")  # not asked: no column
    assert json.loads(plain.stdout)["breakdown"]["by_workload"] == []


def test_diagnose_kube_refused_or_without_a_cluster_is_one_line(
    kube_apiserver: KubeApiServer, kube_namespace: str, pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    nobody = kube_apiserver.kubeconfig_for_service_account(kube_namespace, "default")
    refused = diagnose(nobody, "--dsn", pg_server.dsn(), "--kube")
    assert refused.returncode == 3
    assert refused.stderr.strip() == (
        "pgrelief: error: --kube: listing Pods in all namespaces: HTTP 403 Forbidden "
        "(--kube-namespace NS lists one namespace)"
    )
    missing = diagnose(tmp_path / "no-such-kubeconfig", "--dsn", pg_server.dsn(), "--kube")
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("pgrelief: error: --kube: no usable kubeconfig")
    wrong = diagnose(nobody, "--activity-file", "-", "--kube")
    assert wrong.returncode == 3 and "--kube goes with --dsn" in wrong.stderr
