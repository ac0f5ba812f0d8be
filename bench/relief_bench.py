"""Time-to-relief: how long a full server keeps refusing clients, per remediation mechanism.

Scenario (the same for every mechanism, on one embedded PostgreSQL): a leaky application
burst-opens idle-in-transaction sessions until every usable slot is taken and a new client
gets ``FATAL: sorry, too many clients already``; a probe client then retries every 10 ms.
Every mechanism uses the same staleness threshold (``THRESHOLD_S``), so none can act before
the oldest leaked session is that old. We report:

- relief latency: from the moment the oldest leaked session crossed the threshold to the
  probe's first successful connection (what the mechanism itself costs);
- outage: from the first refusal to the probe's first success.

Mechanisms: ``pgrelief run`` at 1 s and 250 ms intervals (the real Runner, in a thread, with
its persistent connection), the seed's kill query run by cron every 60 s (simulated with a
random phase: cron does not start when the incident does), and PostgreSQL's own
``idle_in_transaction_session_timeout``. Also: the wall and server time of one pgrelief cycle
with 300+ backends.

Run: ``python bench/relief_bench.py [--trials N] [--cron-trials N]``; it prints a table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.audit import AuditLog
from pgrelief.connection import ManagedConnection
from pgrelief.observe import SETTINGS, SNAPSHOT_QUERY
from pgrelief.policy_file import parse_policy
from pgrelief.runner import Runner
from pgrelief.state_file import StateStore

THRESHOLD_S = 2.0
LEAK_ROLE = "leaky_app"
PROBE_EVERY_S = 0.01
SEED_KILL_QUERY = (
    "select pg_terminate_backend(pid) from pg_stat_activity "
    "where state = 'idle in transaction' and state_change < now() - interval '2 seconds'"
)
POLICY = """\
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {{name: bench, namespace: bench}}
spec:
  interval: {interval}
  remediation:
    mode: Enforce
    terminate: {{idleInTransactionAfter: 2s}}
    budget: {{maxPerCycle: 100, maxPerHour: 100000}}
"""


@dataclass
class Trial:
    relief_latency_s: float
    outage_s: float


Mechanism = Callable[[EmbeddedPostgres, threading.Event], None]


def leak_until_full(
    server: EmbeddedPostgres,
) -> tuple[list[psycopg.Connection[tuple[object, ...]]], float]:
    """Open idle-in-transaction sessions until refused; return them and the oldest's start."""
    leaked: list[psycopg.Connection[tuple[object, ...]]] = []
    first_idle_at = 0.0
    while True:
        try:
            conn = psycopg.connect(server.dsn(LEAK_ROLE, application_name="leaky"))
        except psycopg.OperationalError:
            return leaked, first_idle_at
        conn.execute("select 1")  # opens the transaction; the session is now idle in it
        if not leaked:
            first_idle_at = time.monotonic()
        leaked.append(conn)


def probe_until_admitted(deadline_s: float) -> Callable[[EmbeddedPostgres], float]:
    def probe(server: EmbeddedPostgres) -> float:
        stop_at = time.monotonic() + deadline_s
        while time.monotonic() < stop_at:
            try:
                with psycopg.connect(server.dsn(LEAK_ROLE, application_name="probe")):
                    return time.monotonic()
            except psycopg.OperationalError:
                time.sleep(PROBE_EVERY_S)
        raise RuntimeError("the server never admitted the probe")

    return probe


def pgrelief_loop(interval: str) -> Mechanism:
    def mechanism(server: EmbeddedPostgres, stop: threading.Event) -> None:
        policy = parse_policy(POLICY.format(interval=interval))
        with tempfile.TemporaryDirectory() as scratch, ManagedConnection(server.dsn()) as conn:
            store = StateStore(Path(scratch) / "state.json")
            runner = Runner(policy, conn, store, AuditLog(), stopping=stop)
            # Start at a random phase, as a loop that has been running for a while would be.
            stop.wait(random.uniform(0, policy.spec.interval_seconds))
            runner.loop(on_cycle=lambda _report: None)

    return mechanism


def cron_kill_query(period_s: float) -> Mechanism:
    def mechanism(server: EmbeddedPostgres, stop: threading.Event) -> None:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            stop.wait(random.uniform(0, period_s))
            while not stop.is_set():
                conn.execute(SEED_KILL_QUERY)
                stop.wait(period_s)

    return mechanism


def server_timeout(server: EmbeddedPostgres, stop: threading.Event) -> None:
    del server, stop  # the server itself does the work: see the setting in run_trials


