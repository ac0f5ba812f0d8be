"""What a user hands us: one text, from a file or stdin, holding one or more tables.

People paste what their terminal shows, not a file made for us: psql's aligned or expanded
output, the seed's three triage queries, ``SHOW ALL``, a CSV or JSON dump, often several of
them one after the other (``cat activity.csv settings.csv | pgrelief diagnose
--activity-file -``). This module reads such a text within a size limit, decodes it (saying
so when it was not UTF-8), finds every table in it whatever its format, and names what each
table is by its columns. Anything it cannot place is said in one line naming the formats it
accepts; a table it does not need is reported as ignored, never dropped silently.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pgrelief.dumps.activity import missing_columns
from pgrelief.dumps.psql_output import looks_like_psql, psql_tables
from pgrelief.dumps.tables import Table, check_text, clip, csv_tables, json_tables, preview
from pgrelief.errors import DumpError

STDIN = Path("-")

# A dump bigger than this is refused before it is read: a whole pg_stat_activity of the
# largest servers, with query texts cut to a few hundred characters, is a few hundred MB.
MAX_DUMP_BYTES = 512 * 1024 * 1024

ACCEPTED = (
    "accepted: CSV with a header line (\\copy (select now(), * from pg_stat_activity) to "
    "'a.csv' csv header), JSON (select json_agg(a) from pg_stat_activity a), psql's aligned "
    "or expanded (\\x) output of select * from pg_stat_activity or of the three triage "
    "queries (pgrelief diagnose --help), and SHOW ALL or pg_settings for the settings"
)
_CUT = (
    "\\copy (select now(), pid, backend_type, state, usename, datname, application_name, "
    "client_addr, client_port, backend_start, xact_start, query_start, state_change, "
    "wait_event_type, wait_event, leader_pid, left(query, 200) as query from "
    "pg_stat_activity) to 'activity.csv' csv header"
)

# What a table is, by its columns.
ACTIVITY = "pg_stat_activity"
SETTINGS = "pg_settings"
TRIAGE_STATES = "triage query 1 (connections by state)"
TRIAGE_USERS = "triage query 2 (connections by user, application and state)"
TRIAGE_IDLE = "triage query 3 (the oldest idle connections)"
COUNT_COLUMNS = ("count", "cnt")


@dataclass(frozen=True, slots=True)
class Found:
    """One table of a paste and what it is (None: pgrelief does not read it)."""

    kind: str | None
    table: Table


def read_input(path: Path) -> bytes:
    """The bytes of a dump file, or of stdin for ``-``, refusing what is over the size limit."""
    if path == STDIN:
        data = sys.stdin.buffer.read(MAX_DUMP_BYTES + 1)
        if len(data) > MAX_DUMP_BYTES:
            raise DumpError(_too_big("standard input", None))
        return data
    try:
        size = path.stat().st_size
        if size > MAX_DUMP_BYTES:
            raise DumpError(_too_big(str(path), size))
        with path.open("rb") as handle:
            data = handle.read(MAX_DUMP_BYTES + 1)  # a pipe or device says size 0
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DumpError(f"{path}: is a directory, not a dump file") from None
    except OSError as failure:
        raise DumpError(f"{path}: cannot read: {failure.strerror or failure}") from None
    if len(data) > MAX_DUMP_BYTES:
        raise DumpError(_too_big(str(path), None))
    return data


def _too_big(name: str, size: int | None) -> str:
    limit = MAX_DUMP_BYTES // (1024 * 1024)
    what = f"is {size / 1024**3:.1f} GB" if size is not None else f"is over {limit} MB"
    return (
        f"{name} {what}; pgrelief reads dumps up to {limit} MB. Dump only the columns it "
        f"reads, with query texts cut: {_CUT}"
    )


def decode(name: str, data: bytes) -> tuple[str, str | None]:
    """The text of a dump, and a note when it was not UTF-8 (None when it was).

    psql writes in the client encoding, so a LATIN1 terminal gives LATIN1 bytes, and a session
    in a SQL_ASCII database puts its own bytes into an otherwise UTF-8 dump. Each line that is
    not UTF-8 is read as LATIN1, where every byte is a character (the most likely encoding,
    and never an error), and the report says so once instead of showing mojibake or U+FFFD as
    if it were a role's name.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), None  # PowerShell's redirection writes UTF-16
    if data.isascii():
        return data.decode("ascii"), None
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    decoded: list[str] = []
    other = utf8 = 0
    for line in data.removeprefix(codecs.BOM_UTF8).split(b"\n"):
        if line.isascii():
            decoded.append(line.decode("ascii"))
            continue
        try:
            decoded.append(line.decode("utf-8"))
            utf8 += 1
        except UnicodeDecodeError:
            decoded.append(line.decode("latin-1"))
            other += 1
    text = "\n".join(decoded)
    if utf8:
        return text, (
            f"{name} is not all UTF-8: {other} line(s) were read as LATIN1 (ISO 8859-1), the "
            "rest as UTF-8 (a SQL_ASCII database, or a session in another encoding)"
        )
    return text, (
        f"{name} is not UTF-8: it was read as LATIN1 (ISO 8859-1); if psql's client encoding "
        "was another one, names with accents may show wrong characters (set "
        "PGCLIENTENCODING=UTF8 when dumping)"
    )


