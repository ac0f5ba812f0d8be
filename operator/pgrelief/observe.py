"""Observe a live server: one ``Snapshot`` from one statement, plus a connect that explains itself.

pgrelief observes servers that are in trouble, often through one of the last reserved slots, so
a snapshot is a single statement (one round trip, a few milliseconds of server time with
hundreds of backends) and every age in it is measured on the server's clock at one instant
(``clock_timestamp()`` captured once), never on this machine's. Connection failures become
one-line ``ConnectFailed`` / ``ServerRefused`` errors: a server refusing us for lack of slots is
the incident itself and must be reported as such, not as a crash.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from pgrelief.errors import ConnectFailed, PgreliefError, ServerRefused
from pgrelief.pgbouncer_auth import AuthFunctionCheck
from pgrelief.policy import AuthQuerySpec
from pgrelief.snapshot import (
    CLIENT_BACKEND,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RESERVED,
    DEFAULT_SUPERUSER_RESERVED,
    DatabaseInfo,
    RoleInfo,
    ServerFacts,
    Session,
    Setting,
    Snapshot,
)

DEFAULT_CONNECT_TIMEOUT_S = 10

# The settings the diagnosis and the advice read. Asked for by name, so a setting a version
# lacks (reserved_connections before 16, idle_session_timeout before 14) is simply absent.
SETTINGS: tuple[str, ...] = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "shared_buffers",
    "work_mem",
    "hash_mem_multiplier",
    "maintenance_work_mem",
    "autovacuum_work_mem",
    "temp_buffers",
    "effective_cache_size",
    "huge_pages",
    "autovacuum_max_workers",
    "max_worker_processes",
    "max_parallel_workers",
    "max_parallel_workers_per_gather",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "client_connection_check_interval",
    "track_activity_query_size",
    "log_connections",
    "log_disconnections",
    "server_version_num",
    "port",  # what the pgbouncer.ini [databases] entries point at
)

# One statement, one round trip, one instant. The volatile clock CTE is evaluated once and
# every age is computed against it from the server's own timestamps. The side tables travel as
# compact JSON arrays so their different shapes fit in one result row (JSON also renders
# timestamptz as ISO 8601 whatever the session's DateStyle).
# Settings are read as reset_val, the server-wide value every new session starts with:
# `setting` would show our own session's statement_timeout, and 0 for the tcp_keepalives_*
# of a Unix-socket session or the OS values over TCP, none of which is the configuration.
SNAPSHOT_QUERY = """
with clock as materialized (select clock_timestamp() as taken_at)
select c.taken_at,
       current_setting('server_version_num')::int,
       pg_backend_pid(),
       (select coalesce(json_agg(json_build_array(
                   a.pid, a.backend_type, a.state, a.usename, a.datname, a.application_name,
                   host(a.client_addr), a.client_port,
                   a.backend_start, a.xact_start, a.query_start, a.state_change,
                   a.wait_event_type, a.wait_event, a.query, a.leader_pid, r.rolsuper,
                   -- only of lock waiters: each call takes the lock manager's locks briefly
                   case when a.wait_event_type = 'Lock' then pg_blocking_pids(a.pid) end)),
                   '[]')
          from pg_stat_activity a
          left join pg_roles r on r.oid = a.usesysid),
       (select coalesce(json_agg(json_build_array(
                   s.name, s.reset_val, s.unit, s.context, s.source, s.sourcefile)), '[]')
          from pg_settings s
         where s.name = any(%s)),
       (select coalesce(json_agg(json_build_array(
                   r.rolname, r.rolconnlimit, r.rolsuper, r.rolcanlogin, r.rolconfig)), '[]')
          from pg_roles r
         where r.rolname !~ '^pg_'),
       (select coalesce(json_agg(json_build_array(d.datname, d.datconnlimit, d.datallowconn)),
                        '[]')
          from pg_database d)
  from clock c
