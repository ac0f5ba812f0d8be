"""The PgBouncer a policy asks for: ConfigMap, Deployment, Service and PodDisruptionBudget.

``desired_pgbouncer`` is what the operator calls each reconcile: it fits the pools into the
server's connection budget (``pool_budget``) and either returns the four objects, or says why
nothing may be applied (``NotApplied``: an oversubscribed spec, a config this PgBouncer cannot
run) as the ``PgBouncerReady`` condition to write; a config that would exhaust the server is
never built.

The pod runs as the image's non-root user with a read-only root file system, every capability
dropped and RuntimeDefault seccomp. Its template carries the ini's checksum, so a changed
config rolls the pods, one at a time and never below the wanted replicas (``maxUnavailable:
0``); a stopping pod first leaves the Service's endpoints (preStop), then PgBouncer gets
SIGTERM and lets its clients finish within ``terminationGracePeriodSeconds`` (before 1.23 the
start script turns SIGTERM into PgBouncer's safe shutdown: ``start_script``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from pgrelief.manifests.common import (
    Manifest,
    Owner,
    hashed,
    labels,
    metadata,
    object_name,
    selector_labels,
)
from pgrelief.manifests.events import EventNote
from pgrelief.manifests.pgbouncer_config import (
    AUTH_PASSWORD_ENV,
    AUTH_USER_ENV,
    CONFIG_DIR,
    INI_KEY,
    RUN_DIR,
    SERVER_CA_FILE,
    USERLIST_FILE,
    ServerInputs,
    pool_request,
    render_ini,
    start_script,
)
from pgrelief.pgbouncer_auth import READY_CONDITION
from pgrelief.pgbouncer_ini import DEFAULT_IMAGE, DEFAULT_LISTEN_PORT, Version
from pgrelief.policy import Condition, ConnectionPolicySpec
from pgrelief.pool_budget import PoolBudget, fit_pools
from pgrelief.sizing import SizeError

# Condition reasons and Event reasons (DESIGN.md's CamelCase verbs).
POOL_OVERSUBSCRIBED = "PoolOversubscribed"
CONFIG_INVALID = "PgBouncerConfigInvalid"
PGBOUNCER_RECONCILED = "PgBouncerReconciled"
EVENT_ACTION = "ReconcilePgBouncer"
CONFIG_HASH = "pgrelief.dev/config-hash"
CONTAINER = "pgbouncer"
PORT_NAME = "pgbouncer"
SERVICE_PORT = 5432  # clients keep PostgreSQL's port; the Service maps it to PgBouncer's
# Long enough for the endpoints controller and kube-proxy to stop sending new clients here
# before PgBouncer is told to stop.
PRESTOP_SLEEP_S = 5

_DEFAULT_POOL_SIZE_LINE = re.compile(r"^default_pool_size = (\d+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PgBouncerObjects:
    """The four objects to create or patch, and the budget they were sized from."""

    config_map: Manifest
    deployment: Manifest
    service: Manifest
    pod_disruption_budget: Manifest
    budget: PoolBudget
    version: Version

    def all(self) -> list[Manifest]:
        """In apply order: the config before the pods that read it."""
        return [self.config_map, self.service, self.pod_disruption_budget, self.deployment]

    def reconciled_note(self) -> EventNote:
        """The Normal Event for objects created or changed (post it only when they were)."""
        return EventNote(
            PGBOUNCER_RECONCILED,
            "Normal",
            f"PgBouncer {object_name_of(self.config_map)}: " + self.budget.message(),
            EVENT_ACTION,
        )

    def condition(self, available_replicas: int) -> Condition:
        """``PgBouncerReady`` from the Deployment's ``status.availableReplicas``."""
        wanted = self.deployment["spec"]["replicas"]
        ready = available_replicas >= wanted
        return Condition(
            type=READY_CONDITION,
            status="True" if ready else "False",
            reason="Available" if ready else "ReplicasUnavailable",
            message=(
                f"{available_replicas}/{wanted} PgBouncer replicas available; "
                + self.budget.message()
            ),
        )


@dataclass(frozen=True, slots=True)
class NotApplied:
    """Why no object may be applied; the reason is also the Warning Event's."""

    reason: str  # POOL_OVERSUBSCRIBED or CONFIG_INVALID
    message: str
    budget: PoolBudget | None = None

    def condition(self) -> Condition:
        return Condition(
            type=READY_CONDITION, status="False", reason=self.reason, message=self.message
        )

    def note(self) -> EventNote:
        """The Warning Event saying the same (post it when the condition first says so)."""
        return EventNote(self.reason, "Warning", self.message, EVENT_ACTION)


def object_name_of(manifest: Manifest) -> str:
    name: str = manifest["metadata"]["name"]
    return name


