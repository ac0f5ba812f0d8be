"""Builders of the fix texts a diagnosis hands to people: SQL, pgbouncer.ini, ORM pool settings.

Every text here is meant to be copied into psql, a config file or application settings as is,
during an incident. So names and values are quoted the way PostgreSQL (or PgBouncer) reads
them back, a role called ``we"ird role`` included, and terminate statements re-check what
was observed so that pasting them a minute late cannot kill the wrong session.

These are display texts built without a server: the I/O modules that execute SQL compose it
with ``psycopg.sql`` instead. The ALTER statements are described once in ``statements``: this
module renders their text, ``act`` their executed form. The numbers (pool sizes, limits) come
from ``sizing``; this module only words them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from pgrelief import pgbouncer_ini as _ini
from pgrelief import statements as stmt
from pgrelief.snapshot import Session
from pgrelief.statements import Name, Parameter, Statement

SQLALCHEMY = "sqlalchemy"
DJANGO = "django"
RAILS = "rails"
HIKARICP = "hikaricp"
STACKS: tuple[str, ...] = (SQLALCHEMY, DJANGO, RAILS, HIKARICP)

# Statements listed pid by pid beyond this get unwieldy to paste; the rest is covered by a
# pattern statement that re-checks state and age instead.
MAX_LISTED = 100
QUERY_SAMPLE_CHARS = 80  # the domain reference's left(query, 80)

# PostgreSQL's reserved key words (and the role specifications that are not names): an
# unquoted identifier equal to one of these would not parse as a name.
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case cast
    check collate collation column concurrently constraint create cross current_catalog
    current_date current_role current_schema current_time current_timestamp current_user default
    deferrable desc distinct do else end except false fetch for foreign freeze from full grant
    group having ilike in initially inner intersect into is isnull join lateral leading left
    like limit localtime localtimestamp natural not notnull null offset on only or order outer
    overlaps placing primary references returning right select session_user similar some
    symmetric system_user table tablesample then to trailing true union unique user using
    variadic verbose when where window with public none""".split()  # noqa: SIM905
)
_SIMPLE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier: bare when PostgreSQL reads it back unchanged, else quoted.

    Quoting doubles embedded double quotes; mixed case, spaces, unicode and key words are
    quoted so ``ALTER ROLE`` names exactly the role that was observed.
    """
    if _SIMPLE_IDENT.fullmatch(name) and name not in _RESERVED and len(name) < 64:
        return name
    return quoted_name(name)


def quoted_name(name: str) -> str:
    """``name`` always in double quotes: unambiguous in prose such as ``role "app"``.

    A name holding control characters (an ESC that would clear a terminal, a line separator
    that would split an audit line) is written as a ``U&"..."`` identifier with those
    characters as ``\\XXXX`` escapes: PostgreSQL reads back exactly the observed name, and
    nothing printed reaches the terminal raw.
    """
    if _UNSAFE.search(name) is None:
        return '"' + name.replace('"', '""') + '"'
    escaped = _UNSAFE.sub(_unicode_escape, name.replace("\\", "\\\\")).replace('"', '""')
    return 'U&"' + escaped + '"'


def quote_literal(value: str) -> str:
    """``value`` as an SQL string literal, correct whatever standard_conforming_strings says.

    Single quotes are doubled; a value with a backslash becomes an ``E''`` literal with the
    backslashes doubled, as PostgreSQL's own ``quote_literal`` does. Control characters
    become ``E''`` escapes (``\\x1b``, ``\\u2028``), so the literal still matches the
    observed value and shows nothing raw on a terminal.
    """
    quoted = value.replace("'", "''")
    if "\\" in value or _UNSAFE.search(value) is not None:
        return "E'" + _UNSAFE.sub(_e_escape, quoted.replace("\\", "\\\\")) + "'"
    return "'" + quoted + "'"


# Characters that must never reach a terminal raw: C0 and C1 controls (ESC starts the
# sequences that clear screens and retitle windows), DEL, the Unicode line and paragraph
# separators (splitlines() breaks on them) and the bidirectional overrides ("Trojan source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a character ``escape_controls`` would rewrite."""
    return _UNSAFE.search(text) is not None


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character shown as a visible escape (``\\x1b``).

    For display only (it changes the text): names and values in prose, report cells. With
    ``keep_newlines``, line feeds stay (multi-line SQL and ini texts keep their lines).
    """
    if _UNSAFE.search(text) is None:
        return text
    if keep_newlines:
        return "\n".join(_UNSAFE.sub(_visible, line) for line in text.split("\n"))
    return _UNSAFE.sub(_visible, text)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _e_escape(match: re.Match[str]) -> str:
    # \xHH for ASCII; \uXXXX above (valid in E'' literals on a UTF-8 server).
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def _unicode_escape(match: re.Match[str]) -> str:
    return f"\\{ord(match.group(0)):04X}"


def timestamp_literal(moment: datetime) -> str:
    """A timestamptz literal that compares equal to the server's value, microseconds included."""
    return quote_literal(moment.isoformat(sep=" ")) + "::timestamptz"


