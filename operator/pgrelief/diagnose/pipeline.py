"""diagnose(): one snapshot through the counting engine and every finding builder.

The order of the builders and of the findings lives here, and so does the garbage-collector
pause that keeps 100k-session diagnoses fast; each builder only reads the shared Context.
The verdict comes last: it picks the answer from the findings.
"""

from __future__ import annotations

import gc

from pgrelief.diagnose._counting import count
from pgrelief.diagnose.load import monopoly, traffic_spike
from pgrelief.diagnose.locks import lock_blockers
from pgrelief.diagnose.memory import memory_overcommit
from pgrelief.diagnose.options import DEFAULT_OPTIONS, DiagnoseOptions
from pgrelief.diagnose.pooling import no_pooler
from pgrelief.diagnose.reserved import reserved_access
from pgrelief.diagnose.saturation import connection_limits, saturation
from pgrelief.diagnose.sessions import idle_in_transaction, leaked_idle, long_running
from pgrelief.diagnose.verdict import verdict
from pgrelief.diagnosis import (
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LOCK_BLOCKER,
    LONG_RUNNING,
    MEMORY_OVERCOMMIT,
    NO_POOLER,
    RESERVED_ACCESS,
    ROLE_MONOPOLY,
    SATURATION,
    TRAFFIC_SPIKE,
    Diagnosis,
    Finding,
    ServerSummary,
    Totals,
)
from pgrelief.snapshot import Snapshot

_KIND_ORDER = (
    SATURATION,
    LOCK_BLOCKER,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LONG_RUNNING,
    TRAFFIC_SPIKE,
    ROLE_MONOPOLY,
    NO_POOLER,
    MEMORY_OVERCOMMIT,
    RESERVED_ACCESS,
)
_GC_PAUSE_FROM = 5000  # sessions


def diagnose(snapshot: Snapshot, options: DiagnoseOptions = DEFAULT_OPTIONS) -> Diagnosis:
    """Diagnose one snapshot: breakdowns, pressure, and findings with their evidence and fixes."""
    if len(snapshot.sessions) < _GC_PAUSE_FROM:
        return _diagnose(snapshot, options)
    # The columns and keys are hundreds of thousands of short-lived lists and tuples beside
    # the snapshot's long-lived sessions: each collection the allocations trigger would
    # rescan all of them (half the time at 100k sessions) and free nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _diagnose(snapshot, options)
    finally:
        if was_enabled:
            gc.enable()


def _diagnose(snapshot: Snapshot, options: DiagnoseOptions) -> Diagnosis:
    facts = snapshot.server
    context = count(snapshot, options)
    findings: list[Finding] = []
    findings.extend(saturation(context))
    findings.extend(connection_limits(context))
    findings.extend(lock_blockers(context))
    findings.extend(idle_in_transaction(context))
    findings.extend(leaked_idle(context))
    findings.extend(long_running(context))
    findings.extend(traffic_spike(context))
    findings.extend(monopoly(context))
    findings.extend(no_pooler(context))
    findings.extend(memory_overcommit(context))
    findings.extend(reserved_access(context))
    findings.sort(key=lambda f: (-int(f.severity), _KIND_ORDER.index(f.kind)))
    status = max([context.pressure, *(f.severity for f in findings)])
    return Diagnosis(
        status=status,
        pressure=context.pressure,
        server=ServerSummary(
            version_num=facts.version_num,
            max_connections=facts.max_connections,
            superuser_reserved_connections=facts.superuser_reserved_connections,
            reserved_connections=facts.reserved_connections,
            usable_slots=context.usable,
            assumed=facts.assumed,
        ),
        totals=Totals(
            client_backends=context.client_count,
            utilization_percent=context.utilization,
            by_state=context.by_state,
            other_backends=context.others,
        ),
        breakdown=context.breakdown,
        findings=tuple(findings),
        source=snapshot.source,
        taken_at=snapshot.taken_at.isoformat(),
        verdict=verdict(context, findings, status),
    )
