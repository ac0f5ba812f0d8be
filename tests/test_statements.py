"""One description per ALTER, three renderings: what pgrelief shows, advises and executes.

An action's ``sql_text`` (shown and audited), ``advice.alter_*`` (printed as a fix) and
``act.alter_statement`` (executed through psycopg.sql) all render one ``statements.Statement``.
The unit tests pin the text renderings; the real-server test runs every rendering against a
private PostgreSQL, for names built to break quoting, and checks that each one changed the
catalogs in exactly the same way — that is, they are the same statement.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest
from psycopg import sql

from pgrelief import advice
from pgrelief import statements as stmt
from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.act import alter_statement, composed
from pgrelief.plan import (
    Change,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
)

Connection = psycopg.Connection[tuple[object, ...]]

HOSTILE = [
    'x"; DROP ROLE postgres; --',
    "o'neil",
    'we"ird rôle',
    "semi;colon",
    "Mixed Case",
    "select",  # a reserved key word
    "1st",
    "back\\slash",
    "dollar$sign",  # bare is fine: '$' may follow the first character
    "ünï☃code",
    "r" * 63,  # the longest name PostgreSQL keeps (NAMEDATALEN - 1 bytes)
    "é" * 31 + "x",  # 63 bytes in UTF-8
]
DATABASES = ['x"; DROP DATABASE postgres; --', "o'neil", "Ünï code", "é" * 31 + "x"]
HOSTILE_VALUE = "it's; DROP ROLE postgres; --\\ ü"
SYSTEM_VALUE = "it's; --\\ x"  # ASCII: application_name's check hook rewrites the rest


# ---- the pure description and its texts ----------------------------------------------------


def test_a_template_must_take_exactly_its_parts() -> None:
    with pytest.raises(ValueError, match="does not take 1 parts"):
        stmt.Statement("ALTER ROLE {} CONNECTION LIMIT {}", (stmt.Name("a"),))
    with pytest.raises(ValueError, match="does not take 0 parts"):
        stmt.Statement("SELECT '{x}'")


def test_fix_text_is_lower_case_with_names_bare_where_postgres_reads_them_unchanged() -> None:
    assert advice.fix_sql(stmt.alter_role_connection_limit("app", 5)) == (
        "alter role app connection limit 5;"
    )
    assert advice.fix_sql(
        stmt.alter_role_set("Mixed Case", "statement_timeout", "5s"),
        stmt.alter_role_set("select", "idle_session_timeout", None),
        stmt.alter_database_connection_limit("dollar$sign", -1),
        stmt.alter_system_set("max_connections", 200),
        stmt.alter_system_set("tcp_keepalives_idle", None),
        stmt.RELOAD_CONF,
    ) == (
        "alter role \"Mixed Case\" set statement_timeout = '5s';\n"
        'alter role "select" reset idle_session_timeout;\n'
        "alter database dollar$sign connection limit -1;\n"
        "alter system set max_connections = 200;\n"
        "alter system reset tcp_keepalives_idle;\n"
        "select pg_reload_conf();"
    )


def test_action_text_is_upper_case_on_one_line_with_every_name_quoted() -> None:
    assert advice.action_sql(
        stmt.alter_role_set('x"y', "application_name", "a'b\\c"),
        stmt.alter_system_set("pgrelief.note", "1s"),
        stmt.RELOAD_CONF,
    ) == (
        "ALTER ROLE \"x\"\"y\" SET application_name = E'a''b\\\\c'; "
        "ALTER SYSTEM SET \"pgrelief.note\" = '1s'; SELECT pg_reload_conf();"
    )


def test_executed_form_quotes_every_part_with_psycopg() -> None:
    statement = stmt.alter_role_set('x"y', "statement_timeout", "1s")
    assert composed(statement).as_string(None) == (
        'ALTER ROLE "x""y" SET "statement_timeout" = \'1s\''
    )
    assert alter_statement(SetDatabaseConnectionLimit("d", 3, -1)) == composed(
        stmt.alter_database_connection_limit("d", 3)
    )


# ---- the renderings are one statement on a real server -------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    # A server of its own: ALTER SYSTEM outlives a test in postgresql.auto.conf.
    with EmbeddedPostgres(max_connections=15) as pg:
        for name in HOSTILE:
            pg.create_role(name)
        with pg.connect() as conn:
            for name in DATABASES:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield pg


def _psql(server: EmbeddedPostgres, script: str) -> None:
    """Run ``script`` as a user pasting it into psql would (psql sends statements one by one)."""
    result = subprocess.run(
        [str(server.tool("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"],
        input=script,
        env={**os.environ, **server.libpq_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _execute(conn: Connection, changes: Sequence[Change]) -> None:
    for change in changes:
        statement = alter_statement(change)
        assert statement is not None
        conn.execute(statement)
    if any(isinstance(change, SetSystemSetting) for change in changes):
        conn.execute(composed(stmt.RELOAD_CONF))


def _roles(conn: Connection) -> dict[str, tuple[object, object]]:
    rows = conn.execute(
        "select rolname, rolconnlimit, rolconfig from pg_roles where rolname = any(%s)",
        (HOSTILE,),
    ).fetchall()
    return {str(name): (limit, config) for name, limit, config in rows}


def _databases(conn: Connection) -> dict[str, object]:
    rows = conn.execute(
        "select datname, datconnlimit from pg_database where datname = any(%s)", (DATABASES,)
    ).fetchall()
    return {str(name): limit for name, limit in rows}


def _auto_conf(conn: Connection) -> list[tuple[object, ...]]:
    return conn.execute(
        "select name, setting from pg_file_settings"
        " where name = 'application_name' and sourcefile like '%postgresql.auto.conf'"
    ).fetchall()


def _same_effect(
    server: EmbeddedPostgres,
    changes: Sequence[Change],
    advised: str | None,
    read: Callable[[Connection], object],
    baseline: Callable[[Connection], None],
) -> object:
    """The catalog state after each rendering of ``changes``, from the same baseline; all equal."""
    effects: dict[str, object] = {}
    with server.connect() as conn:
        renderings: dict[str, Callable[[], None]] = {
            "executed": lambda: _execute(conn, changes),
            "shown": lambda: _psql(server, "\n".join(c.sql_text for c in changes)),
        }
        if advised is not None:
            renderings["advised"] = lambda: _psql(server, advised)
        for label, perform in renderings.items():
            baseline(conn)
            before = read(conn)
            perform()
            effects[label] = read(conn)
            assert effects[label] != before, f"the {label} statements changed nothing"
        baseline(conn)
    first = effects["executed"]
    assert all(effect == first for effect in effects.values()), effects
    return first


def _reset_roles(conn: Connection, config: dict[str, str] | None = None) -> None:
    for name in HOSTILE:
        conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(name)))
        for setting, value in (config or {}).items():
            conn.execute(
                sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                )
            )


def test_role_connection_limit_is_one_statement_for_hostile_names(
    server: EmbeddedPostgres,
) -> None:
    changes = [SetRoleConnectionLimit(name, 7, -1) for name in HOSTILE]
    advised = "\n".join(advice.alter_role_connection_limit(name, 7) for name in HOSTILE)
    effect = _same_effect(server, changes, advised, _roles, _reset_roles)
    assert effect == {name: (7, None) for name in HOSTILE}
    with server.connect() as conn:
        # Where both quote alike (names always quoted, a positive number) the texts agree too.
        for change in changes:
            statement = alter_statement(change)
            assert statement is not None
            assert statement.as_string(conn) + ";" == change.sql_text


def test_role_setting_set_and_reset_are_one_statement_for_hostile_names(
    server: EmbeddedPostgres,
) -> None:
    setting = [SetRoleSetting(name, "application_name", HOSTILE_VALUE, None) for name in HOSTILE]
    advised = "\n".join(
        advice.alter_role_set(name, "application_name", HOSTILE_VALUE) for name in HOSTILE
    )
    effect = _same_effect(server, setting, advised, _roles, _reset_roles)
    assert effect == {name: (-1, [f"application_name={HOSTILE_VALUE}"]) for name in HOSTILE}

    reset = [SetRoleSetting(name, "statement_timeout", None, "1500ms") for name in HOSTILE]
    effect = _same_effect(
        server,
        reset,
        None,  # advice never resets a role setting
        _roles,
        lambda conn: _reset_roles(conn, {"statement_timeout": "1500ms"}),
    )
    assert effect == {name: (-1, None) for name in HOSTILE}


def test_database_connection_limit_is_one_statement_for_hostile_names(
    server: EmbeddedPostgres,
) -> None:
    def reset(conn: Connection) -> None:
        for name in DATABASES:
            conn.execute(
                sql.SQL("ALTER DATABASE {} CONNECTION LIMIT -1").format(sql.Identifier(name))
            )

    changes = [SetDatabaseConnectionLimit(name, 3, -1) for name in DATABASES]
    advised = "\n".join(advice.alter_database_connection_limit(name, 3) for name in DATABASES)
    effect = _same_effect(server, changes, advised, _databases, reset)
    assert effect == dict.fromkeys(DATABASES, 3)


def test_system_setting_set_and_reset_are_one_statement(server: EmbeddedPostgres) -> None:
    def clear(conn: Connection) -> None:
        conn.execute("ALTER SYSTEM RESET application_name")

    def hostile(conn: Connection) -> None:
        conn.execute(
            sql.SQL("ALTER SYSTEM SET application_name = {}").format(sql.Literal(SYSTEM_VALUE))
        )

    changes = [SetSystemSetting("application_name", SYSTEM_VALUE, "")]
    advised = advice.alter_system_set([("application_name", SYSTEM_VALUE)])
    effect = _same_effect(server, changes, advised, _auto_conf, clear)
    assert effect == [("application_name", SYSTEM_VALUE)]

    reset = [SetSystemSetting("application_name", None, SYSTEM_VALUE)]
    assert _same_effect(server, reset, None, _auto_conf, hostile) == []
    with server.connect() as conn:
        clear(conn)
