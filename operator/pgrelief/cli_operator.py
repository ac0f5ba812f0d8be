"""``pgrelief operator``: the command line of the Kubernetes operator.

Apart from ``pgrelief.cli`` because its flags (watching, peering, the pod index) are many and
only this command reads them; kopf and the kubernetes client are imported only when it runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click


@click.command("operator")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch ConnectionPolicies in this namespace (repeatable; globs like team-*).",
)
@click.option("--all-namespaces", is_flag=True, help="Watch every namespace.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics.")
@click.option(
    "--liveness",
    metavar="URL",
    help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option("--standalone", is_flag=True, help="No peering: for exactly one replica.")
@click.option("--priority", type=int, help="Peering priority (default: random per process).")
@click.option(
    "--peering",
    "peering_name",
    default="pgrelief",
    show_default=True,
    help="Name of the kopf peering object the replicas coordinate through.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or as one JSON object each.",
)
@click.option(
    "--audit-file",
    type=click.Path(path_type=Path),
    help="Also append audit records here (they always go to stdout, one JSON line each).",
)
@click.option(
    "--workers", type=click.IntRange(1, 512), default=16, show_default=True,
    help="Threads that run cycles (sync PostgreSQL and API calls).",
)  # fmt: skip
@click.option(
    "--instance",
    default=lambda: os.environ.get("POD_NAME") or socket.gethostname(),
    help="Name this process reports in Events (default: $POD_NAME or the host name).",
)
@click.option(
    "--attribute-namespace",
    "attribute_namespaces",
    multiple=True,
    metavar="NS",
    help="Also index the Pods of this namespace (repeatable), to name the workload behind "
    "each session; the watched namespaces are always indexed.",
)
@click.option(
    "--attribute-all-namespaces",
    is_flag=True,
    help="Index the Pods of every namespace (needs cluster-wide list/watch of pods, "
    "replicasets and jobs).",
)
@click.option(
    "--no-attribution",
    is_flag=True,
    help="Do not index Pods: sessions are not placed on workloads (no pod RBAC needed).",
)
@click.option(
    "--no-workload-events",
    is_flag=True,
    help="Do not post an Event on the workloads whose sessions were terminated.",
)
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator_command(
    namespaces: tuple[str, ...],
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
    attribute_namespaces: tuple[str, ...],
    attribute_all_namespaces: bool,
    no_attribution: bool,
    no_workload_events: bool,
    verbose: bool,
) -> None:
    """Run the Kubernetes operator for ConnectionPolicy objects (KUBECONFIG or in-cluster).

    Sessions are placed on the workloads of the Pods they come from (Deployment, StatefulSet,
    CronJob...): the watched namespaces' Pods are indexed, plus --attribute-namespace ones,
    or every namespace's with --attribute-all-namespaces or --all-namespaces.
    """
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace NS (one or more) or --all-namespaces")
    if no_attribution and (attribute_namespaces or attribute_all_namespaces):
        raise click.UsageError("--no-attribution goes with no --attribute-* flag")
    from pgrelief.controller.attribution import (  # noqa: PLC0415 - kopf only when needed
        AttributionSettings,
    )
    from pgrelief.controller.main import run_operator  # noqa: PLC0415

    indexed: tuple[str, ...] | None = None
    if not (all_namespaces or attribute_all_namespaces):
        # A glob is no namespace a list can name: index those with --attribute-namespace.
        plain = [ns for ns in namespaces if not any(ch in ns for ch in "*?[")]
        indexed = tuple(dict.fromkeys([*plain, *attribute_namespaces]))
    attribution = AttributionSettings(
        enabled=not no_attribution, namespaces=indexed, workload_events=not no_workload_events
    )

    run_operator(
        namespaces=namespaces,
        all_namespaces=all_namespaces,
        metrics_port=metrics_port,
        liveness=liveness,
        standalone=standalone,
        priority=priority,
        peering_name=peering_name,
        log_format=log_format,
        audit_file=audit_file,
        workers=workers,
        instance=instance,
        verbose=verbose,
        attribution=attribution,
    )
