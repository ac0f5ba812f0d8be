"""Carries out a Plan on the server, and says exactly what happened to each action.

This is the only module that changes a PostgreSQL server. Two rules shape it: a termination
re-checks, in the same statement, that the session is still the one observed (same pid,
backend_start, state and state_change), so a session that turned active or a reused pid is
never killed, and a cancel that the query is (same pid, backend_start and query_start, still
active); and every action, performed or not, becomes one audit record with its outcome.
All names and values reach SQL through ``psycopg.sql`` (DDL cannot take server-side
parameters); the ALTER statements themselves are described once, in ``statements``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from pgrelief.audit import DRY_RUN_DETAIL, AuditRecord, AuditSink, Outcome
from pgrelief.plan import (
    Action,
    CancelQuery,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
    TerminateBackend,
)
from pgrelief.statements import RELOAD_CONF, Statement, Value

Connection = psycopg.Connection[tuple[Any, ...]]

# After signalling, how long to wait for the backends to exit (their slots to be free) and how
# often to look. PostgreSQL's own pg_terminate_backend(pid, timeout) polls every 100 ms per
# backend, one backend at a time: 300 sessions took 30 s. One poll for the whole batch instead.
TERMINATE_WAIT_S = 2.0
_EXIT_POLL_S = 0.005

# One statement signals the whole batch. Each row repeats the session as observed, so a
# session that became active, or a pid reused by a new backend, matches nothing and is left
# alone; a session our role may not signal (pg_signal_backend's rules, the same for cancel and
# terminate: never a superuser's backend unless we are one; otherwise a role we have the
# privileges of, or membership in pg_signal_backend) is reported instead of failing the whole
# statement. Only the columns compared and the function called differ between the two.
#
# pg_stat_activity is a snapshot taken once per transaction, at its first read: checking a
# whole batch against it and then signalling leaves a window (milliseconds on a loaded
# server; the relief bench caught a session terminated mid-statement through it) in which a
# session may start a statement. So each row is read afresh, alone, right before its signal:
# pg_stat_clear_snapshot() runs as part of the argument of that row's pg_stat_get_activity,
# and the signal is in the projection of the row that passed the check.
_SIGNAL_BATCH = sql.SQL(
    """
    with me as (
        select rolsuper from pg_roles where rolname = current_user
    )
    select w.pid, s.permitted, s.signalled
      from unnest({arrays}) as w({columns})
     cross join lateral (
        select fresh.permitted,
               case when fresh.permitted then {signal}(fresh.pid) end as signalled
          from (
            select a.pid,
                   coalesce((select rolsuper from me), false)
                   or (not coalesce(r.rolsuper, true)
                       and (pg_has_role(current_user, a.usesysid, 'USAGE')
                            or pg_has_role(current_user, 'pg_signal_backend', 'USAGE')))
                   as permitted
              from pg_stat_get_activity(w.pid + 0 * length(pg_stat_clear_snapshot()::text)) a
              left join pg_roles r on r.oid = a.usesysid
             where a.backend_type = 'client backend'
               and a.backend_start is not distinct from w.backend_start
               and {same}
          ) fresh
     ) s
    """
)
_TERMINATE_BATCH = _SIGNAL_BATCH.format(
    arrays=sql.SQL(
        "%(pids)s::int[], %(starts)s::timestamptz[], %(states)s::text[], %(changes)s::timestamptz[]"
    ),
    columns=sql.SQL("pid, backend_start, state, state_change"),
    same=sql.SQL(
        "a.state is not distinct from w.state"
        " and a.state_change is not distinct from w.state_change"
    ),
    signal=sql.SQL("pg_terminate_backend"),
)
# A cancel is for the query observed: still running (state 'active'), same query_start.
_CANCEL_BATCH = _SIGNAL_BATCH.format(
    arrays=sql.SQL("%(pids)s::int[], %(starts)s::timestamptz[], %(queries)s::timestamptz[]"),
    columns=sql.SQL("pid, backend_start, query_start"),
    same=sql.SQL("a.state = 'active' and a.query_start is not distinct from w.query_start"),
    signal=sql.SQL("pg_cancel_backend"),
)
_STILL_THERE = sql.SQL(
    """
    select a.pid from pg_stat_activity a
      join unnest(%(pids)s::int[], %(starts)s::timestamptz[]) as w(pid, backend_start)
        on w.pid = a.pid and a.backend_start is not distinct from w.backend_start
    """
)

CHANGED_SINCE_OBSERVED = "session changed since it was observed (gone, active again, or pid reused)"
QUERY_CHANGED = "the query changed since it was observed (finished, another query, or pid reused)"
INTENT = "about to terminate; the outcome follows in the next record for this target"
CANCEL_INTENT = "about to cancel; the outcome follows in the next record for this target"
PERMISSION_DENIED = (
    "permission denied: pgrelief's role may not signal this session's role "
    "(grant it pg_signal_backend; a superuser's session needs a superuser)"
)


def execute(
    conn: Connection,
    actions: Sequence[Action],
    *,
    dry_run: bool,
    policy: str = "",
    sink: AuditSink | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[AuditRecord]:
    """Perform ``actions`` (or, with ``dry_run``, none) and return one outcome record each.

    Records reach ``sink`` as they happen: the intent of every termination and cancel before
    any is signalled, their outcomes once the batches are done, each ALTER's right after it
    ran. When ``sink`` raises, the actions after that point are not attempted.
    """
    emit = sink or (lambda _records: None)

    def record(action: Action, outcome: Outcome, detail: str) -> AuditRecord:
        return AuditRecord(
            ts=clock(),
            action=action.action,
            target=action.target,
            reason=action.reason,
            evidence=action.evidence,
            dry_run=dry_run,
            outcome=outcome,
            detail=detail,
            policy=policy,
        )

    if dry_run:
        records = [record(a, "skipped", DRY_RUN_DETAIL) for a in actions]
        emit(records)
        return records
    records = []
    terminations = [a for a in actions if isinstance(a, TerminateBackend)]
    cancels = [a for a in actions if isinstance(a, CancelQuery)]
    if terminations or cancels:
        # One durable write for every intent: the sessions are freed sooner than with one each.
        emit(
            [record(a, "intent", INTENT) for a in terminations]
            + [record(a, "intent", CANCEL_INTENT) for a in cancels]
        )
        outcomes = terminate_batch(conn, terminations) if terminations else {}
        cancelled = cancel_batch(conn, cancels) if cancels else {}
        done = [record(a, *outcomes[a.pid]) for a in terminations]
        done += [record(a, *cancelled[a.pid]) for a in cancels]
        emit(done)
        records.extend(done)
    reload_needed = False
    for action in actions:
        if isinstance(action, TerminateBackend | CancelQuery):
            continue
        outcome: Outcome
        if isinstance(action, Recommendation):
            outcome, detail = "skipped", "recommendation only: pgrelief never applies it"
        else:
            try:
                outcome, detail = _alter(conn, action)
            except psycopg.Error as error:
                outcome, detail = "failed", _error_text(error)
            reload_needed |= outcome == "done" and isinstance(action, SetSystemSetting)
        done_one = record(action, outcome, detail)
        emit([done_one])
        records.append(done_one)
    if reload_needed:
        conn.execute(composed(RELOAD_CONF))
    return records


def terminate_batch(
    conn: Connection, terminations: Sequence[TerminateBackend], *, wait_s: float = TERMINATE_WAIT_S
) -> dict[int, tuple[Outcome, str]]:
    """Signal every session still as observed in one statement, then wait for them together.

    Returns (outcome, detail) per pid: done once the backend has exited (or was signalled and
    is still exiting after ``wait_s``), skipped when the session changed, failed when our role
    may not signal it or the statement itself failed (then nothing is known to be done).
    """
    params = {
        "pids": [t.pid for t in terminations],
        "starts": [t.backend_start for t in terminations],
        "states": [t.state for t in terminations],
        "changes": [t.state_change for t in terminations],
    }
    outcomes: dict[int, tuple[Outcome, str]] = {
        t.pid: ("skipped", CHANGED_SINCE_OBSERVED) for t in terminations
    }
    try:
        rows = conn.execute(_TERMINATE_BATCH, params).fetchall()
    except psycopg.Error as error:
        detail = (
            f"the terminate statement failed, nothing is known to be done: {_error_text(error)}"
        )
        return {t.pid: ("failed", detail) for t in terminations}
    signalled: set[int] = set()
    for pid, permitted, result in rows:
        if not permitted:
            outcomes[pid] = ("failed", PERMISSION_DENIED)
        elif not result:
            outcomes[pid] = ("failed", "pg_terminate_backend returned false (already exiting?)")
        else:
            signalled.add(pid)
            outcomes[pid] = ("done", "")
    lingering = _wait_for_exit(conn, [t for t in terminations if t.pid in signalled], wait_s)
    for pid in lingering:
        outcomes[pid] = ("done", f"signalled; the backend had not exited after {wait_s:g}s")
    return outcomes


def cancel_batch(
    conn: Connection, cancels: Sequence[CancelQuery]
) -> dict[int, tuple[Outcome, str]]:
    """Cancel every query still running as observed, in one statement.

    Returns (outcome, detail) per pid: done once signalled (the query ends at its next
    interrupt check; one that ignores it is escalated by a later cycle), skipped when the
    query changed, failed when our role may not signal the session or the statement failed.
    """
    params = {
        "pids": [c.pid for c in cancels],
        "starts": [c.backend_start for c in cancels],
        "queries": [c.query_start for c in cancels],
    }
    outcomes: dict[int, tuple[Outcome, str]] = {c.pid: ("skipped", QUERY_CHANGED) for c in cancels}
    try:
        rows = conn.execute(_CANCEL_BATCH, params).fetchall()
    except psycopg.Error as error:
        detail = f"the cancel statement failed, nothing is known to be done: {_error_text(error)}"
        return {c.pid: ("failed", detail) for c in cancels}
    for pid, permitted, result in rows:
        if not permitted:
            outcomes[pid] = ("failed", PERMISSION_DENIED)
        elif not result:
            outcomes[pid] = ("failed", "pg_cancel_backend returned false (the backend is gone?)")
        else:
            outcomes[pid] = ("done", "")
    return outcomes


def _wait_for_exit(
    conn: Connection, signalled: Sequence[TerminateBackend], wait_s: float
) -> set[int]:
    """The pids of ``signalled`` still present after up to ``wait_s`` seconds."""
    if not signalled:
        return set()
    params = {
        "pids": [t.pid for t in signalled],
        "starts": [t.backend_start for t in signalled],
    }
    deadline = time.monotonic() + wait_s
    while True:
        try:
            present = {row[0] for row in conn.execute(_STILL_THERE, params)}
        except psycopg.Error:
            return set()  # signalled is what we know; the next snapshot shows the rest
        if not present or time.monotonic() >= deadline:
            return present
        time.sleep(_EXIT_POLL_S)


def _alter(conn: Connection, action: Action) -> tuple[Outcome, str]:
    statement = alter_statement(action)
    if statement is None:
        return "skipped", f"pgrelief cannot perform {action.action!r} actions"
    conn.execute(statement)
    return "done", ""


def alter_statement(action: Action) -> sql.Composed | None:
    """The DDL for a limit or setting action, names and values quoted by psycopg.sql."""
    if isinstance(
        action,
        SetRoleConnectionLimit | SetRoleSetting | SetDatabaseConnectionLimit | SetSystemSetting,
    ):
        return composed(action.statement)
    return None


def composed(statement: Statement) -> sql.Composed:
    """``statement`` for execution: names as ``sql.Identifier``, values as ``sql.Literal``.

    The text shown for the same statement is rendered by ``advice`` from the same parts.
    """
    parts: list[sql.Composable] = []
    for part in statement.parts:
        if isinstance(part, Value):
            parts.append(sql.Literal(part.value))
        else:
            parts.append(sql.Identifier(part.value))
    return sql.SQL(statement.template).format(*parts)


def _error_text(error: psycopg.Error) -> str:
    # The server's primary message never carries our password; the DSN is not included.
    diag = error.diag
    code = diag.sqlstate or "?"
    return f"{code}: {diag.message_primary or str(error).splitlines()[0]}"
