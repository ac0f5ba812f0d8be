"""Activity rows into ``Session`` objects, with ages on the dump's own clock.

The reference semantics of a pg_stat_activity dump: which columns are needed, how each cell
becomes a Session field (``CONVERTERS``, column-wise, so 100k rows cost a few comprehensions
rather than Python work per cell), which instant ages are measured from, and the one-line
error naming the first bad cell. The pyarrow fast path reuses the columns and converters and
must give exactly what ``sessions_from`` gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from pgrelief.dumps.tables import HOW_TO, Table, clip, preview
from pgrelief.errors import DumpError
from pgrelief.snapshot import ACTIVE, CLIENT_BACKEND, Session

# Columns a user may add to carry the server's clock at dump time, best first.
NOW_COLUMNS: tuple[str, ...] = (
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "current_timestamp",
    "taken_at",
)
TIMESTAMP_COLUMNS: tuple[str, ...] = ("backend_start", "xact_start", "query_start", "state_change")


@dataclass(frozen=True, slots=True)
class ActivityDump:
    """The sessions of an activity file and the instant their ages are measured from."""

    taken_at: datetime
    clock_source: str  # "column now" or "newest timestamp in the file"
    sessions: tuple[Session, ...]


_DUMP_STATEMENT = re.compile(r"\bpg_stat_activity\b", re.IGNORECASE)


def dumping_session(sessions: Sequence[Session]) -> int | None:
    """The pid of the psql session that wrote the dump, when it can be told apart.

    A live observation leaves pgrelief's own session out of what drives findings; a dump holds
    psql's session in its place, active and reading pg_stat_activity. Treating it the same way
    keeps an offline diagnosis equal to the live one. With no single such session, None.
    """
    found = [
        s.pid
        for s in sessions
        if s.is_client and s.state == ACTIVE and _DUMP_STATEMENT.search(s.query)
    ]
    return found[0] if len(found) == 1 else None


def sessions_from(table: Table) -> ActivityDump:
    """The reference reading of an activity table: its Sessions and clock, or DumpError."""
    path = table.path
    at = table.index
    missing = missing_columns(at)
    if missing:
        raise DumpError(
            f"{path}: not a pg_stat_activity dump: missing column(s) {', '.join(missing)} "
            f"(found: {preview(table.columns)}); {HOW_TO}"
        )
    if not table.rows:
        raise DumpError(f"{path}: the dump has a header but no rows")

    indices = [at(name) for name in ACTIVITY_COLUMNS]
    # Column-wise: one pass picks the cells (a C-level transpose, each row touched once), then
    # each column is converted by one tight comprehension instead of Python work per cell.
    columns = list(zip(*map(_picker(indices), table.rows), strict=True))
    try:
        converted = [convert(column) for convert, column in zip(CONVERTERS, columns, strict=True)]
    except (ValueError, TypeError):
        raise _first_bad_row(table, indices) from None
    stamps = converted[8:12]
    try:
        taken_at, clock_source = dump_clock(table, stamps)
        ages = [[None if t is None else (taken_at - t).total_seconds() for t in c] for c in stamps]
    except TypeError:  # naive and offset-carrying timestamps cannot be compared
        raise DumpError(
            f"{path}: some timestamps have a time zone offset and some do not; "
            "pg_stat_activity timestamps always have one"
        ) from None
    sessions = tuple(map(Session, *converted, *ages))
    return ActivityDump(taken_at, clock_source, sessions)


def missing_columns(at: Callable[[str], int | None]) -> list[str]:
    return [
        label
        for label, present in (
            ("pid", at("pid") is not None),
            ("state", at("state") is not None),
            ("usename (or usesysid)", at("usename") is not None or at("usesysid") is not None),
            (
                "state_change (or query_start)",
                at("state_change") is not None or at("query_start") is not None,
            ),
        )
        if not present
    ]


def as_ints(column: Sequence[Any]) -> list[int | None]:
    return [int(value) if value else None for value in column]


def as_pids(column: Sequence[Any]) -> list[int]:
    return list(map(int, column))


def as_texts(column: Sequence[Any]) -> list[str | None]:
    return [value or None for value in column]


def as_strings(column: Sequence[Any]) -> list[str]:
    return [value or "" for value in column]


def as_backend_types(column: Sequence[Any]) -> list[str]:
    # PostgreSQL before 10 has no backend_type and lists only client backends.
    return [value or CLIENT_BACKEND for value in column]


def as_stamps(column: Sequence[Any]) -> list[datetime | None]:
    fromiso = datetime.fromisoformat
    return [fromiso(value) if value else None for value in column]


# The pg_stat_activity columns a Session is built from, in Session's positional order.
ACTIVITY_COLUMNS: tuple[str, ...] = (
    "pid",
    "backend_type",
    "state",
    "usename",
    "datname",
    "application_name",
    "client_addr",
    "client_port",
    "backend_start",
    "xact_start",
    "query_start",
    "state_change",
    "wait_event_type",
    "wait_event",
    "query",
    "leader_pid",
)
CONVERTERS: tuple[Callable[[Sequence[Any]], list[Any]], ...] = (
    as_pids,
    as_backend_types,
    as_texts,  # state
    as_texts,  # usename
    as_texts,  # datname
    as_strings,  # application_name
    as_texts,  # client_addr: NULL for a Unix socket
    as_ints,  # client_port
    as_stamps,
    as_stamps,
    as_stamps,
    as_stamps,
    as_texts,  # wait_event_type
    as_texts,  # wait_event
    as_strings,  # query
    as_ints,  # leader_pid
)


def _picker(indices: Sequence[int | None]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """Extract the cells at ``indices`` from a row; None where the dump lacks the column."""
    if all(index is not None for index in indices):
        return itemgetter(*indices)

    def pick(row: Sequence[Any]) -> Sequence[Any]:
        return [row[index] if index is not None else None for index in indices]

    return pick


def dump_clock(table: Table, stamps: Sequence[Sequence[datetime | None]]) -> tuple[datetime, str]:
    """The dump's "now": the newest of a now() column and the timestamps in the file.

    ``now()`` is the dumping transaction's start, a moment before the activity was read, so
    a session's state_change can be later; any timestamp in the file proves the server's
    clock had reached it, hence the max. All timestamps of a dump are rendered by one
    session, but offsets can still differ (a DST change), so datetimes are compared, not text.
    """
    newest = max(
        (stamp for column in stamps if (stamp := max(filter(None, column), default=None))),
        default=None,
    )
    for name in NOW_COLUMNS:
        index = table.index(name)
        if index is None:
            continue
        clocks = [
            timestamp_cell(table, number, name, row[index])
            for number, row in enumerate(table.rows)
            if row[index]
        ]
        if clocks:
            clock = max(clocks)
            return (clock if newest is None else max(clock, newest)), f"column {name}"
    if newest is None:
        raise DumpError(
            f"{table.path}: no timestamps in the dump (backend_start, xact_start, query_start "
            "and state_change are all empty): ages cannot be computed"
        )
    return newest, "newest timestamp in the file"


def _first_bad_row(table: Table, indices: Sequence[int | None]) -> DumpError:
    """The precise complaint about the first row the column-wise conversion choked on."""
    for number, row in enumerate(table.rows):
        cells = {
            name: None if index is None else row[index]
            for name, index in zip(ACTIVITY_COLUMNS, indices, strict=True)
        }
        problem = _row_problem(table, number, cells)
        if problem is not None:
            return problem
    return DumpError(f"{table.path}: cannot read the dump")


def _row_problem(table: Table, number: int, cells: Mapping[str, Any]) -> DumpError | None:
    where = f"{table.path}: {table.where(number)}"
    if not cells["pid"]:
        return DumpError(f"{where}: column pid is empty")
    for column in ("pid", "client_port", "leader_pid"):
        value = cells[column]
        if value:
            try:
                int(value)
            except (ValueError, TypeError):
                return DumpError(
                    f"{where}, column {column}: {clip(str(value))!r} is not an integer"
                )
    for column in TIMESTAMP_COLUMNS:
        if cells[column]:
            try:
                timestamp_cell(table, number, column, cells[column])
            except DumpError as problem:
                return problem
    return None


def timestamp_cell(table: Table, number: int, column: str, value: Any) -> datetime:
    where = f"{table.path}: {table.where(number)}, column {column}"
    try:
        stamp = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        raise DumpError(
            f"{where}: cannot read timestamp {clip(str(value))!r}; expected ISO 8601 such as "
            "2024-05-01 10:00:00.123+00 (psql with DateStyle ISO, the default)"
        ) from None
    return stamp
