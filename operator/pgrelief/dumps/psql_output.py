"""psql's own table output, as people paste it from a terminal: aligned and expanded (``\\x``).

In an outage nobody writes a CSV for us: they run ``select * from pg_stat_activity`` (or the
seed's triage queries, or ``SHOW ALL``) in psql and paste what the terminal shows. This module
finds every table in such a text and reads it back into ``Table`` rows of raw cells, the same
shape the CSV reader gives, so the rest of the pipeline does not care where a row came from.

What psql writes (print.c, psql 13 to 18, the same in each):

* aligned: a header line, a separator line of dashes (``-----+-----`` with ``\\pset border 1``,
  the default; ``----- -----`` with border 0; framed by ``+---+`` lines with border 2; the
  same with box-drawing characters under ``\\pset linestyle unicode``), one line per row,
  a ``(N rows)`` footer. Cells are padded to the column's *display* width (an East Asian
  character takes two columns), numbers right-aligned, NULL blank. A value holding a line
  break continues on the next line with ``+`` (``↵``) in the margin after the cell; with
  ``\\pset format wrapped`` a value cut to fit the screen continues with ``.`` (``…``) in both
  margins.
* expanded (``\\x``, or ``\\x auto`` when a row is wider than the screen): ``-[ RECORD n ]---``
  blocks of ``name | value`` lines (``* Record n`` with border 0), with the same markers.

Lines around the tables (the prompt and the command, "Expanded display is on.") are skipped;
a table's footer, when present, must agree with the rows read, so a row this reader could
not split is an error naming its line rather than a silently shorter table.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

from pgrelief.dumps.tables import Table
from pgrelief.errors import DumpError

_DASHES = "-─"
# Margin markers: a line break inside the value, a value wrapped to fit the screen.
_NEWLINE_MARKS = "+↵"
_WRAP_MARKS = ".…"
_MARKS = _NEWLINE_MARKS + _WRAP_MARKS
_BARS = "|│"

_BORDER1 = re.compile(r"(?:-+(?:\+-+)+|─+(?:┼─+)+)")
_BORDER0 = re.compile(r"(?:-+(?: -+)+|─+(?: ─+)+)")
_BORDER2 = re.compile(r"(?:\+-+(?:\+-+)+\+|├─+(?:┼─+)+┤)")
_BORDER2_TOP = re.compile(r"(?:\+-+(?:\+-+)+\+|┌─+(?:┬─+)+┐)")
_FOOTER = re.compile(r"\((\d+) rows?\)")
_BOTTOM = re.compile(r"(?:\+-+(?:\+-+)+\+|└─+(?:┴─+)+┘)")
_RECORD = re.compile(
    r"(?P<frame>[+┌├]?)[-─]\[ RECORD (?P<n>\d+) \][-─]*(?P<junction>[+┼┬][-─]*)?[+┐┤]?"
    r"|\* Record (?P<n0>\d+) ?"
)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where an aligned table's columns are, in display columns, and how cells sit in them."""

    spans: tuple[tuple[int, int], ...]  # each column's dash run [start, end)
    margins: bool  # border 1 and 2: a space (or a marker) on each side of every cell
    framed: bool  # border 2: bars before the first and after the last column
    bars_at: tuple[int, ...]  # where a line of the table has its column separators


