"""What several finding builders share: how names read, oldest-first order, grouping, fixes.

One place for the small helpers so that every finding names a role, sorts its sessions and
writes its terminate statement and ORM pool settings the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any

from pgrelief import advice
from pgrelief.diagnose._counting import APP, DB, LOCAL_SOCKET, STATE_OF, USER, Context
from pgrelief.diagnosis import DURABLE_SQL, EMERGENCY_SQL, ORM, Fix
from pgrelief.durations import human_age
from pgrelief.sizing import ConnectionShare, connection_share, headroom_slots
from pgrelief.snapshot import ACTIVE, FASTPATH, Session, is_listen

EVIDENCE_ROWS = 10  # per-group / per-session evidence lines before "... and N more"
PID_OF = attrgetter("pid")
_USENAME = attrgetter("usename")
_APPLICATION = attrgetter("application_name")
_LISTEN_FIRST = frozenset("lL \t\n\r\f\v")


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
    listed = list(sessions)
    ages = list(map(getter, listed))
    if None in ages:
        known = list(compress(listed, map(is_not, ages, repeat(None))))
        unknown = list(compress(listed, map(is_, ages, repeat(None))))
    else:
        known, unknown = listed, []
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
    context: Context,
    sessions: Sequence[Session],
    ages: Mapping[str, float],
    what: str,
    age_column: str = "state_change",
) -> Fix:
    """The emergency terminate statement: the oldest sessions by identity, the rest by pattern.

    ``ages`` maps each state the sessions may be in to the minimum age the pattern statement
    re-checks for the sessions beyond the listed ones.
    """
    listed = sessions[: advice.MAX_LISTED]
    text = (
        f"-- terminate {len(listed)} {what}; each row re-checks pid, backend_start, state and "
        "state_change as observed,\n-- so a reused pid or a session that moved on is left alone\n"
        + advice.signal_sql(listed, spare_superusers=context.unknown_superusers)
    )
    if len(sessions) > len(listed):
        text += (
            f"\n-- {len(sessions) - len(listed)} more match the same pattern; this re-checks "
            "state and age when it runs:\n" + advice.pattern_signal_sql(ages, age_column)
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
    context: Context, applications: Sequence[str], purpose: str, *, limit: int = EVIDENCE_ROWS
) -> list[Fix]:
    """ORM pool settings for each application of a finding (up to ``limit``), one fix per stack.

    Each application's pool per instance comes from ``share_for`` (its role's budget, the
    application's part of it, its client addresses): the same number in every finding.
    """
    by_stack: dict[str | None, list[str]] = {}
    for application in applications[:limit]:
        stack = context.options.stack or advice.guess_stack(application)
        by_stack.setdefault(stack, []).append(application)
    fixes: list[Fix] = []
    for stack, members in by_stack.items():
        blocks = []
        for application in members:
            share, reason = share_for(
                context, context.main_value(USER, APP, application), application
            )
            settings = (
                advice.orm_pool_settings(stack, share.per_instance, application or None)
                if stack is not None
                else advice.orm_pool_settings_brief(share.per_instance, application or None)
            )
            blocks.append(f"# {reason}\n{settings}")
        title = (
            f"{stack} pool settings ({purpose})"
            if stack is not None
            else f"application pool settings ({purpose}; stack not recognised, --stack picks one)"
        )
        fixes.append(Fix(ORM, "\n\n".join(blocks), title))
    if len(applications) > limit and fixes:
        rest = len(applications) - limit
        last = fixes[-1]
        fixes[-1] = Fix(
            last.kind,
            last.text + f"\n# ... and {rest} more application(s): size each the same way",
            last.title,
        )
    return fixes


def consumer_roles(context: Context) -> int:
    """Roles that hold slots for applications: our own session and superusers do not count."""
    key = "consumer_roles"
    if key not in context.cache:
        roles = [
            role
            for role in context.counts_excluding_own(USER)
            if role and not is_superuser(context, role)
        ]
        context.cache[key] = max(len(roles), 1)
    found: int = context.cache[key]
    return found


def share_for(
    context: Context, role: str | None, application: str | None = None
) -> tuple[ConnectionShare, str]:
    """The one sizing of a role's connections and an application's pool within them, with the
    arithmetic in words (``sizing.connection_share``; cached, so findings agree)."""
    key = ("share", role, application)
    if key in context.cache:
        cached: tuple[ConnectionShare, str] = context.cache[key]
        return cached
    info = context.snapshot.roles.get(role) if role is not None else None
    current = info.connection_limit if info is not None and not info.is_superuser else None
    role_counts = context.counts_excluding_own(USER)
    # The breakdown already split each role by state (a NULL role shows as "").
    group = next((g for g in context.breakdown.by_user if g.key == (role or "")), None)
    by_state = group.by_state if group is not None else {}
    active = by_state.get(ACTIVE, 0) + by_state.get(FASTPATH, 0)
    own = context.own
    if own is not None and own.usename == role and own.state in (ACTIVE, FASTPATH):
        active -= 1
    app_sessions = context.pair_count(APP, application, USER, role)
    if own is not None and (own.usename, own.application_name) == (role, application):
        app_sessions -= 1
    instances = context.addresses_of(APP, application) if application is not None else 1
    roles = consumer_roles(context)
    share = connection_share(
        context.usable,
        roles,
        active=max(active, 0),
        current_limit=current,
        role_sessions=role_counts.get(role, 0),
        application_sessions=max(app_sessions, 0),
        instances=instances,
    )
    words = (
        f"role {name_of(role)} may hold {share.limit} = max(({context.usable} usable − "
        f"{headroom_slots(context.usable)} headroom) / {roles} role(s) = {share.fair}, "
        f"its {max(active, 0)} active × 1.2 = {share.demand})"
        + (
            f", capped by its CONNECTION LIMIT {share.capped_by}"
            if share.capped_by is not None
            else ""
        )
    )
    if application is not None:
        if share.application != share.limit:
            words += (
                f"; application {name_of(application)} holds {app_sessions} of the role's "
                f"{role_counts.get(role, 0)} sessions → {share.application} of them"
            )
        words += (
            f"; pool per instance {share.per_instance} = {share.application} / {instances} "
            "client address(es) (if a host runs several processes, divide again)"
        )
    context.cache[key] = (share, words)
    return share, words


def database_share(context: Context, database: str) -> tuple[ConnectionShare, str]:
    """A database's connection budget, by the same sizing as a role's (``share_for``)."""
    counts = context.counts_excluding_own(DB)
    group = next((g for g in context.breakdown.by_database if g.key == database), None)
    by_state = group.by_state if group is not None else {}
    active = by_state.get(ACTIVE, 0) + by_state.get(FASTPATH, 0)
    own = context.own
    if own is not None and own.datname == database and own.state in (ACTIVE, FASTPATH):
        active -= 1
    info = context.snapshot.databases.get(database)
    databases = max(len([d for d in counts if d]), 1)
    share = connection_share(
        context.usable,
        databases,
        active=max(active, 0),
        current_limit=info.connection_limit if info is not None else None,
    )
    words = (
        f"database {name_of(database)} may hold {share.limit} = max(({context.usable} usable − "
        f"{headroom_slots(context.usable)} headroom) / {databases} database(s) = {share.fair}, "
        f"its {max(active, 0)} active × 1.2 = {share.demand})"
    )
    return share, words


def listening_roles(context: Context) -> set[str]:
    """Roles with a session whose last statement was LISTEN (idle by design, not leaked).

    Only idle sessions are looked at: a LISTEN runs in an instant, then its session waits
    idle for notifications."""
    key = "listening_roles"
    if key not in context.cache:
        # A cheap first-character test leaves the statements that may be a LISTEN (PostgreSQL
        # itself only takes ASCII whitespace before a key word); each role is asked once.
        maybe = [s for s in context.idle if s.query[:1] in _LISTEN_FIRST]
        roles: set[str] = set()
        for session in maybe:
            role = session.usename
            if role and role not in roles and is_listen(session.query):
                roles.add(role)
        context.cache[key] = roles
    found: set[str] = context.cache[key]
    return found


# The candidate lists a finding and the verdict both read, sorted and grouped once.
_CANDIDATES = {
    "idle_in_tx": ("state_age_s", attrgetter("usename", "application_name")),
    "leaked": ("state_age_s", attrgetter("application_name", "client_addr")),
}


def oldest_of(context: Context, candidates: str) -> list[Session]:
    """``context.idle_in_tx`` or ``context.leaked``, oldest first (cached)."""
    key = ("oldest", candidates)
    if key not in context.cache:
        age, _group = _CANDIDATES[candidates]
        context.cache[key] = oldest_first(getattr(context, candidates), age)
    found: list[Session] = context.cache[key]
    return found


def buckets_of(context: Context, candidates: str) -> list[Bucket]:
    """Those candidates grouped: idle in transaction by (user, application), leaked idle by
    (application, client address); biggest first (cached)."""
    key = ("buckets", candidates)
    if key not in context.cache:
        _age, group = _CANDIDATES[candidates]
        context.cache[key] = bucketed(oldest_of(context, candidates), group)
    found: list[Bucket] = context.cache[key]
    return found


def main_applications(sessions: Iterable[Session], limit: int | None = 3) -> list[str]:
    """The sessions' applications, most sessions first (the first ``limit``; None: all)."""
    counts: Counter[str] = Counter(map(_APPLICATION, sessions))
    return [app for app, _ in sorted(counts.items(), key=lambda i: (-i[1], i[0]))][:limit]


