"""The throwaway server itself: version choice, both listeners, settings, privileges, cleanup."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest

from pgrelief._dev.embedded import BINDIR_ENV, EmbeddedPostgres, EmbeddedPostgresError, find_install


def test_lifecycle_listeners_settings_and_cleanup() -> None:
    server = EmbeddedPostgres(
        max_connections=12,
        superuser_reserved_connections=2,
        reserved_connections=1,
        settings={"work_mem": "8MB", "log_line_prefix": "it's %m "},
    )
    with server as pg:
        assert pg.running
        expected_major = 15 if "/15/" in os.environ.get(BINDIR_ENV, "") else 18
        assert pg.version == expected_major
        data_dir, socket_dir = pg.data_dir, pg.socket_dir
        owner = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert data_dir.stat().st_uid == owner
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert Path(f"/proc/{postmaster}").stat().st_uid == owner

        with psycopg.connect(pg.dsn()) as tcp, psycopg.connect(pg.socket_dsn()) as local:
            query = "select host(client_addr) from pg_stat_activity where pid = pg_backend_pid()"
            assert tcp.execute(query).fetchone() == ("127.0.0.1",)
            assert local.execute(query).fetchone() == (None,)
            version = tcp.execute("show server_version_num").fetchone()
            assert version is not None and int(version[0]) // 10000 == pg.version
            assert tcp.execute("show max_connections").fetchone() == ("12",)
            assert tcp.execute("show superuser_reserved_connections").fetchone() == ("2",)
            assert tcp.execute("show work_mem").fetchone() == ("8MB",)
            assert tcp.execute("show log_line_prefix").fetchone() == ("it's %m ",)
            assert tcp.execute("show fsync").fetchone() == ("off",)
            reserved = tcp.execute("select current_setting('reserved_connections', true)")
            assert reserved.fetchone() == (("1",) if pg.version >= 16 else (None,))
            assert pg.reserved_connections == (1 if pg.version >= 16 else 0)
            assert pg.usable_slots == 12 - 2 - pg.reserved_connections

        # Settings live in postgresql.conf, not on the command line: ALTER SYSTEM wins after
        # a reload, as remediation relies on.
        with pg.connect() as admin:
            admin.execute("alter system set work_mem = '16MB'")
            admin.execute("select pg_reload_conf()")
        with pg.connect() as fresh:
            assert fresh.execute("show work_mem").fetchone() == ("16MB",)

        pg.create_role("secretive", password="open sesame", connection_limit=4)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn("secretive", password="wrong"))
        with psycopg.connect(pg.dsn("secretive", password="open sesame")) as ok:
            assert ok.execute("select current_user").fetchone() == ("secretive",)
        with pg.connect("secretive") as via_socket:  # the socket stays trusted
            limit = via_socket.execute(
                "select rolconnlimit from pg_roles where rolname = current_user"
            )
            assert limit.fetchone() == (4,)

    assert not server.running
    assert not data_dir.exists() and not socket_dir.exists()
    assert not Path(f"/proc/{postmaster}").exists()
    server.stop()  # idempotent
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        server.dsn()


def test_a_server_that_cannot_start_says_why() -> None:
    server = EmbeddedPostgres(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(EmbeddedPostgresError) as failed:
        server.start()
    assert "PostgreSQL did not start" in str(failed.value)
    assert "shared_buffers" in str(failed.value)
    assert not server.running


def test_a_bin_dir_without_postgres(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="has no postgres binary"):
        find_install(tmp_path)
