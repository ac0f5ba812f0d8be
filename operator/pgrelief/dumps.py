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

Dumps of 100k sessions must parse and diagnose within a second, and the csv module alone takes
half of that to split 26 MB. So a psql CSV activity dump is read by pyarrow's C++ reader (only
the columns a Session needs, text deduplicated, timestamps parsed once per distinct value);
everything else, and any file that reader might read differently or that has a bad cell, goes
through the csv/json reference path, which alone defines the semantics and words the errors.
"""

from __future__ import annotations

import codecs
import csv
import gc
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from pgrelief.errors import DumpError
from pgrelief.snapshot import (
    ACTIVE,
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
        own_pid=dumping_session(activity.sessions),
        source=f"file {activity_path}",
    )


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
    data = _read_bytes(path)
    with _gc_paused():
        fast = _fast_activity(path, data)
        if fast is not None:
            return fast
        return _sessions(_parse_table(path, data, _HOW_TO))


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
    return _parse_table(path, _read_bytes(path), how_to)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DumpError(f"{path}: is a directory, not a dump file") from None
    except OSError as failure:
        raise DumpError(f"{path}: cannot read: {failure.strerror or failure}") from None


def _parse_table(path: Path, data: bytes, how_to: str) -> Table:
    # Line breaks are kept as they are: CSV fields (query texts) may hold them.
    text = data.decode("utf-8-sig", errors="replace")
    stripped = text.lstrip()
    if not stripped:
        raise DumpError(f"{path}: the file is empty; {how_to}")
    if "\x00" in text:
        raise DumpError(f"{path}: a binary file, not CSV or JSON; {how_to}")
    if stripped[0] in "[{":
        return _json_table(path, stripped, how_to)
    return _csv_table(path, text, how_to)


# track_activity_query_size goes up to 1 MB; the csv module refuses fields over 128 KiB by
# default, which pyarrow does not. The limit is process-wide: only ever raised.
_FIELD_LIMIT = 64 * 1024 * 1024


def _csv_table(path: Path, text: str, how_to: str) -> Table:
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
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
    missing = _missing_columns(at)
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


def _missing_columns(at: Callable[[str], int | None]) -> list[str]:
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


# --------------------------------------------------------------------------- fast CSV path
class _NotPlainError(Exception):
    """The fast path cannot vouch for giving the reference path's result on this file."""


# The quoting the fast path accepts: every double quote belongs to a quoted field that starts
# a field and is followed by a comma, a line break or the end ("a""b" is one field); there are
# none inside unquoted fields. That is all psql writes, and within it pyarrow's reader splits
# fields exactly as csv.reader(strict=True) does; outside it they differ ("ab"c is abc to
# pyarrow and an error to csv), so such files take the reference path.
# Possessive: the grammar is unambiguous, and backtracking made a late failure cost a second.
_PLAIN_QUOTING = re.compile(rb'[^"]*+(?:(?<![^,\r\n])"[^"]*+(?:""[^"]*+)*+"(?![^,\r\n])[^"]*+)*+')
# The integers int() and pyarrow's int64 cast both read, to the same number (pyarrow also
# takes 0x10, int() also takes +1, 1_000 and spaces: those take the reference path).
_PLAIN_INTEGER = r"^-?[0-9]+$"
# What a NULL cell becomes in each column, as the reference converters have it.
_NULL_AS: Mapping[Callable[[Sequence[Any]], list[Any]], object] = {
    _texts: None,
    _strings: "",
    _backend_types: CLIENT_BACKEND,
}


def _fast_activity(path: Path, data: bytes) -> ActivityDump | None:
    """``_sessions(_parse_table(...))`` without a Python step per cell, or None.

    pyarrow's multi-threaded reader splits the file and converts only the columns a Session
    needs, ``""`` read as NULL (empty means NULL to every reference converter). Low-cardinality
    text arrives dictionary-encoded: each distinct value becomes one Python string shared by
    all its rows, which also makes every later hash of it a cached one. Timestamps are parsed
    by ``datetime.fromisoformat`` (the reference's parser, offsets kept as written) once per
    distinct value, and ages are computed once per distinct timestamp.

    None for anything that is not plainly a psql CSV dump, and for every error: the reference
    path then gives the result or the precise message, so both paths have one semantics.
    """
    # Imported here, not at the top: ~0.1 s that only reading a dump needs.
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
    except ImportError:  # optional at run time: the reference path reads everything
        return None
    try:
        return _arrow_activity(path, data, pa)
    except (_NotPlainError, ValueError, TypeError, OverflowError, pa.ArrowException):
        return None


