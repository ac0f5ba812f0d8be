"""What people paste: psql's own output in every format, the seed's triage queries, stdin.

Every dump here is written by real psql (15 from Debian, and the server's own 18) from the
live server the other offline tests use, and read back to the diagnosis the live server gives:
the same sessions, counts, breakdowns and finding pids for a full dump; the same totals,
breakdowns and leaked sessions for the triage queries' partial diagnosis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Set
from pathlib import Path
from typing import Any

import pytest

from pgrelief._dev.embedded import SUPERUSER, EmbeddedPostgres
from pgrelief.advice import DIAGNOSTIC_QUERIES
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import LEAKED_IDLE, PARTIAL_INPUT, Diagnosis
from pgrelief.dumps import load_input
from pgrelief.observe import connect, take_snapshot
from pgrelief.snapshot import Session, Snapshot
from pgrelief.triage import FULL_DUMP, TriageInput, diagnose_offline
from tests.fixtures.postgres import SessionFactory

PSQL15 = Path("/usr/lib/postgresql/15/bin/psql")
# Every threshold at zero: each session in a judged state becomes a finding, so the pids of
# the findings compare every session's state and age test between live and dump.
EVERYTHING = DiagnoseOptions(idle_after_s=0, idle_in_transaction_after_s=0, long_running_after_s=0)
ACTIVITY = "select now(), * from pg_stat_activity"
SEED_QUERIES = [q.strip() for q in DIAGNOSTIC_QUERIES.split(";") if q.strip()]
# psql's own settings for each output format, as a user would have them in .psqlrc.
FORMATS: dict[str, tuple[str, ...]] = {
    "aligned": (),
    "expanded": ("\\x on",),
    "expanded-auto": ("\\x auto", "\\pset columns 120"),
    "wrapped": ("\\pset format wrapped", "\\pset columns 70"),
    "border0": ("\\pset border 0",),
    "border2-unicode": ("\\pset border 2", "\\pset linestyle unicode"),
    "expanded-wrapped-unicode": (
        "\\x on",
        "\\pset format wrapped",
        "\\pset columns 50",
        "\\pset linestyle unicode",
    ),
    "csv": ("\\pset format csv",),
}


def psql_binaries(server: EmbeddedPostgres) -> dict[str, Path]:
    if not PSQL15.exists():
        pytest.fail(f"{PSQL15} is missing: apt-get install postgresql-client-15 (.ci/run does)")
    return {"psql15": PSQL15, "psql18": server.tool("psql")}


def run_psql(
    server: EmbeddedPostgres,
    binary: Path,
    *commands: str,
    app: str = "observer",
    settle: SessionFactory | None = None,
) -> bytes:
    """psql over TCP like the observer, named like it: its session stands in for ours.

    With ``settle``, wait until psql's backend has left pg_stat_activity (a backend exits
    after its client, asynchronously), so the next dump does not see it idle.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(server.libpq_env(), PGDATABASE="postgres", PGHOST=server.host, PGAPPNAME=app)
    args = [str(binary), "-X", "-v", "ON_ERROR_STOP=1"]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run(args, env=env, capture_output=True, check=True, timeout=60)
    if settle is not None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            row = settle.admin.execute(
                "select count(*) from pg_stat_activity where application_name = %s", (app,)
            ).fetchone()
            if row is not None and row[0] == 0:
                break
            time.sleep(0.01)
    return done.stdout


@pytest.fixture
def live(pg_server: EmbeddedPostgres, sessions: SessionFactory) -> Iterator[Diagnosis]:
    """The incident as the live server shows it, observed by a session that then leaves, so
    psql's session (same role, application and address) takes its place in every dump."""
    sessions.incident()
    with connect(pg_server.dsn(), application_name="observer") as conn:
        snapshot = take_snapshot(conn)
        own = conn.info.backend_pid
    sessions.wait_gone([own])
    yield diagnose(snapshot, EVERYTHING)


def groups(diagnosis: Diagnosis, name: str) -> dict[str, tuple[int, dict[str, int]]]:
    return {g.key: (g.count, g.by_state) for g in getattr(diagnosis.breakdown, name)}


