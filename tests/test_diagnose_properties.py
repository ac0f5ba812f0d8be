"""diagnose over generated snapshots: whatever the sessions, the arithmetic holds.

Counts add up across every breakdown, every pid a finding names is a real, non-own client
backend, utilization and pressure agree with the slot settings, severities are ordered and
the result serializes to the JSON contract.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from typing import Any
from unittest.mock import patch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrelief.diagnose import DiagnoseOptions, _counting, diagnose, diagnose_refusal
from pgrelief.diagnosis import (
    EMERGENCY_SQL,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LONG_RUNNING,
    Severity,
)
from pgrelief.plan.terminations import protect_of
from pgrelief.policy import ProtectSpec
from pgrelief.protection import (
    RUN_DEFAULTS,
    SUPERUSER_UNKNOWN,
    Protect,
    protection,
    protections,
)
from pgrelief.snapshot import CLIENT_BACKEND, STATES, RoleInfo, Snapshot
from tests.factories import session, snapshot

_NAMES = st.sampled_from(["app", "report", 'we"ird role', "Ops Bot", "rôle", "postgres"])
_APPS = st.sampled_from(
    ["", "web", "PostgreSQL JDBC Driver", "sidekiq", "celery", "pgbouncer", "psql", "x'y"]
)
_ADDRS = st.sampled_from([None, "10.0.0.1", "10.0.0.2", "::1", "127.0.0.1"])
_DBS = st.sampled_from([None, "appdb", "postgres", "Prod DB"])
_QUERIES = st.sampled_from(
    [
        "select 1",
        "LISTEN jobs",
        "select pg_advisory_lock(1)",
        "PREPARE q AS select 1",
        "SET search_path = x",
        "SET LOCAL work_mem = '1MB'",
        "",
        "update t set a = a + 1 where id = $1 " + "z" * 120,
    ]
)
_AGES = st.one_of(st.none(), st.floats(min_value=0, max_value=1e6, allow_nan=False))
_BACKEND_TYPES = st.sampled_from(
    [CLIENT_BACKEND] * 6 + ["autovacuum worker", "walsender", "background worker"]
)


@st.composite
def _sessions(draw: st.DrawFn) -> list[Any]:
    pids = draw(st.lists(st.integers(min_value=1, max_value=10**6), max_size=60, unique=True))
    rows = []
    for pid in pids:
        state_age = draw(_AGES)
        rows.append(
            session(
                pid,
                draw(st.sampled_from([*STATES, None])),
                usename=draw(st.one_of(st.none(), _NAMES)),
                application_name=draw(_APPS),
                client_addr=draw(_ADDRS),
                datname=draw(_DBS),
                backend_type=draw(_BACKEND_TYPES),
                state_age=state_age,
                query_age=draw(_AGES),
                xact_age=draw(_AGES),
                backend_age=draw(_AGES),
                query=draw(_QUERIES),
                wait_event_type=draw(st.sampled_from([None, "Lock", "LWLock", "IO", "Client"])),
                wait_event=draw(st.sampled_from([None, "relation", "ClientRead"])),
                timestamps=draw(st.booleans()),
                is_superuser=draw(st.sampled_from([None, True, False])),
            )
        )
    return rows


@st.composite
def _snapshots(draw: st.DrawFn) -> Snapshot:
    sessions = draw(_sessions())
    own_pid = draw(st.one_of(st.none(), st.sampled_from([s.pid for s in sessions] or [1])))
    roles = [
        RoleInfo(name, draw(st.integers(min_value=-1, max_value=20)), is_superuser=su)
        for name, su in draw(
            st.lists(st.tuples(_NAMES, st.booleans()), max_size=4, unique_by=lambda t: t[0])
        )
    ]
    return snapshot(
        sessions,
        max_connections=draw(st.integers(min_value=1, max_value=300)),
        superuser_reserved=draw(st.integers(min_value=0, max_value=10)),
        reserved=draw(st.integers(min_value=0, max_value=5)),
        version_num=draw(st.sampled_from([None, 130000, 140005, 160002, 180000])),
        roles=roles,
        own_pid=own_pid,
    )


@st.composite
def _options(draw: st.DrawFn) -> DiagnoseOptions:
    warning = draw(st.integers(min_value=1, max_value=100))
    return DiagnoseOptions(
        idle_after_s=draw(st.floats(min_value=0, max_value=1e5)),
        idle_in_transaction_after_s=draw(st.floats(min_value=0, max_value=1e5)),
        long_running_after_s=draw(st.floats(min_value=0, max_value=1e5)),
        warning_percent=warning,
        critical_percent=draw(st.integers(min_value=warning, max_value=100)),
        memory_bytes=draw(st.one_of(st.none(), st.integers(min_value=1, max_value=2**40))),
        stack=draw(st.sampled_from([None, "sqlalchemy", "django", "rails", "hikaricp"])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=_snapshots(), options=_options())
def test_diagnose_invariants(snap: Snapshot, options: DiagnoseOptions) -> None:
    d = diagnose(snap, options)
    clients = [s for s in snap.sessions if s.backend_type == CLIENT_BACKEND]

    # Counts add up.
    assert d.totals.client_backends == len(clients)
    assert d.totals.other_backends == len(snap.sessions) - len(clients)
    assert sum(d.totals.by_state.values()) == len(clients)
    for groups in (
        d.breakdown.by_user,
        d.breakdown.by_application,
        d.breakdown.by_client_addr,
        d.breakdown.by_database,
    ):
        assert sum(g.count for g in groups) == len(clients)
        assert len({g.key for g in groups}) == len(groups)
        for group in groups:
            assert sum(group.by_state.values()) == group.count
        assert [(-g.count, g.key) for g in groups] == sorted((-g.count, g.key) for g in groups)

    # Utilization and pressure follow the slot settings.
    usable = snap.server.usable_slots
    assert d.server is not None
    assert d.server.usable_slots == usable
    if usable > 0:
        assert d.totals.utilization_percent == len(clients) * 100 / usable
    expected = (
        Severity.CRITICAL
        if usable == 0
        or len(clients) >= usable
        or d.totals.utilization_percent >= options.critical_percent
        else Severity.WARNING
        if d.totals.utilization_percent >= options.warning_percent
        else Severity.HEALTHY
    )
    assert d.pressure == expected

    # Every pid a finding names is a real client backend, never our own session.
    by_pid = {s.pid: s for s in clients}
    for finding in d.findings:
        assert len(set(finding.pids)) == len(finding.pids)
        for pid in finding.pids:
            assert pid in by_pid
            assert pid != snap.own_pid
        assert finding.summary and "\n" not in finding.summary
        # Texts stay readable: bounded lines, whatever the number of sessions.
        assert len(finding.summary) < 300
        assert all(len(line) < 1000 for line in finding.evidence)
        assert all(len(fix.text) < 200 * 100 + 5000 for fix in finding.fixes)
        assert finding.severity != Severity.UNKNOWN
    for kind, states, threshold, age in (
        (LEAKED_IDLE, {"idle"}, options.idle_after_s, "state_age_s"),
        (
            IDLE_IN_TRANSACTION,
            {"idle in transaction", "idle in transaction (aborted)"},
            options.idle_in_transaction_after_s,
            "state_age_s",
        ),
        (
            LONG_RUNNING,
            {"active", "fastpath function call"},
            options.long_running_after_s,
            "query_age_s",
        ),
    ):
        finding = d.finding(kind)
        if finding is None:
            continue
        ages = [getattr(by_pid[pid], age) for pid in finding.pids]
        assert all(by_pid[pid].state in states for pid in finding.pids)
        assert all(a is not None and a >= threshold for a in ages)
        assert ages == sorted(ages, reverse=True)  # oldest first

    # Severity order and status.
    severities = [int(f.severity) for f in d.findings]
    assert severities == sorted(severities, reverse=True)
    assert d.status == max([d.pressure, *(f.severity for f in d.findings)])

    # The JSON contract serializes.
    payload = json.loads(json.dumps(d.to_json()))
    assert payload["totals"]["client_backends"] == len(clients)
    assert {"server", "totals", "breakdown", "findings"} <= set(payload)


@settings(max_examples=100, deadline=None)
@given(message=st.text(max_size=200))
def test_refusal_never_fails(message: str) -> None:
    d = diagnose_refusal(message)
    assert d.status == Severity.CRITICAL
    assert d.server is None
    json.dumps(d.to_json())


def _forced(mode: str) -> Any:
    """Replace diagnose's cardinality choice: always fold combinations, or never."""

    def choose(columns: tuple[list[Any], ...], states: list[Any]) -> Any:
        if mode == "columns":
            return None
        return Counter(zip(*columns, states, strict=True))

    return patch.object(_counting, "_combinations", choose)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=_snapshots(), options=_options())
