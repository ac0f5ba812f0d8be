"""Offline input: a ``Snapshot`` from the pg_stat_activity / pg_settings dump a user pastes.

During an outage the person asking for help often cannot give us a connection, only a file
they produced with psql:

    \\copy (select * from pg_stat_activity) to 'activity.csv' csv header
    psql -At -c "select json_agg(a) from pg_stat_activity a" > activity.json
    \\copy (select * from pg_settings) to 'settings.csv' csv header

This module reads those (CSV with a header, a JSON array, JSON lines, or a JSON object holding
the array) into the same ``Snapshot`` a live observation gives, so the diagnosis is the same.
Ages come from the file's own clock: a ``now`` column if the user added one
(``select now(), * from pg_stat_activity``), else the newest timestamp in the file; never this
machine's clock, which may be hours or time zones away from the server's.

Dumps of 100k sessions must parse well under a second: rows are handled as plain lists with
column positions resolved once, and timestamps go through ``datetime.fromisoformat``.
"""

from __future__ import annotations

import csv
import gc
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

from pgrelief.errors import DumpError
from pgrelief.snapshot import (
    CLIENT_BACKEND,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RESERVED,
    DEFAULT_SUPERUSER_RESERVED,
    ServerFacts,
    Session,
    Setting,
    Snapshot,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "ActivityDump",
    "DumpError",
    "Table",
    "load_activity",
    "load_settings",
    "read_table",
    "snapshot_from_files",
]

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

# PostgreSQL's defaults, used for what a dump does not say: (setting, unit, context, since).
# ``since`` is the first server_version_num having the setting (skipped for older servers).
DEFAULT_SETTINGS: Mapping[str, tuple[str, str | None, str, int]] = {
    "max_connections": (str(DEFAULT_MAX_CONNECTIONS), None, "postmaster", 0),
    "superuser_reserved_connections": (str(DEFAULT_SUPERUSER_RESERVED), None, "postmaster", 0),
    "reserved_connections": (str(DEFAULT_RESERVED), None, "postmaster", 160000),
    "shared_buffers": ("16384", "8kB", "postmaster", 0),
    "work_mem": ("4096", "kB", "user", 0),
    "maintenance_work_mem": ("65536", "kB", "user", 0),
    "temp_buffers": ("1024", "8kB", "user", 0),
    "autovacuum_max_workers": ("3", None, "postmaster", 0),
    "max_worker_processes": ("8", None, "postmaster", 0),
    "statement_timeout": ("0", "ms", "user", 0),
    "lock_timeout": ("0", "ms", "user", 0),
    "idle_in_transaction_session_timeout": ("0", "ms", "user", 0),
    "idle_session_timeout": ("0", "ms", "user", 140000),
    "tcp_keepalives_idle": ("0", "s", "user", 0),
    "tcp_keepalives_interval": ("0", "s", "user", 0),
    "tcp_keepalives_count": ("0", None, "user", 0),
    "client_connection_check_interval": ("0", "ms", "user", 140000),
}

_HOW_TO = (
    "expected the output of \\copy (select * from pg_stat_activity) to 'file.csv' csv header, "
    'or of psql -At -c "select json_agg(a) from pg_stat_activity a"'
)
_HOW_TO_SETTINGS = (
    "expected the output of \\copy (select * from pg_settings) to 'file.csv' csv header, "
    'or of psql -At -c "select json_agg(s) from pg_settings s"'
)


@dataclass(frozen=True, slots=True)
class Table:
    """A dump as read: column names and rows of raw cells, in file order.

    CSV rows are lists of strings where "" means NULL (PostgreSQL writes NULL as an empty
    unquoted field); JSON rows are tuples of JSON values where None is NULL. Consumers treat
    any falsy cell as NULL, which is right for every column pgrelief reads and keeps the
    per-row work to C-level calls.
    """

    path: Path
    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    csv_text: str | None = None  # kept to find a row's line number, only for messages

    def index(self, name: str) -> int | None:
        try:
            return self.columns.index(name)
        except ValueError:
            return None

    def where(self, row: int) -> str:
        """Where row number ``row`` (0-based) is in the file, for error messages."""
        if self.csv_text is None:
            return f"element {row + 1}"
        # Re-parsed on demand: recording every row's line while reading costs 10%.
        reader = csv.reader(io.StringIO(self.csv_text, newline=""))
        next(reader)
        for number, _record in enumerate(filter(None, reader)):
            if number == row:
                return f"line {reader.line_num}"
        return f"row {row + 1}"


