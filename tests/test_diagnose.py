"""diagnose on hand-built snapshots: exact counts, findings, pids and the key fix texts."""

from __future__ import annotations

import gc
import json
import random

import pytest

from pgrelief import advice
from pgrelief.diagnose import DiagnoseOptions, OptionsError, diagnose, diagnose_refusal
from pgrelief.diagnose._counting import _oldest_per_value
from pgrelief.diagnosis import (
    ADVICE,
    DURABLE_SQL,
    EMERGENCY_SQL,
    LEAKED_IDLE,
    LONG_RUNNING,
    MEMORY_OVERCOMMIT,
    NO_POOLER,
    ORM,
    PGBOUNCER,
    RESERVED_ACCESS,
    ROLE_MONOPOLY,
    SATURATION,
    TRAFFIC_SPIKE,
    Diagnosis,
    Finding,
    Severity,
)
from pgrelief.diagnosis import IDLE_IN_TRANSACTION as STUCK
from pgrelief.sizing import GB, MB
from tests.factories import (
    ACTIVE,
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    DatabaseInfo,
    RoleInfo,
    background,
    many,
    session,
    setting,
    settings,
    snapshot,
)


def _kinds(diagnosis: Diagnosis) -> list[str]:
    return [f.kind for f in diagnosis.findings]


def _only(diagnosis: Diagnosis, kind: str) -> Finding:
    found = [f for f in diagnosis.findings if f.kind == kind]
    assert len(found) == 1, _kinds(diagnosis)
    return found[0]


def _fix_text(finding: Finding, kind: str, contains: str = "") -> str:
    texts = [fix.text for fix in finding.fixes if fix.kind == kind and contains in fix.text]
    assert texts, [(fix.kind, fix.title) for fix in finding.fixes]
    return texts[0]


# --- counting ---------------------------------------------------------------------------------


def test_healthy_server_has_no_findings() -> None:
    d = diagnose(snapshot([*many(3, 100, IDLE), session(200, ACTIVE, state_age=0.1)]))
    assert d.status == Severity.HEALTHY
    assert d.pressure == Severity.HEALTHY
    assert d.findings == ()
    assert d.totals.client_backends == 4
    assert d.totals.by_state == {"idle": 3, "active": 1}
    assert d.server is not None
    assert d.server.usable_slots == 97
    assert d.totals.utilization_percent == pytest.approx(4 * 100 / 97)


def test_breakdowns_count_every_client_backend_once() -> None:
    sessions = [
        *many(3, 100, IDLE, usename="app", application_name="api", client_addr="10.0.0.1"),
        *many(2, 110, ACTIVE, usename="app", application_name="api", client_addr="10.0.0.2"),
        session(120, IDLE_IN_TRANSACTION, usename="etl", application_name="", client_addr=None),
        session(121, None, usename="other", application_name="x", datname="db2"),
        background(1),
        background(2, "walsender"),
        background(3, "checkpointer"),
    ]
    d = diagnose(snapshot(sessions))
    assert d.totals.client_backends == 7
    assert d.totals.other_backends == 3
    assert d.totals.by_state == {"idle": 3, "active": 2, "idle in transaction": 1, "unknown": 1}
    by_user = [(g.key, g.count, g.by_state) for g in d.breakdown.by_user]
    assert by_user == [
        ("app", 5, {"idle": 3, "active": 2}),
        ("etl", 1, {"idle in transaction": 1}),
        ("other", 1, {"unknown": 1}),
    ]
    assert [(g.key, g.count) for g in d.breakdown.by_application] == [
        ("api", 5),
        ("", 1),
        ("x", 1),
    ]
    assert [(g.key, g.count) for g in d.breakdown.by_client_addr] == [
        ("10.0.0.1", 4),
        ("10.0.0.2", 2),
        ("local socket", 1),
    ]
    assert [(g.key, g.count) for g in d.breakdown.by_database] == [("appdb", 6), ("db2", 1)]


def test_group_oldest_state_age_is_the_oldest_session_in_any_state() -> None:
    sessions = [
        session(1, IDLE, state_age=50),
        session(2, ACTIVE, state_age=700),
        session(3, IDLE, state_age=None, timestamps=False),
    ]
    group = diagnose(snapshot(sessions)).breakdown.by_user[0]
    assert group.oldest_state_age_s == 700
    assert group.to_json()["oldest_state_age_s"] == 700


def test_own_session_counts_in_totals_but_is_never_a_candidate() -> None:
    sessions = [
        *many(2, 100, IDLE_IN_TRANSACTION, state_age=600),
        session(999, IDLE_IN_TRANSACTION, usename="pgrelief", state_age=600),
    ]
    d = diagnose(snapshot(sessions, own_pid=999))
    assert d.totals.client_backends == 3
    finding = _only(d, STUCK)
    assert finding.pids == (100, 101)
    assert "999" not in _fix_text(finding, EMERGENCY_SQL)


