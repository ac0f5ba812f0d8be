"""Time-to-relief: how long a full server keeps refusing clients, per remediation mechanism.

Every mechanism runs in the same run, on the same embedded PostgreSQL (max_connections 20,
3 reserved for superusers: 17 usable slots), with the same staleness threshold
(``THRESHOLD_S``), interleaved round by round so machine load hits them alike:

- PostgreSQL's own per-role ``idle_in_transaction_session_timeout`` (ALTER ROLE ... SET);
- ``pgrelief run`` at 1 s and at 250 ms intervals (the real command in its own process, with
  an audit file fsynced before every termination; the incident starts at a random phase of
  its interval);
- the seed's kill query run by cron every 60 s (a random phase: cron does not start when the
  incident does).

Two scenarios:

- **incident**: a leaky application opens idle-in-transaction sessions until the server
  refuses it; a probe client retries every ``PROBE_EVERY_S``. Relief latency is from the
  moment the oldest leak crossed the threshold to the probe's first successful connection
  (p50/p95 over the trials).
- **storm**: leaks keep arriving in bursts (``BURST`` every ``BURST_EVERY_S``: faster than
  the threshold frees them), with a few slow clients that sit idle in a transaction for about
  the threshold and then run a statement; the probe runs throughout. Reported: the longest
  time the probe was refused, and every ``terminating connection`` in the server log
  (``log_statement = all``) that was of a session running a statement (a STATEMENT line
  follows the FATAL); the target is none.

Target: pgrelief at 250 ms within 50 ms of PostgreSQL's own timeout on both figures.

Run: ``python bench/relief_bench.py [--trials N] [--cron-trials N] [--storms N] [--storm-s S]``;
it prints tables (the cron baseline takes up to a minute per incident: ``--cron-trials 0``
leaves it out).
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

THRESHOLD_S = 1.0
LEAK_ROLE = "leaky_app"
PROBE_EVERY_S = 0.01
BURST = 6
BURST_EVERY_S = 0.3
SLOW_CLIENTS = 2
CRON_PERIOD_S = 60.0
SEED_KILL_QUERY = (
    "select pg_terminate_backend(pid) from pg_stat_activity "
    "where state = 'idle in transaction' and state_change < now() - interval '1 second'"
)
POLICY = """\
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {{name: bench, namespace: bench}}
spec:
  interval: {interval}
  remediation:
    mode: Enforce
    terminate: {{idleInTransactionAfter: 1s}}
    budget: {{maxPerCycle: 100, maxPerHour: 100000}}
