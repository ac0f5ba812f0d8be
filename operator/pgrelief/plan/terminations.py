"""Which sessions to terminate or cancel this cycle, in what order, and when to look again.

The safety rules of DESIGN.md are applied here, to every session rule alike (terminate an
idle session, cancel a long query, escalate a cancel that did not take): only client
backends, never pgrelief's own session, the policy's protections and selectors
(``selection``), the pressure gate, and the per-cycle and per-hour budgets. Every session a
rule matched comes back either as an action carrying the identity ``act`` re-checks, or as a
``SkippedSession`` with the reason, so nothing is silently left out.

Two decisions are documented once, here:

- **Harm order.** When the budget cannot take every eligible session, the ones that cost the
  server most for nothing go first: idle in transaction (aborted), then idle in transaction
  (both hold locks and the xmin horizon), then idle (a slot only), then running queries,
  whose work is lost (escalations before new cancels: a cancel does not free a slot).
  Oldest first within each: the longest in its state, or running longest; ties to the lower
  pid.
- **The next deadline.** Every session a rule will match later (its threshold not yet
  crossed, a cancel's grace not yet over) or that only the budget or a backoff holds back,
  says when that ends; the earliest is the plan's ``next_deadline``, so a driver under
  pressure can run the next cycle at that moment instead of up to an interval late.
  Protected and unselected sessions never have one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pgrelief.diagnosis import Severity
from pgrelief.durations import parse_duration
from pgrelief.plan.actions import (
    HOUR,
    CancelQuery,
    PlanHistory,
    SessionAction,
    SkippedSession,
    TerminateBackend,
    query_identity,
)
from pgrelief.plan.selection import not_selected, protect_of, protection
from pgrelief.policy import BudgetSpec, ConnectionPolicySpec, RemediationSpec
from pgrelief.snapshot import (
    ACTIVE,
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    Session,
    Snapshot,
)

UNDER_PRESSURE = frozenset({Severity.WARNING, Severity.CRITICAL})

_HARM_RANK: dict[str, int] = {IDLE_IN_TRANSACTION_ABORTED: 0, IDLE_IN_TRANSACTION: 1, IDLE: 2}
_ESCALATION_RANK = 3
_CANCEL_RANK = 4


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """The session actions of one cycle (harm order), the sessions spared, whether the
    budget left eligible sessions alone, and when the next one comes due (server clock)."""

    actions: tuple[SessionAction, ...] = ()
    skipped: tuple[SkippedSession, ...] = ()
    budget_exhausted: bool = False
    next_deadline: datetime | None = None


@dataclass(frozen=True, slots=True)
class _Rule:
    """One rule as the policy writes it: its field name, its duration text and seconds."""

    name: str
    text: str
    seconds: float

    @classmethod
    def of(cls, name: str, text: str | None) -> _Rule | None:
        return None if text is None else cls(name, text, parse_duration(text))


@dataclass(frozen=True, slots=True)
class _Rules:
    """The session rules of a policy, read once per plan."""

    by_state: dict[str, _Rule]  # pg_stat_activity.state -> its terminate rule
    cancel: _Rule | None
    escalate: _Rule | None

    @classmethod
    def of(cls, remediation: RemediationSpec) -> _Rules:
        terminate, cancel = remediation.terminate, remediation.cancel
        rules = {
            IDLE_IN_TRANSACTION: _Rule.of(
                "idleInTransactionAfter", terminate.idle_in_transaction_after
            ),
            IDLE_IN_TRANSACTION_ABORTED: _Rule.of(
                "idleInTransactionAbortedAfter", terminate.idle_in_transaction_aborted_after
            ),
            IDLE: _Rule.of("idleAfter", terminate.idle_after),
        }
        return cls(
            by_state={state: rule for state, rule in rules.items() if rule is not None},
            cancel=_Rule.of("activeAfter", cancel.active_after),
            escalate=_Rule.of("escalateAfter", cancel.escalate_after),
        )


@dataclass(frozen=True, slots=True)
class _Match:
    """What the rules say about one session: an action now (``candidate``, held back when
    ``held`` says why), or a rule that will match in ``due_in_s`` seconds."""

    candidate: SessionAction | None = None
    due_in_s: float | None = None
    held: str | None = None


def plan_sessions(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    pressure: Severity,
    history: PlanHistory,
    now: datetime,
) -> SessionPlan:
    """Sessions to terminate or cancel (harm order), the ones spared, and the next deadline.

    ``now`` is this machine's clock (history and backoff are kept in it); ages come from the
    snapshot, on the server's. Delays from either are counted from the snapshot instant.
    """
    remediation = policy_spec.remediation
    rules = _Rules.of(remediation)
    protect = protect_of(remediation.protect)
    eligible: list[SessionAction] = []
    spared: list[SkippedSession] = []
    due: list[float] = []  # seconds until a session not acted on now comes due
    for session in snapshot.sessions:
        match = _match(session, snapshot, rules, history, now, pressure)
        if match is None:
            continue
        why = protection(session, snapshot, protect) or not_selected(
            session, remediation.select, snapshot
        )
        if match.candidate is None:
            if why is None and match.due_in_s is not None:
                due.append(match.due_in_s)
            continue
        candidate = match.candidate
        why = why or match.held
        retry_at = history.backoff.get(candidate.identity)
        if why is None and retry_at is not None and now < retry_at:
            why = (
                f"an earlier attempt failed; retrying after {retry_at.astimezone(UTC):%H:%M:%S} UTC"
            )
            due.append((retry_at - now).total_seconds())
        if why is None:
            eligible.append(candidate)
        else:
            spared.append(SkippedSession(why, candidate))
    eligible.sort(key=harm_order)
    if remediation.only_under_pressure and pressure not in UNDER_PRESSURE:
        why = f"not under pressure ({pressure.label}; onlyUnderPressure is set)"
        spared.extend(SkippedSession(why, c) for c in eligible)
        if eligible:
            due.append(0.0)  # pressure permitting, they are due now
        return SessionPlan((), _ordered(spared), False, _deadline(snapshot, due))
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
        free_in = _budget_free_in(budget, history, now, len(chosen))
        if free_in is not None:
            due.append(free_in)
    return SessionPlan(chosen, _ordered(spared), len(eligible) > allowed, _deadline(snapshot, due))


def harm_order(action: SessionAction) -> tuple[int, float, int]:
    """The budget's order: most harmful state first, then oldest, then lowest pid."""
    if isinstance(action, CancelQuery):
        rank = _CANCEL_RANK
    else:
        rank = _HARM_RANK.get(action.state or "", _ESCALATION_RANK)
    return (rank, -action.age_s, action.pid)


