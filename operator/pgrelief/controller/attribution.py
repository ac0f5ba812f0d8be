"""The operator's side of attribution: the pod index kept current, and the PgBouncer consoles.

Why an informer of our own rather than kopf's: the Pods that hold a database's connections
usually live in other namespaces than the ConnectionPolicy (the applications' own), so the
index has a scope of its own (``--attribute-namespace``, ``--attribute-all-namespaces``),
independent of the namespaces whose policies kopf serves. One thread per (kind, namespace)
lists, then watches from the list's resourceVersion; an expired watch lists again; a refused
one (RBAC) is logged when it starts failing and retried with backoff. Only ``PodRecord``s
are kept (a few hundred bytes a Pod), never the objects, and lists are paged.

Attribution is asked per cycle (``Attributor.enrich``): until every Pod list has been read
once, a snapshot is not attributed at all (a workload protection then spares everything,
which is what a half-read index must mean). Each PgBouncer pod of the policy's pooler is
asked for SHOW CLIENTS / SERVERS / POOLS on its admin console, as the lookup role of
``authQuery`` (the config's ``stats_users``), each read bounded to a couple of seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from kubernetes.config.config_exception import ConfigException

from pgrelief.attribution import PodIndex, PodRecord, attribute, controller_of, pod_record
from pgrelief.controller.credentials import CredentialsError, secret_value
from pgrelief.controller.events import WorkloadEvents
from pgrelief.controller.kube import Kube, KubeError, WatchExpiredError, api_client
from pgrelief.cycle import CycleReport
from pgrelief.errors import PgreliefError
from pgrelief.manifests import events as notes
from pgrelief.manifests.common import object_name
from pgrelief.pgbouncer_ini import DEFAULT_LISTEN_PORT
from pgrelief.policy import ConnectionPolicy
from pgrelief.pooler_console import console_conninfo, open_console, read_console
from pgrelief.snapshot import Snapshot
from pgrelief.workloads import DEPLOYMENT, JOB, POD, REPLICA_SET, PoolerView, Workload

log = logging.getLogger(__name__)

KINDS = (POD, REPLICA_SET, JOB)
PAGE = 500
WATCH_TIMEOUT_S = 290
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
CONSOLE_READ_S = 2.0  # one pooler's three SHOW commands; then its socket is cut
SECRET_TTL_S = 30.0  # the lookup role's password is read again after this long


@dataclass(frozen=True, slots=True)
class AttributionSettings:
    """``pgrelief operator`` flags: where Pods are looked for, and the workload Events."""

    enabled: bool = True
    namespaces: tuple[str, ...] | None = ()  # None: every namespace
    workload_events: bool = True

    @property
    def scope(self) -> str:
        if self.namespaces is None:
            return "all namespaces"
        return "namespaces " + ", ".join(self.namespaces)


class Informer:
    """Keeps ``index`` current from list + watch of Pods, ReplicaSets and Jobs."""

    def __init__(
        self,
        kube: Kube,
        index: PodIndex,
        namespaces: Sequence[str] | None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.kube = kube
        self.index = index
        self.namespaces: list[str | None] = list(namespaces) if namespaces is not None else [None]
        self.stopping = stopping or threading.Event()
        self._listed: set[tuple[str, str | None]] = set()
        self.problems: dict[tuple[str, str | None], str] = {}
        self.events = 0

    @property
    def ready(self) -> bool:
        """Every Pod list has been read once (ReplicaSets and Jobs may lag: names suffice)."""
        return all((POD, ns) in self._listed for ns in self.namespaces)

    def start(self) -> Informer:
        for kind in KINDS:
            for namespace in self.namespaces:
                threading.Thread(
                    target=self._run,
                    args=(kind, namespace),
                    name=f"pgrelief-watch-{kind}-{namespace or 'all'}",
                    daemon=True,
                ).start()
        return self

    def fill(self) -> None:
        """List everything once, in this thread (``diagnose --kube``): KubeError if refused."""
        for kind in KINDS:
            for namespace in self.namespaces:
                try:
                    self._list(kind, namespace)
                except KubeError:
                    if kind == POD:
                        raise
                    # ReplicaSets and Jobs only refine the names (uid, CronJob); go without.

    def _run(self, kind: str, namespace: str | None) -> None:
        delay = RETRY_FIRST_S
        while not self.stopping.is_set():
            try:
                version = self._list(kind, namespace)
                self.problems.pop((kind, namespace), None)
                delay = RETRY_FIRST_S
                while not self.stopping.is_set():
                    for event in self.kube.watch(kind, namespace, version, WATCH_TIMEOUT_S):
                        version = self._apply(kind, event) or version
            except WatchExpiredError:
                continue  # list again from now
            except Exception as error:
                message = str(error) if isinstance(error, KubeError) else repr(error)
                if self.problems.get((kind, namespace)) != message:
                    log.warning("pod index: %s; retrying with backoff", message)
                self.problems[(kind, namespace)] = message
                self.stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _list(self, kind: str, namespace: str | None) -> str:
        token: str | None = None
        pods: list[PodRecord] = []
        owners: list[tuple[str, str, Any]] = []
        while True:
            page = self.kube.list_page(kind, namespace, limit=PAGE, continue_token=token)
            for item in page.get("items") or []:
                if kind == POD:
                    record = pod_record(item)
                    if record is not None:
                        pods.append(_interned(record))
                else:
                    meta = item.get("metadata") or {}
                    owners.append(
                        (str(meta.get("namespace")), str(meta.get("name")), controller_of(meta))
                    )
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                break
        if kind == POD:
            self.index.replace_pods(pods, namespace)
        else:
            self.index.replace_controllers(kind, owners, namespace)
        self._listed.add((kind, namespace))
        return str(meta.get("resourceVersion") or "")

    def _apply(self, kind: str, event: dict[str, Any]) -> str | None:
        self.events += 1
        body = event.get("object") or {}
        meta = body.get("metadata") or {}
        version = meta.get("resourceVersion")
        kind_of_event = event.get("type")
        if kind_of_event == "BOOKMARK":
            return str(version) if version else None
        if kind == POD:
            uid = str(meta.get("uid") or meta.get("name"))
            record = pod_record(body) if kind_of_event != "DELETED" else None
            if record is None:
                self.index.delete_pod(uid)
            else:
                self.index.put_pod(_interned(record))
        else:
            namespace, name = str(meta.get("namespace")), str(meta.get("name"))
            if kind_of_event == "DELETED":
                self.index.delete_controller(kind, namespace, name)
            else:
                self.index.put_controller(kind, namespace, name, controller_of(meta))
        return str(version) if version else None


def _interned(record: PodRecord) -> PodRecord:
    # Thousands of Pods share a namespace and an owner kind: one string each, not thousands.
    record.namespace = sys.intern(record.namespace)
    return record


class PoolerConsoles:
    """The admin consoles of the PgBouncer pods of one policy, kept open across cycles."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._open: dict[str, tuple[str, psycopg.Connection[Any]]] = {}
        self._password: tuple[float, tuple[str, str, str], str] | None = None

    def read(self, policy: ConnectionPolicy, index: PodIndex) -> list[PoolerView]:
        pgbouncer = policy.spec.pgbouncer
        query = pgbouncer.auth.auth_query
        namespace = policy.metadata.namespace or "default"
        if not pgbouncer.enabled or query is None:
            self.close()
            return []
        workload = Workload(DEPLOYMENT, namespace, object_name(policy.metadata.name))
        pods = index.pods_of(workload)
        try:
            password = self._secret(
                namespace, query.password_secret.name, query.password_secret.key
            )
        except (CredentialsError, KubeError) as error:
            return [_unread(pod, workload, str(error)) for pod in pods]
        views = [self._read_one(pod, workload, query.user, password) for pod in pods]
        for uid in set(self._open) - {pod.uid for pod in pods}:
            self._close(uid)
        return views

    def _secret(self, namespace: str, name: str, key: str) -> str:
        wanted = (namespace, name, key)
        held = self._password
        if held and held[1] == wanted and time.monotonic() - held[0] < SECRET_TTL_S:
            return held[2]
        field = "spec.pgbouncer.auth.authQuery.passwordSecret"
        value = secret_value(self.kube, namespace, name, key, field)
        self._password = (time.monotonic(), wanted, value)
        return value

    def _read_one(self, pod: PodRecord, workload: Workload, user: str, password: str) -> PoolerView:
        address = pod.ips[0]
        conninfo = console_conninfo(address, DEFAULT_LISTEN_PORT, user, password)
        try:
            conn = self._connection(pod.uid, conninfo)
            with _deadline(conn, CONSOLE_READ_S):
                clients, servers, pools = read_console(conn)
        except psycopg.Error as error:
            self._close(pod.uid)
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            return _unread(pod, workload, f"PgBouncer console at {address}: {first}")
        return PoolerView(pod.name, pod.namespace, address, workload, clients, servers, pools)

    def _connection(self, uid: str, conninfo: str) -> psycopg.Connection[Any]:
        held = self._open.get(uid)
        if held is not None and held[0] == conninfo and not held[1].closed and not held[1].broken:
            return held[1]
        self._close(uid)
        conn = open_console(conninfo)
        self._open[uid] = (conninfo, conn)
        return conn

    def _close(self, uid: str) -> None:
        held = self._open.pop(uid, None)
        if held is not None:
            try:
                held[1].close()
            except psycopg.Error:
                log.debug("closing a PgBouncer console failed", exc_info=True)

    def close(self) -> None:
        for uid in list(self._open):
            self._close(uid)