def is_superuser(context: Context, role: str) -> bool:
    info = context.snapshot.roles.get(role)
    return bool(info and info.is_superuser)


def spared_lines(context: Context, states: Iterable[str | None]) -> list[str]:
    """The evidence line naming the sessions past a threshold that no statement targets."""
    wanted = set(states)
    spared = [(s, why) for s, why in context.spared if s.state in wanted]
    if not spared:
        return []
    reasons = Counter(why.text for _, why in spared)
    pids = sorted(s.pid for s, _ in spared)
    shown = ", ".join(map(str, pids[:EVIDENCE_ROWS])) + (
        " ..." if len(pids) > EVIDENCE_ROWS else ""
    )
    return [
        "left out of the statements, as pgrelief run leaves them by default: "
        + ", ".join(f"{n} {text}" for text, n in sorted(reasons.items(), key=lambda i: -i[1]))
        + f" (pids {shown})"
    ]


def role_timeouts(roles: Sequence[str], setting: str, seconds: float, note: str, title: str) -> Fix:
    """Per-role settings for the roles' new sessions, one statement per role."""
    value = advice.pg_duration_setting(seconds)
    return Fix(
        DURABLE_SQL,
        f"-- {note}\n" + "\n".join(advice.alter_role_set(role, setting, value) for role in roles),
        title,
    )


def since(context: Context, age_s: float | None) -> str:
    """When something began, on the snapshot's clock: ``since 05:45:15 UTC (3.6s ago)``."""
    if age_s is None:
        return "since an unknown time"
    taken = context.snapshot.taken_at
    began = taken - timedelta(seconds=age_s)
    if began.tzinfo is not None:
        began, taken = began.astimezone(UTC), taken.astimezone(UTC)
        zone = " UTC"
    else:
        zone = ""
    clock = began.strftime("%H:%M:%S" if began.date() == taken.date() else "%Y-%m-%d %H:%M:%S")
    return f"since {clock}{zone} ({human_age(age_s)} ago)"
