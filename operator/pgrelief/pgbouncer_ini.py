"""The one pgbouncer.ini renderer, and the one list of keys pgrelief owns in it.

``pgrelief diagnose`` shows a pgbouncer.ini fragment sized for the server it looked at, and the
operator's PgBouncer ConfigMap carries the same file: both come from ``pgbouncer_ini`` so the
advice a user copies and the config the operator applies cannot drift apart. The policy's
``pgbouncer.parameters`` are checked here too (``parameter_problem``), against the same
``RESERVED_PGBOUNCER_KEYS`` the renderer is tested against: a key pgrelief writes itself is
either reserved (a parameter naming it is refused) or a default that a parameter replaces in
place (``TUNABLE_DEFAULTS``), never a second line the reader would silently prefer.

How PgBouncer reads the file decides how it is written (libusual's ``cfparser``, checked
against Debian's 1.18): a key is ``[0-9A-Za-z_.*-]`` only, with no quoting at all, so a
database whose name holds anything else is served under an alias; a ``[pgbouncer]`` value is
the rest of the line, verbatim (quotes are kept, ``;`` is not a comment), so values are never
quoted; inside a ``[databases]`` connection string, single quotes do quote. An unknown key is
fatal at start-up, so settings newer than the oldest release pgrelief supports are written
only for a ``version`` that has them (``SETTING_SINCE``).

Pure text building: no file is written here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_LISTEN_PORT",
    "DRAINS_ON_SIGTERM",
    "OLDEST_VERSION",
    "POOL_MODES",
    "RESERVED_PGBOUNCER_KEYS",
    "SETTING_NAME",
    "SETTING_SINCE",
    "TUNABLE_DEFAULTS",
    "IniAuth",
    "PoolMode",
    "Version",
    "database_keys",
    "format_version",
    "image_version",
    "is_ini_key",
    "parameter_problem",
    "parse_version",
    "pgbouncer_ini",
]

PoolMode = Literal["transaction", "session", "statement"]
POOL_MODES: tuple[str, ...] = get_args(PoolMode)

Version = tuple[int, int]
# Debian bookworm's PgBouncer: what the advice assumes and what the tests run.
OLDEST_VERSION: Version = (1, 18)
# The image the operator runs when a policy names none: CloudNativePG's PgBouncer build (Debian
# based, non-root uid 998, /bin/sh present), maintained and at least 1.23, the first release
# where SIGTERM waits for clients to finish (SHUTDOWN WAIT_FOR_CLIENTS).
DEFAULT_IMAGE = "ghcr.io/cloudnative-pg/pgbouncer:1.24.1"
DEFAULT_LISTEN_PORT = 6432
# The first release whose SIGTERM drains (SHUTDOWN WAIT_FOR_CLIENTS). Before it, SIGTERM is an
# immediate shutdown that cuts transactions in flight, and SIGINT the safe one (PAUSE, then
# exit once every server connection is released).
DRAINS_ON_SIGTERM: Version = (1, 23)

# Settings PgBouncer only knows from a release on; an older one refuses to start on them.
SETTING_SINCE: Mapping[str, Version] = {
    "auth_dbname": (1, 20),
    "track_extra_parameters": (1, 20),
    "max_prepared_statements": (1, 21),
    "max_user_client_connections": (1, 24),
    "max_db_client_connections": (1, 24),
}
# Prepared statements in transaction mode (1.21+): 200 is PgBouncer's own later default.
PREPARED_STATEMENTS = 200

# pgbouncer.ini keys pgrelief writes itself: letting a policy set them would break the
# Deployment pgrelief reconciles (listening address, auth wiring, files inside the container),
# contradict the dedicated spec fields, or lift the cap that keeps the pools inside the
# server's connection budget (max_db_connections).
RESERVED_PGBOUNCER_KEYS: frozenset[str] = frozenset(
    {
        "pool_mode",
        "max_client_conn",
        "default_pool_size",
        "reserve_pool_size",
        "max_db_connections",
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
        "server_tls_sslmode",
        "server_tls_ca_file",
    }
)

# Keys the renderer writes with a sensible default that a policy parameter may change
# (``server_idle_timeout: "600"``): the parameter's value takes the default's line.
TUNABLE_DEFAULTS: frozenset[str] = frozenset(
    {
        "reserve_pool_timeout",
        "server_idle_timeout",
        "server_lifetime",
        "log_connections",
        "log_disconnections",
        "ignore_startup_parameters",
        "max_prepared_statements",
    }
)

# Advice does not know where the server is reachable from the pooler: a placeholder to edit.
_ADVICE_HOST = "127.0.0.1"
SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# What cfparser accepts as a key ('*' is PgBouncer's fallback database, never written here).
_INI_KEY = re.compile(r"[0-9A-Za-z_.-]+")
_CONNSTR_BARE = re.compile(r"[0-9A-Za-z_.,:/@+-]+")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?")


def parse_version(text: str) -> Version:
    """``1.24`` or ``1.24.1`` (a leading ``v`` allowed) as ``(1, 24)``; ValueError otherwise."""
    found = _VERSION.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a PgBouncer version such as 1.24")
    return int(found.group(1)), int(found.group(2))


def format_version(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def image_version(image: str) -> Version | None:
    """The PgBouncer version an image's tag names (``...pgbouncer:1.24.1`` -> 1.24), if any."""
    reference = image.split("@", 1)[0]
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return None
    try:
        return parse_version(tag)
    except ValueError:
        return None


