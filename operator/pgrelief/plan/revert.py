"""Putting back what pgrelief changed: the values recorded before its first change.

Reverting is asked for explicitly (``limits.onDelete: Revert`` or ``pgrelief run --revert``),
so it runs whatever the policy's mode. It reads only the recorded originals and the current
server, emits a change only where the server differs from the original, and reports what it
cannot put back (a role or database that is gone, a record it does not understand).
"""

from __future__ import annotations

from collections.abc import Mapping

from pgrelief.advice import quoted_name as quote_ident
from pgrelief.plan.actions import (
    Action,
    Change,
    Plan,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
    parse_key,
    role_key,
    system_key,
)
from pgrelief.plan.pg_values import same_pg_value, setting_text
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.snapshot import RoleInfo, Setting, Snapshot


def plan_revert(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    originals: Mapping[str, str | None],
) -> Plan:
    """Actions restoring each recorded original that the server no longer has.

    Runs whatever the policy's mode (reverting is asked for explicitly: ``onDelete: Revert``
    or ``pgrelief run --revert``); values already back to the original produce nothing.
    A system setting that had no ALTER SYSTEM value before pgrelief (its original is recorded
    as None: ``original_value``) is restored by ALTER SYSTEM RESET, so postgresql.conf or
    the default rules again; one that had is set back to that value.
    """
    # Not the policy's onDelete: `run --revert` reverts whatever it says (Keep included).
    why = "revert to the value found before pgrelief changed it"
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
        current == original or same_pg_value(current, original, default_unit="ms")
    ):
        return []
    return [SetRoleSetting(name, item, original, current, why)]


def _revert_system(
    current: Setting | None, name: str, original: str | None, why: str
) -> list[Action]:
    if current is None:
        return [_cannot_revert(f"setting {name}", system_key(name), original)]
    if original is None:
        if current.set_by_alter_system is False:
            return []  # nothing of pgrelief's left in postgresql.auto.conf
        return [
            SetSystemSetting(
                name,
                None,
                setting_text(current),
                why + " (it had no ALTER SYSTEM value: RESET)",
            )
        ]
    if same_pg_value(setting_text(current), original, default_unit=current.unit):
        return []
    return [SetSystemSetting(name, original, setting_text(current), why)]


def original_value(change: Change, snapshot: Snapshot) -> str | None:
    """What to record as the value before ``change``, for ``plan_revert`` to restore.

    None means "nothing explicit to restore": a role setting that was not set, or a system
    setting that had no ALTER SYSTEM value (it came from postgresql.conf or the default), which
    revert then RESETs instead of pinning the old value in postgresql.auto.conf. When
    pg_settings cannot say where the value came from (sourcefile needs pg_read_all_settings),
    the value is recorded, as before.
    """
    if isinstance(change, SetSystemSetting):
        current = snapshot.server.settings.get(change.setting)
        if current is not None and current.set_by_alter_system is False:
            return None
    return None if change.previous is None else str(change.previous)


def _cannot_revert(subject: str, key: str, original: str | None) -> Recommendation:
    return Recommendation(
        f"cannot revert {subject}: it is not on the server any more (recorded original "
        f"{original!r})",
        subject=subject,
        facts=(("key", key), ("original", original)),
    )


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
