"""The generated PgBouncer against direct connections and the domain reference's config.

One embedded PostgreSQL with max_connections 100, initialised for pgbench; three ways in:

- direct: pgbench straight to the server;
- generated: the ConfigMap + Deployment pgrelief builds (sized from the server's budget),
  run as the pod runs it (``LocalPgBouncer.from_pod``: its start script, auth_query through a
  lookup role, a container's 1024 soft open-files limit that the script raises);
- seed: the example pgbouncer.ini from the domain reference (md5 + userlist), pointed at the
  same server, with this machine's open-files limit (under 1024 it cannot serve 1,900 clients at
  all: tests/test_pgbouncer_pods.py shows it).

Two measurements, in the same run so they share the machine's state:

1. throughput: ``pgbench -S`` (select only) with 50 clients for ``--seconds`` each, the three
   ways interleaved ``--trials`` times; tps median and the ratio to direct (the reference's
   config measured 0.68 of direct on these machines);
2. 1,900 clients, ``pgbench -S -t 5`` each: clients that failed (never connected or aborted) and
   the peak number of server backends the pooled roles held, sampled every 10 ms.

Run: ``python bench/pgbouncer_bench.py [--trials 5] [--seconds 10] [--clients 1900]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass

from pgrelief import act
from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief._dev.pgbench import PgbenchDatabase, PgbenchRun
from pgrelief._dev.pgbouncer import LocalPgBouncer, pgbouncer_version
from pgrelief.manifests.common import Owner
from pgrelief.manifests.pgbouncer import PgBouncerObjects, desired_pgbouncer
from pgrelief.manifests.pgbouncer_config import ServerInputs
from pgrelief.observe import connect, take_snapshot
from pgrelief.pgbouncer_auth import install_statements
from pgrelief.pgbouncer_ini import format_version
from pgrelief.policy import validate_spec

SECRET = ("pgbouncer-auth", "password")
SEED_INI = """\
[databases]
appdb = host=127.0.0.1 port={port} dbname=appdb

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6432
auth_type = md5
auth_file = /etc/pgbouncer/userlist.txt
pool_mode = transaction
default_pool_size = 25
reserve_pool_size = 5
reserve_pool_timeout = 3
max_client_conn = 2000
server_idle_timeout = 300
server_lifetime = 3600
log_connections = 1
log_disconnections = 1
"""


@dataclass
class Crowd:
    name: str
    run: PgbenchRun
    peak_backends: int

    @property
    def failed_clients(self) -> int:
        if self.run.completed:
            return 0
        # pgbench stops at the first client it cannot connect; the ones it had connected got
        # no transaction done either, so the run's clients all count as failed.
        return self.run.clients


def wait_for_no_backends(db: PgbenchDatabase) -> None:
    """Until the roles' backends of the previous run have exited (exit is asynchronous)."""
    with db.pg.connect() as conn:
        for _ in range(1000):
            row = conn.execute(
                "select count(*) from pg_stat_activity where usename = any(%s)",
                ([db.app_role, db.auth_role],),
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.01)


