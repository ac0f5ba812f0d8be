"""What several finding builders share: how names read, oldest-first order, grouping, fixes.

One place for the small helpers so that every finding names a role, sorts its sessions and
writes its terminate statement and ORM pool settings the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from pgrelief import advice
from pgrelief.diagnose._counting import APP, LOCAL_SOCKET, STATE_OF, USER, Context
from pgrelief.diagnosis import EMERGENCY_SQL, ORM, Fix
from pgrelief.sizing import fair_share, headroom_slots, pool_per_instance
from pgrelief.snapshot import Session

EVIDENCE_ROWS = 10  # per-group / per-session evidence lines before "... and N more"
PID_OF = attrgetter("pid")
_USENAME = attrgetter("usename")
_APPLICATION = attrgetter("application_name")


def name_of(value: str | None) -> str:
    if value is None:
        return "(unknown)"
    if value == "":
        return "(none)"
    return advice.quote_literal(value)


def addr_of(value: str | None) -> str:
    return value or LOCAL_SOCKET


def oldest_first(sessions: Iterable[Session], age: str) -> list[Session]:
    """Sessions sorted by the given age, oldest first, ties by pid; unknown ages last.

    Two stable C-level sorts (pid, then age descending) instead of a Python key function:
    findings may name tens of thousands of sessions.
    """
    getter = attrgetter(age)
    known = [s for s in sessions if getter(s) is not None]
    unknown = [s for s in sessions if getter(s) is None]
    known.sort(key=PID_OF)
    known.sort(key=getter, reverse=True)  # reverse keeps equal ages in pid order
    unknown.sort(key=PID_OF)
    return known + unknown


@dataclass(frozen=True, slots=True)
class Bucket:
    """Sessions of a finding sharing a key (e.g. application and client address)."""

    key: tuple[Any, ...]
    count: int
    oldest: Session
    roles: list[str]  # most common first, at most 3
    states: dict[str | None, int]


def bucketed(
    sessions: list[Session], key_of: Callable[[Session], tuple[Any, ...]], detail: int = 10
) -> list[Bucket]:
    """Group oldest-first ``sessions`` by ``key_of``; biggest group first, ties by key.

    Counting and picking each group's oldest member are C-level (Counter, dict over the
    reversed order); only the ``detail`` biggest groups get their roles and states.
    """
    keys = list(map(key_of, sessions))
    counts = Counter(keys)
    oldest = dict(zip(reversed(keys), reversed(sessions), strict=True))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    detailed = {key for key, _ in ranked[:detail]}
    roles: dict[tuple[Any, ...], Counter[str]] = {key: Counter() for key in detailed}
    states: dict[tuple[Any, ...], dict[str | None, int]] = {key: {} for key in detailed}
    for (key, role), n in Counter(zip(keys, map(_USENAME, sessions), strict=True)).items():
        if key in detailed and role:
            roles[key][role] += n
    for (key, state), n in Counter(zip(keys, map(STATE_OF, sessions), strict=True)).items():
        if key in detailed:
            states[key][state] = n
    return [
        Bucket(
            key=key,
            count=count,
            oldest=oldest[key],
            roles=[r for r, _ in sorted(roles[key].items(), key=lambda i: (-i[1], i[0]))[:3]]
            if key in detailed
            else [],
            states=states.get(key, {}),
        )
        for key, count in ranked
    ]


def state_split(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in counts.items()) or "none"


def more(total: int, shown: int, what: str) -> list[str]:
    return [f"... and {total - shown} more {what}"] if total > shown else []


def terminate_fix(
    sessions: Sequence[Session],
    states: Sequence[str],
    age_column: str,
    min_age_s: float,
    what: str,
) -> Fix:
    """The emergency terminate statement: the oldest sessions by identity, the rest by pattern."""
    listed = sessions[: advice.MAX_LISTED]
    text = (
        f"-- terminate {len(listed)} {what}; each row re-checks pid, backend_start, state and "
        "state_change as observed,\n-- so a reused pid or a session that moved on is left alone\n"
        + advice.signal_sql(listed)
    )
    if len(sessions) > len(listed):
        text += (
            f"\n-- {len(sessions) - len(listed)} more match the same pattern; this re-checks "
            "state and age when it runs:\n"
            + advice.pattern_signal_sql(states, age_column, min_age_s)
        )
    return Fix(EMERGENCY_SQL, text, f"terminate the {len(sessions)} {what}")


def version_at_least(context: Context, version_num: int) -> bool | None:
    version = context.snapshot.server.version_num
    return None if version is None else version >= version_num


def roles_of(sessions: Iterable[Session], limit: int = EVIDENCE_ROWS) -> list[str]:
    counts = Counter(map(_USENAME, sessions))
    counts.pop(None, None)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return [str(role) for role, _ in ranked[:limit]]


def orm_fixes(
    context: Context, applications: Sequence[str], purpose: str, share: int | None = None
) -> list[Fix]:
    """ORM pool settings for the main applications of a finding, one fix per stack.

    Pool size per instance = the role's fair share of usable slots (or ``share``) divided by
    the application's distinct client addresses.
    """
    fixes: list[Fix] = []
    seen: set[str] = set()
    unknown: list[str] = []
    for application in applications:
        stack = context.options.stack or advice.guess_stack(application)
        if stack is None:
            unknown.append(application)
            continue
        if stack in seen:
            continue
        seen.add(stack)
        size, reason = _pool_size_for(context, application, share)
        fixes.append(
            Fix(
                ORM,
                f"# {reason}\n" + advice.orm_pool_settings(stack, size, application or None),
                f"{stack} pool settings ({purpose})",
            )
        )
    if unknown and not fixes:
        application = unknown[0]
        size, reason = _pool_size_for(context, application, share)
        fixes.append(
            Fix(
                ORM,
                f"# {reason}\n" + advice.orm_pool_settings_brief(size, application or None),
                f"application pool settings ({purpose}; stack not recognised, --stack picks one)",
            )
        )
    return fixes


def _pool_size_for(context: Context, application: str, share: int | None) -> tuple[int, str]:
    instances = context.addresses_of(APP, application)
    role = context.main_value(USER, APP, application)
    if share is None:
        info = context.snapshot.roles.get(role) if role else None
        limit = info.connection_limit if info is not None else None
        roles = context.distinct_roles()
        share = fair_share(context.usable, roles, limit)
        basis = (
            f"the fair share of role {name_of(role)}: ({context.usable} usable − "
            f"{headroom_slots(context.usable)} headroom) / {roles} role(s)"
            + (
                f", capped by its CONNECTION LIMIT {limit}"
                if limit is not None and limit >= 0
                else ""
            )
            + f" = {share}"
        )
    else:
        basis = f"the {share} connections the application should stay within"
    size = pool_per_instance(share, instances)
    return size, (
        f"pool per instance {size} = {basis} / {instances} client address(es) of "
        f"{name_of(application)} (if a host runs several processes, divide again)"
    )


def main_applications(sessions: Iterable[Session], limit: int = 3) -> list[str]:
    counts: Counter[str] = Counter(map(_APPLICATION, sessions))
    return [app for app, _ in sorted(counts.items(), key=lambda i: (-i[1], i[0]))[:limit]]


def is_superuser(context: Context, role: str) -> bool:
    info = context.snapshot.roles.get(role)
    return bool(info and info.is_superuser)
