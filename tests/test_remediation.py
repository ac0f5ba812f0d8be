"""Remediation on a real server: relief, the safety rules, budgets, idempotence and revert.

Every test drives the real pieces (the ``pgrelief run`` command, or Runner/plan/act over the
lifeline connection) against the session-scoped embedded PostgreSQL, with real sessions from
``SessionFactory``. Tests that change role or database limits use roles of their own so the
shared server's roles stay as the other tests expect them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.act import execute
from pgrelief.audit import AuditLog
from pgrelief.connection import ManagedConnection
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import Severity
from pgrelief.errors import ServerRefused
from pgrelief.observe import connect, take_snapshot
from pgrelief.plan import PlanHistory, TerminateBackend, plan
from pgrelief.policy_file import parse_policy
from pgrelief.runner import Runner
from pgrelief.snapshot import Session
from pgrelief.state_file import StateStore
from tests.fixtures.postgres import SessionFactory
from tests.runs import (
    AGE_PAST_THRESHOLD_S,
    alive,
    pgrelief,
    run_once,
    terminated_pids,
    write_policy,
)


@pytest.fixture
def own_roles(pg_server: EmbeddedPostgres) -> Iterator[list[str]]:
    """Fresh login roles for tests that change limits; dropped afterwards."""
    created: list[str] = []

    def make(name: str) -> str:
        pg_server.create_role(name)
        created.append(name)
        return name

    names = [make(f"limits_{uuid.uuid4().hex[:8]}") for _ in range(2)]
    yield names
    with pg_server.connect() as conn:
        for name in created:
            conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


def test_one_run_relieves_a_full_server_and_spares_the_protected(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    superuser = sessions.idle("postgres", "dba-console")
    protected_role = sessions.idle("reporting", "dashboards")
    protected_app = sessions.idle("app_backend", "nightly-export")
    listener = sessions.listener("orders", "app_backend", "notifier")
    leaked = sessions.fill("app_backend", "checkout-api")
    assert leaked, "the server must be full of leaked sessions"
    with pytest.raises(ServerRefused, match=r"too many clients|reserved for"):
        connect(pg_server.dsn("app_backend"), application_name="new-client")
    time.sleep(AGE_PAST_THRESHOLD_S)

    records = run_once(pg_server, write_policy(tmp_path), tmp_path)

    with connect(pg_server.dsn("app_backend"), application_name="new-client") as newcomer:
        assert newcomer.execute("select 1").fetchone() == (1,)
    spared = [superuser.pid, protected_role.pid, protected_app.pid, listener.pid]
    assert alive(sessions.admin, spared) == set(spared)
    assert terminated_pids(records) == {s.pid for s in leaked}
    assert alive(sessions.admin, [s.pid for s in leaked]) == set()
    skipped = {r["target"]: r["detail"] for r in records if r["outcome"] == "skipped"}
    assert "protected role" in skipped[f"pid {protected_role.pid}"]
    assert "protected application" in skipped[f"pid {protected_app.pid}"]
    assert "LISTEN" in skipped[f"pid {listener.pid}"]
    # The superuser is not even a candidate worth reporting as a skip: it must not be killed.
    assert f"pid {superuser.pid}" not in terminated_pids(records)
    for record in records:
        assert set(record) >= {"ts", "action", "target", "reason", "evidence", "dry_run", "outcome"}
        assert record["dry_run"] is False


def test_a_session_that_turned_active_is_not_terminated(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    idle_then_query = sessions.idle("app_backend", "query-later")
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = parse_policy(write_policy(tmp_path).read_text())
    with ManagedConnection(pg_server.dsn()) as lifeline:
        conn = lifeline.get()
        snapshot = take_snapshot(conn)
        planned = plan(policy.spec, snapshot, Severity.CRITICAL, PlanHistory(), snapshot.taken_at)
        targets = {a.pid for a in planned.terminations}
        assert idle_then_query.pid in targets
        # Between observe and act the session runs a quick query: it is idle again, but its
        # state_change moved on, so it is not the idle session that was observed.
        idle_then_query.conn.execute("select 2")
        mine = [a for a in planned.terminations if a.pid == idle_then_query.pid]
        records = execute(conn, mine, dry_run=False)
    assert [r.outcome for r in records] == ["skipped"]
    assert "changed since it was observed" in records[0].detail
    assert alive(sessions.admin, [idle_then_query.pid]) == {idle_then_query.pid}


def terminate_action(observed: Session, **changes: Any) -> TerminateBackend:
    """The action plan would make for ``observed`` (the act tests bypass plan's rules)."""
    action = TerminateBackend(
        pid=observed.pid,
        backend_start=observed.backend_start,
        state=observed.state,
        state_change=observed.state_change,
        usename=observed.usename,
        datname=observed.datname,
        application_name=observed.application_name,
        client_addr=observed.client_addr,
        rule="idleAfter",
        age_s=observed.state_age_s or 0.0,
    )
    return dataclasses.replace(action, **changes)


def test_a_session_now_active_is_not_terminated(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    with ManagedConnection(pg_server.dsn()) as lifeline:
        conn = lifeline.get()
        worker = sessions.idle("app_backend", "worker")
        observed = next(s for s in take_snapshot(conn).sessions if s.pid == worker.pid)
        # The same connection now runs a long statement: same pid and backend_start.
        sessions.opened.remove(worker)
        running = sessions._in_thread(
            worker.conn, sql.SQL("select pg_sleep(30)"), "active", "app_backend", "worker", True
        )
        sessions.wait_for(running.pid, state="active")
        records = execute(conn, [terminate_action(observed)], dry_run=False)
    assert records[0].outcome == "skipped"
    assert alive(sessions.admin, [worker.pid]) == {worker.pid}


def test_a_reused_pid_is_not_terminated(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    newcomer = sessions.idle("app_backend", "new-backend")
    with ManagedConnection(pg_server.dsn()) as lifeline:
        conn = lifeline.get()
        current = next(s for s in take_snapshot(conn).sessions if s.pid == newcomer.pid)
        assert current.backend_start is not None
        # What we observed was an earlier backend that had the same pid.
        stale = terminate_action(
            current, backend_start=current.backend_start - timedelta(seconds=5)
        )
        records = execute(conn, [stale], dry_run=False)
    assert records[0].outcome == "skipped"
    assert alive(sessions.admin, [newcomer.pid]) == {newcomer.pid}


def role_state(admin: psycopg.Connection[tuple[object, ...]], role: str) -> tuple[int, list[str]]:
    row = admin.execute(
        "select r.rolconnlimit, coalesce(s.setconfig, '{}')"
        "  from pg_roles r left join pg_db_role_setting s"
        "    on s.setrole = r.oid and s.setdatabase = 0"
        " where r.rolname = %s",
        (role,),
    ).fetchone()
    assert row is not None, role
    return int(str(row[0])), list(row[1])  # type: ignore[call-overload]


def test_dry_run_changes_nothing_but_reports_everything(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, own_roles: list[str]
) -> None:
    role = own_roles[0]
    leaked = [sessions.idle_in_transaction("app_backend", "leaky") for _ in range(3)]
    time.sleep(AGE_PAST_THRESHOLD_S)
    roles = json.dumps([{"name": role, "connectionLimit": 7, "statementTimeout": "30s"}])
    policy = write_policy(tmp_path, roles=roles)

    records = run_once(pg_server, policy, tmp_path, "--dry-run")

    assert alive(sessions.admin, [s.pid for s in leaked]) == {s.pid for s in leaked}
    assert role_state(sessions.admin, role) == (-1, [])
    planned_kills = {r["target"] for r in records if r["action"] == "terminate"}
    assert {f"pid {s.pid}" for s in leaked} <= planned_kills
    assert [r["action"] for r in records if r["action"] == "alter_role"] == ["alter_role"] * 2
    assert all(r["dry_run"] and r["outcome"] == "skipped" for r in records)


def test_budgets_hold_across_runs(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = [sessions.idle("app_backend", "leaky") for _ in range(5)]
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = write_policy(tmp_path, per_cycle=2, per_hour=3)
    pids = [s.pid for s in leaked]

    first = terminated_pids(run_once(pg_server, policy, tmp_path))
    second = terminated_pids(run_once(pg_server, policy, tmp_path))
    third = run_once(pg_server, policy, tmp_path)

    assert len(first) == 2
    assert len(second) == 1
    assert terminated_pids(third) == set()
    assert len(alive(sessions.admin, pids)) == 2
    # Oldest first: the two opened first went in the first run.
    assert first == set(pids[:2])
    budget_skips = [r for r in third if r["outcome"] == "skipped" and "budget" in r["detail"]]
    assert len(budget_skips) == 2


def test_limits_are_idempotent_restored_after_drift_and_reverted(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, own_roles: list[str]
) -> None:
    role, other = own_roles
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("alter role {} connection limit 40").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("alter role {} set statement_timeout = '5min'").format(sql.Identifier(role))
        )
    roles = json.dumps(
        [
            {"name": role, "connectionLimit": 12, "statementTimeout": "30s",
             "idleInTransactionSessionTimeout": "1min"},
            {"name": other, "connectionLimit": 3},
        ]
    )  # fmt: skip
    policy = write_policy(tmp_path, roles=roles)

    first = run_once(pg_server, policy, tmp_path)
    assert sorted(r["outcome"] for r in first if r["action"] == "alter_role") == ["done"] * 4
    limit, config = role_state(sessions.admin, role)
    assert limit == 12
    assert "statement_timeout=30s" in config
    assert "idle_in_transaction_session_timeout=60s" in config  # canonical form
    assert role_state(sessions.admin, other)[0] == 3

    second = run_once(pg_server, policy, tmp_path)
    assert [r for r in second if r["action"].startswith("alter")] == []

    with pg_server.connect() as conn:  # somebody changes it by hand
        conn.execute(sql.SQL("alter role {} connection limit 99").format(sql.Identifier(role)))
    drift = run_once(pg_server, policy, tmp_path)
    assert [(r["action"], r["outcome"]) for r in drift if r["action"] != "terminate"] == [
        ("alter_role", "done")
    ]
    assert role_state(sessions.admin, role)[0] == 12

    run_once(pg_server, policy, tmp_path, "--revert")
    limit, config = role_state(sessions.admin, role)
    assert limit == 40
    assert config == ["statement_timeout=5min"]
    assert role_state(sessions.admin, other) == (-1, [])


HOSTILE_NAMES = [
    'we"ird',
    "semi;colon role",
    "x'; drop table pg_class; --",
    "ünïcødé-ロール",
    "r" * 63,
]


def test_hostile_names_land_exactly_and_inject_nothing(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    names = [*HOSTILE_NAMES, "é" * 31 + "r"]  # 63 bytes of UTF-8 too
    assert all(len(n.encode()) <= 63 for n in names)
    for name in names:
        pg_server.create_role(name)
    databases = ['db "quoted"; select 1', "bäse ロ"]
    with pg_server.connect() as conn:
        for db in databases:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(db)))
    try:
        roles = json.dumps(
            [{"name": n, "connectionLimit": i + 1, "statementTimeout": f"{i + 1}s"}
             for i, n in enumerate(names)]
        )  # fmt: skip
        dbs = json.dumps([{"name": d, "connectionLimit": 5 + i} for i, d in enumerate(databases)])
        records = run_once(pg_server, write_policy(tmp_path, roles=roles, databases=dbs), tmp_path)
        assert all(r["outcome"] == "done" for r in records if r["action"].startswith("alter")), [
            r for r in records if r["outcome"] != "done"
        ]
        for i, name in enumerate(names):
            assert role_state(sessions.admin, name) == (i + 1, [f"statement_timeout={i + 1}s"])
        for i, db in enumerate(databases):
            row = sessions.admin.execute(
                "select datconnlimit from pg_database where datname = %s", (db,)
            ).fetchone()
            assert row == (5 + i,)
        assert sessions.admin.execute("select count(*) from pg_class").fetchone() != (0,)
    finally:
        with pg_server.connect() as conn:
            for db in databases:
                conn.execute(sql.SQL("drop database {}").format(sql.Identifier(db)))
            for name in names:
                conn.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (("mode: Enforce", "mode: Sometimes"), "spec.remediation.mode"),
        (("maxPerCycle: 100", "maxPerCycle: -1"), "spec.remediation.budget.maxPerCycle"),
        (("idleAfter: 1s", "idleAfter: soon"), "spec.remediation.terminate.idleAfter"),
        (("interval: 200ms", "interval: 200ms\n  colour: blue"), "spec.colour"),
    ],
)
def test_bad_policies_fail_clearly_and_change_nothing(
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
    mutation: tuple[str, str],
    expected: str,
) -> None:
    leaked = sessions.idle("app_backend", "leaky")
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = write_policy(tmp_path)
    policy.write_text(policy.read_text().replace(*mutation), encoding="utf-8")

    done = pgrelief("run", "--policy", str(policy), "--dsn", pg_server.dsn(), "--once")

    assert done.returncode == 3
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert alive(sessions.admin, [leaked.pid]) == {leaked.pid}


