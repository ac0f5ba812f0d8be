"""Small builders of Sessions and Snapshots for tests of the pure core.

Ages are the inputs (how long a session has been in its state, running its query, ...), the
way an incident is described; the timestamps pg_stat_activity would show are derived from
them and the snapshot time, so both views always agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

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
_IN_TRANSACTION = (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED)


def session(
    pid: int,
    state: str | None = IDLE,
    *,
    usename: str | None = "app",
    application_name: str = "web",
    client_addr: str | None = "10.0.0.1",
    datname: str | None = "appdb",
    backend_type: str = CLIENT_BACKEND,
    state_age: float | None = 1.0,
    query_age: float | None = None,
    xact_age: float | None = None,
    backend_age: float | None = None,
    query: str = "select 1",
    wait_event_type: str | None = None,
    wait_event: str | None = None,
    timestamps: bool = True,
    is_superuser: bool | None = None,
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


def setting(name: str, value: str, unit: str | None = None) -> Setting:
    return Setting(name=name, setting=value, unit=unit)


def settings(*items: Setting) -> dict[str, Setting]:
    return {item.name: item for item in items}


def snapshot(
    sessions: Iterable[Session],
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


__all__ = [
    "ACTIVE",
    "IDLE",
    "IDLE_IN_TRANSACTION",
    "IDLE_IN_TRANSACTION_ABORTED",
    "TAKEN_AT",
    "DatabaseInfo",
    "RoleInfo",
    "background",
    "many",
    "session",
    "setting",
    "settings",
    "snapshot",
]
