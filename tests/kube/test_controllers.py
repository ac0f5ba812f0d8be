"""The test API server's kube-controller-manager does what a cluster's does: owned objects go
with their owner (or are orphaned when asked), a Deployment rolls to a new ReplicaSet when its
pod template changes and only then, deleted namespaces are emptied and removed, and
ServiceAccount admission gives Pods their namespace's default identity. Pods never run: there
is no scheduler or kubelet."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.fixtures.kube import KubeApiServer, wait_for_default_service_account
from tests.kube.helpers import eventually

pytestmark = pytest.mark.kube

# Installed before the controller manager starts (PREINSTALLED_CRDS): the garbage collector
# watches Owners from the start, as it would a CRD a chart installed before the operator ran.
OWNER_CRD = yaml.safe_load(
    (Path(__file__).parent / "crds" / "owners.gc.testenv.pgrelief.io.yaml").read_text()
)
GROUP = OWNER_CRD["spec"]["group"]
PLURAL = OWNER_CRD["spec"]["names"]["plural"]
GC_TIMEOUT_S = 30
CHECKSUM = "testenv.pgrelief.io/config-checksum"
REVISION = "deployment.kubernetes.io/revision"


@pytest.fixture
def admin(kube_apiserver: KubeApiServer) -> Iterator[client.ApiClient]:
    with kube_apiserver.api_client() as api:
        yield api


def create_owner(admin: client.ApiClient, namespace: str) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Owner",
        "metadata": {"name": f"o-{uuid.uuid4().hex[:6]}"},
        "spec": {"name": "owner"},
    }
    owner: dict[str, Any] = client.CustomObjectsApi(admin).create_namespaced_custom_object(
        GROUP, "v1", namespace, PLURAL, body
    )
    return owner


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def deployment(
    name: str, *, owner: dict[str, Any] | None = None, replicas: int = 1
) -> dict[str, Any]:
    labels = {"app": name}
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        metadata["ownerReferences"] = [owner_reference(owner)]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # What the operator's PgBouncer Deployment does: surge, never go below replicas.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": {CHECKSUM: "a"}},
                "spec": {"containers": [{"name": "main", "image": "pgbouncer:never-pulled"}]},
            },
        },
    }


def replica_sets(admin: client.ApiClient, namespace: str, app: str) -> list[Any]:
    items = (
        client.AppsV1Api(admin)
        .list_namespaced_replica_set(namespace, label_selector=f"app={app}")
        .items
    )
    return sorted(items, key=lambda rs: int(rs.metadata.annotations[REVISION]))


def pods(admin: client.ApiClient, namespace: str, app: str) -> list[Any]:
    return list(
        client.CoreV1Api(admin).list_namespaced_pod(namespace, label_selector=f"app={app}").items
    )


def gone(read: Any) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def test_deleting_an_owner_deletes_its_configmap_deployment_replicasets_and_pods(
    admin: client.ApiClient, kube_namespace: str
) -> None:
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    ns = kube_namespace
    owner = create_owner(admin, ns)
    core.create_namespaced_config_map(
        ns,
        {
            "metadata": {"name": "pgbouncer-ini", "ownerReferences": [owner_reference(owner)]},
            "data": {"pgbouncer.ini": "[pgbouncer]\n"},
        },
    )
    apps.create_namespaced_deployment(ns, deployment("pooler", owner=owner))

    # The chain a real cluster builds: Deployment -> ReplicaSet -> Pod, each owned by the last.
    (rs,) = eventually(lambda: replica_sets(admin, ns, "pooler"), what="the ReplicaSet")
    assert [(r.kind, r.name) for r in rs.metadata.owner_references] == [("Deployment", "pooler")]
    (pod,) = eventually(lambda: pods(admin, ns, "pooler"), what="the Pod")
    assert [r.name for r in pod.metadata.owner_references] == [rs.metadata.name]
    assert pod.status.phase == "Pending"  # no scheduler, no kubelet
    assert pod.spec.node_name is None

    client.CustomObjectsApi(admin).delete_namespaced_custom_object(
        GROUP, "v1", ns, PLURAL, owner["metadata"]["name"]
    )

    def all_gone() -> bool:
        return (
            gone(lambda: core.read_namespaced_config_map("pgbouncer-ini", ns))
            and gone(lambda: apps.read_namespaced_deployment("pooler", ns))
            and not replica_sets(admin, ns, "pooler")
            and not pods(admin, ns, "pooler")
        )

    eventually(all_gone, timeout=GC_TIMEOUT_S, what="garbage collection of the owned objects")


def test_orphan_deletion_keeps_the_dependent_and_drops_its_owner_reference(
    admin: client.ApiClient, kube_namespace: str
) -> None:
    core, ns = client.CoreV1Api(admin), kube_namespace
    owner = create_owner(admin, ns)
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "kept", "ownerReferences": [owner_reference(owner)]}}
    )
    client.CustomObjectsApi(admin).delete_namespaced_custom_object(
        GROUP, "v1", ns, PLURAL, owner["metadata"]["name"], propagation_policy="Orphan"
    )
    # The owner waits on the "orphan" finalizer until the collector has detached its dependents.
    eventually(
        lambda: gone(
            lambda: client.CustomObjectsApi(admin).get_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, owner["metadata"]["name"]
            )
        ),
        timeout=GC_TIMEOUT_S,
        what="the orphaning owner to be deleted",
    )
    kept = core.read_namespaced_config_map("kept", ns)
    assert kept.metadata.owner_references is None
    assert kept.metadata.deletion_timestamp is None


def test_only_a_pod_template_change_rolls_a_new_replicaset(
    admin: client.ApiClient, kube_namespace: str
) -> None:
    apps, ns = client.AppsV1Api(admin), kube_namespace
    apps.create_namespaced_deployment(ns, deployment("pooler", replicas=2))
    (first,) = eventually(
        lambda: [rs for rs in replica_sets(admin, ns, "pooler") if rs.spec.replicas == 2],
        what="the first ReplicaSet",
    )
    assert first.metadata.annotations[REVISION] == "1"

    # A change outside the pod template (the Deployment's own annotations) rolls nothing.
    apps.patch_namespaced_deployment("pooler", ns, {"metadata": {"annotations": {"note": "x"}}})
    eventually(
        lambda: apps.read_namespaced_deployment("pooler", ns).status.observed_generation == 2,
        what="the controller to observe generation 2",
    )
    assert [rs.metadata.name for rs in replica_sets(admin, ns, "pooler")] == [first.metadata.name]

    # A config checksum change in the pod template does: revision 2, a new pod-template-hash.
    apps.patch_namespaced_deployment(
        "pooler", ns, {"spec": {"template": {"metadata": {"annotations": {CHECKSUM: "b"}}}}}
    )

    def two_replica_sets() -> list[Any] | None:
        found = replica_sets(admin, ns, "pooler")
        return found if len(found) == 2 else None

    old, new = eventually(two_replica_sets, what="a second ReplicaSet")
    assert old.metadata.name == first.metadata.name
    assert new.metadata.annotations[REVISION] == "2"
    assert new.spec.template.metadata.annotations[CHECKSUM] == "b"
    template_hash = "pod-template-hash"
    assert new.metadata.labels[template_hash] != old.metadata.labels[template_hash]

    # maxUnavailable 0 with pods that never become ready: the new ReplicaSet surges by one and
    # the old one keeps both replicas, so the rollout waits instead of taking capacity away.
    def surged() -> bool:
        old_rs, new_rs = replica_sets(admin, ns, "pooler")
        return bool(new_rs.spec.replicas == 1 and old_rs.spec.replicas == 2)

    eventually(surged, what="the rollout to surge by one")
    assert len(pods(admin, ns, "pooler")) == 3


def test_deleting_a_namespace_empties_and_removes_it(
    kube_apiserver: KubeApiServer, admin: client.ApiClient
) -> None:
    core = client.CoreV1Api(admin)
    ns = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": ns}})
    wait_for_default_service_account(kube_apiserver, ns)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}})
    client.AppsV1Api(admin).create_namespaced_deployment(ns, deployment("pooler"))
    create_owner(admin, ns)
    eventually(lambda: pods(admin, ns, "pooler"), what="the Deployment's Pod")

    core.delete_namespace(ns)
    assert core.read_namespace(ns).status.phase == "Terminating"
    eventually(lambda: gone(lambda: core.read_namespace(ns)), timeout=60, what="the namespace")
    leftover = client.CustomObjectsApi(admin).list_cluster_custom_object(GROUP, "v1", PLURAL)
    assert [o for o in leftover["items"] if o["metadata"]["namespace"] == ns] == []


def test_service_account_admission_gives_pods_the_default_identity(
    kube_apiserver: KubeApiServer, admin: client.ApiClient, kube_namespace: str
) -> None:
    core, ns = client.CoreV1Api(admin), kube_namespace
    spec = {"containers": [{"name": "main", "image": "never-pulled"}]}
    pod = core.create_namespaced_pod(ns, {"metadata": {"name": "p"}, "spec": spec})
    assert pod.spec.service_account_name == "default"
    (volume,) = [v for v in pod.spec.volumes if v.name.startswith("kube-api-access-")]
    sources = volume.projected.sources
    assert any(s.service_account_token for s in sources)
    assert any(s.config_map and s.config_map.name == "kube-root-ca.crt" for s in sources)
    # The root-CA publisher put the cluster's CA where that volume reads it.
    root_ca = eventually(
        lambda: _maybe_read_config_map(core, "kube-root-ca.crt", ns), what="kube-root-ca.crt"
    )
    assert root_ca.data["ca.crt"].strip() == kube_apiserver.ca_data.decode().strip()

    status, body = kube_apiserver.request(
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {"metadata": {"name": "q"}, "spec": {**spec, "serviceAccountName": "missing"}},
    )
    assert status == 403, body
    assert 'serviceaccount "missing" not found' in body["message"]


def _maybe_read_config_map(core: client.CoreV1Api, name: str, ns: str) -> Any:
    try:
        return core.read_namespaced_config_map(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