def generated(db: PgbenchDatabase, clients_per_pod: int) -> PgBouncerObjects:
    spec = validate_spec(
        {
            "postgres": {"host": "127.0.0.1", "port": db.pg.port},
            "pgbouncer": {
                "enabled": True,
                "replicas": 1,
                "version": format_version(pgbouncer_version()),
                "maxClientConn": max(clients_per_pod + 100, 2000),
                # The benchmark's direct runs need 50 slots next to the pool.
                "directConnections": 50,
                "databases": [db.database],
                "users": [db.app_role],
                "auth": {
                    "authQuery": {
                        "user": db.auth_role,
                        "passwordSecret": {"name": SECRET[0], "key": SECRET[1]},
                    }
                },
            },
        }
    )
    with connect(db.pg.dsn()) as conn:
        inputs = ServerInputs.from_snapshot(take_snapshot(conn), lifeline_pid=conn.info.backend_pid)
    objects = desired_pgbouncer(Owner("bench", "bench", "bench-uid"), spec, inputs)
    if not isinstance(objects, PgBouncerObjects):
        raise SystemExit(f"the generated config was refused: {objects}")
    query = spec.pgbouncer.auth.auth_query
    assert query is not None
    with db.pg.connect(dbname=db.database) as conn:
        for statement in install_statements(query):
            conn.execute(act.composed(statement))
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1900)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    with EmbeddedPostgres(max_connections=100, superuser_reserved_connections=3) as pg:
        db = PgbenchDatabase(pg).prepare(scale=10)
        objects = generated(db, args.clients)
        budget = objects.budget
        userlist = f'"{db.app_role}" "{db.app_password}"\n'
        seed_ini = SEED_INI.format(port=pg.port)
        print(f"server: max_connections 100, usable slots {budget.request.usable_slots}")
        print("generated pool: " + "; ".join(budget.reasoning[1:5]))

        def pooler(name: str) -> LocalPgBouncer | None:
            """A fresh pooler per run: a stopped one closes its server connections, so every
            run starts from an empty server (the pools of 56 + 30 and 50 direct clients would
            not fit 97 slots together)."""
            if name == "generated":
                return LocalPgBouncer.from_pod(
                    objects.config_map,
                    objects.deployment,
                    secrets={SECRET: db.auth_password},
                    nofile=(1024, hard),
                )
            if name == "seed":
                return LocalPgBouncer.plain(seed_ini, files={"userlist.txt": userlist})
            return None

        def measured(
            name: str, arguments: list[str], clients: int, *, warm_up: bool = False
        ) -> Crowd:
            wait_for_no_backends(db)
            pod = pooler(name)
            if pod is not None:
                pod.start()
            port = pg.port if pod is None else pod.port
            try:
                if warm_up:  # the pooler's server connections open outside the measurement
                    db.pgbench(["-n", "-S", "-c", str(clients), "-j", "2", "-T", "1"], port=port)
                with db.sampler() as sampler:
                    run = db.pgbench(
                        arguments,
                        port=pg.port if pod is None else pod.port,
                        clients=clients,
                        timeout=180,
                    )
            finally:
                if pod is not None:
                    pod.stop()
            return Crowd(name, run, sampler.peak)

        paths = ("direct", "generated", "seed")
        tps: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.trials):
            for name in paths:
                crowd = measured(
                    name, ["-n", "-S", "-c", "50", "-j", "2", "-T", str(args.seconds)], 50
                )
                if crowd.run.tps is None:
                    raise SystemExit(f"{name}: pgbench failed: {crowd.run.stderr[-500:]}")
                tps[name].append(crowd.run.tps)
        direct = statistics.median(tps["direct"])
        print(f"\n50 clients, pgbench -S, {args.trials} × {args.seconds}s each, interleaved")
        print(f"{'path':<10} {'median tps':>11} {'vs direct':>10}   trials")
        for name, values in tps.items():
            median = statistics.median(values)
            shown = ", ".join(f"{v:.0f}" for v in values)
            print(f"{name:<10} {median:>11.0f} {median / direct:>10.2f}   {shown}")

        crowd_args = ["-n", "-S", "-c", str(args.clients), "-j", "2", "-t", "5"]
        crowds = [measured(name, crowd_args, args.clients) for name in paths]
        print(f"\n{args.clients} clients, pgbench -S -t 5 each")
        print(f"{'path':<10} {'failed clients':>15} {'peak backends':>14}  outcome")
        for crowd in crowds:
            run = crowd.run
            if run.completed:
                outcome = f"{run.processed} transactions, {run.seconds:.1f}s"
            elif run.returncode is None:
                outcome = "hung (killed at the timeout)"
            else:
                outcome = run.error() or f"exit {run.returncode}"
            print(
                f"{crowd.name:<10} {crowd.failed_clients:>15} {crowd.peak_backends:>14}  {outcome}"
            )
        print(
            f"\ngenerated pool limit: {budget.server_connections} server connections "
            f"(budget {budget.budget})"
        )


if __name__ == "__main__":
    main()