# --- pressure and saturation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clients", "pressure"),
    [
        (13, Severity.HEALTHY),  # 13/20 = 65%
        (14, Severity.WARNING),  # 70% exactly
        (17, Severity.WARNING),  # 85%
        (18, Severity.CRITICAL),  # 90% exactly
        (20, Severity.CRITICAL),  # all usable slots taken
    ],
)
def test_pressure_thresholds(clients: int, pressure: Severity) -> None:
    d = diagnose(snapshot(many(clients, 100, ACTIVE, state_age=0.1), max_connections=23))
    assert d.server is not None
    assert d.server.usable_slots == 20
    assert d.pressure == pressure
    saturation = d.finding(SATURATION)
    if pressure == Severity.HEALTHY:
        assert saturation is None
    else:
        assert saturation is not None
        assert saturation.severity == pressure


def test_saturation_evidence_and_fixes() -> None:
    sessions = [*many(19, 100, IDLE, state_age=5), background(1)]
    d = diagnose(snapshot(sessions, max_connections=25, superuser_reserved=3, reserved=2))
    finding = _only(d, SATURATION)
    assert finding.severity == Severity.CRITICAL
    assert finding.summary == ("19 client backends hold 95% of the 20 usable connection slots")
    assert finding.evidence[0] == (
        "usable slots 20 = max_connections 25 − superuser_reserved_connections 3 − "
        "reserved_connections 2"
    )
    assert finding.evidence[1] == (
        "19 client backends = 95.0% of usable slots (warning at 70%, critical at 90%); "
        "1 left for ordinary roles"
    )
    assert finding.evidence[2] == "by state: 19 idle"
    assert any("1 other backends" in line and "own pools" in line for line in finding.evidence)
    assert _fix_text(finding, EMERGENCY_SQL) == advice.DIAGNOSTIC_QUERIES
    assert finding.pids == ()
    # More emergency slots for next time: said once, by the reserved_access finding.
    assert not [f for f in finding.fixes if f.kind == DURABLE_SQL]
    reserved = _only(d, RESERVED_ACCESS)
    assert "superuser_reserved_connections = '5'" in _fix_text(reserved, DURABLE_SQL)


def test_full_server_says_ordinary_roles_are_refused() -> None:
    d = diagnose(snapshot(many(20, 100, IDLE), max_connections=23))
    assert _only(d, SATURATION).summary.endswith(
        ": new connections from ordinary roles are refused ('too many clients')"
    )
    assert d.status == Severity.CRITICAL


def test_no_usable_slots_is_critical_without_dividing_by_zero() -> None:
    d = diagnose(snapshot([], max_connections=3, superuser_reserved=3))
    assert d.totals.utilization_percent == 100.0
    assert d.pressure == Severity.CRITICAL


def test_assumed_settings_are_named_in_the_evidence() -> None:
    snap = snapshot(many(90, 100, IDLE))
    snap = type(snap)(
        taken_at=snap.taken_at,
        server=type(snap.server)(
            version_num=None,
            max_connections=100,
            superuser_reserved_connections=3,
            reserved_connections=0,
            assumed=("max_connections", "superuser_reserved_connections"),
        ),
        sessions=snap.sessions,
    )
    finding = _only(diagnose(snap), SATURATION)
    assert any(
        line.startswith(
            "not observed, PostgreSQL defaults assumed: max_connections, "
            "superuser_reserved_connections"
        )
        for line in finding.evidence
    )


def test_role_at_its_connection_limit_is_critical() -> None:
    hostile = 'we"ird role'
    sessions = [
        *many(5, 100, IDLE, usename=hostile),
        *many(2, 200, IDLE, usename="boss"),
        *many(4, 300, IDLE, usename="near", datname="small"),
    ]
    roles = [
        RoleInfo(hostile, 5),
        RoleInfo("boss", 1, is_superuser=True),  # not enforced for superusers
        RoleInfo("unused", 0),
    ]
    databases = [DatabaseInfo("small", 5)]
    d = diagnose(snapshot(sessions, roles=roles, databases=databases))
    finding = _only(d, SATURATION)
    assert finding.severity == Severity.CRITICAL
    assert d.status == Severity.CRITICAL
    assert finding.summary == "role 'we\"ird role' at its own CONNECTION LIMIT"
    assert finding.evidence == (
        "role 'we\"ird role': 5 client backends, CONNECTION LIMIT 5: its new connections get "
        '\'too many connections for role "we"ird role"\'',
        "database 'small': 4 client backends, 80% of its CONNECTION LIMIT 5",
    )
    raised = _fix_text(finding, DURABLE_SQL, "alter role")
    assert raised.endswith('alter role "we""ird role" connection limit 7;')
    assert _fix_text(finding, DURABLE_SQL, "alter database").endswith(
        "alter database small connection limit 7;"
    )


