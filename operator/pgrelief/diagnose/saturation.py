"""Findings about the slots themselves: the server filling up, and roles or databases at
their own CONNECTION LIMIT.

Both answer "why are connections refused?" from the slot arithmetic, before any finding
looks at what the sessions are doing.
"""

from __future__ import annotations

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import name_of, state_split, version_at_least
from pgrelief.diagnose.hints import threshold_hints
from pgrelief.diagnosis import (
    ADVICE,
    DURABLE_SQL,
    EMERGENCY_SQL,
    SATURATION,
    Finding,
    Fix,
    Severity,
)


def _slot_arithmetic(context: Context) -> str:
    facts = context.snapshot.server
    return (
        f"usable slots {context.usable} = max_connections {facts.max_connections} − "
        f"superuser_reserved_connections {facts.superuser_reserved_connections} − "
        f"reserved_connections {facts.reserved_connections}"
    )


def saturation(context: Context) -> list[Finding]:
    options = context.options
    if context.pressure == Severity.HEALTHY:
        return []
    full = context.client_count >= context.usable
    free = max(context.usable - context.client_count, 0)
    summary = (
        f"{context.client_count} client backends hold {context.utilization:.0f}% of the "
        f"{context.usable} usable connection slots"
    )
    if full:
        summary += ": new connections from ordinary roles are refused ('too many clients')"
    evidence = [
        _slot_arithmetic(context),
        f"{context.client_count} client backends = {context.utilization:.1f}% of usable slots "
        f"(warning at {options.warning_percent}%, critical at {options.critical_percent}%); "
        f"{free} left for ordinary roles",
        f"by state: {state_split(context.by_state)}",
    ]
    top = [
        f"{label} {name_of(g.key) if label != 'client' else g.key} {g.count}"
        for label, groups in (
            ("user", context.breakdown.by_user),
            ("application", context.breakdown.by_application),
            ("client", context.breakdown.by_client_addr),
        )
        for g in groups[:1]
    ]
    if top:
        evidence.append("largest holders: " + ", ".join(top))
    if context.others:
        evidence.append(
            f"{context.others} other backends (autovacuum, background and parallel workers, WAL "
            "senders, ...) also run but are not counted: since PostgreSQL 12 they draw on "
            "their own pools (autovacuum_max_workers, max_worker_processes, max_wal_senders), "
            "not on max_connections"
        )
    if context.own is not None:
        evidence.append(
            f"includes pgrelief's own session (pid {context.own.pid}); it is never a "
            "terminate candidate"
        )
    assumed = context.snapshot.server.assumed
    if assumed:
        evidence.append(
            "not observed, PostgreSQL defaults assumed: "
            + ", ".join(assumed)
            + " (give --settings-file for exact numbers)"
        )
    fixes = [
        Fix(
            ADVICE,
            "1. Get in through a reserved slot: connect as a superuser "
            f"({context.snapshot.server.superuser_reserved_connections} superuser-reserved "
            "slots)"
            + (
                ", or as a role granted pg_use_reserved_connections (PostgreSQL 16+)"
                if version_at_least(context, 160000) is not False
                else ""
            )
            + ".\n"
            "2. Free slots with the precise terminate statements of the idle-in-transaction "
            "and leaked-idle findings below (oldest first); cancel long-running queries "
            "before terminating them.\n"
            "3. Prevent the next time: timeouts and per-role limits (durable SQL below), "
            "PgBouncer in front of the applications, right-sized ORM pools.\n"
            "Raising max_connections is not the fix: every backend costs memory, and "
            "hundreds of active backends add lock contention and context switching.",
            "emergency triage",
        ),
        Fix(EMERGENCY_SQL, advice.DIAGNOSTIC_QUERIES, "the three diagnostic queries"),
    ]
    # (More superuser-reserved slots for next time: the reserved_access finding says it.)
    hints = threshold_hints(context)
    if hints:
        fixes.insert(1, Fix(ADVICE, "\n".join(hints), "what would free slots"))
    severity = Severity.CRITICAL if context.pressure == Severity.CRITICAL else Severity.WARNING
    return [Finding(SATURATION, severity, summary, tuple(evidence), (), tuple(fixes))]


