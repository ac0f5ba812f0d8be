"""``pgrelief run`` under failure: never an action without its record, never a silent stop.

Each test reproduces, on the real embedded server, a failure the hardening issue found: a
crash or SIGTERM in the middle of a cycle, an audit file or state location that cannot be
written, a full disk, a frozen backend, a server down at start, a session pgrelief may not
signal, and a clock set back. Crashes are injected into our own code at a chosen point by a
small driver script (``_inject``); the server, the sessions and the signals are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgrelief import runner as runner_module
from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.act import execute
from pgrelief.audit import AuditLog, AuditRecord
from pgrelief.connection import ManagedConnection
from pgrelief.diagnosis import Severity
from pgrelief.errors import ConnectFailed
from pgrelief.history import RemediationHistory
from pgrelief.observe import take_snapshot
from pgrelief.plan import PlanHistory, plan
from pgrelief.policy_file import parse_policy
from pgrelief.runner import Runner
from pgrelief.state_file import StateStore
from tests.fixtures.forwarder import Forwarder
from tests.fixtures.postgres import SessionFactory
from tests.runs import AGE_PAST_THRESHOLD_S, alive, pgrelief, write_policy

# Runs the real CLI after patching one of our own functions to do something first (signal
# this process, fail a write). Only pgrelief's code is patched; the server is real.
_DRIVER = """
import os, signal, sys
import {module} as target
original = target.{function}
calls = []
def injected(*args, **kwargs):
    calls.append(1)
{body}
    return original(*args, **kwargs)
