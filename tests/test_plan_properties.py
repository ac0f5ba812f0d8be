"""Property tests of plan: the safety rules hold for any sessions, policy and history.

The oracle for "may this session be touched" (protections, then selectors) and for the
order the budget goes in is written here independently of pgrelief.plan, straight from
DESIGN.md's safety rules and the policy's field descriptions, so a bug in the plan's own
logic cannot hide behind itself.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrelief.diagnosis import Severity
from pgrelief.durations import parse_duration
from pgrelief.plan import CancelQuery, PlanHistory, TerminateBackend, plan, query_identity
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.snapshot import Session
from tests.factories import TAKEN_AT as NOW
from tests.factories import apply_changes, role, session, snapshot, spec

ROLES = ["app", "batch", "admin", 'q"uote', "sp ace"]
APPS = ["web", "worker", "psql", "", "checkout-api", "checkout-web", "api [eu]"]
# Entries for protect/select.applications: exact names, globs, and a name that is itself a
# glob character class (it must still match itself exactly).
APP_PATTERNS = ["web", "psql", "checkout-*", "*-web", "api [eu]", "w*r", ""]
DATABASES = ["shop", "analytics", "postgres"]
ADDRESSES = [None, "10.0.0.5", "10.1.2.3", "192.168.1.9", "fd00::7", "::ffff:10.1.0.1"]
CIDRS = ["10.1.0.0/16", "192.168.0.0/16", "fd00::/8"]
# Weighted towards sessions a rule can match, so most examples exercise the budget.
STATES = [
    "idle",
    "idle",
    "idle",
    "idle in transaction",
    "idle in transaction",
    "idle in transaction (aborted)",
    "active",
    "active",
    "fastpath function call",
    None,
]
BACKEND_TYPES = ["client backend"] * 12 + ["walsender", "autovacuum worker", "parallel worker"]
DURATIONS = ["1s", "30s", "1m", "5m", "10m", "1h"]
AGES = [0.5, 1.0, 30.0, 61.0, 300.0, 599.0, 3600.0, 7200.0, 86400.0]
RULE_STATES = {
    "idleInTransactionAfter": "idle in transaction",
    "idleInTransactionAbortedAfter": "idle in transaction (aborted)",
    "idleAfter": "idle",
}
# The budget's order, from BudgetSpec's description.
HARM = {"idle in transaction (aborted)": 0, "idle in transaction": 1, "idle": 2}
ESCALATION, CANCEL = 3, 4


@st.composite
def sessions(draw: st.DrawFn) -> list[Session]:
    pids = draw(st.lists(st.integers(10, 400), unique=True, min_size=4, max_size=30))
    out = []
    for pid in pids:
        out.append(
            session(
                pid,
                draw(st.sampled_from(STATES)),
                draw(st.sampled_from(AGES)),
                usename=draw(st.sampled_from([*ROLES, None])),
                datname=draw(st.sampled_from([*DATABASES, None])),
                application_name=draw(st.sampled_from(APPS)),
                client_addr=draw(st.sampled_from(ADDRESSES)),
                backend_type=draw(st.sampled_from(BACKEND_TYPES)),
                is_superuser=draw(st.sampled_from([False] * 8 + [True, None])),
                query=draw(
                    st.sampled_from(["select 1"] * 4 + ["commit", "LISTEN jobs", "listen x"])
                ),
            )
        )
    return out


@st.composite
def policies(draw: st.DrawFn) -> ConnectionPolicySpec:
    terminate = {
        rule: draw(st.sampled_from(DURATIONS))
        for rule in RULE_STATES
        if draw(st.booleans()) or rule == "idleAfter"
    }
    cancel: dict[str, str] = {}
    if draw(st.booleans()):
        cancel["activeAfter"] = draw(st.sampled_from(DURATIONS))
        if draw(st.booleans()):
            cancel["escalateAfter"] = draw(st.sampled_from(DURATIONS))
    protect: dict[str, Any] = {
        "roles": draw(st.lists(st.sampled_from(ROLES), unique=True, max_size=1)),
        "applications": draw(st.lists(st.sampled_from(APP_PATTERNS), unique=True, max_size=2)),
        "databases": draw(st.lists(st.sampled_from(DATABASES), unique=True, max_size=1)),
        "clientCIDRs": draw(st.lists(st.sampled_from(CIDRS), unique=True, max_size=1)),
        "superusers": draw(st.booleans()),
        "listeners": draw(st.booleans()),
    }
    # Mostly no selector or one: with all three set, few sessions are left to act on.
    select: dict[str, Any] = {
        "roles": draw(st.lists(st.sampled_from(ROLES), unique=True, min_size=2, max_size=3)),
        "applications": draw(
            st.lists(st.sampled_from(APP_PATTERNS), unique=True, min_size=1, max_size=3)
        ),
        "databases": draw(st.lists(st.sampled_from(DATABASES), unique=True, max_size=2)),
    }
    kept = draw(
        st.sampled_from([(), (), ("roles",), ("applications",), ("databases",), tuple(select)])
    )
    select = {key: value if key in kept else [] for key, value in select.items()}
    return spec(
        remediation={
            "mode": draw(st.sampled_from(["Enforce", "DryRun"])),
            "onlyUnderPressure": draw(st.booleans()),
            "terminate": terminate,
            "cancel": cancel,
            "budget": {
                "maxPerCycle": draw(st.integers(0, 12)),
                "maxPerHour": draw(st.integers(0, 30)),
            },
            "select": select,
            "protect": protect,
        }
    )


@st.composite
def histories(draw: st.DrawFn, all_sessions: list[Session]) -> PlanHistory:
    """Budget spends in the last two hours, and some of the running queries cancelled."""
    spent = draw(st.lists(st.integers(0, 7200), max_size=draw(st.sampled_from([0, 5, 40]))))
    running = [s for s in all_sessions if s.state == "active"]
    cancelled = (
        draw(st.lists(st.sampled_from(running), unique_by=lambda s: s.pid)) if running else []
    )
    return PlanHistory(
        terminations=[NOW - timedelta(seconds=s) for s in spent],
        cancelled={
            query_identity(s.pid, s.backend_start, s.query_start): NOW
            - timedelta(seconds=draw(st.sampled_from([0.5, 20.0, 90.0, 4000.0])))
            for s in cancelled
        },
    )


pressures = st.sampled_from(
    [Severity.WARNING, Severity.CRITICAL, Severity.HEALTHY, Severity.UNKNOWN]
)


def glob_match(name: str, pattern: str) -> bool:
    """An entry matches a name exactly, or as a glob with * (the only wildcard used here)."""
    if name == pattern:
        return True
    if "*" not in pattern:
        return False
    regex = "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern))
    return re.fullmatch(regex, name, re.DOTALL) is not None


def may_touch(s: Session, policy: ConnectionPolicySpec, own_pid: int | None) -> bool:
    """DESIGN.md's safety rules, restated independently of the plan."""
    protect = policy.remediation.protect
    if s.backend_type != "client backend" or s.pid == own_pid:
        return False
    if protect.superusers and s.is_superuser is not False:
        return False
    if s.usename in protect.roles:
        return False
    if any(glob_match(s.application_name, p) for p in protect.applications):
        return False
    if s.datname in protect.databases:
        return False
    if s.client_addr is not None:
        address = ipaddress.ip_address(s.client_addr)
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            candidates.append(address.ipv4_mapped)
        for cidr in protect.client_cidrs:
            network = ipaddress.ip_network(cidr)
            if any(a.version == network.version and a in network for a in candidates):
                return False
    return not (protect.listeners and s.query.strip().upper().startswith("LISTEN "))


