"""ALTER ROLE / DATABASE / SYSTEM for what the policy's limits ask and the server lacks.

Limits are durable configuration: they are compared with what the server reports, in
PostgreSQL's own units, and only differences become changes, so a second cycle emits nothing
and a value changed by hand is put back (drift). What pgrelief must not or cannot apply (a
setting that needs a restart, a role or database that does not exist, a server too old for
a setting) becomes a ``Recommendation`` that says so, never a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgrelief import statements as stmt
from pgrelief.advice import action_sql
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.plan.actions import (
    Change,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
)
from pgrelief.plan.pg_values import (
    format_pg_duration,
    pg_value_ms,
    policy_ms,
    setting_number,
    setting_text,
)
from pgrelief.policy import ConnectionPolicySpec, RoleLimit, ServerLimits
from pgrelief.snapshot import RoleInfo, Snapshot

# pg_settings.context values for which ALTER SYSTEM + pg_reload_conf() is enough.
RELOADABLE_CONTEXTS = frozenset({"sighup", "superuser", "user"})

# Role settings pgrelief manages: all are in milliseconds when written without a unit.
_ROLE_SETTING_MIN_VERSION: dict[str, int] = {
    "idle_in_transaction_session_timeout": 90600,
    "idle_session_timeout": 140000,
    "statement_timeout": 0,
    "transaction_timeout": 170000,
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
    _ServerSetting("transaction_timeout", "transaction_timeout", "duration", 170000),
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
        wanted_ms = policy_ms(text)
        current = role.config.get(setting)
        if current is None or pg_value_ms(current, "ms") != wanted_ms:
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
                    "pgrelief's role), so it is not applied: "
                    + action_sql(stmt.alter_system_set(name, wanted_value), stmt.RELOAD_CONF),
                    setting=name,
                )
            )
            continue
        context = current.context or managed.context
        if context not in RELOADABLE_CONTEXTS:
            advice.append(
                Recommendation(
                    f"{name} cannot be applied by a reload on this server (context {context}): "
                    + action_sql(stmt.alter_system_set(name, wanted_value))
                    + " then restart",
                    setting=name,
                    facts=(("context", context), ("setting", current.setting)),
                )
            )
            continue
        current_number = setting_number(current)
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
                    "restart, so pgrelief does not apply it: "
                    + action_sql(stmt.alter_system_set(name, int(wanted)))
                    + " then restart PostgreSQL",
                    setting=name,
                    facts=(("current", observed[name]), ("wanted", wanted)),
                )
            )


def _wanted_server_value(managed: _ServerSetting, wanted: Any) -> tuple[str, float]:
    """(value to write, number comparable with ``setting_number``) for a policy value."""
    if managed.kind == "duration":
        milliseconds = policy_ms(str(wanted))
        return format_pg_duration(milliseconds), float(milliseconds)
    if managed.kind == "seconds":
        return format_pg_duration(int(wanted) * 1000), float(int(wanted) * 1000)
    return str(int(wanted)), float(int(wanted))


def _version_text(version: int) -> str:
    return f"{version // 10000}.{version % 10000}" if version >= 100000 else str(version)