def test_both_counting_strategies_agree(snap: Snapshot, options: DiagnoseOptions) -> None:
    with _forced("combinations"):
        folded = diagnose(snap, options).to_json()
    with _forced("columns"):
        counted = diagnose(snap, options).to_json()
    assert folded == counted


_PROTECTS = st.builds(
    Protect,
    superusers=st.booleans(),
    listeners=st.booleans(),
    roles=st.frozensets(_NAMES, max_size=2),
    applications=st.frozensets(_APPS, max_size=2),
    databases=st.frozensets(st.sampled_from(["appdb", "postgres"]), max_size=1),
    networks=st.sampled_from([(), (ipaddress.ip_network("10.0.0.0/31"),)]),
)


@settings(max_examples=200, deadline=None)
@given(snap=_snapshots(), protect=_PROTECTS)
def test_protections_is_the_rule_asked_session_by_session(snap: Snapshot, protect: Protect) -> None:
    # The memoized form must never reuse a verdict for sessions the rule tells apart.
    assert protections(snap.sessions, snap, protect) == [
        protection(s, snap, protect) for s in snap.sessions
    ]


def test_run_defaults_are_a_policys_defaults() -> None:
    # What diagnose spares when it has no policy is what a policy protects when it says nothing.
    assert protect_of(ProtectSpec()) == RUN_DEFAULTS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=_snapshots(), options=_options())
def test_no_statement_names_a_session_run_would_spare(
    snap: Snapshot, options: DiagnoseOptions
) -> None:
    d = diagnose(snap, options)
    texts = [fix.text for f in d.findings for fix in f.fixes if fix.kind == EMERGENCY_SQL]
    if d.verdict is not None and d.verdict.emergency is not None:
        texts.append(d.verdict.emergency.text)
    statements = "\n".join(texts)
    for row in snap.sessions:
        why = protection(row, snap)
        if why is not None and why.rule == SUPERUSER_UNKNOWN:
            # Unknown superusers are re-checked by the server; the other protections hold.
            why = protection(row, snap, Protect(superusers=False))
        if why is not None:
            assert f"({row.pid}, " not in statements, (row, why)
            assert not re.search(rf"\bpid in \([^)]*\b{row.pid}\b", statements), row
