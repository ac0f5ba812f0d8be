"""Small builders for plan tests: snapshots, sessions and policies with only what a test sets.

The plan is pure, so its tests build Snapshot objects directly; these helpers keep each test
down to the facts it is about.
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
    CLIENT_BACKEND,
    DatabaseInfo,
    RoleInfo,
    Session,
    Setting,
    Snapshot,
)
from tests import factories

NOW = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)
OWN_PID = 99


def session(
    pid: int,
    state: str | None = "idle",
    age_s: float = 3600.0,
    *,
    usename: str | None = "app",
    datname: str | None = "shop",
    application_name: str = "web",
    client_addr: str | None = "10.0.0.5",
    backend_type: str = CLIENT_BACKEND,
    is_superuser: bool | None = False,
    query: str = "select 1",
    backend_age_s: float | None = None,
) -> Session:
    """A session that has been in ``state`` for ``age_s`` seconds at NOW."""
    state_change = NOW - timedelta(seconds=age_s)
    backend_age = backend_age_s if backend_age_s is not None else age_s + 60.0
    return Session(
        pid=pid,
        backend_type=backend_type,
        state=state,
        usename=usename,
        datname=datname,
        application_name=application_name,
        client_addr=client_addr,
        client_port=50000 + pid if client_addr else None,
        backend_start=NOW - timedelta(seconds=backend_age),
        xact_start=state_change if state and "transaction" in state else None,
        query_start=state_change,
        state_change=state_change,
        wait_event_type="Client" if state and state.startswith("idle") else None,
        wait_event="ClientRead" if state and state.startswith("idle") else None,
        query=query,
        backend_age_s=backend_age,
        xact_age_s=age_s if state and "transaction" in state else None,
        query_age_s=age_s,
        state_age_s=age_s,
        is_superuser=is_superuser,
    )


def settings(**values: tuple[str, str | None] | str) -> dict[str, Setting]:
    """``settings(tcp_keepalives_idle=("0", "s"))``; every setting is reloadable ('user')."""
    out: dict[str, Setting] = {}
    for name, value in values.items():
        setting, unit = value if isinstance(value, tuple) else (value, None)
        out[name] = Setting(name=name, setting=setting, unit=unit, context="user")
    return out


DEFAULT_SETTINGS: Mapping[str, Setting] = settings(
    idle_in_transaction_session_timeout=("0", "ms"),
    idle_session_timeout=("0", "ms"),
    statement_timeout=("0", "ms"),
    tcp_keepalives_idle=("0", "s"),
    tcp_keepalives_interval=("0", "s"),
    tcp_keepalives_count="0",
    client_connection_check_interval=("0", "ms"),
)


def snapshot(
    sessions: Iterable[Session] = (),
    *,
    roles: Iterable[RoleInfo] = (),
    databases: Iterable[DatabaseInfo] = (),
    server_settings: Mapping[str, Setting] | None = None,
    max_connections: int = 100,
    superuser_reserved: int = 3,
    reserved: int = 0,
    version_num: int | None = 170002,
    own_pid: int | None = OWN_PID,
) -> Snapshot:
    """factories.snapshot with plan's defaults: a PG17 server with the managed settings set."""
    return factories.snapshot(
        sessions,
        roles=roles,
        databases=databases,
        server_settings=DEFAULT_SETTINGS if server_settings is None else server_settings,
        max_connections=max_connections,
        superuser_reserved=superuser_reserved,
        reserved=reserved,
        version_num=version_num,
        own_pid=own_pid,
        taken_at=NOW,
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