def find_tables(path: Path, text: str) -> list[Found]:
    """Every table in the text, whatever its format, each with what it is."""
    check_text(path, text, ACCEPTED)
    text = _without_preamble(text)
    stripped = text.lstrip()
    if stripped[0] in "[{":
        tables = json_tables(path, stripped, ACCEPTED, _known)
    elif _csv_header(stripped) is None and looks_like_psql(text):
        tables = psql_tables(path, text)
    else:
        tables = _csv_or_nothing(path, text)
    return [Found(kind_of(table.columns), table) for table in tables]


def _csv_header(text: str) -> Sequence[str] | None:
    """The first line as CSV column names, when it names a table pgrelief reads."""
    first = text.split("\n", 1)[0].strip()
    try:
        names = next(csv.reader(io.StringIO(first)))
    except (csv.Error, StopIteration):
        return None
    columns = tuple(name.strip().lower() for name in names)
    return columns if len(columns) >= 2 and kind_of(columns) is not None else None


def _csv_or_nothing(path: Path, text: str) -> list[Table]:
    first = text.lstrip().split("\n", 1)[0].rstrip("\r")
    text = _from_first_header(text)
    try:
        tables = csv_tables(path, text, ACCEPTED, _known)
    except DumpError:
        if _csv_header(text.lstrip()) is not None:
            raise  # a CSV dump with a bad row: that row's own message
        tables = []
    if not tables or all(kind_of(t.columns) is None and len(t.columns) < 2 for t in tables):
        raise DumpError(
            f"{path}: not a dump pgrelief can read (first line: {clip(first)!r}); {ACCEPTED}"
        )
    return tables


# What psql prints before a result in a terminal: the prompt with the command, and the
# answers to \pset and \x.
_PREAMBLE = re.compile(
    r"\s*(?:[^\s|,]*[=\-(*'\"][#>].*|(?:Output format|Expanded display|Border style|Line style"
    r"|Null display|Target width|Tuples only|Field separator|Record separator|Pager usage"
    r"|Title|Default footer|Timing) is .*|Time: .*|Pager usage is .*)?"
)


def _without_preamble(text: str) -> str:
    """The text with the prompt and psql's messages before the first table blanked (line
    numbers stay the file's)."""
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if _PREAMBLE.fullmatch(line) is None:
            return "\n" * number + "\n".join(lines[number:]) if number else text
    return text


def _from_first_header(text: str) -> str:
    """The text from its first line of known column names on (psql's "Output format is
    csv." or the prompt before it blanked, so line numbers stay the file's)."""
    lines = text.split("\n")
    for number, line in enumerate(lines[:50]):
        if _csv_header(line) is not None:
            return "\n" * number + "\n".join(lines[number:])
    return text


def _known(columns: Sequence[str]) -> bool:
    return kind_of(columns) is not None


def kind_of(columns: Sequence[str]) -> str | None:
    """What a table with these columns is; None when pgrelief does not read it."""
    names = set(columns)
    counted = bool(names & set(COUNT_COLUMNS))
    if "idle_duration" in names and "pid" in names:
        return TRIAGE_IDLE
    if not missing_columns(lambda name: 0 if name in names else None):
        return ACTIVITY
    if {"name", "setting"} <= names:
        return SETTINGS
    if counted and "pid" not in names and {"usename", "application_name", "state"} <= names:
        return TRIAGE_USERS
    if counted and names - set(COUNT_COLUMNS) == {"state"}:
        return TRIAGE_STATES
    return None


def describe(found: Found) -> str:
    """A table as the user would recognise it: what it is or its columns, and where."""
    table = found.table
    where = table.where(0) if table.rows else f"line {table.first_line}"
    what = found.kind or f"a table with columns {preview(table.columns)}"
    return f"{what} ({where})"