@dataclass(frozen=True, slots=True)
class ActivityDump:
    """The sessions of an activity file and the instant their ages are measured from."""

    taken_at: datetime
    clock_source: str  # "column now" or "newest timestamp in the file"
    sessions: tuple[Session, ...]


def snapshot_from_files(activity_path: Path, settings_path: Path | None = None) -> Snapshot:
    """The ``Snapshot`` a live observation would have given, from the user's files."""
    activity = load_activity(activity_path)
    settings = load_settings(settings_path) if settings_path is not None else {}
    return Snapshot(
        taken_at=activity.taken_at,
        server=server_facts(settings, source=str(settings_path)),
        sessions=activity.sessions,
        source=f"file {activity_path}",
    )


def server_facts(settings: Mapping[str, Setting], source: str = "settings") -> ServerFacts:
    """Slot arithmetic from dumped settings, PostgreSQL's defaults for what is missing."""
    version = _version_num(settings)
    complete = dict(settings)
    assumed = []
    for name, (value, unit, context, since) in DEFAULT_SETTINGS.items():
        if name in complete or (version is not None and version < since):
            continue
        complete[name] = Setting(name=name, setting=value, unit=unit, context=context)
        assumed.append(name)

    def number(name: str, default: int) -> int:
        found = complete.get(name)
        if found is None:
            return default
        try:
            return found.as_int()
        except ValueError:
            raise DumpError(f"{source}: {name} is {found.setting!r}, not a number") from None

    return ServerFacts(
        version_num=version,
        max_connections=number("max_connections", DEFAULT_MAX_CONNECTIONS),
        superuser_reserved_connections=number(
            "superuser_reserved_connections", DEFAULT_SUPERUSER_RESERVED
        ),
        reserved_connections=number("reserved_connections", DEFAULT_RESERVED),
        settings=complete,
        assumed=tuple(assumed),
    )


def load_activity(path: Path) -> ActivityDump:
    """Sessions from a pg_stat_activity dump, with ages on the dump's own clock."""
    with _gc_paused():
        return _sessions(read_table(path, _HOW_TO))


def load_settings(path: Path) -> dict[str, Setting]:
    """pg_settings rows from a dump, by name."""
    table = read_table(path, _HOW_TO_SETTINGS)
    name_at, setting_at = table.index("name"), table.index("setting")
    if name_at is None or setting_at is None:
        missing = [c for c in ("name", "setting") if table.index(c) is None]
        raise DumpError(
            f"{path}: not a pg_settings dump: missing column(s) {', '.join(missing)} "
            f"(found: {_preview(table.columns)}); {_HOW_TO_SETTINGS}"
        )
    unit_at, context_at = table.index("unit"), table.index("context")
    # reset_val is the server-wide value (what observe reads too); `setting` is the dumping
    # session's own, e.g. 0 for tcp_keepalives_* when psql came over the Unix socket.
    reset_at = table.index("reset_val")
    settings: dict[str, Setting] = {}
    for row in table.rows:
        name = row[name_at]
        if not name:
            continue
        unit = row[unit_at] if unit_at is not None else None
        context = row[context_at] if context_at is not None else None
        value = row[setting_at]
        if reset_at is not None and row[reset_at] not in (None, ""):
            value = row[reset_at]
        settings[str(name)] = Setting(
            name=str(name),
            setting="" if value is None else str(value),
            unit=str(unit) if unit else None,
            context=str(context) if context else None,
        )
    return settings


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates hundreds of thousands of lists and tuples that all stay alive; the
    cyclic collector would rescan them again and again (a third of the time at 100k rows)
    while finding nothing to free."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- reading files