def pg_duration_setting(seconds: float) -> str:
    """``seconds`` as a PostgreSQL time setting value (``'60s'``, ``'5min'``, ``'250ms'``)."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    whole = milliseconds // 1000
    if whole and whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole and whole % 60 == 0:
        return f"{whole // 60}min"
    return f"{whole}s"


def query_sample(query: str, length: int = QUERY_SAMPLE_CHARS) -> str:
    """The start of a query on one line, like the domain reference's ``left(query, 80)``."""
    return " ".join(query.split())[:length]


# --- SQL ---------------------------------------------------------------------------------

DIAGNOSTIC_QUERIES = """-- Connection state breakdown
select state, count(*) as cnt
from pg_stat_activity
where backend_type = 'client backend'
group by state
order by cnt desc;

-- Connections by user and application
select usename, application_name, state, count(*)
from pg_stat_activity
where backend_type = 'client backend'
group by usename, application_name, state
order by count(*) desc;

-- Longest-running idle connections (potential leaks)
select pid, usename, application_name, client_addr,
state, state_change,
now() - state_change as idle_duration,
left(query, 80) as last_query
from pg_stat_activity
where state = 'idle'
and backend_type = 'client backend'
order by state_change asc
limit 20;"""

LOCK_WAITERS_QUERY = """-- Who blocks whom: sessions waiting on a lock and the pids holding it
select pid, usename, application_name, pg_blocking_pids(pid) as blocked_by,
       now() - query_start as waiting_for, left(query, 80) as query
from pg_stat_activity
where wait_event_type = 'Lock'
order by query_start;"""


def signal_sql(
    sessions: Sequence[Session], *, cancel: bool = False, spare_superusers: bool = False
) -> str:
    """``pg_terminate_backend`` (or ``pg_cancel_backend``) for exactly these observed sessions.

    Each session is matched on pid, backend_start, state and state_change as observed (for a
    cancel: query_start instead of state_change, so only the same query is cancelled): a
    reused pid, or a session that has since run another statement, no longer matches. Sessions
    whose dump lacked those timestamps fall back to pid and state. ``spare_superusers`` adds a
    check, made by the server when the statement runs, that leaves superusers' sessions alone
    (for input that could not tell who is one).
    """
    function = "pg_cancel_backend" if cancel else "pg_terminate_backend"
    label = "cancelled" if cancel else "terminated"
    moment = "query_start" if cancel else "state_change"
    guard = f"\n{SPARE_SUPERUSERS}" if spare_superusers else ""
    precise: list[str] = []
    loose: dict[str, list[int]] = {}
    for session in sessions:
        changed = session.query_start if cancel else session.state_change
        state = session.state_key
        if session.backend_start is not None and changed is not None:
            precise.append(
                f"    ({session.pid}, {timestamp_literal(session.backend_start)}, "
                f"{quote_literal(state)}, {timestamp_literal(changed)})"
            )
        else:
            loose.setdefault(state, []).append(session.pid)
    statements: list[str] = []
    if precise:
        statements.append(
            f"select pid, {function}(pid) as {label}\n"
            "from pg_stat_activity\n"
            "where backend_type = 'client backend'\n"
            f"  and (pid, backend_start, state, {moment}) in (values\n"
            + ",\n".join(precise)
            + f"\n  ){guard};"
        )
    for state, pids in loose.items():
        statements.append(
            "-- no timestamps were observed for these: matched on pid and state only\n"
            f"select pid, {function}(pid) as {label}\n"
            "from pg_stat_activity\n"
            f"where backend_type = 'client backend' and state = {quote_literal(state)}\n"
            f"  and pid in ({', '.join(str(pid) for pid in pids)}){guard};"
        )
    return "\n".join(statements)