# --- idle in transaction -----------------------------------------------------------------------


def test_idle_in_transaction_finding() -> None:
    hostile = 'we"ird role'
    sessions = [
        session(
            10,
            IDLE_IN_TRANSACTION,
            usename=hostile,
            application_name="checkout",
            state_age=600,
            query="update stock set n = n - 1",
        ),
        session(
            11,
            IDLE_IN_TRANSACTION_ABORTED,
            usename=hostile,
            application_name="checkout",
            state_age=900,
        ),
        session(12, IDLE_IN_TRANSACTION, usename="app", application_name="api", state_age=60),
        session(13, IDLE_IN_TRANSACTION, usename="app", application_name="api", state_age=59.9),
        session(14, IDLE_IN_TRANSACTION, usename="app", state_age=None, timestamps=False),
    ]
    d = diagnose(snapshot(sessions))
    finding = _only(d, STUCK)
    assert finding.severity == Severity.WARNING
    assert finding.pids == (11, 10, 12)  # oldest first; below threshold and unknown age left out
    assert finding.summary == (
        "3 sessions idle in transaction for ≥ 1m0s (1 aborted): they hold slots, locks and "
        "back vacuum's xmin horizon"
    )
    assert finding.evidence[:2] == (
        "idle in transaction: 2, oldest idle 10m0s, oldest transaction open 10m1s",
        "aborted (never rolled back): 1, oldest idle 15m0s, oldest transaction open 15m1s",
    )
    assert finding.evidence[2] == (
        "user 'we\"ird role', application 'checkout': 2 (1 aborted), oldest idle 15m0s, "
        "last query: 'select 1'"
    )
    emergency = _fix_text(finding, EMERGENCY_SQL)
    assert (
        "(11, '2025-03-14 11:43:58.623456+00:00'::timestamptz, 'idle in transaction (aborted)'"
        in emergency
    )
    assert "(10, " in emergency and "(12, " in emergency and "(13, " not in emergency
    roles = _fix_text(finding, DURABLE_SQL, "alter role")
    assert roles.splitlines()[1:] == [
        'alter role "we""ird role" set idle_in_transaction_session_timeout = \'1min\';',
        "alter role app set idle_in_transaction_session_timeout = '1min';",
    ]
    server = _fix_text(finding, DURABLE_SQL, "alter system")
    assert server == (
        "-- currently disabled (0)\n"
        "alter system set idle_in_transaction_session_timeout = '5min';\n"
        "select pg_reload_conf();"
    )
    assert any(fix.kind == ORM for fix in finding.fixes)


def test_server_timeout_already_set_is_not_repeated() -> None:
    sessions = many(2, 10, IDLE_IN_TRANSACTION, state_age=120)
    server_settings = settings(setting("idle_in_transaction_session_timeout", "300000", "ms"))
    finding = _only(diagnose(snapshot(sessions, server_settings=server_settings)), STUCK)
    assert not [f for f in finding.fixes if "alter system" in f.text]


def test_many_sessions_are_listed_up_to_the_cap_then_covered_by_pattern() -> None:
    sessions = many(150, 1000, IDLE_IN_TRANSACTION, state_age=600)
    finding = _only(diagnose(snapshot(sessions, max_connections=500)), STUCK)
    assert len(finding.pids) == 150
    text = _fix_text(finding, EMERGENCY_SQL)
    assert text.count("::timestamptz, 'idle in transaction'") == advice.MAX_LISTED
    assert "-- 50 more match the same pattern" in text
    assert (
        "  and state in ('idle in transaction', 'idle in transaction (aborted)')\n"
        "  and state_change < now() - interval '60 seconds'\n"
    ) in text
    # The pattern part spares what `pgrelief run` spares by default, checked when it runs.
    assert text.endswith(
        "  and usesysid not in (select oid from pg_roles where rolsuper)\n"
        "  and query !~* '^[[:space:]]*listen[[:space:]]';"
    )


# --- leaked idle -------------------------------------------------------------------------------