"""

# PostgreSQL's texts for SQLSTATE 53300. libpq reports a refused startup as text only (no
# SQLSTATE reaches the client), so the message is all there is to tell "full" from "broken".
_REFUSED = re.compile(
    r"sorry, too many clients already"
    r"|remaining connection slots are reserved"
    r"|too many connections for (?:role|database)",
    re.IGNORECASE,
)
_SECRET_KEYS = frozenset({"password", "sslpassword"})
# libpq defaults for every pgrelief connection (a DSN's own values win): a dead peer or a
# partition is noticed in ~30 s instead of the kernel's two hours.
TCP_KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
_TEXT_TYPES = ("text", "varchar", "bpchar", "name")
_QUOTED = re.compile(r'"([^"]*)"')
# libpq quotes option *names* after these; anything else it quotes may be a value.
_NAMES_ONLY = ("invalid connection option ", "invalid URI query parameter: ")


def connect(
    dsn: str,
    *,
    application_name: str = "pgrelief",
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S,
    autocommit: bool = True,
) -> psycopg.Connection[TupleRow]:
    """Open a connection, or raise ``ServerRefused`` / ``ConnectFailed`` with a one-line message.

    The messages name the target without its password. ``application_name`` and
    ``connect_timeout`` are defaults: values in ``dsn`` win.
    """
    _reject_mangled_uri(dsn)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as bad:
        raise ConnectFailed("the given DSN", f"invalid connection string: {_redact(bad)}") from None
    target = describe_dsn(dsn)
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", connect_timeout)
    for key, value in TCP_KEEPALIVES.items():
        params.setdefault(key, value)
    # Our own session always speaks UTF-8 (PGCLIENTENCODING may say otherwise); text from
    # other databases that is not UTF-8 (SQL_ASCII, LATIN1 sessions' queries) is decoded with
    # replacement instead of failing the whole snapshot.
    params["client_encoding"] = "UTF8"
    try:
        conn = psycopg.connect(make_conninfo("", **params), autocommit=autocommit)
    except psycopg.OperationalError as failure:
        attempts = _server_lines(str(failure))
        refused = [line for line in attempts if _REFUSED.search(line)]
        if refused:
            raise ServerRefused(target, _strip_severity(refused[-1])) from None
        raise ConnectFailed(target, "; ".join(attempts) or "connection failed") from None
    except psycopg.Error as failure:
        raise ConnectFailed(target, _redact(failure)) from None
    for type_name in _TEXT_TYPES:
        conn.adapters.register_loader(type_name, LenientTextLoader)
    for type_name in ("json", "jsonb"):
        conn.adapters.register_loader(type_name, LenientJsonLoader)
    return conn


class LenientTextLoader(Loader):
    """Text as UTF-8, with U+FFFD for bytes that are not (SQL_ASCII or LATIN1 sessions)."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "replace")


class LenientJsonLoader(Loader):
    """JSON whose strings may hold such bytes: pg_stat_activity travels as json_agg."""

    def load(self, data: Buffer) -> Any:
        return json.loads(bytes(data).decode("utf-8", "replace"))


def describe_dsn(dsn: str) -> str:
    """The connection string without secrets, for messages and logs."""
    if _mangled_uri(dsn):
        return "the given URI"
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the given DSN"
    shown = make_conninfo("", **{k: v for k, v in params.items() if k not in _SECRET_KEYS})
    return shown or "the default server (PG* environment)"


def take_snapshot(conn: psycopg.Connection[Any]) -> Snapshot:
    """One observation: sessions, settings, role and database limits, at one server instant.

    ``conn`` must not be inside a transaction: PostgreSQL freezes pg_stat_activity for the rest
    of a transaction once read, so a second snapshot there would silently repeat the first.
    """
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("take_snapshot needs a connection that is not inside a transaction")
    try:
        row = conn.execute(SNAPSHOT_QUERY, (list(SETTINGS),)).fetchone()
        if not conn.autocommit:
            conn.rollback()
    except psycopg.Error as failure:
        if conn.broken or conn.closed:  # terminated, server gone: reconnecting may help
            target = describe_dsn(conn.info.dsn)
            raise ConnectFailed(target, f"lost while observing: {_one_line(failure)}") from None
        # e.g. statement_timeout or a revoked privilege: the connection itself is fine.
        raise PgreliefError(f"the snapshot query failed: {_one_line(failure)}") from None
    assert row is not None  # a select without where returns exactly one row
    return _build(row)


