"""The fast path for psql CSV activity dumps: pyarrow's C++ reader instead of the csv module.

Dumps of 100k sessions must parse and diagnose within a second, and the csv module alone takes
half of that to split 26 MB. So a psql CSV activity dump is read by pyarrow's multi-threaded
reader (only the columns a Session needs, text deduplicated, timestamps parsed once per
distinct value). Private: ``load_activity`` is the way in, and any file this path might read
differently from the reference path, or that has a bad cell, makes it return None so the
reference path gives the result or the precise message.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from pgrelief.dumps.activity import (
    ACTIVITY_COLUMNS,
    CONVERTERS,
    NOW_COLUMNS,
    TIMESTAMP_COLUMNS,
    ActivityDump,
    as_backend_types,
    as_ints,
    as_pids,
    as_stamps,
    as_strings,
    as_texts,
    missing_columns,
)
from pgrelief.snapshot import CLIENT_BACKEND, Session


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
    as_texts: None,
    as_strings: "",
    as_backend_types: CLIENT_BACKEND,
}


def fast_activity(path: Path, data: bytes) -> ActivityDump | None:
    """``sessions_from(parse_table(...))`` without a Python step per cell, or None.

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

    if len(columns) < 2 or missing_columns(at):
        raise _NotPlainError
    if _PLAIN_QUOTING.fullmatch(data, end + 1) is None:
        raise _NotPlainError
    # pyarrow reads the rows from a buffer of their own and drops a BOM at its start: a first
    # cell that begins with U+FEFF would lose it. The reference reader keeps it.
    if data.startswith(codecs.BOM_UTF8, end + 1):
        raise _NotPlainError
    words = pa.dictionary(pa.int32(), pa.string())
    types = {
        str(index): pa.string() if convert in (as_pids, as_ints) else words
        for name, convert in (
            *zip(ACTIVITY_COLUMNS, CONVERTERS, strict=True),
            *((name, as_stamps) for name in NOW_COLUMNS),
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
    for name, convert in zip(ACTIVITY_COLUMNS, CONVERTERS, strict=True):
        if at(name) is None:
            null = None if convert in (as_pids, as_ints, as_stamps) else _NULL_AS[convert]
            converted.append([null] * rows)
            if convert is as_stamps:
                ages.append([None] * rows)
        elif convert in (as_pids, as_ints):
            converted.append(integers(name, required=convert is as_pids))
        elif convert is as_stamps:
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
    """``dump_clock`` over each column's distinct parsed timestamps (None last)."""
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
