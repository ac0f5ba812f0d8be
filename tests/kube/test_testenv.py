"""The test API server behaves like a real cluster's: versions, CRDs, watches, validation,
RBAC for ServiceAccount tokens, and a kopf operator running against it."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kopf.testing import KopfRunner
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.fixtures.kube import REPO_ROOT, KubeApiServer
from tests.kube.helpers import apply_crd, crd_manifest, eventually

pytestmark = pytest.mark.kube

T = TypeVar("T")

GROUP = "testenv.pgrelief.io"
KOPF_GROUP = "kopf.testenv.pgrelief.io"


def expected_release() -> str:
    go_mod = (REPO_ROOT / "tests" / "kube-testenv" / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)\s*$", go_mod, re.MULTILINE)
    assert match, "k8s.io/kubernetes not pinned in go.mod"
    return match.group(1)


def api_error(call: Callable[[], object]) -> ApiException:
    with pytest.raises(ApiException) as info:
        call()
    return info.value


@pytest.fixture
def admin(kube_apiserver: KubeApiServer) -> Iterator[client.ApiClient]:
    with kube_apiserver.api_client() as api:
        yield api


@pytest.fixture(scope="module")
def widgets_crd(kube_apiserver: KubeApiServer) -> str:
    apply_crd(kube_apiserver, crd_manifest(GROUP, "widgets", "Widget"))
    return "widgets"


def test_kubectl_version_reports_the_release(kube_apiserver: KubeApiServer) -> None:
    out = kube_apiserver.kubectl("version", "-o", "json").stdout
    server = json.loads(out)["serverVersion"]
    release = expected_release()
    assert server["gitVersion"] == release
    assert f"v{server['major']}.{server['minor']}" == release.rsplit(".", 1)[0]
    with kube_apiserver.api_client() as api:
        assert client.VersionApi(api).get_code().git_version == release


def test_kubernetes_and_system_namespaces_exist(admin: client.ApiClient) -> None:
    names = {ns.metadata.name for ns in client.CoreV1Api(admin).list_namespace().items}
    assert {"default", "kube-system", "kube-public"} <= names


def test_custom_resource_create_list_watch_and_status(
    admin: client.ApiClient, widgets_crd: str, kube_namespace: str
) -> None:
    api = client.CustomObjectsApi(admin)
    crud = {"group": GROUP, "version": "v1", "namespace": kube_namespace, "plural": widgets_crd}

    listing = api.list_namespaced_custom_object(**crud)
    assert listing["items"] == []
    since = listing["metadata"]["resourceVersion"]

    body = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"name": "first", "size": 3},
    }
    created = api.create_namespaced_custom_object(**crud, body=body)
    assert created["spec"] == {"name": "first", "size": 3}
    assert [i["metadata"]["name"] for i in api.list_namespaced_custom_object(**crud)["items"]] == [
        "w1"
    ]

    # A watch from the earlier resourceVersion replays the creation.
    w = watch.Watch()
    events = []
    for event in w.stream(
        api.list_namespaced_custom_object, **crud, resource_version=since, timeout_seconds=10
    ):
        events.append(event)
        if event["type"] == "ADDED":
            w.stop()
    assert events and events[-1]["type"] == "ADDED"
    assert events[-1]["object"]["metadata"]["name"] == "w1"

    # /status updates status only; the main endpoint ignores status changes.
    patched = api.patch_namespaced_custom_object_status(
        **crud, name="w1", body={"status": {"phase": "Ready"}, "spec": {"size": 99}}
    )
    assert patched["status"] == {"phase": "Ready"}
    assert patched["spec"]["size"] == 3
    patched = api.patch_namespaced_custom_object(
        **crud, name="w1", body={"status": {"phase": "Gone"}, "spec": {"size": 4}}
    )
    assert patched["status"] == {"phase": "Ready"}
    assert patched["spec"]["size"] == 4

    # The schema is enforced: a string where an integer belongs is refused.
    bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": "big"}}
    err = api_error(lambda: api.create_namespaced_custom_object(**crud, body=bad))
    assert err.status == 422


def test_non_structural_crd_is_rejected(admin: client.ApiClient) -> None:
    manifest = crd_manifest(GROUP, "brokens", "Broken", structural=False)
    api = client.ApiextensionsV1Api(admin)
    err = api_error(lambda: api.create_custom_resource_definition(body=manifest))
    assert err.status == 422
    assert "properties[spec].properties[size].type" in str(err.body)  # "must not be empty"


def test_events_are_created_and_listed(
    kube_apiserver: KubeApiServer, admin: client.ApiClient, kube_namespace: str
) -> None:
    event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "pgrelief-test.1"},
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "reportingController": "pgrelief.io/operator",
        "reportingInstance": "pgrelief-0",
        "action": "Diagnose",
        "reason": "ConnectionsExhausted",
        "note": "max_connections reached",
        "type": "Warning",
        "regarding": {"kind": "Pod", "name": "db-0", "namespace": kube_namespace},
    }
    # Raw request: the Python client re-serializes eventTime without the microseconds that
    # MicroTime requires, which the server refuses (400).
    status, body = kube_apiserver.request(
        "POST", f"/apis/events.k8s.io/v1/namespaces/{kube_namespace}/events", event
    )
    assert status == 201, body["message"]
    listed = client.EventsV1Api(admin).list_namespaced_event(kube_namespace).items
    assert [(e.reason, e.note) for e in listed] == [
        ("ConnectionsExhausted", "max_connections reached")
    ]
    # The same object through the core/v1 view; core/v1 Events can be created too.
    core = client.CoreV1Api(admin)
    core.create_namespaced_event(
        kube_namespace,
        {
            "metadata": {"name": "pgrelief-test.2"},
            "involvedObject": {"kind": "Pod", "name": "db-0", "namespace": kube_namespace},
            "reason": "Advised",
            "message": "raise max_connections",
            "type": "Normal",
        },
    )
    reasons = sorted(e.reason for e in core.list_namespaced_event(kube_namespace).items)
    assert reasons == ["Advised", "ConnectionsExhausted"]


def deployment(name: str, **spec_extra: Any) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": "postgres:17"}]},
            },
            **spec_extra,
        },
    }


def test_builtin_workloads_and_server_side_validation(
    kube_apiserver: KubeApiServer, admin: client.ApiClient, kube_namespace: str
) -> None:
    apps, core = client.AppsV1Api(admin), client.CoreV1Api(admin)
    apps.create_namespaced_deployment(kube_namespace, deployment("db"))
    core.create_namespaced_config_map(
        kube_namespace, {"metadata": {"name": "cfg"}, "data": {"max_connections": "100"}}
    )
    svc = core.create_namespaced_service(
        kube_namespace,
        {
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]},
        },
    )
    assert svc.spec.cluster_ip.startswith("10.0.0.")
    assert apps.read_namespaced_deployment("db", kube_namespace).spec.replicas == 1

    # Invalid objects go as raw requests: the Python client's models would refuse them
    # before the server sees them.
    deployments = f"/apis/apps/v1/namespaces/{kube_namespace}/deployments"

    # Missing selector: rejected by validation (422 Invalid).
    no_selector = deployment("bad1")
    del no_selector["spec"]["selector"]
    status, body = kube_apiserver.request("POST", deployments, no_selector)
    assert status == 422, body
    assert body["reason"] == "Invalid"
    assert "spec.selector" in body["message"]

    # Unknown field with fieldValidation=Strict: rejected (400 BadRequest); by default
    # (Warn) it is dropped and the object is created.
    unknown = deployment("bad2", replicaz=3)
    status, body = kube_apiserver.request("POST", deployments + "?fieldValidation=Strict", unknown)
    assert status == 400, body
    assert 'unknown field "spec.replicaz"' in body["message"]
    status, body = kube_apiserver.request("POST", deployments, unknown)
    assert status == 201, body
    assert "replicaz" not in body["spec"]

    # kubectl's default (--validate=strict) asks the server for the same.
    proc = kube_apiserver.kubectl(
        "apply", "-n", kube_namespace, "-f", "-", input=json.dumps(unknown), check=False
    )
    assert proc.returncode != 0
    assert "unknown field" in proc.stderr


def test_service_account_token_gets_exactly_its_role(
    kube_apiserver: KubeApiServer, admin: client.ApiClient, kube_namespace: str
) -> None:
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    ns = kube_namespace
    core.create_namespaced_service_account(ns, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "configmap-reader"},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "configmap-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    core.create_namespaced_config_map(ns, {"metadata": {"name": "visible"}, "data": {"k": "v"}})
    other_ns = f"{ns}-other"
    core.create_namespace({"metadata": {"name": other_ns}})

    kubeconfig = kube_apiserver.kubeconfig_for_service_account(ns, "reader")
    whoami = json.loads(
        kube_apiserver.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"

    with kube_apiserver.api_client(kubeconfig) as sa_api:
        sa_core = client.CoreV1Api(sa_api)
        # Granted: the Role's verbs on configmaps in its namespace (RBAC cache may lag briefly).
        names = eventually(
            lambda: _try(
                lambda: [c.metadata.name for c in sa_core.list_namespaced_config_map(ns).items]
            ),
            what="the RoleBinding to take effect",
        )
        assert "visible" in names
        assert sa_core.read_namespaced_config_map("visible", ns).data == {"k": "v"}

        # Denied: other verbs, other resources, other namespaces, cluster scope.
        denied: list[Callable[[], object]] = [
            lambda: sa_core.create_namespaced_config_map(ns, {"metadata": {"name": "nope"}}),
            lambda: sa_core.delete_namespaced_config_map("visible", ns),
            lambda: sa_core.list_namespaced_secret(ns),
            lambda: sa_core.list_namespaced_config_map(other_ns),
            sa_core.list_namespace,
        ]
        for call in denied:
            assert api_error(call).status == 403

    can_i = kube_apiserver.kubectl(
        "auth", "can-i", "list", "secrets", "-n", ns, kubeconfig=kubeconfig, check=False
    )
    assert can_i.stdout.strip() == "no"
    can_i = kube_apiserver.kubectl(
        "auth", "can-i", "watch", "configmaps", "-n", ns, kubeconfig=kubeconfig, check=False
    )
    assert can_i.stdout.strip() == "yes"


def _try(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except ApiException as exc:
        if exc.status == 403:
            return None
        raise


def test_kopf_operator_handles_a_resource(
    kube_apiserver: KubeApiServer,
    admin: client.ApiClient,
    kube_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    apply_crd(kube_apiserver, crd_manifest(KOPF_GROUP, "gadgets", "Gadget"))
    monkeypatch.setenv("KUBECONFIG", str(kube_apiserver.kubeconfig))
    api = client.CustomObjectsApi(admin)
    crud = {"group": KOPF_GROUP, "version": "v1", "namespace": kube_namespace, "plural": "gadgets"}
    handlers = Path(__file__).with_name("kopf_handlers.py")
    name = f"g-{uuid.uuid4().hex[:6]}"

    with KopfRunner(
        ["run", "--standalone", "--namespace", kube_namespace, "--verbose", str(handlers)],
        timeout=60,
    ) as runner:
        api.create_namespaced_custom_object(
            **crud,
            body={
                "apiVersion": f"{KOPF_GROUP}/v1",
                "kind": "Gadget",
                "metadata": {"name": name},
                "spec": {"name": "pgrelief"},
            },
        )

        def handled() -> dict[str, Any] | None:
            obj: dict[str, Any] = api.get_namespaced_custom_object(**crud, name=name)
            done = obj.get("status", {}).get("greet") and obj["metadata"].get("annotations", {})
            return obj if done and done.get(f"{KOPF_GROUP}/handled-by") == "kopf" else None

        obj = eventually(handled, timeout=30, what="the kopf handler to patch the object")

    assert obj["status"]["greet"] == {"greeting": "hello pgrelief"}
    assert runner.exception is None
    assert runner.exit_code == 0
    assert "Handler 'greet' succeeded." in runner.output