# The server-side checks a statement carries when it cannot list who it spares: `pgrelief
# run` never terminates superusers' or LISTEN sessions by default (pgrelief.protection), and
# neither may a statement diagnose prints.
SPARE_SUPERUSERS = "  and usesysid not in (select oid from pg_roles where rolsuper)"
SPARE_LISTENERS = "  and query !~* '^[[:space:]]*listen[[:space:]]'"


def pattern_signal_sql(
    states: Sequence[str] | Mapping[str, float],
    age_column: str,
    min_age_s: float = 0.0,
    *,
    filters: Mapping[str, str | None] | None = None,
    cancel: bool = False,
) -> str:
    """A terminate (or cancel) by pattern: state, minimum age and optional column filters.

    For when too many sessions match to list them: it re-checks state and age at execution
    time, so a session that became active or a freshly reused pid is not touched, and it
    spares superusers' and LISTEN sessions as ``pgrelief run`` does. ``states`` may map each
    state to its own minimum age (``min_age_s`` is then unused). A filter value of ``None``
    matches NULL (``client_addr`` of a Unix-socket client).
    """
    function = "pg_cancel_backend" if cancel else "pg_terminate_backend"
    label = "cancelled" if cancel else "terminated"
    ages = dict(states) if isinstance(states, Mapping) else dict.fromkeys(states, min_age_s)
    by_age: dict[int, list[str]] = {}
    for state, age in ages.items():
        by_age.setdefault(int(age), []).append(state)
    lines = [
        f"select pid, {function}(pid) as {label}",
        "from pg_stat_activity",
        "where backend_type = 'client backend'",
        "  and pid <> pg_backend_pid()",
    ]
    if len(by_age) == 1:
        [(age, grouped)] = by_age.items()
        lines.append(f"  and {_state_clause(grouped)}")
        lines.append(f"  and {age_column} < now() - interval '{age} seconds'")
    else:
        clauses = [
            f"({_state_clause(grouped)} and {age_column} < now() - interval '{age} seconds')"
            for age, grouped in by_age.items()
        ]
        lines.append("  and (" + "\n       or ".join(clauses) + ")")
    for column, value in (filters or {}).items():
        if value is None:
            lines.append(f"  and {column} is null")
        else:
            lines.append(f"  and {column} = {quote_literal(value)}")
    lines += [SPARE_SUPERUSERS, SPARE_LISTENERS]
    return "\n".join(lines) + ";"


def _state_clause(states: Sequence[str]) -> str:
    if len(states) == 1:
        return f"state = {quote_literal(states[0])}"
    return f"state in ({', '.join(quote_literal(s) for s in states)})"


def fix_sql(*statements: Statement) -> str:
    """Statements as a fix text prints them: one per line, key words in lower case, names
    bare where PostgreSQL reads them back unchanged (``quote_ident``)."""
    return "\n".join(_statement_text(s, quote_ident, lower=True) for s in statements)


def action_sql(*statements: Statement) -> str:
    """Statements as an action shows them: on one line, key words in upper case, object names
    always in double quotes, as the action's target reads (``role "app"``)."""
    return " ".join(_statement_text(s, quoted_name, lower=False) for s in statements)


