"""How long one cycle takes to free N leaked sessions: the batch vs one at a time.

``pg_terminate_backend(pid, timeout)`` (PG14+) waits for the backend to exit by polling every
100 ms, one backend at a time, so terminating 300 sessions that way took ~30 s: longer than
Kubernetes' default grace period. pgrelief now signals the whole batch in one statement (each
row still re-checking the session as observed) and waits for the exits together.

Both are measured in the same run, on the same embedded PostgreSQL, with N idle sessions
opened for each trial: the baseline is PostgreSQL's own waiting call per session (what
pgrelief did before), the subject is ``act.execute`` on the plan's terminations.
Target: 300 terminations in one cycle well under 1 s.

Run: ``python bench/terminate_bench.py [--sessions 300] [--trials 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.act import execute
from pgrelief.observe import connect, take_snapshot
from pgrelief.plan import TerminateBackend

ROLE = "leaky_app"
Connection = psycopg.Connection[tuple[object, ...]]


def open_idle(server: EmbeddedPostgres, count: int) -> list[Connection]:
    sessions = []
    for _ in range(count):
        conn = psycopg.connect(server.dsn(ROLE, application_name="leak"), autocommit=True)
        conn.execute("select 1")
        sessions.append(conn)
    return sessions


def observed(conn: Connection) -> list[TerminateBackend]:
    snapshot = take_snapshot(conn)
    return [
        TerminateBackend(
            pid=s.pid,
            backend_start=s.backend_start,
            state=s.state,
            state_change=s.state_change,
            usename=s.usename,
            datname=s.datname,
            application_name=s.application_name,
            client_addr=s.client_addr,
            rule="idleAfter",
            age_s=s.state_age_s or 0.0,
        )
        for s in snapshot.sessions
        if s.application_name == "leak"
    ]


def one_at_a_time(conn: Connection, targets: list[TerminateBackend]) -> int:
    done = 0
    for t in targets:
        row = conn.execute(
            "select pg_terminate_backend(pid, 2000) from pg_stat_activity where pid = %s"
            " and backend_start = %s and state = %s and state_change = %s",
            (t.pid, t.backend_start, t.state, t.state_change),
        ).fetchone()
        done += bool(row and row[0])
    return done


def batch(conn: Connection, targets: list[TerminateBackend]) -> int:
    records = execute(conn, targets, dry_run=False, clock=lambda: datetime.now(UTC))
    return sum(1 for r in records if r.outcome == "done" and not r.detail)


def trial(server: EmbeddedPostgres, count: int, how: str) -> tuple[float, int]:
    leaks = open_idle(server, count)
    try:
        with connect(server.dsn()) as conn:
            targets = observed(conn)
            started = time.perf_counter()
            done = one_at_a_time(conn, targets) if how == "one at a time" else batch(conn, targets)
            elapsed = time.perf_counter() - started
    finally:
        for leak in leaks:
            leak.close()
    return elapsed, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with EmbeddedPostgres(max_connections=args.sessions + 20) as server:
        server.create_role(ROLE)
        print(f"PostgreSQL {server.version}, {args.sessions} idle sessions per trial")
        print(f"{'method':<16} {'median s':>9} {'min s':>7} {'max s':>7} {'exited':>7}")
        results: dict[str, list[float]] = {}
        for how in ("one at a time", "batch"):
            runs = [trial(server, args.sessions, how) for _ in range(args.trials)]
            times = [t for t, _ in runs]
            results[how] = times
            exited = min(d for _, d in runs)
            print(
                f"{how:<16} {statistics.median(times):>9.3f} {min(times):>7.3f} "
                f"{max(times):>7.3f} {exited:>7}"
            )
        speedup = statistics.median(results["one at a time"]) / statistics.median(results["batch"])
        target = "met" if statistics.median(results["batch"]) < 1.0 else "MISSED"
        print(f"batch is {speedup:.0f}x faster; target (300 in well under 1 s): {target}")


if __name__ == "__main__":
    main()
