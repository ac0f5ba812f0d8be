"""Deciding what to do about one snapshot, within the policy's limits: the guardrails live here.

``plan`` is a pure function of (policy, snapshot, pressure level, recent history, now): it
returns the actions ``act`` will perform (or, in DryRun, only report) and every session it
chose not to touch with the reason why. Keeping the decision pure is what lets the safety
rules of DESIGN.md be checked exhaustively with hypothesis instead of against a live server.

Decisions documented here once:

- ``mode: Off`` plans nothing at all: no terminations and no ALTER of any kind. ``DryRun``
  plans exactly what ``Enforce`` would; only the executor differs.
- Terminations need pressure (WARNING or CRITICAL) when ``onlyUnderPressure``; an UNKNOWN
  pressure is not pressure. Limits and timeouts are durable configuration and are applied
  whatever the pressure.
- A session whose superuser status is unknown counts as a superuser while
  ``protect.superusers`` is on. Unix-socket sessions (no client_addr) match no CIDR.
- Oldest first means the longest time in the current state; ties go to the lower pid.
- Limits are compared with what the server has and only differences are emitted, so a
  second cycle emits nothing and a value changed by hand is put back (drift).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pgrelief.advice import quote_literal
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.diagnosis import Severity
from pgrelief.durations import human_age, parse_duration
from pgrelief.policy import ConnectionPolicySpec, ProtectSpec, RoleLimit, ServerLimits
from pgrelief.snapshot import CLIENT_BACKEND, RoleInfo, Session, Setting, Snapshot

HOUR = timedelta(hours=1)
_UNDER_PRESSURE = frozenset({Severity.WARNING, Severity.CRITICAL})

# pg_settings.context values for which ALTER SYSTEM + pg_reload_conf() is enough.
RELOADABLE_CONTEXTS = frozenset({"sighup", "superuser", "user"})

# policy terminate rule -> the pg_stat_activity.state it applies to
_RULES: tuple[tuple[str, str], ...] = (
    ("idle in transaction", "idleInTransactionAfter"),
    ("idle in transaction (aborted)", "idleInTransactionAbortedAfter"),
    ("idle", "idleAfter"),
)

# PostgreSQL's time units (GUC syntax), in milliseconds; 'm' is not one of them.
_PG_TIME_UNITS_MS: dict[str, float] = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_PG_TIME_VALUE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*")

# Role settings pgrelief manages: all three are in milliseconds when written without a unit.
_ROLE_SETTING_MIN_VERSION: dict[str, int] = {
    "idle_in_transaction_session_timeout": 90600,
    "idle_session_timeout": 140000,
    "statement_timeout": 0,
}


@dataclass(frozen=True, slots=True)
class _ServerSetting:
    name: str  # the PostgreSQL setting
    attribute: str  # the ServerLimits attribute
    kind: str  # 'duration' (policy string), 'seconds' (policy int), 'count' (policy int)
    min_version: int = 0
    context: str = "user"  # PostgreSQL's, for when pg_settings did not report it


_SERVER_SETTINGS: tuple[_ServerSetting, ...] = (
    _ServerSetting(
        "idle_in_transaction_session_timeout", "idle_in_transaction_session_timeout", "duration"
    ),
    _ServerSetting("tcp_keepalives_idle", "tcp_keepalives_idle", "seconds"),
    _ServerSetting("tcp_keepalives_interval", "tcp_keepalives_interval", "seconds"),
    _ServerSetting("tcp_keepalives_count", "tcp_keepalives_count", "count"),
    _ServerSetting(
        "client_connection_check_interval", "client_connection_check_interval", "duration", 140000
    ),
)

# Settings that need a restart: pgrelief only ever recommends them.
_RESTART_ONLY: tuple[tuple[str, str, int], ...] = (
    ("max_connections", "max_connections", 0),
    ("superuser_reserved_connections", "superuser_reserved_connections", 0),
    ("reserved_connections", "reserved_connections", 160000),
)


# ---- actions -------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class TerminateBackend:
    """pg_terminate_backend(pid), re-checked by ``act`` against backend_start, state and
    state_change in the same statement."""

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

    @property
    def target(self) -> str:
        return f"pid {self.pid}"

    @property
    def reason(self) -> str:
        return (
            f"{self.state} for {human_age(self.age_s)} (rule {self.rule}: {self.threshold or '?'})"
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
            "state_age_s": round(self.age_s, 3),
            "backend_age_s": _round(self.backend_age_s),
            "xact_age_s": _round(self.xact_age_s),
            "backend_start": _iso(self.backend_start),
            "state_change": _iso(self.state_change),
            "rule": self.rule,
            "threshold": self.threshold,
            "pressure": self.pressure,
            "last_query": self.last_query,
        }


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
    def sql_text(self) -> str:
        return f"ALTER ROLE {quote_ident(self.role)} CONNECTION LIMIT {self.limit};"


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
    def sql_text(self) -> str:
        if self.value is None:
            return f"ALTER ROLE {quote_ident(self.role)} RESET {self.setting};"
        return (
            f"ALTER ROLE {quote_ident(self.role)} SET {self.setting} = {quote_literal(self.value)};"
        )


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
    def sql_text(self) -> str:
        return f"ALTER DATABASE {quote_ident(self.database)} CONNECTION LIMIT {self.limit};"


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
    def sql_text(self) -> str:
        if self.value is None:
            return f"ALTER SYSTEM RESET {self.setting}; SELECT pg_reload_conf();"
        return (
            f"ALTER SYSTEM SET {self.setting} = {quote_literal(self.value)}; "
            "SELECT pg_reload_conf();"
        )


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
    | SetRoleConnectionLimit
    | SetRoleSetting
    | SetDatabaseConnectionLimit
    | SetSystemSetting
    | Recommendation
)
Change = SetRoleConnectionLimit | SetRoleSetting | SetDatabaseConnectionLimit | SetSystemSetting


@dataclass(frozen=True, slots=True)
class SkippedSession:
    """A session a terminate rule matched but pgrelief did not terminate, and why."""

    why: str
    candidate: TerminateBackend

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
    """What earlier cycles did: termination times (for maxPerHour) and recorded originals."""

    terminations: Sequence[datetime] = ()
    originals: Mapping[str, str | None] = field(default_factory=dict)

    def terminations_within(self, now: datetime, window: timedelta = HOUR) -> int:
        """Terminations in the sliding window ending at ``now`` (future ones count too)."""
        return sum(1 for when in self.terminations if when > now - window)


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions of one cycle, the sessions deliberately left alone, and the originals to
    record before the first change of each limit or setting."""

    actions: tuple[Action, ...] = ()
    skipped: tuple[SkippedSession, ...] = ()
    originals: Mapping[str, str | None] = field(default_factory=dict)
    budget_exhausted: bool = False

    @property
    def terminations(self) -> tuple[TerminateBackend, ...]:
        return tuple(a for a in self.actions if isinstance(a, TerminateBackend))

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


