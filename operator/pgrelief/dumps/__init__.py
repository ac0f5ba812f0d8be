"""Offline input: a ``Snapshot`` from the pg_stat_activity / pg_settings dump a user pastes.

During an outage the person asking for help often cannot give us a connection, only a file
they produced with psql:

    \\copy (select * from pg_stat_activity) to 'activity.csv' csv header
    psql -At -c "select json_agg(a) from pg_stat_activity a" > activity.json
    \\copy (select * from pg_settings) to 'settings.csv' csv header

This package reads those (CSV with a header, a JSON array, JSON lines, or a JSON object holding
the array) into the same ``Snapshot`` a live observation gives, so the diagnosis is the same.
Ages come from the file's own clock: a ``now`` column if the user added one
(``select now(), * from pg_stat_activity``), else the newest timestamp in the file; never this
machine's clock, which may be hours or time zones away from the server's.

Dumps of 100k sessions must parse and diagnose within a second, and the csv module alone takes
half of that to split 26 MB. So a psql CSV activity dump is read by pyarrow's C++ reader (only
the columns a Session needs, text deduplicated, timestamps parsed once per distinct value);
everything else, and any file that reader might read differently or that has a bad cell, goes
through the csv/json reference path, which alone defines the semantics and words the errors.

The rooms: ``tables`` (CSV/JSON files into a Table), ``activity`` (rows into Sessions, the dump's
clock), ``settings`` (pg_settings and slot arithmetic), ``_arrow`` (the pyarrow fast path).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pgrelief.dumps._arrow import fast_activity
from pgrelief.dumps.activity import (
    NOW_COLUMNS,
    TIMESTAMP_COLUMNS,
    ActivityDump,
    dumping_session,
    sessions_from,
)
from pgrelief.dumps.settings import DEFAULT_SETTINGS, load_settings, server_facts
from pgrelief.dumps.tables import HOW_TO, Table, parse_table, read_bytes, read_table
from pgrelief.errors import DumpError
from pgrelief.snapshot import Snapshot

__all__ = [
    "DEFAULT_SETTINGS",
    "NOW_COLUMNS",
    "TIMESTAMP_COLUMNS",
    "ActivityDump",
    "DumpError",
    "Table",
    "dumping_session",
    "load_activity",
    "load_settings",
    "read_table",
    "server_facts",
    "snapshot_from_files",
]


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


def load_activity(path: Path) -> ActivityDump:
    """Sessions from a pg_stat_activity dump, with ages on the dump's own clock."""
    data = read_bytes(path)
    with _gc_paused():
        fast = fast_activity(path, data)
        if fast is not None:
            return fast
        return sessions_from(parse_table(path, data, HOW_TO))


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