def test_leaked_idle_is_grouped_by_application_and_client() -> None:
    long_query = "SELECT * FROM orders WHERE customer_id = $1 AND status = 'open' " + "x" * 100
    sessions = [
        *many(
            4,
            100,
            IDLE,
            application_name="PostgreSQL JDBC Driver",
            client_addr="10.0.0.5",
            state_age=7200,
            query=long_query,
        ),
        session(
            104,
            IDLE,
            application_name="PostgreSQL JDBC Driver",
            client_addr="10.0.0.5",
            state_age=10800,
            query=long_query,
        ),
        *many(2, 200, IDLE, usename="cron", application_name="", client_addr=None, state_age=1800),
        session(300, IDLE, state_age=1799),
    ]
    finding = _only(diagnose(snapshot(sessions)), LEAKED_IDLE)
    assert finding.pids == (104, 100, 101, 102, 103, 200, 201)
    assert finding.summary == (
        "7 sessions idle for ≥ 30m0s from 2 application/client group(s): the pattern of "
        "leaked connections"
    )
    sample = long_query[:80]
    assert finding.evidence == (
        "application 'PostgreSQL JDBC Driver' from 10.0.0.5: 5 idle ≥ 30m0s, oldest idle 3h0m, "
        f"user(s) 'app'; last query: {sample!r}",
        "application (none) from local socket: 2 idle ≥ 30m0s, oldest idle 30m0s, "
        "user(s) 'cron'; last query: 'select 1'",
    )
    keepalives = _fix_text(finding, DURABLE_SQL, "tcp_keepalives_idle")
    assert "alter system set tcp_keepalives_idle = '60';" in keepalives
    assert "alter system set tcp_keepalives_interval = '10';" in keepalives
    assert "alter system set tcp_keepalives_count = '6';" in keepalives
    assert "alter system set client_connection_check_interval = '30s';" in keepalives
    assert keepalives.endswith("select pg_reload_conf();")
    idle_timeout = _fix_text(finding, DURABLE_SQL, "idle_session_timeout")
    assert "alter role app set idle_session_timeout = '30min';" in idle_timeout
    assert "alter role cron set idle_session_timeout = '30min';" in idle_timeout
    hikari = _fix_text(finding, ORM)
    assert "spring.datasource.hikari.leak-detection-threshold=60000" in hikari
    # role 'app' may hold (97 - 10 headroom) / 2 roles = 43; the JDBC application holds 5 of
    # its 6 sessions -> 35, from one client address
    assert "spring.datasource.hikari.maximum-pool-size=35" in hikari


def test_leaked_idle_advice_follows_the_server_version() -> None:
    sessions = many(2, 100, IDLE, state_age=3600)
    old = _only(diagnose(snapshot(sessions, version_num=130011)), LEAKED_IDLE)
    assert not [f for f in old.fixes if "idle_session_timeout" in f.text]
    assert "client_connection_check_interval" not in _fix_text(old, DURABLE_SQL, "keepalives")
    unknown = _only(diagnose(snapshot(sessions, version_num=None)), LEAKED_IDLE)
    assert _fix_text(unknown, DURABLE_SQL, "idle_session_timeout").startswith(
        "-- PostgreSQL 14+ (version not observed: check first)"
    )


def test_sessions_without_ages_are_never_judged_leaked() -> None:
    d = diagnose(snapshot(many(5, 100, IDLE, state_age=None, timestamps=False)))
    assert d.finding(LEAKED_IDLE) is None
    assert d.totals.by_state == {"idle": 5}


def test_stack_option_forces_the_orm_advice() -> None:
    sessions = many(3, 100, IDLE, application_name="PostgreSQL JDBC Driver", state_age=3600)
    forced = diagnose(snapshot(sessions), DiagnoseOptions(stack="django"))
    orm = [f for f in _only(forced, LEAKED_IDLE).fixes if f.kind == ORM]
    assert [f.title for f in orm] == ["django pool settings (leak detection and recycling)"]
    assert "CONN_MAX_AGE" in orm[0].text
    guessed = diagnose(snapshot(many(3, 100, IDLE, application_name="sidekiq", state_age=3600)))
    assert "reaping_frequency: 60" in _fix_text(_only(guessed, LEAKED_IDLE), ORM)
    unknown = diagnose(snapshot(many(3, 100, IDLE, application_name="svc", state_age=3600)))
    brief = _fix_text(_only(unknown, LEAKED_IDLE), ORM)
    assert all(name in brief for name in ("SQLAlchemy", "Django", "Rails", "HikariCP"))


# --- long running, traffic spike ---------------------------------------------------------------


def test_long_running_cancels_before_terminating() -> None:
    sessions = [
        session(10, ACTIVE, usename="report", state_age=900, query="select big()"),
        session(
            11,
            ACTIVE,
            usename="report",
            state_age=301,
            wait_event_type="Lock",
            wait_event="relation",
        ),
        session(12, ACTIVE, state_age=299),
    ]
    finding = _only(diagnose(snapshot(sessions)), LONG_RUNNING)
    assert finding.pids == (10, 11)
    assert finding.evidence[0] == (
        "pid 10, user 'report', application 'web': running 15m0s, not waiting; "
        "query: 'select big()'"
    )
    assert "waiting on Lock:relation" in finding.evidence[1]
    cancel, terminate = (f.text for f in finding.fixes if f.kind == EMERGENCY_SQL)
    assert "pg_cancel_backend(pid)" in cancel
    assert "(pid, backend_start, state, query_start)" in cancel
    assert "pg_terminate_backend(pid)" in terminate
    assert _fix_text(finding, DURABLE_SQL).endswith(
        "alter role report set statement_timeout = '5min';"
    )


