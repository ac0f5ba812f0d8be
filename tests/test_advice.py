"""Fix texts: quoting, terminate statements, PgBouncer ini, ORM settings.

The texts are meant to be pasted into psql during an incident, so the last tests run them on
a real PostgreSQL: the terminate statement must kill the observed session and spare one that
moved on, and the durable SQL must parse with hostile role names.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import psycopg
import pytest

from pgrelief import advice
from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.snapshot import Session
from tests.factories import TAKEN_AT, session


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("app_backend", "app_backend"),
        ("a$1", "a$1"),
        ("App", '"App"'),
        ('we"ird role', '"we""ird role"'),
        ("user", '"user"'),
        ("public", '"public"'),
        ("rôle", '"rôle"'),
        ("1st", '"1st"'),
        ("my-app", '"my-app"'),
        ("", '""'),
    ],
)
def test_quote_ident(name: str, expected: str) -> None:
    assert advice.quote_ident(name) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("idle", "'idle'"),
        ("o'brien", "'o''brien'"),
        ("a\\b", "E'a\\\\b'"),
        ("it's a\\b", "E'it''s a\\\\b'"),
        ("", "''"),
    ],
)
def test_quote_literal(value: str, expected: str) -> None:
    assert advice.quote_literal(value) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(60, "1min"), (30, "30s"), (0.25, "250ms"), (3600, "1h"), (1800, "30min"), (90, "90s")],
)
def test_pg_duration_setting(seconds: float, expected: str) -> None:
    assert advice.pg_duration_setting(seconds) == expected


def test_query_sample_is_one_line_of_80_chars() -> None:
    query = "select *\n  from   orders\nwhere " + "x" * 200
    sample = advice.query_sample(query)
    assert len(sample) == 80
    assert sample.startswith("select * from orders where xxx")


def test_signal_sql_repeats_what_was_observed() -> None:
    row = session(42, "idle", state_age=600, backend_age=3600)
    assert advice.signal_sql([row]) == (
        "select pid, pg_terminate_backend(pid) as terminated\n"
        "from pg_stat_activity\n"
        "where backend_type = 'client backend'\n"
        "  and (pid, backend_start, state, state_change) in (values\n"
        "    (42, '2025-03-14 11:00:00.123456+00:00'::timestamptz, 'idle', "
        "'2025-03-14 11:50:00.123456+00:00'::timestamptz)\n"
        "  );"
    )


def test_signal_sql_cancel_matches_the_query_start() -> None:
    row = session(7, "active", state_age=400, query_age=400, backend_age=1000)
    text = advice.signal_sql([row], cancel=True)
    assert text.startswith("select pid, pg_cancel_backend(pid) as cancelled\n")
    assert "(pid, backend_start, state, query_start) in (values" in text
    assert "'2025-03-14 11:53:20.123456+00:00'::timestamptz)" in text


def test_signal_sql_without_timestamps_falls_back_to_pid_and_state() -> None:
    rows = [
        session(1, "idle", timestamps=False),
        session(2, "idle", timestamps=False),
        session(3, "idle in transaction", timestamps=False),
    ]
    assert advice.signal_sql(rows) == (
        "-- no timestamps were observed for these: matched on pid and state only\n"
        "select pid, pg_terminate_backend(pid) as terminated\n"
        "from pg_stat_activity\n"
        "where backend_type = 'client backend' and state = 'idle'\n"
        "  and pid in (1, 2);\n"
        "-- no timestamps were observed for these: matched on pid and state only\n"
        "select pid, pg_terminate_backend(pid) as terminated\n"
        "from pg_stat_activity\n"
        "where backend_type = 'client backend' and state = 'idle in transaction'\n"
        "  and pid in (3);"
    )


def test_pattern_signal_sql_with_filters() -> None:
    text = advice.pattern_signal_sql(
        ("idle",), "state_change", 1800, filters={"usename": "o'neil", "client_addr": None}
    )
    assert text == (
        "select pid, pg_terminate_backend(pid) as terminated\n"
        "from pg_stat_activity\n"
        "where backend_type = 'client backend'\n"
        "  and pid <> pg_backend_pid()\n"
        "  and state = 'idle'\n"
        "  and state_change < now() - interval '1800 seconds'\n"
        "  and usename = 'o''neil'\n"
        "  and client_addr is null\n"
        "  and usesysid not in (select oid from pg_roles where rolsuper)\n"
        "  and query !~* '^[[:space:]]*listen[[:space:]]';"
    )


def test_pattern_signal_sql_with_an_age_per_state() -> None:
    text = advice.pattern_signal_sql(
        {"idle in transaction": 60, "idle in transaction (aborted)": 60, "idle": 1800},
        "state_change",
    )
    assert (
        "  and ((state in ('idle in transaction', 'idle in transaction (aborted)') and "
        "state_change < now() - interval '60 seconds')\n"
        "       or (state = 'idle' and state_change < now() - interval '1800 seconds'))\n"
    ) in text


# A name as hostile to a terminal as it gets: ESC sequences that clear the screen and set the
# window title, a line separator, a C1 control, a bidi override (issue 10 item 10).
_RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]")
TERMINAL_HOSTILE = "app\x1b[2J\x1b]0;pwned\x07\u2028x\x85\u202ey\\z'\""


@pytest.mark.parametrize(
    ("value", "literal", "identifier"),
    [
        ("a\x1bb", "E'a\\x1bb'", 'U&"a\\001Bb"'),
        ("line\u2028sep", "E'line\\u2028sep'", 'U&"line\\2028sep"'),
        ("c1\x85", "E'c1\\u0085'", 'U&"c1\\0085"'),
        ('q\\"\x07', "E'q\\\\\"\\x07'", 'U&"q\\\\""\\0007"'),
    ],
)
def test_control_characters_are_escaped_in_sql(value: str, literal: str, identifier: str) -> None:
    assert advice.quote_literal(value) == literal
    assert advice.quote_ident(value) == identifier
    assert advice.quoted_name(value) == identifier


def test_no_statement_carries_a_raw_control_character() -> None:
    texts = [
        advice.quote_literal(TERMINAL_HOSTILE),
        advice.quote_ident(TERMINAL_HOSTILE),
        advice.alter_role_set(TERMINAL_HOSTILE, "statement_timeout", "5min"),
        advice.pattern_signal_sql(
            ("idle",), "state_change", 60, filters={"usename": TERMINAL_HOSTILE}
        ),
        advice.signal_sql(
            [session(1, usename=TERMINAL_HOSTILE, application_name=TERMINAL_HOSTILE)]
        ),
    ]
    for text in texts:
        assert not _RAW_CONTROL.search(text.replace("\n", " ")), text


def test_escape_controls_shows_them_and_keeps_lines_when_asked() -> None:
    assert advice.escape_controls("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert advice.escape_controls("x\u2028y\nz") == "x\\u2028y\\x0az"
    assert advice.escape_controls("x\u2028y\nz", keep_newlines=True) == "x\\u2028y\nz"
    assert advice.escape_controls("plain rôle") == "plain rôle"


def test_durable_sql_quotes_hostile_names() -> None:
    assert (
        advice.alter_role_connection_limit('we"ird role', 5)
        == 'alter role "we""ird role" connection limit 5;'
    )
    assert (
        advice.alter_database_connection_limit("Prod DB", 150)
        == 'alter database "Prod DB" connection limit 150;'
    )
    assert (
        advice.alter_role_set("o'neil", "statement_timeout", "5min")
        == "alter role \"o'neil\" set statement_timeout = '5min';"
    )
    assert advice.alter_system_set([("tcp_keepalives_idle", "60")]) == (
        "alter system set tcp_keepalives_idle = '60';\nselect pg_reload_conf();"
    )


@pytest.mark.parametrize(
    ("query", "feature"),
    [
        ("LISTEN jobs", advice.LISTEN),
        ('  listen "Jobs"', advice.LISTEN),
        ("select pg_advisory_lock(42)", advice.ADVISORY_LOCK),
        ("SELECT pg_try_advisory_lock_shared (1, 2)", advice.ADVISORY_LOCK),
        ("select pg_advisory_xact_lock(42)", None),
        ("PREPARE q(int) AS select $1", advice.PREPARE),
        ("SET search_path = app", advice.SESSION_SET),
        ("set session statement_timeout = 0", advice.SESSION_SET),
        ("SET LOCAL statement_timeout = 0", None),
        ("set transaction isolation level serializable", None),
        ("SET CONSTRAINTS ALL DEFERRED", None),
        ("create temp table t (a int)", advice.TEMP_TABLE),
        ("CREATE TEMPORARY TABLE t (a int)", advice.TEMP_TABLE),
        ("declare c cursor with hold for select 1", advice.HOLD_CURSOR),
        ("declare c cursor for select 1", None),
        ("select 1", None),
        ("", None),
        ("settle_accounts()", None),
    ],
)
def test_session_feature(query: str, feature: str | None) -> None:
    assert advice.session_feature(query) == feature


@pytest.mark.parametrize(
    ("application_name", "stack"),
    [
        ("PostgreSQL JDBC Driver", advice.HIKARICP),
        ("orders-service (HikariPool-1)", advice.HIKARICP),
        ("puma: cluster worker 0", advice.RAILS),
        ("sidekiq", advice.RAILS),
        ("gunicorn-web", advice.DJANGO),
        ("celery worker", advice.DJANGO),
        ("alembic", advice.SQLALCHEMY),
        ("psql", None),
        ("", None),
    ],
)
def test_guess_stack(application_name: str, stack: str | None) -> None:
    assert advice.guess_stack(application_name) == stack


def test_orm_pool_settings_carry_the_numbers() -> None:
    sqlalchemy = advice.orm_pool_settings(advice.SQLALCHEMY, 10, "api")
    assert "pool_size=8," in sqlalchemy
    assert "max_overflow=2," in sqlalchemy
    assert "pool_recycle=1800" in sqlalchemy
    assert "pool_pre_ping=True" in sqlalchemy
    django = advice.orm_pool_settings(advice.DJANGO, 10)
    assert 'DATABASES["default"]["CONN_MAX_AGE"] = 300' in django
    assert 'DATABASES["default"]["CONN_HEALTH_CHECKS"] = True' in django
    assert '"max_size": 10' in django
    rails = advice.orm_pool_settings(advice.RAILS, 10)
    assert "  pool: 10\n" in rails
    assert "idle_timeout: 300" in rails
    assert "reaping_frequency: 60" in rails
    hikari = advice.orm_pool_settings(advice.HIKARICP, 10)
    assert "spring.datasource.hikari.maximum-pool-size=10\n" in hikari
    assert "spring.datasource.hikari.leak-detection-threshold=60000" in hikari
    assert "spring.datasource.hikari.max-lifetime=1800000" in hikari
    brief = advice.orm_pool_settings_brief(10, "svc")
    for word in ("SQLAlchemy", "Django", "Rails", "HikariCP", "CONN_MAX_AGE=300"):
        assert word in brief
    with pytest.raises(ValueError, match="unknown stack"):
        advice.orm_pool_settings("hibernate", 10)


def test_pgbouncer_ini_shape_and_quoting() -> None:
    text = advice.pgbouncer_ini(
        pool_mode="transaction",
        default_pool_size=25,
        reserve_pool_size=5,
        max_client_conn=2000,
        max_db_connections=80,
        databases=["appdb", "Prod DB"],
        session_pools={"appdb": 4},
        notes=["sized for 97 usable slots"],
    )
    lines = text.splitlines()
    assert lines[1] == "; sized for 97 usable slots"
    assert "appdb = host=127.0.0.1 port=5432 dbname=appdb" in lines
    # PgBouncer cannot read a quoted key: a name it cannot take as it is gets an alias.
    assert "; database 'Prod DB' is served as Prod_DB" in lines
    assert "Prod_DB = host=127.0.0.1 port=5432 dbname='Prod DB'" in lines
    assert (
        "appdb_session = host=127.0.0.1 port=5432 dbname=appdb pool_mode=session pool_size=4"
        in lines
    )
    for expected in (
        "pool_mode = transaction",
        "default_pool_size = 25",
        "reserve_pool_size = 5",
        "max_db_connections = 80",
        "max_client_conn = 2000",
        "server_idle_timeout = 300",
        "server_lifetime = 3600",
    ):
        assert expected in lines
    with pytest.raises(ValueError, match="pool_mode"):
        advice.pgbouncer_ini(
            pool_mode="sessions", default_pool_size=1, reserve_pool_size=0, max_client_conn=1
        )


# --- the texts on a real server ---------------------------------------------------------------

_ACTIVITY = (
    "select pid, backend_type, state, usename, datname, application_name, "
    "client_addr::text, client_port, backend_start, xact_start, query_start, state_change, "
    "wait_event_type, wait_event, query from pg_stat_activity where pid = %s"
)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=15) as pg:
        yield pg


def _observe(admin: psycopg.Connection[tuple[object, ...]], pid: int) -> Session:
    row = admin.execute(_ACTIVITY, (pid,)).fetchone()
    assert row is not None
    values = list(row)
    stamps = [v for v in values[8:12] if isinstance(v, datetime)]
    assert stamps, "pg_stat_activity returned no timestamps"
    return Session(
        pid=int(str(values[0])),
        backend_type=str(values[1]),
        state=None if values[2] is None else str(values[2]),
        usename=None if values[3] is None else str(values[3]),
        datname=None if values[4] is None else str(values[4]),
        application_name=str(values[5]),
        client_addr=None if values[6] is None else str(values[6]),
        client_port=None,
        backend_start=values[8] if isinstance(values[8], datetime) else None,
        xact_start=values[9] if isinstance(values[9], datetime) else None,
        query_start=values[10] if isinstance(values[10], datetime) else None,
        state_change=values[11] if isinstance(values[11], datetime) else None,
        wait_event_type=None if values[12] is None else str(values[12]),
        wait_event=None if values[13] is None else str(values[13]),
        query=str(values[14]),
    )


def _wait_gone(admin: psycopg.Connection[tuple[object, ...]], pid: int) -> None:
    """Termination is asynchronous: the backend leaves pg_stat_activity a moment later."""
    for _ in range(500):
        row = admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone()
        if row is None:
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} still present after it was terminated")


def _alive(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    try:
        conn.execute("select 1")
    except psycopg.OperationalError:
        return False
    return True


def test_terminate_sql_kills_the_observed_session_and_spares_one_that_moved_on(
    server: EmbeddedPostgres,
) -> None:
    with (
        server.connect() as admin,
        psycopg.connect(server.dsn(), autocommit=True) as leaked,
        psycopg.connect(server.dsn(), autocommit=True) as moved_on,
    ):
        before = [_observe(admin, c.info.backend_pid) for c in (leaked, moved_on)]
        assert [s.state for s in before] == ["idle", "idle"]
        moved_on.execute("select 2")  # its state_change is no longer what was observed
        rows = admin.execute(advice.signal_sql(before)).fetchall()
        assert rows == [(leaked.info.backend_pid, True)]
        _wait_gone(admin, leaked.info.backend_pid)
        assert not _alive(leaked)
        assert _alive(moved_on)


def test_fallback_sql_checks_the_state(server: EmbeddedPostgres) -> None:
    in_transaction = psycopg.connect(server.dsn())  # closed below: it ends terminated
    try:
        with server.connect() as admin:
            in_transaction.execute("select 1")  # idle in transaction now
            pid = in_transaction.info.backend_pid
            as_idle = session(pid, "idle", timestamps=False)
            assert admin.execute(advice.signal_sql([as_idle])).fetchall() == []
            observed = _observe(admin, pid)
            assert observed.state == "idle in transaction"
            stuck = session(pid, "idle in transaction", timestamps=False)
            assert admin.execute(advice.signal_sql([stuck])).fetchall() == [(pid, True)]
            _wait_gone(admin, pid)
            # Once the backend is gone, the precise form for its pid matches nothing.
            assert admin.execute(advice.signal_sql([observed])).fetchall() == []
    finally:
        in_transaction.close()


def test_cancel_sql_cancels_the_running_query(server: EmbeddedPostgres) -> None:
    with server.connect() as admin, psycopg.connect(server.dsn(), autocommit=True) as busy:
        pid = busy.info.backend_pid
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                busy.execute("select pg_sleep(60)")
            except psycopg.Error as error:
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        for _ in range(200):
            running = _observe(admin, pid)
            if running.state == "active":
                break
            time.sleep(0.02)
        assert running.state == "active"
        assert admin.execute(advice.signal_sql([running], cancel=True)).fetchall() == [(pid, True)]
        worker.join(30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], psycopg.errors.QueryCanceled)
        assert _alive(busy)


def test_durable_and_pattern_sql_run_as_written(server: EmbeddedPostgres) -> None:
    hostile = 'we"ird rôle'
    server.create_role(hostile)
    statements = [
        advice.alter_role_connection_limit(hostile, 5),
        advice.alter_role_set(hostile, "idle_in_transaction_session_timeout", "1min"),
        advice.alter_role_set(hostile, "statement_timeout", advice.pg_duration_setting(300)),
        advice.alter_role_set(hostile, "idle_session_timeout", "30min"),
        advice.alter_database_connection_limit("postgres", -1),
        advice.alter_system_set(
            [
                ("idle_in_transaction_session_timeout", "5min"),
                ("tcp_keepalives_idle", "60"),
                ("tcp_keepalives_interval", "10"),
                ("tcp_keepalives_count", "6"),
                ("client_connection_check_interval", "30s"),
            ]
        ),
        advice.pattern_signal_sql(("idle",), "state_change", 3600),
        advice.pattern_signal_sql(
            ("idle in transaction", "idle in transaction (aborted)"),
            "state_change",
            3600,
            filters={"usename": hostile, "client_addr": None, "application_name": "x'y"},
        ),
        advice.DIAGNOSTIC_QUERIES,
        advice.LOCK_WAITERS_QUERY,
    ]
    if server.version >= 16:
        statements.append(f"grant pg_use_reserved_connections to {advice.quote_ident(hostile)};")
    # Pasted into psql, as a user would: psql sends each statement on its own.
    result = subprocess.run(
        [str(server.tool("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"],
        input="\n".join(statements),
        env={**os.environ, **server.libpq_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with server.connect() as admin:
        limit, config = admin.execute(
            "select rolconnlimit, rolconfig from pg_roles where rolname = %s", (hostile,)
        ).fetchone() or (None, None)
        assert limit == 5
        assert config == [
            "idle_in_transaction_session_timeout=1min",
            "statement_timeout=5min",
            "idle_session_timeout=30min",
        ]
        admin.execute("alter system reset all")
        admin.execute("select pg_reload_conf()")


def test_terminal_hostile_names_round_trip_through_the_sql(server: EmbeddedPostgres) -> None:
    server.create_role(TERMINAL_HOSTILE)
    statements = [
        advice.alter_role_set(TERMINAL_HOSTILE, "statement_timeout", "5min"),
        advice.alter_role_connection_limit(TERMINAL_HOSTILE, 3),
    ]
    with server.connect() as admin:
        for sql_text in statements:
            assert not _RAW_CONTROL.search(sql_text)
            admin.execute(sql_text.encode())
        row = admin.execute(
            "select rolconnlimit, rolconfig from pg_roles where rolname = "
            + advice.quote_literal(TERMINAL_HOSTILE)
        ).fetchone()
        assert row == (3, ["statement_timeout=5min"])
        admin.execute(f"drop role {advice.quote_ident(TERMINAL_HOSTILE)}".encode())


def test_pattern_and_guarded_sql_spare_superusers_and_listeners(server: EmbeddedPostgres) -> None:
    server.create_role("guarded_plain")
    app = "guard-test"
    with (
        server.connect() as admin,
        psycopg.connect(
            server.dsn("guarded_plain", application_name=app), autocommit=True
        ) as plain,
        psycopg.connect(server.dsn(application_name=app), autocommit=True) as superuser,
        psycopg.connect(
            server.dsn("guarded_plain", application_name=app), autocommit=True
        ) as listener,
    ):
        plain.execute("select 1")
        superuser.execute("select 1")
        listener.execute("listen jobs")
        pattern = advice.pattern_signal_sql(
            ("idle",), "state_change", 0, filters={"application_name": app}
        )
        time.sleep(1.1)  # the age test is in whole seconds
        rows = admin.execute(pattern.encode()).fetchall()
        assert rows == [(plain.info.backend_pid, True)]
        _wait_gone(admin, plain.info.backend_pid)
        assert _alive(superuser) and _alive(listener)
        # The precise form too, when the input could not say who is a superuser.
        observed = _observe(admin, superuser.info.backend_pid)
        guarded = advice.signal_sql([observed], spare_superusers=True)
        assert admin.execute(guarded.encode()).fetchall() == []
        assert _alive(superuser)


def test_taken_at_is_timezone_aware() -> None:
    # Literals carry an offset so the server reads them the same whatever its TimeZone.
    assert TAKEN_AT.tzinfo is not None
    assert advice.timestamp_literal(TAKEN_AT).endswith("+00:00'::timestamptz")