def finding_pids(diagnosis: Diagnosis, leave_out: Set[int] = frozenset()) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for finding in diagnosis.findings:
        found.setdefault(finding.kind, set()).update(set(finding.pids) - leave_out)
    return found


def superusers(sessions: Iterable[Session]) -> set[int]:
    """Pids of the superuser's sessions. A dump cannot say who is a superuser: the live
    diagnosis leaves their sessions out of its findings (as `run` does), the offline one keeps
    them and its statements re-check rolsuper on the server. Compared without them."""
    return {s.pid for s in sessions if s.usename == SUPERUSER}


def assert_same_counts(offline: Diagnosis, live: Diagnosis, *breakdowns: str, label: str) -> None:
    assert offline.totals.client_backends == live.totals.client_backends, label
    assert offline.totals.by_state == live.totals.by_state, label
    for name in breakdowns:
        assert groups(offline, name) == groups(live, name), f"{label}: {name}"
    assert offline.server == live.server, label
    assert offline.pressure == live.pressure, label


@pytest.mark.parametrize("psql", ["psql15", "psql18"])
def test_psql_output_in_every_format_gives_the_live_diagnosis(
    psql: str,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    live: Diagnosis,
    tmp_path: Path,
) -> None:
    binary = psql_binaries(pg_server)[psql]
    for name, settings in FORMATS.items():
        # One paste holding both tables, as `psql -c ... -c 'show all'` prints them.
        paste = tmp_path / f"{psql}-{name}.txt"
        paste.write_bytes(
            run_psql(pg_server, binary, *settings, ACTIVITY, "show all", settle=sessions)
        )
        loaded = load_input(paste)
        assert isinstance(loaded.found, Snapshot), name
        assert loaded.found.server.assumed == (), name
        assert loaded.notes == (), (name, loaded.notes)
        offline = diagnose(loaded.found, EVERYTHING)
        label = f"{psql} {name}"
        assert_same_counts(
            offline,
            live,
            "by_user",
            "by_application",
            "by_client_addr",
            "by_database",
            label=label,
        )
        leave_out = superusers(loaded.found.sessions)
        assert finding_pids(offline, leave_out) == finding_pids(live, leave_out), label
        # What the text formats carry of each session, field by field.
        waiter = next(s for s in loaded.found.sessions if s.application_name == "etl-lock")
        assert waiter.is_waiting_on_lock, label
        assert any(s.is_listener for s in loaded.found.sessions), label
    wrapped = (tmp_path / f"{psql}-wrapped.txt").read_text()
    assert "." in {line.rstrip()[-1:] for line in wrapped.splitlines() if "|" in line}
    assert "-[ RECORD 1 ]" in (tmp_path / f"{psql}-expanded-auto.txt").read_text()


@pytest.mark.parametrize("psql", ["psql15", "psql18"])
def test_the_triage_queries_give_the_live_partial_diagnosis(
    psql: str,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    live: Diagnosis,
    tmp_path: Path,
) -> None:
    binary = psql_binaries(pg_server)[psql]
    # Query 3 selects client backends only; its leaked pids are the live finding's.
    live_leaked = finding_pids(live)[LEAKED_IDLE]
    for name in ("aligned", "expanded", "csv", "json"):
        queries = list(SEED_QUERIES)
        if name == "json":
            queries = [f"select json_agg(t) from ({q}) t" for q in queries]
        prefix: tuple[str, ...] = {"expanded": ("\\x on",), "csv": ("\\pset format csv",)}.get(
            name, ()
        )
        if name == "json":
            prefix = ("\\pset format unaligned", "\\pset tuples_only on")
        paste = tmp_path / f"{psql}-triage-{name}.txt"
        paste.write_bytes(run_psql(pg_server, binary, *prefix, *queries, settle=sessions))
        settings = tmp_path / f"{psql}-settings-{name}.txt"
        show = "select json_agg(s) from pg_settings s" if name == "json" else "show all"
        settings.write_bytes(run_psql(pg_server, binary, *prefix, show, settle=sessions))
        loaded = load_input(paste, settings)
        assert isinstance(loaded.found, TriageInput), name
        offline = diagnose_offline(loaded.found, EVERYTHING, loaded.notes)
        label = f"{psql} triage {name}"
        assert_same_counts(offline, live, "by_user", "by_application", label=label)
        assert offline.breakdown.by_client_addr == offline.breakdown.by_database == ()
        leave_out = superusers(loaded.found.oldest_idle or ())
        assert finding_pids(offline, leave_out)[LEAKED_IDLE] == live_leaked - leave_out, label
        partial = offline.finding(PARTIAL_INPUT)
        assert partial is not None and partial.fixes[0].text == FULL_DUMP
        assert "needs the full pg_stat_activity dump" in offline.notes[0]
        assert offline.status >= live.pressure


