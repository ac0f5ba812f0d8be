"""The API server accepts the PgBouncer objects as built, and what it stores still runs.

Server-side apply with strict field validation catches a misspelt field or a wrong type that a
unit test of the dicts cannot; reading the objects back and running that pod with Debian's
pgbouncer (``LocalPgBouncer.from_pod``) proves the stored ConfigMap and Deployment, not just our
copy of them, give a working pooler.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgrelief import act
from pgrelief._dev.pgbouncer import LocalPgBouncer, pgbouncer_version
from pgrelief.crd import CRD_FILE
from pgrelief.manifests.common import SPEC_HASH, Owner, spec_hash
from pgrelief.manifests.pgbouncer import PgBouncerObjects, desired_pgbouncer
from pgrelief.manifests.pgbouncer_config import ServerInputs
from pgrelief.pgbouncer_auth import install_statements
from pgrelief.pgbouncer_ini import format_version
from pgrelief.policy import validate_spec
from tests.fixtures.kube import REPO_ROOT, KubeApiServer
from tests.fixtures.pgbouncer import AUTH_SECRET, PooledServer

pytestmark = [pytest.mark.kube, pytest.mark.pgbouncer]

CRD_PATH = Path(REPO_ROOT) / "crds" / CRD_FILE


def _apply(kube: KubeApiServer, manifest: dict[str, Any]) -> None:
    kube.kubectl(
        "apply",
        "--server-side",
        "--field-manager=pgrelief",
        "--validate=strict",
        "-f",
        "-",
        input=json.dumps(manifest),
    )


def _get(kube: KubeApiServer, kind: str, name: str, namespace: str) -> dict[str, Any]:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
    stored: dict[str, Any] = json.loads(out)
    return stored


def test_the_api_server_stores_the_objects_and_the_stored_pod_serves_clients(
    kube_apiserver: KubeApiServer, pooled_server: PooledServer
) -> None:
    kube = kube_apiserver
    kube.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_FILE[:-5]}")
    namespace = f"pgb-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", namespace)
    spec_data = {
        "postgres": {"host": "127.0.0.1", "port": pooled_server.pg.port},
        "pgbouncer": {
            "enabled": True,
            "replicas": 1,
            "version": format_version(pgbouncer_version()),
            "databases": [pooled_server.database],
            "users": [pooled_server.app_role],
            "auth": {
                "authQuery": {
                    "user": pooled_server.auth_role,
                    "passwordSecret": {"name": AUTH_SECRET[0], "key": AUTH_SECRET[1]},
                }
            },
        },
    }
    policy = {
        "apiVersion": "pgrelief.dev/v1alpha1",
        "kind": "ConnectionPolicy",
        "metadata": {"name": "orders", "namespace": namespace},
        "spec": spec_data,
    }
    _apply(kube, policy)
    uid = _get(kube, "connectionpolicy", "orders", namespace)["metadata"]["uid"]
    result = desired_pgbouncer(
        Owner("orders", namespace, uid), validate_spec(spec_data), ServerInputs(97)
    )
    assert isinstance(result, PgBouncerObjects), result
    for manifest in result.all():
        _apply(kube, manifest)

    stored = {
        m["kind"]: _get(kube, m["kind"], m["metadata"]["name"], namespace) for m in result.all()
    }
    for manifest in result.all():
        kept = stored[manifest["kind"]]
        assert kept["metadata"]["ownerReferences"] == manifest["metadata"]["ownerReferences"]
        assert kept["metadata"]["labels"] == manifest["metadata"]["labels"]
        # The hash the controller compares survives the round trip.
        assert kept["metadata"]["annotations"][SPEC_HASH] == spec_hash(manifest)
    assert stored["ConfigMap"]["data"] == result.config_map["data"]
    template = stored["Deployment"]["spec"]["template"]["spec"]
    assert template["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert stored["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # The stored objects, as the API server returns them, make a pooler that logs clients in.
    with pooled_server.pg.connect(dbname=pooled_server.database) as conn:
        query = validate_spec(spec_data).pgbouncer.auth.auth_query
        assert query is not None
        for statement in install_statements(query):
            conn.execute(act.composed(statement))
    with (
        LocalPgBouncer.from_pod(
            stored["ConfigMap"], stored["Deployment"], secrets=pooled_server.secrets()
        ) as pod,
        psycopg.connect(
            host="127.0.0.1",
            port=pod.port,
            user=pooled_server.app_role,
            password=pooled_server.app_password,
            dbname=pooled_server.database,
        ) as client,
    ):
        assert client.execute("select current_user").fetchone() == (pooled_server.app_role,)