# ---- planning ------------------------------------------------------------------------------


def plan(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    pressure: Severity,
    history: PlanHistory,
    now: datetime,
) -> Plan:
    """Everything the policy asks for that the snapshot shows is not yet so."""
    if policy_spec.remediation.mode == "Off":
        return Plan()
    terminations, skipped, exhausted = plan_terminations(
        policy_spec, snapshot, pressure, history, now
    )
    changes, recommendations = plan_limits(policy_spec, snapshot)
    originals: dict[str, str | None] = {}
    for change in changes:
        if change.key not in history.originals and change.key not in originals:
            originals[change.key] = _as_original(change.previous)
    return Plan(
        actions=(*terminations, *changes, *recommendations),
        skipped=skipped,
        originals=originals,
        budget_exhausted=exhausted,
    )


def plan_terminations(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    pressure: Severity,
    history: PlanHistory,
    now: datetime,
) -> tuple[tuple[TerminateBackend, ...], tuple[SkippedSession, ...], bool]:
    """Sessions to terminate (oldest first), sessions matched but spared, budget exhausted."""
    remediation = policy_spec.remediation
    terminate = remediation.terminate
    thresholds = {
        "idle in transaction": terminate.idle_in_transaction_after,
        "idle in transaction (aborted)": terminate.idle_in_transaction_aborted_after,
        "idle": terminate.idle_after,
    }
    networks = remediation.protect.networks()
    eligible: list[TerminateBackend] = []
    spared: list[SkippedSession] = []
    for session in snapshot.sessions:
        threshold = thresholds.get(session.state) if session.state is not None else None
        if threshold is None:
            continue
        age = _state_age(session, snapshot)
        if age is None or age < parse_duration(threshold):
            continue
        candidate = _candidate(session, age, threshold, pressure)
        why = protection(session, snapshot, remediation.protect, networks)
        if why is None:
            eligible.append(candidate)
        else:
            spared.append(SkippedSession(why, candidate))
    eligible.sort(key=_oldest_first)
    if remediation.only_under_pressure and pressure not in _UNDER_PRESSURE:
        why = f"not under pressure ({pressure.label}; onlyUnderPressure is set)"
        spared.extend(SkippedSession(why, c) for c in eligible)
        return (), _ordered(spared), False
    budget = remediation.budget
    used = history.terminations_within(now)
    hour_left = max(budget.max_per_hour - used, 0)
    allowed = min(budget.max_per_cycle, hour_left)
    chosen = tuple(eligible[:allowed])
    if len(eligible) > allowed:
        if hour_left < budget.max_per_cycle:
            why = f"over budget: maxPerHour {budget.max_per_hour} ({used} in the last hour)"
        else:
            why = f"over budget: maxPerCycle {budget.max_per_cycle}"
        spared.extend(SkippedSession(why, c) for c in eligible[allowed:])
    return chosen, _ordered(spared), len(eligible) > allowed


