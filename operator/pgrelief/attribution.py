"""Placing sessions on workloads: Pods by IP, their top owners, and addresses that were reused.

The operator keeps a ``PodIndex`` up to date from watches (``controller.attribution``);
``pgrelief diagnose --kube`` fills one from a single list. Either way the rules are here, pure:

- a Pod is resolved to its top owner: Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob,
  Pod -> StatefulSet / DaemonSet; any other owner is shown as it is, no owner as the Pod;
- a Pod IP is reused by later Pods, so a session is blamed on a Pod only if that Pod was
  running when the session began (its start, within ``SKEW_S`` of ``backend_start``). A Pod
  that started after the session is not blamed: the session is "unknown". Deleted Pods are
  remembered for ``TOMBSTONE_S``, so the sessions a crashed Pod leaked still name it;
- an address shared by several workloads (host-network Pods: the node's address) is unknown
  too, with the workloads it may come from;
- a session of a PgBouncer pod pgrelief manages is matched to the pooler's server connection
  (SHOW SERVERS' remote_pid), and through its link to the client it serves, so it is blamed
  on the application Pod behind the pooler; an unlinked server connection is the pooler's own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgrelief.snapshot import CLIENT_BACKEND, Snapshot
from pgrelief.workloads import (
    DEPLOYMENT,
    JOB,
    POD,
    REPLICA_SET,
    Attribution,
    Origin,
    PoolerClient,
    PoolerView,
    Workload,
)

SKEW_S = 2.0  # node and database clocks disagree this much at most (startTime has 1 s steps)
TOMBSTONE_S = 3600.0  # deleted Pods are remembered this long (their sessions may outlive them)
MAX_TOMBSTONES = 20_000
MAX_RESOLVED = 200_000  # cached Pod -> workload resolutions (one per workload, mostly)
_TEMPLATE_HASH = "pod-template-hash"
_FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """A controller ownerReference: what owns a Pod, a ReplicaSet or a Job."""

    kind: str
    name: str
    uid: str
    api_version: str


@dataclass(slots=True)
class PodRecord:
    """What the index keeps of a Pod: little, because a cluster may have 100,000 of them."""

    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    started: float | None  # status.startTime (or creation), epoch seconds
    ended: float | None  # its containers stopped (Succeeded/Failed), or it was deleted
    owner: OwnerRef | None
    host_network: bool = False
    template_hash: str | None = None  # the Deployment's revision label, if any


def parse_time(text: object) -> float | None:
    """An RFC 3339 time as epoch seconds (None when absent or unreadable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def controller_of(meta: Mapping[str, Any]) -> OwnerRef | None:
    """The controller ownerReference of an object's metadata (the first owner if none is)."""
    refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, Mapping)]
    chosen = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if chosen is None or not chosen.get("kind") or not chosen.get("name"):
        return None
    return OwnerRef(
        str(chosen["kind"]),
        str(chosen["name"]),
        str(chosen.get("uid") or ""),
        str(chosen.get("apiVersion") or ""),
    )