def _unread(pod: PodRecord, workload: Workload, why: str) -> PoolerView:
    return PoolerView(pod.name, pod.namespace, pod.ips[0], workload, error=why)


class _deadline:  # noqa: N801 - used as a context manager
    """Cut the connection's socket if the block takes longer than ``seconds`` (a frozen pod
    must not hold the cycle: libpq's wait then fails at once)."""

    def __init__(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self._conn = conn
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def _cut(self) -> None:
        try:
            with socket.socket(fileno=os.dup(self._conn.fileno())) as cut:
                cut.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            log.debug("could not cut a PgBouncer console", exc_info=True)

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()


class Attributor:
    """What the operator's workers ask each cycle: the snapshot placed on workloads."""

    def __init__(self, kube: Kube, settings: AttributionSettings) -> None:
        self.settings = settings
        self.index = PodIndex()
        self.informer = Informer(kube, self.index, settings.namespaces)
        self.kube = kube

    def start(self) -> Attributor:
        self.informer.start()
        return self

    def stop(self) -> None:
        self.informer.stopping.set()

    def enricher(
        self, consoles: PoolerConsoles
    ) -> Callable[[Snapshot, ConnectionPolicy], Snapshot]:
        def enrich(snapshot: Snapshot, policy: ConnectionPolicy) -> Snapshot:
            if not self.informer.ready:
                return snapshot
            poolers = consoles.read(policy, self.index)
            attributed = attribute(snapshot, self.index, poolers, scope=self.settings.scope)
            return replace(snapshot, attribution=attributed)

        return enrich


def attribute_from_cluster(snapshot: Snapshot, namespaces: Sequence[str] | None) -> Snapshot:
    """``pgrelief diagnose --kube``: one list of Pods, ReplicaSets and Jobs (the kubeconfig's
    current context; ``namespaces`` None: all of them) and the snapshot placed on them."""
    try:
        kube = Kube(api_client(pool_size=4))
    except (ConfigException, OSError) as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PgreliefError(f"--kube: no usable kubeconfig or in-cluster account: {why}") from None
    index = PodIndex()
    informer = Informer(kube, index, namespaces)
    try:
        informer.fill()
    except KubeError as error:
        hint = " (--kube-namespace NS lists one namespace)" if namespaces is None else ""
        raise PgreliefError(f"--kube: {error}{hint}") from None
    scope = AttributionSettings(namespaces=tuple(namespaces) if namespaces else None).scope
    return replace(snapshot, attribution=attribute(snapshot, index, scope=scope))


class PolicyAttribution:
    """One policy's use of attribution: its PgBouncer consoles, its Events on workloads."""

    def __init__(self, attributor: Attributor, kube: Kube, instance: str) -> None:
        self.attributor = attributor
        self.consoles = PoolerConsoles(kube)
        self.enrich = attributor.enricher(self.consoles)
        self.events = WorkloadEvents(kube, instance)

    def announce(self, report: CycleReport, policy: str, now: datetime) -> None:
        """One Event on each workload whose sessions this cycle terminated."""
        snapshot = report.snapshot
        if not self.attributor.settings.workload_events or snapshot is None:
            return
        attribution = snapshot.attribution
        if attribution is None:
            return
        self.events.record(
            notes.workload_notes(report.records, attribution.origins, policy=policy), now=now
        )

    def close(self) -> None:
        self.consoles.close()
