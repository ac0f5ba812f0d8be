"""Offline input: a ``Snapshot`` from the pg_stat_activity / pg_settings dump a user pastes.

During an outage the person asking for help often cannot give us a connection, only a file
they produced with psql:

    \\copy (select * from pg_stat_activity) to 'activity.csv' csv header
    psql -At -c "select json_agg(a) from pg_stat_activity a" > activity.json
    \\copy (select * from pg_settings) to 'settings.csv' csv header

This package reads those (CSV with a header, a JSON array, JSON lines, or a JSON object holding
the array, psql's aligned or expanded output, the seed's triage queries, SHOW ALL; from a file
or stdin, several tables in one paste) into the same ``Snapshot`` a live observation gives, so
the diagnosis is the same, or, when only the triage queries were pasted, into the input of the
partial diagnosis (``pgrelief.triage``).
Ages come from the file's own clock: a ``now`` column if the user added one
(``select now(), * from pg_stat_activity``), else the newest timestamp in the file; never this
machine's clock, which may be hours or time zones away from the server's.

Dumps of 100k sessions must parse and diagnose within a second, and the csv module alone takes
half of that to split 26 MB. So a psql CSV activity dump is read by pyarrow's C++ reader (only
the columns a Session needs, text deduplicated, timestamps parsed once per distinct value);
everything else, and any file that reader might read differently or that has a bad cell, goes
through the csv/json reference path, which alone defines the semantics and words the errors.

The rooms: ``paste`` (reading, decoding, finding and naming the tables of a text), ``tables``
(CSV/JSON into Tables), ``psql_output`` (psql's aligned and expanded output into Tables),
``activity`` (rows into Sessions, the dump's clock), ``settings`` (pg_settings, SHOW ALL and
slot arithmetic), ``triage`` (the triage queries' rows), ``_arrow`` (the pyarrow fast path).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgrelief.dumps._arrow import fast_activity
from pgrelief.dumps.activity import (
    NOW_COLUMNS,
    TIMESTAMP_COLUMNS,
    ActivityDump,
    dumping_session,
    missing_columns,
    sessions_from,
)
from pgrelief.dumps.paste import (
    ACCEPTED,
    ACTIVITY,
    MAX_DUMP_BYTES,
    SETTINGS,
    STDIN,
    Found,
    decode,
    describe,
    find_tables,
    read_input,
)
from pgrelief.dumps.settings import DEFAULT_SETTINGS, HOW_TO_SETTINGS, server_facts, settings_from
from pgrelief.dumps.tables import Table, preview, read_table
from pgrelief.dumps.triage import triage_input
from pgrelief.errors import DumpError
from pgrelief.snapshot import Setting, Snapshot
from pgrelief.triage import TriageInput

__all__ = [
    "ACCEPTED",
    "DEFAULT_SETTINGS",
    "MAX_DUMP_BYTES",
    "NOW_COLUMNS",
    "STDIN",
    "TIMESTAMP_COLUMNS",
    "ActivityDump",
    "DumpError",
    "Loaded",
    "Table",
    "dumping_session",
    "load_activity",
    "load_input",
    "load_settings",
    "load_text",
    "read_table",
    "server_facts",
    "snapshot_from_files",
]


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a paste supports: a full snapshot, or the triage queries' partial input; and the
    notes the report must show (not UTF-8, tables not used)."""

    found: Snapshot | TriageInput
    notes: tuple[str, ...] = ()


def load_input(activity_path: Path, settings_path: Path | None = None) -> Loaded:
    """Everything a dump file (``-``: stdin) and an optional settings file hold."""
    return load_text(activity_path, read_input(activity_path), settings_path)


