"""The plain data one observation of a server produces.

A ``Snapshot`` is what ``observe`` (live, over psycopg) and ``dumps`` (offline, from a pasted
pg_stat_activity dump) both return, and the only thing ``diagnose`` reads. Keeping it plain,
immutable data is what lets the core be tested without a server and lets a dump and a live
server give the same diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

CLIENT_BACKEND = "client backend"

# PostgreSQL's names for pg_stat_activity.state: they are the JSON keys of by_state too.
ACTIVE = "active"
IDLE = "idle"
IDLE_IN_TRANSACTION = "idle in transaction"
IDLE_IN_TRANSACTION_ABORTED = "idle in transaction (aborted)"
FASTPATH = "fastpath function call"
DISABLED = "disabled"
STATES: tuple[str, ...] = (
    ACTIVE,
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    FASTPATH,
    DISABLED,
)
NO_STATE = "unknown"  # a NULL state: another user's session seen without pg_read_all_stats

# PostgreSQL's own defaults, used when a dump comes without pg_settings.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_SUPERUSER_RESERVED = 3
DEFAULT_RESERVED = 0

_MEMORY_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_UNITS = {"us": 1e-6, "ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


# Not frozen: a frozen dataclass sets each field through object.__setattr__, about 8x the cost
# of a plain one, which dominated reading 100k-row dumps. Treat it as immutable all the same.
@dataclass(slots=True, unsafe_hash=True)
class Session:
    """One row of pg_stat_activity, with ages measured on the server's clock."""

    pid: int
    backend_type: str
    state: str | None
    usename: str | None
    datname: str | None
    application_name: str
    client_addr: str | None  # None: a Unix-domain socket (or not visible to us)
    client_port: int | None
    backend_start: datetime | None
    xact_start: datetime | None
    query_start: datetime | None
    state_change: datetime | None
    wait_event_type: str | None
    wait_event: str | None
    query: str
    leader_pid: int | None = None
    backend_age_s: float | None = None
    xact_age_s: float | None = None
    query_age_s: float | None = None
    state_age_s: float | None = None
    is_superuser: bool | None = None  # None: unknown (a dump has no pg_roles)
    # pg_blocking_pids() of a session waiting on a lock; None when not observed (a dump, or
    # a session not waiting on a lock: it is asked only of those).
    blocked_by: tuple[int, ...] | None = None

    @property
    def is_client(self) -> bool:
        return self.backend_type == CLIENT_BACKEND

    @property
    def state_key(self) -> str:
        return self.state or NO_STATE

    @property
    def client_key(self) -> str:
        return self.client_addr or "local socket"

    @property
    def is_waiting_on_lock(self) -> bool:
        return self.wait_event_type == "Lock"

    @property
    def is_listener(self) -> bool:
        """A session whose last statement was LISTEN: it holds a channel subscription."""
        return is_listen(self.query)


def is_listen(query: str) -> bool:
    """Whether a last statement is LISTEN (the session holds a notification channel)."""
    return query.lstrip().upper().startswith("LISTEN ")


@dataclass(frozen=True, slots=True)
class Setting:
    """One pg_settings row, kept raw so units are interpreted the way PostgreSQL does."""

    name: str
    setting: str
    unit: str | None = None
    context: str | None = None
    # Where the value came from (pg_settings.source, .sourcefile): provenance, not the value,
    # so not compared (a dump does not carry it). sourcefile needs pg_read_all_settings.
    source: str | None = field(default=None, compare=False)
    sourcefile: str | None = field(default=None, compare=False)

    @property
    def set_by_alter_system(self) -> bool | None:
        """Whether the value comes from ALTER SYSTEM (postgresql.auto.conf); None: unknown."""
        if self.source is None:
            return None
        if self.source != "configuration file":
            return False
        if self.sourcefile is None:
            return None
        return self.sourcefile.endswith("postgresql.auto.conf")

    def as_int(self) -> int:
        return int(float(self.setting))

    def as_bytes(self) -> int | None:
        """Memory settings in bytes (``shared_buffers`` is in 8kB blocks); None if not memory."""
        if self.setting == "-1":
            return None
        unit = self.unit or "B"
        match = next(
            (u for u in sorted(_MEMORY_UNITS, key=len, reverse=True) if unit.endswith(u)), None
        )
        if match is None:
            return None
        multiplier = unit[: -len(match)] or "1"
        return int(float(self.setting) * int(multiplier) * _MEMORY_UNITS[match])

    def as_seconds(self) -> float | None:
        """Time settings in seconds; None for 0/-1 (PostgreSQL's 'disabled') or non-time."""
        if self.unit not in _TIME_UNITS:
            return None
        value = float(self.setting)
        if value <= 0:
            return None
        return value * _TIME_UNITS[self.unit]


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """Connection-slot arithmetic and the settings the advice depends on."""

    version_num: int | None
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int
    settings: Mapping[str, Setting] = field(default_factory=dict)
    assumed: tuple[str, ...] = ()  # settings taken from PostgreSQL's defaults, not observed

    @property
    def usable_slots(self) -> int:
        """Slots an ordinary role can take before 'sorry, too many clients already'."""
        return max(
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections,
            0,
        )

    def setting_bytes(self, name: str) -> int | None:
        found = self.settings.get(name)
        return found.as_bytes() if found else None

    def setting_seconds(self, name: str) -> float | None:
        found = self.settings.get(name)
        return found.as_seconds() if found else None

    def setting_int(self, name: str) -> int | None:
        found = self.settings.get(name)
        try:
            return found.as_int() if found else None
        except ValueError:
            return None


def given_max_connections(facts: ServerFacts, max_connections: int) -> ServerFacts:
    """``facts`` with the max_connections a user stated (offline input without settings):
    no longer assumed, and the settings agree with it."""
    settings = dict(facts.settings)
    settings["max_connections"] = Setting(
        "max_connections", str(max_connections), None, "postmaster"
    )
    return replace(
        facts,
        max_connections=max_connections,
        settings=settings,
        assumed=tuple(name for name in facts.assumed if name != "max_connections"),
    )


@dataclass(frozen=True, slots=True)
class RoleInfo:
    """pg_roles: the connection limit and per-role settings pgrelief may change."""

    name: str
    connection_limit: int  # -1: no limit
    is_superuser: bool = False
    can_login: bool = True
    config: Mapping[str, str] = field(default_factory=dict)  # rolconfig for all databases


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """pg_database: the per-database connection limit."""

    name: str
    connection_limit: int
    allow_connections: bool = True


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one observation saw: sessions, settings and limits, at one server instant."""

    taken_at: datetime
    server: ServerFacts
    sessions: tuple[Session, ...]
    roles: Mapping[str, RoleInfo] = field(default_factory=dict)
    databases: Mapping[str, DatabaseInfo] = field(default_factory=dict)
    own_pid: int | None = None
    source: str = "live"

    @property
    def client_sessions(self) -> list[Session]:
        return [s for s in self.sessions if s.is_client]
