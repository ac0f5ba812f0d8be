"""What goes inside the PgBouncer pod: its pgbouncer.ini and the script that starts it.

The ini is rendered by the one renderer (``pgbouncer_ini``) from the policy and the pool sizes
the budget allowed (``pool_budget``): ``[databases]`` points at ``spec.postgres``, TLS to the
server follows ``postgres.sslMode``, the Unix socket is off (the root file system is
read-only), and only settings the image's PgBouncer release knows are written.

The container runs a short ``sh`` script rather than PgBouncer directly, for two things a pod
spec cannot say: raising the open-files soft limit to what the ini needs (PgBouncer does not
raise it itself; with a 1024 soft limit and max_client_conn 2000 it logs ``accept() failed: Too
many open files`` and clients hang), and writing the lookup role's userlist line from the
Secret into a memory volume. It ends in ``exec pgbouncer`` so PgBouncer is PID 1 and receives
SIGTERM itself (1.23+: SHUTDOWN WAIT_FOR_CLIENTS). An older PgBouncer takes SIGTERM as an
immediate shutdown, which cuts the transactions of clients that hold a connection while the
pods roll; for it the shell stays PID 1 and turns the kubelet's SIGTERM into SIGINT, the safe
shutdown (transactions in flight finish, then PgBouncer exits).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from pgrelief.pgbouncer_auth import auth_databases, auth_query_text
from pgrelief.pgbouncer_ini import (
    DEFAULT_LISTEN_PORT,
    DRAINS_ON_SIGTERM,
    SETTING_SINCE,
    IniAuth,
    Version,
    format_version,
    pgbouncer_ini,
)
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.pool_budget import PoolBudget, PoolRequest, connection_limits
from pgrelief.snapshot import Snapshot

INI_KEY = "pgbouncer.ini"
CONFIG_DIR = "/etc/pgbouncer"  # the projected volume: ConfigMap + Secrets, read-only
RUN_DIR = "/var/run/pgbouncer"  # a memory emptyDir: the generated userlist
USERLIST_FILE = "userlist.txt"
SERVER_CA_FILE = "server-ca.crt"
AUTH_USER_ENV = "PGRELIEF_AUTH_USER"
AUTH_PASSWORD_ENV = "PGRELIEF_AUTH_PASSWORD"
# Drivers send it at start-up (JDBC) and PgBouncer refuses unknown startup parameters.
IGNORE_STARTUP_PARAMETERS = "extra_float_digits"


@dataclass(frozen=True, slots=True)
class ServerInputs:
    """What the server allows, from one observation (``from_snapshot``)."""

    usable_slots: int
    superuser_sessions: int = 0
    role_limits: Mapping[str, int] = field(default_factory=dict)
    database_limits: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, lifeline_pid: int | None = None) -> ServerInputs:
        """Usable slots, superuser client sessions (pgrelief's own lifeline, ``lifeline_pid``
        or the snapshot's ``own_pid``, counted once, as the lifeline) and the roles' and
        databases' CONNECTION LIMITs."""
        own = snapshot.own_pid if lifeline_pid is None else lifeline_pid
        superusers = sum(
            1 for s in snapshot.sessions if s.is_client and s.is_superuser is True and s.pid != own
        )
        return cls(
            usable_slots=snapshot.server.usable_slots,
            superuser_sessions=superusers,
            role_limits={name: r.connection_limit for name, r in snapshot.roles.items()},
            database_limits={name: d.connection_limit for name, d in snapshot.databases.items()},
        )


def pool_request(
    spec: ConnectionPolicySpec,
    server: ServerInputs,
    version: Version,
    *,
    previous_default_pool_size: int | None = None,
) -> PoolRequest:
    """The budget question a policy asks of a server (``pool_budget.fit_pools`` answers it)."""
    pgbouncer = spec.pgbouncer
    declared_roles = {
        role.name: role.connection_limit
        for role in spec.limits.roles
        if role.connection_limit is not None
    }
    declared_databases = {db.name: db.connection_limit for db in spec.limits.databases}
    query = pgbouncer.auth.auth_query
    return PoolRequest(
        usable_slots=max(server.usable_slots, 0),
        replicas=pgbouncer.replicas,
        databases=tuple(pgbouncer.databases),
        users=tuple(pgbouncer.users),
        default_pool_size=pgbouncer.default_pool_size,
        reserve_pool_size=pgbouncer.reserve_pool_size,
        max_client_conn=pgbouncer.max_client_conn,
        superuser_sessions=server.superuser_sessions,
        direct_connections=pgbouncer.direct_connections,
        role_limits=connection_limits(server.role_limits, declared_roles),
        database_limits=connection_limits(server.database_limits, declared_databases),
        auth_user=None if query is None else query.user,
        auth_connections=len(auth_databases(pgbouncer, version)) if query else None,
        previous_default_pool_size=previous_default_pool_size,
    )


def render_ini(spec: ConnectionPolicySpec, budget: PoolBudget, version: Version) -> str:
    """The ConfigMap's pgbouncer.ini for ``spec`` sized by ``budget`` (ValueError if it cannot
    be written for this PgBouncer ``version``)."""
    pgbouncer = spec.pgbouncer
    if spec.postgres.host is None:
        raise ValueError("postgres.host is required to point PgBouncer at the server")
    query = pgbouncer.auth.auth_query
    if query is not None:
        databases = auth_databases(pgbouncer, version)
        auth = IniAuth(
            auth_type=pgbouncer.auth.type,
            auth_file=f"{RUN_DIR}/{USERLIST_FILE}",
            auth_user=query.user,
            auth_query=auth_query_text(query),
            auth_dbname=databases[0] if version >= SETTING_SINCE["auth_dbname"] else None,
        )
        # One lookup connection per database it runs in, per pod; counted in the budget.
        users: dict[str, dict[str, int | str]] = {
            query.user: {"max_user_connections": len(databases)}
        }
    else:
        auth = IniAuth(auth_type=pgbouncer.auth.type, auth_file=f"{CONFIG_DIR}/{USERLIST_FILE}")
        users = {}
    return pgbouncer_ini(
        pool_mode=pgbouncer.pool_mode,
        default_pool_size=budget.default_pool_size,
        reserve_pool_size=budget.reserve_pool_size,
        max_client_conn=pgbouncer.max_client_conn,
        max_db_connections=budget.max_db_connections,
        databases=pgbouncer.databases,
        host=spec.postgres.host,
        port=spec.postgres.port,
        notes=(f"PgBouncer {format_version(version)}", *budget.config_notes),
        parameters=pgbouncer.parameters,
        version=version,
        listen_addr="*",
        listen_port=DEFAULT_LISTEN_PORT,
        unix_socket_dir="",
        auth=auth,
        users=users,
        server_tls_sslmode=spec.postgres.ssl_mode,
        server_tls_ca_file=(
            f"{CONFIG_DIR}/{SERVER_CA_FILE}" if pgbouncer.server_tls_ca_secret else None
        ),
        ignore_startup_parameters=IGNORE_STARTUP_PARAMETERS,
    )


def start_script(budget: PoolBudget, *, auth_query: bool, version: Version) -> str:
    """The container's ``sh -c`` program: open-files limit, lookup userlist, then PgBouncer
    (``exec``, or as the shell's child that gets SIGINT for SIGTERM before ``DRAINS_ON_SIGTERM``).

    The soft limit is raised to what the config needs; a lower hard limit cannot be raised
    from inside the pod, so the script stops with the reason instead of letting PgBouncer
    start and leave clients hanging once the descriptors run out.
    """
    need = budget.open_files
    server = budget.open_files - budget.request.max_client_conn
    reason = (
        f"pgrelief: this pgbouncer.ini needs {need} open files (max_client_conn "
        f"{budget.request.max_client_conn} + {server} for server connections and spare) but "
        "the container's hard limit is $hard: lower spec.pgbouncer.maxClientConn or raise the "
        "container runtime's RLIMIT_NOFILE"
    )
    lines = [
        "set -eu",
        f"need={need}",
        'hard="$(ulimit -H -n)"',
        'if [ "$hard" != unlimited ] && [ "$hard" -lt "$need" ]; then',
        f'  echo "{reason}" >&2',
        "  exit 1",
        "fi",
        'soft="$(ulimit -S -n)"',
        'if [ "$soft" != unlimited ] && [ "$soft" -lt "$need" ]; then ulimit -S -n "$need"; fi',
    ]
    if auth_query:
        # userlist.txt doubles a double quote inside a quoted field.
        lines += [
            "umask 077",
            'q() { printf \'%s\' "$1" | sed \'s/"/""/g\'; }',
            f'printf \'"%s" "%s"\\n\' "$(q "${AUTH_USER_ENV}")" "$(q "${AUTH_PASSWORD_ENV}")" '
            f"> {RUN_DIR}/{USERLIST_FILE}",
        ]
    run = f"pgbouncer {shlex.quote(CONFIG_DIR + '/' + INI_KEY)}"
    if version >= DRAINS_ON_SIGTERM:
        lines.append(f"exec {run}")
    else:
        # `wait` returns early when a trapped signal arrives: wait again until PgBouncer is gone.
        lines += [
            f"{run} &",
            "pid=$!",
            "trap 'kill -INT \"$pid\"' INT TERM",
            "status=0",
            'while kill -0 "$pid" 2>/dev/null; do wait "$pid" && status=0 || status=$?; done',
            'exit "$status"',
        ]
    return "\n".join(lines) + "\n"