"""
LOG_SETTINGS = {"log_statement": "all", "log_line_prefix": "%m [%p] "}

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass
class Mechanism:
    name: str
    run: Callable[[EmbeddedPostgres, threading.Event], None]  # until the event is set
    role_timeout: bool = False  # PostgreSQL's own: the leak role gets the timeout
    interval_s: float = 0.0  # a poller's period: the incident starts at a random phase of it
    application: str | None = None  # the poller's session, to know it has connected

    def start(self, server: EmbeddedPostgres) -> tuple[threading.Event, threading.Thread]:
        with server.connect() as conn:
            value = f"{THRESHOLD_S * 1000:.0f}ms" if self.role_timeout else "0"
            conn.execute(
                f"alter role {LEAK_ROLE} set idle_in_transaction_session_timeout = '{value}'"
            )
            stop = threading.Event()
            worker = threading.Thread(target=self.run, args=(server, stop), daemon=True)
            worker.start()
            # Connected before the slots are gone, then a random phase of its period.
            while (
                self.application is not None
                and not conn.execute(
                    "select 1 from pg_stat_activity where application_name = %s",
                    (self.application,),
                ).fetchone()
            ):
                time.sleep(0.02)
        time.sleep(0.1 + random.uniform(0, self.interval_s))
        return stop, worker


def pgrelief_run(interval: str) -> Callable[[EmbeddedPostgres, threading.Event], None]:
    """``pgrelief run`` as deployed: its own process, an audit file, lines on stdout."""

    def run(server: EmbeddedPostgres, stop: threading.Event) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            policy = Path(scratch) / "policy.yaml"
            policy.write_text(POLICY.format(interval=interval), encoding="utf-8")
            process = subprocess.Popen(
                [sys.executable, "-m", "pgrelief", "run", "--policy", str(policy),
                 "--dsn", server.dsn(), "--audit-file", str(Path(scratch) / "audit.jsonl"),
                 "--state-file", str(Path(scratch) / "state.json")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                stop.wait()
            finally:
                process.send_signal(signal.SIGTERM)
                _, err = process.communicate(timeout=30)
            if process.returncode != 0:
                raise RuntimeError(f"pgrelief run failed: {err.decode(errors='replace')}")

    return run


def cron_kill_query(server: EmbeddedPostgres, stop: threading.Event) -> None:
    # A random phase: cron does not start when the incident does.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        stop.wait(random.uniform(0, CRON_PERIOD_S))
        while not stop.is_set():
            conn.execute(SEED_KILL_QUERY)
            stop.wait(CRON_PERIOD_S)


def nothing(server: EmbeddedPostgres, stop: threading.Event) -> None:
    del server  # the server itself does the work (the role's timeout)
    stop.wait()


def open_leak(server: EmbeddedPostgres) -> Connection | None:
    """One idle-in-transaction session, or None when the server refuses it."""
    try:
        conn = psycopg.connect(server.dsn(LEAK_ROLE, application_name="leaky"))
    except psycopg.OperationalError:
        return None
    conn.execute("select 1")  # opens the transaction; the session is now idle in it
    return conn


def probe(server: EmbeddedPostgres) -> bool:
    try:
        with psycopg.connect(server.dsn(LEAK_ROLE, application_name="probe")):
            return True
    except psycopg.OperationalError:
        return False


# ---- incident --------------------------------------------------------------------------------


def incident(server: EmbeddedPostgres, mechanism: Mechanism, deadline_s: float) -> float:
    """One incident: the relief latency in seconds."""
    stop, worker = mechanism.start(server)
    leaked: list[Connection] = []
    try:
        first_idle_at = 0.0
        while (conn := open_leak(server)) is not None:
            if not leaked:
                first_idle_at = time.monotonic()
            leaked.append(conn)
        give_up = time.monotonic() + deadline_s
        while not probe(server):
            if time.monotonic() > give_up:
                raise RuntimeError(f"{mechanism.name}: the server never admitted the probe")
            time.sleep(PROBE_EVERY_S)
        return time.monotonic() - (first_idle_at + THRESHOLD_S)
    finally:
        stop.set()
        worker.join(10)
        for conn in leaked:
            conn.close()
        time.sleep(0.2)


# ---- storm -----------------------------------------------------------------------------------


@dataclass
class Storm:
    longest_refusal_s: float
    refused_share: float
    probes: int
    terminated: int  # "terminating connection" lines in the server log
    killed_running: list[str] = field(default_factory=list)  # ... followed by a STATEMENT
    ended_refused: bool = False  # still refused at the end: the longest is a lower bound


def storm(server: EmbeddedPostgres, mechanism: Mechanism, seconds: float) -> Storm:
    log_from = server.log_file.stat().st_size
    stop, worker = mechanism.start(server)
    done = threading.Event()
    held: list[Connection] = []
    threads = [threading.Thread(target=_leaker, args=(server, done, held), daemon=True)]
    threads += [
        threading.Thread(target=_slow_client, args=(server, done), daemon=True)
        for _ in range(SLOW_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    time.sleep(THRESHOLD_S)  # the first bursts fill the server
    outcomes: list[tuple[float, bool]] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        outcomes.append((time.monotonic(), probe(server)))
        time.sleep(PROBE_EVERY_S)
    done.set()
    for thread in threads:
        thread.join(10)
    stop.set()
    worker.join(10)
    for conn in held:
        conn.close()
    time.sleep(0.3)
    terminated, running = _terminations(server.log_file, log_from)
    return Storm(
        longest_refusal_s=_longest_refusal(outcomes),
        refused_share=sum(1 for _, ok in outcomes if not ok) / max(len(outcomes), 1),
        ended_refused=bool(outcomes) and not outcomes[-1][1],
        probes=len(outcomes),
        terminated=terminated,
        killed_running=running,
    )


def _leaker(server: EmbeddedPostgres, done: threading.Event, held: list[Connection]) -> None:
    while not done.is_set():
        for _ in range(BURST):
            conn = open_leak(server)
            if conn is None:
                break
            held.append(conn)
        done.wait(BURST_EVERY_S)


def _slow_client(server: EmbeddedPostgres, done: threading.Event) -> None:
    """Idle in a transaction for about the threshold, then a statement: the sessions a
    killer must not catch mid-statement (some cross the threshold and may go while idle)."""
    conn: Connection | None = None
    while not done.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(server.dsn(LEAK_ROLE, application_name="slow"))
            conn.execute("select 1")
            done.wait(THRESHOLD_S * random.uniform(0.8, 1.2))
            conn.execute("select pg_sleep(0.05)")
            conn.commit()
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
            done.wait(0.05)
    if conn is not None:
        conn.close()


def _longest_refusal(outcomes: list[tuple[float, bool]]) -> float:
    longest, refused_since = 0.0, None
    for at, ok in outcomes:
        if not ok and refused_since is None:
            refused_since = at
        elif ok and refused_since is not None:
            longest = max(longest, at - refused_since)
            refused_since = None
    if refused_since is not None:  # still refused when the storm ended: a lower bound
        longest = max(longest, outcomes[-1][0] - refused_since)
    return longest


_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (\w+):\s+(.*)$")


def _terminations(log_file: Path, start: int) -> tuple[int, list[str]]:
    """Terminations in the log since ``start``, and those of a backend running a statement."""
    with log_file.open("rb") as log:
        log.seek(start)
        lines = log.read().decode("utf-8", "replace").splitlines()
    parsed = [m.groups() for line in lines if (m := _LINE.match(line))]
    total, running = 0, []
    for index, (pid, level, text) in enumerate(parsed):
        if level != "FATAL" or not text.startswith("terminating connection"):
            continue
        total += 1
        after = next((p for p in parsed[index + 1 :] if p[0] == pid), None)
        if after is not None and after[1] == "STATEMENT":
            running.append(f"pid {pid}: {text} / {after[2]}")
    return total, running


# ---- cost of one cycle -----------------------------------------------------------------------


def cycle_cost(backends: int) -> tuple[float, float]:
    """Median wall time of one dry-run cycle and of its snapshot statement on the server."""
    policy = parse_policy(POLICY.format(interval="1s"))
    held: list[Connection] = []
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


def _snapshot_server_ms(conn: Connection) -> float:
    timings = []
    for _ in range(30):
        plan = conn.execute(
            "explain (analyze, format json) " + SNAPSHOT_QUERY, (list(SETTINGS),)
        ).fetchone()
        assert plan is not None
        timings.append(float(plan[0][0]["Execution Time"]))  # type: ignore[index]
    return statistics.median(timings)


# ---- report ----------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def print_storms(
    storms: dict[str, list[Storm]], reference: str, count: int, seconds: float
) -> None:
    print(
        f"\nstorm: {count} x {seconds:g}s of bursts of {BURST} leaks every "
        f"{BURST_EVERY_S * 1000:.0f} ms and {SLOW_CLIENTS} slow clients; the probe's longest "
        "refusal (over all storms, and the median of each storm's longest)"
    )
    base = max(r.longest_refusal_s for r in storms[reference])
    print(
        f"{'mechanism':<40} {'n':>3} {'longest':>9} {'- timeout':>10} {'median':>8} "
        f"{'refused':>8} {'killed':>7} {'mid-statement':>14}"
    )
    for name, results in storms.items():
        longest = max(r.longest_refusal_s for r in results)
        median = statistics.median(r.longest_refusal_s for r in results)
        refused = statistics.mean(r.refused_share for r in results)
        running = [line for r in results for line in r.killed_running]
        bound = (
            ">=" if any(r.ended_refused and r.longest_refusal_s == longest for r in results) else ""
        )
        print(
            f"{name:<40} {len(results):>3} {bound:>2}{longest * 1000:>5.0f}ms "
            f"{(longest - base) * 1000:>+8.0f}ms "
            f"{median * 1000:>6.0f}ms {refused:>7.0%} {sum(r.terminated for r in results):>7} "
            f"{len(running):>14}"
        )
        for line in running[:3]:
            print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15, help="incidents per mechanism")
    parser.add_argument("--storm-s", type=float, default=10.0, help="length of one storm")
    parser.add_argument("--storms", type=int, default=3, help="storms per mechanism")
    parser.add_argument(
        "--cron-trials", type=int, default=5, help="incidents and storms of the cron baseline"
    )
    parser.add_argument("--backends", type=int, default=320)
    args = parser.parse_args()
    mechanisms = [
        Mechanism("idle_in_transaction_session_timeout", nothing, role_timeout=True),
        Mechanism("pgrelief run, interval 250ms", pgrelief_run("250ms"), interval_s=0.25,
                  application="pgrelief"),
        Mechanism("pgrelief run, interval 1s", pgrelief_run("1s"), interval_s=1.0,
                  application="pgrelief"),
    ]  # fmt: skip
    cron = Mechanism("seed kill query, cron every 60s", cron_kill_query)
    if args.cron_trials:
        mechanisms.append(cron)
    print(
        f"time-to-relief, threshold {THRESHOLD_S:g}s for every mechanism, probe every "
        f"{PROBE_EVERY_S * 1000:.0f} ms ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    )
    latencies: dict[str, list[float]] = {m.name: [] for m in mechanisms}
    storms: dict[str, list[Storm]] = {m.name: [] for m in mechanisms}
    with EmbeddedPostgres(
        max_connections=20, superuser_reserved_connections=3, settings=LOG_SETTINGS
    ) as server:
        server.create_role(LEAK_ROLE)
        print(f"PostgreSQL {server.version}, {server.usable_slots} usable slots")
        for trial in range(args.trials):
            for mechanism in random.sample(mechanisms, len(mechanisms)):
                if mechanism is cron and trial >= args.cron_trials:
                    continue
                deadline = CRON_PERIOD_S + 30 if mechanism is cron else 30
                latencies[mechanism.name].append(incident(server, mechanism, deadline))
        for round_ in range(args.storms):
            for mechanism in random.sample(mechanisms, len(mechanisms)):
                if mechanism is cron and round_ >= args.cron_trials:
                    continue
                storms[mechanism.name].append(storm(server, mechanism, args.storm_s))
    reference = mechanisms[0].name
    base_p50 = statistics.median(latencies[reference])
    base_p95 = percentile(latencies[reference], 0.95)
    print(
        f"\nincident: latency from the oldest leak crossing the threshold to the first new "
        f"client ({args.trials} each)"
    )
    print(
        f"{'mechanism':<40} {'n':>3} {'p50':>8} {'p95':>8} {'p50 - timeout':>14} "
        f"{'p95 - timeout':>14}"
    )
    for name, values in latencies.items():
        p50, p95 = statistics.median(values), percentile(values, 0.95)
        print(
            f"{name:<40} {len(values):>3} {p50 * 1000:>6.0f}ms {p95 * 1000:>6.0f}ms "
            f"{(p50 - base_p50) * 1000:>+12.0f}ms {(p95 - base_p95) * 1000:>+12.0f}ms"
        )
    if args.storms:
        print_storms(storms, reference, args.storms, args.storm_s)
    wall_ms, server_ms = cycle_cost(args.backends)
    print(
        f"\none pgrelief cycle with {args.backends} idle backends: wall {wall_ms:.1f} ms "
        f"(observe + diagnose + plan + audit), snapshot statement on the server "
        f"{server_ms:.2f} ms (EXPLAIN ANALYZE, median of 30)"
    )


if __name__ == "__main__":
    main()