target.{function} = injected
from pgrelief.cli import main
main(sys.argv[1:])
"""


def _inject(
    module: str, function: str, body: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    script = _DRIVER.format(
        module=module, function=function, body=textwrap.indent(textwrap.dedent(body), "    ")
    )
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _pids(records: list[dict], outcome: str) -> set[int]:
    return {
        int(r["target"].split()[-1])
        for r in records
        if r["action"] == "terminate" and r["outcome"] == outcome
    }


def _run_args(server: EmbeddedPostgres, policy: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", "--policy", str(policy), "--dsn", server.dsn(), "--once",
        "--audit-file", str(tmp_path / "audit.jsonl"),
        "--state-file", str(tmp_path / "state.json"), *extra,
    ]  # fmt: skip


def _leaks(sessions: SessionFactory, count: int) -> list[int]:
    leaked = [sessions.idle_in_transaction("app_backend", "leaky").pid for _ in range(count)]
    time.sleep(AGE_PAST_THRESHOLD_S)
    return leaked


# ---- never act without a record ------------------------------------------------------------


def test_sigkill_right_after_the_terminations_leaves_a_record_of_each(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = _leaks(sessions, 6)
    done = _inject(
        "pgrelief.act",
        "_wait_for_exit",
        "os.kill(os.getpid(), signal.SIGKILL)",
        *_run_args(pg_server, write_policy(tmp_path), tmp_path),
    )
    assert done.returncode == -signal.SIGKILL
    sessions.wait_gone(leaked)
    records = _records(tmp_path / "audit.jsonl")
    # Killed between the signal and the outcome: every terminated session has its record.
    assert _pids(records, "intent") == set(leaked)
    assert alive(sessions.admin, leaked) == set()


def test_sigterm_during_a_once_cycle_finishes_it_with_records_and_state(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = _leaks(sessions, 4)
    done = _inject(
        "pgrelief.act",
        "_wait_for_exit",
        "if len(calls) == 1: os.kill(os.getpid(), signal.SIGTERM)",
        *_run_args(pg_server, write_policy(tmp_path), tmp_path),
    )
    assert done.returncode == 0, done.stderr
    records = _records(tmp_path / "audit.jsonl")
    assert _pids(records, "done") == set(leaked)
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["terminations"]) == len(leaked)


def test_sigterm_before_acting_stops_the_once_cycle_without_acting(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = _leaks(sessions, 3)
    done = _inject(
        "pgrelief.cycle",
        "plan",
        "os.kill(os.getpid(), signal.SIGTERM)",
        *_run_args(pg_server, write_policy(tmp_path), tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "stopped before acting" in done.stdout
    assert alive(sessions.admin, leaked) == set(leaked)
    assert _pids(_records(tmp_path / "audit.jsonl"), "intent") == set()


@pytest.mark.parametrize("where", ["/dev/full", "not-a-directory"])
def test_an_audit_file_that_cannot_be_written_stops_before_any_termination(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, where: str
) -> None:
    leaked = _leaks(sessions, 3)
    if where == "/dev/full":
        audit = Path("/dev/full")  # opens fine, every write fails with ENOSPC
    else:
        (tmp_path / "plain-file").write_text("")
        audit = tmp_path / "plain-file" / "audit.jsonl"
    done = pgrelief(
        "run", "--policy", str(write_policy(tmp_path)), "--dsn", pg_server.dsn(), "--once",
        "--audit-file", str(audit), "--state-file", str(tmp_path / "state.json"),
    )  # fmt: skip
    assert done.returncode == 3
    assert f"cannot write the audit file {audit}" in done.stderr
    assert "Traceback" not in done.stderr
    assert alive(sessions.admin, leaked) == set(leaked)


def test_a_full_disk_after_acting_stops_and_says_what_was_done(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = _leaks(sessions, 3)
    # The intents reach the disk; once the sessions are signalled, the disk is full.
    done = _inject(
        "pgrelief.act",
        "_wait_for_exit",
        """
        def full(fd):
            raise OSError(28, "No space left on device")
        os.fsync = full
        """,
        *_run_args(pg_server, write_policy(tmp_path), tmp_path),
    )
    audit = tmp_path / "audit.jsonl"
    assert done.returncode == 3
    assert f"cannot write the audit file {audit}: No space left on device" in done.stderr
    assert "3 action(s) done whose records could not be written" in done.stderr
    unwritten = [
        json.loads(line.removeprefix("unwritten audit record: "))
        for line in done.stderr.splitlines()
        if line.startswith("unwritten audit record: ")
    ]
    assert _pids(unwritten, "done") == set(leaked)
    assert _pids(_records(audit), "intent") == set(leaked)
    assert "Traceback" not in done.stderr


def test_audit_lines_stay_one_record_per_line_with_unicode_line_breaks(tmp_path: Path) -> None:
    record = AuditRecord(
        ts=datetime.now(UTC),
        action="alter_role",
        target="role \u2028x\x85y\u2029z",
        reason="r",
        evidence={"role": "a\u2028b"},
        dry_run=False,
        outcome="done",
    )
    audit = AuditLog(path=tmp_path / "audit.jsonl")
    audit.write([record, record])
    text = (tmp_path / "audit.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2
    assert json.loads(text.splitlines()[0])["target"] == record.target


# ---- the state file ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parent-is-a-file", "path-is-a-directory"])
def test_an_unwritable_state_location_stops_before_acting_and_leaves_nothing(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, kind: str
) -> None:
    leaked = _leaks(sessions, 2)
    if kind == "parent-is-a-file":
        (tmp_path / "plain-file").write_text("")
        state = tmp_path / "plain-file" / "state.json"
    else:
        state = tmp_path / "state-dir"
        state.mkdir()
    done = pgrelief(
        "run", "--policy", str(write_policy(tmp_path)), "--dsn", pg_server.dsn(), "--once",
        "--state-file", str(state),
    )  # fmt: skip
    assert done.returncode == 3
    assert f"cannot write the state file {state}" in done.stderr
    assert alive(sessions.admin, leaked) == set(leaked)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_the_loop_writes_state_only_when_it_changed_and_stops_when_it_cannot(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "run", "--policy", str(write_policy(tmp_path)),
         "--dsn", pg_server.dsn(), "--audit-file", str(audit),
         "--state-file", str(state_dir / "state.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        process.stdout.readline()
        # The location becomes unwritable; with nothing to do, the loop carries on.
        state_dir.rmdir()
        state_dir.write_text("now a file")
        time.sleep(1.0)
        assert process.poll() is None
        leaked = _leaks(sessions, 1)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 3
    assert f"cannot write the state file {state_dir / 'state.json'}" in err
    assert f"recorded in {audit}" in err
    assert _pids(_records(audit), "done") == set(leaked)


def test_a_future_or_zoneless_termination_time_does_not_block_the_budget(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    history = RemediationHistory(terminations=[now + timedelta(days=1)])
    # A time in the future (the clock was set back) blocks one window, not until it is reached.
    assert len(history.for_planning(now).terminations) == 1
    history.add_terminations([], now)  # what every cycle does: the time is settled at now
    assert history.terminations == [now]
    assert history.for_planning(now + timedelta(minutes=61)).terminations == ()

    leaked = _leaks(sessions, 1)
    naive = (now - timedelta(hours=2)).replace(tzinfo=None).isoformat()
    (tmp_path / "state.json").write_text(json.dumps({"terminations": [naive], "originals": {}}))
    done = pgrelief(*_run_args(pg_server, write_policy(tmp_path, per_hour=1), tmp_path))
    assert done.returncode == 0, done.stderr
    assert alive(sessions.admin, leaked) == set()


# ---- a server that misbehaves --------------------------------------------------------------


@pytest.fixture
def forwarder(pg_server: EmbeddedPostgres) -> Iterator[Forwarder]:
    proxy = Forwarder((pg_server.host, pg_server.port))
    yield proxy
    proxy.release()


def test_the_loop_waits_for_a_server_that_is_down_at_start(
    pg_server: EmbeddedPostgres, forwarder: Forwarder, tmp_path: Path
) -> None:
    dsn = pg_server.dsn().replace(f"port={pg_server.port}", f"port={forwarder.port}")
    process = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "run", "--policy",
         str(write_policy(tmp_path, mode="DryRun")), "--dsn", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(13)  # longer than the ~11 s after which it used to give up
        assert process.poll() is None, process.communicate()[1]
        forwarder.open()
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("pressure ")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "retrying in" in err


def _backend_of(admin: psycopg.Connection[tuple[object, ...]], application: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = admin.execute(
            "select pid from pg_stat_activity where application_name = %s", (application,)
        ).fetchone()
        if row is not None:
            return int(str(row[0]))
        time.sleep(0.05)
    raise AssertionError(f"no backend with application_name {application!r}")


def test_sigterm_ends_a_loop_stuck_on_a_frozen_backend(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "run", "--policy",
         str(write_policy(tmp_path, mode="DryRun")), "--dsn", pg_server.dsn()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    backend = 0
    try:
        assert process.stdout is not None
        process.stdout.readline()
        backend = _backend_of(sessions.admin, "pgrelief")
        os.kill(backend, signal.SIGSTOP)
        time.sleep(1.0)  # the next cycle is now waiting on the frozen backend
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        process.communicate(timeout=runner_module.STOP_GRACE_S + 10)
        assert time.monotonic() - started < runner_module.STOP_GRACE_S + 5
    finally:
        if backend:
            os.kill(backend, signal.SIGCONT)
        process.kill()
    assert process.returncode == 0


def test_a_cycle_on_a_frozen_backend_is_cut_at_its_deadline_and_the_next_reconnects(
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "CYCLE_DEADLINE_S", 1.5)
    policy = parse_policy(write_policy(tmp_path, mode="DryRun").read_text())
    with ManagedConnection(pg_server.dsn()) as lifeline:
        runner = Runner(policy, lifeline, StateStore(tmp_path / "s.json"), AuditLog())
        runner.cycle()
        backend = _backend_of(sessions.admin, "pgrelief")
        os.kill(backend, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectFailed, match="lost while observing"):
                runner.cycle()
            assert time.monotonic() - started < 5
        finally:
            os.kill(backend, signal.SIGCONT)
        assert lifeline.expired == 1
        assert runner.cycle().before.totals.client_backends >= 1


# ---- a session pgrelief may not signal -----------------------------------------------------


@pytest.fixture
def limited_role(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """A monitoring role that may signal batch_worker's sessions but not app_backend's."""
    role = f"limited_{uuid.uuid4().hex[:6]}"
    pg_server.create_role(role)
    with pg_server.connect() as conn:
        conn.execute(
            sql.SQL("grant pg_read_all_stats, batch_worker to {}").format(sql.Identifier(role))
        )
    yield role
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


def test_a_session_it_may_not_signal_neither_starves_others_nor_floods_the_audit(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, limited_role: str
) -> None:
    unkillable = sessions.idle("app_backend", "leaky")
    time.sleep(0.3)
    killable = sessions.idle("batch_worker", "leaky")
    time.sleep(AGE_PAST_THRESHOLD_S)
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path, per_cycle=1)  # the oldest (unkillable) comes first
    once = pgrelief(
        "run", "--policy", str(policy), "--dsn", pg_server.dsn(limited_role), "--once",
        "--audit-file", str(audit), "--state-file", str(tmp_path / "once.json"),
    )  # fmt: skip
    assert once.returncode == 1, once.stderr
    assert "permission denied" in once.stdout
    process = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "run", "--policy", str(policy),
         "--dsn", pg_server.dsn(limited_role), "--audit-file", str(audit),
         "--state-file", str(tmp_path / "loop.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3.0)  # 15 cycles at 200 ms
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    finally:
        process.kill()
    records = _records(audit)
    assert alive(sessions.admin, [killable.pid, unkillable.pid]) == {unkillable.pid}
    assert killable.pid in _pids(records, "done")
    # One failed attempt per run (the --once and the loop's first), not one per cycle.
    assert [r["outcome"] for r in records if r["target"] == f"pid {unkillable.pid}"].count(
        "failed"
    ) == 2


def test_a_batch_terminates_the_unchanged_and_spares_the_changed(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    leaked = [sessions.idle("app_backend", "batch") for _ in range(8)]
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = parse_policy(write_policy(tmp_path).read_text())
    with ManagedConnection(pg_server.dsn()) as lifeline:
        conn = lifeline.get()
        snapshot = take_snapshot(conn)
        planned = plan(policy.spec, snapshot, Severity.CRITICAL, PlanHistory(), snapshot.taken_at)
        mine = [a for a in planned.terminations if a.pid in {s.pid for s in leaked}]
        assert len(mine) == 8
        moved = leaked[:2]
        for session in moved:
            session.conn.execute("select 1")  # state_change moves on: not the observed session
        records = execute(conn, mine, dry_run=False)
    outcomes = {r.target: r.outcome for r in records}
    assert {t for t, o in outcomes.items() if o == "skipped"} == {f"pid {s.pid}" for s in moved}
    assert alive(sessions.admin, [s.pid for s in leaked]) == {s.pid for s in moved}
