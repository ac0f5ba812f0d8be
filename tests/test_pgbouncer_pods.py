"""The PgBouncer pgrelief builds, run for real: Debian's pgbouncer in front of a real server.

Every test takes the ConfigMap and Deployment the builders return and runs that pod's own
command (its start script) with its volumes and environment (``LocalPgBouncer.from_pod``); only
the listening address and port differ (loopback, a free port). The server has max_connections
100: 1,900 clients could never connect to it directly.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgrelief import act
from pgrelief._dev.pgbouncer import LocalPgBouncer, PgBouncerError, pgbouncer_version
from pgrelief.manifests.common import Owner
from pgrelief.manifests.pgbouncer import NotApplied, PgBouncerObjects, desired_pgbouncer
from pgrelief.manifests.pgbouncer_config import ServerInputs
from pgrelief.observe import connect, pgbouncer_auth_check, take_snapshot
from pgrelief.pgbouncer_auth import (
    AUTH_FUNCTION_MISSING,
    auth_condition,
    install_sql,
    install_statements,
)
from pgrelief.pgbouncer_ini import format_version, pgbouncer_ini
from pgrelief.policy import AuthQuerySpec, ConnectionPolicySpec, validate_spec
from pgrelief.pooler_console import console_conninfo, open_console, read_console
from tests.fixtures.pgbouncer import AUTH_SECRET, PooledServer

pytestmark = pytest.mark.pgbouncer

CLIENTS = 1900
# Leaves the pools 97 usable - 1 lifeline - superusers - 60 = about 35 server connections.
DIRECT_CONNECTIONS = 60
OWNER = Owner(name="orders", namespace="prod", uid="3f1c2d8e-0000-4000-8000-000000000001")
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

# The domain reference's example (../shared/seed/too-many-connections-troubleshooter.txt),
# verbatim; ``seed_ini`` points its one database line at this test's server.
SEED_INI = """\
; PgBouncer config — /etc/pgbouncer/pgbouncer.ini
[databases]
mydb = host=127.0.0.1 port=5432 dbname=mydb

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6432
auth_type = md5
auth_file = /etc/pgbouncer/userlist.txt

; Transaction pooling — connections returned after each transaction
pool_mode = transaction

; Max connections PgBouncer opens to PostgreSQL (per database/user pair)
default_pool_size = 25

; Extra connections allowed during traffic spikes
reserve_pool_size = 5
reserve_pool_timeout = 3

; Max client connections PgBouncer accepts
max_client_conn = 2000

; Close server connections that have been idle this long
server_idle_timeout = 300

; Force-close server connections after this lifetime
server_lifetime = 3600

; Log connections/disconnections for leak debugging
log_connections = 1
log_disconnections = 1
"""

StartPod = Callable[..., LocalPgBouncer]


def _spec(
    pooled: PooledServer, *, ssl_mode: str = "prefer", **pgbouncer: Any
) -> ConnectionPolicySpec:
    section: dict[str, Any] = {
        "enabled": True,
        "replicas": 1,
        "version": format_version(pgbouncer_version()),
        "databases": [pooled.database],
        "users": [pooled.app_role],
        "directConnections": DIRECT_CONNECTIONS,
        "auth": {
            "authQuery": {
                "user": pooled.auth_role,
                "passwordSecret": {"name": AUTH_SECRET[0], "key": AUTH_SECRET[1]},
            }
        },
    }
    section.update(pgbouncer)
    return validate_spec(
        {
            "postgres": {"host": "127.0.0.1", "port": pooled.pg.port, "sslMode": ssl_mode},
            "pgbouncer": section,
        }
    )


def _server_inputs(pooled: PooledServer) -> ServerInputs:
    """From a real snapshot, our own connection playing pgrelief's lifeline."""
    with connect(pooled.pg.dsn()) as conn:
        snapshot = take_snapshot(conn)
        return ServerInputs.from_snapshot(snapshot, lifeline_pid=conn.info.backend_pid)


def _objects(pooled: PooledServer, spec: ConnectionPolicySpec) -> PgBouncerObjects:
    result = desired_pgbouncer(OWNER, spec, _server_inputs(pooled))
    assert isinstance(result, PgBouncerObjects), result
    return result


def _query(spec: ConnectionPolicySpec) -> AuthQuerySpec:
    query = spec.pgbouncer.auth.auth_query
    assert query is not None
    return query


@pytest.fixture
def auth_function(pooled_server: PooledServer) -> PooledServer:
    """The lookup function installed from the statements pgrelief reports (idempotent)."""
    query = _query(_spec(pooled_server))
    with pooled_server.pg.connect(dbname=pooled_server.database) as conn:
        for statement in install_statements(query):
            conn.execute(act.composed(statement))
    return pooled_server