def _statement_text(statement: Statement, quote_name: Callable[[str], str], *, lower: bool) -> str:
    texts: list[str] = []
    for part in statement.parts:
        if isinstance(part, Name):
            texts.append(quote_name(part.value))
        elif isinstance(part, Parameter):
            texts.append(quote_ident(part.value))
        elif isinstance(part.value, str):
            texts.append(quote_literal(part.value))
        else:
            texts.append(str(part.value))
    template = statement.template.lower() if lower else statement.template
    return template.format(*texts) + ";"


def alter_role_connection_limit(role: str, limit: int) -> str:
    return fix_sql(stmt.alter_role_connection_limit(role, limit))


def alter_database_connection_limit(database: str, limit: int) -> str:
    return fix_sql(stmt.alter_database_connection_limit(database, limit))


def alter_role_set(role: str, setting: str, value: str) -> str:
    """A per-role default; it applies to the role's sessions that start after it."""
    return fix_sql(stmt.alter_role_set(role, setting, value))


def alter_system_set(settings: Sequence[tuple[str, str]], *, reload: bool = True) -> str:
    alters = [stmt.alter_system_set(name, value) for name, value in settings]
    return fix_sql(*alters, *([stmt.RELOAD_CONF] if reload else []))


# --- PgBouncer ------------------------------------------------------------------------------

# The fragment diagnose shows is the file the operator's ConfigMap carries: one renderer.
pgbouncer_ini = _ini.pgbouncer_ini

LISTEN = "LISTEN"
ADVISORY_LOCK = "advisory lock"
PREPARE = "PREPARE"
SESSION_SET = "session-level SET"
TEMP_TABLE = "temporary table"
HOLD_CURSOR = "WITH HOLD cursor"