def looks_like_psql(text: str) -> bool:
    """True when ``text`` holds an aligned table or an expanded record as psql prints them."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.rstrip()
        if _RECORD.fullmatch(stripped):
            return True
        if number and lines[number - 1].strip() and _separator(stripped) is not None:
            return True
    return False


def psql_tables(path: Path, text: str) -> list[Table]:
    """Every aligned table and expanded record block in ``text``, in order."""
    lines = text.splitlines()
    tables: list[Table] = []
    number = 0
    while number < len(lines):
        line = lines[number].rstrip()
        record = _RECORD.fullmatch(line)
        if record is not None:
            table, number = _expanded(path, lines, number)
            tables.append(table)
            continue
        layout = _separator(line)
        if layout is not None and number and lines[number - 1].strip():
            header_at = number - 1
            if layout.framed and not _framed_header(lines, number):
                number += 1
                continue
            table, number = _aligned(path, lines, header_at, layout)
            tables.append(table)
            continue
        number += 1
    return tables


# ------------------------------------------------------------------------------ aligned
def _separator(line: str) -> _Layout | None:
    if _BORDER1.fullmatch(line):
        framed, margins = False, True
    elif _BORDER2.fullmatch(line):
        framed, margins = True, True
    elif _BORDER0.fullmatch(line):
        framed, margins = False, False
    else:
        return None
    spans = tuple((m.start(), m.end()) for m in re.finditer(f"[{_DASHES}]+", line))
    if framed:
        bars = (0, *(end for _, end in spans))
    else:
        bars = tuple(end for _, end in spans[:-1]) if margins else ()
    return _Layout(spans, margins, framed, bars)


def _framed_header(lines: Sequence[str], separator_at: int) -> bool:
    """Border 2: a top frame line, the header between bars, then the separator."""
    return (
        separator_at >= 2
        and _BORDER2_TOP.fullmatch(lines[separator_at - 2].rstrip()) is not None
        and lines[separator_at - 1].rstrip()[:1] in _BARS
    )


def _aligned(
    path: Path, lines: Sequence[str], header_at: int, layout: _Layout
) -> tuple[Table, int]:
    header = _cells(lines[header_at].rstrip(), layout)
    if header is None:
        raise DumpError(
            f"{path}: line {header_at + 1}: the header does not line up with the separator "
            "line under it; paste psql's output unchanged"
        )
    columns = tuple(content.strip().lower() for content, _ in header)
    plain = _plain_splitter(layout)
    rows: list[list[str]] = []  # each cell as printed, padding included
    multi: dict[tuple[int, int], _Cell] = {}  # cells printed over several lines
    row_lines: list[int] = []
    open_columns: set[int] = set()  # columns whose value goes on to the next line
    number = header_at + 2
    footer: int | None = None
    while number < len(lines):
        line = lines[number].rstrip()
        if not open_columns:
            if not line or line[0] in "(+└":  # an end: a blank line, the frame, the footer
                if not line or _BOTTOM.fullmatch(line):
                    number += 1
                    if layout.framed and number < len(lines):
                        found = _FOOTER.fullmatch(lines[number].rstrip())
                        if found is not None:
                            footer = int(found.group(1))
                            number += 1
                    break
                found = _FOOTER.fullmatch(line)
                if found is not None:
                    footer = int(found.group(1))
                    number += 1
                    break
            simple = plain(line) if plain is not None else None
            if simple is not None:  # the common line: one whole row, nothing continued
                rows.append(simple)
                row_lines.append(number + 1)
                number += 1
                continue
        split = _cells(line, layout)
        if split is None:
            if open_columns:
                raise DumpError(
                    f"{path}: line {number + 1}: a continued cell does not line up with the "
                    "header; paste psql's output unchanged"
                )
            break
        if not open_columns:
            rows.append([""] * len(columns))
            row_lines.append(number + 1)
            open_columns = set(range(len(columns)))
        at = len(rows) - 1
        for index, (content, right) in enumerate(split):
            if index not in open_columns:
                continue  # its value ended on an earlier line of this row
            cell = multi.setdefault((at, index), _Cell())
            cell.parts.append(content)
            if right in _MARKS:
                cell.joins.append("\n" if right in _NEWLINE_MARKS else "")
            else:
                open_columns.discard(index)
        number += 1
    values = _assemble(rows, multi)
    if footer is not None and footer != len(values):
        raise DumpError(
            f"{path}: line {header_at + 1}: the footer says {footer} row(s) but {len(values)} "
            "could be read; was the paste cut, or edited inside the table?"
        )
    return Table(path, columns, values, row_lines=tuple(row_lines)), number


def _plain_splitter(layout: _Layout) -> Callable[[str], list[str] | None] | None:
    """A fast split for an ASCII line that holds one whole row (border 1 and 2); None for a
    line that needs ``_cells`` (wide characters, a continued value, not lined up)."""
    if not layout.margins or len(layout.spans) < 2:
        return None
    bars = layout.bars_at
    bar_chars = itemgetter(*bars) if len(bars) > 1 else None
    expected = "|" * len(bars)
    spans = layout.spans if layout.framed else layout.spans[:-1]
    margins = itemgetter(*(end - 1 for _, end in spans)) if len(spans) > 1 else None
    slices = [slice(start + 1, end - 1) for start, end in spans]
    last_start = layout.spans[-1][0] + 1
    last_end = layout.spans[-1][1]
    need = max(bars) + 1

    def split(line: str) -> list[str] | None:
        if len(line) < need or not line.isascii() or bar_chars is None or margins is None:
            return None
        if "".join(bar_chars(line)) != expected or "".join(margins(line)).strip(" "):
            return None
        cells = [line[part] for part in slices]
        if not layout.framed:
            last = line[last_start:]
            if len(last) == last_end - last_start and last[-1:] in _MARKS:
                return None  # the last value goes on to the next line
            cells.append(last)
        return cells

    return split


@dataclass(slots=True)
class _Cell:
    """One value as printed: its pieces, one per line, and how each joins the next."""

    parts: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)  # "\n" (line break) or "" (wrapped)


_PADDED_AFTER = re.compile("[^ \0] +\0")  # a value followed by padding
_PADDED_BEFORE = re.compile("\0 +[^ \0]")  # padding before a value


def _assemble(rows: list[list[str]], multi: dict[tuple[int, int], _Cell]) -> list[Sequence[str]]:
    """Strip the padding psql added, column by column as it aligned them, and join the
    pieces of the values printed over several lines."""
    if not rows:
        return []
    out_columns = []
    right: list[bool] = []
    singles: dict[int, list[str]] = {}  # one-line values that took the slow path
    for (_, index), cell in multi.items():
        if len(cell.parts) == 1:
            singles.setdefault(index, []).append(cell.parts[0])
    for index, column in enumerate(zip(*rows, strict=True)):
        # One C-level scan of the column: a value with trailing padding means left-aligned.
        joined = "\0" + "\0".join((*column, *singles.get(index, ()))) + "\0"
        aligned_right = (
            _PADDED_AFTER.search(joined) is None and _PADDED_BEFORE.search(joined) is not None
        )
        right.append(aligned_right)
        strip = str.strip if aligned_right else str.rstrip
        out_columns.append(list(map(strip, column, repeat(" "))))
    values: list[Sequence[str]] = list(zip(*out_columns, strict=True))
    for (at, index), cell in multi.items():
        row = values[at] = list(values[at])
        row[index] = _value(cell, right[index])
    return values


def _value(cell: _Cell, right_aligned: bool) -> str:
    parts, joins = cell.parts, cell.joins
    if len(parts) == 1:
        return parts[0].strip(" ") if right_aligned else parts[0].rstrip(" ")
    value = ""
    for index, part in enumerate(parts):
        join = joins[index] if index < len(joins) else None
        text = part
        if right_aligned:
            text = part.strip(" ")
        elif join != "":
            # A piece before a wrap fills the column exactly: its trailing spaces are the
            # value's own. Any other piece is padded.
            text = part.rstrip(" ")
        value += text + (join or "")
    return value


def _cells(line: str, layout: _Layout) -> list[tuple[str, str]] | None:
    """A line's (content, right margin) per column, or None if it does not fit the layout."""
    positions = None if line.isascii() else _display_positions(line)
    width = len(line) if positions is None else positions[-1]

    def segment(start: int, end: int) -> str | None:
        if start >= end:
            return ""
        if positions is None:
            return line[start:end].ljust(end - start)
        return _slice(line, positions, start, end)

    for bar in layout.bars_at:
        if bar >= width or segment(bar, bar + 1) not in tuple(_BARS):
            return _cells_by_bars(line, layout)
    cells: list[tuple[str, str]] = []
    last = len(layout.spans) - 1
    for index, (start, end) in enumerate(layout.spans):
        if not layout.margins:
            content, right = segment(start, end), segment(end, end + 1)
        elif index == last and not layout.framed:
            # The last column is not padded: a marker ends a line exactly at the margin.
            text = segment(start + 1, max(width, start + 1))
            if text is not None and len(text) == end - start - 1 and text[-1:] in _MARKS:
                content, right = text[:-1], text[-1]
            else:
                content, right = text, " "
        else:
            content, right = segment(start + 1, end - 1), segment(end - 1, end)
        if content is None or right is None:
            return _cells_by_bars(line, layout)
        cells.append((content, right))
    return cells