def selected(s: Session, policy: ConnectionPolicySpec) -> bool:
    """remediation.select: every list that is set must match (an empty list selects all)."""
    select = policy.remediation.select
    return (
        (not select.roles or s.usename in select.roles)
        and (
            not select.applications
            or any(glob_match(s.application_name, p) for p in select.applications)
        )
        and (not select.databases or s.datname in select.databases)
    )


def idle_threshold(s: Session, policy: ConnectionPolicySpec) -> float | None:
    terminate = policy.remediation.terminate
    thresholds = {
        "idle in transaction": terminate.idle_in_transaction_after,
        "idle in transaction (aborted)": terminate.idle_in_transaction_aborted_after,
        "idle": terminate.idle_after,
    }
    text = thresholds.get(s.state) if s.state else None
    return None if text is None else parse_duration(text)


def cancelled_for(s: Session, history: PlanHistory) -> float | None:
    """Seconds since the plan's history says this very query was cancelled."""
    when = history.cancelled.get(query_identity(s.pid, s.backend_start, s.query_start))
    return None if when is None else (NOW - when).total_seconds()


def matches_rule(s: Session, policy: ConnectionPolicySpec, history: PlanHistory) -> bool:
    """A rule wants this session acted on now (before protections and budgets)."""
    threshold = idle_threshold(s, policy)
    if threshold is not None:
        return (s.state_age_s or 0) >= threshold
    cancel = policy.remediation.cancel
    if s.state != "active" or cancel.active_after is None:
        return False
    if (s.query_age_s or 0) < parse_duration(cancel.active_after):
        return False
    since = cancelled_for(s, history)
    if since is None or cancel.escalate_after is None:
        return True  # a cancel now, or one held back (already cancelled) and reported
    return since >= parse_duration(cancel.escalate_after)