def _match(
    session: Session,
    snapshot: Snapshot,
    rules: _Rules,
    history: PlanHistory,
    now: datetime,
    pressure: Severity,
) -> _Match | None:
    """The rule that applies to ``session`` now or later; None when none ever does."""
    rule = rules.by_state.get(session.state or "")
    if rule is not None:
        age = _since(session.state_age_s, session.state_change, snapshot)
        if age is None:
            return None
        if age < rule.seconds:
            return _Match(due_in_s=rule.seconds - age)
        return _Match(_terminate(session, age, rule, pressure))
    if session.state == ACTIVE and rules.cancel is not None:
        return _match_running(
            session, snapshot, rules.cancel, rules.escalate, history, now, pressure
        )
    return None


def _match_running(
    session: Session,
    snapshot: Snapshot,
    cancel: _Rule,
    escalate: _Rule | None,
    history: PlanHistory,
    now: datetime,
    pressure: Severity,
) -> _Match | None:
    """A running query: cancel it past ``activeAfter``; once cancelled, terminate it when
    the same query still runs ``escalateAfter`` later, and never cancel it twice."""
    age = _since(session.query_age_s, session.query_start, snapshot)
    if age is None:
        return None
    if age < cancel.seconds:
        return _Match(due_in_s=cancel.seconds - age)
    cancelled_at = history.cancelled.get(
        query_identity(session.pid, session.backend_start, session.query_start)
    )
    action = CancelQuery(
        pid=session.pid,
        backend_start=session.backend_start,
        query_start=session.query_start,
        usename=session.usename,
        datname=session.datname,
        application_name=session.application_name,
        client_addr=session.client_addr,
        age_s=age,
        threshold=cancel.text,
        backend_age_s=session.backend_age_s,
        xact_age_s=session.xact_age_s,
        last_query=_query_head(session.query),
        pressure=pressure.label,
    )
    if cancelled_at is None:
        return _Match(action)
    if escalate is None:
        held = (
            f"cancelled at {cancelled_at.astimezone(UTC):%H:%M:%S} UTC and still running; "
            "cancel.escalateAfter is not set, so it is not terminated"
        )
        return _Match(action, held=held)
    since = max((now - cancelled_at).total_seconds(), 0.0)
    if since < escalate.seconds:
        return _Match(due_in_s=escalate.seconds - since)
    return _Match(_terminate(session, age, escalate, pressure, cancelled_ago_s=since))


def _terminate(
    session: Session,
    age: float,
    rule: _Rule,
    pressure: Severity,
    *,
    cancelled_ago_s: float | None = None,
) -> TerminateBackend:
    return TerminateBackend(
        pid=session.pid,
        backend_start=session.backend_start,
        state=session.state,
        state_change=session.state_change,
        usename=session.usename,
        datname=session.datname,
        application_name=session.application_name,
        client_addr=session.client_addr,
        rule=rule.name,
        age_s=age,
        threshold=rule.text,
        backend_age_s=session.backend_age_s,
        xact_age_s=session.xact_age_s,
        last_query=_query_head(session.query),
        pressure=pressure.label,
        query_start=session.query_start,
        cancelled_ago_s=cancelled_ago_s,
    )


def _budget_free_in(
    budget: BudgetSpec, history: PlanHistory, now: datetime, spent_now: int
) -> float | None:
    """Seconds until the budget takes one more session, after this cycle spends ``spent_now``;
    None when it never will (a zero budget)."""
    if budget.max_per_cycle == 0 or budget.max_per_hour == 0:
        return None
    window = sorted([t for t in history.terminations if t > now - HOUR] + [now] * spent_now)
    excess = len(window) - budget.max_per_hour
    if excess < 0:
        return 0.0  # only maxPerCycle held them back: the next cycle may take more
    # The window counts times after (T - 1h): one more fits once the excess oldest have left.
    return max((window[excess] + HOUR - now).total_seconds(), 0.0)


def _deadline(snapshot: Snapshot, due: Sequence[float]) -> datetime | None:
    return snapshot.taken_at + timedelta(seconds=min(due)) if due else None


def _ordered(spared: Iterable[SkippedSession]) -> tuple[SkippedSession, ...]:
    return tuple(sorted(spared, key=lambda s: harm_order(s.candidate)))


def _since(age: float | None, then: datetime | None, snapshot: Snapshot) -> float | None:
    if age is not None:
        return age
    if then is None:
        return None
    try:
        return max((snapshot.taken_at - then).total_seconds(), 0.0)
    except TypeError:  # one naive, one aware: no trustworthy age
        return None


_SECRET_HINT = re.compile(r"password|secret|passwd", re.IGNORECASE)


def _query_head(query: str) -> str:
    # Audit records outlive the session; a statement that may carry a password is not copied.
    if _SECRET_HINT.search(query):
        return "<redacted>"
    return " ".join(query.split())[:80]
