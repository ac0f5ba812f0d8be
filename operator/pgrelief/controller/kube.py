"""Every Kubernetes API call pgrelief makes itself (kopf makes its own for watching).

The official client is synchronous: these functions run in the operator's worker threads,
never on kopf's event loop. Each one names the object it touched in the errors it raises, so
a missing permission surfaces as a clear message (and a failing test), never silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from pgrelief.errors import PgreliefError
from pgrelief.policy import API_GROUP, API_VERSION

PLURAL = "connectionpolicies"


class KubeError(PgreliefError):
    """An API call failed; the message names the call and the object, never a secret."""

    def __init__(self, what: str, error: ApiException) -> None:
        self.status = error.status
        reason = error.reason or "error"
        super().__init__(f"{what}: HTTP {error.status} {reason}")


class NotFoundError(KubeError):
    """The object does not exist (HTTP 404)."""


def api_client(pool_size: int = 32) -> client.ApiClient:
    """A client from $KUBECONFIG or ~/.kube/config, else the in-cluster service account."""
    configuration = client.Configuration()
    if os.environ.get("KUBECONFIG") or os.path.exists(os.path.expanduser("~/.kube/config")):
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # One connection per worker thread, so threads never queue for a pooled socket.
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


@dataclass
class Kube:
    """The calls the operator makes, over one shared ApiClient."""

    api: client.ApiClient

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str]:
        core = client.CoreV1Api(self.api)
        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            raise _error(f"reading Secret {namespace}/{name}", error) from None
        return {key: str(value) for key, value in (secret.data or {}).items()}

    def patch_policy_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        custom = client.CustomObjectsApi(self.api)
        try:
            custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status}
            )
        except ApiException as error:
            raise _error(
                f"patching the status of ConnectionPolicy {namespace}/{name}", error
            ) from None

    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        core = client.CoreV1Api(self.api)
        try:
            core.create_namespaced_event(namespace, cast(Any, body))
        except ApiException as error:
            raise _error(f"creating an Event in {namespace}", error) from None

    def patch_event(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        core = client.CoreV1Api(self.api)
        try:
            core.patch_namespaced_event(name, namespace, body)
        except ApiException as error:
            raise _error(f"updating Event {namespace}/{name}", error) from None

    # ---- the objects pgrelief manages (PgBouncer) ----------------------------------------
    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``manifest`` as field manager pgrelief; the object as stored."""
        kind = manifest["kind"]
        meta = manifest["metadata"]
        api, suffix = _managed(self.api, kind)
        try:
            response = getattr(api, f"patch_namespaced_{suffix}")(
                meta["name"],
                meta["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
            )
        except ApiException as error:
            raise _error(f"applying {kind} {meta['namespace']}/{meta['name']}", error) from None
        return _json(response)

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as stored, or None when it does not exist."""
        api, suffix = _managed(self.api, kind)
        try:
            response = getattr(api, f"read_namespaced_{suffix}")(
                name, namespace, _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise _error(f"reading {kind} {namespace}/{name}", error) from None
        return _json(response)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete the object (and what it owns, in the background); gone already is fine."""
        api, suffix = _managed(self.api, kind)
        try:
            getattr(api, f"delete_namespaced_{suffix}")(
                name, namespace, propagation_policy="Background", _preload_content=False
            )
        except ApiException as error:
            if error.status != 404:
                raise _error(f"deleting {kind} {namespace}/{name}", error) from None


FIELD_MANAGER = "pgrelief"
_MANAGED_KINDS: dict[str, tuple[type[Any], str]] = {
    "ConfigMap": (client.CoreV1Api, "config_map"),
    "Service": (client.CoreV1Api, "service"),
    "Deployment": (client.AppsV1Api, "deployment"),
    "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
}


def _managed(api: client.ApiClient, kind: str) -> tuple[Any, str]:
    api_class, suffix = _MANAGED_KINDS[kind]
    return api_class(api), suffix


def _json(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response.data)
    return body


def _error(what: str, error: ApiException) -> KubeError:
    if error.status == 404:
        return NotFoundError(what, error)
    return KubeError(what, error)