def rank(action: TerminateBackend | CancelQuery) -> tuple[int, float]:
    if isinstance(action, CancelQuery):
        return (CANCEL, -action.age_s)
    return (HARM.get(action.state or "", ESCALATION), -action.age_s)


COMMON = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Session], ConnectionPolicySpec, Severity, PlanHistory]:
    all_sessions = draw(sessions())
    return all_sessions, draw(policies()), draw(pressures), draw(histories(all_sessions))


@COMMON
@given(cases(), st.booleans())
def test_session_actions_are_safe_selected_within_budget_and_in_harm_order(
    case: tuple[list[Session], ConnectionPolicySpec, Severity, PlanHistory],
    own_is_listed: bool,
) -> None:
    all_sessions, policy, pressure, history = case
    own_pid = all_sessions[0].pid if own_is_listed and all_sessions else 99
    snap = snapshot(all_sessions, own_pid=own_pid)
    result = plan(policy, snap, pressure, history, NOW)
    by_pid = {s.pid: s for s in all_sessions}
    actions = result.session_actions
    chosen = [by_pid[a.pid] for a in actions]

    # Never a protected session, always a selected one a rule matches.
    for s in chosen:
        assert matches_rule(s, policy, history)
        assert may_touch(s, policy, own_pid)
        assert selected(s, policy)
        assert s.pid != own_pid
        assert s.backend_type == "client backend"
    # Each session acted on once, with the identity act re-checks.
    assert len({a.pid for a in actions}) == len(actions)
    for a in actions:
        s = by_pid[a.pid]
        if isinstance(a, TerminateBackend):
            assert (a.backend_start, a.state, a.state_change) == (
                s.backend_start,
                s.state,
                s.state_change,
            )
            if s.state == "active":  # an escalation: only of a query cancelled long enough ago
                since = cancelled_for(s, history)
                escalate = policy.remediation.cancel.escalate_after
                assert since is not None and escalate is not None
                assert since >= parse_duration(escalate)
        else:
            assert (a.backend_start, a.query_start) == (s.backend_start, s.query_start)
            assert s.state == "active"
            assert cancelled_for(s, history) is None  # a query is never cancelled twice

    # Budgets: terminations and cancels together, per cycle and per sliding hour.
    budget = policy.remediation.budget
    recent = sum(1 for when in history.terminations if when > NOW - timedelta(hours=1))
    assert len(actions) <= budget.max_per_cycle
    assert len(actions) + recent <= max(budget.max_per_hour, recent)

    # Pressure gate.
    if policy.remediation.only_under_pressure and pressure not in (
        Severity.WARNING,
        Severity.CRITICAL,
    ):
        assert actions == ()

    # Harm order, oldest first within a state; nobody spared for budget goes before the last.
    ranks = [rank(a) for a in actions]
    assert ranks == sorted(ranks)
    if actions:
        for spared in result.skipped:
            if spared.why.startswith("over budget"):
                assert rank(spared.candidate) >= ranks[-1]

    # Everything a rule matched is either acted on or reported, exactly once.
    matched = {s.pid for s in all_sessions if matches_rule(s, policy, history)}
    reported = [a.pid for a in actions] + [s.pid for s in result.skipped]
    assert sorted(reported) == sorted(matched)
    # Protected and unselected sessions are reported as such, never as over budget.
    for spared in result.skipped:
        s = by_pid[spared.pid]
        if not may_touch(s, policy, own_pid) or not selected(s, policy):
            assert not spared.why.startswith(("over budget", "not under pressure"))

    # Under pressure, with room in the budget, every eligible session is acted on.
    eligible = [
        s
        for s in all_sessions
        if matches_rule(s, policy, history)
        and may_touch(s, policy, own_pid)
        and selected(s, policy)
        and not (
            cancelled_for(s, history) is not None
            and s.state == "active"
            and policy.remediation.cancel.escalate_after is None
        )
    ]
    allowed = min(budget.max_per_cycle, max(budget.max_per_hour - recent, 0))
    if (
        pressure in (Severity.WARNING, Severity.CRITICAL)
        or not policy.remediation.only_under_pressure
    ):
        assert len(actions) == min(len(eligible), allowed)
        assert result.budget_exhausted == (len(eligible) > allowed)


