"""The one pgbouncer.ini renderer, and the one list of keys pgrelief owns in it.

``pgrelief diagnose`` shows a pgbouncer.ini fragment sized for the server it looked at, and the
operator's PgBouncer ConfigMap carries the same file: both come from ``pgbouncer_ini`` so the
advice a user copies and the config the operator applies cannot drift apart. The policy's
``pgbouncer.parameters`` are checked here too (``parameter_problem``), against the same
``RESERVED_PGBOUNCER_KEYS`` the renderer is tested against: a key pgrelief writes itself is
either reserved (a parameter naming it is refused) or a default that a parameter replaces in
place (``TUNABLE_DEFAULTS``), never a second line the reader would silently prefer.

Pure text building: no file is written here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

__all__ = [
    "POOL_MODES",
    "RESERVED_PGBOUNCER_KEYS",
    "SETTING_NAME",
    "TUNABLE_DEFAULTS",
    "PoolMode",
    "parameter_problem",
    "pgbouncer_ini",
]

PoolMode = Literal["transaction", "session", "statement"]
POOL_MODES: tuple[str, ...] = get_args(PoolMode)

# pgbouncer.ini keys pgrelief writes itself: letting a policy set them would break the
# Deployment pgrelief reconciles (listening address, auth wiring, files inside the container)
# or contradict the dedicated spec fields.
RESERVED_PGBOUNCER_KEYS: frozenset[str] = frozenset(
    {
        "pool_mode",
        "max_client_conn",
        "default_pool_size",
        "reserve_pool_size",
        "listen_addr",
        "listen_port",
        "listen_backlog",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
        "auth_type",
        "auth_file",
        "auth_hba_file",
        "auth_query",
        "auth_user",
        "auth_dbname",
        "admin_users",
        "stats_users",
        "logfile",
        "pidfile",
        "user",
        "conffile",
        "service_name",
        "job_name",
        "so_reuseport",
        "peer_id",
    }
)

# Keys the renderer writes with a sensible default that a policy parameter may change
# (``server_idle_timeout: "600"``): the parameter's value takes the default's line.
TUNABLE_DEFAULTS: frozenset[str] = frozenset(
    {
        "reserve_pool_timeout",
        "max_db_connections",
        "server_idle_timeout",
        "server_lifetime",
        "log_connections",
        "log_disconnections",
    }
)

SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_BARE = re.compile(r"[0-9A-Za-z_.-]+")


def parameter_problem(key: str, value: str) -> str | None:
    """Why ``key = value`` may not go into the [pgbouncer] section, or None when it may."""
    if not SETTING_NAME.match(key):
        return f"{key!r} is not a pgbouncer.ini setting name (lowercase letters, digits, _)"
    if key in RESERVED_PGBOUNCER_KEYS:
        return f"{key!r} is set by pgrelief and cannot be overridden; reserved keys: " + ", ".join(
            sorted(RESERVED_PGBOUNCER_KEYS)
        )
    if any(ch in value for ch in "\r\n\x00"):
        return f"value of {key!r} must be a single line"
    return None


def _key(name: str) -> str:
    if _BARE.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _value(value: str) -> str:
    if value and " " not in value and "'" not in value:
        return value
    return "'" + value.replace("'", "''") + "'"


def pgbouncer_ini(
    *,
    pool_mode: str,
    default_pool_size: int,
    reserve_pool_size: int,
    max_client_conn: int,
    max_db_connections: int | None = None,
    databases: Sequence[str] = ("mydb",),
    session_pools: Mapping[str, int] | None = None,
    host: str = "127.0.0.1",
    port: int = 5432,
    notes: Sequence[str] = (),
    parameters: Mapping[str, str] | None = None,
) -> str:
    """A pgbouncer.ini fragment in the domain reference's shape, sized and commented.

    ``session_pools`` maps a database to the pool size of an extra ``<db>_session`` entry in
    session mode, for the clients that need session features while the rest share
    ``pool_mode`` (per-database ``pool_mode`` overrides the global one).

    ``parameters`` are further [pgbouncer] settings (a policy's ``pgbouncer.parameters``): one
    naming a tunable default replaces that default's value on its line, any other is appended;
    one naming a reserved key, or that ``parameter_problem`` refuses, is a ValueError.
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"unknown PgBouncer pool_mode {pool_mode!r}")
    extra = dict(parameters or {})
    for key, value in extra.items():
        problem = parameter_problem(key, value)
        if problem is not None:
            raise ValueError(problem)
    lines = ["; PgBouncer config — /etc/pgbouncer/pgbouncer.ini (sized by pgrelief)"]
    lines.extend(f"; {note}" for note in notes)
    lines += ["[databases]", "; point host= at your PostgreSQL server"]
    target = f"host={_value(host)} port={port}"
    for database in databases or ("mydb",):
        lines.append(f"{_key(database)} = {target} dbname={_value(database)}")
    for database, size in (session_pools or {}).items():
        lines.append(
            f"{_key(database + '_session')} = {target} "
            f"dbname={_value(database)} pool_mode=session pool_size={max(size, 1)}"
        )
    pool_comment = (
        "Transaction pooling — connections returned after each transaction"
        if pool_mode == "transaction"
        else f"{pool_mode.capitalize()} pooling — see the notes above for why"
    )
    blocks: list[tuple[str | None, list[tuple[str, object]]]] = [
        (
            None,
            [
                ("listen_addr", "0.0.0.0"),
                ("listen_port", 6432),
                ("auth_type", "md5"),
                ("auth_file", "/etc/pgbouncer/userlist.txt"),
            ],
        ),
        (pool_comment, [("pool_mode", pool_mode)]),
        (
            "Max connections PgBouncer opens to PostgreSQL (per database/user pair)",
            [("default_pool_size", default_pool_size)],
        ),
        (
            "Extra connections allowed during traffic spikes",
            [("reserve_pool_size", reserve_pool_size), ("reserve_pool_timeout", 3)],
        ),
    ]
    if max_db_connections is not None:
        blocks.append(
            (
                "Hard cap per database across all users, so the pools never exceed usable slots",
                [("max_db_connections", max_db_connections)],
            )
        )
    blocks += [
        ("Max client connections PgBouncer accepts", [("max_client_conn", max_client_conn)]),
        ("Close server connections that have been idle this long", [("server_idle_timeout", 300)]),
        ("Force-close server connections after this lifetime", [("server_lifetime", 3600)]),
        (
            "Log connections/disconnections for leak debugging",
            [("log_connections", 1), ("log_disconnections", 1)],
        ),
    ]
    # A parameter takes the line of the default it names; the others follow, in their order.
    blocks = [
        (comment, [(key, extra.pop(key, value)) for key, value in settings])
        for comment, settings in blocks
    ]
    if extra:
        blocks.append(("From the policy's pgbouncer.parameters", list(extra.items())))
    lines += ["", "[pgbouncer]"]
    for comment, settings in blocks:
        if comment is not None:
            lines += ["", f"; {comment}"]
        lines += [f"{key} = {value}" for key, value in settings]
    return "\n".join(lines)
