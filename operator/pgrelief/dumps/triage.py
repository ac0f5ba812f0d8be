"""The seed's three triage queries, read from their output in any format.

``triage`` (the pure partial diagnosis) takes typed rows; this module makes them from the
tables a paste holds: counts by state, counts by user × application × state, and the oldest
idle sessions, whose ``idle_duration`` (``now() - state_change``, an interval as psql prints
it) gives both each session's age and the server's clock at the time of the query.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pgrelief.dumps.activity import timestamp_cell
from pgrelief.dumps.paste import COUNT_COLUMNS, TRIAGE_IDLE, TRIAGE_STATES, TRIAGE_USERS, Found
from pgrelief.dumps.tables import Table, clip
from pgrelief.errors import DumpError
from pgrelief.snapshot import CLIENT_BACKEND, IDLE, ServerFacts, Session
from pgrelief.triage import TriageInput, UserAppCount

# IntervalStyle postgres (the default): "3 days 04:05:06.5", "-00:05:00", "1 year 2 mons".
_POSTGRES_INTERVAL = re.compile(
    r"(?:(?P<years>-?\d+) years? ?)?(?:(?P<months>-?\d+) mons? ?)?(?:(?P<days>-?\d+) days? ?)?"
    r"(?:(?P<sign>[-+]?)(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d(?:\.\d+)?))?"
)
# IntervalStyle iso_8601: "P1DT2H3M4.5S".
_ISO_INTERVAL = re.compile(
    r"P(?:(?P<years>-?\d+)Y)?(?:(?P<months>-?\d+)M)?(?:(?P<days>-?\d+)D)?"
    r"(?:T(?:(?P<hours>-?\d+)H)?(?:(?P<minutes>-?\d+)M)?(?:(?P<seconds>-?\d+(?:\.\d+)?)S)?)?"
)
# PostgreSQL's own conversion of months and years to seconds (extract(epoch from interval)).
_DAY = 86400.0
_MONTH = 30 * _DAY
_YEAR = 365.25 * _DAY


def triage_input(found: Sequence[Found], server: ServerFacts, source: str) -> TriageInput:
    """The triage tables of a paste as the partial diagnosis' input (one table per query)."""
    by_kind: dict[str, Table] = {}
    for item in found:
        if item.kind in (TRIAGE_STATES, TRIAGE_USERS, TRIAGE_IDLE):
            if item.kind in by_kind:
                raise DumpError(
                    f"{item.table.path}: {item.kind} appears twice ({item.table.where(0)}); "
                    "paste each query's output once"
                )
            by_kind[item.kind] = item.table
    states = by_kind.get(TRIAGE_STATES)
    users = by_kind.get(TRIAGE_USERS)
    idle = by_kind.get(TRIAGE_IDLE)
    sessions, taken_at = _oldest_idle(idle) if idle is not None else (None, None)
    return TriageInput(
        source=source,
        server=server,
        by_state=_by_state(states) if states is not None else None,
        by_user_app=_by_user_app(users) if users is not None else None,
        oldest_idle=sessions,
        taken_at=taken_at,
    )


def _count(table: Table, number: int, row: Sequence[Any]) -> int:
    index = next(i for c in COUNT_COLUMNS if (i := table.index(c)) is not None)
    value = row[index]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DumpError(
            f"{table.path}: {table.where(number)}, column {table.columns[index]}: "
            f"{clip(str(value))!r} is not a count"
        ) from None


def _text(row: Sequence[Any], index: int | None) -> str | None:
    if index is None:
        return None
    value = row[index]
    return str(value) if value else None


def _by_state(table: Table) -> dict[str | None, int]:
    state = table.index("state")
    counts: dict[str | None, int] = {}
    for number, row in enumerate(table.rows):
        key = _text(row, state)
        counts[key] = counts.get(key, 0) + _count(table, number, row)
    return counts


def _by_user_app(table: Table) -> list[UserAppCount]:
    user, application, state = (table.index(c) for c in ("usename", "application_name", "state"))
    return [
        UserAppCount(
            _text(row, user), _text(row, application), _text(row, state), _count(table, n, row)
        )
        for n, row in enumerate(table.rows)
    ]


def _oldest_idle(table: Table) -> tuple[list[Session], datetime | None]:
    at = table.index
    listed: list[tuple[Sequence[Any], datetime | None, float | None]] = []
    for number, row in enumerate(table.rows):
        changed_at = at("state_change")
        raw = row[changed_at] if changed_at is not None else None
        changed = timestamp_cell(table, number, "state_change", raw) if raw else None
        duration = row[at("idle_duration") or 0]
        seconds = _interval(table, number, duration) if duration else None
        listed.append((row, changed, seconds))
    clocks = [c + timedelta(seconds=s) for _, c, s in listed if c is not None and s is not None]
    taken_at = max(clocks, default=None)
    sessions = []
    for number, (row, changed, seconds) in enumerate(listed):
        pid = _text(row, at("pid"))
        try:
            pid_number = int(pid or "")
        except ValueError:
            raise DumpError(
                f"{table.path}: {table.where(number)}, column pid: {clip(str(pid))!r} is not "
                "an integer"
            ) from None
        age = (taken_at - changed).total_seconds() if taken_at and changed else seconds
        sessions.append(
            Session(
                pid=pid_number,
                backend_type=CLIENT_BACKEND,  # the query selects client backends only
                state=_text(row, at("state")) or IDLE,
                usename=_text(row, at("usename")),
                datname=_text(row, at("datname")),
                application_name=_text(row, at("application_name")) or "",
                client_addr=_text(row, at("client_addr")),
                client_port=None,
                backend_start=None,
                xact_start=None,
                query_start=None,
                state_change=changed,
                wait_event_type=None,
                wait_event=None,
                query=_text(row, at("last_query")) or _text(row, at("query")) or "",
                state_age_s=age,
            )
        )
    return sessions, taken_at


def _interval(table: Table, number: int, value: Any) -> float:
    """Seconds in an interval as psql prints it (IntervalStyle postgres or iso_8601)."""
    text = str(value).strip()
    found = _POSTGRES_INTERVAL.fullmatch(text) if text else None
    if found is None or not any(found.groupdict().values()):
        found = _ISO_INTERVAL.fullmatch(text)
    if found is None or not any(found.groupdict().values()):
        raise DumpError(
            f"{table.path}: {table.where(number)}, column idle_duration: cannot read interval "
            f"{clip(text)!r}; expected PostgreSQL's default IntervalStyle, such as "
            "'1 day 02:03:04.5'"
        )
    parts = found.groupdict()

    def number_of(name: str) -> float:
        return float(parts.get(name) or 0)

    clock = number_of("hours") * 3600 + number_of("minutes") * 60 + number_of("seconds")
    if parts.get("sign") == "-":
        clock = -clock
    return (
        number_of("years") * _YEAR + number_of("months") * _MONTH + number_of("days") * _DAY + clock
    )