def run_trials(
    mechanism: Mechanism, trials: int, *, timeout_setting: bool = False, deadline_s: float = 90
) -> list[Trial]:
    settings = {"idle_in_transaction_session_timeout": "2s"} if timeout_setting else {}
    results: list[Trial] = []
    with EmbeddedPostgres(
        max_connections=20, superuser_reserved_connections=3, settings=settings
    ) as server:
        server.create_role(LEAK_ROLE)
        for _ in range(trials):
            stop = threading.Event()
            worker = threading.Thread(target=mechanism, args=(server, stop), daemon=True)
            worker.start()
            time.sleep(0.3)  # let the mechanism connect before the slots are gone
            leaked, first_idle_at = leak_until_full(server)
            refused_at = time.monotonic()
            admitted_at = probe_until_admitted(deadline_s)(server)
            results.append(
                Trial(
                    relief_latency_s=admitted_at - (first_idle_at + THRESHOLD_S),
                    outage_s=admitted_at - refused_at,
                )
            )
            stop.set()
            worker.join(10)
            for conn in leaked:
                conn.close()
            time.sleep(0.2)
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def cycle_cost(backends: int) -> tuple[float, float]:
    """Median wall time of one dry-run cycle and of its snapshot statement on the server."""
    policy = parse_policy(POLICY.format(interval="1s"))
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    with (
        EmbeddedPostgres(max_connections=backends + 20) as server,
        tempfile.TemporaryDirectory() as d,
    ):
        server.create_role(LEAK_ROLE)
        for _ in range(backends):
            conn = psycopg.connect(server.socket_dsn(LEAK_ROLE, application_name="held"))
            conn.execute("select 1")
            held.append(conn)
        with ManagedConnection(server.dsn()) as connection:
            runner = Runner(
                policy, connection, StateStore(Path(d) / "s.json"), AuditLog(), dry_run=True
            )
            walls = []
            for _ in range(30):
                started = time.perf_counter()
                runner.cycle()
                walls.append(time.perf_counter() - started)
            server_ms = _snapshot_server_ms(connection.get())
        for conn in held:
            conn.close()
    return statistics.median(walls) * 1000, server_ms


def _snapshot_server_ms(conn: psycopg.Connection[tuple[object, ...]]) -> float:
    timings = []
    for _ in range(30):
        plan = conn.execute(
            "explain (analyze, format json) " + SNAPSHOT_QUERY, (list(SETTINGS),)
        ).fetchone()
        assert plan is not None
        timings.append(float(plan[0][0]["Execution Time"]))
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--cron-trials", type=int, default=5)
    parser.add_argument("--backends", type=int, default=320)
    args = parser.parse_args()
    print(
        f"time-to-relief, threshold {THRESHOLD_S:.0f}s for every mechanism "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    )
    rows: list[tuple[str, list[Trial]]] = [
        ("pgrelief run, interval 1s", run_trials(pgrelief_loop("1s"), args.trials)),
        ("pgrelief run, interval 250ms", run_trials(pgrelief_loop("250ms"), args.trials)),
        (
            "idle_in_transaction_session_timeout=2s",
            run_trials(server_timeout, args.trials, timeout_setting=True),
        ),
        ("seed kill query, cron every 60s", run_trials(cron_kill_query(60.0), args.cron_trials)),
    ]
    reference = statistics.median(t.relief_latency_s for t in rows[1][1])
    print(
        f"{'mechanism':<40} {'n':>3} {'latency p50':>12} {'p95':>8} "
        f"{'outage p50':>11} {'p95':>8} {'p50 / pgrelief 250ms':>21}"
    )
    for name, trials in rows:
        latency = [t.relief_latency_s for t in trials]
        outage = [t.outage_s for t in trials]
        p50 = statistics.median(latency)
        print(
            f"{name:<40} {len(trials):>3} {p50:>11.3f}s {percentile(latency, 0.95):>7.3f}s "
            f"{statistics.median(outage):>10.3f}s {percentile(outage, 0.95):>7.3f}s "
            f"{p50 / reference if reference > 0 else float('nan'):>20.1f}x"
        )
    wall_ms, server_ms = cycle_cost(args.backends)
    print(
        f"\none pgrelief cycle with {args.backends} idle backends: wall {wall_ms:.1f} ms "
        f"(observe + diagnose + plan + audit), snapshot statement on the server "
        f"{server_ms:.2f} ms (EXPLAIN ANALYZE, median of 30)"
    )


if __name__ == "__main__":
    main()