def _login(port: int, password: str, *, user: str = "app", dbname: str = "appdb") -> str:
    with psycopg.connect(
        host="127.0.0.1", port=port, user=user, password=password, dbname=dbname, connect_timeout=10
    ) as conn:
        row = conn.execute("select current_user").fetchone()
        assert row is not None
        return str(row[0])


def test_a_stopped_pod_leaves_no_pgbouncer_behind_while_a_client_holds_a_transaction(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    """The 1.18 pod's command is a shell with pgbouncer as its child, and its safe shutdown
    waits for open transactions: a stop that killed the shell alone left pgbouncer running
    for as long as a client held on (full-suite runs left a dozen behind)."""
    pooled = auth_function
    objects = _objects(pooled, _spec(pooled))
    pod = pgbouncer_pod(objects.config_map, objects.deployment, secrets=pooled.secrets())
    group = pod.process_group
    client = psycopg.connect(
        host="127.0.0.1", port=pod.port, user="app", password=pooled.app_password,
        dbname=pooled.database, connect_timeout=10,
    )  # fmt: skip
    try:
        client.execute("select 1")  # the transaction stays open: the safe shutdown waits
        pod.stop()
        deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
        while _alive_in_group(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive_in_group(group) == []  # nothing of the pod is left running
    finally:
        client.close()


def _alive_in_group(group: int) -> list[str]:
    """The processes of a process group that still run (zombies awaiting their reaper aside)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append(stat.parent.name)
    return alive


# --- 1,900 clients ----------------------------------------------------------------------------


def test_1900_clients_in_transaction_mode_all_succeed_within_the_computed_pool(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    pooled = auth_function
    objects = _objects(pooled, _spec(pooled))
    budget = objects.budget
    assert budget.fits and budget.request.default_pool_size is None  # computed from the budget
    # The container runtime's usual limits: soft 1024, a higher hard limit the script may use.
    pod = pgbouncer_pod(
        objects.config_map, objects.deployment, secrets=pooled.secrets(), nofile=(1024, HARD_NOFILE)
    )
    console = console_conninfo("127.0.0.1", pod.port, pooled.auth_role, pooled.auth_password)
    with pooled.sampler() as sampler, PoolerServers(console) as pooler:
        run = pooled.pgbench(
            ["-n", "-c", str(CLIENTS), "-j", "2", "-S", "-t", "5"], port=pod.port, clients=CLIENTS
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"number of clients: {CLIENTS}" in run.stdout
    assert f"number of transactions actually processed: {CLIENTS * 5}/{CLIENTS * 5}" in run.stdout
    assert "number of failed transactions: 0 (0.000%)" in run.stdout
    log = pod.log()
    assert f"kernel file descriptor limit: {budget.open_files} (hard: {HARD_NOFILE})" in log
    assert "Too many open files" not in log
    # PgBouncer never opened more server connections than the computed pool, and the pool was
    # really used. PostgreSQL's own count stays within the slots left for the pooler: it may
    # show one more for a moment (one full-suite run saw 37 for a pool of 36), a server login
    # PgBouncer gave up on under load or a backend still exiting after PgBouncer closed it.
    print(f"peak server connections: PgBouncer {pooler.peak}, PostgreSQL {sampler.peak}")
    assert sampler.samples > 10 and pooler.samples > 10
    assert 0 < pooler.peak <= budget.server_connections <= budget.budget
    assert 0 < sampler.peak <= budget.budget


def test_the_seed_ini_runs_out_of_descriptors_under_a_1024_limit(
    pooled_server: PooledServer,
) -> None:
    pooled = pooled_server
    ini = SEED_INI.replace(
        "mydb = host=127.0.0.1 port=5432 dbname=mydb",
        f"appdb = host=127.0.0.1 port={pooled.pg.port} dbname=appdb",
    )
    userlist = f'"{pooled.app_role}" "{pooled.app_password}"\n'
    with LocalPgBouncer.plain(ini, files={"userlist.txt": userlist}, nofile=(1024, 1024)) as pod:
        run = pooled.pgbench(
            ["-n", "-c", str(CLIENTS), "-j", "2", "-S", "-t", "5"],
            port=pod.port,
            clients=CLIENTS,
            timeout=25,
        )
        finished = run.completed  # a hang (returncode None) is what the seed's users see
        log = pod.log()
    assert not finished
    assert "accept() failed: Too many open files" in log
    assert "kernel file descriptor limit: 1024 (hard: 1024); max_client_conn: 2000" in log


def test_the_generated_pod_refuses_to_start_when_the_hard_limit_is_too_low(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    objects = _objects(auth_function, _spec(auth_function))
    pod = pgbouncer_pod(
        objects.config_map,
        objects.deployment,
        secrets=auth_function.secrets(),
        nofile=(1024, 1024),
        wait=False,
    )
    assert pod.wait_exit(30) == 1
    log = pod.log().strip()
    assert log == (
        f"pgrelief: this pgbouncer.ini needs {objects.budget.open_files} open files "
        f"(max_client_conn 2000 + {objects.budget.open_files - 2000} for server connections and "
        "spare) but the container's hard limit is 1024: lower spec.pgbouncer.maxClientConn or "
        "raise the container runtime's RLIMIT_NOFILE"
    )


def test_a_transaction_in_flight_when_the_pod_is_stopped_commits(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    """The kubelet stops a pod with SIGTERM, which PgBouncer before 1.23 (Debian's 1.18 here)
    takes as an immediate shutdown: rolling the pods cut the transactions of clients holding
    a connection (seen on the e2e cluster). The start script turns it into the safe shutdown."""
    pooled = auth_function
    objects = _objects(pooled, _spec(pooled))
    pod = pgbouncer_pod(objects.config_map, objects.deployment, secrets=pooled.secrets())
    with psycopg.connect(
        host="127.0.0.1",
        port=pod.port,
        user=pooled.app_role,
        password=pooled.app_password,
        dbname=pooled.database,
        connect_timeout=10,
    ) as conn:
        conn.execute("select 1")  # BEGIN (psycopg's implicit transaction): a server is held
        pod.terminate()
        time.sleep(0.5)  # PgBouncer has acted on the signal
        row = conn.execute("select pg_sleep(0.2), 6 * 7").fetchone()
        conn.commit()
        assert row is not None and row[1] == 42
    assert pod.wait_exit(10) == 0  # and once no server connection is in use, it exits
    assert "got SIGINT, shutting down" in pod.log()


# --- auth ---------------------------------------------------------------------------------------


def test_a_missing_lookup_function_is_a_condition_whose_sql_installs_it(
    pooled_server: PooledServer, pgbouncer_pod: StartPod
) -> None:
    pooled = pooled_server
    spec = _spec(pooled)
    query = _query(spec)
    with pooled.pg.connect(dbname=pooled.database) as conn:
        conn.execute("drop schema if exists pgbouncer cascade")
        check = pgbouncer_auth_check(conn, query)
        assert check.database == pooled.database
        assert not check.ready
        assert check.problems(query) == ["function pgbouncer.get_auth(text) does not exist"]
        condition = auth_condition([check], query)
        assert condition is not None
        assert (condition.type, condition.status, condition.reason) == (
            "PgBouncerReady",
            "False",
            AUTH_FUNCTION_MISSING,
        )
        sql = install_sql(query)
        assert sql in (condition.message or "")
        assert "lookup" not in sql  # the lookup role's password is never in it
        # The DBA pastes the text as it is shown.
        psql = subprocess.run(
            [str(pooled.pg.tool("psql")), "-X", "-v", "ON_ERROR_STOP=1", "-d", pooled.database],
            input=sql,
            capture_output=True,
            text=True,
            env={**pooled.pg.libpq_env(), "PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert psql.returncode == 0, psql.stderr
        check = pgbouncer_auth_check(conn, query)
        assert check.ready, check
        assert auth_condition([check], query) is None
    objects = _objects(pooled, spec)
    pod = pgbouncer_pod(objects.config_map, objects.deployment, secrets=pooled.secrets())
    assert _login(pod.port, pooled.app_password) == pooled.app_role
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        _login(pod.port, "wrong password")


def test_the_lookup_function_never_returns_a_superuser(auth_function: PooledServer) -> None:
    with auth_function.pg.connect(dbname=auth_function.database) as conn:
        rows = conn.execute("select usename from pgbouncer.get_auth('postgres')").fetchall()
        assert rows == []
        rows = conn.execute("select usename from pgbouncer.get_auth('app')").fetchall()
        assert rows == [("app",)]


def test_a_userlist_from_a_secret_authenticates(
    pooled_server: PooledServer, pgbouncer_pod: StartPod
) -> None:
    pooled = pooled_server
    spec = _spec(pooled, auth={"userlistSecret": {"name": "pooler-users", "key": "userlist"}})
    objects = _objects(pooled, spec)
    userlist = f'"{pooled.app_role}" "{pooled.app_password}"\n'
    pod = pgbouncer_pod(
        objects.config_map,
        objects.deployment,
        secrets={("pooler-users", "userlist"): userlist},
    )
    assert _login(pod.port, pooled.app_password) == pooled.app_role
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        _login(pod.port, "wrong password")


def test_server_tls_follows_the_policys_ssl_mode(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    # The test server has no TLS: prefer falls back to plain, require must not.
    pooled = auth_function
    lenient = _objects(pooled, _spec(pooled, ssl_mode="prefer"))
    pod = pgbouncer_pod(lenient.config_map, lenient.deployment, secrets=pooled.secrets())
    assert _login(pod.port, pooled.app_password) == pooled.app_role
    strict = _objects(pooled, _spec(pooled, ssl_mode="require"))
    assert "server_tls_sslmode = require" in strict.config_map["data"]["pgbouncer.ini"]
    pod = pgbouncer_pod(strict.config_map, strict.deployment, secrets=pooled.secrets())
    with pytest.raises(psycopg.OperationalError):
        _login(pod.port, pooled.app_password)
    assert "server refused SSL" in pod.log() or "SSL" in pod.log()


# --- what PgBouncer can read ----------------------------------------------------------------


def test_settings_of_newer_releases_stop_pgbouncer_1_18_and_are_gated(
    auth_function: PooledServer, pgbouncer_pod: StartPod
) -> None:
    pooled = auth_function
    local = _objects(pooled, _spec(pooled))
    assert "max_prepared_statements" not in local.config_map["data"]["pgbouncer.ini"]
    pgbouncer_pod(local.config_map, local.deployment, secrets=pooled.secrets())
    newer = _objects(pooled, _spec(pooled, version="1.24"))
    assert "max_prepared_statements = 200" in newer.config_map["data"]["pgbouncer.ini"]
    pod = pgbouncer_pod(newer.config_map, newer.deployment, secrets=pooled.secrets(), wait=False)
    assert pod.wait_exit(30) != 0
    assert "unknown parameter: pgbouncer/" in pod.log()


def test_database_names_that_are_not_ini_keys_load(pooled_server: PooledServer) -> None:
    ini = pgbouncer_ini(
        pool_mode="transaction",
        default_pool_size=5,
        reserve_pool_size=1,
        max_client_conn=100,
        databases=["appdb", "Prod DB", "it's"],
        session_pools={"Prod DB": 2},
        port=pooled_server.pg.port,
    )
    assert "Prod_DB = " in ini and "it_s = " in ini
    userlist = f'"{pooled_server.app_role}" "{pooled_server.app_password}"\n'
    with LocalPgBouncer.plain(ini, files={"userlist.txt": userlist}) as pod:
        assert _login(pod.port, pooled_server.app_password) == pooled_server.app_role
    # What the renderer used to write: PgBouncer's parser stops at a quoted key.
    quoted = ini.replace("Prod_DB = ", '"Prod DB" = ', 1)
    pod = LocalPgBouncer.plain(quoted, files={"userlist.txt": userlist})
    with pytest.raises(PgBouncerError, match="syntax error in configuration"):
        pod.start()


def test_an_oversubscribed_spec_builds_nothing(pooled_server: PooledServer) -> None:
    spec = _spec(pooled_server, defaultPoolSize=40)  # 45 per pool > the ~35 left
    result = desired_pgbouncer(OWNER, spec, _server_inputs(pooled_server))
    assert isinstance(result, NotApplied)
    assert result.reason == "PoolOversubscribed"
    assert result.budget is not None and result.budget.over_by > 0
    assert f"{result.budget.over_by} too many" in result.message
    assert f"defaultPoolSize {result.budget.fitting_default_pool_size} or less" in result.message


@pytest.fixture(autouse=True)
def _no_leftover_backends(pooled_server: PooledServer) -> Iterator[None]:
    """Each test starts with the pooled roles' server connections gone."""
    yield
    with pooled_server.pg.connect() as conn:
        for _ in range(500):
            row = conn.execute(
                "select count(*) from pg_stat_activity where usename = any(%s)",
                ([pooled_server.app_role, pooled_server.auth_role],),
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.02)


class PoolerServers:
    """The most server connections PgBouncer held at once (SHOW SERVERS on its admin console,
    as the stats user the generated config names), sampled while a load runs."""

    def __init__(self, conninfo: str, every: float = 0.01) -> None:
        self.conninfo = conninfo
        self.every = every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pooler-sampler", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            with open_console(self.conninfo) as conn:
                while not self._stop.is_set():
                    _, servers, _ = read_console(conn)
                    self.peak = max(self.peak, len(servers))
                    self.samples += 1
                    time.sleep(self.every)
        except BaseException as failure:  # reported by __exit__, never lost in the thread
            self._error = failure

    def __enter__(self) -> PoolerServers:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._error is not None:
            raise self._error