def _arrow_activity(path: Path, data: bytes, pa: Any) -> ActivityDump:
    import pyarrow.compute as pc  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
    import pyarrow.csv as pa_csv  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    end = data.find(b"\n", start)
    line = data[start:end].removesuffix(b"\r")
    # The header as the reference reads it: one record, no quoting, not JSON nor blank.
    if end < 0 or not line[:1].isalnum() or b'"' in line or b"\r" in line or b"\x00" in data:
        raise _NotPlainError
    columns = tuple(name.strip().lower() for name in line.decode().split(","))

    def at(name: str) -> int | None:
        return columns.index(name) if name in columns else None

    if len(columns) < 2 or _missing_columns(at):
        raise _NotPlainError
    if _PLAIN_QUOTING.fullmatch(data, end + 1) is None:
        raise _NotPlainError
    words = pa.dictionary(pa.int32(), pa.string())
    types = {
        str(index): pa.string() if convert in (_pids, _ints) else words
        for name, convert in (
            *zip(_ACTIVITY_COLUMNS, _CONVERTERS, strict=True),
            *((name, _stamps) for name in NOW_COLUMNS),
        )
        if (index := at(name)) is not None
    }
    table = pa_csv.read_csv(
        pa.py_buffer(data).slice(end + 1),
        read_options=pa_csv.ReadOptions(column_names=[str(i) for i in range(len(columns))]),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(types),
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    rows = table.num_rows
    if not rows:
        raise _NotPlainError

    def distinct(name: str, null_as: object) -> tuple[list[Any], list[int]]:
        """The column's distinct values, ``null_as`` last, and each row's index into them."""
        column = table.column(str(at(name))).combine_chunks()
        if pc.count_distinct(column.indices).as_py() != len(column.dictionary):
            # Only values some row has: each is parsed, and the newest one is the clock.
            column = column.dictionary_decode().dictionary_encode()
        values: list[Any] = column.dictionary.to_pylist()
        values.append(null_as)
        return values, column.indices.fill_null(len(values) - 1).to_pylist()

    def integers(name: str, required: bool) -> list[Any]:
        column = table.column(str(at(name)))
        if required and column.null_count:
            raise _NotPlainError
        plain = pc.match_substring_regex(column, _PLAIN_INTEGER)
        if not pc.all(plain, skip_nulls=True, min_count=0).as_py():
            raise _NotPlainError
        return column.cast(pa.int64()).to_pylist()  # type: ignore[no-any-return]

    fromisoformat = datetime.fromisoformat
    stamps: dict[str, tuple[list[datetime | None], list[int]]] = {}
    for name in (*TIMESTAMP_COLUMNS, *NOW_COLUMNS):
        if at(name) is not None:
            texts, indices = distinct(name, None)
            parsed: list[datetime | None] = list(map(fromisoformat, texts[:-1]))
            parsed.append(None)
            stamps[name] = parsed, indices
    taken_at, clock_source = _fast_clock(stamps)
    since, seconds = taken_at.__sub__, timedelta.total_seconds

    converted: list[list[Any]] = []
    ages: list[list[Any]] = []
    for name, convert in zip(_ACTIVITY_COLUMNS, _CONVERTERS, strict=True):
        if at(name) is None:
            null = None if convert in (_pids, _ints, _stamps) else _NULL_AS[convert]
            converted.append([null] * rows)
            if convert is _stamps:
                ages.append([None] * rows)
        elif convert in (_pids, _ints):
            converted.append(integers(name, required=convert is _pids))
        elif convert is _stamps:
            parsed, indices = stamps[name]
            known = cast(list[datetime], parsed[:-1])
            age: list[float | None] = list(map(seconds, map(since, known)))
            age.append(None)
            converted.append(list(map(parsed.__getitem__, indices)))
            ages.append(list(map(age.__getitem__, indices)))
        else:
            values, indices = distinct(name, _NULL_AS[convert])
            converted.append(list(map(values.__getitem__, indices)))
    sessions = tuple(map(Session, *converted, *ages))
    return ActivityDump(taken_at, clock_source, sessions)


def _fast_clock(
    stamps: Mapping[str, tuple[list[datetime | None], list[int]]],
) -> tuple[datetime, str]:
    """``_dump_clock`` over each column's distinct parsed timestamps (None last)."""
    newest = max(
        (
            max(cast(list[datetime], parsed[:-1]))
            for name, (parsed, _) in stamps.items()
            if name in TIMESTAMP_COLUMNS and len(parsed) > 1
        ),
        default=None,
    )
    for name in NOW_COLUMNS:
        if name in stamps and len(stamps[name][0]) > 1:
            clock = max(cast(list[datetime], stamps[name][0][:-1]))
            return (clock if newest is None else max(clock, newest)), f"column {name}"
    if newest is None:
        raise _NotPlainError  # the reference path says there are no timestamps
    return newest, "newest timestamp in the file"


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
