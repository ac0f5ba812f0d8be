"""``pgrelief operator``: kopf started with the settings a production operator needs.

- Progress and diff-base go into ``pgrelief.dev/`` annotations, never into the status: the
  status is the ConnectionPolicyStatus model's alone.
- Watch streams get server and client timeouts: a stream that stalls silently (a known kopf
  failure on some networks) is reopened instead of leaving the operator deaf.
- Peering lets replicas stand by; each process draws a random priority unless given one,
  because replicas of equal priority all pause each other. ``--standalone`` skips peering.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kopf

from pgrelief.audit import AuditLog
from pgrelief.controller.handlers import register
from pgrelief.controller.kube import Kube, api_client
from pgrelief.controller.worker import OperatorContext
from pgrelief.metrics import OperatorMetrics

FINALIZER = "pgrelief.dev/finalizer"
ANNOTATIONS_PREFIX = "pgrelief.dev"
PEERING_NAME = "pgrelief"
SERVER_TIMEOUT_S = 270
CLIENT_TIMEOUT_S = 300
CONNECT_TIMEOUT_S = 30


def settings() -> kopf.OperatorSettings:
    tuned = kopf.OperatorSettings()
    tuned.persistence.finalizer = FINALIZER
    tuned.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATIONS_PREFIX)
    tuned.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    tuned.watching.server_timeout = SERVER_TIMEOUT_S
    tuned.watching.client_timeout = CLIENT_TIMEOUT_S
    tuned.watching.connect_timeout = CONNECT_TIMEOUT_S
    # kopf's own Events are for handler failures; our Events say what pgrelief did.
    tuned.posting.level = logging.WARNING
    return tuned


def run_operator(
    *,
    namespaces: Sequence[str],
    all_namespaces: bool,
    metrics_port: int | None,
    liveness: str | None,
    standalone: bool,
    priority: int | None,
    peering_name: str,
    log_format: str,
    audit_file: Path | None,
    workers: int,
    instance: str,
    verbose: bool,
) -> None:
    """Run the operator until SIGTERM/SIGINT."""
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
    )
    audit = AuditLog(path=audit_file, stream=sys.stdout)
    audit.check()
    context = OperatorContext(
        kube=Kube(api_client(pool_size=workers + 4)),
        executor=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgrelief-cycle"),
        metrics=OperatorMetrics(),
        audit=audit,
        instance=instance,
    )
    if metrics_port is not None:
        context.metrics.serve(metrics_port)
    registry = kopf.OperatorRegistry()
    register(registry)
    kopf.run(
        registry=registry,
        settings=settings(),
        clusterwide=all_namespaces,
        namespaces=list(namespaces),
        standalone=standalone,
        priority=priority if priority is not None else random.randint(1, 2**31 - 1),
        # A peering name makes peering mandatory in kopf, which pauses a standalone operator.
        peering_name=None if standalone else peering_name,
        liveness_endpoint=liveness,
        memo=kopf.Memo(context=context),
    )
