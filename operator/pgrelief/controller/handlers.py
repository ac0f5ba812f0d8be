"""kopf wiring, nothing else: which handler reacts to what, and whom it hands the work to.

- ``relieve`` (daemon): one ``PolicyWorker`` per ConnectionPolicy for as long as it exists;
- ``noticed`` (every watch event, nothing persisted): wakes that worker for a new spec;
- ``release`` (deletion, behind pgrelief's finalizer): ``onDelete: Revert``, bounded retries.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import kopf

from pgrelief.controller.deletion import (
    REVERT_ATTEMPTS,
    REVERT_RETRY_S,
    revert_on_delete,
    unreachable_result,
)
from pgrelief.controller.events import EventRecorder
from pgrelief.controller.kube import FIELD_MANAGER, PLURAL
from pgrelief.controller.worker import OperatorContext, PolicyWorker
from pgrelief.errors import PgreliefError
from pgrelief.manifests import events as notes
from pgrelief.manifests.common import MANAGED_BY, POLICY_ANNOTATION
from pgrelief.policy import API_GROUP, API_VERSION

DAEMON_CANCELLATION_S = 60.0  # a cycle is bounded by its 30 s deadline; then kopf cancels
WORKER_EXIT_WAIT_S = 45.0


def register(registry: kopf.OperatorRegistry) -> None:
    """Declare the operator's handlers in ``registry``."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The kubernetes client reads $KUBECONFIG at import time; kopf's reader reads it now.
        if os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
            return kopf.login_with_kubeconfig(**kwargs)
        # In a pod: the API server at $KUBERNETES_SERVICE_HOST, as controller.kube's client
        # finds it. kopf's login_with_service_account dials https://kubernetes.default.svc,
        # so without cluster DNS (CoreDNS down in an incident) kopf would see no policy at all.
        return kopf.login_via_client(**kwargs)

    @kopf.daemon(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        cancellation_timeout=DAEMON_CANCELLATION_S,
    )
    async def relieve(
        body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any
    ) -> None:
        context: OperatorContext = memo.context
        worker = PolicyWorker(context, body)
        context.workers[worker.key] = worker
        try:
            await worker.run(body, stopped)
        finally:
            if context.workers.get(worker.key) is worker:
                del context.workers[worker.key]
                # Deleted, or this replica paused by peering: either way another process (or
                # none) speaks for the policy now, and alerts take the max over replicas.
                context.metrics.forget(worker.key)

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def noticed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # kopf has already put this event's body under the daemon: only the wake-up is ours.
        context: OperatorContext = memo.context
        worker = context.workers.get((body.metadata.namespace or "", body.metadata.name or ""))
        if worker is not None:
            worker.notice(body.metadata.get("generation"))

    for group, version, plural, kind in MANAGED:
        _watch_managed(registry, group, version, plural, kind)

    @kopf.on.delete(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def release(
        body: kopf.Body, retry: int, memo: kopf.Memo, logger: kopf.Logger, **_: Any
    ) -> None:
        context: OperatorContext = memo.context
        key = (body.metadata.namespace or "", body.metadata.name or "")
        worker = context.workers.get(key)
        if worker is not None:
            # A cycle still running could re-apply a limit right after it is reverted.
            await asyncio.wait_for(worker.finished.wait(), WORKER_EXIT_WAIT_S)
        raw = dict(body)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(context.executor, revert_on_delete, context, raw)
        except PgreliefError as error:
            if retry + 1 < REVERT_ATTEMPTS:
                raise kopf.TemporaryError(
                    f"cannot revert yet ({error}); attempt {retry + 1} of {REVERT_ATTEMPTS}",
                    delay=REVERT_RETRY_S,
                ) from None
            result = unreachable_result(raw, error)
        context.metrics.forget(key)
        if result is None:
            return
        meta = body.metadata
        policy_ref = {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid}
        recorder = EventRecorder(context.kube, policy_ref, context.instance)
        if result.left:
            message = "deleted without reverting: " + "; ".join(result.left)
            note = notes.EventNote(notes.REVERT_INCOMPLETE, "Warning", message, "Revert")
            logger.warning(message)
        else:
            message = "reverted on delete: " + "; ".join(result.reverted or ["nothing changed"])
            note = notes.EventNote(notes.REVERTED, "Normal", message, "Revert")
        await loop.run_in_executor(context.executor, recorder.record, [note])


# The objects pgrelief manages for a policy (its PgBouncer): watched so the worker knows what
# the cluster has without polling (a hand edit, a deletion, replicas becoming available).
MANAGED = (
    ("", "v1", "configmaps", "ConfigMap"),
    ("", "v1", "services", "Service"),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
    ("apps", "v1", "deployments", "Deployment"),
)


def _watch_managed(
    registry: kopf.OperatorRegistry, group: str, version: str, plural: str, kind: str
) -> None:
    @kopf.on.event(
        group, version, plural, labels={MANAGED_BY: FIELD_MANAGER}, registry=registry,
        id=f"managed-{plural}",
    )  # fmt: skip
    async def managed_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        context: OperatorContext = memo.context
        policy = (body.metadata.annotations or {}).get(POLICY_ANNOTATION)
        worker = context.workers.get((body.metadata.namespace or "", policy or ""))
        if worker is None:
            return
        worker.pgbouncer.observed(kind, None if type == "DELETED" else body)
        worker.nudge()