def pod_record(pod: Mapping[str, Any]) -> PodRecord | None:
    """The index entry of a Pod as the API returns it (None: it has no IP yet)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ips = tuple(
        dict.fromkeys(
            normalize_address(str(entry.get("ip")))
            for entry in status.get("podIPs") or []
            if isinstance(entry, Mapping) and entry.get("ip")
        )
    )
    if not ips and status.get("podIP"):
        ips = (normalize_address(str(status["podIP"])),)
    if not ips:
        return None
    ended = None
    if status.get("phase") in _FINISHED:
        finished = [
            parse_time(((c.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            for c in status.get("containerStatuses") or []
        ]
        known = [f for f in finished if f is not None]
        ended = max(known) if known else datetime.now(UTC).timestamp()
    labels = meta.get("labels") or {}
    return PodRecord(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or meta.get("name") or ""),
        ips=ips,
        started=parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")),
        ended=ended,
        owner=controller_of(meta),
        host_network=bool((pod.get("spec") or {}).get("hostNetwork")),
        template_hash=labels.get(_TEMPLATE_HASH),
    )


def normalize_address(address: str) -> str:
    """``10.1.2.3``, ``10.1.2.3/32`` and ``::ffff:10.1.2.3`` are the same client address."""
    plain = address.split("/", maxsplit=1)[0].strip().lower()
    return plain[7:] if plain.startswith("::ffff:") and "." in plain else plain


class PodIndex:
    """Pods by IP and the owners of ReplicaSets and Jobs; safe to share between threads."""

    def __init__(self, *, clock: Any = None) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}  # uid -> live Pod
        self._by_ip: dict[str, list[PodRecord]] = {}  # live and remembered deleted Pods
        self._by_namespace: dict[str, dict[str, PodRecord]] = {}
        # (kind, namespace, name) of a ReplicaSet or Job -> its owner (None: it has none)
        self._controllers: dict[tuple[str, str, str], OwnerRef | None] = {}
        self._tombstones: deque[tuple[float, PodRecord]] = deque()
        # A Pod's workload, by what decides it; forgotten when a ReplicaSet's or Job's owner
        # changes. One Workload shared by all of a workload's Pods: a lookup makes none.
        self._resolved: dict[tuple[str, ...], Workload] = {}
        self._clock = clock or (lambda: datetime.now(UTC).timestamp())

    # ---- keeping it up to date ----------------------------------------------------------
    def put_pod(self, record: PodRecord) -> None:
        with self._lock:
            self._remove(record.uid)
            self._pods[record.uid] = record
            for ip in record.ips:
                self._by_ip.setdefault(ip, []).append(record)
            self._by_namespace.setdefault(record.namespace, {})[record.uid] = record

    def delete_pod(self, uid: str) -> None:
        """The Pod is gone: remember it a while, stopped now (its sessions may outlive it)."""
        with self._lock:
            record = self._pods.pop(uid, None)
            if record is None:
                return
            now = self._clock()
            if record.ended is None or record.ended > now:
                record.ended = now
            self._by_namespace.get(record.namespace, {}).pop(uid, None)
            self._tombstones.append((now + TOMBSTONE_S, record))
            self._expire(now)

    def replace_pods(self, records: Iterable[PodRecord], namespace: str | None = None) -> None:
        """A fresh list (after a watch expired): Pods no longer listed count as deleted."""
        fresh = {r.uid: r for r in records}
        with self._lock:
            gone = [
                uid
                for uid, r in self._pods.items()
                if uid not in fresh and (namespace is None or r.namespace == namespace)
            ]
        for uid in gone:
            self.delete_pod(uid)
        for record in fresh.values():
            self.put_pod(record)

    def put_controller(self, kind: str, namespace: str, name: str, owner: OwnerRef | None) -> None:
        key = (kind, namespace, name)
        with self._lock:
            if key not in self._controllers or self._controllers[key] != owner:
                self._resolved.clear()  # most updates are status changes: the owner stays
            self._controllers[key] = owner

    def delete_controller(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._controllers.pop((kind, namespace, name), None)
            self._resolved.clear()

    def replace_controllers(
        self,
        kind: str,
        items: Iterable[tuple[str, str, OwnerRef | None]],
        namespace: str | None = None,
    ) -> None:
        with self._lock:
            for key in [
                k
                for k in self._controllers
                if k[0] == kind and (namespace is None or k[1] == namespace)
            ]:
                del self._controllers[key]
            for ns, name, owner in items:
                self._controllers[(kind, ns, name)] = owner
            self._resolved.clear()

    def _remove(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is None:
            return
        for ip in old.ips:
            holders = self._by_ip.get(ip)
            if holders is not None:
                holders[:] = [r for r in holders if r is not old]
                if not holders:
                    del self._by_ip[ip]
        self._by_namespace.get(old.namespace, {}).pop(uid, None)

    def _expire(self, now: float) -> None:
        while self._tombstones and (
            self._tombstones[0][0] <= now or len(self._tombstones) > MAX_TOMBSTONES
        ):
            _, record = self._tombstones.popleft()
            if self._pods.get(record.uid) is record:
                continue
            for ip in record.ips:
                holders = self._by_ip.get(ip)
                if holders is not None:
                    holders[:] = [r for r in holders if r is not record]
                    if not holders:
                        del self._by_ip[ip]

    # ---- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pods)

    def at(self, address: str) -> tuple[PodRecord, ...]:
        """The Pods (live, and deleted ones remembered) that have had ``address``."""
        with self._lock:
            return tuple(self._by_ip.get(normalize_address(address), ()))

    def pods_of(self, workload: Workload) -> list[PodRecord]:
        """The live Pods of ``workload`` (a pooler's pods), oldest first."""
        with self._lock:
            pods = list(self._by_namespace.get(workload.namespace, {}).values())
            found = [p for p in pods if self._workload_of(p) == workload and p.ended is None]
        return sorted(found, key=lambda p: (p.started or 0.0, p.name))

    def workload_of(self, pod: PodRecord) -> Workload:
        with self._lock:
            return self._workload_of(pod)

    def _workload_of(self, pod: PodRecord) -> Workload:
        owner = pod.owner
        if owner is None:
            key: tuple[str, ...] = (POD, pod.namespace, pod.name, pod.uid)
        else:
            key = (owner.kind, pod.namespace, owner.name, owner.uid, pod.template_hash or "")
        found = self._resolved.get(key)
        if found is None:
            if len(self._resolved) >= MAX_RESOLVED:
                self._resolved.clear()
            found = self._resolved[key] = self._resolve(pod)
        return found

    def _resolve(self, pod: PodRecord) -> Workload:
        owner = pod.owner
        if owner is None:
            return Workload(POD, pod.namespace, pod.name, pod.uid, "v1")
        if owner.kind in (REPLICA_SET, JOB):
            key = (owner.kind, pod.namespace, owner.name)
            if key in self._controllers:
                parent = self._controllers[key]
                if parent is not None:
                    return _workload(parent, pod.namespace)
            elif owner.kind == REPLICA_SET and pod.template_hash:
                # Not seen (yet, or not allowed to list ReplicaSets): the Deployment
                # controller names its ReplicaSets <deployment>-<pod-template-hash>.
                suffix = f"-{pod.template_hash}"
                if owner.name.endswith(suffix) and len(owner.name) > len(suffix):
                    return Workload(DEPLOYMENT, pod.namespace, owner.name[: -len(suffix)])
        return _workload(owner, pod.namespace)

    def place(self, address: str, since: datetime | None) -> Origin | None:
        """Where a connection from ``address`` that began at ``since`` comes from (None: the
        address is no Pod's)."""
        with self._lock:
            holders = tuple(self._by_ip.get(normalize_address(address), ()))
            if not holders:
                return None
            return _place(address, holders, since, self._workload_of)


def _workload(owner: OwnerRef, namespace: str) -> Workload:
    return Workload(owner.kind, namespace, owner.name, owner.uid or None, owner.api_version)


def _place(
    address: str, holders: Sequence[PodRecord], since: datetime | None, resolve: Any
) -> Origin:
    start = since.timestamp() if since is not None else None
    if start is None:
        alive = [p for p in holders if p.ended is None]
    else:
        alive = [
            p
            for p in holders
            if (p.started is None or p.started <= start + SKEW_S)
            and (p.ended is None or p.ended >= start - SKEW_S)
        ]
    if not alive:
        latest = max(holders, key=lambda p: p.started or 0.0)
        began = "at an unknown time" if since is None else f"at {_clock(start)}"
        return Origin(
            None,
            why=(
                f"address {address} belongs to pod {latest.namespace}/{latest.name}, which "
                f"started at {_clock(latest.started)}, after the session began {began}: a "
                "reused address, not blamed"
            ),
        )
    workloads = tuple(dict.fromkeys(resolve(p) for p in alive))
    if any(p.host_network for p in alive):
        return Origin(
            None,
            why=f"address {address} is a node's (host-network pods): any process there",
            possible=workloads,
        )
    if len(workloads) > 1:
        return Origin(
            None,
            why=f"address {address} was held by pods of {len(workloads)} workloads then",
            possible=workloads,
        )
    pods = {p.name for p in alive}
    return Origin(workloads[0], pod=next(iter(pods)) if len(pods) == 1 else None)


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def attribute(
    snapshot: Snapshot,
    index: PodIndex,
    poolers: Sequence[PoolerView] = (),
    *,
    scope: str = "",
    notes: Sequence[str] = (),
) -> Attribution:
    """The origin of every client session of ``snapshot`` that comes from a Pod."""
    servers = _pooler_servers(poolers)
    client_origins: dict[tuple[str, str], Origin] = {}
    for view in poolers:
        for client in view.clients:
            origin = _client_origin(index, view, client)
            if origin is not None:
                client_origins[(view.pod, client.ptr)] = origin
    origins: dict[int, Origin] = {}
    for session in snapshot.sessions:
        if session.backend_type != CLIENT_BACKEND:
            continue
        served = servers.get(session.pid)
        if served is not None and _same_connection(session.backend_start, served[1]):
            view, server = served
            linked = client_origins.get((view.pod, server.link)) if server.link else None
            if linked is not None:
                origins[session.pid] = linked
            elif server.link:
                why = f"a client of PgBouncer pod {view.pod} that is no Pod's"
                origins[session.pid] = Origin(None, via=view.pod, why=why)
            else:  # a pooled connection no client holds right now: the pooler's own
                origins[session.pid] = Origin(view.workload, pod=view.pod)
            continue
        if session.client_addr is None:
            continue
        origin = index.place(session.client_addr, session.backend_start)
        if origin is not None:
            origins[session.pid] = origin
    return Attribution(
        origins=origins,
        poolers=tuple(poolers),
        client_origins=client_origins,
        scope=scope,
        notes=tuple(notes),
    )


def _client_origin(index: PodIndex, view: PoolerView, client: PoolerClient) -> Origin | None:
    if client.addr is None:
        return None
    placed = index.place(client.addr, client.connect_time)
    if placed is None:
        return None
    return Origin(placed.workload, placed.pod, view.pod, placed.why, placed.possible)


def _pooler_servers(poolers: Sequence[PoolerView]) -> dict[int, tuple[PoolerView, PoolerClient]]:
    found: dict[int, tuple[PoolerView, PoolerClient]] = {}
    for view in poolers:
        for server in view.servers:
            if server.remote_pid is not None:
                found[server.remote_pid] = (view, server)
    return found


def _same_connection(backend_start: datetime | None, server: PoolerClient) -> bool:
    """A pid is reused: the backend must have started when PgBouncer connected (1 s steps)."""
    if backend_start is None or server.connect_time is None:
        return True
    gap = (backend_start - server.connect_time).total_seconds()
    return -SKEW_S <= gap <= 1.0 + SKEW_S
