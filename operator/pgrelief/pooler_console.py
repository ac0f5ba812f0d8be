"""Reading a PgBouncer's admin console: who its clients are, and who waits for a server.

Behind a pooler, PostgreSQL sees only the pooler's address. PgBouncer knows the rest: SHOW
CLIENTS lists each client's address (the application Pod), SHOW SERVERS each server
connection's backend pid (``remote_pid``) and the client it serves right now (``link``), SHOW
POOLS the clients waiting for a server (``cl_waiting``, ``maxwait``). pgrelief logs in as a
``stats_users`` role of the config it generates (read-only commands only).

The console speaks the simple query protocol only, hence psycopg's ``ClientCursor``; columns
are read by name, so a newer PgBouncer's extra columns do not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgrelief.workloads import PoolerClient, PoolerPool

CONSOLE_DATABASE = "pgbouncer"
CONNECT_TIMEOUT_S = 2


def console_conninfo(host: str, port: int, user: str, password: str) -> str:
    return make_conninfo(
        "",
        host=host,
        port=port,
        dbname=CONSOLE_DATABASE,
        user=user,
        password=password,
        connect_timeout=CONNECT_TIMEOUT_S,
        application_name="pgrelief",
        sslmode="disable",  # the pod's own console, inside the cluster network
    )


def open_console(conninfo: str) -> psycopg.Connection[Any]:
    """An autocommit connection to the admin console (psycopg.Error when refused)."""
    return psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor)


def read_console(
    conn: psycopg.Connection[Any],
) -> tuple[tuple[PoolerClient, ...], tuple[PoolerClient, ...], tuple[PoolerPool, ...]]:
    """SHOW CLIENTS, SHOW SERVERS and SHOW POOLS."""
    clients = tuple(_client(row) for row in _rows(conn, "SHOW CLIENTS"))
    servers = tuple(_client(row) for row in _rows(conn, "SHOW SERVERS"))
    pools = tuple(_pool(row) for row in _rows(conn, "SHOW POOLS"))
    return clients, servers, pools


def _rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _client(row: Mapping[str, Any]) -> PoolerClient:
    addr = str(row.get("addr") or "")
    return PoolerClient(
        user=str(row.get("user") or ""),
        database=str(row.get("database") or ""),
        state=str(row.get("state") or ""),
        addr=addr if addr and addr != "unix" else None,
        port=_int(row.get("port")),
        connect_time=_console_time(row.get("connect_time")),
        wait_s=_seconds(row.get("wait"), row.get("wait_us")),
        ptr=str(row.get("ptr") or ""),
        link=str(row.get("link") or ""),
        remote_pid=_int(row.get("remote_pid")) or None,
        application_name=str(row.get("application_name") or ""),
    )


def _pool(row: Mapping[str, Any]) -> PoolerPool:
    return PoolerPool(
        database=str(row.get("database") or ""),
        user=str(row.get("user") or ""),
        cl_active=_int(row.get("cl_active")) or 0,
        cl_waiting=_int(row.get("cl_waiting")) or 0,
        sv_active=_int(row.get("sv_active")) or 0,
        sv_idle=_int(row.get("sv_idle")) or 0,
        sv_used=_int(row.get("sv_used")) or 0,
        maxwait_s=_seconds(row.get("maxwait"), row.get("maxwait_us")),
        pool_mode=str(row.get("pool_mode") or ""),
    )


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _seconds(whole: object, micro: object) -> float:
    return (_int(whole) or 0) + (_int(micro) or 0) / 1_000_000


def _console_time(value: object) -> datetime | None:
    """PgBouncer writes ``2026-12-05 13:13:46 UTC`` (older releases: without the zone)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value or "").removesuffix(" UTC").strip()
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