def _build(row: Sequence[Any]) -> Snapshot:
    taken_at, version_num, own_pid, activity, settings_rows, role_rows, database_rows = row
    settings = {
        name: Setting(
            name=name,
            setting=value,
            unit=unit,
            context=context,
            source=source,
            sourcefile=sourcefile,
        )
        for name, value, unit, context, source, sourcefile in settings_rows
    }

    def number(name: str, default: int) -> int:
        found = settings.get(name)
        return found.as_int() if found is not None else default

    server = ServerFacts(
        version_num=int(version_num),
        max_connections=number("max_connections", DEFAULT_MAX_CONNECTIONS),
        superuser_reserved_connections=number(
            "superuser_reserved_connections", DEFAULT_SUPERUSER_RESERVED
        ),
        reserved_connections=number("reserved_connections", DEFAULT_RESERVED),
        settings=settings,
    )
    roles = {
        name: RoleInfo(
            name=name,
            connection_limit=int(limit),
            is_superuser=bool(superuser),
            can_login=bool(login),
            config=_role_config(config),
        )
        for name, limit, superuser, login, config in role_rows
    }
    databases = {
        name: DatabaseInfo(name=name, connection_limit=int(limit), allow_connections=bool(allow))
        for name, limit, allow in database_rows
    }
    return Snapshot(
        taken_at=taken_at,
        server=server,
        sessions=tuple(_session(values, taken_at) for values in activity),
        roles=roles,
        databases=databases,
        own_pid=int(own_pid),
        source="live",
    )


def _session(values: Sequence[Any], taken_at: datetime) -> Session:
    (
        pid,
        backend_type,
        state,
        usename,
        datname,
        application_name,
        client_addr,
        client_port,
        backend_start,
        xact_start,
        query_start,
        state_change,
        wait_event_type,
        wait_event,
        query,
        leader_pid,
        superuser,
        blocked_by,
    ) = values
    backend_start = _timestamp(backend_start)
    xact_start = _timestamp(xact_start)
    query_start = _timestamp(query_start)
    state_change = _timestamp(state_change)
    return Session(
        pid=pid,
        backend_type=backend_type or CLIENT_BACKEND,
        state=state,
        usename=usename,
        datname=datname,
        application_name=application_name or "",
        client_addr=client_addr,
        client_port=client_port,
        backend_start=backend_start,
        xact_start=xact_start,
        query_start=query_start,
        state_change=state_change,
        wait_event_type=wait_event_type,
        wait_event=wait_event,
        query=query or "",
        leader_pid=leader_pid,
        backend_age_s=_age(taken_at, backend_start),
        xact_age_s=_age(taken_at, xact_start),
        query_age_s=_age(taken_at, query_start),
        state_age_s=_age(taken_at, state_change),
        is_superuser=superuser,
        blocked_by=None if blocked_by is None else tuple(blocked_by),
    )


def _mangled_uri(dsn: str) -> bool:
    """A URI whose password holds a raw '@' or '/': libpq would read part of the password as
    the host, port or database (and show it in every message, and look the host up)."""
    scheme, found, rest = dsn.strip().partition("://")
    if not found or scheme.lower() not in ("postgres", "postgresql"):
        return False
    before_query = rest.split("?", 1)[0]
    authority, _, path = before_query.partition("/")
    return authority.count("@") > 1 or "@" in path


def _reject_mangled_uri(dsn: str) -> None:
    if _mangled_uri(dsn):
        raise ConnectFailed(
            "the given URI",
            "its user:password part holds a raw '@' or '/' (percent-encode them: @ is %40, "
            "/ is %2F), or give the password in PGPASSWORD or ~/.pgpass",
        )