def crossings(
    all_sessions: list[Session], policy: ConnectionPolicySpec, own_pid: int | None
) -> list[float]:
    """Seconds until each touchable session below its threshold crosses it."""
    out = []
    active_after = policy.remediation.cancel.active_after
    for s in all_sessions:
        if not (may_touch(s, policy, own_pid) and selected(s, policy)):
            continue
        threshold = idle_threshold(s, policy)
        if threshold is not None and s.state_age_s is not None and s.state_age_s < threshold:
            out.append(threshold - s.state_age_s)
        running = s.state == "active" and s.query_age_s is not None
        if running and active_after is not None and s.query_age_s < parse_duration(active_after):
            out.append(parse_duration(active_after) - s.query_age_s)
    return out


@COMMON
@given(sessions(), policies(), st.sampled_from([Severity.WARNING, Severity.CRITICAL]))
def test_the_next_deadline_is_the_next_threshold_crossing(
    all_sessions: list[Session], policy: ConnectionPolicySpec, pressure: Severity
) -> None:
    # Under pressure, a budget that takes everyone and no history: the only deadlines left
    # are sessions that will cross a threshold, and the plan names the first of them.
    remediation = policy.remediation.model_copy(
        update={"budget": policy.remediation.budget.model_copy(
            update={"max_per_cycle": 1000, "max_per_hour": 1000})}
    )  # fmt: skip
    roomy = policy.model_copy(update={"remediation": remediation})
    result = plan(roomy, snapshot(all_sessions, own_pid=99), pressure, PlanHistory(), NOW)
    due = crossings(all_sessions, roomy, 99)
    if not due:
        assert result.next_deadline is None
    else:
        assert result.next_deadline == NOW + timedelta(seconds=min(due))


@COMMON
@given(cases())
def test_no_session_comes_due_before_the_next_deadline(
    case: tuple[list[Session], ConnectionPolicySpec, Severity, PlanHistory],
) -> None:
    all_sessions, policy, pressure, history = case
    result = plan(policy, snapshot(all_sessions, own_pid=99), pressure, history, NOW)
    for seconds in crossings(all_sessions, policy, 99):
        assert result.next_deadline is not None
        assert result.next_deadline <= NOW + timedelta(seconds=seconds)
    if result.next_deadline is not None:
        assert result.next_deadline >= NOW


def later(all_sessions: list[Session], seconds: float) -> list[Session]:
    """The same sessions ``seconds`` later, none of them having moved on."""
    return [
        session(
            s.pid,
            s.state,
            None if s.state_age_s is None else s.state_age_s + seconds,
            usename=s.usename,
            datname=s.datname,
            application_name=s.application_name,
            client_addr=s.client_addr,
            backend_type=s.backend_type,
            is_superuser=s.is_superuser,
            query=s.query,
            taken_at=NOW + timedelta(seconds=seconds),
        )
        for s in all_sessions
    ]