def test_traffic_spike_counts_lock_waiters() -> None:
    sessions = [
        *many(6, 100, ACTIVE, state_age=2, wait_event_type="Lock", wait_event="transactionid"),
        *many(3, 200, ACTIVE, state_age=1, usename="batch"),
        *many(3, 300, IDLE),
    ]
    d = diagnose(snapshot(sessions, max_connections=23))  # 20 usable: threshold max(5, 8) = 8
    finding = _only(d, TRAFFIC_SPIKE)
    assert finding.severity == Severity.WARNING  # 9 of 20 = 45% < critical 90%
    assert finding.summary == (
        "9 sessions active at once (45% of usable slots), 6 of them waiting (6 on locks): "
        "a traffic spike or a pile-up"
    )
    assert finding.evidence[0] == "9 active ≥ threshold 8 = max(5, 40% of 20 usable slots)"
    assert finding.evidence[1] == (
        "waiting: 6 (lock waiters, wait_event_type 'Lock': 6); top wait events: "
        "Lock:transactionid ×6"
    )
    assert len(finding.pids) == 9
    assert _fix_text(finding, EMERGENCY_SQL) == advice.LOCK_WAITERS_QUERY
    assert "pool_mode = transaction" in _fix_text(finding, PGBOUNCER)
    # fair share of the busiest role: (20 - 3 headroom) / 2 roles = 8
    assert _fix_text(finding, DURABLE_SQL).endswith("alter role app connection limit 8;")
    assert "Do not raise max_connections" in _fix_text(finding, ADVICE)


def test_few_active_sessions_are_no_spike() -> None:
    d = diagnose(snapshot(many(4, 100, ACTIVE), max_connections=8))
    assert d.finding(TRAFFIC_SPIKE) is None


# --- monopoly ----------------------------------------------------------------------------------


def test_role_monopoly_limit_is_computed_and_quoted() -> None:
    hostile = "Big App"
    sessions = [
        *many(30, 100, IDLE, usename=hostile, application_name="rails web", client_addr="10.0.0.1"),
        *many(30, 200, IDLE, usename=hostile, application_name="rails web", client_addr="10.0.0.2"),
        *many(4, 300, ACTIVE, usename=hostile, application_name="rails web", state_age=0.5),
        *many(10, 400, IDLE, usename="other", application_name="cron"),
    ]
    d = diagnose(snapshot(sessions))
    finding = _only(d, ROLE_MONOPOLY)
    assert finding.summary == "role 'Big App' holds 64 of 74 client backends (86%)"
    assert len(finding.pids) == 64
    limit = _fix_text(finding, DURABLE_SQL)
    # half of (97 usable - 10 headroom) = 43, more than 4 active x 1.2
    assert limit.endswith('alter role "Big App" connection limit 43;')
    rails = _fix_text(finding, ORM)
    # 43 connections over the 2 client addresses of 'rails web' = 21 per instance
    assert "  pool: 21\n" in rails


def test_superuser_monopoly_gets_no_connection_limit() -> None:
    sessions = [*many(40, 100, IDLE, usename="postgres"), *many(5, 200, IDLE, usename="app")]
    finding = _only(
        diagnose(snapshot(sessions, roles=[RoleInfo("postgres", -1, is_superuser=True)])),
        ROLE_MONOPOLY,
    )
    assert not [f for f in finding.fixes if f.kind == DURABLE_SQL]
    assert "it is a superuser" in finding.evidence[-1]


def test_a_single_role_is_no_monopoly() -> None:
    d = diagnose(snapshot(many(60, 100, IDLE, application_name="api")))
    assert d.finding(ROLE_MONOPOLY) is None


def test_application_monopoly_across_roles() -> None:
    sessions = [
        *many(20, 100, IDLE, usename="a", application_name="celery"),
        *many(20, 200, IDLE, usename="b", application_name="celery"),
        *many(20, 300, IDLE, usename="c", application_name="web"),
    ]
    finding = _only(diagnose(snapshot(sessions)), ROLE_MONOPOLY)
    assert finding.summary == "application 'celery' holds 40 of 60 client backends (66%)"
    assert "DATABASES" in _fix_text(finding, ORM)


# --- no pooler ---------------------------------------------------------------------------------


