"""Connections that used to break pgrelief: foreign encodings, mangled URIs, an empty DSN.

A session in a SQL_ASCII or LATIN1 database whose query holds a byte that is not UTF-8 used
to make every snapshot fail (``UnicodeDecodeError``) for as long as that session existed, and
``PGCLIENTENCODING=LATIN1`` did the same; a URI password with a raw ``@`` or ``/`` leaked into
messages (and its fragments were looked up as host names); ``--dsn ""`` was an internal error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.errors import ConnectFailed
from pgrelief.observe import connect, describe_dsn
from tests.runs import write_policy


def _pgrelief(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgrelief", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(params=["SQL_ASCII", "LATIN1"])
def foreign_session(
    request: pytest.FixtureRequest, pg_server: EmbeddedPostgres
) -> Iterator[tuple[str, int]]:
    """An idle session in a database of that encoding whose last query holds byte 0xE9."""
    encoding: str = request.param
    database = f"enc_{encoding.lower()}_{uuid.uuid4().hex[:6]}"
    with pg_server.connect() as admin:
        admin.execute(
            sql.SQL(
                "create database {} encoding {} lc_collate 'C' lc_ctype 'C' template template0"
            ).format(sql.Identifier(database), sql.Literal(encoding))
        )
    session = psycopg.connect(
        pg_server.dsn(dbname=database, client_encoding=encoding, application_name="caf\u00e9"),
        autocommit=True,
    )
    try:
        session.execute(b"select 'caf\xe9 cr\xe8me' as dessert")
        yield encoding, session.info.backend_pid
    finally:
        session.close()
        with pg_server.connect() as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(database)))


@pytest.mark.parametrize("client_encoding", [None, "LATIN1"])
def test_diagnose_reads_sessions_whose_text_is_not_utf8(
    pg_server: EmbeddedPostgres, foreign_session: tuple[str, int], client_encoding: str | None
) -> None:
    _, pid = foreign_session
    env = {"PGCLIENTENCODING": client_encoding} if client_encoding else {}
    done = _pgrelief("diagnose", "--dsn", pg_server.dsn(), "--format", "json", env=env)
    assert done.returncode in (0, 1, 2), done.stderr
    report = json.loads(done.stdout)
    users = {g["key"] for g in report["breakdown"]["by_application"]}
    assert any(key.startswith("caf") for key in users)
    assert report["totals"]["client_backends"] >= 1
    assert pid > 0
    assert "Traceback" not in done.stderr


def test_run_once_keeps_working_beside_such_a_session(
    pg_server: EmbeddedPostgres, foreign_session: tuple[str, int], tmp_path: Path
) -> None:
    done = _pgrelief(
        "run", "--policy", str(write_policy(tmp_path, mode="DryRun")), "--dsn", pg_server.dsn(),
        "--once", "--state-file", str(tmp_path / "s.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("pressure ")


def test_the_text_is_decoded_with_replacement_not_dropped(
    pg_server: EmbeddedPostgres, foreign_session: tuple[str, int]
) -> None:
    encoding, pid = foreign_session
    with connect(pg_server.dsn()) as conn:
        row = conn.execute(
            "select query, application_name from pg_stat_activity where pid = %s", (pid,)
        ).fetchone()
    assert row is not None
    query, application = row
    if encoding == "SQL_ASCII":
        # No conversion exists from SQL_ASCII: the raw byte arrives and is replaced.
        assert query == "select 'caf\ufffd cr\ufffdme' as dessert"
    else:
        # LATIN1 text shows as the other database stored it: bytes our session cannot know.
        assert "caf" in query and "\ufffd" in query
    assert application.startswith("caf")


@pytest.mark.parametrize(
    ("uri", "secret_parts"),
    [
        ("postgresql://bob:p@ss/w0rd@127.0.0.1:1/db", ["p@ss", "ss/w0rd", "w0rd"]),
        ("postgresql://bob:se/cret@127.0.0.1:1/db", ["se/cret", "cret@"]),
        ("postgres://bob:a@b@127.0.0.1:1/db", ["a@b", "b@127"]),
    ],
)
def test_a_uri_password_with_a_raw_at_or_slash_never_shows(
    uri: str, secret_parts: list[str]
) -> None:
    shown = describe_dsn(uri)
    with pytest.raises(ConnectFailed) as failure:
        connect(uri, connect_timeout=1)
    message = str(failure.value)
    for part in secret_parts:
        assert part not in shown
        assert part not in message
    assert "percent-encode" in message
    done = _pgrelief("diagnose", "--dsn", uri)
    assert done.returncode == 3
    assert all(part not in done.stderr for part in secret_parts)


def test_an_empty_dsn_means_the_libpq_environment(pg_server: EmbeddedPostgres) -> None:
    done = _pgrelief("diagnose", "--dsn", "", "--format", "json", env=pg_server.libpq_env())
    assert done.returncode in (0, 1, 2), done.stderr
    assert json.loads(done.stdout)["server"]["max_connections"] == pg_server.max_connections