def _age(taken_at: datetime, then: datetime | None) -> float | None:
    # Clamped: the clock CTE may be read a moment before a backend's own timestamp.
    return None if then is None else max((taken_at - then).total_seconds(), 0.0)


def _timestamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _role_config(entries: Sequence[str] | None) -> dict[str, str]:
    """``rolconfig`` (``{statement_timeout=30s, ...}``) as a mapping."""
    config: dict[str, str] = {}
    for entry in entries or ():
        name, _, value = entry.partition("=")
        config[name] = value
    return config


def _server_lines(message: str) -> list[str]:
    """libpq's message, one line per attempted host, without the "connection failed:" prefix."""
    lines = []
    for raw in message.splitlines():
        line = _one_line(raw.removeprefix("connection failed:"))
        if line:
            lines.append(line)
    return lines


def _strip_severity(line: str) -> str:
    """PostgreSQL's own text from a libpq line, e.g. 'sorry, too many clients already'."""
    _, found, rest = line.partition("FATAL:")
    return rest.strip() if found else line


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


@cache
def _conninfo_keywords() -> frozenset[str]:
    return frozenset(
        option.keyword.decode() for option in pq.Conninfo.get_defaults() if option.keyword
    )


def _redact(error: object) -> str:
    """A DSN parse error without the fragments it quotes, which may be (part of) a password."""
    keywords = _conninfo_keywords()
    text = _one_line(error)

    def hide(match: re.Match[str]) -> str:
        quoted = match.group(1)
        if text[: match.start()].endswith(_NAMES_ONLY) or quoted in keywords or quoted == "=":
            return match.group(0)
        return '"…"'

    return _QUOTED.sub(hide, text)


# Whether PgBouncer's auth_query can work in the connected database: the lookup role, and the
# SECURITY DEFINER function a DBA installs (pgbouncer_auth.install_statements).
_AUTH_CHECK_QUERY = """
select pg_catalog.current_database()::text,
       r.oid is not null,
       coalesce(r.rolcanlogin, false),
       p.oid is not null,
       coalesce(p.prosecdef, false),
       coalesce((select o.rolsuper from pg_catalog.pg_roles o where o.oid = p.proowner), false),
       case when r.oid is not null and p.oid is not null
            then pg_catalog.has_schema_privilege(r.oid, n.oid, 'USAGE')
                 and pg_catalog.has_function_privilege(r.oid, p.oid, 'EXECUTE')
            else false end
  from (select 1) as one
  left join pg_catalog.pg_roles r on r.rolname = %(role)s
  left join pg_catalog.pg_namespace n on n.nspname = %(schema)s
  left join pg_catalog.pg_proc p
         on p.pronamespace = n.oid and p.proname = %(function)s and p.pronargs = 1
        and p.proargtypes[0] = 'pg_catalog.text'::pg_catalog.regtype
"""


def pgbouncer_auth_check(conn: psycopg.Connection[Any], query: AuthQuerySpec) -> AuthFunctionCheck:
    """What the connected database says about ``query``'s lookup role and function.

    Connect to each database ``pgbouncer_auth.auth_databases`` names; a check that is
    not ``ready`` becomes the condition with the SQL to fix it (``auth_condition``).
    """
    row = conn.execute(
        _AUTH_CHECK_QUERY,
        {"role": query.user, "schema": query.schema_name, "function": query.function},
    ).fetchone()
    if row is None:  # a select without FROM filters returns one row; keep mypy and us honest
        raise PgreliefError("the auth_query check returned no row")
    return AuthFunctionCheck(
        database=str(row[0]),
        role_exists=bool(row[1]),
        role_can_login=bool(row[2]),
        function_exists=bool(row[3]),
        security_definer=bool(row[4]),
        owner_is_superuser=bool(row[5]),
        executable=bool(row[6]),
    )
