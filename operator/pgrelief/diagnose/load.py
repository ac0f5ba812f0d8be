"""Findings about how the load is shared: a spike of active sessions, and one role or
application holding most of the slots.

Both are judged against usable slots with the tuning below, which the evidence lines quote
when a finding fires.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from operator import attrgetter

from pgrelief import advice
from pgrelief.diagnose._counting import APP, DB, STATE_OF, USER, Context, ordered
from pgrelief.diagnose._shared import (
    PID_OF,
    database_share,
    is_superuser,
    main_applications,
    name_of,
    oldest_first,
    orm_fixes,
    roles_of,
    share_for,
    state_split,
)
from pgrelief.diagnose.locks import blocking
from pgrelief.diagnose.pooling import pgbouncer_fix
from pgrelief.diagnosis import (
    ADVICE,
    DURABLE_SQL,
    EMERGENCY_SQL,
    ROLE_MONOPOLY,
    TRAFFIC_SPIKE,
    Finding,
    Fix,
    Severity,
)
from pgrelief.snapshot import NO_STATE, Session

# Tuning of the heuristics (documented in the findings' evidence when they fire).
TRAFFIC_SPIKE_SHARE = 0.4  # active sessions as a share of usable slots
TRAFFIC_SPIKE_MIN = 5
MONOPOLY_SHARE = 0.5  # of client backends
MONOPOLY_MIN_SLOTS_SHARE = 0.25  # of usable slots
MONOPOLY_MIN = 5
_WAIT = attrgetter("wait_event_type", "wait_event")


def traffic_spike(context: Context) -> list[Finding]:
    active = context.active
    threshold = max(TRAFFIC_SPIKE_MIN, math.ceil(context.usable * TRAFFIC_SPIKE_SHARE))
    if len(active) < threshold:
        return []
    sessions = oldest_first(active, "query_age_s")
    wait_pairs = Counter(map(_WAIT, active))
    waits = Counter(
        {f"{kind}:{event}": n for (kind, event), n in wait_pairs.items() if kind is not None}
    )
    lock_waiters = sum(n for (kind, _event), n in wait_pairs.items() if kind == "Lock")
    waiting = sum(waits.values())
    share = len(active) * 100 / context.usable if context.usable else 100.0
    critical = share >= context.options.critical_percent
    summary = (
        f"{len(active)} sessions active at once ({share:.0f}% of usable slots), {waiting} of "
        f"them waiting ({lock_waiters} on locks): a traffic spike or a pile-up"
    )
    evidence = [
        f"{len(active)} active ≥ threshold {threshold} = max({TRAFFIC_SPIKE_MIN}, "
        f"{int(TRAFFIC_SPIKE_SHARE * 100)}% of {context.usable} usable slots)",
        f"waiting: {waiting} (lock waiters, wait_event_type 'Lock': {lock_waiters})"
        + (
            "; top wait events: " + ", ".join(f"{event} ×{n}" for event, n in waits.most_common(3))
            if waits
            else ""
        ),
    ]
    by_role = Counter(s.usename for s in active)
    by_app = Counter(s.application_name for s in active)
    evidence.append(
        "active by user: "
        + ", ".join(f"{name_of(k)} {n}" for k, n in by_role.most_common(3))
        + "; by application: "
        + ", ".join(f"{name_of(k)} {n}" for k, n in by_app.most_common(3))
    )
    fixes: list[Fix] = []
    victims = blocking(context).victims
    if victims:
        evidence.append(
            f"{len(victims)} of the lock waiters wait for a session named in the lock_blocker "
            "finding: end that one, not them"
        )
    elif lock_waiters:
        fixes.append(Fix(EMERGENCY_SQL, advice.LOCK_WAITERS_QUERY, "find the blocking sessions"))
    fixes.append(pgbouncer_fix(context, "queue the spike in PgBouncer instead of in PostgreSQL"))
    top_role = by_role.most_common(1)[0][0]
    info = context.snapshot.roles.get(top_role) if top_role else None
    if top_role and not is_superuser(context, top_role):
        role_share, words = share_for(context, top_role)
        if info is None or not 0 <= info.connection_limit <= role_share.limit:
            fixes.append(
                Fix(
                    DURABLE_SQL,
                    f"-- cap the busiest role: {words}\n"
                    + advice.alter_role_connection_limit(top_role, role_share.limit),
                    "per-role connection limit",
                )
            )
    fixes.append(
        Fix(
            ADVICE,
            "Do not raise max_connections for a spike: more active backends than CPU cores "
            "only add lock contention and context switching. Let PgBouncer (transaction mode) "
            "queue the excess, and look at what the active sessions wait on.",
            "don't raise max_connections",
        )
    )
    return [
        Finding(
            TRAFFIC_SPIKE,
            Severity.CRITICAL if critical else Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(PID_OF, sessions)),
            tuple(fixes),
        )
    ]


def monopoly(context: Context) -> list[Finding]:
    total = context.candidates_total
    minimum = max(MONOPOLY_MIN, math.ceil(context.usable * MONOPOLY_MIN_SLOTS_SHARE))
    findings: list[Finding] = []
    user_counts = context.counts_excluding_own(USER)
    covered_apps: set[str] = set()
    if len(user_counts) >= 2:
        for role, count in sorted(user_counts.items(), key=lambda i: (-i[1], str(i[0]))):
            if role is None or count < total * MONOPOLY_SHARE or count < minimum:
                continue
            findings.append(_role_monopoly(context, role, count, total, minimum))
            main_app = context.main_value(APP, USER, role)
            if main_app is not None:
                covered_apps.add(main_app)
    app_counts = context.counts_excluding_own(APP)
    if len(app_counts) >= 2:
        for application, count in sorted(app_counts.items(), key=lambda i: (-i[1], str(i[0]))):
            if (
                not application
                or application in covered_apps
                or count < total * MONOPOLY_SHARE
                or count < minimum
            ):
                continue
            findings.append(_application_monopoly(context, application, count, total, minimum))
    db_counts = context.counts_excluding_own(DB)
    if len(db_counts) >= 2:
        for database, count in sorted(db_counts.items(), key=lambda i: (-i[1], str(i[0]))):
            if not database or count < total * MONOPOLY_SHARE or count < minimum:
                continue
            findings.append(_database_monopoly(context, database, count, total, minimum))
    return findings


def _role_monopoly(context: Context, role: str, count: int, total: int, minimum: int) -> Finding:
    sessions = oldest_first(context.sessions_where(USER, role), "backend_age_s")
    states = _state_counts(sessions)
    share, words = share_for(context, role)
    limit = share.limit
    info = context.snapshot.roles.get(role)
    summary = (
        f"role {name_of(role)} holds {count} of {total} client backends "
        f"({count * 100 // max(total, 1)}%)"
    )
    evidence = [
        _threshold_line(context, count, total, minimum),
        f"its sessions by state: {state_split(states)}",
        f"from {context.addresses_of(USER, role)} client address(es); main application "
        f"{name_of(context.main_value(APP, USER, role))}",
    ]
    fixes: list[Fix] = []
    if (info is not None and info.is_superuser) or is_superuser(context, role):
        evidence.append("it is a superuser: PostgreSQL does not apply CONNECTION LIMIT to it")
        fixes.append(
            Fix(
                ADVICE,
                "Applications should not connect as a superuser: give this one its own "
                "ordinary role, then limit that role.",
                "use an ordinary role",
            )
        )
    elif info is not None and 0 <= info.connection_limit <= limit:
        evidence.append(f"it already has CONNECTION LIMIT {info.connection_limit}")
    else:
        fixes.append(
            Fix(
                DURABLE_SQL,
                f"-- {words}: the other roles keep the rest;\n-- existing sessions stay, new "
                "ones beyond it get 'too many connections for role'\n"
                + advice.alter_role_connection_limit(role, limit),
                f"limit role {role} to {limit} connections",
            )
        )
    fixes.extend(
        orm_fixes(
            context,
            main_applications(sessions, None),
            f"stay within the role's {limit} connections",
        )
    )
    return Finding(
        ROLE_MONOPOLY,
        Severity.WARNING,
        summary,
        tuple(evidence),
        tuple(map(PID_OF, sessions)),
        tuple(fixes),
    )


def _application_monopoly(
    context: Context, application: str, count: int, total: int, minimum: int
) -> Finding:
    sessions = oldest_first(context.sessions_where(APP, application), "backend_age_s")
    roles = roles_of(sessions, 3)
    share, _words = share_for(context, context.main_value(USER, APP, application), application)
    summary = (
        f"application {name_of(application)} holds {count} of {total} client backends "
        f"({count * 100 // max(total, 1)}%)"
    )
    evidence = [
        _threshold_line(context, count, total, minimum),
        f"its sessions by state: {state_split(_state_counts(sessions))}",
        f"from {context.addresses_of(APP, application)} client address(es) as user(s) "
        + ", ".join(name_of(r) for r in roles),
    ]
    fixes = [
        Fix(
            ADVICE,
            "PostgreSQL cannot limit an application_name: size its pools (below) so all its "
            f"instances stay within {share.application} connections, and give it its own role "
            "if it shares one, so CONNECTION LIMIT can hold it.",
            "cap the application",
        ),
        *orm_fixes(context, [application], f"stay within {share.application} connections"),
    ]
    return Finding(
        ROLE_MONOPOLY,
        Severity.WARNING,
        summary,
        tuple(evidence),
        tuple(map(PID_OF, sessions)),
        tuple(fixes),
    )


def _database_monopoly(
    context: Context, database: str, count: int, total: int, minimum: int
) -> Finding:
    """One database holding most slots: ALTER DATABASE ... CONNECTION LIMIT keeps the rest for
    the others (before it is hit, not only once a limit already is)."""
    sessions = oldest_first(context.sessions_where(DB, database), "backend_age_s")
    share, words = database_share(context, database)
    info = context.snapshot.databases.get(database)
    summary = (
        f"database {name_of(database)} holds {count} of {total} client backends "
        f"({count * 100 // max(total, 1)}%)"
    )
    evidence = [
        _threshold_line(context, count, total, minimum),
        f"its sessions by state: {state_split(_state_counts(sessions))}",
        "its main users: " + ", ".join(name_of(r) for r in roles_of(sessions, 3)),
    ]
    fixes: list[Fix] = []
    if info is not None and 0 <= info.connection_limit <= share.limit:
        evidence.append(f"it already has CONNECTION LIMIT {info.connection_limit}")
    else:
        fixes.append(
            Fix(
                DURABLE_SQL,
                f"-- {words}: the other databases keep the rest;\n-- existing sessions stay, "
                "new ones beyond it get 'too many connections for database'\n"
                + advice.alter_database_connection_limit(database, share.limit),
                f"limit database {database} to {share.limit} connections",
            )
        )
    return Finding(
        ROLE_MONOPOLY,
        Severity.WARNING,
        summary,
        tuple(evidence),
        tuple(map(PID_OF, sessions)),
        tuple(fixes),
    )


def _threshold_line(context: Context, count: int, total: int, minimum: int) -> str:
    return (
        f"{count} ≥ {int(MONOPOLY_SHARE * 100)}% of {total} client backends and ≥ {minimum} "
        f"= max({MONOPOLY_MIN}, {int(MONOPOLY_MIN_SLOTS_SHARE * 100)}% of {context.usable} "
        "usable slots)"
    )


def _state_counts(sessions: Iterable[Session]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state, n in Counter(map(STATE_OF, sessions)).items():
        counts[state or NO_STATE] = n
    return ordered(counts)
