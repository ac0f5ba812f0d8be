"""`pgrelief diagnose` on a real server, read the way a tired on-call engineer reads it.

Issue 10 items 10 and 15-21: the report leads with the verdict and one statement, never
targets what `pgrelief run` protects, names the holder of a lock instead of its victims, says
which threshold would free slots in a fresh spike, says when its slot arithmetic is assumed,
and shows no control character raw. Every test runs the real CLI against the embedded
PostgreSQL with genuine sessions from ``SessionFactory``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres
from tests.fixtures.postgres import SessionFactory
from tests.test_cli import diagnose_json, pgrelief
from tests.test_dumps import copy_csv

# What must never reach a terminal raw: C0/C1 controls (ESC first), line separators, bidi.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]")
TERMINAL_HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\u2028role"


def _findings(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["kind"] == kind]


def _statements(finding: dict[str, Any]) -> str:
    return "\n".join(fix["text"] for fix in finding["fixes"] if fix["kind"] == "emergency_sql")


def _listed(pid: int, sql_text: str) -> bool:
    """Whether a precise terminate/cancel statement names ``pid`` among its rows."""
    return f"({pid}, " in sql_text


def test_the_report_leads_with_the_verdict_and_one_statement(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    opened = sessions.incident()
    for _ in range(3):
        sessions.idle("app_backend", "web")
    holder = next(s for s in opened if s.kind == "lock holder")
    time.sleep(1.1)
    args = ("--dsn", pg_server.dsn(), "--idle-after", "1s", "--idle-in-transaction-after", "1s")
    brief = pgrelief("diagnose", *args)
    full = pgrelief("diagnose", *args, "--verbose")
    assert brief.returncode in (1, 2), brief.stderr
    lines = brief.stdout.splitlines()
    assert lines[0].startswith("pgrelief diagnosis: ")
    assert "usable connection slots in use" in lines[1]
    # One statement to run now, before the durable fixes and the findings; no tables.
    assert brief.stdout.count("pg_terminate_backend") == 1
    assert "pg_cancel_backend" not in brief.stdout
    statement_at = brief.stdout.index("pg_terminate_backend")
    assert statement_at < brief.stdout.index("Stop it happening again")
    assert statement_at < brief.stdout.index("Findings")
    assert _listed(holder.pid, brief.stdout)  # the lock holder is freed first
    assert "By user" not in brief.stdout
    # --verbose keeps everything: the tables and every finding's statements.
    assert "By user" in full.stdout
    assert full.stdout.count("pg_terminate_backend") > 1
    assert len(lines) * 2 < len(full.stdout.splitlines())


def test_diagnose_never_targets_what_run_protects(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    plain = [sessions.idle("app_backend", "web") for _ in range(2)]
    listener = sessions.listener("orders", "app_backend", "notifier")
    superuser = sessions.idle("postgres", "psql")
    admin_pid = sessions.admin.info.backend_pid  # a superuser session too, idle
    time.sleep(1.1)
    _, report = diagnose_json("--dsn", pg_server.dsn(), "--idle-after", "1s")
    (leaked,) = _findings(report, "leaked_idle")
    statements = _statements(leaked)
    for spared in (listener.pid, superuser.pid, admin_pid):
        assert spared not in leaked["pids"]
        assert not _listed(spared, statements)
    for session in plain:
        assert session.pid in leaked["pids"]
        assert _listed(session.pid, statements)
    assert any("LISTEN session" in line for line in leaked["evidence"])
    # The LISTEN session's role gets no idle_session_timeout: a listener is idle by design.
    timeouts = [f["text"] for f in leaked["fixes"] if "idle_session_timeout" in f["text"]]
    assert all("alter role app_backend" not in text for text in timeouts), timeouts


def test_the_lock_holder_is_named_and_its_statement_frees_the_waiter(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    waiter = sessions.lock_waiter(
        "batch_worker", "etl", blocker_role="app_backend", blocker_app="migrator"
    )
    assert waiter.blocker is not None and waiter.thread is not None
    time.sleep(1.2)
    _, report = diagnose_json("--dsn", pg_server.dsn(), "--long-running-after", "0s")
    (lock,) = _findings(report, "lock_blocker")
    assert lock["pids"] == [waiter.blocker.pid]
    assert "'migrator'" in lock["summary"] and "idle in transaction" in lock["summary"]
    statement = _statements(lock)
    assert _listed(waiter.blocker.pid, statement)
    assert not _listed(waiter.pid, statement)
    # The victim is not cancelled by the long-running advice either.
    for finding in _findings(report, "long_running"):
        assert not _listed(waiter.pid, _statements(finding))
    # Run as printed: the holder ends, and the waiter's query completes.
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        assert admin.execute(statement.encode()).fetchall() == [(waiter.blocker.pid, True)]
    waiter.thread.join(15)
    assert not waiter.thread.is_alive()
    assert waiter.error is None


def test_a_fresh_spike_says_which_threshold_frees_slots(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    burst = sessions.fill("app_backend", "burst")
    code, report = diagnose_json("--dsn", pg_server.dsn())  # default thresholds: 30m, 60s
    assert code == 2
    verdict = report["verdict"]
    assert verdict["emergency"] is None  # nothing is old enough to call a leak
    hint = next(note for note in verdict["notes"] if "--idle-after" in note)
    match = re.search(r"--idle-after (\S+) to get the statement that terminates the (\d+)", hint)
    assert match is not None, hint
    flag, count = match.group(1), int(match.group(2))
    assert count >= 1
    _, again = diagnose_json("--dsn", pg_server.dsn(), "--idle-after", flag)
    emergency = again["verdict"]["emergency"]
    assert emergency is not None
    assert sum(_listed(s.pid, emergency["text"]) for s in burst) >= count


def test_the_pgbouncer_ini_points_at_the_servers_port(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    sessions.fill("app_backend", "burst")
    _, report = diagnose_json("--dsn", pg_server.dsn())
    (pooler,) = _findings(report, "no_pooler")
    ini = next(fix["text"] for fix in pooler["fixes"] if fix["kind"] == "pgbouncer")
    assert f"host=127.0.0.1 port={pg_server.port} dbname=postgres" in ini


def test_offline_without_settings_says_so_first_and_takes_max_connections(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    for _ in range(3):
        sessions.idle("app_backend", "web")
    activity = copy_csv(pg_server, "select * from pg_stat_activity", tmp_path / "a.csv")
    done = pgrelief("diagnose", "--activity-file", str(activity))
    head = " ".join(done.stdout.split("\n")[:4])
    assert "(on assumed settings)" in done.stdout.splitlines()[0]
    assert "ASSUMED, not observed: max_connections=100" in head
    assert "--max-connections" in head
    _, assumed = diagnose_json("--activity-file", str(activity))
    assert "max_connections" in assumed["verdict"]["assumed"]

    given = str(pg_server.max_connections)
    _, report = diagnose_json("--activity-file", str(activity), "--max-connections", given)
    assert report["server"]["max_connections"] == pg_server.max_connections
    assert "max_connections" not in report["server"]["assumed_defaults"]
    assert "max_connections" not in report["verdict"]["assumed"]

    live = pgrelief("diagnose", "--dsn", pg_server.dsn(), "--max-connections", given)
    assert live.returncode == 3
    assert "--max-connections goes with --activity-file" in live.stderr


def test_no_control_character_reaches_the_terminal(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    pg_server.create_role(TERMINAL_HOSTILE)
    try:
        for _ in range(2):
            sessions.idle(TERMINAL_HOSTILE, "web")
        sessions.idle_in_transaction(TERMINAL_HOSTILE, "worker")
        time.sleep(1.1)
        args = ("--dsn", pg_server.dsn(), "--idle-after", "1s", "--idle-in-transaction-after", "1s")
        for extra in ((), ("--verbose",)):
            done = pgrelief("diagnose", *args, *extra)
            assert done.returncode in (0, 1, 2), done.stderr
            assert RAW_CONTROL.search(done.stdout) is None, repr(done.stdout)
            assert "evil\\x1b[2J" in done.stdout  # shown, escaped
        # The statements still name the role exactly: the per-role timeout lands on it.
        _, report = diagnose_json(*args)
        (stuck,) = _findings(report, "idle_in_transaction")
        timeout = next(
            fix["text"]
            for fix in stuck["fixes"]
            if "idle_in_transaction_session_timeout" in fix["text"]
        )
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            for line in timeout.splitlines():
                if line.startswith("alter role") and "U&" in line:
                    admin.execute(line.encode())
            (config,) = admin.execute(
                "select rolconfig from pg_roles where rolname = %s", (TERMINAL_HOSTILE,)
            ).fetchone() or (None,)
        assert config == ["idle_in_transaction_session_timeout=1min"]
    finally:
        sessions.close_all()
        with pg_server.connect() as admin:
            admin.execute(
                psycopg.sql.SQL("drop role if exists {}").format(
                    psycopg.sql.Identifier(TERMINAL_HOSTILE)
                )
            )
