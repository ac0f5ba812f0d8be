"""The one set of test builders: sessions, snapshots, settings, roles, databases, policies.

Tests of the pure core (diagnose, advice, plan) build their inputs here, so each test states
only the facts it is about. Ages are the inputs (how long a session has been in its state,
running its query, ...), the way an incident is described; the timestamps pg_stat_activity
would show are derived from them and the snapshot time, so both views always agree. A session
is of a known non-superuser unless a test says otherwise (``is_superuser=None``: unknown, as
in a dump).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pgrelief.plan import (
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
)
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.snapshot import (
    ACTIVE,
    CLIENT_BACKEND,
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    DatabaseInfo,
    RoleInfo,
    ServerFacts,
    Session,
    Setting,
    Snapshot,
)

TAKEN_AT = datetime(2025, 3, 14, 12, 0, 0, 123456, tzinfo=UTC)
OWN_PID = 99  # pgrelief's own backend, when a test puts it in the snapshot
_IN_TRANSACTION = (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED)


def session(
    pid: int,
    state: str | None = IDLE,
    state_age: float | None = 1.0,
    *,
    usename: str | None = "app",
    application_name: str = "web",
    client_addr: str | None = "10.0.0.1",
    datname: str | None = "appdb",
    backend_type: str = CLIENT_BACKEND,
    query_age: float | None = None,
    xact_age: float | None = None,
    backend_age: float | None = None,
    query: str = "select 1",
    wait_event_type: str | None = None,
    wait_event: str | None = None,
    timestamps: bool = True,
    is_superuser: bool | None = False,
    taken_at: datetime = TAKEN_AT,
) -> Session:
    """A pg_stat_activity row; ages in seconds, timestamps derived (None if not ``timestamps``)."""
    if query_age is None and state_age is not None:
        query_age = state_age if state == ACTIVE else state_age + 0.5
    if xact_age is None and state in (*_IN_TRANSACTION, ACTIVE) and query_age is not None:
        xact_age = query_age + (0.0 if state == ACTIVE else 1.0)
    if backend_age is None:
        backend_age = max(a for a in (state_age, query_age, xact_age, 0.0) if a is not None) + 60

    def at(age: float | None) -> datetime | None:
        if not timestamps or age is None:
            return None
        return taken_at - timedelta(seconds=age)

    if backend_type != CLIENT_BACKEND and wait_event_type is None:
        wait_event_type = "Activity"
    return Session(
        pid=pid,
        backend_type=backend_type,
        state=state,
        usename=usename,
        datname=datname,
        application_name=application_name,
        client_addr=client_addr,
        client_port=None if client_addr is None else 40000 + pid % 20000,
        backend_start=at(backend_age),
        xact_start=at(xact_age),
        query_start=at(query_age),
        state_change=at(state_age),
        wait_event_type=wait_event_type,
        wait_event=wait_event,
        query=query,
        backend_age_s=backend_age,
        xact_age_s=xact_age,
        query_age_s=query_age,
        state_age_s=state_age,
        is_superuser=is_superuser,
    )


def many(count: int, first_pid: int, state: str | None = IDLE, **fields: object) -> list[Session]:
    """``count`` sessions alike but for consecutive pids from ``first_pid``."""
    return [session(first_pid + i, state, **fields) for i in range(count)]  # type: ignore[arg-type]


def setting(name: str, value: str, unit: str | None = None, context: str | None = None) -> Setting:
    return Setting(name=name, setting=value, unit=unit, context=context)


def settings(*items: Setting, **values: tuple[str, str | None] | str) -> dict[str, Setting]:
    """pg_settings rows by name: ``Setting`` items as given, and ``name=value`` or
    ``name=(value, unit)`` as a live server reports a reloadable setting (context 'user')."""
    out = {item.name: item for item in items}
    for name, value in values.items():
        text, unit = value if isinstance(value, tuple) else (value, None)
        out[name] = setting(name, text, unit, "user")
    return out


# Every setting plan manages, off, as a fresh server reports them.
MANAGED_SETTINGS: Mapping[str, Setting] = settings(
    idle_in_transaction_session_timeout=("0", "ms"),
    idle_session_timeout=("0", "ms"),
    statement_timeout=("0", "ms"),
    tcp_keepalives_idle=("0", "s"),
    tcp_keepalives_interval=("0", "s"),
    tcp_keepalives_count="0",
    client_connection_check_interval=("0", "ms"),
    transaction_timeout=("0", "ms"),
)


def snapshot(
    sessions: Iterable[Session] = (),
    *,
    max_connections: int = 100,
    superuser_reserved: int = 3,
    reserved: int = 0,
    version_num: int | None = 180000,
    server_settings: Mapping[str, Setting] | None = None,
    roles: Iterable[RoleInfo] = (),
    databases: Iterable[DatabaseInfo] = (),
    own_pid: int | None = None,
    source: str = "test",
    taken_at: datetime = TAKEN_AT,
) -> Snapshot:
    """A Snapshot of ``sessions`` on a server with the given slot settings."""
    return Snapshot(
        taken_at=taken_at,
        server=ServerFacts(
            version_num=version_num,
            max_connections=max_connections,
            superuser_reserved_connections=superuser_reserved,
            reserved_connections=reserved,
            settings=dict(server_settings or {}),
        ),
        sessions=tuple(sessions),
        roles={role.name: role for role in roles},
        databases={database.name: database for database in databases},
        own_pid=own_pid,
        source=source,
    )


def background(pid: int, backend_type: str = "autovacuum worker") -> Session:
    """A non-client backend (no user, no state), as pg_stat_activity shows them."""
    return session(
        pid,
        None,
        usename=None,
        application_name="",
        client_addr=None,
        datname=None,
        backend_type=backend_type,
        state_age=None,
        query="",
    )


def role(
    name: str,
    connection_limit: int = -1,
    *,
    is_superuser: bool = False,
    config: Mapping[str, str] | None = None,
) -> RoleInfo:
    return RoleInfo(
        name=name,
        connection_limit=connection_limit,
        is_superuser=is_superuser,
        config=dict(config or {}),
    )


def database(name: str, connection_limit: int = -1) -> DatabaseInfo:
    return DatabaseInfo(name=name, connection_limit=connection_limit)


def spec(**sections: Any) -> ConnectionPolicySpec:
    """A policy spec from camelCase sections, e.g. ``spec(remediation={"mode": "Enforce"})``."""
    return ConnectionPolicySpec.model_validate(sections)


def enforce(
    *,
    terminate: Mapping[str, str] | None = None,
    budget: Mapping[str, int] | None = None,
    protect: Mapping[str, Any] | None = None,
    only_under_pressure: bool = True,
    limits: Mapping[str, Any] | None = None,
    mode: str = "Enforce",
    cancel: Mapping[str, str] | None = None,
    select: Mapping[str, Any] | None = None,
) -> ConnectionPolicySpec:
    """An Enforce policy terminating idle sessions after 10m unless told otherwise."""
    remediation: dict[str, Any] = {
        "mode": mode,
        "onlyUnderPressure": only_under_pressure,
        "terminate": dict(terminate if terminate is not None else {"idleAfter": "10m"}),
    }
    if budget is not None:
        remediation["budget"] = dict(budget)
    if protect is not None:
        remediation["protect"] = dict(protect)
    if cancel is not None:
        remediation["cancel"] = dict(cancel)
    if select is not None:
        remediation["select"] = dict(select)
    sections: dict[str, Any] = {"remediation": remediation}
    if limits is not None:
        sections["limits"] = dict(limits)
    return spec(**sections)


def apply_changes(before: Snapshot, changes: Iterable[object]) -> Snapshot:
    """The snapshot a server would show after ``act`` performed ``changes`` (for idempotence)."""
    roles = dict(before.roles)
    databases = dict(before.databases)
    server_settings = dict(before.server.settings)
    for change in changes:
        if isinstance(change, SetRoleConnectionLimit):
            roles[change.role] = replace(roles[change.role], connection_limit=change.limit)
        elif isinstance(change, SetRoleSetting):
            config = dict(roles[change.role].config)
            if change.value is None:
                config.pop(change.setting, None)
            else:
                config[change.setting] = change.value
            roles[change.role] = replace(roles[change.role], config=config)
        elif isinstance(change, SetDatabaseConnectionLimit):
            databases[change.database] = replace(
                databases[change.database], connection_limit=change.limit
            )
        elif isinstance(change, SetSystemSetting):
            old = server_settings[change.setting]
            server_settings[change.setting] = replace(old, setting=_in_unit(change.value, old))
    return replace(
        before,
        roles=roles,
        databases=databases,
        server=replace(before.server, settings=server_settings),
    )


def _in_unit(value: str | None, old: Setting) -> str:
    """What pg_settings.setting shows after ALTER SYSTEM SET value (RESET -> '0' here)."""
    if value is None:
        return "0"
    units = {"ms": 1.0, "s": 1000.0, "min": 60000.0}
    for suffix in ("ms", "min", "s"):
        if value.endswith(suffix) and old.unit in units:
            milliseconds = float(value[: -len(suffix)]) * units[suffix]
            return str(int(milliseconds / units[old.unit]))
    return value


__all__ = [
    "ACTIVE",
    "IDLE",
    "IDLE_IN_TRANSACTION",
    "IDLE_IN_TRANSACTION_ABORTED",
    "MANAGED_SETTINGS",
    "OWN_PID",
    "TAKEN_AT",
    "DatabaseInfo",
    "RoleInfo",
    "apply_changes",
    "background",
    "database",
    "enforce",
    "many",
    "role",
    "session",
    "setting",
    "settings",
    "snapshot",
    "spec",
]
