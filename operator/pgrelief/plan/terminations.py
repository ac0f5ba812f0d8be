"""Which idle sessions to terminate this cycle, and why every other match is spared.

The safety rules of DESIGN.md are applied here: only client backends, never pgrelief's own
session, the policy's protections (superusers, roles, applications, databases, client CIDRs,
listeners: decided by ``pgrelief.protection``, which `diagnose` asks too), the pressure gate,
and the per-cycle and per-hour budgets, oldest first. Every session a rule matched comes back
either as a ``TerminateBackend`` carrying the identity ``act`` re-checks, or as a
``SkippedSession`` with the reason, so nothing is silently left out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from pgrelief import protection as rules
from pgrelief.diagnosis import Severity
from pgrelief.durations import parse_duration
from pgrelief.plan.actions import PlanHistory, SkippedSession, TerminateBackend
from pgrelief.policy import ConnectionPolicySpec, ProtectSpec
from pgrelief.snapshot import Session, Snapshot

_UNDER_PRESSURE = frozenset({Severity.WARNING, Severity.CRITICAL})

# policy terminate rule -> the pg_stat_activity.state it applies to
_RULES: tuple[tuple[str, str], ...] = (
    ("idle in transaction", "idleInTransactionAfter"),
    ("idle in transaction (aborted)", "idleInTransactionAbortedAfter"),
    ("idle", "idleAfter"),
)


def plan_terminations(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    pressure: Severity,
    history: PlanHistory,
    now: datetime,
) -> tuple[tuple[TerminateBackend, ...], tuple[SkippedSession, ...], bool]:
    """Sessions to terminate (oldest first), sessions matched but spared, budget exhausted."""
    remediation = policy_spec.remediation
    terminate = remediation.terminate
    thresholds = {
        "idle in transaction": terminate.idle_in_transaction_after,
        "idle in transaction (aborted)": terminate.idle_in_transaction_aborted_after,
        "idle": terminate.idle_after,
    }
    protect = protect_of(remediation.protect)
    eligible: list[TerminateBackend] = []
    spared: list[SkippedSession] = []
    for session in snapshot.sessions:
        threshold = thresholds.get(session.state) if session.state is not None else None
        if threshold is None:
            continue
        age = _state_age(session, snapshot)
        if age is None or age < parse_duration(threshold):
            continue
        candidate = _candidate(session, age, threshold, pressure)
        protected = rules.protection(session, snapshot, protect)
        why = None if protected is None else protected.text
        retry_at = history.backoff.get(candidate.identity)
        if why is None and retry_at is not None and now < retry_at:
            why = (
                f"an earlier attempt failed; retrying after {retry_at.astimezone(UTC):%H:%M:%S} UTC"
            )
        if why is None:
            eligible.append(candidate)
        else:
            spared.append(SkippedSession(why, candidate))
    eligible.sort(key=_oldest_first)
    if remediation.only_under_pressure and pressure not in _UNDER_PRESSURE:
        why = f"not under pressure ({pressure.label}; onlyUnderPressure is set)"
        spared.extend(SkippedSession(why, c) for c in eligible)
        return (), _ordered(spared), False
    budget = remediation.budget
    used = history.terminations_within(now)
    hour_left = max(budget.max_per_hour - used, 0)
    allowed = min(budget.max_per_cycle, hour_left)
    chosen = tuple(eligible[:allowed])
    if len(eligible) > allowed:
        if hour_left < budget.max_per_cycle:
            why = f"over budget: maxPerHour {budget.max_per_hour} ({used} in the last hour)"
        else:
            why = f"over budget: maxPerCycle {budget.max_per_cycle}"
        spared.extend(SkippedSession(why, c) for c in eligible[allowed:])
    return chosen, _ordered(spared), len(eligible) > allowed


def protection(
    session: Session,
    snapshot: Snapshot,
    protect: ProtectSpec,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
) -> str | None:
    """Why ``session`` must not be terminated, or None when it may be (``pgrelief.protection``
    decides, so `diagnose` spares the same sessions)."""
    spared = rules.protection(session, snapshot, protect_of(protect, networks))
    return None if spared is None else spared.text


def protect_of(
    protect: ProtectSpec,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
) -> rules.Protect:
    """A policy's ``protect`` section as the plain values ``pgrelief.protection`` reads."""
    return rules.Protect(
        superusers=protect.superusers,
        listeners=protect.listeners,
        roles=frozenset(protect.roles),
        applications=frozenset(protect.applications),
        databases=frozenset(protect.databases),
        networks=tuple(protect.networks() if networks is None else networks),
    )


is_superuser = rules.is_superuser


def _candidate(
    session: Session, age: float, threshold: str, pressure: Severity
) -> TerminateBackend:
    rule = next(r for state, r in _RULES if state == session.state)
    return TerminateBackend(
        pid=session.pid,
        backend_start=session.backend_start,
        state=session.state,
        state_change=session.state_change,
        usename=session.usename,
        datname=session.datname,
        application_name=session.application_name,
        client_addr=session.client_addr,
        rule=rule,
        age_s=age,
        threshold=threshold,
        backend_age_s=session.backend_age_s,
        xact_age_s=session.xact_age_s,
        last_query=_query_head(session.query),
        pressure=pressure.label,
    )


def _oldest_first(candidate: TerminateBackend) -> tuple[float, int]:
    return (-candidate.age_s, candidate.pid)


def _ordered(spared: Iterable[SkippedSession]) -> tuple[SkippedSession, ...]:
    return tuple(sorted(spared, key=lambda s: _oldest_first(s.candidate)))


def _state_age(session: Session, snapshot: Snapshot) -> float | None:
    if session.state_age_s is not None:
        return session.state_age_s
    if session.state_change is None:
        return None
    try:
        return max((snapshot.taken_at - session.state_change).total_seconds(), 0.0)
    except TypeError:  # one naive, one aware: no trustworthy age
        return None


_SECRET_HINT = re.compile(r"password|secret|passwd", re.IGNORECASE)


def _query_head(query: str) -> str:
    # Audit records outlive the session; a statement that may carry a password is not copied.
    if _SECRET_HINT.search(query):
        return "<redacted>"
    return " ".join(query.split())[:80]
