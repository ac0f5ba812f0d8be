"""The relief rules on a real server: cancels and their escalation, selectors, harm order,
transaction_timeout, and the loop waking when a leak comes due instead of at its interval.

Like test_remediation, every test drives the real pieces (``pgrelief run --once``, or
Runner/plan/act over the lifeline connection) against the session-scoped embedded
PostgreSQL with genuine sessions from ``SessionFactory``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.act import (
    CHANGED_SINCE_OBSERVED,
    QUERY_CHANGED,
    cancel_batch,
    execute,
    terminate_batch,
)
from pgrelief.audit import AuditLog
from pgrelief.connection import ManagedConnection
from pgrelief.cycle import CycleReport
from pgrelief.diagnosis import Severity
from pgrelief.errors import ServerRefused
from pgrelief.observe import connect, take_snapshot
from pgrelief.plan import CancelQuery, PlanHistory, plan
from pgrelief.policy_file import parse_policy
from pgrelief.runner import Runner
from pgrelief.snapshot import Session
from pgrelief.state_file import StateStore
from tests.fixtures.postgres import OpenSession, SessionFactory
from tests.runs import AGE_PAST_THRESHOLD_S, alive, run_once, terminated_pids, write_policy
from tests.test_remediation import terminate_action

NO_IDLE_RULES = "{}"
# A query that ignores cancels: PL/pgSQL traps query_canceled and goes on sleeping, so the
# session stays 'active' with the same query_start until it is terminated.
STUBBORN = sql.SQL(
    "do $$ begin loop begin perform pg_sleep(300); "
    "exception when query_canceled then null; end; end loop; end $$"
)


def outcomes(records: list[dict], action: str) -> dict[str, str]:
    """target -> outcome of the ``action`` records that are not intents."""
    return {
        r["target"]: r["outcome"]
        for r in records
        if r["action"] == action and r["outcome"] != "intent"
    }


def running(
    sessions: SessionFactory, statement: sql.Composable, app: str, role: str = "app_backend"
) -> OpenSession:
    conn = sessions._open(role, app, True)
    return sessions._in_thread(conn, statement, "active", role, app, True)


def test_a_long_query_is_cancelled_and_its_session_kept(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    long_query = sessions.active_sleep(300, "app_backend", "report-job")
    protected = sessions.active_sleep(300, "reporting", "dashboards")
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = write_policy(tmp_path, terminate=NO_IDLE_RULES, cancel="{activeAfter: 1s}")

    records = run_once(pg_server, policy, tmp_path)

    assert outcomes(records, "cancel") == {
        f"pid {long_query.pid}": "done",
        f"pid {protected.pid}": "skipped",
    }
    mine = [r for r in records if r["target"] == f"pid {long_query.pid}"]
    assert [r["outcome"] for r in mine] == ["intent", "done"]  # the intent first, durably
    assert mine[1]["evidence"]["rule"] == "activeAfter"
    assert mine[1]["evidence"]["last_query"].startswith("select pg_sleep(")
    skipped = next(r for r in records if r["target"] == f"pid {protected.pid}")
    assert skipped["detail"] == 'protected role "reporting"'
    assert long_query.thread is not None
    long_query.thread.join(10)
    assert isinstance(long_query.error, psycopg.errors.QueryCanceled)
    # Cancelled, not terminated: the session is still there, idle, and usable.
    sessions.wait_for(long_query.pid, state="idle")
    assert long_query.conn.execute("select 1").fetchone() == (1,)
    assert terminated_pids(records) == set()
    sessions.wait_for(protected.pid, state="active")
    assert protected.error is None


def test_a_query_that_ignores_its_cancel_is_terminated_after_the_grace(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    stubborn = running(sessions, STUBBORN, "stubborn-job")
    try:
        time.sleep(AGE_PAST_THRESHOLD_S)
        policy = write_policy(
            tmp_path, terminate=NO_IDLE_RULES, cancel="{activeAfter: 1s, escalateAfter: 3s}"
        )
        first = run_once(pg_server, policy, tmp_path)
        assert outcomes(first, "cancel") == {f"pid {stubborn.pid}": "done"}
        assert outcomes(first, "terminate") == {}
        cancelled_at = datetime.fromisoformat(
            next(r["ts"] for r in first if r["action"] == "cancel" and r["outcome"] == "done")
        )
        # Still the same query: the cancel was swallowed. A cycle within the grace neither
        # cancels it again nor terminates it; it knows when the grace ends.
        sessions.wait_for(stubborn.pid, state="active")
        assert stubborn.error is None
        loaded = parse_policy(policy.read_text())
        with ManagedConnection(pg_server.dsn()) as lifeline:
            store = StateStore(tmp_path / "state.json")
            waiting = Runner(loaded, lifeline, store, AuditLog()).cycle()
        assert waiting.plan.session_actions == ()
        assert waiting.next_deadline is not None

        time.sleep(
            max((cancelled_at + timedelta(seconds=3.1) - datetime.now(UTC)).total_seconds(), 0)
        )
        second = run_once(pg_server, policy, tmp_path)  # a new process: the state file knows
        assert outcomes(second, "cancel") == {}
        assert outcomes(second, "terminate") == {f"pid {stubborn.pid}": "done"}
        escalation = next(
            r for r in second if r["action"] == "terminate" and r["outcome"] == "done"
        )
        assert escalation["evidence"]["rule"] == "escalateAfter"
        assert escalation["evidence"]["state"] == "active"
        assert "after pgrelief cancelled it" in escalation["reason"]
        sessions.wait_gone([stubborn.pid])
        assert alive(sessions.admin, [stubborn.pid]) == set()
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["cancels"] == []  # forgotten once the query is gone
        assert len(state["terminations"]) == 2  # the cancel and the termination
    finally:
        sessions.admin.execute("select pg_terminate_backend(%s)", (stubborn.pid,))


@pytest.mark.parametrize("then", ["finished", "next query"])
def test_a_query_that_finished_between_observe_and_act_is_not_cancelled(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path, then: str
) -> None:
    query = sessions.active_sleep(300, "app_backend", "report-job")
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = parse_policy(
        write_policy(tmp_path, terminate=NO_IDLE_RULES, cancel="{activeAfter: 1s}").read_text()
    )
    with ManagedConnection(pg_server.dsn()) as lifeline:
        conn = lifeline.get()
        observed = take_snapshot(conn)
        planned = plan(policy.spec, observed, Severity.CRITICAL, PlanHistory(), observed.taken_at)
        mine = [c for c in planned.cancels if c.pid == query.pid]
        assert len(mine) == 1
        # Between observe and act the query ends (and, in one case, the session runs another).
        sessions.opened.remove(query)
        query.conn.cancel_safe()
        assert query.thread is not None
        query.thread.join(10)
        sessions.opened.append(query)
        sessions.wait_for(query.pid, state="idle")
        later = None
        if then == "next query":
            sessions.opened.remove(query)
            later = sessions._in_thread(
                query.conn, sql.SQL("select pg_sleep(30)"), "active", "app_backend", "r", True
            )
        records = execute(conn, mine, dry_run=False)
    assert [(r.action, r.outcome) for r in records] == [("cancel", "skipped")]
    assert "query changed since it was observed" in records[0].detail
    if later is not None:
        sessions.wait_for(later.pid, state="active")
        assert later.error is None


def test_the_recheck_reads_each_session_afresh_right_before_its_signal(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    # pg_stat_activity is a snapshot taken once per transaction. Acting inside a transaction
    # that read it earlier widens, to as long as the test likes, the window a loaded server
    # opened by chance (the relief bench caught a session killed mid-statement through it).
    worker = sessions.idle("app_backend", "worker")
    running = sessions.active_sleep(300, "app_backend", "report-job")
    with psycopg.connect(pg_server.dsn()) as conn:
        observed = {s.pid: s for s in take_snapshot(conn).sessions}
        idle_then, running_then = observed[worker.pid], observed[running.pid]
        conn.execute("select count(*) from pg_stat_activity")  # the transaction's snapshot
        # Now the idle session starts a statement, and the running query ends for another.
        sessions.opened.remove(worker)
        busy = sessions._in_thread(
            worker.conn, sql.SQL("select pg_sleep(30)"), "active", "app_backend", "worker", True
        )
        sessions.opened.remove(running)
        running.conn.cancel_safe()
        assert running.thread is not None
        running.thread.join(10)
        sessions.opened.append(running)
        sessions.wait_for(running.pid, state="idle")
        next_query = sessions._in_thread(
            running.conn, sql.SQL("select pg_sleep(30)"), "active", "app_backend", "r", True
        )
        terminated = terminate_batch(conn, [terminate_action(idle_then)])
        cancelled = cancel_batch(conn, [cancel_action(running_then)])
        conn.rollback()
    assert terminated == {worker.pid: ("skipped", CHANGED_SINCE_OBSERVED)}
    assert cancelled == {running.pid: ("skipped", QUERY_CHANGED)}
    sessions.wait_for(busy.pid, state="active")
    sessions.wait_for(next_query.pid, state="active")
    assert busy.error is None and next_query.error is None


def cancel_action(observed: Session) -> CancelQuery:
    return CancelQuery(
        pid=observed.pid,
        backend_start=observed.backend_start,
        query_start=observed.query_start,
        usename=observed.usename,
        datname=observed.datname,
        application_name=observed.application_name,
        client_addr=observed.client_addr,
        age_s=observed.query_age_s or 0.0,
    )


def test_selectors_include_only_what_they_name_and_protections_win(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    checkout = [sessions.idle("app_backend", f"checkout-{name}") for name in ("api", "web")]
    admin_tool = sessions.idle("app_backend", "checkout-admin")
    billing = sessions.idle("app_backend", "billing")
    other_role = sessions.idle("batch_worker", "checkout-api")
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = write_policy(
        tmp_path,
        select="{applications: ['checkout-*'], roles: [app_backend]}",
        protect_applications="[nightly-export, '*-admin']",
    )

    records = run_once(pg_server, policy, tmp_path)

    assert terminated_pids(records) == {s.pid for s in checkout}
    spared = [admin_tool.pid, billing.pid, other_role.pid]
    assert alive(sessions.admin, spared) == set(spared)
    skipped = {r["target"]: r["detail"] for r in records if r["outcome"] == "skipped"}
    assert skipped[f"pid {admin_tool.pid}"] == (
        "protected application 'checkout-admin' (matches '*-admin')"
    )
    assert skipped[f"pid {billing.pid}"] == (
        "application 'billing' not matched by select.applications"
    )
    assert skipped[f"pid {other_role.pid}"] == 'role "batch_worker" not in select.roles'


def test_a_budget_of_one_frees_the_most_harmful_session_first(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    idle = sessions.idle("app_backend", "leaky")  # the oldest
    in_transaction = sessions.idle_in_transaction("app_backend", "leaky")
    aborted = sessions.aborted("app_backend", "leaky")  # the youngest
    time.sleep(AGE_PAST_THRESHOLD_S)
    policy = write_policy(tmp_path, per_cycle=1)

    order = [terminated_pids(run_once(pg_server, policy, tmp_path)) for _ in range(3)]

    assert order == [{aborted.pid}, {in_transaction.pid}, {idle.pid}]


def test_transaction_timeout_is_applied_on_17_and_later_and_recommended_before(
    tmp_path: Path,
) -> None:
    # A server of its own: ALTER SYSTEM outlives the test in postgresql.auto.conf.
    with EmbeddedPostgres(max_connections=20) as server:
        role = f"tt_{uuid.uuid4().hex[:6]}"
        server.create_role(role)
        policy = write_policy(
            tmp_path, roles=json.dumps([{"name": role, "transactionTimeout": "5s"}])
        )
        policy.write_text(
            policy.read_text() + "    server: {transactionTimeout: 1h}\n", encoding="utf-8"
        )

        records = run_once(server, policy, tmp_path)

        changes = {(r["action"], r["outcome"]) for r in records if r["action"] != "terminate"}
        with server.connect() as conn:
            config = conn.execute(
                "select coalesce(s.setconfig, '{}') from pg_roles r left join pg_db_role_setting"
                " s on s.setrole = r.oid and s.setdatabase = 0 where r.rolname = %s",
                (role,),
            ).fetchone()
            assert config is not None
        if server.version >= 17:
            assert changes == {("alter_role", "done"), ("alter_system", "done")}
            assert list(config[0]) == ["transaction_timeout=5s"]
            with psycopg.connect(server.dsn(role)) as conn:
                assert conn.execute("show transaction_timeout").fetchone() == ("5s",)
            with server.connect() as conn:
                reset = conn.execute(
                    "select reset_val from pg_settings where name = 'transaction_timeout'"
                ).fetchone()
            assert reset == ("3600000",)
            assert [
                r for r in run_once(server, policy, tmp_path) if r["action"] != "terminate"
            ] == []
        else:
            assert changes == {("recommend", "skipped")}
            reasons = [r["reason"] for r in records if r["action"] == "recommend"]
            assert len(reasons) == 2
            assert all("transaction_timeout needs PostgreSQL 17+" in r for r in reasons)
            assert list(config[0]) == []


def test_under_pressure_the_loop_runs_when_a_leak_comes_due_not_at_its_interval(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    # An interval far longer than the test may take: only a deadline can wake the loop.
    policy = parse_policy(
        write_policy(
            tmp_path, only_under_pressure=True, interval="10min", terminate="{idleAfter: 3s}"
        ).read_text()
    )
    reports: list[CycleReport] = []
    with ManagedConnection(pg_server.dsn()) as lifeline:
        lifeline.get()
        leaked = sessions.fill("app_backend", "leaky")
        runner = Runner(policy, lifeline, StateStore(tmp_path / "s.json"), AuditLog())
        loop = threading.Thread(target=runner.loop, kwargs={"on_cycle": reports.append})
        loop.start()
        try:
            admitted = admitted_within(pg_server, 20.0)
        finally:
            runner.stop()
            loop.join(15)
    assert not loop.is_alive()
    assert admitted, "the full server was not relieved: the loop slept its interval"
    first = reports[0]
    assert first.under_pressure
    assert first.plan.terminations == ()  # every leak was too young at the first cycle
    assert first.next_deadline is not None
    terminated = [t.pid for r in reports for t in r.plan.terminations]
    assert terminated
    assert set(terminated) <= {s.pid for s in leaked}
    assert len(reports) < len(leaked) + 2  # each wake did work: no cycle spun in between


def admitted_within(server: EmbeddedPostgres, seconds: float) -> bool:
    """Whether an ordinary client gets in within ``seconds``."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        try:
            with connect(server.dsn("app_backend"), application_name="new-client"):
                return True
        except ServerRefused:
            time.sleep(0.05)
    return False
