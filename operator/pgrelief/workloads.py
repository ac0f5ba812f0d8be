"""Who is behind a connection: the Kubernetes workload a session comes from, as plain data.

pg_stat_activity says ``client_addr 10.2.3.4``; on Kubernetes that address is a Pod, and the
Pod belongs to a Deployment, StatefulSet, DaemonSet or CronJob that a team owns. A snapshot
carries an ``Attribution`` when pgrelief could ask the cluster (the operator's pod index,
``pgrelief diagnose --kube``): the origin of each session it could place, and what the
PgBouncer pods it manages said about the clients behind them. ``pgrelief.attribution`` works
these out; diagnose, plan, the Events and the report only read them. Leaf data: nothing here
knows about Kubernetes or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase

# The kinds a Pod is resolved to (its top owner); any other owner kind is shown as it is.
DEPLOYMENT = "Deployment"
STATEFUL_SET = "StatefulSet"
DAEMON_SET = "DaemonSet"
CRON_JOB = "CronJob"
JOB = "Job"
REPLICA_SET = "ReplicaSet"
POD = "Pod"


@dataclass(frozen=True, slots=True)
class Workload:
    """The top owner of a Pod: what a team deploys (``Deployment shop/checkout-api``).

    Two references to the same kind, namespace and name are equal whatever their uid (a
    Deployment deleted and created again is the same workload to its team); the uid and
    apiVersion are what an Event on the object itself needs.
    """

    kind: str
    namespace: str
    name: str
    uid: str | None = field(default=None, compare=False)
    api_version: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def matches(self, kind: str, namespace: str, name: str) -> bool:
        """Whether a selector names this workload: kind case-insensitive, namespace exact,
        name exact or a glob pattern (``checkout-*``)."""
        return (
            self.kind.lower() == kind.lower()
            and self.namespace == namespace
            and (self.name == name or fnmatchcase(self.name, name))
        )


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one session comes from.

    ``workload`` is None when the address belongs to pods but none can be blamed: the Pod
    holding the address now started after the session did (the address was reused), or
    several workloads share it (host network). ``why`` then says which, and ``possible``
    names the workloads it may come from (protections honour them).
    ``via`` names the PgBouncer pod a session came through; a pooler's own pooled
    connection (no client linked to it) is attributed to the pooler's workload.
    """

    workload: Workload | None
    pod: str | None = None
    via: str | None = None
    why: str = ""
    possible: tuple[Workload, ...] = ()

    @property
    def label(self) -> str:
        if self.workload is None:
            return "unknown workload"
        return self.workload.label


@dataclass(frozen=True, slots=True)
class PoolerClient:
    """One row of PgBouncer's SHOW CLIENTS (or SHOW SERVERS: the same columns)."""

    user: str
    database: str
    state: str  # active, waiting, idle, used, ... (PgBouncer's words)
    addr: str | None
    port: int | None
    connect_time: datetime | None
    wait_s: float
    ptr: str
    link: str
    remote_pid: int | None = None  # servers: the PostgreSQL backend's pid
    application_name: str = ""


@dataclass(frozen=True, slots=True)
class PoolerPool:
    """One row of PgBouncer's SHOW POOLS: clients waiting for a server connection."""

    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_idle: int
    sv_used: int
    maxwait_s: float
    pool_mode: str


@dataclass(frozen=True, slots=True)
class PoolerView:
    """What one PgBouncer pod's admin console said (``error``: why it could not be read)."""

    pod: str
    namespace: str
    address: str
    workload: Workload | None
    clients: tuple[PoolerClient, ...] = ()
    servers: tuple[PoolerClient, ...] = ()
    pools: tuple[PoolerPool, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Attribution:
    """Sessions placed on workloads, for one snapshot.

    ``origins`` maps the pid of each client session whose address (or PgBouncer client)
    matched a Pod; sessions from elsewhere (outside the cluster, a Unix socket) are absent.
    ``client_origins`` maps (pooler pod, client ptr) to the origin of each PgBouncer client.
    ``scope`` says where Pods were looked for (``namespaces shop, db`` / ``all namespaces``).
    """

    origins: Mapping[int, Origin] = field(default_factory=dict)
    poolers: tuple[PoolerView, ...] = ()
    client_origins: Mapping[tuple[str, str], Origin] = field(default_factory=dict)
    scope: str = ""
    notes: tuple[str, ...] = ()
