"""Server cost of one live snapshot with hundreds of real backends.

pgrelief observes servers that are already short of slots and CPU, so its snapshot statement
must stay cheap: the target (issue 2) is under 10 ms of server time with 300+ backends. This
starts a throwaway server with max_connections=400, opens real sessions (idle, idle in
transaction, aborted, LISTEN, active in pg_sleep; several roles and applications, TCP and
socket), then takes snapshots and reports:

- server time per snapshot from the server's own log (``log_min_duration_statement = 0`` for
  the benchmark session: parse + bind + execute as the server measured them, no network);
- planning and execution time from ``EXPLAIN (ANALYZE, TIMING OFF)`` of the same statement;
- client wall time of ``take_snapshot`` (round trip, JSON decoding, building the Snapshot).

Run: ``python bench/snapshot_bench.py [--backends 320] [--runs 50]``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.observe import SETTINGS, SNAPSHOT_QUERY, connect, take_snapshot

ROLES = ("app_backend", "reporting", "batch_worker", "web_readonly")
_DURATION = re.compile(r"\[(\d+)\].*duration: ([\d.]+) ms\s+(parse|bind|execute|statement)")


def open_backends(pg: EmbeddedPostgres, count: int) -> tuple[list[Any], list[threading.Thread]]:
    conns: list[Any] = []
    threads: list[threading.Thread] = []
    for number in range(count):
        role = ROLES[number % len(ROLES)]
        app = f"service-{number % 12}"
        dsn = pg.dsn(role) if number % 3 else pg.socket_dsn(role)
        kind = number % 10
        conn = psycopg.connect(dsn, application_name=app, autocommit=kind not in (7, 8))
        if kind == 7:
            conn.execute("select 1")  # idle in transaction
        elif kind == 8:
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                conn.execute("select 1/0")  # idle in transaction (aborted)
        elif kind == 9 and number % 20 == 9:
            thread = threading.Thread(target=_sleep, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)
        elif kind == 6:
            conn.execute("listen jobs")
        else:
            conn.execute("select 1")
        conns.append(conn)
    return conns, threads


def _sleep(conn: Any) -> None:
    with contextlib.suppress(psycopg.Error):  # cancelled at the end of the benchmark
        conn.execute("select pg_sleep(3600)")


def server_times_from_log(log_file: Path, pid: int, offset: int) -> list[float]:
    """Per-snapshot server milliseconds (parse + bind + execute) logged for backend ``pid``."""
    totals: list[float] = []
    pending = 0.0
    with log_file.open(encoding="utf-8", errors="replace") as log:
        log.seek(offset)
        for line in log:
            found = _DURATION.search(line)
            if found is None or int(found.group(1)) != pid:
                continue
            pending += float(found.group(2))
            if found.group(3) in ("execute", "statement"):
                totals.append(pending)
                pending = 0.0
    return totals


def explain_times(conn: Any, runs: int) -> tuple[list[float], list[float]]:
    planning, execution = [], []
    for _ in range(runs):
        row = conn.execute(
            "explain (analyze, timing off, format json) " + SNAPSHOT_QUERY, (list(SETTINGS),)
        ).fetchone()
        plan = row[0][0]
        planning.append(plan["Planning Time"])
        execution.append(plan["Execution Time"])
    return planning, execution


def summary(label: str, values: Sequence[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"{label:<44} median {statistics.median(ordered):7.3f} ms   p95 {p95:7.3f} ms   "
        f"max {ordered[-1]:7.3f} ms   (n={len(ordered)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=320)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    with EmbeddedPostgres(max_connections=400, superuser_reserved_connections=5) as pg:
        for role in ROLES:
            pg.create_role(role)
        started = time.perf_counter()
        conns, threads = open_backends(pg, args.backends)
        opened_s = time.perf_counter() - started
        try:
            with connect(pg.dsn(), application_name="snapshot-bench") as observer:
                snapshot = take_snapshot(observer)  # warm the catalog caches
                clients = len(snapshot.client_sessions)
                print(
                    f"PostgreSQL {pg.version}: {len(snapshot.sessions)} backends in "
                    f"pg_stat_activity ({clients} client backends; {args.backends} opened in "
                    f"{opened_s:.1f} s), {args.runs} runs each\n"
                )

                observer.execute("set log_min_duration_statement = 0")
                offset = pg.log_file.stat().st_size
                wall = []
                for _ in range(args.runs):
                    begin = time.perf_counter()
                    take_snapshot(observer)
                    wall.append((time.perf_counter() - begin) * 1000)
                observer.execute("set log_min_duration_statement = -1")
                logged = server_times_from_log(pg.log_file, observer.info.backend_pid, offset)
                planning, execution = explain_times(observer, args.runs)
                both = [p + e for p, e in zip(planning, execution, strict=True)]

                print(summary("server time, from the server log", logged))
                print(summary("EXPLAIN ANALYZE planning", planning))
                print(summary("EXPLAIN ANALYZE execution", execution))
                print(summary("EXPLAIN ANALYZE planning + execution", both))
                print(summary("take_snapshot() wall time on the client", wall))
                target = statistics.median(logged) if logged else statistics.median(both)
                verdict = "met" if target < 10 else "MISSED"
                print(f"\ntarget: server time under 10 ms with 300+ backends: {verdict}")
        finally:
            for conn in conns:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                    conn.cancel_safe()
            for thread in threads:
                thread.join(10)
            for conn in conns:
                conn.close()


if __name__ == "__main__":
    main()