def read_table(path: Path, how_to: str = _HOW_TO) -> Table:
    """A CSV (with header) or JSON dump as a ``Table``; ``DumpError`` for anything else."""
    try:
        # newline="": CSV fields (query texts) may hold line breaks that must survive as is.
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DumpError(f"{path}: is a directory, not a dump file") from None
    except OSError as failure:
        raise DumpError(f"{path}: cannot read: {failure.strerror or failure}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DumpError(f"{path}: the file is empty; {how_to}")
    if "\x00" in text:
        raise DumpError(f"{path}: a binary file, not CSV or JSON; {how_to}")
    if stripped[0] in "[{":
        return _json_table(path, stripped, how_to)
    return _csv_table(path, text, how_to)


def _csv_table(path: Path, text: str, how_to: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        columns = tuple(name.strip().lower() for name in header)
        if len(columns) < 2:
            raise DumpError(
                f"{path}: not a CSV dump with a header line (first line: "
                f"{_clip(text.splitlines()[0])!r}); {how_to}"
            )
        rows = list(filter(None, reader))  # filter: blank lines
    except csv.Error as failure:
        raise DumpError(f"{path}: line {reader.line_num}: not valid CSV ({failure})") from None
    table = Table(path, columns, rows, text)
    width = len(columns)
    for number, record in enumerate(rows):
        if len(record) != width:
            raise DumpError(
                f"{path}: {table.where(number)}: {len(record)} fields where the header has "
                f"{width}; was the file cut or edited?"
            )
    return table


def _json_table(path: Path, text: str, how_to: str) -> Table:
    try:
        items: Any = json.loads(text)
    except json.JSONDecodeError as whole_failure:
        items = _json_lines(path, text, whole_failure)
    if isinstance(items, dict):
        items = _unwrap(path, items, how_to)
    if not isinstance(items, list):
        raise DumpError(f"{path}: JSON but not an array of rows; {how_to}")
    if not items:
        raise DumpError(f"{path}: the JSON array is empty (no rows); {how_to}")
    if not all(isinstance(item, dict) for item in items):
        raise DumpError(f"{path}: the JSON array holds something other than row objects")
    keys = list(items[0])
    if len(keys) < 2:
        raise DumpError(f"{path}: JSON rows with a single key are not a dump; {how_to}")
    pick = itemgetter(*keys)
    try:
        rows = [pick(item) for item in items]
    except KeyError:  # rows with different keys: not json_agg output, but readable
        rows = [tuple(item.get(key) for key in keys) for item in items]
    return Table(path, tuple(str(key).lower() for key in keys), rows)


def _json_lines(path: Path, text: str, whole_failure: json.JSONDecodeError) -> list[Any]:
    """One JSON object per line (``select row_to_json(a) from pg_stat_activity a``)."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as failure:
            where = (whole_failure.lineno, whole_failure.colno, whole_failure.msg)
            if items:
                where = (number, failure.colno, failure.msg)
            raise DumpError(
                f"{path}: not valid JSON (line {where[0]}, column {where[1]}: {where[2]})"
            ) from None
    return items


def _unwrap(path: Path, document: dict[str, Any], how_to: str) -> Any:
    """``{"json_agg": [...]}`` or ``{"rows": [...]}``: the one key holding the row list.

    A single object that is itself a row (a one-line JSON-lines file) is a one-row table.
    """
    lists = [
        value
        for value in document.values()
        if isinstance(value, list) and all(isinstance(item, dict) for item in value)
    ]
    if len(lists) == 1:
        return lists[0]
    if len(lists) > 1:
        raise DumpError(f"{path}: JSON object with several arrays; which one is the dump? {how_to}")
    return [document]


# --------------------------------------------------------------------------- activity rows
def _sessions(table: Table) -> ActivityDump:
    path = table.path
    at = table.index
    missing = [
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
    if missing:
        raise DumpError(
            f"{path}: not a pg_stat_activity dump: missing column(s) {', '.join(missing)} "
            f"(found: {_preview(table.columns)}); {_HOW_TO}"
        )
    if not table.rows:
        raise DumpError(f"{path}: the dump has a header but no rows")

    indices = [at(name) for name in _ACTIVITY_COLUMNS]
    # Column-wise: one pass picks the cells (a C-level transpose, each row touched once), then
    # each column is converted by one tight comprehension instead of Python work per cell.
    columns = list(zip(*map(_picker(indices), table.rows), strict=True))
    try:
        converted = [convert(column) for convert, column in zip(_CONVERTERS, columns, strict=True)]
    except (ValueError, TypeError):
        raise _first_bad_row(table, indices) from None
    stamps = converted[8:12]
    try:
        taken_at, clock_source = _dump_clock(table, stamps)
        ages = [[None if t is None else (taken_at - t).total_seconds() for t in c] for c in stamps]
    except TypeError:  # naive and offset-carrying timestamps cannot be compared
        raise DumpError(
            f"{path}: some timestamps have a time zone offset and some do not; "
            "pg_stat_activity timestamps always have one"
        ) from None
    sessions = tuple(map(Session, *converted, *ages))
    return ActivityDump(taken_at, clock_source, sessions)


def _ints(column: Sequence[Any]) -> list[int | None]:
    return [int(value) if value else None for value in column]


def _pids(column: Sequence[Any]) -> list[int]:
    return list(map(int, column))


def _texts(column: Sequence[Any]) -> list[str | None]:
    return [value or None for value in column]


def _strings(column: Sequence[Any]) -> list[str]:
    return [value or "" for value in column]


def _backend_types(column: Sequence[Any]) -> list[str]:
    # PostgreSQL before 10 has no backend_type and lists only client backends.
    return [value or CLIENT_BACKEND for value in column]


def _stamps(column: Sequence[Any]) -> list[datetime | None]:
    fromiso = datetime.fromisoformat
    return [fromiso(value) if value else None for value in column]


# The pg_stat_activity columns a Session is built from, in Session's positional order.
_ACTIVITY_COLUMNS: tuple[str, ...] = (
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
_CONVERTERS: tuple[Callable[[Sequence[Any]], list[Any]], ...] = (
    _pids,
    _backend_types,
    _texts,  # state
    _texts,  # usename
    _texts,  # datname
    _strings,  # application_name
    _texts,  # client_addr: NULL for a Unix socket
    _ints,  # client_port
    _stamps,
    _stamps,
    _stamps,
    _stamps,
    _texts,  # wait_event_type
    _texts,  # wait_event
    _strings,  # query
    _ints,  # leader_pid
)


def _picker(indices: Sequence[int | None]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """Extract the cells at ``indices`` from a row; None where the dump lacks the column."""
    if all(index is not None for index in indices):
        return itemgetter(*indices)

    def pick(row: Sequence[Any]) -> Sequence[Any]:
        return [row[index] if index is not None else None for index in indices]

    return pick


def _dump_clock(table: Table, stamps: Sequence[Sequence[datetime | None]]) -> tuple[datetime, str]:
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
            _timestamp(table, number, name, row[index])
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
            for name, index in zip(_ACTIVITY_COLUMNS, indices, strict=True)
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
                    f"{where}, column {column}: {_clip(str(value))!r} is not an integer"
                )
    for column in TIMESTAMP_COLUMNS:
        if cells[column]:
            try:
                _timestamp(table, number, column, cells[column])
            except DumpError as problem:
                return problem
    return None


def _timestamp(table: Table, number: int, column: str, value: Any) -> datetime:
    where = f"{table.path}: {table.where(number)}, column {column}"
    try:
        stamp = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        raise DumpError(
            f"{where}: cannot read timestamp {_clip(str(value))!r}; expected ISO 8601 such as "
            "2024-05-01 10:00:00.123+00 (psql with DateStyle ISO, the default)"
        ) from None
    return stamp


def _version_num(settings: Mapping[str, Setting]) -> int | None:
    found = settings.get("server_version_num")
    try:
        return found.as_int() if found is not None else None
    except ValueError:
        return None


def _preview(columns: Sequence[str]) -> str:
    shown = ", ".join(_clip(c, 30) for c in columns[:8])
    return shown + (", ..." if len(columns) > 8 else "")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
