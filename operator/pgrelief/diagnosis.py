"""What a diagnosis says, as plain data with one JSON shape.

The JSON produced by ``Diagnosis.to_json`` is a contract (DESIGN.md, "The command line"):
scripts and monitoring parse it, so its keys live here once and the text report, the
standalone loop and the operator all read the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    """Ordered so the worst of several is ``max()``; values are the CLI exit codes."""

    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def finding_label(self) -> str:
        """A finding that raises no alarm is information, not 'healthy'."""
        return "info" if self is Severity.HEALTHY else self.label


# Finding kinds (DESIGN.md); a finding's kind is one of these strings.
SATURATION = "saturation"
IDLE_IN_TRANSACTION = "idle_in_transaction"
LEAKED_IDLE = "leaked_idle"
LONG_RUNNING = "long_running"
TRAFFIC_SPIKE = "traffic_spike"
ROLE_MONOPOLY = "role_monopoly"
NO_POOLER = "no_pooler"
MEMORY_OVERCOMMIT = "memory_overcommit"
RESERVED_ACCESS = "reserved_access"
LOCK_BLOCKER = "lock_blocker"  # a session holding locks that others wait for
PARTIAL_INPUT = "partial_input"  # offline input that supports only part of a diagnosis

# Fix kinds: what the reader does with the text.
EMERGENCY_SQL = "emergency_sql"  # run now, as a superuser / through a reserved slot
DURABLE_SQL = "durable_sql"  # ALTER ROLE/DATABASE/SYSTEM that prevents recurrence
PGBOUNCER = "pgbouncer"  # a pgbouncer.ini fragment
ORM = "orm"  # application pool settings
ADVICE = "advice"  # prose: what to do and why


@dataclass(frozen=True, slots=True)
class Fix:
    kind: str
    text: str
    title: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "text": self.text}


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    severity: Severity
    summary: str
    evidence: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    fixes: tuple[Fix, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity.finding_label,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "pids": list(self.pids),
            "fixes": [fix.to_json() for fix in self.fixes],
        }


@dataclass(frozen=True, slots=True)
class Group:
    """One row of a breakdown: sessions sharing a user, application, address or database."""

    key: str
    count: int
    by_state: dict[str, int]
    oldest_state_age_s: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "count": self.count,
            "by_state": dict(self.by_state),
            "oldest_state_age_s": _round(self.oldest_state_age_s),
        }


@dataclass(frozen=True, slots=True)
class ServerSummary:
    version_num: int | None
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int
    usable_slots: int
    assumed: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version_num": self.version_num,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved_connections,
            "reserved_connections": self.reserved_connections,
            "usable_slots": self.usable_slots,
            "assumed_defaults": list(self.assumed),
        }


@dataclass(frozen=True, slots=True)
class Totals:
    client_backends: int
    utilization_percent: float
    by_state: dict[str, int]
    other_backends: int = 0  # walsenders, autovacuum, background workers: they hold slots too

    def to_json(self) -> dict[str, Any]:
        return {
            "client_backends": self.client_backends,
            "utilization_percent": round(self.utilization_percent, 1),
            "by_state": dict(self.by_state),
            "other_backends": self.other_backends,
        }


@dataclass(frozen=True, slots=True)
class Breakdown:
    by_user: tuple[Group, ...] = ()
    by_application: tuple[Group, ...] = ()
    by_client_addr: tuple[Group, ...] = ()
    by_database: tuple[Group, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "by_user": [g.to_json() for g in self.by_user],
            "by_application": [g.to_json() for g in self.by_application],
            "by_client_addr": [g.to_json() for g in self.by_client_addr],
            "by_database": [g.to_json() for g in self.by_database],
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer first, for someone paged at 3 a.m.: what holds the slots (who, since when),
    the one statement that frees them, and the fixes that stop it recurring."""

    summary: tuple[str, ...]  # the slot count, then what holds the slots
    emergency: Fix | None = None  # the statement to run now (None: nothing safe to free)
    durable: tuple[Fix, ...] = ()  # from the findings, most important first, no repeats
    notes: tuple[str, ...] = ()  # what the reader must know: assumed facts, thresholds
    assumed: tuple[str, ...] = ()  # the slot settings that were assumed, not observed

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": list(self.summary),
            "emergency": self.emergency.to_json() if self.emergency else None,
            "durable": [fix.to_json() for fix in self.durable],
            "notes": list(self.notes),
            "assumed": list(self.assumed),
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The answer to 'what is eating the slots', with the pressure level it implies."""

    status: Severity
    pressure: Severity  # from utilization alone, against the warning/critical thresholds
    server: ServerSummary | None  # None when the server refused us before we saw anything
    totals: Totals
    breakdown: Breakdown
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    source: str = "live"
    taken_at: str | None = None
    verdict: Verdict | None = None
    # What the reader must know before trusting the numbers: the input was partial, or not
    # UTF-8, or held tables that were not used. Shown right under the verdict.
    notes: tuple[str, ...] = ()

    def finding(self, kind: str) -> Finding | None:
        return next((f for f in self.findings if f.kind == kind), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.label,
            "pressure": self.pressure.label,
            "source": self.source,
            "taken_at": self.taken_at,
            "server": self.server.to_json() if self.server else None,
            "totals": self.totals.to_json(),
            "breakdown": self.breakdown.to_json(),
            "findings": [f.to_json() for f in self.findings],
            "verdict": self.verdict.to_json() if self.verdict else None,
            "notes": list(self.notes),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