@COMMON
@given(sessions(), policies(), st.sampled_from([Severity.WARNING, Severity.CRITICAL]))
def test_at_the_next_deadline_a_rule_acts_and_not_before(
    all_sessions: list[Session], policy: ConnectionPolicySpec, pressure: Severity
) -> None:
    remediation = policy.remediation.model_copy(
        update={"budget": policy.remediation.budget.model_copy(
            update={"max_per_cycle": 1000, "max_per_hour": 1000})}
    )  # fmt: skip
    roomy = policy.model_copy(update={"remediation": remediation})
    first = plan(roomy, snapshot(all_sessions, own_pid=99), pressure, PlanHistory(), NOW)
    if first.next_deadline is None:
        return
    acted = {a.pid for a in first.session_actions}
    left = [s for s in all_sessions if s.pid not in acted]
    wait = (first.next_deadline - NOW).total_seconds()

    def acts(seconds: float) -> bool:
        moment = NOW + timedelta(seconds=seconds)
        then = snapshot(later(left, seconds), own_pid=99, taken_at=moment)
        return bool(plan(roomy, then, pressure, PlanHistory(), moment).session_actions)

    assert acts(wait)
    if wait > 0.001:
        assert not acts(wait - 0.001)


@COMMON
@given(cases(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_ignores_session_order(
    case: tuple[list[Session], ConnectionPolicySpec, Severity, PlanHistory], rng: Any
) -> None:
    all_sessions, policy, pressure, history = case
    first = plan(policy, snapshot(all_sessions), pressure, history, NOW)
    assert plan(policy, snapshot(all_sessions), pressure, history, NOW) == first
    shuffled = list(all_sessions)
    rng.shuffle(shuffled)
    assert plan(policy, snapshot(shuffled), pressure, history, NOW) == first


@COMMON
@given(cases())
def test_mode_off_does_nothing(
    case: tuple[list[Session], ConnectionPolicySpec, Severity, PlanHistory],
) -> None:
    all_sessions, policy, pressure, history = case
    remediation = policy.remediation.model_copy(update={"mode": "Off"})
    off = policy.model_copy(update={"remediation": remediation})
    result = plan(off, snapshot(all_sessions), pressure, history, NOW)
    assert result.actions == () and result.skipped == ()
    assert result.next_deadline is None


TIMEOUT_SPELLINGS = ["0", "500ms", "1s", "1000", "30s", "30000ms", "1min", "60s", "2h", "0.5s"]
POLICY_TIMEOUTS = ["0s", "500ms", "1s", "30s", "1m", "90s", "2h"]


@COMMON
@given(
    st.lists(
        st.tuples(
            st.sampled_from(ROLES),
            st.integers(-1, 5),
            st.sampled_from([None, *TIMEOUT_SPELLINGS]),
        ),
        unique_by=lambda t: t[0],
        max_size=4,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(ROLES),
            st.one_of(st.none(), st.integers(-1, 5)),
            st.one_of(st.none(), st.sampled_from(POLICY_TIMEOUTS)),
        ),
        unique_by=lambda t: t[0],
        max_size=4,
    ),
)
def test_limits_converge_in_one_cycle(
    server_roles: list[tuple[str, int, str | None]],
    wanted: list[tuple[str, int | None, str | None]],
) -> None:
    roles = [
        role(name, limit, config={} if timeout is None else {"statement_timeout": timeout})
        for name, limit, timeout in server_roles
    ]
    entries = []
    for name, limit, timeout in wanted:
        entry: dict[str, Any] = {"name": name}
        if limit is not None:
            entry["connectionLimit"] = limit
        if timeout is not None:
            entry["statementTimeout"] = timeout
        entries.append(entry)
    policy = spec(remediation={"mode": "Enforce"}, limits={"roles": entries})
    before = snapshot(roles=roles)
    first = plan(policy, before, Severity.HEALTHY, PlanHistory(), NOW)
    existing = {name for name, _, _ in server_roles}
    assert {c.role for c in first.changes} <= existing
    assert len(first.recommendations) == len({n for n, _, _ in wanted} - existing)
    assert set(first.originals) == {c.key for c in first.changes}
    after = apply_changes(before, first.changes)
    second = plan(policy, after, Severity.HEALTHY, PlanHistory(originals=first.originals), NOW)
    assert second.changes == ()
    assert second.originals == {}
