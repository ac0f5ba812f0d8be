"""The diagnosis when the server refused our connection: nothing to count, only its message.

Apart from the snapshot pipeline because it has no snapshot: it reads PostgreSQL's refusal
text and gives the way in through a reserved slot and the statements that free slots.
"""

from __future__ import annotations

import re

from pgrelief import advice
from pgrelief.diagnose.reserved import reserved_slots_fix
from pgrelief.diagnosis import (
    ADVICE,
    EMERGENCY_SQL,
    SATURATION,
    Breakdown,
    Diagnosis,
    Finding,
    Fix,
    Severity,
    Totals,
    Verdict,
)

_REFUSAL_CLIENTS = "sorry, too many clients already"
_REFUSAL_RESERVED = "remaining connection slots are reserved"
_REFUSAL_ROLE = "too many connections for role"
_REFUSAL_DATABASE = "too many connections for database"


def _quoted_name(message: str, after: str) -> str | None:
    """The name PostgreSQL quotes after ``after`` in its message, if any.

    PostgreSQL prints the name raw between double quotes (no escaping), so the name runs to
    the last double quote on the line.
    """
    match = re.search(re.escape(after) + r' "(.*)"', message, re.IGNORECASE)
    return match.group(1) if match else None


def diagnose_refusal(message: str) -> Diagnosis:
    """A critical diagnosis for when the server refuses our connection for lack of slots.

    There is nothing to count (server=None, zero totals): the finding carries the server's own
    message and the emergency procedure to get in through a reserved slot and free slots.
    """
    lowered = message.lower()
    evidence = [f"server said: {message.strip()}"]
    targeted: list[Fix] = []
    if _REFUSAL_RESERVED in lowered:
        summary = "only reserved connection slots are left: every slot for ordinary roles is taken"
        evidence.append(
            "the remaining slots are kept for superusers (superuser_reserved_connections) or, "
            "on PostgreSQL 16+, roles granted pg_use_reserved_connections (reserved_connections)"
        )
    elif _REFUSAL_ROLE in lowered:
        summary = "the role is at its own CONNECTION LIMIT: its new connections are refused"
        evidence.append(
            "the server may still have free slots: only this role's limit is exhausted "
            "(pg_roles.rolconnlimit); connect as another role to look"
        )
        role = _quoted_name(message, _REFUSAL_ROLE)
        if role is not None:
            targeted.append(
                Fix(
                    EMERGENCY_SQL,
                    "-- the role's own sessions idle for over 10 minutes\n"
                    + advice.pattern_signal_sql(
                        ("idle",), "state_change", 600, filters={"usename": role}
                    ),
                    f"free slots of role {role}",
                )
            )
    elif _REFUSAL_DATABASE in lowered:
        summary = "the database is at its own CONNECTION LIMIT: new connections are refused"
        evidence.append(
            "only this database's limit (pg_database.datconnlimit) is exhausted; connect to "
            "another database (e.g. postgres) to look"
        )
    elif _REFUSAL_CLIENTS in lowered:
        summary = "the server is full: 'sorry, too many clients already'"
        evidence.append("every connection slot is taken, reserved ones included for this role")
    else:
        summary = "the server refused the connection for lack of slots"
    free = Fix(
        EMERGENCY_SQL,
        "-- idle in transaction for over 5 minutes: abandoned transactions\n"
        + advice.pattern_signal_sql(
            ("idle in transaction", "idle in transaction (aborted)"), "state_change", 300
        )
        + "\n-- idle for over 30 minutes: likely leaked connections\n"
        + advice.pattern_signal_sql(("idle",), "state_change", 1800),
        "free slots (each statement re-checks state and age when it runs)",
    )
    reserved = reserved_slots_fix(None, None)
    fixes = (
        Fix(
            ADVICE,
            "Connect through a reserved slot: as a superuser (PostgreSQL keeps "
            "superuser_reserved_connections slots, default 3, for this), or on PostgreSQL 16+ "
            "as a role granted pg_use_reserved_connections. For example:\n"
            "  psql 'host=<server> dbname=postgres user=postgres'\n"
            "  pgrelief diagnose --dsn 'host=<server> dbname=postgres user=postgres'\n"
            "The diagnosis from inside lists the exact sessions to terminate.",
            "get in through a reserved slot",
        ),
        Fix(EMERGENCY_SQL, advice.DIAGNOSTIC_QUERIES, "the three diagnostic queries"),
        free,
        *targeted,
        reserved,
    )
    finding = Finding(SATURATION, Severity.CRITICAL, summary, tuple(evidence), (), fixes)
    return Diagnosis(
        status=Severity.CRITICAL,
        pressure=Severity.CRITICAL,
        server=None,
        totals=Totals(client_backends=0, utilization_percent=0.0, by_state={}),
        breakdown=Breakdown(),
        findings=(finding,),
        source="live",
        taken_at=None,
        verdict=Verdict(
            summary=(
                summary,
                "get in through a reserved slot (as a superuser, or on PostgreSQL 16+ a role "
                "granted pg_use_reserved_connections) and run pgrelief diagnose again: from "
                "inside it names the exact sessions",
            ),
            emergency=targeted[0] if targeted else free,
            durable=(reserved,),
        ),
    )
