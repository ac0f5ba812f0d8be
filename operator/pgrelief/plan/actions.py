"""What a plan is made of: the actions, the sessions spared, the history, and their keys.

These types are the contract between ``plan`` (which builds them), ``act`` (which performs
them and writes one audit record each from ``action``, ``target``, ``reason`` and
``evidence``) and the history stores (which keep the originals under the keys defined here).
Each limit or setting change carries the one ``statements.Statement`` it performs, so the text
it shows and the statement ``act`` executes cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pgrelief import statements as stmt
from pgrelief.advice import action_sql
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.durations import human_age
from pgrelief.statements import Statement

HOUR = timedelta(hours=1)


def role_key(role: str, item: str) -> str:
    """History key of a role's connection limit (``item='connection_limit'``) or setting."""
    return f"role:{role}:{item}"


def database_key(database: str) -> str:
    return f"database:{database}:connection_limit"


def system_key(setting: str) -> str:
    return f"system:{setting}"


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(kind, name, item) of a history key; names may contain ':' (items and GUCs cannot)."""
    kind, _, rest = key.partition(":")
    if kind == "system" and rest:
        return kind, "", rest
    if kind in ("role", "database"):
        name, _, item = rest.rpartition(":")
        if name and item:
            return kind, name, item
    return None


def session_identity(pid: int, backend_start: datetime | None) -> tuple[int, str | None]:
    """A session, not just its pid: a pid is reused by later backends."""
    return (pid, _iso(backend_start))


QueryIdentity = tuple[int, str | None, str | None]


def query_identity(
    pid: int, backend_start: datetime | None, query_start: datetime | None
) -> QueryIdentity:
    """One query of one session: what a cancel is remembered by until it escalates."""
    return (pid, _iso(backend_start), _iso(query_start))


@dataclass(frozen=True, slots=True)
class TerminateBackend:
    """pg_terminate_backend(pid), re-checked by ``act`` against backend_start, state and
    state_change in the same statement.

    An escalation (a query still running ``escalateAfter`` after pgrelief cancelled it) is a
    termination of an 'active' session: its state_change is the moment that query started
    (PostgreSQL moves it with every new statement), so the same re-check pins the query."""

    action: ClassVar[str] = "terminate"

    pid: int
    backend_start: datetime | None
    state: str | None
    state_change: datetime | None
    usename: str | None
    datname: str | None
    application_name: str
    client_addr: str | None
    rule: str  # the policy field, e.g. 'idleInTransactionAfter'
    age_s: float  # time in the current state
    threshold: str = ""  # the rule's duration as written in the policy
    backend_age_s: float | None = None
    xact_age_s: float | None = None
    last_query: str = ""
    pressure: str = ""
    query_start: datetime | None = None
    cancelled_ago_s: float | None = None  # an escalation: when pgrelief cancelled the query

    @property
    def target(self) -> str:
        return f"pid {self.pid}"

    @property
    def identity(self) -> tuple[int, str | None]:
        return session_identity(self.pid, self.backend_start)

    @property
    def reason(self) -> str:
        rule = f"rule {self.rule}: {self.threshold or '?'}"
        if self.cancelled_ago_s is not None:
            return (
                f"{self.state} for {human_age(self.age_s)}, still running "
                f"{human_age(self.cancelled_ago_s)} after pgrelief cancelled it ({rule})"
            )
        return f"{self.state} for {human_age(self.age_s)} ({rule})"

    @property
    def evidence(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "usename": self.usename,
            "datname": self.datname,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "state": self.state,
            "state_age_s": round(self.age_s, 3),
            "backend_age_s": _round(self.backend_age_s),
            "xact_age_s": _round(self.xact_age_s),
            "backend_start": _iso(self.backend_start),
            "state_change": _iso(self.state_change),
            "rule": self.rule,
            "threshold": self.threshold,
            "pressure": self.pressure,
            "last_query": self.last_query,
            **(
                {}
                if self.cancelled_ago_s is None
                else {
                    "query_start": _iso(self.query_start),
                    "cancelled_ago_s": round(self.cancelled_ago_s, 3),
                }
            ),
        }


@dataclass(frozen=True, slots=True)
class CancelQuery:
    """pg_cancel_backend(pid) for a query running longer than ``cancel.activeAfter``,
    re-checked by ``act`` against backend_start and query_start (and state 'active') in the
    same statement, so a query that finished, or the next one, is never cancelled."""

    action: ClassVar[str] = "cancel"

    pid: int
    backend_start: datetime | None
    query_start: datetime | None
    usename: str | None
    datname: str | None
    application_name: str
    client_addr: str | None
    age_s: float  # how long the query has been running
    threshold: str = ""
    rule: str = "activeAfter"
    state: str = "active"
    backend_age_s: float | None = None
    xact_age_s: float | None = None
    last_query: str = ""
    pressure: str = ""

    @property
    def target(self) -> str:
        return f"pid {self.pid}"

    @property
    def identity(self) -> tuple[int, str | None]:
        return session_identity(self.pid, self.backend_start)

    @property
    def query(self) -> QueryIdentity:
        return query_identity(self.pid, self.backend_start, self.query_start)

    @property
    def reason(self) -> str:
        return (
            f"query running for {human_age(self.age_s)} (rule {self.rule}: {self.threshold or '?'})"
        )

    @property
    def evidence(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "usename": self.usename,
            "datname": self.datname,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "state": self.state,
            "query_age_s": round(self.age_s, 3),
            "backend_age_s": _round(self.backend_age_s),
            "xact_age_s": _round(self.xact_age_s),
            "backend_start": _iso(self.backend_start),
            "query_start": _iso(self.query_start),
            "rule": self.rule,
            "threshold": self.threshold,
            "pressure": self.pressure,
            "last_query": self.last_query,
        }


# What the session rules plan: each interrupts one session and counts against the budget.
SessionAction = TerminateBackend | CancelQuery


@dataclass(frozen=True, slots=True)
class SetRoleConnectionLimit:
    """ALTER ROLE <role> CONNECTION LIMIT <limit>."""

    action: ClassVar[str] = "alter_role"

    role: str
    limit: int
    previous: int | None
    reason: str = ""

    @property
    def target(self) -> str:
        return f"role {quote_ident(self.role)}"

    @property
    def key(self) -> str:
        return role_key(self.role, "connection_limit")

    @property
    def evidence(self) -> dict[str, Any]:
        return {"role": self.role, "connection_limit": self.limit, "previous": self.previous}

    @property
    def statement(self) -> Statement:
        return stmt.alter_role_connection_limit(self.role, self.limit)

    @property
    def sql_text(self) -> str:
        return action_sql(self.statement)


@dataclass(frozen=True, slots=True)
class SetRoleSetting:
    """ALTER ROLE <role> SET <setting> = <value>, or RESET <setting> when value is None."""

    action: ClassVar[str] = "alter_role"

    role: str
    setting: str
    value: str | None
    previous: str | None
    reason: str = ""

    @property
    def target(self) -> str:
        return f"role {quote_ident(self.role)}"

    @property
    def key(self) -> str:
        return role_key(self.role, self.setting)

    @property
    def evidence(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "setting": self.setting,
            "value": self.value,
            "previous": self.previous,
        }

    @property
    def statement(self) -> Statement:
        return stmt.alter_role_set(self.role, self.setting, self.value)

    @property
    def sql_text(self) -> str:
        return action_sql(self.statement)


@dataclass(frozen=True, slots=True)
class SetDatabaseConnectionLimit:
    """ALTER DATABASE <database> CONNECTION LIMIT <limit>."""

    action: ClassVar[str] = "alter_database"

    database: str
    limit: int
    previous: int | None
    reason: str = ""

    @property
    def target(self) -> str:
        return f"database {quote_ident(self.database)}"

    @property
    def key(self) -> str:
        return database_key(self.database)

    @property
    def evidence(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "connection_limit": self.limit,
            "previous": self.previous,
        }

    @property
    def statement(self) -> Statement:
        return stmt.alter_database_connection_limit(self.database, self.limit)

    @property
    def sql_text(self) -> str:
        return action_sql(self.statement)


@dataclass(frozen=True, slots=True)
class SetSystemSetting:
    """ALTER SYSTEM SET <setting> = <value> (RESET when None), then pg_reload_conf().
    Only for settings a reload applies (pg_settings.context sighup, superuser or user)."""

    action: ClassVar[str] = "alter_system"

    setting: str
    value: str | None
    previous: str | None
    reason: str = ""

    @property
    def target(self) -> str:
        return f"setting {self.setting}"

    @property
    def key(self) -> str:
        return system_key(self.setting)

    @property
    def evidence(self) -> dict[str, Any]:
        return {"setting": self.setting, "value": self.value, "previous": self.previous}

    @property
    def statement(self) -> Statement:
        """The ALTER SYSTEM alone: ``act`` reloads once after all of a cycle's settings."""
        return stmt.alter_system_set(self.setting, self.value)

    @property
    def sql_text(self) -> str:
        return action_sql(self.statement, stmt.RELOAD_CONF)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Something pgrelief will not do itself (a restart, a missing role, a GRANT): reported."""

    action: ClassVar[str] = "recommend"

    text: str
    setting: str | None = None
    subject: str | None = None  # the target when it is not a setting, e.g. 'role "app"'
    facts: tuple[tuple[str, Any], ...] = ()

    @property
    def target(self) -> str:
        if self.subject:
            return self.subject
        return f"setting {self.setting}" if self.setting else "server"

    @property
    def reason(self) -> str:
        return self.text

    @property
    def evidence(self) -> dict[str, Any]:
        return dict(self.facts)


Action = (
    TerminateBackend
    | CancelQuery
    | SetRoleConnectionLimit
    | SetRoleSetting
    | SetDatabaseConnectionLimit
    | SetSystemSetting
    | Recommendation
)
Change = SetRoleConnectionLimit | SetRoleSetting | SetDatabaseConnectionLimit | SetSystemSetting


@dataclass(frozen=True, slots=True)
class SkippedSession:
    """A session a terminate or cancel rule matched but pgrelief left alone, and why."""

    why: str
    candidate: SessionAction

    @property
    def pid(self) -> int:
        return self.candidate.pid

    @property
    def target(self) -> str:
        return self.candidate.target

    @property
    def reason(self) -> str:
        return self.candidate.reason

    @property
    def evidence(self) -> dict[str, Any]:
        return self.candidate.evidence


@dataclass(frozen=True, slots=True)
class PlanHistory:
    """What earlier cycles did: when sessions were interrupted (for maxPerHour), the queries
    pgrelief cancelled (for escalation) and recorded originals."""

    # One time per session terminated or query cancelled: both count against the budget.
    terminations: Sequence[datetime] = ()
    originals: Mapping[str, str | None] = field(default_factory=dict)
    # Sessions an attempt failed on (permission denied, ...): identity -> not before this time.
    backoff: Mapping[tuple[int, str | None], datetime] = field(default_factory=dict)
    # Queries pgrelief cancelled and that were still running when last seen -> when.
    cancelled: Mapping[QueryIdentity, datetime] = field(default_factory=dict)

    def terminations_within(self, now: datetime, window: timedelta = HOUR) -> int:
        """Budget spent in the sliding window ending at ``now`` (future times count too)."""
        return sum(1 for when in self.terminations if when > now - window)


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions of one cycle, the sessions deliberately left alone, and the originals to
    record before the first change of each limit or setting."""

    actions: tuple[Action, ...] = ()
    skipped: tuple[SkippedSession, ...] = ()
    originals: Mapping[str, str | None] = field(default_factory=dict)
    budget_exhausted: bool = False
    # On the server's clock: when the next session this plan did not act on becomes one a
    # rule acts on (a threshold crossed, a cancel's grace over, budget or backoff free again),
    # pressure permitting; None when no session is on its way there.
    next_deadline: datetime | None = None

    @property
    def terminations(self) -> tuple[TerminateBackend, ...]:
        return tuple(a for a in self.actions if isinstance(a, TerminateBackend))

    @property
    def cancels(self) -> tuple[CancelQuery, ...]:
        return tuple(a for a in self.actions if isinstance(a, CancelQuery))

    @property
    def session_actions(self) -> tuple[SessionAction, ...]:
        """Terminations and cancels, in the order the budget chose them (harm order)."""
        return tuple(a for a in self.actions if isinstance(a, TerminateBackend | CancelQuery))

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(
            a
            for a in self.actions
            if isinstance(
                a,
                SetRoleConnectionLimit
                | SetRoleSetting
                | SetDatabaseConnectionLimit
                | SetSystemSetting,
            )
        )

    @property
    def recommendations(self) -> tuple[Recommendation, ...]:
        return tuple(a for a in self.actions if isinstance(a, Recommendation))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
