"""Emergency access: whether someone can still get in when the server is full.

The reserved-slots fix lives here and is shared with the refusal diagnosis, which needs the
same advice when the server has already refused us.
"""

from __future__ import annotations

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import is_superuser
from pgrelief.diagnosis import DURABLE_SQL, RESERVED_ACCESS, Finding, Fix, Severity
from pgrelief.sizing import RECOMMENDED_SUPERUSER_RESERVED


def reserved_access(context: Context) -> list[Finding]:
    facts = context.snapshot.server
    reserved = facts.superuser_reserved_connections + facts.reserved_connections
    if reserved > 0 and context.pressure == Severity.HEALTHY:
        return []
    if reserved > 0 and facts.superuser_reserved_connections >= RECOMMENDED_SUPERUSER_RESERVED:
        return []
    own = context.own
    role = own.usename if own is not None else None
    if role is not None and ((own is not None and own.is_superuser) or is_superuser(context, role)):
        role = None  # a superuser already has the superuser-reserved slots
    fixes = [reserved_slots_fix(role, facts.version_num)]
    if reserved == 0:
        summary = "no reserved connection slots: when the server fills up, nobody can get in"
        severity = Severity.WARNING
    else:
        summary = (
            f"only {facts.superuser_reserved_connections} superuser-reserved slot(s) for "
            "emergency access while the server is under pressure"
        )
        severity = Severity.HEALTHY
    evidence = [
        f"superuser_reserved_connections = {facts.superuser_reserved_connections}, "
        f"reserved_connections = {facts.reserved_connections} (PostgreSQL 16+)",
    ]
    return [Finding(RESERVED_ACCESS, severity, summary, tuple(evidence), (), tuple(fixes))]


def reserved_slots_fix(role: str | None, version_num: int | None) -> Fix:
    target = advice.quote_ident(role) if role else "monitoring_role"
    lines = [
        advice.alter_system_set(
            [("superuser_reserved_connections", str(RECOMMENDED_SUPERUSER_RESERVED))],
            reload=False,
        )
    ]
    if version_num is None or version_num >= 160000:
        lines.append(
            "-- PostgreSQL 16+: slots for a non-superuser monitoring/operator role"
            + ("" if role else " (replace monitoring_role with the role pgrelief connects as)")
        )
        lines.append(advice.alter_system_set([("reserved_connections", "3")], reload=False))
        lines.append(f"grant pg_use_reserved_connections to {target};")
    lines.append("-- the reserved-slot settings take effect after a restart")
    return Fix(DURABLE_SQL, "\n".join(lines), "emergency access for next time")