_ADVISORY = re.compile(r"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE)
_SET = re.compile(r"set\s+(?!local\b|transaction\b|constraints\b)", re.IGNORECASE)
_TEMP = re.compile(r"create\s+(?:global\s+|local\s+)?temp(?:orary)?\s+table", re.IGNORECASE)
_HOLD = re.compile(r"declare\s.*\swith\s+hold\s", re.IGNORECASE | re.DOTALL)


def session_feature(query: str) -> str | None:
    """The session-level feature a last statement shows, which PgBouncer's transaction mode breaks.

    LISTEN, session advisory locks (the ``_xact_`` variants are fine), SQL ``PREPARE``, a
    ``SET`` that is not ``SET LOCAL``, temporary tables and ``WITH HOLD`` cursors all outlive a
    transaction. Only the last statement is visible in pg_stat_activity, so this is evidence,
    not proof of absence.
    """
    head = query.lstrip()[:64].lower()
    if head.startswith("listen"):
        return LISTEN
    if "advisory_lock" in query and _ADVISORY.search(query):
        return ADVISORY_LOCK
    if head.startswith("prepare "):
        return PREPARE
    if head.startswith("set ") and _SET.match(head):
        return SESSION_SET
    if head.startswith("create ") and _TEMP.match(head):
        return TEMP_TABLE
    if head.startswith("declare ") and _HOLD.match(query.lstrip()):
        return HOLD_CURSOR
    return None


# --- ORM pools ---------------------------------------------------------------------------------


_RAILS = re.compile(r"rails|puma|sidekiq|activerecord|(?<!g)unicorn")  # gunicorn is Python


def guess_stack(application_name: str) -> str | None:
    """The client stack an application_name suggests, or None when it says nothing."""
    name = application_name.lower()
    if not name:
        return None
    if name == "postgresql jdbc driver" or any(w in name for w in ("hikari", "jdbc", "spring")):
        return HIKARICP
    if _RAILS.search(name):
        return RAILS
    if any(word in name for word in ("django", "gunicorn", "celery")):
        return DJANGO
    if any(word in name for word in ("sqlalchemy", "alembic")):
        return SQLALCHEMY
    return None


def orm_pool_settings(stack: str, pool_size: int, application: str | None = None) -> str:
    """Pool settings for ``stack`` capping one application instance at ``pool_size``.

    Each also turns on the leak detection / connection recycling the domain reference names
    (pool_pre_ping + pool_recycle, CONN_MAX_AGE + health checks, reaping, leakDetectionThreshold).
    """
    size = max(pool_size, 1)
    who = f" for {application!r}" if application else ""
    if stack == SQLALCHEMY:
        overflow = size // 5
        return (
            f"# SQLAlchemy{who}: at most {size} connections per process "
            "(pool_size + max_overflow)\n"
            "engine = create_engine(\n"
            "    DATABASE_URL,\n"
            f"    pool_size={size - overflow},\n"
            f"    max_overflow={overflow},\n"
            "    pool_timeout=30,\n"
            "    pool_recycle=1800,  # replace connections older than 30 min\n"
            "    pool_pre_ping=True,  # test a pooled connection before use\n"
            ")\n"
            "# and always check connections out with a context manager: "
            "`with engine.connect() as conn:` / `with Session(engine) as session:`"
        )
    if stack == DJANGO:
        return (
            f"# Django{who} (settings.py): one connection per worker thread; keep "
            f"workers × threads per instance at or below {size}\n"
            'DATABASES["default"]["CONN_MAX_AGE"] = 300  # reconnect after 5 min\n'
            'DATABASES["default"]["CONN_HEALTH_CHECKS"] = True  # Django 4.1+: ping before reuse\n'
            "# Django 5.1+ with psycopg 3 may pool instead (then CONN_MAX_AGE must be 0):\n"
            '# DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 1, '
            f'"max_size": {size}, "max_idle": 300}}}}'
        )
    if stack == RAILS:
        return (
            f"# Rails ActiveRecord{who} (config/database.yml): pool is per process; "
            f"keep it at RAILS_MAX_THREADS / Sidekiq concurrency, at most {size}\n"
            "production:\n"
            f"  pool: {size}\n"
            "  checkout_timeout: 5\n"
            "  idle_timeout: 300  # close connections idle in the pool for 5 min\n"
            "  reaping_frequency: 60  # reclaim connections of dead threads every 60 s"
        )
    if stack == HIKARICP:
        return (
            f"# HikariCP{who} (Spring Boot application.properties; plain Hikari: "
            "maximumPoolSize, minimumIdle, ...)\n"
            f"spring.datasource.hikari.maximum-pool-size={size}\n"
            f"spring.datasource.hikari.minimum-idle={max(1, size // 4)}\n"
            "spring.datasource.hikari.idle-timeout=600000\n"
            "spring.datasource.hikari.max-lifetime=1800000\n"
            "spring.datasource.hikari.keepalive-time=300000\n"
            "spring.datasource.hikari.leak-detection-threshold=60000\n"
            "spring.datasource.hikari.connection-timeout=30000"
        )
    raise ValueError(f"unknown stack {stack!r}; expected one of {', '.join(STACKS)}")


def orm_pool_settings_brief(pool_size: int, application: str | None = None) -> str:
    """All four stacks in one line each, for an application whose stack is unknown."""
    size = max(pool_size, 1)
    who = f" for {application!r}" if application else ""
    return (
        f"# Stack unknown{who}: cap each instance at {size} connections and turn on leak "
        "detection in whichever pool it uses\n"
        f"# SQLAlchemy: create_engine(url, pool_size={size - size // 5}, "
        f"max_overflow={size // 5}, pool_recycle=1800, pool_pre_ping=True)\n"
        f'# Django:     DATABASES["default"].update(CONN_MAX_AGE=300, CONN_HEALTH_CHECKS=True)'
        f"  # workers × threads <= {size}\n"
        f"# Rails:      database.yml pool: {size}, idle_timeout: 300, reaping_frequency: 60\n"
        f"# HikariCP:   maximumPoolSize={size}, leakDetectionThreshold=60000, "
        "maxLifetime=1800000"
    )
