"""Carries out a Plan on the server, and says exactly what happened to each action.

This is the only module that changes a PostgreSQL server. Two rules shape it: a termination
re-checks, in the same statement, that the session is still the one observed (same pid,
backend_start, state and state_change), so a session that turned active or a reused pid is
never killed; and every action, performed or not, becomes one audit record with its outcome.
All names and values reach SQL through ``psycopg.sql`` (DDL cannot take server-side
parameters); the ALTER statements themselves are described once, in ``statements``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from pgrelief.audit import AuditRecord, Outcome
from pgrelief.plan import (
    Action,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
    TerminateBackend,
)
from pgrelief.statements import RELOAD_CONF, Statement, Value

Connection = psycopg.Connection[tuple[Any, ...]]

# pg_terminate_backend(pid, timeout) (PG14+) waits until the backend is gone, so the slot is
# free when we report success; older servers only signal.
_TERMINATE_WAIT_MS = 2000
_TERMINATE = sql.SQL(
    """
    select pg_terminate_backend(pid{wait})
      from pg_stat_activity
     where pid = %(pid)s
       and backend_type = 'client backend'
       and backend_start is not distinct from %(backend_start)s
       and state is not distinct from %(state)s
       and state_change is not distinct from %(state_change)s
    """
)


def execute(
    conn: Connection,
    actions: Sequence[Action],
    *,
    dry_run: bool,
    policy: str = "",
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[AuditRecord]:
    """Perform ``actions`` in order (or, with ``dry_run``, none) and return one record each."""
    records: list[AuditRecord] = []
    reload_needed = False
    version_num = conn.info.server_version
    for action in actions:
        outcome: Outcome
        if dry_run:
            outcome, detail = "skipped", "dry run: nothing was changed"
        elif isinstance(action, Recommendation):
            outcome, detail = "skipped", "recommendation only: pgrelief never applies it"
        else:
            try:
                outcome, detail = _perform(conn, action, version_num)
            except psycopg.Error as error:
                outcome, detail = "failed", _error_text(error)
            if outcome == "done" and isinstance(action, SetSystemSetting):
                reload_needed = True
        records.append(
            AuditRecord(
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
        )
    if reload_needed:
        conn.execute(composed(RELOAD_CONF))
    return records


def _perform(conn: Connection, action: Action, version_num: int) -> tuple[Outcome, str]:
    if isinstance(action, TerminateBackend):
        return _terminate(conn, action, version_num)
    statement = alter_statement(action)
    if statement is None:
        return "skipped", f"pgrelief cannot perform {action.action!r} actions"
    conn.execute(statement)
    return "done", ""


def _terminate(conn: Connection, action: TerminateBackend, version_num: int) -> tuple[Outcome, str]:
    wait = (
        sql.SQL(", {}").format(sql.Literal(_TERMINATE_WAIT_MS))
        if version_num >= 140000
        else sql.SQL("")
    )
    row = conn.execute(
        _TERMINATE.format(wait=wait),
        {
            "pid": action.pid,
            "backend_start": action.backend_start,
            "state": action.state,
            "state_change": action.state_change,
        },
    ).fetchone()
    if row is None:
        return (
            "skipped",
            "session changed since it was observed (gone, active again, or pid reused)",
        )
    if not row[0]:
        return "failed", "pg_terminate_backend returned false (no permission, or already exiting)"
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
