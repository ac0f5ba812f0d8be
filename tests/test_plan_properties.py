"""Property tests of plan: the safety rules hold for any sessions, policy and history.

The oracle for "may this session be terminated" is written here independently of
pgrelief.plan, straight from DESIGN.md's safety rules, so a bug in the plan's own
protection logic cannot hide behind itself.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrelief.diagnosis import Severity
from pgrelief.durations import parse_duration
from pgrelief.plan import PlanHistory, plan
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.snapshot import Session
from tests.factories import TAKEN_AT as NOW
from tests.factories import apply_changes, role, session, snapshot, spec

ROLES = ["app", "batch", "admin", 'q"uote', "sp ace"]
APPS = ["web", "worker", "psql", ""]
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
    "fastpath function call",
    None,
]
BACKEND_TYPES = ["client backend"] * 12 + ["walsender", "autovacuum worker", "parallel worker"]
DURATIONS = ["1s", "30s", "1m", "5m", "10m", "1h"]
RULE_STATES = {
    "idleInTransactionAfter": "idle in transaction",
    "idleInTransactionAbortedAfter": "idle in transaction (aborted)",
    "idleAfter": "idle",
}


@st.composite
def sessions(draw: st.DrawFn) -> list[Session]:
    pids = draw(st.lists(st.integers(10, 400), unique=True, min_size=4, max_size=30))
    out = []
    for pid in pids:
        out.append(
            session(
                pid,
                draw(st.sampled_from(STATES)),
                draw(
                    st.sampled_from([0.5, 1.0, 30.0, 61.0, 300.0, 599.0, 3600.0, 7200.0, 86400.0])
                ),
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
    protect: dict[str, Any] = {
        "roles": draw(st.lists(st.sampled_from(ROLES), unique=True, max_size=1)),
        "applications": draw(st.lists(st.sampled_from(APPS), unique=True, max_size=1)),
        "databases": draw(st.lists(st.sampled_from(DATABASES), unique=True, max_size=1)),
        "clientCIDRs": draw(st.lists(st.sampled_from(CIDRS), unique=True, max_size=1)),
        "superusers": draw(st.booleans()),
        "listeners": draw(st.booleans()),
    }
    return spec(
        remediation={
            "mode": draw(st.sampled_from(["Enforce", "DryRun"])),
            "onlyUnderPressure": draw(st.booleans()),
            "terminate": terminate,
            "budget": {
                "maxPerCycle": draw(st.integers(0, 12)),
                "maxPerHour": draw(st.integers(0, 30)),
            },
            "protect": protect,
        }
    )


histories = st.lists(st.integers(0, 7200), max_size=40).map(
    lambda seconds: PlanHistory(terminations=[NOW - timedelta(seconds=s) for s in seconds])
)
pressures = st.sampled_from(
    [Severity.WARNING, Severity.CRITICAL, Severity.HEALTHY, Severity.UNKNOWN]
)


def may_terminate(s: Session, policy: ConnectionPolicySpec, own_pid: int | None) -> bool:
    """DESIGN.md's safety rules, restated independently of the plan."""
    protect = policy.remediation.protect
    if s.backend_type != "client backend" or s.pid == own_pid:
        return False
    if protect.superusers and s.is_superuser is not False:
        return False
    if s.usename in protect.roles or s.application_name in protect.applications:
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


def matches_rule(s: Session, policy: ConnectionPolicySpec) -> bool:
    terminate = policy.remediation.terminate
    thresholds = {
        "idle in transaction": terminate.idle_in_transaction_after,
        "idle in transaction (aborted)": terminate.idle_in_transaction_aborted_after,
        "idle": terminate.idle_after,
    }
    threshold = thresholds.get(s.state) if s.state else None
    return threshold is not None and (s.state_age_s or 0) >= parse_duration(threshold)


