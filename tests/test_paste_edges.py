"""Pastes that go wrong: other encodings, huge files, things that are no dump, edited tables.

Issue 10 items 4 (a LATIN1 dump gets a warning, not silent mojibake) and 13 (a 30 GB dump gets
a clear error, never MemoryError), and the one line that names the accepted formats.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.diagnose import diagnose
from pgrelief.dumps import STDIN, load_input, paste
from pgrelief.errors import DumpError
from pgrelief.snapshot import Snapshot
from pgrelief.triage import TriageInput, diagnose_triage
from tests import factories
from tests.fixtures.postgres import SessionFactory
from tests.test_paste_input import ACTIVITY, pgrelief, run_psql

LATIN1_QUERY = "select 'crème brûlée' as dessert"


def one_error_line(done: object) -> str:
    assert getattr(done, "returncode") == 3  # noqa: B009
    lines = getattr(done, "stderr").decode().strip().splitlines()  # noqa: B009
    assert len(lines) == 1, lines
    assert lines[0].startswith("pgrelief: error: ")
    assert "Traceback" not in lines[0]
    return str(lines[0])


def test_a_latin1_dump_is_decoded_and_the_report_says_so(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    """psql with PGCLIENTENCODING=LATIN1 writes LATIN1 bytes: read as such, and said once."""
    holder = sessions.idle(app="dessert")
    holder.conn.execute(LATIN1_QUERY)
    sessions.wait_for(holder.pid, state="idle")
    path = tmp_path / "latin1.txt"
    path.write_bytes(
        run_psql(pg_server, pg_server.tool("psql"), "set client_encoding = 'LATIN1'", ACTIVITY)
    )
    assert LATIN1_QUERY.encode("latin-1") in path.read_bytes()
    loaded = load_input(path)
    assert isinstance(loaded.found, Snapshot)
    by_pid = {s.pid: s for s in loaded.found.sessions}
    assert by_pid[holder.pid].query == LATIN1_QUERY  # no mojibake, no U+FFFD
    (note,) = loaded.notes
    assert note.startswith(f"{path} is not UTF-8: it was read as LATIN1")

    text = pgrelief("diagnose", "--activity-file", str(path))
    assert text.returncode in (0, 1, 2), text.stderr
    assert text.stdout.decode().count("is not UTF-8") == 1
    report = json.loads(
        pgrelief("diagnose", "--activity-file", str(path), "--format", "json").stdout
    )
    assert report["notes"] == [note]


def test_a_non_utf8_query_among_utf8_text_is_replaced_and_said(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    """A session in a SQL_ASCII database: the server hands its query's bytes over as they are,
    into a dump that is otherwise UTF-8."""
    database = "pgrelief_sql_ascii"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("drop database if exists {}").format(sql.Identifier(database)))
        admin.execute(
            sql.SQL(
                "create database {} encoding 'SQL_ASCII' template template0 lc_collate 'C' "
                "lc_ctype 'C'"
            ).format(sql.Identifier(database))
        )
    try:
        with psycopg.connect(
            pg_server.dsn(dbname=database), application_name="latin1-app", autocommit=True
        ) as conn:
            conn.execute(LATIN1_QUERY.encode("latin-1"))
            utf8 = sessions.idle(app="utf8-app")
            utf8.conn.execute("select 'naïve ✓'")
            sessions.wait_for(utf8.pid, state="idle")
            path = tmp_path / "mixed.csv"
            run_psql(
                pg_server,
                pg_server.tool("psql"),
                f"\\copy ({ACTIVITY}) to '{path}' csv header",
            )
            latin1_pid = conn.info.backend_pid
        loaded = load_input(path)
    finally:
        with pg_server.connect() as admin:
            admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database))
            )
    assert isinstance(loaded.found, Snapshot)
    by_pid = {s.pid: s for s in loaded.found.sessions}
    assert by_pid[latin1_pid].query == LATIN1_QUERY  # its line read as LATIN1
    assert by_pid[utf8.pid].query == "select 'naïve ✓'"  # the others' as UTF-8
    (note,) = loaded.notes
    assert note.startswith(f"{path} is not all UTF-8: 1 line(s) were read as LATIN1")


def test_a_30_gb_dump_is_refused_before_reading(tmp_path: Path) -> None:
    huge = tmp_path / "activity.csv"
    with huge.open("wb") as handle:
        handle.truncate(30 * 1024**3)  # sparse: no disk used
    assert huge.stat().st_blocks * 512 < 1024 * 1024
    line = one_error_line(pgrelief("diagnose", "--activity-file", str(huge)))
    assert f"{huge} is 30.0 GB; pgrelief reads dumps up to 512 MB" in line
    assert "left(query, 200) as query from pg_stat_activity) to 'activity.csv' csv header" in line


def test_stdin_is_read_only_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paste, "MAX_DUMP_BYTES", 1000)
    endless = io.BytesIO(b"x" * 5000)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(endless))
    with pytest.raises(DumpError, match=r"^standard input is over 0 MB; pgrelief reads dumps up"):
        paste.read_input(STDIN)
    assert endless.tell() <= 1001 + io.DEFAULT_BUFFER_SIZE


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("prose.txt", b"the database is down again\nplease help\n"),
        ("page.html", b"<html><body><table><tr><td>pid</td></tr></table></body></html>\n"),
        ("passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
        ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ],
)
def test_a_file_in_no_accepted_format_gets_one_line_naming_them(
    name: str, content: bytes, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    line = one_error_line(pgrelief("diagnose", "--activity-file", str(path)))
    assert str(path) in line
    assert "accepted: CSV with a header line" in line
    assert "psql's aligned or expanded (\\x) output" in line
    assert "the three triage queries" in line


def test_psql_unaligned_output_is_named_not_accepted(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    path = tmp_path / "unaligned.txt"
    path.write_bytes(
        run_psql(pg_server, pg_server.tool("psql"), "\\pset format unaligned", ACTIVITY)
    )
    line = one_error_line(pgrelief("diagnose", "--activity-file", str(path)))
    assert "not a dump pgrelief can read (first line: 'now|datid|" in line
    assert "accepted:" in line


def test_an_edited_table_is_an_error_naming_its_line(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    sessions.idle(app="web")
    lines = run_psql(pg_server, pg_server.tool("psql"), ACTIVITY).decode().splitlines()
    cut = tmp_path / "cut.txt"
    cut.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # one row removed
    with pytest.raises(DumpError, match=r"line 1: the footer says \d+ row\(s\) but \d+ could"):
        load_input(cut)


def test_two_activity_tables_and_unused_tables_are_said(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    psql = pg_server.tool("psql")
    twice = tmp_path / "twice.txt"
    twice.write_bytes(run_psql(pg_server, psql, ACTIVITY, ACTIVITY))
    with pytest.raises(DumpError, match=r"holds 2 pg_stat_activity tables \(pg_stat_act"):
        load_input(twice)
    extra = tmp_path / "extra.txt"
    extra.write_bytes(run_psql(pg_server, psql, "select version(), 1 as one", ACTIVITY))
    loaded = load_input(extra)
    assert isinstance(loaded.found, Snapshot)
    (note,) = loaded.notes
    assert note.startswith(f"ignored in {extra}: a table with columns version, one (line 3)")
    settings_twice = tmp_path / "settings.txt"
    settings_twice.write_bytes(run_psql(pg_server, psql, "show all"))
    both = tmp_path / "both.txt"
    both.write_bytes(run_psql(pg_server, psql, ACTIVITY, "show all"))
    with pytest.raises(DumpError, match="already holds the settings"):
        load_input(both, settings_twice)


@settings(max_examples=200, deadline=None)
@given(
    clients=st.integers(0, 60),
    max_connections=st.integers(1, 60),
    superuser_reserved=st.integers(0, 5),
    warning=st.integers(1, 98),
)
def test_the_partial_pressure_is_diagnoses_pressure(
    clients: int, max_connections: int, superuser_reserved: int, warning: int
) -> None:
    """The triage counts judge fullness by diagnose's rule, whatever the numbers."""
    from pgrelief.diagnose import DiagnoseOptions  # noqa: PLC0415

    options = DiagnoseOptions(warning_percent=warning, critical_percent=warning + 1)
    full = factories.snapshot(
        factories.many(clients, 1000),
        max_connections=max_connections,
        superuser_reserved=superuser_reserved,
    )
    partial = TriageInput(source="test", server=full.server, by_state={"idle": clients})
    assert diagnose_triage(partial, options).pressure == diagnose(full, options).pressure