def load_text(path: Path, data: bytes, settings_path: Path | None = None) -> Loaded:
    """``load_input`` over bytes already read (a paste into the web page)."""
    label = _label(path)
    notes: list[str] = []
    with _gc_paused():
        utf8 = _is_utf8(data)
        fast = fast_activity(path, data) if utf8 else None
        activity: ActivityDump | None = fast
        found: list[Found] = []
        if fast is None:
            text, note = decode(label, data)
            notes.extend([note] if note else [])
            found = find_tables(path, text)
            activity = _activity(path, found)
    settings = _settings(path, found, settings_path)
    source = f"file {label}" if path != STDIN else "standard input"
    for item in found:
        if item.kind is None:
            notes.append(f"ignored in {label}: {describe(item)}, not a table pgrelief reads")
    facts = server_facts(settings, source=str(settings_path or label))
    if activity is not None:
        if any(item.kind not in (ACTIVITY, SETTINGS, None) for item in found):
            notes.append(
                f"the triage query output in {label} was not needed: its full "
                "pg_stat_activity table was read"
            )
        snapshot = Snapshot(
            taken_at=activity.taken_at,
            server=facts,
            sessions=activity.sessions,
            own_pid=dumping_session(activity.sessions),
            source=source,
        )
        return Loaded(snapshot, tuple(notes))
    return Loaded(triage_input(found, facts, f"triage queries from {label}"), tuple(notes))


def _label(path: Path) -> str:
    return "standard input" if path == STDIN else str(path)


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _activity(path: Path, found: list[Found]) -> ActivityDump | None:
    tables = [item for item in found if item.kind == ACTIVITY]
    if len(tables) > 1:
        where = ", ".join(describe(item) for item in tables)
        raise DumpError(f"{path}: holds {len(tables)} pg_stat_activity tables ({where}); keep one")
    if tables:
        return sessions_from(tables[0].table)
    if any(item.kind not in (SETTINGS, None) for item in found):
        return None  # the triage queries: a partial diagnosis
    first = found[0].table
    missing = missing_columns(first.index)
    raise DumpError(
        f"{path}: not a pg_stat_activity dump: missing column(s) {', '.join(missing)} "
        f"(found: {preview(first.columns)}); {ACCEPTED}"
    )


def _settings(path: Path, found: list[Found], settings_path: Path | None) -> dict[str, Setting]:
    tables = [item for item in found if item.kind == SETTINGS]
    if len(tables) > 1:
        where = ", ".join(describe(item) for item in tables)
        raise DumpError(f"{path}: holds {len(tables)} settings tables ({where}); keep one")
    if tables and settings_path is not None:
        raise DumpError(
            f"{path} already holds the settings ({describe(tables[0])}); drop --settings-file "
            "or that table"
        )
    if tables:
        return settings_from(tables[0].table)
    return load_settings(settings_path) if settings_path is not None else {}


def snapshot_from_files(activity_path: Path, settings_path: Path | None = None) -> Snapshot:
    """The ``Snapshot`` a live observation would have given, from the user's files."""
    loaded = load_input(activity_path, settings_path)
    if not isinstance(loaded.found, Snapshot):
        raise DumpError(
            f"{activity_path}: holds the triage queries' output, not pg_stat_activity rows"
        )
    return loaded.found


def load_activity(path: Path) -> ActivityDump:
    """Sessions from a pg_stat_activity dump, with ages on the dump's own clock."""
    data = read_input(path)
    with _gc_paused():
        fast = fast_activity(path, data) if _is_utf8(data) else None
        if fast is not None:
            return fast
        text, _ = decode(_label(path), data)
        activity = _activity(path, find_tables(path, text))
    if activity is None:
        raise DumpError(f"{path}: holds the triage queries' output, not pg_stat_activity rows")
    return activity


def load_settings(path: Path) -> dict[str, Setting]:
    """pg_settings rows (or SHOW ALL) from a dump, by name."""
    text, _ = decode(_label(path), read_input(path))
    found = find_tables(path, text)
    tables = [item.table for item in found if item.kind == SETTINGS]
    if not tables:
        first = found[0].table
        missing = [c for c in ("name", "setting") if first.index(c) is None]
        raise DumpError(
            f"{path}: not a pg_settings dump: missing column(s) {', '.join(missing)} "
            f"(found: {preview(first.columns)}); {HOW_TO_SETTINGS}"
        )
    return settings_from(tables[0])


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