def limits_hit(context: Context) -> tuple[set[str], set[str]]:
    """Roles and databases whose client backends reached their own CONNECTION LIMIT."""
    return (
        {e[1] for e in _limit_entries(context) if e[0] == "role" and 0 < e[3] >= e[2]},
        {e[1] for e in _limit_entries(context) if e[0] == "database" and 0 < e[3] >= e[2]},
    )


def _limit_entries(context: Context) -> list[tuple[str, str, int, int]]:
    """(kind, name, limit, client backends) of every enforced role and database limit."""
    user_counts = {g.key: g.count for g in context.breakdown.by_user}
    db_counts = {g.key: g.count for g in context.breakdown.by_database}
    entries: list[tuple[str, str, int, int]] = []
    for role in context.snapshot.roles.values():
        if role.is_superuser or role.connection_limit < 0:
            continue  # PostgreSQL does not enforce a role's limit on superusers
        entries.append(("role", role.name, role.connection_limit, user_counts.get(role.name, 0)))
    for database in context.snapshot.databases.values():
        if not database.allow_connections or database.connection_limit < 0:
            continue
        entries.append(
            ("database", database.name, database.connection_limit, db_counts.get(database.name, 0))
        )
    return sorted(entries, key=lambda e: (e[0] != "role", e[1]))


def connection_limits(context: Context) -> list[Finding]:
    """Roles and databases at (or near) their own CONNECTION LIMIT ('too many connections for')."""
    warning = context.options.warning_percent
    free = max(context.usable - context.client_count, 0)
    evidence: list[str] = []
    fixes: list[Fix] = []
    severity = Severity.HEALTHY
    at_limit: list[str] = []
    for kind, name, limit, count in _limit_entries(context):
        if count == 0:
            continue  # a deliberate limit (often 0) with nobody affected
        if count >= limit:
            severity = Severity.CRITICAL
            at_limit.append(f"{kind} {name_of(name)}")
            evidence.append(
                f"{kind} {name_of(name)}: {count} client backends, CONNECTION LIMIT {limit}: its "
                f"new connections get 'too many connections for {kind} \"{name}\"'"
            )
        elif count * 100 >= warning * limit:
            severity = max(severity, Severity.WARNING)
            evidence.append(
                f"{kind} {name_of(name)}: {count} client backends, {count * 100 // limit}% of its "
                f"CONNECTION LIMIT {limit}"
            )
        else:
            continue
        raise_to = limit + min(free, max(limit // 2, 1))
        statement = (
            advice.alter_role_connection_limit(name, raise_to)
            if kind == "role"
            else advice.alter_database_connection_limit(name, raise_to)
        )
        if free > 0:
            fixes.append(
                Fix(
                    DURABLE_SQL,
                    f"-- only if the limit is simply too low: {free} usable slots are free on "
                    f"the server\n{statement}",
                    f"raise {kind} {name}'s limit",
                )
            )
    if not evidence:
        return []
    fixes.insert(
        0,
        Fix(
            ADVICE,
            "A per-role or per-database limit refuses that role's new connections while the "
            "server still has slots. Free its own idle and idle-in-transaction sessions first "
            "(see those findings), then shrink its application pools; raise the limit only if "
            "its real concurrency needs it.",
            "what to do",
        ),
    )
    if at_limit:
        summary = (
            ", ".join(at_limit[:3])
            + (f" and {len(at_limit) - 3} more" if len(at_limit) > 3 else "")
            + " at its own CONNECTION LIMIT"
        )
    else:
        summary = f"{len(evidence)} role(s)/database(s) near their CONNECTION LIMIT"
    return [Finding(SATURATION, severity, summary, tuple(evidence), (), tuple(fixes))]