def _cells_by_bars(line: str, layout: _Layout) -> list[tuple[str, str]] | None:
    """Fallback when display widths disagree with psql's: split at the bars, if unambiguous.

    A last column's line-break marker cannot be told from the value here; a value that
    continues is then read as a new row, which the footer check reports.
    """
    if not layout.margins:
        return None
    parts = re.split(f"[{_BARS}]", line)
    if layout.framed:
        parts = parts[1:-1]
    if len(parts) != len(layout.spans):
        return None
    cells = []
    for index, part in enumerate(parts):
        if index == len(parts) - 1 and not layout.framed:
            cells.append((part[1:], " "))
        else:
            cells.append((part[1:-1], part[-1:] or " "))
    return cells


def _display_positions(line: str) -> list[int]:
    """The display column each character starts at, then the line's width."""
    positions = []
    column = 0
    for char in line:
        positions.append(column)
        column += _char_width(char)
    positions.append(column)
    return positions


def _slice(line: str, positions: Sequence[int], start: int, end: int) -> str | None:
    """The characters between display columns start and end, spaces past the line's end."""
    width = positions[-1]
    if start >= width:
        return " " * (end - start)
    begin = _index_at(positions, start)
    stop = _index_at(positions, min(end, width))
    if begin is None or stop is None:
        return None  # a cut inside a wide character: the widths disagree with psql's
    return line[begin:stop] + " " * max(end - width, 0)


