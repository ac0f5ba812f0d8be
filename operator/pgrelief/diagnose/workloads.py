"""Who holds the slots, by workload: the breakdown, the PgBouncer pods, and their waiting clients.

Only a snapshot placed on workloads (``Snapshot.attribution``: the operator's pod index,
``diagnose --kube``) gets these; without one the breakdown by workload is empty and nothing
here says a word. A pool whose clients wait for a server connection is pressure too
(``pooler_waiting``): the server may have free slots while the application's requests queue
in PgBouncer, because the pool is too small or its server connections sit idle in
transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from pgrelief.diagnose._counting import Context, ordered
from pgrelief.diagnosis import (
    ADVICE,
    POOLER_WAITING,
    Finding,
    Fix,
    PoolerSummary,
    Severity,
    WorkloadGroup,
)
from pgrelief.durations import human_age
from pgrelief.snapshot import NO_STATE, Session
from pgrelief.workloads import Attribution, Origin, PoolerClient, Workload

POOL_WAIT_WARNING_S = 1.0  # a client waited this long for a server connection: warning
POOL_WAIT_CRITICAL_S = 10.0  # ... this long: critical (PgBouncer gives up at query_wait_timeout)
NAMED_WORKLOADS = 3  # workloads named in a verdict line before "and N more"


def by_workload(context: Context) -> tuple[WorkloadGroup, ...]:
    """Client sessions by the workload they come from, biggest first; unknown last."""
    attribution = context.snapshot.attribution
    if attribution is None:
        return ()
    return group_by_workload(
        (attribution.origins.get(s.pid), s.state or NO_STATE, s.state_age_s)
        for s in context.clients
    )


def group_by_workload(
    rows: Iterable[tuple[Origin | None, str, float | None]],
) -> tuple[WorkloadGroup, ...]:
    """(origin, state, age in state) rows grouped by workload (None: unknown)."""
    counts: dict[Workload | None, Counter[str]] = {}
    oldest: dict[Workload | None, float] = {}
    pods: dict[Workload | None, set[str]] = {}
    via: dict[Workload | None, set[str]] = {}
    for origin, state, age in rows:
        workload = origin.workload if origin is not None else None
        counts.setdefault(workload, Counter())[state] += 1
        if age is not None and age > oldest.get(workload, -1.0):
            oldest[workload] = age
        if origin is not None and origin.pod is not None and origin.workload is not None:
            pods.setdefault(workload, set()).add(origin.pod)
        if origin is not None and origin.via is not None:
            via.setdefault(workload, set()).add(origin.via)
    groups = [
        WorkloadGroup(
            workload,
            sum(states.values()),
            ordered(dict(states)),
            oldest.get(workload),
            len(pods.get(workload, ())),
            tuple(sorted(via.get(workload, ()))),
        )
        for workload, states in counts.items()
    ]
    groups.sort(key=lambda g: (g.workload is None, -g.count, g.key))
    return tuple(groups)


def pooler_summaries(attribution: Attribution | None) -> tuple[PoolerSummary, ...]:
    """Each PgBouncer pod's pools and its clients grouped by workload."""
    if attribution is None:
        return ()
    summaries = []
    for view in attribution.poolers:
        clients = group_by_workload(
            (attribution.client_origins.get((view.pod, c.ptr)), c.state, c.wait_s or None)
            for c in view.clients
            if not _is_console(c)
        )
        summaries.append(
            PoolerSummary(view.pod, view.namespace, view.address, view.pools, clients, view.error)
        )
    return tuple(summaries)


def _is_console(client: PoolerClient) -> bool:
    return client.database == "pgbouncer"  # pgrelief itself, reading SHOW CLIENTS


def pooler_waiting(context: Context) -> list[Finding]:
    """PgBouncer clients waiting for a server connection: a pool too small for its load."""
    attribution = context.snapshot.attribution
    if attribution is None:
        return []
    waiting = [
        (view.pod, pool)
        for view in attribution.poolers
        for pool in view.pools
        if pool.cl_waiting > 0 and pool.database != "pgbouncer"
    ]
    if not waiting:
        return []
    longest = max(pool.maxwait_s for _, pool in waiting)
    if longest < POOL_WAIT_WARNING_S:
        return []
    severity = Severity.CRITICAL if longest >= POOL_WAIT_CRITICAL_S else Severity.WARNING
    clients = sum(pool.cl_waiting for _, pool in waiting)
    pools = sorted({(pool.database, pool.user) for _, pool in waiting})
    summary = (
        f"{clients} PgBouncer client(s) wait for a server connection in {len(pools)} pool(s), "
        f"the longest {human_age(longest)}: the pool is too small for the load, or its "
        "server connections are held (idle in transaction)"
    )
    evidence = [
        f"pod {pod}: pool {pool.database}/{pool.user} ({pool.pool_mode}): {pool.cl_waiting} "
        f"waiting, {pool.cl_active} active clients; servers {pool.sv_active} active, "
        f"{pool.sv_idle} idle, {pool.sv_used} used; longest wait {human_age(pool.maxwait_s)}"
        for pod, pool in sorted(waiting, key=lambda item: -item[1].maxwait_s)
    ]
    held = _held_by(context, {user for _, user in pools})
    if held:
        evidence.append(held)
    fix = Fix(
        ADVICE,
        "Look first for server connections held idle in transaction (the sessions above): "
        "they keep the pool busy without doing work. If none are, raise "
        "spec.pgbouncer.defaultPoolSize (or reservePoolSize for spikes) within the server's "
        "usable slots, or lower the application's concurrency.",
        "make room in the pool",
    )
    return [Finding(POOLER_WAITING, severity, summary, tuple(evidence), (), (fix,))]


def _held_by(context: Context, users: set[str]) -> str:
    """The pooled sessions of those users that sit idle in transaction, if any."""
    attribution = context.snapshot.attribution
    assert attribution is not None
    pooled = [
        s
        for s in context.idle_in_tx
        if s.usename in users and (o := attribution.origins.get(s.pid)) is not None and o.via
    ]
    if not pooled:
        return ""
    return (
        f"{len(pooled)} of the pools' server connections are idle in transaction, "
        f"{workloads_text(pooled, attribution.origins)}"
    )


def workloads_text(sessions: Sequence[Session], origins: Mapping[int, Origin]) -> str:
    """``from Deployment shop/checkout-api`` (or several, counted), for a verdict line."""
    counts = Counter(
        (o.workload if (o := origins.get(s.pid)) is not None else None) for s in sessions
    )
    named = [(w, n) for w, n in counts.most_common() if w is not None]
    unknown = counts.get(None, 0)
    if not named:
        return "from no workload pgrelief could name"
    if len(named) == 1 and not unknown:
        return f"from {named[0][0].label}"
    parts = [f"{w.label} ({n})" for w, n in named[:NAMED_WORKLOADS]]
    if len(named) > NAMED_WORKLOADS:
        parts.append(f"{len(named) - NAMED_WORKLOADS} more workload(s)")
    if unknown:
        parts.append(f"unknown ({unknown})")
    return "from " + ", ".join(parts)