def protection(
    session: Session,
    snapshot: Snapshot,
    protect: ProtectSpec,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
) -> str | None:
    """Why ``session`` must not be terminated, or None when it may be."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if snapshot.own_pid is not None and session.pid == snapshot.own_pid:
        return "pgrelief's own session"
    if protect.superusers:
        superuser = is_superuser(session, snapshot)
        if superuser is None:
            return "superuser status unknown (protect.superusers)"
        if superuser:
            return "superuser (protect.superusers)"
    if session.usename is not None and session.usename in protect.roles:
        return f"protected role {quote_ident(session.usename)}"
    if session.application_name in protect.applications:
        return f"protected application {quote_literal(session.application_name)}"
    if session.datname is not None and session.datname in protect.databases:
        return f"protected database {quote_ident(session.datname)}"
    network = _covering_network(
        session.client_addr, protect.networks() if networks is None else networks
    )
    if network is not None:
        return f"protected client address {session.client_addr} (in {network})"
    if protect.listeners and session.is_listener:
        return "LISTEN session (protect.listeners)"
    return None


def is_superuser(session: Session, snapshot: Snapshot) -> bool | None:
    """The session's role's superuser flag, from the session or pg_roles; None if unknown."""
    if session.is_superuser is not None:
        return session.is_superuser
    role = snapshot.roles.get(session.usename) if session.usename is not None else None
    return role.is_superuser if role is not None else None


def plan_limits(
    policy_spec: ConnectionPolicySpec, snapshot: Snapshot
) -> tuple[tuple[Change, ...], tuple[Recommendation, ...]]:
    """ALTER ROLE/DATABASE/SYSTEM for what differs from the server; the rest as advice."""
    changes: list[Change] = []
    advice: list[Recommendation] = []
    version = snapshot.server.version_num
    for limit in policy_spec.limits.roles:
        _plan_role(limit, snapshot.roles.get(limit.name), version, changes, advice)
    for wanted in policy_spec.limits.databases:
        database = snapshot.databases.get(wanted.name)
        subject = f"database {quote_ident(wanted.name)}"
        if database is None:
            advice.append(
                Recommendation(
                    f"database {quote_ident(wanted.name)} does not exist on the server: its "
                    "connection limit is not applied (create it, or remove it from "
                    "spec.limits.databases)",
                    subject=subject,
                    facts=(("database", wanted.name),),
                )
            )
        elif database.connection_limit != wanted.connection_limit:
            changes.append(
                SetDatabaseConnectionLimit(
                    wanted.name,
                    wanted.connection_limit,
                    database.connection_limit,
                    reason=(
                        f"limits.databases[{wanted.name}].connectionLimit is "
                        f"{wanted.connection_limit}; the server has {database.connection_limit}"
                    ),
                )
            )
    _plan_server(policy_spec.limits.server, snapshot, changes, advice)
    return tuple(changes), tuple(advice)


def _plan_role(
    limit: RoleLimit,
    role: RoleInfo | None,
    version: int | None,
    changes: list[Change],
    advice: list[Recommendation],
) -> None:
    subject = f"role {quote_ident(limit.name)}"
    if role is None:
        advice.append(
            Recommendation(
                f"role {quote_ident(limit.name)} does not exist on the server: its limits are "
                "not applied (create the role, or remove it from spec.limits.roles)",
                subject=subject,
                facts=(("role", limit.name),),
            )
        )
        return
    if limit.connection_limit is not None and role.connection_limit != limit.connection_limit:
        changes.append(
            SetRoleConnectionLimit(
                role.name,
                limit.connection_limit,
                role.connection_limit,
                reason=(
                    f"limits.roles[{role.name}].connectionLimit is {limit.connection_limit}; "
                    f"the server has {role.connection_limit}"
                ),
            )
        )
    for setting, text in limit.settings().items():
        minimum = _ROLE_SETTING_MIN_VERSION.get(setting, 0)
        if version is not None and version < minimum:
            advice.append(
                Recommendation(
                    f"{setting} needs PostgreSQL {minimum // 10000}+; the server is "
                    f"{_version_text(version)}, so it is not set for role {quote_ident(role.name)}",
                    setting=setting,
                    subject=subject,
                    facts=(("role", role.name), ("version_num", version)),
                )
            )
            continue
        wanted_ms = _policy_ms(text)
        current = role.config.get(setting)
        if current is None or _pg_value_ms(current, "ms") != wanted_ms:
            changes.append(
                SetRoleSetting(
                    role.name,
                    setting,
                    format_pg_duration(wanted_ms),
                    current,
                    reason=(
                        f"limits.roles[{role.name}] wants {setting} {text}; the role has "
                        + (f"{current}" if current is not None else "none set")
                    ),
                )
            )


def _plan_server(
    server: ServerLimits,
    snapshot: Snapshot,
    changes: list[Change],
    advice: list[Recommendation],
) -> None:
    facts = snapshot.server
    version = facts.version_num
    for managed in _SERVER_SETTINGS:
        wanted = getattr(server, managed.attribute)
        if wanted is None:
            continue
        name = managed.name
        wanted_value, wanted_number = _wanted_server_value(managed, wanted)
        current = facts.settings.get(name)
        if version is not None and version < managed.min_version:
            advice.append(
                Recommendation(
                    f"{name} needs PostgreSQL {managed.min_version // 10000}+; the server is "
                    f"{_version_text(version)}, so it is not applied",
                    setting=name,
                    facts=(("version_num", version),),
                )
            )
            continue
        if current is None:
            advice.append(
                Recommendation(
                    f"the server did not report {name} (too old a version, or not visible to "
                    f"pgrelief's role), so it is not applied: ALTER SYSTEM SET {name} = "
                    f"{quote_literal(wanted_value)}; SELECT pg_reload_conf();",
                    setting=name,
                )
            )
            continue
        context = current.context or managed.context
        if context not in RELOADABLE_CONTEXTS:
            advice.append(
                Recommendation(
                    f"{name} cannot be applied by a reload on this server (context {context}): "
                    f"ALTER SYSTEM SET {name} = {quote_literal(wanted_value)}; then restart",
                    setting=name,
                    facts=(("context", context), ("setting", current.setting)),
                )
            )
            continue
        current_number = _setting_number(current)
        if current_number != wanted_number:
            changes.append(
                SetSystemSetting(
                    name,
                    wanted_value,
                    setting_text(current),
                    reason=(
                        f"limits.server wants {name} {wanted_value}; the server has "
                        f"{setting_text(current)}"
                    ),
                )
            )
    observed = {
        "max_connections": facts.max_connections,
        "superuser_reserved_connections": facts.superuser_reserved_connections,
        "reserved_connections": facts.reserved_connections,
    }
    for name, attribute, minimum in _RESTART_ONLY:
        wanted = getattr(server, attribute)
        if wanted is None:
            continue
        if version is not None and version < minimum:
            advice.append(
                Recommendation(
                    f"{name} needs PostgreSQL {minimum // 10000}+; the server is "
                    f"{_version_text(version)} (use superuser_reserved_connections instead)",
                    setting=name,
                    facts=(("version_num", version),),
                )
            )
            continue
        if observed[name] != wanted:
            advice.append(
                Recommendation(
                    f"{name} is {observed[name]} and the policy asks for {wanted}; it needs a "
                    f"restart, so pgrelief does not apply it: ALTER SYSTEM SET {name} = "
                    f"{wanted}; then restart PostgreSQL",
                    setting=name,
                    facts=(("current", observed[name]), ("wanted", wanted)),
                )
            )


def plan_revert(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    originals: Mapping[str, str | None],
) -> Plan:
    """Actions restoring each recorded original that the server no longer has.

    Runs whatever the policy's mode (reverting is asked for explicitly: ``onDelete: Revert``
    or ``pgrelief run --revert``); values already back to the original produce nothing.
    A system setting is restored by ALTER SYSTEM SET to the value in effect before pgrelief
    changed it (pg_settings does not say whether that value came from postgresql.conf).
    """
    why = (
        "revert to the value found before pgrelief changed it "
        f"(limits.onDelete {policy_spec.limits.on_delete})"
    )
    actions: list[Action] = []
    for key, original in originals.items():
        parsed = parse_key(key)
        if parsed is None:
            actions.append(
                Recommendation(f"cannot revert unrecognised record {key!r}", subject=key)
            )
            continue
        kind, name, item = parsed
        if kind == "role":
            actions.extend(_revert_role(snapshot.roles.get(name), name, item, original, why))
        elif kind == "database":
            database = snapshot.databases.get(name)
            wanted = _int_or_none(original)
            if database is None or wanted is None:
                actions.append(_cannot_revert(f"database {quote_ident(name)}", key, original))
            elif database.connection_limit != wanted:
                actions.append(
                    SetDatabaseConnectionLimit(name, wanted, database.connection_limit, why)
                )
        else:
            actions.extend(_revert_system(snapshot.server.settings.get(item), item, original, why))
    return Plan(actions=tuple(actions))


def _revert_role(
    role: RoleInfo | None, name: str, item: str, original: str | None, why: str
) -> list[Action]:
    subject = f"role {quote_ident(name)}"
    if role is None:
        return [_cannot_revert(subject, role_key(name, item), original)]
    if item == "connection_limit":
        wanted = _int_or_none(original)
        if wanted is None:
            return [_cannot_revert(subject, role_key(name, item), original)]
        if role.connection_limit == wanted:
            return []
        return [SetRoleConnectionLimit(name, wanted, role.connection_limit, why)]
    current = role.config.get(item)
    if original is None:
        return [] if current is None else [SetRoleSetting(name, item, None, current, why)]
    if current is not None and (
        current == original or _same_pg_value(current, original, default_unit="ms")
    ):
        return []
    return [SetRoleSetting(name, item, original, current, why)]


def _revert_system(
    current: Setting | None, name: str, original: str | None, why: str
) -> list[Action]:
    if current is None:
        return [_cannot_revert(f"setting {name}", system_key(name), original)]
    if original is not None and _same_pg_value(
        setting_text(current), original, default_unit=current.unit
    ):
        return []
    return [SetSystemSetting(name, original, setting_text(current), why)]


def _cannot_revert(subject: str, key: str, original: str | None) -> Recommendation:
    return Recommendation(
        f"cannot revert {subject}: it is not on the server any more (recorded original "
        f"{original!r})",
        subject=subject,
        facts=(("key", key), ("original", original)),
    )


# ---- helpers -------------------------------------------------------------------------------


def _candidate(
    session: Session, age: float, threshold: str, pressure: Severity
) -> TerminateBackend:
    rule = next(r for state, r in _RULES if state == session.state)
    return TerminateBackend(
        pid=session.pid,
        backend_start=session.backend_start,
        state=session.state,
        state_change=session.state_change,
        usename=session.usename,
        datname=session.datname,
        application_name=session.application_name,
        client_addr=session.client_addr,
        rule=rule,
        age_s=age,
        threshold=threshold,
        backend_age_s=session.backend_age_s,
        xact_age_s=session.xact_age_s,
        last_query=_query_head(session.query),
        pressure=pressure.label,
    )


def _oldest_first(candidate: TerminateBackend) -> tuple[float, int]:
    return (-candidate.age_s, candidate.pid)


def _ordered(spared: Iterable[SkippedSession]) -> tuple[SkippedSession, ...]:
    return tuple(sorted(spared, key=lambda s: _oldest_first(s.candidate)))


def _state_age(session: Session, snapshot: Snapshot) -> float | None:
    if session.state_age_s is not None:
        return session.state_age_s
    if session.state_change is None:
        return None
    try:
        return max((snapshot.taken_at - session.state_change).total_seconds(), 0.0)
    except TypeError:  # one naive, one aware: no trustworthy age
        return None


def _covering_network(
    address: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if address is None or not networks:
        return None
    try:
        parsed = ipaddress.ip_address(address.split("/")[0])
    except ValueError:
        return None
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [parsed]
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        forms.append(parsed.ipv4_mapped)
    for network in networks:
        if any(form.version == network.version and form in network for form in forms):
            return network
    return None


_SECRET_HINT = re.compile(r"password|secret|passwd", re.IGNORECASE)


def _query_head(query: str) -> str:
    # Audit records outlive the session; a statement that may carry a password is not copied.
    if _SECRET_HINT.search(query):
        return "<redacted>"
    return " ".join(query.split())[:80]


def _policy_ms(text: str) -> int:
    return round(parse_duration(text) * 1000)


def format_pg_duration(milliseconds: int) -> str:
    """A PostgreSQL time value (GUC syntax): '0', '250ms', '60s'."""
    if milliseconds == 0:
        return "0"
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    return f"{milliseconds // 1000}s"


def _pg_value_ms(value: str, default_unit: str | None) -> float | None:
    """A PostgreSQL time value in milliseconds; a bare number is in ``default_unit``."""
    match = _PG_TIME_VALUE.fullmatch(value)
    if match is None:
        return None
    unit = match.group(2) or default_unit
    if unit not in _PG_TIME_UNITS_MS:
        return None
    return float(match.group(1)) * _PG_TIME_UNITS_MS[unit]


def _same_pg_value(left: str, right: str, default_unit: str | None) -> bool:
    if left == right:
        return True
    left_ms, right_ms = _pg_value_ms(left, default_unit), _pg_value_ms(right, default_unit)
    return left_ms is not None and left_ms == right_ms


def setting_text(setting: Setting) -> str:
    """A pg_settings value as PostgreSQL reads it back: time settings carry their unit."""
    if setting.unit in _PG_TIME_UNITS_MS:
        milliseconds = _pg_value_ms(setting.setting, setting.unit)
        if milliseconds is not None and milliseconds >= 0 and milliseconds == int(milliseconds):
            return format_pg_duration(int(milliseconds))
    return setting.setting


def _setting_number(setting: Setting) -> float | None:
    if setting.unit in _PG_TIME_UNITS_MS:
        return _pg_value_ms(setting.setting, setting.unit)
    try:
        return float(setting.setting)
    except ValueError:
        return None


def _wanted_server_value(managed: _ServerSetting, wanted: Any) -> tuple[str, float]:
    """(value to write, number comparable with ``_setting_number``) for a policy value."""
    if managed.kind == "duration":
        milliseconds = _policy_ms(str(wanted))
        return format_pg_duration(milliseconds), float(milliseconds)
    if managed.kind == "seconds":
        return format_pg_duration(int(wanted) * 1000), float(int(wanted) * 1000)
    return str(int(wanted)), float(int(wanted))


def _as_original(previous: int | str | None) -> str | None:
    return None if previous is None else str(previous)


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _version_text(version: int) -> str:
    return f"{version // 10000}.{version % 10000}" if version >= 100000 else str(version)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