COMMON = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(sessions(), policies(), pressures, histories, st.booleans())
def test_terminations_are_eligible_within_budget_and_oldest_first(
    all_sessions: list[Session],
    policy: ConnectionPolicySpec,
    pressure: Severity,
    history: PlanHistory,
    own_is_listed: bool,
) -> None:
    own_pid = all_sessions[0].pid if own_is_listed and all_sessions else 99
    snap = snapshot(all_sessions, own_pid=own_pid)
    result = plan(policy, snap, pressure, history, NOW)
    by_pid = {s.pid: s for s in all_sessions}
    chosen = [by_pid[t.pid] for t in result.terminations]

    # Subset of eligible sessions: a rule matches and nothing protects them.
    for s in chosen:
        assert matches_rule(s, policy)
        assert may_terminate(s, policy, own_pid)
        assert s.pid != own_pid
        assert s.backend_type == "client backend"
    # Each terminated once, with the identity act re-checks.
    assert len({t.pid for t in result.terminations}) == len(result.terminations)
    for t in result.terminations:
        s = by_pid[t.pid]
        assert (t.backend_start, t.state, t.state_change) == (
            s.backend_start,
            s.state,
            s.state_change,
        )

    # Budgets: per cycle, and per sliding hour given the history.
    budget = policy.remediation.budget
    recent = sum(1 for when in history.terminations if when > NOW - timedelta(hours=1))
    assert len(chosen) <= budget.max_per_cycle
    assert len(chosen) + recent <= max(budget.max_per_hour, recent)

    # Pressure gate.
    if policy.remediation.only_under_pressure and pressure not in (
        Severity.WARNING,
        Severity.CRITICAL,
    ):
        assert chosen == []

    # Oldest first, and nobody eligible but spared is older than someone terminated.
    ages = [t.age_s for t in result.terminations]
    assert ages == sorted(ages, reverse=True)
    if ages:
        for spared in result.skipped:
            if spared.why.startswith("over budget"):
                assert spared.candidate.age_s <= ages[-1]

    # Everything a rule matched is either terminated or reported, exactly once.
    matched = {s.pid for s in all_sessions if matches_rule(s, policy)}
    reported = [t.pid for t in result.terminations] + [s.pid for s in result.skipped]
    assert sorted(reported) == sorted(matched)
    # Protected sessions are reported as protected, never as over budget.
    for spared in result.skipped:
        if not may_terminate(by_pid[spared.pid], policy, own_pid):
            assert not spared.why.startswith(("over budget", "not under pressure"))

    # Under pressure, with room in the budget, every eligible session is terminated.
    eligible = [
        s for s in all_sessions if matches_rule(s, policy) and may_terminate(s, policy, own_pid)
    ]
    allowed = min(budget.max_per_cycle, max(budget.max_per_hour - recent, 0))
    if (
        pressure in (Severity.WARNING, Severity.CRITICAL)
        or not policy.remediation.only_under_pressure
    ):
        assert len(chosen) == min(len(eligible), allowed)
        assert result.budget_exhausted == (len(eligible) > allowed)


@COMMON
@given(sessions(), policies(), pressures, histories, st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_ignores_session_order(
    all_sessions: list[Session],
    policy: ConnectionPolicySpec,
    pressure: Severity,
    history: PlanHistory,
    rng: Any,
) -> None:
    first = plan(policy, snapshot(all_sessions), pressure, history, NOW)
    assert plan(policy, snapshot(all_sessions), pressure, history, NOW) == first
    shuffled = list(all_sessions)
    rng.shuffle(shuffled)
    assert plan(policy, snapshot(shuffled), pressure, history, NOW) == first


@COMMON
@given(sessions(), policies(), pressures, histories)
def test_mode_off_does_nothing(
    all_sessions: list[Session],
    policy: ConnectionPolicySpec,
    pressure: Severity,
    history: PlanHistory,
) -> None:
    remediation = policy.remediation.model_copy(update={"mode": "Off"})
    off = policy.model_copy(update={"remediation": remediation})
    result = plan(off, snapshot(all_sessions), pressure, history, NOW)
    assert result.actions == () and result.skipped == ()


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
