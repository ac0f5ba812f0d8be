"""Reading a dump file into a ``Table``: CSV with a header, a JSON array, JSON lines, or a JSON
object holding the array.

This is the reference reader: it alone defines what a dump file means and words every error
(the pyarrow fast path in ``_arrow`` hands any file it cannot vouch for back to it). A paste
may hold several tables one after the other (``cat activity.csv settings.csv``, or two
``json_agg`` results): given ``starts_table``, which says whether a row of column names opens a
table pgrelief knows, the readers return each table instead of one malformed one.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from pgrelief.errors import DumpError

HOW_TO = (
    "expected the output of \\copy (select * from pg_stat_activity) to 'file.csv' csv header, "
    'or of psql -At -c "select json_agg(a) from pg_stat_activity a"'
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
    row_lines: Sequence[int] | None = None  # each row's first line (psql's output)
    first_line: int = 1  # where the table starts in the file (one of several in a paste)

    def index(self, name: str) -> int | None:
        try:
            return self.columns.index(name)
        except ValueError:
            return None

    def where(self, row: int) -> str:
        """Where row number ``row`` (0-based) is in the file, for error messages."""
        if self.row_lines is not None and row < len(self.row_lines):
            return f"line {self.row_lines[row]}"
        if self.csv_text is None:
            return f"element {row + 1}"
        # Re-parsed on demand: recording every row's line while reading costs 10%.
        reader = csv.reader(io.StringIO(self.csv_text, newline=""))
        next(reader)
        for number, _record in enumerate(filter(None, reader)):
            if number == row:
                return f"line {reader.line_num + self.first_line - 1}"
        return f"row {row + 1}"


# Says whether a row of column names opens a table of a kind pgrelief reads.
StartsTable = Callable[[Sequence[str]], bool]


def read_table(path: Path, how_to: str = HOW_TO) -> Table:
    """A CSV (with header) or JSON dump as a ``Table``; ``DumpError`` for anything else."""
    return parse_table(path, read_bytes(path), how_to)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DumpError(f"{path}: is a directory, not a dump file") from None
    except OSError as failure:
        raise DumpError(f"{path}: cannot read: {failure.strerror or failure}") from None


def parse_table(path: Path, data: bytes, how_to: str) -> Table:
    """The one CSV or JSON table in ``data`` (UTF-8, undecodable bytes replaced)."""
    # Line breaks are kept as they are: CSV fields (query texts) may hold them.
    text = data.decode("utf-8-sig", errors="replace")
    check_text(path, text, how_to)
    if text.lstrip()[0] in "[{":
        return _json_table(path, text.lstrip(), how_to)
    return _csv_table(path, text, how_to)


def check_text(path: Path, text: str, how_to: str) -> None:
    """The complaints that come before any format: nothing in it, or not text at all."""
    if not text.strip():
        raise DumpError(f"{path}: the file is empty; {how_to}")
    if "\x00" in text:
        raise DumpError(f"{path}: a binary file, not a text dump; {how_to}")


def csv_tables(path: Path, text: str, how_to: str, starts_table: StartsTable) -> list[Table]:
    """One table per header line in a CSV text (several files pasted one after the other).

    A row opens a new table when all its cells are names and ``starts_table`` knows them: a
    data row of pg_stat_activity or pg_settings never is (its first cell is a number or a
    setting's name beside a value that is not a name).
    """
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    parts: list[tuple[int, tuple[str, ...], list[list[str]]]] = []  # header line, names, rows
    try:
        for record in reader:
            if not record:
                continue
            if not parts or _names_a_table(record, starts_table):
                parts.append((reader.line_num, tuple(c.strip().lower() for c in record), []))
            else:
                parts[-1][2].append(record)
    except csv.Error as failure:
        raise DumpError(f"{path}: line {reader.line_num}: not valid CSV ({failure})") from None
    if not parts:
        raise DumpError(f"{path}: the file is empty; {how_to}")
    lines = io.StringIO(text, newline="").readlines()  # split as the csv reader counts lines
    ends = [line for line, _, _ in parts[1:]] + [len(lines) + 1]
    tables = []
    for (first, columns, rows), end in zip(parts, ends, strict=True):
        if len(columns) < 2:
            raise DumpError(
                f"{path}: line {first}: not a CSV header line "
                f"({clip(lines[first - 1].rstrip())!r}); "
                f"{how_to}"
            )
        table = Table(path, columns, rows, "".join(lines[first - 1 : end - 1]), None, first)
        _check_widths(table)
        tables.append(table)
    return tables


def _names_a_table(record: Sequence[str], starts_table: StartsTable) -> bool:
    return (
        _IDENT.fullmatch(record[0].strip()) is not None
        and all(_IDENT.fullmatch(cell.strip()) for cell in record)
        and starts_table(tuple(cell.strip().lower() for cell in record))
    )


_IDENT = re.compile(r"[a-z_][a-z0-9_]*", re.IGNORECASE)


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
                f"{clip(text.splitlines()[0])!r}); {how_to}"
            )
        rows = list(filter(None, reader))  # filter: blank lines
    except csv.Error as failure:
        raise DumpError(f"{path}: line {reader.line_num}: not valid CSV ({failure})") from None
    table = Table(path, columns, rows, text)
    _check_widths(table)
    return table


def _check_widths(table: Table) -> None:
    width = len(table.columns)
    for number, record in enumerate(table.rows):
        if len(record) != width:
            raise DumpError(
                f"{table.path}: {table.where(number)}: {len(record)} fields where the header "
                f"has {width}; was the file cut or edited?"
            )


def json_tables(path: Path, text: str, how_to: str, starts_table: StartsTable) -> list[Table]:
    """The tables of one or more JSON documents one after the other.

    Each array of row objects (``json_agg``), or object holding one (``{"rows": [...]}``), is
    a table; consecutive row objects (``row_to_json``, one per line) are one table until the
    keys change to another kind ``starts_table`` knows.
    """
    try:
        return [_json_table(path, text, how_to)]
    except DumpError as single:
        documents = _json_documents(path, text)
        if len(documents) < 2:
            raise single from None
    tables: list[Table] = []
    loose: list[dict[str, Any]] = []
    for document in documents:
        if isinstance(document, dict) and not _holds_rows(document):
            if loose and set(document) != set(loose[0]) and starts_table(tuple(document)):
                tables.append(_rows_table(path, loose, how_to))
                loose = []
            loose.append(document)
            continue
        if loose:
            tables.append(_rows_table(path, loose, how_to))
            loose = []
        tables.append(_rows_table(path, document, how_to))
    if loose:
        tables.append(_rows_table(path, loose, how_to))
    return tables


def _json_documents(path: Path, text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return documents
        try:
            document, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as failure:
            raise DumpError(
                f"{path}: not valid JSON (line {failure.lineno}, column {failure.colno}: "
                f"{failure.msg})"
            ) from None
        documents.append(document)


def _holds_rows(document: dict[str, Any]) -> bool:
    return any(
        isinstance(value, list) and value and all(isinstance(item, dict) for item in value)
        for value in document.values()
    )


def _json_table(path: Path, text: str, how_to: str) -> Table:
    try:
        items: Any = json.loads(text)
    except json.JSONDecodeError as whole_failure:
        items = _json_lines(path, text, whole_failure)
    return _rows_table(path, items, how_to)


def _rows_table(path: Path, items: Any, how_to: str) -> Table:
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


def preview(columns: Sequence[str]) -> str:
    shown = ", ".join(clip(c, 30) for c in columns[:8])
    return shown + (", ..." if len(columns) > 8 else "")


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