def test_each_triage_query_alone_is_a_partial_diagnosis(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, live: Diagnosis, tmp_path: Path
) -> None:
    binary = pg_server.tool("psql")
    by_state, by_user_app, oldest_idle = SEED_QUERIES
    for number, query in enumerate((by_state, by_user_app, oldest_idle), start=1):
        paste = tmp_path / f"q{number}.txt"
        paste.write_bytes(run_psql(pg_server, binary, query, settle=sessions))
        found = load_input(paste).found
        offline = diagnose_offline(found, EVERYTHING)
        assert offline.finding(PARTIAL_INPUT) is not None
        assert "max_connections" in offline.server.assumed if offline.server else False
        if number < 3:
            assert offline.totals.by_state == live.totals.by_state, number
            assert offline.finding(LEAKED_IDLE) is None
            assert any("add triage query 3" in e for e in offline.findings[-1].evidence)
        else:
            assert offline.totals.by_state == {"idle": live.totals.by_state["idle"]}
            assert any("lower bound" in note for note in offline.notes)
            assert isinstance(found, TriageInput)
            leave_out = superusers(found.oldest_idle or ())
            live_leaked = finding_pids(live, leave_out)[LEAKED_IDLE]
            assert finding_pids(offline, leave_out)[LEAKED_IDLE] == live_leaked


def pgrelief(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pgrelief", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_stdin_takes_a_pipe_from_psql(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, live: Diagnosis
) -> None:
    pasted = run_psql(pg_server, pg_server.tool("psql"), ACTIVITY, "show all", settle=sessions)
    piped = pgrelief("diagnose", "--activity-file", "-", "--format", "json", stdin=pasted)
    assert piped.returncode in (0, 1, 2), piped.stderr
    report: dict[str, Any] = json.loads(piped.stdout)
    assert report["source"] == "standard input"
    assert report["totals"]["client_backends"] == live.totals.client_backends
    assert report["server"]["assumed_defaults"] == []
    assert report["notes"] == []
    text = pgrelief("diagnose", "--activity-file", "-", stdin=pasted)
    assert b"source: standard input" in text.stdout
    empty = pgrelief("diagnose", "--activity-file", "-", stdin=b"")
    assert empty.returncode == 3
    assert empty.stderr.decode().strip() == (
        "pgrelief: error: -: the file is empty; accepted: CSV with a header line "
        "(\\copy (select now(), * from pg_stat_activity) to 'a.csv' csv header), JSON "
        "(select json_agg(a) from pg_stat_activity a), psql's aligned or expanded (\\x) "
        "output of select * from pg_stat_activity or of the three triage queries (pgrelief "
        "diagnose --help), and SHOW ALL or pg_settings for the settings"
    )


def test_concatenated_csv_and_json_files_are_one_paste(
    pg_server: EmbeddedPostgres, sessions: SessionFactory, live: Diagnosis, tmp_path: Path
) -> None:
    binary = pg_server.tool("psql")
    csv_paste = run_psql(
        pg_server, binary, "\\pset format csv", ACTIVITY, "show all", settle=sessions
    )
    json_paste = run_psql(
        pg_server,
        binary,
        "\\pset tuples_only on",
        "\\pset format unaligned",
        f"select json_agg(a) from ({ACTIVITY}) a",
        "select json_agg(s) from pg_settings s",
        settle=sessions,
    )
    for name, data in (("csv", csv_paste), ("json", json_paste)):
        path = tmp_path / f"both.{name}"
        path.write_bytes(data)
        loaded = load_input(path)
        assert isinstance(loaded.found, Snapshot)
        assert loaded.found.server.assumed == ()
        offline = diagnose(loaded.found, EVERYTHING)
        assert_same_counts(offline, live, "by_user", "by_application", label=name)
