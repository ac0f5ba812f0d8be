"""Offline input: dumps written by real psql from a real server read back as the live snapshot."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.dumps import load_activity, load_settings, read_table, snapshot_from_files
from pgrelief.dumps._arrow import fast_activity
from pgrelief.dumps.activity import sessions_from
from pgrelief.dumps.tables import HOW_TO, parse_table
from pgrelief.errors import DumpError, PgreliefError
from pgrelief.observe import connect, take_snapshot
from pgrelief.snapshot import Session, Snapshot
from tests.fixtures.postgres import SessionFactory

Connection = psycopg.Connection[tuple[object, ...]]


def psql(
    server: EmbeddedPostgres,
    *args: str,
    datestyle: str | None = None,
    tcp: bool = False,
    timezone: str | None = None,
) -> str:
    """Run the server's own psql (socket or TCP), as a user at the terminal would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(server.libpq_env(), PGDATABASE="postgres")
    if tcp:
        env["PGHOST"] = server.host
    if datestyle is not None:
        env["PGDATESTYLE"] = datestyle
    if timezone is not None:
        env["PGTZ"] = timezone
    done = subprocess.run(
        [str(server.tool("psql")), "-X", "-v", "ON_ERROR_STOP=1", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def copy_csv(
    server: EmbeddedPostgres,
    query: str,
    path: Path,
    *,
    datestyle: str | None = None,
    tcp: bool = False,
    timezone: str | None = None,
) -> Path:
    psql(
        server,
        "-c",
        f"\\copy ({query}) to '{path}' csv header",
        datestyle=datestyle,
        tcp=tcp,
        timezone=timezone,
    )
    return path


def json_agg(
    server: EmbeddedPostgres, query: str, path: Path, *, alias: str = "a", tcp: bool = False
) -> Path:
    statement = f"select json_agg({alias}) from ({query}) {alias}"
    path.write_text(psql(server, "-At", "-c", statement, tcp=tcp))
    return path


@pytest.fixture
def observer(pg_server: EmbeddedPostgres) -> Iterator[Connection]:
    with connect(pg_server.dsn(), application_name="observer") as conn:
        yield conn


def fingerprint(session: Session) -> tuple[object, ...]:
    return (
        session.pid,
        session.backend_type,
        session.state,
        session.usename,
        session.datname,
        session.application_name,
        session.client_addr,
        session.client_port,
        session.backend_start,
        session.xact_start,
        session.state_change,
        session.wait_event_type,
        session.leader_pid,
    )


def psql_session(snapshot: Snapshot) -> Session:
    (found,) = [s for s in snapshot.client_sessions if s.application_name == "psql"]
    return found


@pytest.mark.parametrize("form", ["csv", "json"])
def test_a_psql_dump_reads_back_as_the_live_snapshot(
    form: str,
    sessions: SessionFactory,
    pg_server: EmbeddedPostgres,
    observer: Connection,
    tmp_path: Path,
) -> None:
    sessions.incident()
    live = take_snapshot(observer)
    path = tmp_path / f"activity.{form}"
    if form == "csv":
        copy_csv(pg_server, "select * from pg_stat_activity", path)
    else:
        json_agg(pg_server, "select * from pg_stat_activity", path)
    dumped = snapshot_from_files(path)

    # Same client sessions, field for field, except the two that differ by construction:
    # the observer (active live, idle in the dump) and psql itself (only in the dump).
    dumper = psql_session(dumped)
    skip = {live.own_pid, dumper.pid}
    live_clients = {fingerprint(s) for s in live.client_sessions if s.pid not in skip}
    dump_clients = {fingerprint(s) for s in dumped.client_sessions if s.pid not in skip}
    assert live_clients == dump_clients
    assert sessions.pids() | {sessions.admin.info.backend_pid} <= {c[0] for c in dump_clients}
    by_pid = {s.pid: s for s in dumped.sessions}
    assert by_pid[live.own_pid].state == "idle"
    assert dumper.state == "active" and dumper.query.lower().startswith(
        "copy" if form == "csv" else "select json_agg"
    )
    assert {s.pid for s in dumped.sessions if not s.is_client} >= {
        s.pid for s in live.sessions if s.backend_type in ("checkpointer", "walwriter")
    }
    waiter = next(s for s in dumped.sessions if s.application_name == "etl-lock")
    assert waiter.is_waiting_on_lock
    assert next(s for s in dumped.sessions if s.application_name == "notifier").is_listener

    # Ages on the file's own clock: its newest timestamp, psql's own statement start.
    stamps = [
        stamp
        for s in dumped.sessions
        for stamp in (s.backend_start, s.xact_start, s.query_start, s.state_change)
        if stamp is not None
    ]
    assert dumped.taken_at == max(stamps) == dumper.state_change
    assert dumper.state_age_s == 0.0
    live_by_pid = {s.pid: s for s in live.sessions}
    for pid in sessions.pids():
        then, now = live_by_pid[pid], by_pid[pid]
        assert now.state_change is not None and now.state_age_s is not None
        assert now.state_age_s == pytest.approx(
            (dumped.taken_at - now.state_change).total_seconds(), abs=1e-6
        )
        assert then.state_age_s is not None and now.state_age_s >= then.state_age_s
        assert now.backend_age_s is not None and then.backend_age_s is not None
        assert now.backend_age_s >= then.backend_age_s

    # Without a settings file the slot arithmetic uses PostgreSQL's defaults, and says so.
    assert dumped.server.max_connections == 100
    assert {"max_connections", "superuser_reserved_connections", "work_mem"} <= set(
        dumped.server.assumed
    )
    # psql's own session plays the part pgrelief's session plays live.
    assert dumped.own_pid == dumper.pid
    assert all(s.is_superuser is None for s in dumped.sessions)


def test_a_now_column_is_the_clock(pg_server: EmbeddedPostgres, tmp_path: Path) -> None:
    path = copy_csv(pg_server, "select now(), * from pg_stat_activity", tmp_path / "with-now.csv")
    dump = load_activity(path)
    assert dump.clock_source == "column now"
    now_cells = [row[0] for row in csv.reader(io.StringIO(path.read_text()))][1:]
    assert len(set(now_cells)) == 1  # one transaction, one now()
    # now() is the transaction start; a timestamp read later in it proves a later clock.
    newest = max(
        stamp
        for s in dump.sessions
        for stamp in (s.backend_start, s.xact_start, s.query_start, s.state_change)
        if stamp is not None
    )
    assert dump.taken_at == max(newest, datetime.fromisoformat(now_cells[0]))
    assert all(s.state_age_s is None or s.state_age_s >= 0 for s in dump.sessions)

    clock_path = json_agg(
        pg_server,
        "select clock_timestamp() + interval '1 hour' as now, * from pg_stat_activity",
        tmp_path / "clock.json",
    )
    shifted = load_activity(clock_path)
    assert shifted.clock_source == "column now"
    assert shifted.taken_at > newest
    dumper = next(s for s in shifted.sessions if s.application_name == "psql")
    assert dumper.query_age_s is not None and dumper.query_age_s >= 3600


@pytest.mark.parametrize("form", ["csv", "json"])
def test_a_pg_settings_dump_gives_the_live_server_facts(
    form: str, pg_server: EmbeddedPostgres, observer: Connection, tmp_path: Path
) -> None:
    live = take_snapshot(observer)
    activity = copy_csv(pg_server, "select * from pg_stat_activity", tmp_path / "a.csv")
    settings_path = tmp_path / f"settings.{form}"
    # Over TCP like the observer: tcp_keepalives_* read 0 in a Unix-socket session.
    if form == "csv":
        copy_csv(pg_server, "select * from pg_settings", settings_path, tcp=True)
    else:
        json_agg(pg_server, "select * from pg_settings", settings_path, alias="s", tcp=True)
    dumped = snapshot_from_files(activity, settings_path)

    assert dumped.server.assumed == ()
    for attribute in (
        "version_num",
        "max_connections",
        "superuser_reserved_connections",
        "reserved_connections",
        "usable_slots",
    ):
        assert getattr(dumped.server, attribute) == getattr(live.server, attribute), attribute
    assert dumped.server.max_connections == pg_server.max_connections
    assert dumped.server.usable_slots == pg_server.usable_slots
    for name, setting in live.server.settings.items():
        assert dumped.server.settings[name] == setting, name
    assert dumped.server.setting_bytes("shared_buffers") == 32 * 1024 * 1024
    assert len(load_settings(settings_path)) > 200  # every pg_settings row is kept


def test_json_lines_and_a_wrapping_object_are_accepted(
    sessions: SessionFactory, pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    idle = sessions.idle("reporting", "jsonl-check", tcp=False)
    lines = tmp_path / "activity.jsonl"
    lines.write_text(psql(pg_server, "-At", "-c", "select row_to_json(a) from pg_stat_activity a"))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(
        psql(
            pg_server,
            "-At",
            "-c",
            "select json_build_object('pg_stat_activity', json_agg(a)) from pg_stat_activity a",
        )
    )
    for path in (lines, wrapped):
        found = {s.pid: s for s in load_activity(path).sessions}
        assert found[idle.pid].state == "idle"
        assert found[idle.pid].application_name == "jsonl-check"
        assert found[idle.pid].client_addr is None


def test_an_old_server_dump_without_backend_type(tmp_path: Path) -> None:
    """PostgreSQL 9.6 has neither backend_type nor leader_pid; a user may also drop usename."""
    path = tmp_path / "pg96.csv"
    path.write_text(
        "datid,datname,pid,usesysid,application_name,client_addr,client_port,backend_start,"
        "xact_start,query_start,state_change,wait_event_type,wait_event,state,query,extra\n"
        "13,shop,101,16384,rails,10.1.2.3,5000,2024-03-31 00:00:00+01,,"
        "2024-03-31 00:10:00+01,2024-03-31 00:10:00.5+01,Client,ClientRead,idle,select 1,x\n"
        # after the DST change: a newer instant with a different offset
        "13,shop,102,16384,,,-1,2024-03-31 03:00:00+02,2024-03-31 03:00:01+02,"
        '2024-03-31 03:00:02+02,2024-03-31 03:00:02+02,,,active,"select a, b\nfrom t",y\n'
    )
    dump = load_activity(path)
    first, second = dump.sessions
    assert dump.taken_at.isoformat() == "2024-03-31T03:00:02+02:00"
    assert dump.clock_source == "newest timestamp in the file"
    assert first.backend_type == second.backend_type == "client backend"
    assert first.usename is None and first.leader_pid is None
    assert (first.client_addr, first.client_port, first.application_name) == (
        "10.1.2.3",
        5000,
        "rails",
    )
    assert (second.client_addr, second.application_name) == (None, "")
    assert second.query == "select a, b\nfrom t"
    # 00:10:00.5+01 is 23:10:00.5 UTC; 03:00:02+02 is 01:00:02 UTC.
    assert first.state_age_s == pytest.approx(1 * 3600 + 50 * 60 + 1.5)
    assert first.xact_age_s is None
    assert second.state_age_s == 0.0


# ------------------------------------------------------------------------------ bad input
def expect_dump_error(path: Path, *needles: str) -> str:
    with pytest.raises(DumpError) as raised:
        snapshot_from_files(path)
    message = str(raised.value)
    assert isinstance(raised.value, PgreliefError)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_unreadable_and_empty_files(tmp_path: Path) -> None:
    expect_dump_error(tmp_path / "nope.csv", "no such file")
    expect_dump_error(tmp_path, "is a directory")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    expect_dump_error(empty, "the file is empty", "accepted: CSV with a header line")
    blank = tmp_path / "blank.json"
    blank.write_text("  \n\n ")
    expect_dump_error(blank, "the file is empty")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    expect_dump_error(binary, "binary file")


def test_text_that_is_not_a_dump(tmp_path: Path) -> None:
    prose = tmp_path / "notes.txt"
    prose.write_text("the database is down again\nplease help\n")
    expect_dump_error(
        prose,
        "not a dump pgrelief can read (first line: 'the database is down again')",
        "accepted: CSV with a header line",
        "psql's aligned or expanded (\\x) output",
    )
    # psql's aligned output is read; this one lacks what a Session needs.
    pasted = tmp_path / "pasted.txt"
    pasted.write_text(" pid | state\n-----+-------\n  42 | idle\n(1 row)\n")
    expect_dump_error(
        pasted, "missing column(s) usename (or usesysid), state_change (or query_start)"
    )
    header_only = tmp_path / "header.csv"
    header_only.write_text("pid,usename,state,state_change\n")
    expect_dump_error(header_only, "header but no rows")


def test_a_dump_of_another_table(pg_server: EmbeddedPostgres, tmp_path: Path) -> None:
    path = copy_csv(pg_server, "select * from pg_class", tmp_path / "pg_class.csv")
    expect_dump_error(
        path,
        "not a pg_stat_activity dump",
        "missing column(s) pid, state, usename (or usesysid), state_change (or query_start)",
        "found: oid, relname",
    )
    settings_as_activity = copy_csv(pg_server, "select * from pg_settings", tmp_path / "s.csv")
    expect_dump_error(settings_as_activity, "missing column(s) pid, state")
    activity = copy_csv(pg_server, "select * from pg_stat_activity", tmp_path / "a.csv")
    with pytest.raises(DumpError, match=r"not a pg_settings dump: missing column\(s\) name"):
        snapshot_from_files(activity, activity)


def test_bad_cells_name_their_line_and_column(pg_server: EmbeddedPostgres, tmp_path: Path) -> None:
    good = copy_csv(pg_server, "select * from pg_stat_activity order by pid", tmp_path / "a.csv")
    rows = list(csv.reader(io.StringIO(good.read_text(), newline="")))
    header = rows[0]
    state_change, pid = header.index("state_change"), header.index("pid")
    # A row whose cells hold no line break, so its line number is plain to count.
    target = next(
        i
        for i, row in enumerate(rows[1:], start=1)
        if row[state_change] and "\n" not in "".join(row)
    )

    def write(name: str, column: int, value: str) -> tuple[Path, int]:
        changed = [list(row) for row in rows]
        changed[target][column] = value
        out = io.StringIO(newline="")
        csv.writer(out, lineterminator="\n").writerows(changed)
        text = out.getvalue()
        path = tmp_path / name
        path.write_text(text)
        return path, text[: text.index(value)].count("\n") + 1

    path, line = write("bad-ts.csv", state_change, "yesterday at noon")
    expect_dump_error(
        path, f"line {line}, column state_change", "cannot read timestamp 'yesterday at noon'"
    )
    path, line = write("bad-pid.csv", pid, "forty-two")
    expect_dump_error(path, f"line {line}, column pid", "'forty-two' is not an integer")

    cut = tmp_path / "cut.csv"
    text = good.read_text()
    cut.write_text(text[: text.rindex("\n", 0, len(text) - 1)] + "\n1,2,3\n")
    expect_dump_error(cut, "fields where the header has")


def test_a_non_iso_datestyle_dump_is_refused_clearly(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    path = copy_csv(
        pg_server,
        "select * from pg_stat_activity",
        tmp_path / "sql-style.csv",
        datestyle="SQL, DMY",
    )
    message = expect_dump_error(path, "cannot read timestamp", "DateStyle ISO")
    assert "column backend_start" in message


def test_bad_json(tmp_path: Path) -> None:
    cases = {
        "broken.json": ('[{"pid": 1, "state": ', "not valid JSON (line 1, column"),
        "numbers.json": ("[1, 2, 3]", "something other than row objects"),
        "empty.json": ("[]", "the JSON array is empty"),
        "two-arrays.json": ('{"a": [], "b": []}', "several arrays"),
        "lines.json": ('{"pid": 1, "state": "idle"}\n{"pid": 2, oops}\n', "line 2"),
        "not-activity.json": ('[{"relname": "t", "relpages": 1}]', "missing column(s) pid"),
        "bad-stamp.json": (
            json.dumps([{"pid": 7, "usename": "u", "state": "idle", "state_change": "soon"}]),
            "element 1, column state_change",
        ),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        expect_dump_error(path, needle)


def test_mixed_naive_and_aware_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text(
        "pid,usename,state,state_change\n"
        "1,u,idle,2024-01-01 10:00:00+00\n"
        "2,u,idle,2024-01-01 10:00:00\n"
    )
    expect_dump_error(path, "some timestamps have a time zone offset and some do not")


def test_read_table_keeps_nulls_as_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('a,b\n,""\n')
    table = read_table(path)
    assert table.columns == ("a", "b")
    assert [list(row) for row in table.rows] == [["", ""]]


def test_settings_that_do_not_add_up(tmp_path: Path) -> None:
    activity = tmp_path / "one.jsonl"
    activity.write_text(
        '{"pid": 9, "usename": "u", "state": "idle", "state_change": "2024-01-01T10:00:00+00:00"}\n'
    )
    settings = tmp_path / "settings.csv"
    settings.write_text("name,setting,unit\nmax_connections,lots,\nwork_mem,4096,kB\n")
    with pytest.raises(DumpError) as raised:
        snapshot_from_files(activity, settings)
    assert str(raised.value) == f"{settings}: max_connections is 'lots', not a number"

    settings.write_text("name,setting,unit\nmax_connections,40,\nserver_version_num,150008,\n")
    snapshot = snapshot_from_files(activity, settings)
    assert [s.pid for s in snapshot.sessions] == [9]
    assert snapshot.server.max_connections == 40
    assert snapshot.server.version_num == 150008
    # Taken from PostgreSQL's defaults and listed as such; reserved_connections does not
    # exist before 16, so it is neither assumed nor counted.
    assert "max_connections" not in snapshot.server.assumed
    assert "superuser_reserved_connections" in snapshot.server.assumed
    assert "reserved_connections" not in snapshot.server.assumed
    assert snapshot.server.usable_slots == 40 - 3


# ------------------------------------------------------------------ fast path = reference path
# A psql CSV activity dump is read by pyarrow (dumps._arrow.fast_activity); every other file, and
# any file that reader might read differently, by the csv module (the reference). These tests
# hold the fast path to the reference's result, value for value (repr: offsets and floats).
def reference(data: bytes, path: Path = Path("activity.csv")) -> str:
    """repr of the reference path's ActivityDump, or its error message."""
    try:
        return repr(sessions_from(parse_table(path, data, HOW_TO)))
    except DumpError as failure:
        return f"DumpError: {failure}"


def fast(data: bytes, path: Path = Path("activity.csv")) -> str | None:
    found = fast_activity(path, data)
    return None if found is None else repr(found)


# One line: psql's \copy takes its query from the rest of the line.
SYNTHETIC_ACTIVITY = " ".join(
    line.strip()
    for line in """
    select now() as now, 1000 + g as pid, case when g % 9 = 0 then 999 end as leader_pid,
      (array['client backend', 'client backend', 'walsender', null])[1 + g % 4] as backend_type,
      (array['idle', 'active', 'idle in transaction', null, ''])[1 + g % 5] as state,
      (array['app', 'we"ird, role', 'naïve ✓', 'NULL'])[1 + g % 4] as usename,
      (array['shop', 'Prod DB', null])[1 + g % 3] as datname,
      (array['web', E'multi\\nline', 'a,"b"', '', ' '])[1 + g % 5] as application_name,
      case when g % 3 = 0 then null else ('10.0.0.' || g % 7)::inet end as client_addr,
      case when g % 3 = 0 then -1 else 40000 + g end as client_port,
      timestamptz '2024-03-30 23:00:00.000001+00' + g * interval '37.123457 seconds'
        as backend_start,
      case when g % 5 <> 0 then timestamptz '2024-03-31 00:30:00+00' + g * interval '41.5 s' end
        as xact_start,
      timestamptz '2024-03-31 00:40:00+00' + g * interval '42.000001 s' as query_start,
      timestamptz '2024-03-31 00:40:00+00' + g * interval '42.25 s' as state_change,
      case when g % 4 = 1 then 'Lock' end as wait_event_type,
      case when g % 4 = 1 then 'transactionid' end as wait_event,
      (array['select 1', E'insert into t ("a","b")\\r\\nvalues ($1,$2)', 'x""y', '', null,
             'LISTEN jobs'])[1 + g % 6] as query
    from generate_series(1, 300) g
    """.strip().splitlines()
)


@pytest.mark.parametrize(
    ("timezone", "offsets"),
    [
        ("UTC", {"+00:00"}),
        ("Asia/Kolkata", {"+05:30"}),
        ("America/Sao_Paulo", {"-03:00"}),
        ("America/St_Johns", {"-02:30"}),  # daylight time on 2024-03-31
        ("Europe/Berlin", {"+01:00", "+02:00"}),  # DST starts at 01:00 UTC that night
    ],
)
def test_psql_csv_takes_the_fast_path_with_the_reference_result(
    timezone: str,
    offsets: set[str],
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    synthetic = copy_csv(pg_server, SYNTHETIC_ACTIVITY, tmp_path / "s.csv", timezone=timezone)
    data = synthetic.read_bytes()
    found = fast_activity(synthetic, data)
    assert found is not None
    assert repr(found) == reference(data, synthetic)
    assert found.clock_source == "column now"
    assert {s.state_change.isoformat()[-6:] for s in found.sessions if s.state_change} == offsets
    assert {s.query for s in found.sessions} == {
        "select 1",
        'insert into t ("a","b")\r\nvalues ($1,$2)',
        'x""y',
        "",
        "LISTEN jobs",
    }
    assert {s.application_name for s in found.sessions} == {"web", "multi\nline", 'a,"b"', "", " "}
    assert {s.usename for s in found.sessions} == {"app", 'we"ird, role', "naïve ✓", "NULL"}
    assert None in {s.xact_start for s in found.sessions}
    assert {s.state for s in found.sessions} == {"idle", "active", "idle in transaction", None}

    # A live server's own activity, with awkward text in the columns a Session keeps.
    sessions.idle(app='etl, "nightly"')
    with pg_server.connect(application_name='a,"b" ,c') as conn:
        conn.execute('select 1 as "a",2 as "b",\n\'naïve ✓\' as "c d"')
        live = copy_csv(
            pg_server, "select * from pg_stat_activity", tmp_path / "a.csv", timezone=timezone
        )
    data = live.read_bytes()
    found = fast_activity(live, data)
    assert found is not None
    assert repr(found) == reference(data, live)
    zone = ZoneInfo(timezone)
    for stamp in (s.state_change for s in found.sessions if s.state_change):
        assert stamp.utcoffset() == stamp.astimezone(zone).utcoffset()  # as the server wrote it
    names = {s.application_name for s in found.sessions}
    assert {'etl, "nightly"', 'a,"b" ,c'} <= names
    assert 'select 1 as "a",2 as "b",\n\'naïve ✓\' as "c d"' in {s.query for s in found.sessions}


def test_a_dump_larger_than_one_read_block_agrees(tmp_path: Path) -> None:
    """pyarrow reads ~1 MB blocks, each with its own dictionary of distinct values."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["pid", "usename", "state", "application_name", "state_change", "query"])
    for n in range(12_000):
        writer.writerow(
            [
                n + 1,
                f"role_{n * 7 % 13}",  # first seen in later blocks too
                ("idle", "active", "")[n % 3],
                f"app {n // 1000}",
                f"2025-03-14 11:{n // 600 % 60:02}:{n % 60:02}.{n:06}+0{n % 3}",
                f"select {n % 50}, '{'x' * 200}'",
            ]
        )
    data = out.getvalue().encode()
    assert len(data) > 3 * 1024 * 1024
    found = fast(data)
    assert found is not None
    assert found == reference(data)


def cell(value: str, *, quote: bool) -> str:
    if quote or any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


_COLUMNS = st.lists(
    st.sampled_from(
        [
            "pid",
            "state",
            "usename",
            "state_change",
            "query_start",
            "query",
            "application_name",
            "client_port",
            "leader_pid",
            "backend_type",
            "xact_start",
            "now",
            "datname",
            "other",
        ]
    ),
    min_size=2,
    max_size=9,
)
_GOOD_STAMPS = [
    "2025-03-14 11:59:13.169295+00",
    "2025-03-14 17:29:13.1+05:30",
    "2025-03-14 08:59:13-03",
    "2024-03-31 03:00:02+02",
    "2025-03-14 11:59:13+00:00",
    "",
]
_GOOD_TEXT = ["", "idle", "a,b", 'we"ird', "x\ny", "x\r\ny", "naïve ✓", "NULL", " ", '""', "a\r"]
_BAD_CELLS = [
    "0x10",
    " 7",
    "+3",
    "1_0",
    "99999999999999999999",  # int() reads it, pyarrow's int64 does not
    "yesterday",
    "2025-01-01 00:00:00",
    "\ufeff",
    "é",
]


def _good_cell(column: str) -> st.SearchStrategy[str]:
    if column == "pid":
        return st.sampled_from(["1", "42", "-7", "007"])
    if column in ("client_port", "leader_pid"):
        return st.sampled_from(["", "-1", "5432", "2147483647"])
    if column in ("state_change", "query_start", "xact_start", "now"):
        return st.sampled_from(_GOOD_STAMPS)
    return st.sampled_from(_GOOD_TEXT)


@st.composite
def _psql_csv(draw: st.DrawFn) -> bytes:
    """What psql writes: a field is quoted when it must be, lines end with a newline."""
    columns = draw(_COLUMNS)
    for required in ("pid", "state", "usename", "state_change"):
        if required not in columns:
            columns.insert(draw(st.integers(0, len(columns))), required)
    lines = [",".join(columns)]
    for row in range(draw(st.integers(1, 5))):
        cells = [draw(_good_cell(c)) for c in columns]
        if row == 0:  # a dump has a timestamp somewhere (psql's own session has them all)
            cells[columns.index("state_change")] = _GOOD_STAMPS[0]
        lines.append(",".join(cell(value, quote=False) for value in cells))
    return ("\n".join(lines) + "\n").encode()


@st.composite
def _any_csv(draw: st.DrawFn) -> bytes:
    """CSV-ish bytes: needless quotes, other line ends, blank lines, a BOM, and when
    ``broken`` bad cells, random text and stray bytes anywhere (even in the header)."""
    columns = draw(_COLUMNS)
    for required in ("pid", "state", "usename", "state_change"):
        if required not in columns and draw(st.integers(0, 9)):
            columns.insert(draw(st.integers(0, len(columns))), required)
    broken = draw(st.booleans())
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [",".join(columns)]
    for _ in range(draw(st.integers(0, 4))):
        values = [
            draw(
                st.one_of(_good_cell(c), st.sampled_from(_BAD_CELLS), st.text(max_size=4))
                if broken
                else _good_cell(c)
            )
            for c in columns
        ]
        lines.append(",".join(cell(v, quote=draw(st.booleans())) for v in values))
        if draw(st.integers(0, 5)) == 0:
            lines.append("")
    data = (newline.join(lines) + draw(st.sampled_from([newline, ""]))).encode()
    for _ in range(draw(st.integers(0, 3)) if broken else 0):
        at = draw(st.integers(0, len(data)))
        stray = draw(st.sampled_from([b'"', b",", b"\n", b"\r", b"x", b"\xff", b'""']))
        data = data[:at] + stray + data[at:]
    if draw(st.booleans()):
        data = codecs.BOM_UTF8 + data
    return data


@settings(max_examples=300, deadline=None)
@given(_psql_csv())
def test_the_fast_path_reads_what_psql_writes(data: bytes) -> None:
    expected = reference(data)
    assert not expected.startswith("DumpError"), expected
    assert fast(data) == expected


@settings(max_examples=400, deadline=None)
@given(_any_csv())
# A cell that starts the first data line with U+FEFF: pyarrow took it for a file's BOM.
@example(b"usename,state_change,pid,state\n\xef\xbb\xbf,2025-03-14 11:59:13.169295+00,1,\n\n")
def test_the_fast_path_gives_the_reference_result_or_declines(data: bytes) -> None:
    found = fast(data)
    if found is not None:
        assert found == reference(data)


def test_input_pyarrow_reads_differently_takes_the_reference_path(tmp_path: Path) -> None:
    header = "pid,usename,state,state_change,query\n"
    stamp = "2024-01-01 10:00:00+00"
    after_quote = tmp_path / "after-quote.csv"
    after_quote.write_text(f'{header}1,"ab"c,idle,{stamp},\n')  # pyarrow: abc
    expect_dump_error(after_quote, "line 2: not valid CSV (',' expected after '\"')")
    hexadecimal = tmp_path / "hex.csv"
    hexadecimal.write_text(f"{header}0x10,u,idle,{stamp},\n")  # pyarrow: 16
    expect_dump_error(hexadecimal, "line 2, column pid: '0x10' is not an integer")
    for path in (after_quote, hexadecimal):
        assert fast_activity(path, path.read_bytes()) is None
    # What int() reads and pyarrow does not: the reference reads it, as before.
    spaced = tmp_path / "spaced.csv"
    spaced.write_text(f'{header}" 7",u,idle,{stamp},\n')
    assert fast_activity(spaced, spaced.read_bytes()) is None
    assert [s.pid for s in load_activity(spaced).sessions] == [7]
    # A query as long as track_activity_query_size allows (1 MB): both paths read it.
    long_query = "select '" + "x" * 1_000_000 + "'"
    data = f"{header}1,u,idle,{stamp},\n2,u,active,{stamp},{long_query}\n".encode()
    assert fast(data) == reference(data)
    assert long_query in (fast(data) or "")
    # Bytes that are not UTF-8 in a column that is read: the reference path decodes them
    # (here as LATIN1, the only encoding the file can be in; test_encodings has the rest).
    mangled = tmp_path / "mangled.csv"
    mangled.write_bytes(f"{header}1,u\xff,idle,{stamp},\n".encode("latin-1"))
    assert fast_activity(mangled, mangled.read_bytes()) is None
    assert [s.usename for s in load_activity(mangled).sessions] == ["u\xff"]