def desired_pgbouncer(
    owner: Owner,
    spec: ConnectionPolicySpec,
    server: ServerInputs,
    *,
    default_image: str = DEFAULT_IMAGE,
    previous_default_pool_size: int | None = None,
) -> PgBouncerObjects | NotApplied | None:
    """The objects for ``spec.pgbouncer``, or why none may be applied; None when disabled.

    ``server`` comes from the latest snapshot (``ServerInputs.from_snapshot``);
    ``previous_default_pool_size`` from the live ConfigMap (``applied_default_pool_size``),
    so a computed pool size does not flap with the superuser sessions seen.
    """
    pgbouncer = spec.pgbouncer
    if not pgbouncer.enabled:
        return None
    image = pgbouncer.image or default_image
    version = pgbouncer.resolved_version(default_image)
    if version is None:
        return NotApplied(
            CONFIG_INVALID,
            f"cannot tell the PgBouncer version of image {image!r} from its tag; "
            "set spec.pgbouncer.version",
        )
    try:
        request = pool_request(
            spec, server, version, previous_default_pool_size=previous_default_pool_size
        )
        budget = fit_pools(request)
    except SizeError as invalid:
        return NotApplied(CONFIG_INVALID, f"PgBouncer not applied: {invalid}")
    if not budget.fits:
        return NotApplied(POOL_OVERSUBSCRIBED, "PgBouncer not applied: " + budget.message(), budget)
    try:
        ini = render_ini(spec, budget, version)
    except ValueError as invalid:
        return NotApplied(CONFIG_INVALID, f"PgBouncer not applied: {invalid}", budget)
    return PgBouncerObjects(
        config_map=build_config_map(owner, ini),
        deployment=build_deployment(owner, spec, ini, budget, image, version),
        service=build_service(owner),
        pod_disruption_budget=build_pod_disruption_budget(owner),
        budget=budget,
        version=version,
    )


def applied_default_pool_size(config_map: Manifest | None) -> int | None:
    """The default_pool_size a live ConfigMap's pgbouncer.ini has (None: no such line)."""
    if not config_map:
        return None
    found = _DEFAULT_POOL_SIZE_LINE.search((config_map.get("data") or {}).get(INI_KEY, ""))
    return int(found.group(1)) if found else None


def config_hash(ini: str) -> str:
    return hashlib.sha256(ini.encode()).hexdigest()


def build_config_map(owner: Owner, ini: str) -> Manifest:
    return hashed(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(owner),
            "data": {INI_KEY: ini},
        }
    )


def build_service(owner: Owner) -> Manifest:
    return hashed(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(owner),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(owner),
                "ports": [
                    {
                        "name": PORT_NAME,
                        "port": SERVICE_PORT,
                        "targetPort": PORT_NAME,
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )


def build_pod_disruption_budget(owner: Owner) -> Manifest:
    # One pod at a time may be evicted; a pod that is not ready anyway may always be, so a
    # stuck pod never blocks a node drain.
    return hashed(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(owner),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector_labels(owner)},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }
    )


def _volumes(owner: Owner, spec: ConnectionPolicySpec) -> list[dict[str, Any]]:
    pgbouncer = spec.pgbouncer
    sources: list[dict[str, Any]] = [
        {
            "configMap": {
                "name": object_name(owner.name),
                "items": [{"key": INI_KEY, "path": INI_KEY}],
            }
        }
    ]
    userlist = pgbouncer.auth.userlist_secret
    if userlist is not None:
        sources.append(
            {
                "secret": {
                    "name": userlist.name,
                    "items": [{"key": userlist.key, "path": USERLIST_FILE}],
                }
            }
        )
    ca = pgbouncer.server_tls_ca_secret
    if ca is not None:
        sources.append(
            {"secret": {"name": ca.name, "items": [{"key": ca.key, "path": SERVER_CA_FILE}]}}
        )
    return [
        # Group-readable for the pod's fsGroup, nobody else's.
        {"name": "config", "projected": {"sources": sources, "defaultMode": 0o440}},
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]


def build_deployment(
    owner: Owner,
    spec: ConnectionPolicySpec,
    ini: str,
    budget: PoolBudget,
    image: str,
    version: Version,
) -> Manifest:
    pgbouncer = spec.pgbouncer
    query = pgbouncer.auth.auth_query
    env: list[dict[str, Any]] = []
    if query is not None:
        env = [
            {"name": AUTH_USER_ENV, "value": query.user},
            {
                "name": AUTH_PASSWORD_ENV,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": query.password_secret.name,
                        "key": query.password_secret.key,
                    }
                },
            },
        ]
    user, group = pgbouncer.run_as_user, pgbouncer.run_as_group
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "/bin/sh",
            "-c",
            start_script(budget, auth_query=query is not None, version=version),
        ],
        "ports": [{"name": PORT_NAME, "containerPort": DEFAULT_LISTEN_PORT, "protocol": "TCP"}],
        "env": env,
        "readinessProbe": {
            "tcpSocket": {"port": PORT_NAME},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "lifecycle": {
            "preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {PRESTOP_SLEEP_S}"]}}
        },
        "resources": {
            "requests": dict(pgbouncer.resources.requests),
            "limits": dict(pgbouncer.resources.limits),
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": user,
            "runAsGroup": group,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "run", "mountPath": RUN_DIR},
        ],
    }
    selector = selector_labels(owner)
    pod = {
        "metadata": {"labels": labels(owner), "annotations": {CONFIG_HASH: config_hash(ini)}},
        "spec": {
            "containers": [container],
            "volumes": _volumes(owner, spec),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": user,
                "runAsGroup": group,
                "fsGroup": group,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "terminationGracePeriodSeconds": pgbouncer.termination_grace_period_seconds,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": {"matchLabels": selector},
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }
                    ]
                }
            },
        },
    }
    return hashed(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(owner),
            "spec": {
                "replicas": pgbouncer.replicas,
                "selector": {"matchLabels": selector},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "revisionHistoryLimit": 5,
                "template": pod,
            },
        }
    )