def is_ini_key(name: str) -> bool:
    """Whether PgBouncer can read ``name`` as a key (a database or user name) as it is."""
    return _INI_KEY.fullmatch(name) is not None


def parameter_problem(key: str, value: str, version: Version | None = None) -> str | None:
    """Why ``key = value`` may not go into the [pgbouncer] section, or None when it may.

    With ``version``, a setting newer than that PgBouncer release is refused too: PgBouncer
    stops at start-up on a key it does not know.
    """
    if not SETTING_NAME.match(key):
        return f"{key!r} is not a pgbouncer.ini setting name (lowercase letters, digits, _)"
    if key in RESERVED_PGBOUNCER_KEYS:
        return f"{key!r} is set by pgrelief and cannot be overridden; reserved keys: " + ", ".join(
            sorted(RESERVED_PGBOUNCER_KEYS)
        )
    if any(ch in value for ch in "\r\n\x00"):
        return f"value of {key!r} must be a single line"
    if value != value.strip():
        return f"value of {key!r} must not start or end with spaces (pgbouncer.ini trims them)"
    since = SETTING_SINCE.get(key)
    if version is not None and since is not None and version < since:
        return (
            f"{key!r} needs PgBouncer {format_version(since)} or later; the image runs "
            f"{format_version(version)}"
        )
    return None


def database_keys(databases: Sequence[str], taken: Sequence[str] = ()) -> dict[str, str]:
    """Database name -> the [databases] key clients connect to (the name itself if it can be).

    A name PgBouncer cannot read as a key (a space, a quote, non-ASCII) gets an alias with
    ``_`` for each such character, made unique among the keys and ``taken``; a name with a
    line break cannot be written at all and is left out.
    """
    keys: dict[str, str] = {}
    used = set(taken)
    for name in databases:
        if name in keys or any(ch in name for ch in "\r\n\x00"):
            continue
        alias = re.sub(r"[^0-9A-Za-z_.-]", "_", name) or "_"
        candidate, n = alias, 1
        while candidate in used:
            n += 1
            candidate = f"{alias}_{n}"
        used.add(candidate)
        keys[name] = candidate
    return keys