def test_no_pooler_recommends_transaction_mode_and_names_session_users() -> None:
    sessions = [
        *many(40, 100, IDLE, application_name="web", state_age=5),
        *many(2, 200, IDLE, application_name="worker", query="LISTEN jobs", state_age=5),
        session(210, IDLE, application_name="locker", query="select pg_advisory_lock(1)"),
        session(300, ACTIVE, application_name="web", state_age=0.1),
    ]
    d = diagnose(snapshot(sessions))
    finding = _only(d, NO_POOLER)
    assert finding.severity == Severity.HEALTHY  # 44 of 97: no pressure yet
    assert finding.summary == (
        "44 client connections but only 1 active (2%): idle connections a pooler (PgBouncer) "
        "would share"
    )
    assert (
        "application 'locker' needs session mode or a direct connection: last statements show "
        "advisory lock (1 sessions)"
    ) in finding.evidence
    assert (
        "application 'worker' needs session mode or a direct connection: last statements show "
        "LISTEN (2 sessions)"
    ) in finding.evidence
    ini = _fix_text(finding, PGBOUNCER).splitlines()
    assert "pool_mode = transaction" in ini
    assert "appdb = host=127.0.0.1 port=5432 dbname=appdb" in ini
    # 3 session-feature sessions (+1) get a session-mode entry
    assert (
        "appdb_session = host=127.0.0.1 port=5432 dbname=appdb pool_mode=session pool_size=4" in ini
    )
    assert any("'locker', 'worker' use session features" in line for line in ini)
    # budget: 97 usable - (10 headroom + 3 session) = 84, one (db, user) pool -> capped at 50
    assert "default_pool_size = 50" in ini
    assert "max_db_connections = 84" in ini


def test_no_pooler_all_session_features_picks_session_mode() -> None:
    sessions = many(30, 100, IDLE, application_name="worker", query="LISTEN jobs")
    finding = _only(diagnose(snapshot(sessions)), NO_POOLER)
    assert "pool_mode = session" in _fix_text(finding, PGBOUNCER).splitlines()


def test_no_pooler_is_warning_under_pressure_and_absent_behind_a_pooler() -> None:
    busy = diagnose(snapshot(many(80, 100, IDLE)))
    assert _only(busy, NO_POOLER).severity == Severity.WARNING
    pooled = diagnose(snapshot(many(80, 100, IDLE, application_name="pgbouncer")))
    assert pooled.finding(NO_POOLER) is None
    active = diagnose(snapshot(many(30, 100, ACTIVE, state_age=0.1)))
    assert active.finding(NO_POOLER) is None


# --- memory ------------------------------------------------------------------------------------


def test_memory_overcommit_formula_and_safe_max_connections() -> None:
    server_settings = settings(
        setting("shared_buffers", "524288", "8kB"),  # 4GB
        setting("work_mem", "16384", "kB"),  # 16MB
        setting("temp_buffers", "1024", "8kB"),  # 8MB
        setting("maintenance_work_mem", "262144", "kB"),  # 256MB
        setting("autovacuum_work_mem", "-1", "kB"),
        setting("autovacuum_max_workers", "3"),
    )
    snap = snapshot(many(10, 100, IDLE), max_connections=500, server_settings=server_settings)
    d = diagnose(snap, DiagnoseOptions(memory_bytes=16 * GB))
    finding = _only(d, MEMORY_OVERCOMMIT)
    assert finding.severity == Severity.WARNING
    # 4GB + 500 x (10 + 32 + 8)MB + 3 x 256MB = 4096 + 25000 + 768 MB
    assert finding.summary == (
        "max_connections 500 can use up to 29.2GB in the worst case: more than the 16GB of RAM"
    )
    assert finding.evidence[0] == (
        "worst case = shared_buffers 4GB + max_connections 500 × (per-backend 10MB + 2 × "
        "work_mem 16MB + temp_buffers 8MB) + maintenance_work_mem 256MB × "
        "autovacuum_max_workers 3 = 29.2GB"
    )
    # (16384 - 1638.4 - 4864) / 50 = 197
    assert finding.evidence[1].endswith("/ 50MB = 197 connections")
    assert _fix_text(finding, DURABLE_SQL).startswith("alter system set max_connections = '197';")
    assert d.status == Severity.WARNING


def test_memory_that_fits_is_reported_healthy() -> None:
    d = diagnose(snapshot([], max_connections=100), DiagnoseOptions(memory_bytes=16 * GB))
    finding = _only(d, MEMORY_OVERCOMMIT)
    assert finding.severity == Severity.HEALTHY
    assert finding.summary.startswith("max_connections 100 fits in 16GB")
    assert "autovacuum_max_workers" in finding.evidence[-1]  # assumed defaults are named