def _index_at(positions: Sequence[int], column: int) -> int | None:
    index = bisect_left(positions, column)
    return index if index < len(positions) and positions[index] == column else None


def _char_width(char: str) -> int:
    """Display width as PostgreSQL's pg_wcswidth computes it (Unicode width tables)."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


# ------------------------------------------------------------------------------ expanded
def _expanded(path: Path, lines: Sequence[str], first: int) -> tuple[Table, int]:
    columns: list[str] = []
    rows: list[list[str]] = []
    row_lines: list[int] = []
    junction: int | None = None
    number = first
    while number < len(lines):
        header = _RECORD.fullmatch(lines[number].rstrip())
        if header is None:
            break
        border0 = header.group("n0") is not None
        framed = bool(header.group("frame"))
        body, after = _record_lines(lines, number + 1, border0, framed)
        if body and junction is None:
            junction = _junction(body, border0)
        fields = _fields(path, body, junction or 0, border0, number + 2) if body else []
        names = [name for name, _ in fields]
        if not rows:
            columns = names
        elif names != columns:
            raise DumpError(
                f"{path}: line {number + 1}: record {len(rows) + 1} has other fields than "
                "record 1; paste one query's output per table"
            )
        rows.append([value for _, value in fields])
        row_lines.append(number + 1)
        number = after
    if number < len(lines) and _FOOTER.fullmatch(lines[number].rstrip()):
        number += 1
    lowered = tuple(name.lower() for name in columns)
    return Table(path, lowered, rows, row_lines=tuple(row_lines)), number


_ENDS_RECORD = frozenset("-+┌├└*(")  # the first character of a record header, frame or footer


def _record_lines(
    lines: Sequence[str], number: int, border0: bool, framed: bool
) -> tuple[list[str], int]:
    """The field lines of one record (frame bars removed) and the index of the line after."""
    body: list[str] = []
    while number < len(lines):
        line = lines[number].rstrip()
        if not line:
            break
        if line[0] in _ENDS_RECORD:
            if _RECORD.fullmatch(line) or _FOOTER.fullmatch(line):
                break
            if framed and _BOTTOM.fullmatch(line):
                number += 1
                break
        if not border0 and "|" not in line and "│" not in line:
            break  # the prompt after the output, or other text
        body.append(line[1:].removesuffix("|").removesuffix("│") if framed else line)
        number += 1
    return body, number


def _fields(
    path: Path, body: Sequence[str], junction: int, border0: bool, first_line: int
) -> list[tuple[str, str]]:
    """One record's (name, value) pairs; values printed over several lines joined."""
    skip = 1 if border0 else 2  # the bar (or space) and the margin after it
    fields: list[list[Any]] = []  # name, value, and a _Cell once the value continues
    for offset, line in enumerate(body):
        if not border0 and line[junction : junction + 1] not in _BARS:
            raise DumpError(
                f"{path}: line {first_line + offset}: the field does not line up with the "
                "others of its record; paste psql's output unchanged"
            )
        name = line[:junction].strip()
        value = line[junction + skip :]
        if name:
            fields.append([name, value, None])
            continue
        if not fields:
            raise DumpError(f"{path}: line {first_line + offset}: a value before any field name")
        field = fields[-1]
        cell = field[2]
        if cell is None:
            cell = field[2] = _Cell([field[1]])
        previous = cell.parts[-1].rstrip(" ")  # the padding before a marker
        mark = previous[-1:]
        if mark in _MARKS:
            cell.parts[-1] = previous[:-1]
        cell.joins.append("" if mark in _WRAP_MARKS else "\n")
        cell.parts.append(value)
    return [
        (name, value.rstrip(" ") if cell is None else _value(cell, right_aligned=False))
        for name, value, cell in fields
    ]


def _junction(body: Sequence[str], border0: bool) -> int:
    """Where the name column ends: the bar (border 1, 2) or the space after the longest name."""
    if border0:
        return max(len(line.split(" ", 1)[0]) for line in body if line[:1] != " ")
    return min(min(i for i in (line.find("|"), line.find("│")) if i >= 0) for line in body)
