"""Exact unit tests of plan: which sessions are terminated, which are spared and why, and
which ALTERs and recommendations a policy produces against a given server state."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest

from pgrelief.diagnosis import Severity
from pgrelief.plan import (
    Plan,
    PlanHistory,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
    TerminateBackend,
    parse_key,
    plan,
    plan_revert,
    role_key,
)
from pgrelief.snapshot import Session, Setting, Snapshot
from tests.factories import (
    MANAGED_SETTINGS,
    OWN_PID,
    apply_changes,
    database,
    enforce,
    role,
    session,
    settings,
    snapshot,
    spec,
)
from tests.factories import TAKEN_AT as NOW

EMPTY = PlanHistory()


def pids(the_plan: Plan) -> list[int]:
    return [t.pid for t in the_plan.terminations]


def skipped(the_plan: Plan) -> dict[int, str]:
    return {s.pid: s.why for s in the_plan.skipped}


# ---- terminations --------------------------------------------------------------------------


def test_stale_idle_session_is_terminated_with_its_identity_for_the_recheck() -> None:
    stale = session(101, "idle", 3600)
    result = plan(enforce(), snapshot([stale]), Severity.WARNING, EMPTY, NOW)
    assert len(result.actions) == 1
    action = result.actions[0]
    assert isinstance(action, TerminateBackend)
    assert (action.pid, action.backend_start, action.state, action.state_change) == (
        101,
        stale.backend_start,
        "idle",
        stale.state_change,
    )
    assert action.action == "terminate"
    assert action.target == "pid 101"
    assert action.rule == "idleAfter"
    assert action.reason == "idle for 1h0m (rule idleAfter: 10m)"
    evidence = json.loads(json.dumps(action.evidence))
    assert evidence["usename"] == "app"
    assert evidence["state_age_s"] == 3600.0
    assert evidence["pressure"] == "warning"
    assert evidence["client_addr"] == "10.0.0.1"
    assert result.skipped == ()


def test_each_rule_applies_to_its_own_state_only() -> None:
    policy = enforce(
        terminate={
            "idleInTransactionAfter": "5m",
            "idleInTransactionAbortedAfter": "1m",
            "idleAfter": "30m",
        }
    )
    sessions = [
        session(1, "idle in transaction", 301),
        session(2, "idle in transaction", 299),
        session(3, "idle in transaction (aborted)", 61),
        session(4, "idle in transaction (aborted)", 59),
        session(5, "idle", 1801),
        session(6, "idle", 1799),
        session(7, "active", 99999),
        session(8, None, 99999),
        session(9, "fastpath function call", 99999),
    ]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [5, 1, 3]  # oldest first
    assert [t.rule for t in result.terminations] == [
        "idleAfter",
        "idleInTransactionAfter",
        "idleInTransactionAbortedAfter",
    ]


def test_absent_rule_never_terminates() -> None:
    policy = enforce(terminate={"idleInTransactionAfter": "1m"})
    result = plan(policy, snapshot([session(1, "idle", 10**6)]), Severity.CRITICAL, EMPTY, NOW)
    assert result.actions == ()
    assert result.skipped == ()


def test_threshold_is_inclusive() -> None:
    result = plan(enforce(), snapshot([session(1, "idle", 600)]), Severity.WARNING, EMPTY, NOW)
    assert pids(result) == [1]


def test_age_from_state_change_when_snapshot_has_no_state_age() -> None:
    stale = replace(session(1, "idle", 900), state_age_s=None)
    result = plan(enforce(), snapshot([stale]), Severity.WARNING, EMPTY, NOW)
    assert pids(result) == [1]
    assert result.terminations[0].age_s == 900


def test_unknown_age_is_never_terminated() -> None:
    stale = replace(session(1, "idle", 900), state_age_s=None, state_change=None)
    result = plan(enforce(), snapshot([stale]), Severity.WARNING, EMPTY, NOW)
    assert result.actions == ()


@pytest.mark.parametrize("pressure", [Severity.HEALTHY, Severity.UNKNOWN])
def test_no_termination_without_pressure_when_only_under_pressure(pressure: Severity) -> None:
    result = plan(enforce(), snapshot([session(1, "idle", 3600)]), pressure, EMPTY, NOW)
    assert result.terminations == ()
    assert skipped(result) == {
        1: f"not under pressure ({pressure.label}; onlyUnderPressure is set)"
    }


def test_terminates_without_pressure_when_not_only_under_pressure() -> None:
    policy = enforce(only_under_pressure=False)
    result = plan(policy, snapshot([session(1, "idle", 3600)]), Severity.HEALTHY, EMPTY, NOW)
    assert pids(result) == [1]


def test_oldest_first_within_the_cycle_budget_rest_reported() -> None:
    policy = enforce(budget={"maxPerCycle": 2, "maxPerHour": 100})
    sessions = [session(1, "idle", 700), session(2, "idle", 5000), session(3, "idle", 900)]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [2, 3]
    assert skipped(result) == {1: "over budget: maxPerCycle 2"}
    assert result.budget_exhausted


def test_ties_in_age_go_to_the_lower_pid() -> None:
    policy = enforce(budget={"maxPerCycle": 1, "maxPerHour": 100})
    sessions = [session(7, "idle", 700), session(3, "idle", 700)]
    assert pids(plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)) == [3]


def test_hourly_budget_counts_only_the_last_hour() -> None:
    policy = enforce(budget={"maxPerCycle": 10, "maxPerHour": 5})
    history = PlanHistory(
        terminations=[NOW - timedelta(minutes=m) for m in (1, 10, 59)]
        + [NOW - timedelta(minutes=61), NOW - timedelta(hours=5)]
    )
    sessions = [session(p, "idle", 1000 + p) for p in range(1, 6)]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, history, NOW)
    assert pids(result) == [5, 4]
    assert set(skipped(result).values()) == {"over budget: maxPerHour 5 (3 in the last hour)"}
    assert result.budget_exhausted


def test_exhausted_hourly_budget_terminates_nothing() -> None:
    policy = enforce(budget={"maxPerCycle": 10, "maxPerHour": 2})
    history = PlanHistory(terminations=[NOW - timedelta(minutes=5)] * 2)
    result = plan(policy, snapshot([session(1, "idle", 3600)]), Severity.CRITICAL, history, NOW)
    assert result.terminations == ()
    assert result.budget_exhausted


def test_zero_budget_disables_terminations() -> None:
    policy = enforce(budget={"maxPerCycle": 0, "maxPerHour": 100})
    result = plan(policy, snapshot([session(1, "idle", 3600)]), Severity.CRITICAL, EMPTY, NOW)
    assert result.terminations == ()
    assert skipped(result) == {1: "over budget: maxPerCycle 0"}


def test_budget_not_exhausted_when_everything_fits() -> None:
    result = plan(enforce(), snapshot([session(1, "idle", 3600)]), Severity.CRITICAL, EMPTY, NOW)
    assert not result.budget_exhausted


PROTECT_ALL = {
    "roles": ["replicator", 'we"ird role'],
    "applications": ["psql"],
    "databases": ["admin"],
    "clientCIDRs": ["192.168.0.0/16", "fd00::/8"],
}


@pytest.mark.parametrize(
    ("victim", "why"),
    [
        (session(OWN_PID, "idle", 3600), "pgrelief's own session"),
        (session(2, "idle", 3600, is_superuser=True), "superuser (protect.superusers)"),
        (
            session(3, "idle", 3600, is_superuser=None, usename="ghost"),
            "superuser status unknown (protect.superusers)",
        ),
        (session(4, "idle", 3600, usename="replicator"), 'protected role "replicator"'),
        (session(5, "idle", 3600, usename='we"ird role'), 'protected role "we""ird role"'),
        (session(6, "idle", 3600, application_name="psql"), "protected application 'psql'"),
        (session(7, "idle", 3600, datname="admin"), 'protected database "admin"'),
        (
            session(8, "idle", 3600, client_addr="192.168.7.7"),
            "protected client address 192.168.7.7 (in 192.168.0.0/16)",
        ),
        (
            session(9, "idle", 3600, client_addr="fd00::1"),
            "protected client address fd00::1 (in fd00::/8)",
        ),
        (
            session(10, "idle", 3600, client_addr="::ffff:192.168.1.1"),
            "protected client address ::ffff:192.168.1.1 (in 192.168.0.0/16)",
        ),
        (session(11, "idle", 3600, query="LISTEN jobs"), "LISTEN session (protect.listeners)"),
        (
            session(12, "idle", 3600, backend_type="walsender"),
            "not a client backend (walsender)",
        ),
        (
            session(13, "idle", 3600, backend_type="autovacuum worker"),
            "not a client backend (autovacuum worker)",
        ),
    ],
)
def test_protected_sessions_are_spared_and_reported(victim: Session, why: str) -> None:
    policy = enforce(protect=PROTECT_ALL)
    result = plan(policy, snapshot([victim], own_pid=OWN_PID), Severity.CRITICAL, EMPTY, NOW)
    assert result.terminations == ()
    assert skipped(result) == {victim.pid: why}
    assert result.skipped[0].target == f"pid {victim.pid}"
    assert result.skipped[0].reason.startswith("idle for 1h0m")


def test_superuser_status_falls_back_to_pg_roles() -> None:
    unknown = session(1, "idle", 3600, is_superuser=None, usename="app")
    boss = session(2, "idle", 3600, is_superuser=None, usename="boss")
    snap = snapshot([unknown, boss], roles=[role("app"), role("boss", is_superuser=True)])
    result = plan(enforce(), snap, Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]
    assert skipped(result) == {2: "superuser (protect.superusers)"}


def test_superusers_terminated_only_when_policy_allows() -> None:
    policy = enforce(protect={"superusers": False})
    snap = snapshot([session(1, "idle", 3600, is_superuser=True)])
    assert pids(plan(policy, snap, Severity.CRITICAL, EMPTY, NOW)) == [1]


def test_own_session_never_terminated_even_without_protections() -> None:
    policy = enforce(protect={"superusers": False, "listeners": False})
    snap = snapshot([session(OWN_PID, "idle", 3600, is_superuser=None)], own_pid=OWN_PID)
    result = plan(policy, snap, Severity.CRITICAL, EMPTY, NOW)
    assert result.terminations == ()


def test_listeners_terminated_when_not_protected() -> None:
    policy = enforce(protect={"listeners": False})
    snap = snapshot([session(1, "idle", 3600, query="  listen jobs")])
    assert pids(plan(policy, snap, Severity.CRITICAL, EMPTY, NOW)) == [1]


def test_unix_socket_sessions_are_not_matched_by_cidrs() -> None:
    policy = enforce(protect={"clientCIDRs": ["0.0.0.0/0", "::/0"]})
    local = session(1, "idle", 3600, client_addr=None)
    remote = session(2, "idle", 3600, client_addr="203.0.113.9")
    result = plan(policy, snapshot([local, remote]), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]
    assert skipped(result) == {2: "protected client address 203.0.113.9 (in 0.0.0.0/0)"}


def test_protected_sessions_do_not_use_the_budget() -> None:
    policy = enforce(budget={"maxPerCycle": 1, "maxPerHour": 10})
    sessions = [session(1, "idle", 9999, is_superuser=True), session(2, "idle", 700)]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [2]
    assert not result.budget_exhausted


def test_secret_bearing_queries_are_not_copied_into_evidence() -> None:
    leaky = session(1, "idle", 3600, query="ALTER ROLE app PASSWORD 'hunter2'")
    result = plan(enforce(), snapshot([leaky]), Severity.CRITICAL, EMPTY, NOW)
    assert "hunter2" not in json.dumps(result.terminations[0].evidence)


def test_mode_off_plans_nothing_at_all() -> None:
    policy = enforce(mode="Off", limits={"roles": [{"name": "app", "connectionLimit": 5}]})
    snap = snapshot([session(1, "idle", 3600)], roles=[role("app")])
    result = plan(policy, snap, Severity.CRITICAL, EMPTY, NOW)
    assert result.actions == ()
    assert result.skipped == ()
    assert result.originals == {}


def test_dry_run_plans_exactly_what_enforce_would() -> None:
    limits = {"roles": [{"name": "app", "connectionLimit": 5}]}
    snap = snapshot([session(1, "idle", 3600)], roles=[role("app")])
    enforced = plan(enforce(limits=limits), snap, Severity.CRITICAL, EMPTY, NOW)
    dry = plan(enforce(limits=limits, mode="DryRun"), snap, Severity.CRITICAL, EMPTY, NOW)
    assert dry == enforced
    assert len(dry.actions) == 2


# ---- limits --------------------------------------------------------------------------------


def test_role_limits_emit_only_differences_and_record_originals() -> None:
    policy = enforce(
        limits={
            "roles": [
                {
                    "name": "app",
                    "connectionLimit": 50,
                    "idleInTransactionSessionTimeout": "60s",
                    "idleSessionTimeout": "10m",
                    "statementTimeout": "30s",
                }
            ]
        }
    )
    app = role(
        "app",
        -1,
        config={
            "idle_in_transaction_session_timeout": "1min",  # same as 60s
            "statement_timeout": "5s",
        },
    )
    result = plan(policy, snapshot(roles=[app]), Severity.HEALTHY, EMPTY, NOW)
    assert result.changes == (
        SetRoleConnectionLimit(
            "app", 50, -1, reason="limits.roles[app].connectionLimit is 50; the server has -1"
        ),
        SetRoleSetting(
            "app",
            "idle_session_timeout",
            "600s",
            None,
            reason="limits.roles[app] wants idle_session_timeout 10m; the role has none set",
        ),
        SetRoleSetting(
            "app",
            "statement_timeout",
            "30s",
            "5s",
            reason="limits.roles[app] wants statement_timeout 30s; the role has 5s",
        ),
    )
    assert result.originals == {
        "role:app:connection_limit": "-1",
        "role:app:idle_session_timeout": None,
        "role:app:statement_timeout": "5s",
    }
    assert [c.action for c in result.changes] == ["alter_role"] * 3
    assert result.changes[0].target == 'role "app"'


@pytest.mark.parametrize("stored", ["30s", "30000", "30000ms", "0.5min", " 30 s "])
def test_role_setting_equal_in_any_postgres_spelling_is_left_alone(stored: str) -> None:
    policy = enforce(limits={"roles": [{"name": "app", "statementTimeout": "30s"}]})
    app = role("app", config={"statement_timeout": stored})
    assert plan(policy, snapshot(roles=[app]), Severity.HEALTHY, EMPTY, NOW).actions == ()


def test_sub_second_role_timeout_is_written_in_milliseconds() -> None:
    policy = enforce(limits={"roles": [{"name": "app", "statementTimeout": "1500ms"}]})
    result = plan(policy, snapshot(roles=[role("app")]), Severity.HEALTHY, EMPTY, NOW)
    assert [(c.setting, c.value) for c in result.changes] == [("statement_timeout", "1500ms")]


def test_originals_already_recorded_are_not_recorded_again() -> None:
    policy = enforce(limits={"roles": [{"name": "app", "connectionLimit": 50}]})
    history = PlanHistory(originals={"role:app:connection_limit": "-1"})
    drifted = snapshot(roles=[role("app", 80)])  # someone changed it by hand
    result = plan(policy, drifted, Severity.HEALTHY, history, NOW)
    assert [(c.limit, c.previous) for c in result.changes] == [(50, 80)]
    assert result.originals == {}


def test_missing_role_and_database_become_clear_recommendations() -> None:
    policy = enforce(
        limits={
            "roles": [{"name": "ghost", "connectionLimit": 5}],
            "databases": [{"name": "nowhere", "connectionLimit": 5}],
        }
    )
    result = plan(policy, snapshot(), Severity.HEALTHY, EMPTY, NOW)
    assert result.changes == ()
    texts = [r.text for r in result.recommendations]
    assert texts == [
        'role "ghost" does not exist on the server: its limits are not applied '
        "(create the role, or remove it from spec.limits.roles)",
        'database "nowhere" does not exist on the server: its connection limit is not '
        "applied (create it, or remove it from spec.limits.databases)",
    ]
    assert [r.target for r in result.recommendations] == ['role "ghost"', 'database "nowhere"']
    assert all(r.action == "recommend" for r in result.recommendations)


def test_idle_session_timeout_on_postgres_13_is_recommended_not_applied() -> None:
    policy = enforce(limits={"roles": [{"name": "app", "idleSessionTimeout": "10m"}]})
    result = plan(
        policy, snapshot(roles=[role("app")], version_num=130010), Severity.HEALTHY, EMPTY, NOW
    )
    assert result.changes == ()
    assert [r.setting for r in result.recommendations] == ["idle_session_timeout"]
    assert "needs PostgreSQL 14+" in result.recommendations[0].text


def test_database_limit_difference() -> None:
    policy = enforce(limits={"databases": [{"name": "shop", "connectionLimit": 150}]})
    same = plan(policy, snapshot(databases=[database("shop", 150)]), Severity.HEALTHY, EMPTY, NOW)
    assert same.actions == ()
    other = plan(policy, snapshot(databases=[database("shop", -1)]), Severity.HEALTHY, EMPTY, NOW)
    assert other.changes == (
        SetDatabaseConnectionLimit(
            "shop",
            150,
            -1,
            reason="limits.databases[shop].connectionLimit is 150; the server has -1",
        ),
    )
    assert other.changes[0].action == "alter_database"
    assert other.originals == {"database:shop:connection_limit": "-1"}


def test_server_settings_compare_value_times_unit() -> None:
    policy = enforce(
        limits={
            "server": {
                "idleInTransactionSessionTimeout": "300s",
                "tcpKeepalivesIdle": 60,
                "tcpKeepalivesInterval": 10,
                "tcpKeepalivesCount": 6,
                "clientConnectionCheckInterval": "30s",
            }
        }
    )
    already = settings(
        idle_in_transaction_session_timeout=("300000", "ms"),
        tcp_keepalives_idle=("60", "s"),
        tcp_keepalives_interval=("10", "s"),
        tcp_keepalives_count="6",
        client_connection_check_interval=("30000", "ms"),
    )
    assert (
        plan(policy, snapshot(server_settings=already), Severity.HEALTHY, EMPTY, NOW).actions == ()
    )
    fresh = plan(policy, snapshot(server_settings=MANAGED_SETTINGS), Severity.HEALTHY, EMPTY, NOW)
    assert [(c.setting, c.value, c.previous) for c in fresh.changes] == [
        ("idle_in_transaction_session_timeout", "300s", "0"),
        ("tcp_keepalives_idle", "60s", "0"),
        ("tcp_keepalives_interval", "10s", "0"),
        ("tcp_keepalives_count", "6", "0"),
        ("client_connection_check_interval", "30s", "0"),
    ]
    assert all(c.action == "alter_system" for c in fresh.changes)
    assert fresh.originals["system:tcp_keepalives_idle"] == "0"


def test_setting_that_needs_a_restart_is_recommended_never_altered() -> None:
    policy = enforce(limits={"server": {"idleInTransactionSessionTimeout": "5m"}})
    odd = {
        "idle_in_transaction_session_timeout": Setting(
            "idle_in_transaction_session_timeout", "0", "ms", "postmaster"
        )
    }
    result = plan(policy, snapshot(server_settings=odd), Severity.HEALTHY, EMPTY, NOW)
    assert result.changes == ()
    assert "context postmaster" in result.recommendations[0].text


def test_setting_the_server_does_not_report_is_recommended() -> None:
    policy = enforce(limits={"server": {"clientConnectionCheckInterval": "30s"}})
    result = plan(policy, snapshot(server_settings={}), Severity.HEALTHY, EMPTY, NOW)
    assert result.changes == ()
    assert result.recommendations[0].setting == "client_connection_check_interval"
    old = plan(
        policy, snapshot(server_settings={}, version_num=130000), Severity.HEALTHY, EMPTY, NOW
    )
    assert "needs PostgreSQL 14+" in old.recommendations[0].text


def test_restart_only_settings_are_only_recommended() -> None:
    policy = enforce(
        limits={
            "server": {
                "maxConnections": 200,
                "superuserReservedConnections": 3,
                "reservedConnections": 2,
            }
        }
    )
    result = plan(policy, snapshot(max_connections=100), Severity.HEALTHY, EMPTY, NOW)
    assert result.changes == ()
    assert [r.setting for r in result.recommendations] == [
        "max_connections",
        "reserved_connections",
    ]
    assert result.recommendations[0].text == (
        "max_connections is 100 and the policy asks for 200; it needs a restart, so pgrelief "
        "does not apply it: ALTER SYSTEM SET max_connections = 200; then restart PostgreSQL"
    )
    pg15 = plan(policy, snapshot(version_num=150004), Severity.HEALTHY, EMPTY, NOW)
    assert "needs PostgreSQL 16+" in pg15.recommendations[-1].text


def test_limits_apply_whatever_the_pressure() -> None:
    policy = enforce(limits={"databases": [{"name": "shop", "connectionLimit": 1}]})
    snap = snapshot(databases=[database("shop")])
    for pressure in Severity:
        assert len(plan(policy, snap, pressure, EMPTY, NOW).changes) == 1


def test_second_cycle_after_applying_emits_nothing() -> None:
    policy = spec(
        remediation={"mode": "Enforce"},
        limits={
            "roles": [
                {
                    "name": 'we"ird; role',
                    "connectionLimit": 7,
                    "statementTimeout": "1500ms",
                    "idleSessionTimeout": "1h",
                }
            ],
            "databases": [{"name": "dätä base", "connectionLimit": 3}],
            "server": {"tcpKeepalivesIdle": 60, "idleInTransactionSessionTimeout": "5m"},
        },
    )
    before = snapshot(
        roles=[role('we"ird; role')],
        databases=[database("dätä base")],
        server_settings=MANAGED_SETTINGS,
    )
    first = plan(policy, before, Severity.HEALTHY, EMPTY, NOW)
    assert len(first.changes) == 6
    after = apply_changes(before, first.changes)
    assert (
        plan(policy, after, Severity.HEALTHY, PlanHistory(originals=first.originals), NOW).actions
        == ()
    )


def test_hostile_names_are_quoted_in_targets_and_sql_text() -> None:
    name = 'x"; DROP ROLE postgres; --'
    policy = enforce(
        limits={"roles": [{"name": name, "connectionLimit": 1, "statementTimeout": "1s"}]}
    )
    result = plan(policy, snapshot(roles=[role(name)]), Severity.HEALTHY, EMPTY, NOW)
    limit, setting = result.changes
    assert limit.target == 'role "x""; DROP ROLE postgres; --"'
    assert limit.sql_text == 'ALTER ROLE "x""; DROP ROLE postgres; --" CONNECTION LIMIT 1;'
    assert setting.sql_text == (
        'ALTER ROLE "x""; DROP ROLE postgres; --" SET statement_timeout = \'1s\';'
    )
    assert limit.role == name


# ---- revert --------------------------------------------------------------------------------


def test_revert_restores_recorded_originals_and_skips_what_is_back() -> None:
    originals = {
        "role:app:connection_limit": "-1",
        "role:app:statement_timeout": "5s",
        "role:app:idle_session_timeout": None,
        "role:calm:connection_limit": "4",
        "database:shop:connection_limit": "-1",
        "system:tcp_keepalives_idle": "0",
        "system:idle_in_transaction_session_timeout": "0",
    }
    current = snapshot(
        roles=[
            role("app", 50, config={"statement_timeout": "30s", "idle_session_timeout": "600s"}),
            role("calm", 4),
        ],
        databases=[database("shop", 150)],
        server_settings=settings(
            tcp_keepalives_idle=("60", "s"), idle_in_transaction_session_timeout=("0", "ms")
        ),
    )
    result = plan_revert(enforce(), current, originals)
    # Not "(limits.onDelete Keep)": `run --revert` reverts whatever onDelete says.
    why = "revert to the value found before pgrelief changed it"
    assert result.actions == (
        SetRoleConnectionLimit("app", -1, 50, why),
        SetRoleSetting("app", "statement_timeout", "5s", "30s", why),
        SetRoleSetting("app", "idle_session_timeout", None, "600s", why),
        SetDatabaseConnectionLimit("shop", -1, 150, why),
        SetSystemSetting("tcp_keepalives_idle", "0", "60s", why),
    )
    assert result.originals == {}
    reverted = apply_changes(current, result.changes)
    assert plan_revert(enforce(), reverted, originals).actions == ()


def test_a_setting_without_an_alter_system_value_is_recorded_as_none_and_reset() -> None:
    def keepalives(value: str, source: str, sourcefile: str | None) -> Snapshot:
        found = Setting("tcp_keepalives_idle", value, "s", "user", source, sourcefile)
        return snapshot(server_settings={"tcp_keepalives_idle": found})

    spec_ = enforce(limits={"server": {"tcpKeepalivesIdle": 60}})
    # From postgresql.conf or the default: nothing explicit to put back, so RESET.
    for before in (
        keepalives("0", "default", None),
        keepalives("7200", "configuration file", "/etc/postgresql/postgresql.conf"),
    ):
        applied = plan(spec_, before, Severity.HEALTHY, EMPTY, NOW)
        assert applied.originals == {"system:tcp_keepalives_idle": None}
    after = keepalives("60", "configuration file", "/data/postgresql.auto.conf")
    (reset,) = plan_revert(spec_, after, {"system:tcp_keepalives_idle": None}).actions
    assert reset == SetSystemSetting(
        "tcp_keepalives_idle",
        None,
        "60s",
        "revert to the value found before pgrelief changed it (it had no ALTER SYSTEM value: "
        "RESET)",
    )
    back = keepalives("0", "default", None)
    assert plan_revert(spec_, back, {"system:tcp_keepalives_idle": None}).actions == ()
    # An earlier ALTER SYSTEM value, or one whose origin is not visible, is put back as it was.
    for before in (
        keepalives("30", "configuration file", "/data/postgresql.auto.conf"),
        keepalives("30", "configuration file", None),
    ):
        applied = plan(spec_, before, Severity.HEALTHY, EMPTY, NOW)
        assert applied.originals == {"system:tcp_keepalives_idle": "30s"}


def test_revert_of_a_role_that_is_gone_is_reported() -> None:
    result = plan_revert(enforce(), snapshot(), {"role:gone:connection_limit": "3"})
    (only,) = result.actions
    assert isinstance(only, Recommendation)
    assert only.text.startswith('cannot revert role "gone"')


def test_history_keys_round_trip_names_with_colons() -> None:
    key = role_key("a:b:c", "statement_timeout")
    assert parse_key(key) == ("role", "a:b:c", "statement_timeout")
    assert parse_key("database:x:y:connection_limit") == ("database", "x:y", "connection_limit")
    assert parse_key("system:work_mem") == ("system", "", "work_mem")
    assert parse_key("bogus") is None


def test_revert_puts_back_a_role_name_with_colons() -> None:
    originals = {role_key("svc:api", "connection_limit"): "2"}
    result = plan_revert(enforce(), snapshot(roles=[role("svc:api", 9)]), originals)
    assert [(a.role, a.limit) for a in result.actions] == [("svc:api", 2)]
