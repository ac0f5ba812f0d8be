"""Which idle sessions to terminate this cycle, and why every other match is spared.

The safety rules of DESIGN.md are decided here: only client backends, never pgrelief's own
session, the policy's protections (superusers, roles, applications, databases, client CIDRs,
listeners), the pressure gate, and the per-cycle and per-hour budgets, oldest first. Every
session a rule matched comes back either as a ``TerminateBackend`` carrying the identity
``act`` re-checks, or as a ``SkippedSession`` with the reason, so nothing is silently left out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from pgrelief.advice import quote_literal
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.diagnosis import Severity
from pgrelief.durations import parse_duration
from pgrelief.plan.actions import PlanHistory, SkippedSession, TerminateBackend
from pgrelief.policy import ConnectionPolicySpec, ProtectSpec
from pgrelief.snapshot import CLIENT_BACKEND, Session, Snapshot

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
    networks = remediation.protect.networks()
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
        why = protection(session, snapshot, remediation.protect, networks)
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
    """Why ``session`` must not be terminated, or None when it may be."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if snapshot.own_pid is not None and session.pid == snapshot.own_pid:
        return "pgrelief's own session"
    if protect.superusers:
        superuser = is_superuser(session, snapshot)
        if superuser is None:
            return "superuser status unknown (protect.superusers)"
        if superuser:
            return "superuser (protect.superusers)"
    if session.usename is not None and session.usename in protect.roles:
        return f"protected role {quote_ident(session.usename)}"
    if session.application_name in protect.applications:
        return f"protected application {quote_literal(session.application_name)}"
    if session.datname is not None and session.datname in protect.databases:
        return f"protected database {quote_ident(session.datname)}"
    network = _covering_network(
        session.client_addr, protect.networks() if networks is None else networks
    )
    if network is not None:
        return f"protected client address {session.client_addr} (in {network})"
    if protect.listeners and session.is_listener:
        return "LISTEN session (protect.listeners)"
    return None


def is_superuser(session: Session, snapshot: Snapshot) -> bool | None:
    """The session's role's superuser flag, from the session or pg_roles; None if unknown."""
    if session.is_superuser is not None:
        return session.is_superuser
    role = snapshot.roles.get(session.usename) if session.usename is not None else None
    return role.is_superuser if role is not None else None


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


def _covering_network(
    address: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if address is None or not networks:
        return None
    try:
        parsed = ipaddress.ip_address(address.split("/")[0])
    except ValueError:
        return None
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [parsed]
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        forms.append(parsed.ipv4_mapped)
    for network in networks:
        if any(form.version == network.version and form in network for form in forms):
            return network
    return None


_SECRET_HINT = re.compile(r"password|secret|passwd", re.IGNORECASE)


def _query_head(query: str) -> str:
    # Audit records outlive the session; a statement that may carry a password is not copied.
    if _SECRET_HINT.search(query):
        return "<redacted>"
    return " ".join(query.split())[:80]
