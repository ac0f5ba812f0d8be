"""Every Kubernetes API call pgrelief makes itself (kopf makes its own for watching).

The official client is synchronous: these functions run in the operator's worker threads,
never on kopf's event loop. Each one names the object it touched in the errors it raises, so
a missing permission surfaces as a clear message (and a failing test), never silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

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

    # ---- what sessions come from: Pods and their owners (attribution) -------------------
    def list_page(
        self, kind: str, namespace: str | None, *, limit: int, continue_token: str | None = None
    ) -> dict[str, Any]:
        """One page of a list of ``kind`` (Pod, ReplicaSet, Job) in ``namespace`` (None: all),
        as the raw JSON: ``items``, ``metadata.resourceVersion`` and ``.continue``."""
        call = _watched(self.api, kind, namespace)
        where = f"in {namespace}" if namespace else "in all namespaces"
        extra = {"_continue": continue_token} if continue_token else {}
        try:
            response = call(limit=limit, _preload_content=False, **extra)
        except ApiException as error:
            raise _error(f"listing {kind}s {where}", error) from None
        return _json(response)

    def watch(
        self, kind: str, namespace: str | None, resource_version: str, timeout_s: int
    ) -> Iterator[dict[str, Any]]:
        """The changes to ``kind`` after ``resource_version``, one event dict each, until the
        server ends the stream (``timeout_s``). An expired version raises ``WatchExpiredError``."""
        call = _watched(self.api, kind, namespace)
        where = f"in {namespace}" if namespace else "in all namespaces"
        try:
            response = call(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _preload_content=False,
                _request_timeout=(30, timeout_s + 30),
            )
        except ApiException as error:
            if error.status == 410:
                raise WatchExpiredError(f"watching {kind}s {where}", error) from None
            raise _error(f"watching {kind}s {where}", error) from None
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                event: dict[str, Any] = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    problem = ApiException(status=status.get("code"), reason=status.get("reason"))
                    if status.get("code") == 410:
                        raise WatchExpiredError(f"watching {kind}s {where}", problem)
                    raise KubeError(f"watching {kind}s {where}", problem)
                yield event
        finally:
            response.release_conn()


class WatchExpiredError(KubeError):
    """The resourceVersion a watch started from is too old (HTTP 410): list again."""


_WATCHED: dict[str, tuple[type[Any], str]] = {
    "Pod": (client.CoreV1Api, "pod"),
    "ReplicaSet": (client.AppsV1Api, "replica_set"),
    "Job": (client.BatchV1Api, "job"),
}


def _watched(api: client.ApiClient, kind: str, namespace: str | None) -> Any:
    api_class, suffix = _WATCHED[kind]
    if namespace is None:
        return getattr(api_class(api), f"list_{suffix}_for_all_namespaces")
    method = getattr(api_class(api), f"list_namespaced_{suffix}")
    return lambda **kwargs: method(namespace, **kwargs)


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