def _connstr_value(value: str) -> str:
    if _CONNSTR_BARE.fullmatch(value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _comment_text(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")


@dataclass(frozen=True, slots=True)
class IniAuth:
    """How clients authenticate: ``auth_type``, ``auth_file`` and, for a lookup role,
    ``auth_user`` + ``auth_query`` (``auth_dbname`` names the database it runs in, 1.20+)."""

    auth_type: str = "md5"
    auth_file: str = "/etc/pgbouncer/userlist.txt"
    auth_user: str | None = None
    auth_query: str | None = None
    auth_dbname: str | None = None


def pgbouncer_ini(
    *,
    pool_mode: str,
    default_pool_size: int,
    reserve_pool_size: int,
    max_client_conn: int,
    max_db_connections: int | None = None,
    databases: Sequence[str] = ("mydb",),
    session_pools: Mapping[str, int] | None = None,
    host: str = _ADVICE_HOST,
    port: int = 5432,
    notes: Sequence[str] = (),
    parameters: Mapping[str, str] | None = None,
    version: Version = OLDEST_VERSION,
    listen_addr: str = "0.0.0.0",
    listen_port: int = DEFAULT_LISTEN_PORT,
    unix_socket_dir: str | None = None,
    auth: IniAuth | None = None,
    users: Mapping[str, Mapping[str, int | str]] | None = None,
    server_tls_sslmode: str | None = None,
    server_tls_ca_file: str | None = None,
    ignore_startup_parameters: str | None = None,
) -> str:
    """A pgbouncer.ini in the domain reference's shape, sized and commented.

    ``session_pools`` maps a database to the pool size of an extra ``<db>_session`` entry in
    session mode, for the clients that need session features while the rest share
    ``pool_mode`` (per-database ``pool_mode`` overrides the global one).

    ``parameters`` are further [pgbouncer] settings (a policy's ``pgbouncer.parameters``): one
    naming a tunable default replaces that default's value on its line, any other is appended;
    one naming a reserved key, one newer than ``version``, or one that ``parameter_problem``
    refuses, is a ValueError. ``users`` is the [users] section (per-user settings such as
    ``max_user_connections``). ``unix_socket_dir=""`` turns the Unix socket off (a container
    with a read-only root file system has nowhere to put it).
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"unknown PgBouncer pool_mode {pool_mode!r}")
    extra = dict(parameters or {})
    for key, value in extra.items():
        problem = parameter_problem(key, value, version)
        if problem is not None:
            raise ValueError(problem)
    auth = auth or IniAuth()
    if auth.auth_dbname is not None and version < SETTING_SINCE["auth_dbname"]:
        raise ValueError(f"auth_dbname needs PgBouncer 1.20 or later, not {version}")
    for name in (*(users or {}), *([auth.auth_user] if auth.auth_user else [])):
        if not is_ini_key(name):
            raise ValueError(f"user name {name!r} cannot be a pgbouncer.ini key")
    lines = ["; PgBouncer config — /etc/pgbouncer/pgbouncer.ini (sized by pgrelief)"]
    lines.extend(f"; {_comment_text(note)}" for note in notes)
    lines.append("[databases]")
    if host == _ADVICE_HOST:
        lines.append("; point host= at your PostgreSQL server")
    target = f"host={_connstr_value(host)} port={port}"
    names = list(databases or ("mydb",))
    # Bare names first, so an alias never takes the key of a database named like it.
    bare = [name for name in names if is_ini_key(name)]
    keys = database_keys([*bare, *names])
    used = list(keys.values())
    for database in names:
        entry = keys.get(database)
        shown = _comment_text(repr(database))
        if entry is None:
            lines.append(f"; database {shown} has a line break: PgBouncer cannot serve it")
            continue
        if entry != database:
            lines.append(f"; database {shown} is served as {entry}")
        lines.append(f"{entry} = {target} dbname={_connstr_value(database)}")
    for database, size in (session_pools or {}).items():
        if any(ch in database for ch in "\r\n\x00"):
            continue
        wanted = f"{keys.get(database, database)}_session"
        session_key = database_keys([wanted], taken=used)[wanted]
        used.append(session_key)
        lines.append(
            f"{session_key} = {target} dbname={_connstr_value(database)} "
            f"pool_mode=session pool_size={max(size, 1)}"
        )
    if users:
        lines += ["", "[users]"]
        for user, user_settings in users.items():
            options = " ".join(f"{k}={_connstr_value(str(v))}" for k, v in user_settings.items())
            lines.append(f"{user} = {options}")
    pool_comment = (
        "Transaction pooling — connections returned after each transaction"
        if pool_mode == "transaction"
        else f"{pool_mode.capitalize()} pooling — see the notes above for why"
    )
    listen: list[tuple[str, object]] = [("listen_addr", listen_addr), ("listen_port", listen_port)]
    if unix_socket_dir is not None:
        listen.append(("unix_socket_dir", unix_socket_dir))
    access: list[tuple[str, object]] = [
        ("auth_type", auth.auth_type),
        ("auth_file", auth.auth_file),
    ]
    if auth.auth_user is not None:
        access.append(("auth_user", auth.auth_user))
    if auth.auth_query is not None:
        access.append(("auth_query", auth.auth_query))
    if auth.auth_dbname is not None:
        access.append(("auth_dbname", auth.auth_dbname))
    blocks: list[tuple[str | None, list[tuple[str, object]]]] = [(None, listen + access)]
    if server_tls_sslmode is not None:
        tls: list[tuple[str, object]] = [("server_tls_sslmode", server_tls_sslmode)]
        if server_tls_ca_file is not None:
            tls.append(("server_tls_ca_file", server_tls_ca_file))
        blocks.append(("TLS to PostgreSQL follows the policy's postgres.sslMode", tls))
    blocks += [
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
    if ignore_startup_parameters is not None:
        blocks.append(
            (
                "Startup parameters drivers send that PgBouncer would otherwise refuse",
                [("ignore_startup_parameters", ignore_startup_parameters)],
            )
        )
    if version >= SETTING_SINCE["max_prepared_statements"]:
        blocks.append(
            (
                "Protocol-level prepared statements work in transaction mode (PgBouncer 1.21+)",
                [("max_prepared_statements", PREPARED_STATEMENTS)],
            )
        )
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
        for setting, setting_value in settings:
            text = str(setting_value)
            if any(ch in text for ch in "\r\n\x00"):
                raise ValueError(f"value of {setting!r} must be a single line")
            lines.append(f"{setting} = {text}".rstrip())
    return "\n".join(lines)