def test_tiny_memory_advises_work_mem_not_a_useless_max_connections() -> None:
    server_settings = settings(setting("work_mem", "65536", "kB"))  # 64MB
    d = diagnose(
        snapshot([], max_connections=20, server_settings=server_settings),
        DiagnoseOptions(memory_bytes=2 * GB),
    )
    finding = _only(d, MEMORY_OVERCOMMIT)
    # (1536MB - 320MB fixed) / 146MB = 8 connections: too few to recommend
    assert finding.evidence[1].endswith("= 8 connections")
    assert not [f for f in finding.fixes if "max_connections =" in f.text]
    # (1216MB / 20 - 10MB - 8MB) / 2 = 21MB of work_mem fits all 20 connections
    assert "alter system set work_mem = '21MB';" in _fix_text(finding, DURABLE_SQL)


def test_large_work_mem_gets_both_ways_to_fit() -> None:
    server_settings = settings(setting("work_mem", "65536", "kB"))  # 64MB
    d = diagnose(
        snapshot([], max_connections=100, server_settings=server_settings),
        DiagnoseOptions(memory_bytes=4 * GB),
    )
    finding = _only(d, MEMORY_OVERCOMMIT)
    # (3584MB - 320MB) / 146MB = 22; or (3264MB / 100 - 18MB) / 2 = 7MB of work_mem
    assert _fix_text(finding, DURABLE_SQL, "max_connections").startswith(
        "alter system set max_connections = '22';"
    )
    assert "alter system set work_mem = '7MB';" in _fix_text(finding, DURABLE_SQL, "work_mem")


def test_no_memory_no_memory_finding() -> None:
    assert diagnose(snapshot(many(3, 1, IDLE))).finding(MEMORY_OVERCOMMIT) is None


# --- reserved access ---------------------------------------------------------------------------


def test_no_reserved_slots_is_a_warning() -> None:
    d = diagnose(snapshot(many(3, 1, IDLE), superuser_reserved=0))
    finding = _only(d, RESERVED_ACCESS)
    assert finding.severity == Severity.WARNING
    text = _fix_text(finding, DURABLE_SQL)
    assert "alter system set superuser_reserved_connections = '5';" in text
    assert "grant pg_use_reserved_connections to monitoring_role;" in text


def test_reserved_access_names_our_role_unless_superuser() -> None:
    sessions = [*many(80, 1, IDLE, state_age=5), session(999, ACTIVE, usename="Ops Bot")]
    d = diagnose(snapshot(sessions, own_pid=999))
    assert 'grant pg_use_reserved_connections to "Ops Bot";' in _fix_text(
        _only(d, RESERVED_ACCESS), DURABLE_SQL
    )
    superuser = [*many(80, 1, IDLE, state_age=5), session(999, ACTIVE, is_superuser=True)]
    text = _fix_text(
        _only(diagnose(snapshot(superuser, own_pid=999)), RESERVED_ACCESS), DURABLE_SQL
    )
    assert "monitoring_role" in text
    old = diagnose(snapshot(sessions, own_pid=999, version_num=150000))
    assert "pg_use_reserved_connections" not in repr(old.to_json())


# --- the server refused us ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "summary"),
    [
        ("FATAL:  sorry, too many clients already", "the server is full"),
        (
            "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER "
            "attribute",
            "only reserved connection slots are left",
        ),
        (
            'FATAL:  too many connections for role "o""neil"',
            "the role is at its own CONNECTION LIMIT",
        ),
        ('FATAL:  too many connections for database "shop"', "the database is at its own"),
        ("FATAL:  something else", "the server refused the connection for lack of slots"),
    ],
)
def test_refusal_is_a_critical_diagnosis(message: str, summary: str) -> None:
    d = diagnose_refusal(message)
    assert d.status == Severity.CRITICAL
    assert d.pressure == Severity.CRITICAL
    assert d.server is None
    assert d.totals.client_backends == 0
    finding = _only(d, SATURATION)
    assert finding.summary.startswith(summary)
    assert finding.evidence[0] == f"server said: {message}"
    texts = "\n".join(fix.text for fix in finding.fixes)
    assert "pg_use_reserved_connections" in texts
    assert "grant pg_use_reserved_connections to monitoring_role;" in texts
    assert "superuser_reserved_connections = '5'" in texts
    assert advice.DIAGNOSTIC_QUERIES in texts
    assert "pg_terminate_backend(pid)" in texts
    payload = json.loads(json.dumps(d.to_json()))
    assert payload["server"] is None
    assert payload["status"] == "critical"