def test_the_lifeline_keeps_working_when_the_server_is_full(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    policy = parse_policy(write_policy(tmp_path, only_under_pressure=True).read_text())
    with ManagedConnection(pg_server.dsn()) as lifeline:
        runner = Runner(policy, lifeline, StateStore(tmp_path / "s.json"), AuditLog())
        runner.cycle()
        leaked = sessions.fill("app_backend", "leaky")
        with pytest.raises(ServerRefused):
            connect(pg_server.dsn("app_backend"))
        time.sleep(AGE_PAST_THRESHOLD_S)
        report = runner.cycle()  # over the connection opened before the server filled up
    assert report.before.pressure.label == "critical"
    assert {a.pid for a in report.plan.terminations} == {s.pid for s in leaked}
    assert alive(sessions.admin, [s.pid for s in leaked]) == set()


def test_lifeline_reports_reserved_slot_access(pg_server: EmbeddedPostgres) -> None:
    role = f"monitor_{uuid.uuid4().hex[:6]}"
    pg_server.create_role(role)
    try:
        with ManagedConnection(pg_server.dsn(role)) as lifeline:
            lifeline.get()
            assert lifeline.lifeline is not None
            assert lifeline.lifeline.reserved_slots_for_us == 0
            advice = " ".join(lifeline.lifeline.advice())
        if pg_server.version >= 16:
            assert f"GRANT pg_use_reserved_connections TO {role};" in advice
            with pg_server.connect() as conn:
                conn.execute(
                    sql.SQL("grant pg_use_reserved_connections to {}").format(sql.Identifier(role))
                )
            with ManagedConnection(pg_server.dsn(role)) as lifeline:
                lifeline.get()
                assert lifeline.lifeline is not None
                assert lifeline.lifeline.reserved_slots_for_us == pg_server.reserved_connections
                assert lifeline.lifeline.advice() == []
        else:
            assert "PG16+" in advice
        with ManagedConnection(pg_server.dsn()) as superuser:
            superuser.get()
            assert superuser.lifeline is not None
            assert superuser.lifeline.is_superuser
            assert superuser.lifeline.reserved_slots_for_us >= 3
    finally:
        with pg_server.connect() as conn:
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


def test_the_loop_stops_cleanly_on_sigterm(pg_server: EmbeddedPostgres, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, mode="DryRun")
    process = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "run", "--policy", str(policy), "--dsn",
         pg_server.dsn(), "--state-file", str(tmp_path / "s.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    second = process.stdout.readline()
    assert first.startswith("pressure ") or second.startswith("pressure ")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    with pg_server.connect() as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where application_name = 'pgrelief'"
        ).fetchone()
    assert row == (0,)


def test_diagnosis_pressure_drives_only_under_pressure(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = sessions.idle("app_backend", "leaky")
    time.sleep(AGE_PAST_THRESHOLD_S)
    records = run_once(pg_server, write_policy(tmp_path, only_under_pressure=True), tmp_path)
    assert terminated_pids(records) == set()
    assert alive(sessions.admin, [leaked.pid]) == {leaked.pid}
    with ManagedConnection(pg_server.dsn()) as lifeline:
        pressure = diagnose(take_snapshot(lifeline.get()), DiagnoseOptions()).pressure
    assert pressure.label == "healthy"


def test_server_settings_reload_idempotently_restart_only_ones_are_recommended(
    tmp_path: Path,
) -> None:
    # A server of its own: ALTER SYSTEM outlives the test in postgresql.auto.conf.
    with EmbeddedPostgres(max_connections=20) as server:
        policy = write_policy(tmp_path)
        policy.write_text(
            policy.read_text()
            + "    server: {idleInTransactionSessionTimeout: 300s, tcpKeepalivesIdle: 60,"
            " tcpKeepalivesInterval: 10, tcpKeepalivesCount: 6, maxConnections: 500}\n",
            encoding="utf-8",
        )

        def effective() -> dict[str, str]:
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                rows = conn.execute(
                    "select name, reset_val from pg_settings where name = any(%s)",
                    (["idle_in_transaction_session_timeout", "tcp_keepalives_idle",
                      "tcp_keepalives_interval", "tcp_keepalives_count", "max_connections"],),
                ).fetchall()  # fmt: skip
            return {str(name): str(value) for name, value in rows}

        before = effective()
        first = run_once(server, policy, tmp_path)
        applied = [r for r in first if r["action"] == "alter_system"]
        assert sorted(r["outcome"] for r in applied) == ["done"] * 4
        recommended = [r for r in first if r["action"] == "recommend"]
        assert any("max_connections" in r["target"] + r["reason"] for r in recommended)
        assert all(r["outcome"] == "skipped" for r in recommended)
        after = effective()
        assert after["idle_in_transaction_session_timeout"] == "300000"
        assert (after["tcp_keepalives_idle"], after["tcp_keepalives_interval"]) == ("60", "10")
        assert after["tcp_keepalives_count"] == "6"
        assert after["max_connections"] == before["max_connections"] == "20"

        second = run_once(server, policy, tmp_path)
        assert [r for r in second if r["action"] == "alter_system"] == []

        def in_auto_conf() -> set[str]:
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                rows = conn.execute(
                    "select name from pg_file_settings "
                    "where sourcefile like '%%postgresql.auto.conf'"
                ).fetchall()
            return {str(name) for (name,) in rows}

        assert "tcp_keepalives_idle" in in_auto_conf()
        reverted = run_once(server, policy, tmp_path, "--revert")
        assert effective() == before
        # None of them had an ALTER SYSTEM value before: revert RESETs them instead of pinning
        # today's defaults in postgresql.auto.conf (issue 10 item 21).
        assert in_auto_conf() == set()
        assert all("onDelete" not in r["reason"] for r in reverted), reverted
