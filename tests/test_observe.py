"""observe on a real server: exact counts, server-clock ages, limits, and refusals as errors."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.errors import ConnectFailed, PgreliefError, ServerRefused
from pgrelief.observe import connect, describe_dsn, take_snapshot
from pgrelief.snapshot import Session, Snapshot
from tests.fixtures.postgres import ADMIN_APP, SessionFactory

# The three diagnostic queries of the domain reference, verbatim.
SEED_BY_STATE = """
select state, count(*) as cnt
from pg_stat_activity
where backend_type = 'client backend'
group by state
order by cnt desc;
"""
SEED_BY_USER_APP = """
select usename, application_name, state, count(*)
from pg_stat_activity
where backend_type = 'client backend'
group by usename, application_name, state
order by count(*) desc;
"""
SEED_OLDEST_IDLE = """
select pid, usename, application_name, client_addr,
state, state_change,
now() - state_change as idle_duration,
left(query, 80) as last_query
from pg_stat_activity
where state = 'idle'
and backend_type = 'client backend'
order by state_change asc
limit 20;
"""


@pytest.fixture
def observer(pg_server: EmbeddedPostgres) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with connect(pg_server.dsn(), application_name="observer") as conn:
        yield conn


def mine(snapshot: Snapshot, sessions: SessionFactory) -> list[Session]:
    pids = sessions.pids()
    return [s for s in snapshot.sessions if s.pid in pids]


def client_pids(sessions: SessionFactory) -> set[int]:
    rows = sessions.admin.execute(
        "select pid from pg_stat_activity where backend_type = 'client backend'"
    ).fetchall()
    return {pid for (pid,) in rows}


def test_snapshot_counts_the_sessions_exactly(
    sessions: SessionFactory, observer: psycopg.Connection[tuple[object, ...]]
) -> None:
    # The observer, the fixture's admin connection, and whatever an earlier test left behind.
    before = client_pids(sessions)
    assert {observer.info.backend_pid, sessions.admin.info.backend_pid} <= before
    sessions.incident()
    snapshot = take_snapshot(observer)

    ours = mine(snapshot, sessions)
    assert len(ours) == len(sessions.opened) == 12
    assert Counter((s.state, s.usename, s.application_name, s.client_addr) for s in ours) == {
        ("idle", "app_backend", "web", "127.0.0.1"): 3,
        ("idle", "reporting", "metabase", None): 2,
        ("idle in transaction", "app_backend", "worker", "127.0.0.1"): 2,
        ("idle in transaction (aborted)", "batch_worker", "etl", None): 1,
        ("active", "reporting", "report-job", "127.0.0.1"): 1,
        ("active", "batch_worker", "etl-lock", "127.0.0.1"): 1,
        ("idle in transaction", "app_backend", "migrator", "127.0.0.1"): 1,
        ("idle", "app_backend", "notifier", None): 1,
    }
    by_app = {s.application_name: s for s in ours}
    assert by_app["etl-lock"].is_waiting_on_lock
    assert by_app["etl-lock"].wait_event_type == "Lock"
    assert not by_app["report-job"].is_waiting_on_lock
    assert by_app["notifier"].is_listener
    assert by_app["notifier"].query.lower() == 'listen "orders"'
    assert [s.application_name for s in ours if s.is_listener] == ["notifier"]
    assert all(s.is_client and s.is_superuser is False for s in ours)
    assert all(s.datname == "postgres" for s in ours)
    assert {s.client_port is not None and s.client_port > 0 for s in ours if s.client_addr} == {
        True
    }

    # Beyond our sessions: ourselves, the fixture's admin connection, background processes.
    me = next(s for s in snapshot.sessions if s.pid == snapshot.own_pid)
    assert me.pid == observer.info.backend_pid
    assert (me.state, me.application_name, me.is_superuser) == ("active", "observer", True)
    assert {s.pid for s in snapshot.client_sessions} == before | sessions.pids()
    admin = next(s for s in snapshot.sessions if s.pid == sessions.admin.info.backend_pid)
    assert (admin.state, admin.application_name, admin.client_addr) == ("idle", ADMIN_APP, None)
    assert any(not s.is_client for s in snapshot.sessions)  # checkpointer, walwriter, ...
    assert all(s.is_superuser is None for s in snapshot.sessions if s.usename is None)


def test_breakdown_agrees_with_the_seed_queries(
    sessions: SessionFactory, observer: psycopg.Connection[tuple[object, ...]]
) -> None:
    sessions.incident()
    snapshot = take_snapshot(observer)
    # Run right after, on the same connection: every session but this one is at rest, and
    # this one is 'active' in both.
    by_state = observer.execute(SEED_BY_STATE).fetchall()
    by_user_app = observer.execute(SEED_BY_USER_APP).fetchall()
    oldest_idle = observer.execute(SEED_OLDEST_IDLE).fetchall()

    clients = snapshot.client_sessions
    assert Counter(s.state for s in clients) == {state: count for state, count in by_state}
    assert Counter((s.usename, s.application_name, s.state) for s in clients) == {
        (user, app, state): count for user, app, state, count in by_user_app
    }
    idle = sorted((s for s in clients if s.state == "idle"), key=lambda s: s.state_change or 0)
    assert [s.pid for s in idle][:20] == [row[0] for row in oldest_idle]
    for session, row in zip(idle, oldest_idle, strict=False):
        assert session.state_change == row[5]
        # The seed query ran later, so its now() - state_change cannot be smaller.
        assert session.state_age_s is not None
        assert timedelta(seconds=session.state_age_s) <= row[6]


def test_ages_are_measured_on_the_server_clock(
    sessions: SessionFactory, pg_server: EmbeddedPostgres
) -> None:
    idle = sessions.idle("app_backend", "sleepy")
    in_tx = sessions.idle_in_transaction("reporting", "forgot-to-commit")
    time.sleep(1.0)
    # An observer in a far-away time zone: timestamps come back with its offset, ages do not
    # change, and nothing depends on this machine's clock.
    with connect(pg_server.dsn(options="-c TimeZone=Pacific/Chatham")) as conn:
        before = conn.execute("select clock_timestamp()").fetchone()
        snapshot = take_snapshot(conn)
        after = conn.execute("select clock_timestamp()").fetchone()
    assert before is not None and after is not None
    assert before[0] <= snapshot.taken_at <= after[0]
    assert snapshot.taken_at.utcoffset() in (
        timedelta(hours=12, minutes=45),
        timedelta(hours=13, minutes=45),
    )

    by_pid = {s.pid: s for s in snapshot.sessions}
    for pid in (idle.pid, in_tx.pid):
        session = by_pid[pid]
        for stamp, age in (
            (session.backend_start, session.backend_age_s),
            (session.xact_start, session.xact_age_s),
            (session.query_start, session.query_age_s),
            (session.state_change, session.state_age_s),
        ):
            if stamp is None:
                assert age is None
            else:
                assert age == pytest.approx((snapshot.taken_at - stamp).total_seconds(), abs=1e-6)
    assert by_pid[idle.pid].xact_age_s is None
    assert by_pid[idle.pid].state_age_s is not None and by_pid[idle.pid].state_age_s >= 1.0
    assert by_pid[in_tx.pid].xact_age_s is not None and by_pid[in_tx.pid].xact_age_s >= 1.0


def test_settings_and_limits_are_captured(
    pg_server: EmbeddedPostgres, observer: psycopg.Connection[tuple[object, ...]]
) -> None:
    admin = observer
    pg_server.create_role(
        "limits_probe",
        connection_limit=7,
        config={"statement_timeout": "30s", "idle_in_transaction_session_timeout": "1min"},
    )
    admin.execute("alter role limits_probe in database postgres set work_mem = '8MB'")
    admin.execute("create database limits_db connection limit 9")
    admin.execute("create database closed_db with allow_connections false")
    try:
        snapshot = take_snapshot(observer)
    finally:
        admin.execute("drop database limits_db")
        admin.execute("drop database closed_db")
        admin.execute("drop role limits_probe")

    server = snapshot.server
    assert server.version_num is not None and server.version_num // 10000 == pg_server.version
    assert server.max_connections == pg_server.max_connections == 25
    assert server.superuser_reserved_connections == 3
    assert server.reserved_connections == pg_server.reserved_connections
    assert server.usable_slots == pg_server.usable_slots
    assert ("reserved_connections" in server.settings) == (pg_server.version >= 16)
    assert server.assumed == ()
    settings = server.settings
    assert settings["shared_buffers"].as_bytes() == 32 * 1024 * 1024
    assert settings["work_mem"].as_bytes() == 4 * 1024 * 1024
    assert settings["max_connections"].context == "postmaster"
    assert settings["statement_timeout"].unit == "ms"
    assert settings["tcp_keepalives_idle"].unit == "s"
    for name in (
        "maintenance_work_mem",
        "temp_buffers",
        "autovacuum_max_workers",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "client_connection_check_interval",
        "lock_timeout",
        "max_worker_processes",
    ):
        assert name in settings, name

    probe = snapshot.roles["limits_probe"]
    assert (probe.connection_limit, probe.is_superuser, probe.can_login) == (7, False, True)
    # Only settings for all databases: the IN DATABASE one is not the role's own.
    assert probe.config == {
        "statement_timeout": "30s",
        "idle_in_transaction_session_timeout": "1min",
    }
    assert snapshot.roles["postgres"].is_superuser
    assert snapshot.roles["app_backend"].connection_limit == -1
    assert not any(name.startswith("pg_") for name in snapshot.roles)
    assert snapshot.databases["limits_db"].connection_limit == 9
    assert snapshot.databases["limits_db"].allow_connections
    assert not snapshot.databases["closed_db"].allow_connections
    assert snapshot.databases["postgres"].connection_limit == -1


def test_snapshots_are_fresh_on_a_transactional_connection(
    sessions: SessionFactory, pg_server: EmbeddedPostgres
) -> None:
    with connect(pg_server.dsn(), autocommit=False) as conn:
        first = take_snapshot(conn)
        opened = sessions.idle("app_backend", "late-arrival")
        second = take_snapshot(conn)
        assert opened.pid not in {s.pid for s in first.sessions}
        assert opened.pid in {s.pid for s in second.sessions}
        assert second.taken_at > first.taken_at

        conn.execute("select 1")  # now inside a transaction: pg_stat_activity would be frozen
        with pytest.raises(ValueError, match="inside a transaction"):
            take_snapshot(conn)


def test_a_full_server_is_a_refusal_not_a_crash(
    sessions: SessionFactory, pg_server: EmbeddedPostgres
) -> None:
    before = client_pids(sessions)
    fillers = sessions.fill("app_backend")
    with pytest.raises(ServerRefused) as refused:
        connect(pg_server.dsn("reporting"))
    message = refused.value.server_message
    assert "remaining connection slots are reserved" in message
    assert refused.value.reserved_slots_only
    assert "\n" not in str(refused.value)

    # The superuser gets in through a reserved slot and sees the whole picture.
    with connect(pg_server.dsn(), application_name="rescuer") as rescuer:
        snapshot = take_snapshot(rescuer)
    clients = snapshot.client_sessions
    # The fillers took every slot an ordinary role may use.
    assert len(fillers) + len(before) == pg_server.usable_slots
    assert len([s for s in clients if s.application_name != "rescuer"]) == pg_server.usable_slots
    assert snapshot.server.usable_slots == pg_server.usable_slots

    # Fill the reserved slots too: now even the superuser hears "too many clients".
    sessions.fill("postgres", "superuser-filler")
    with pytest.raises(ServerRefused) as full:
        connect(pg_server.dsn())
    assert full.value.server_message == "sorry, too many clients already"
    assert not full.value.reserved_slots_only


@pytest.mark.parametrize("kind", ["role", "database"])
def test_role_and_database_limits_are_refusals(
    kind: str, sessions: SessionFactory, pg_server: EmbeddedPostgres
) -> None:
    admin = sessions.admin
    name = f"limited_{kind}"
    if kind == "role":
        pg_server.create_role(name, connection_limit=1)
        dsn = pg_server.dsn(name)
    else:
        admin.execute(sql.SQL("create database {} connection limit 1").format(sql.Identifier(name)))
        dsn = pg_server.dsn("app_backend", name)
    try:
        with connect(dsn) as holder, pytest.raises(ServerRefused) as refused:
            pid = holder.info.backend_pid
            connect(dsn)
        assert refused.value.server_message == f'too many connections for {kind} "{name}"'
        assert not refused.value.reserved_slots_only
        sessions.wait_gone([pid])
    finally:
        drop = "drop role {}" if kind == "role" else "drop database {} with (force)"
        admin.execute(sql.SQL(drop).format(sql.Identifier(name)))


def test_bad_password_names_no_password(pg_server: EmbeddedPostgres) -> None:
    pg_server.create_role("pw_user", password="correct horse")
    with connect(pg_server.dsn("pw_user", password="correct horse")) as conn:
        assert conn.execute("select current_user").fetchone() == ("pw_user",)
    dsn = pg_server.dsn("pw_user", password="Tr0ub4dor&3")
    with pytest.raises(ConnectFailed) as failed:
        connect(dsn)
    text = str(failed.value)
    assert 'password authentication failed for user "pw_user"' in text
    assert "Tr0ub4dor" not in text and "password" not in failed.value.target
    assert f"port={pg_server.port}" in text
    assert "\n" not in text


def test_unreachable_port_and_unknown_database(pg_server: EmbeddedPostgres) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectFailed) as unreachable:
        connect(f"host=127.0.0.1 port={port} user=postgres password=s3cr3t", connect_timeout=3)
    assert "Connection refused" in str(unreachable.value)
    assert "s3cr3t" not in str(unreachable.value)

    with pytest.raises(ConnectFailed) as unknown:
        connect(pg_server.dsn(dbname="no_such_db", password="s3cr3t"))
    assert 'database "no_such_db" does not exist' in str(unknown.value)
    assert "s3cr3t" not in str(unknown.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=localhost password=hunter2 hunter3",
        "postgresql://me:hun%zzter2@localhost/db",
        "host=localhost passwrd=hunter2",
    ],
)
def test_malformed_dsn_never_echoes_a_secret(dsn: str) -> None:
    with pytest.raises(ConnectFailed) as failed:
        connect(dsn)
    assert "hunter" not in str(failed.value)
    assert str(failed.value).startswith(
        "cannot connect to the given DSN: invalid connection string"
    )
    assert isinstance(failed.value, PgreliefError)


def test_describe_dsn_drops_secrets() -> None:
    shown = describe_dsn(
        "postgresql://me:s3cret@db.example:6543/orders?sslpassword=x&sslmode=require"
    )
    assert "s3cret" not in shown and "sslpassword" not in shown
    assert "host=db.example" in shown and "port=6543" in shown and "sslmode=require" in shown


def test_a_failing_snapshot_is_a_one_line_error(
    sessions: SessionFactory, pg_server: EmbeddedPostgres
) -> None:
    # A statement that cannot finish (blocked catalog, lock_timeout): the connection is fine.
    with connect(pg_server.dsn(options="-c lock_timeout=200ms")) as observer:
        with pg_server.connect() as locker, locker.transaction():
            locker.execute("lock table pg_database in access exclusive mode")
            with pytest.raises(PgreliefError) as blocked:
                take_snapshot(observer)
        assert not isinstance(blocked.value, ConnectFailed)
        assert str(blocked.value).startswith("the snapshot query failed: ")
        assert "lock timeout" in str(blocked.value)
        assert take_snapshot(observer).own_pid == observer.info.backend_pid  # still usable

        # The backend is gone: that is a connection problem, worth a reconnect.
        sessions.admin.execute(
            "select pg_terminate_backend(%s, 5000)", (observer.info.backend_pid,)
        )
        with pytest.raises(ConnectFailed, match="lost while observing") as lost:
            take_snapshot(observer)
        assert "\n" not in str(lost.value)