def test_refusal_for_a_role_targets_that_role() -> None:
    # PostgreSQL prints the role name raw between double quotes.
    d = diagnose_refusal(
        'server at x refused the connection: FATAL:  too many connections for role "o\'n"eil"'
    )
    texts = [f.text for f in _only(d, SATURATION).fixes if "and usename =" in f.text]
    assert len(texts) == 1
    assert "\n  and usename = 'o''n\"eil'\n" in texts[0]


# --- options and JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warning_percent": 90, "critical_percent": 70},
        {"warning_percent": 0},
        {"idle_after_s": -1},
        {"memory_bytes": 0},
        {"stack": "hibernate"},
    ],
)
def test_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(OptionsError):
        DiagnoseOptions(**kwargs)  # type: ignore[arg-type]


def test_json_has_the_contract_keys() -> None:
    sessions = [
        *many(50, 100, IDLE, state_age=4000),
        *many(30, 200, IDLE_IN_TRANSACTION, state_age=100),
    ]
    d = diagnose(snapshot(sessions), DiagnoseOptions(memory_bytes=8 * GB))
    payload = json.loads(json.dumps(d.to_json()))
    assert set(payload) >= {"server", "totals", "breakdown", "findings"}
    assert set(payload["server"]) >= {
        "version_num",
        "max_connections",
        "superuser_reserved_connections",
        "reserved_connections",
        "usable_slots",
    }
    assert payload["totals"]["by_state"] == {"idle": 50, "idle in transaction": 30}
    assert set(payload["breakdown"]) == {
        "by_user",
        "by_application",
        "by_client_addr",
        "by_database",
    }
    for finding in payload["findings"]:
        assert set(finding) == {"kind", "severity", "summary", "evidence", "pids", "fixes"}
        assert all(set(fix) >= {"kind", "text"} for fix in finding["fixes"])
    kinds = [f["kind"] for f in payload["findings"]]
    assert kinds[0] == SATURATION  # critical first
    assert {LEAKED_IDLE, STUCK, NO_POOLER, MEMORY_OVERCOMMIT} <= set(kinds)


def test_findings_are_ordered_by_severity() -> None:
    sessions = [*many(95, 100, IDLE, state_age=4000)]
    d = diagnose(snapshot(sessions))
    severities = [int(f.severity) for f in d.findings]
    assert severities == sorted(severities, reverse=True)
    assert d.status == max(f.severity for f in d.findings)


def test_settings_units_reach_the_memory_model() -> None:
    server_settings = settings(setting("shared_buffers", "16384", "8kB"))
    d = diagnose(
        snapshot([], max_connections=100, server_settings=server_settings),
        DiagnoseOptions(memory_bytes=64 * GB),
    )
    assert "shared_buffers 128MB" in _only(d, MEMORY_OVERCOMMIT).evidence[0]
    assert MB == 1024 * 1024


def test_oldest_per_value_over_many_chunks_matches_a_plain_max() -> None:
    # More sessions than one chunk, and values seen only among the youngest sessions, so the
    # chunked search has to walk every chunk; None ages are skipped.
    rng = random.Random(3)
    size = 20_000
    users: list[str | None] = [rng.choice(["a", "b", "c", None]) for _ in range(size)]
    hosts: list[str | None] = [f"h{rng.randrange(300)}" for _ in range(size)]
    ages: list[float | None] = [
        rng.uniform(0, 1e5) if rng.random() < 0.9 else None for _ in range(size)
    ]
    users[-1], hosts[-1], ages[-1] = "young", "young-host", 0.001
    columns = (users, hosts)
    distinct = [len(set(users)), len(set(hosts))]
    found = _oldest_per_value(columns, ages, distinct)
    for column, result in zip(columns, found, strict=True):
        expected: dict[str | None, float] = {}
        for value, age in zip(column, ages, strict=True):
            if age is not None and age > expected.get(value, -1.0):
                expected[value] = age
        assert result == expected
    assert found[0]["young"] == 0.001


def test_large_snapshots_leave_the_garbage_collector_as_found() -> None:
    sessions = many(6000, 10, IDLE, state_age=5)
    assert gc.isenabled()
    diagnose(snapshot(sessions, max_connections=7000))
    assert gc.isenabled()
    gc.disable()
    try:
        diagnose(snapshot(sessions, max_connections=7000))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_lowering_max_connections_below_current_use_says_so() -> None:
    server_settings = settings(setting("work_mem", "65536", "kB"))  # 64MB
    d = diagnose(
        snapshot(many(30, 100, IDLE), max_connections=100, server_settings=server_settings),
        DiagnoseOptions(memory_bytes=4 * GB),
    )
    text = _fix_text(_only(d, MEMORY_OVERCOMMIT), DURABLE_SQL, "max_connections")
    assert text.splitlines()[:2] == [
        "-- 30 client backends are connected now: put PgBouncer in front before lowering "
        "below that",
        "alter system set max_connections = '22';",
    ]
