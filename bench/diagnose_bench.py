"""Offline diagnosis speed: synthetic pg_stat_activity dumps of 1k / 10k / 100k sessions.

The target (issue 2) is parse + diagnose of 100k sessions in under a second. The dumps are
written the way ``\\copy (select * from pg_stat_activity) to 'a.csv' csv header`` writes them on
PostgreSQL 17/18 (same columns in the same order, empty field for NULL, ISO timestamps with
a ``+00`` offset), with a pg_settings dump beside them.

Baseline, timed in the same run on the same file: the naive approach a person would script,
the domain reference's three diagnostic queries done as pure-Python group-bys over
``csv.DictReader`` rows. pgrelief does more than that (breakdowns, nine findings with their
fixes); the ratio says what the extra costs.

Pasted formats (issue 15): the same 10k-session dump as psql's aligned and expanded output
(rendered here the way psql prints them, and checked to read back to exactly the CSV's
sessions), timed against the CSV in the same run: pyarrow's fast path, and the csv module's
reference path that every other format shares.

Run: ``python bench/diagnose_bench.py [--sizes 1000,10000,100000] [--runs 5] [--profile]
[--paste-size 10000]``.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgrelief.diagnose import diagnose
from pgrelief.dumps import load_activity, snapshot_from_files
from pgrelief.dumps._arrow import fast_activity
from pgrelief.dumps.activity import sessions_from
from pgrelief.dumps.tables import HOW_TO, parse_table
from pgrelief.snapshot import Snapshot

# The header lines as PostgreSQL 17/18 write them.
ACTIVITY_HEADER = (
    "datid,datname,pid,leader_pid,usesysid,usename,application_name,client_addr,"
    "client_hostname,client_port,backend_start,xact_start,query_start,state_change,"
    "wait_event_type,wait_event,state,backend_xid,backend_xmin,query_id,query,backend_type"
)
SETTINGS_HEADER = (
    "name,setting,unit,category,short_desc,extra_desc,context,vartype,source,min_val,max_val,"
    "enumvals,boot_val,reset_val,sourcefile,sourceline,pending_restart"
)
ACTIVITY_COLUMNS = ACTIVITY_HEADER.split(",")
SETTINGS_COLUMNS = SETTINGS_HEADER.split(",")
NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
_BACKGROUND = (
    "autovacuum launcher",
    "logical replication launcher",
    "background writer",
    "checkpointer",
    "walwriter",
)
_QUERIES = (
    "SELECT o.id, o.total FROM orders o WHERE o.customer_id = $1 AND o.status = 'open' "
    "ORDER BY o.created_at DESC LIMIT 50",
    "UPDATE stock SET quantity = quantity - $1 WHERE sku = $2",
    "COMMIT",
    "LISTEN jobs",
    "select pg_advisory_lock(42)",
    "SET search_path = tenant_17, public",
    'INSERT INTO "audit log" (actor, action, detail) VALUES ($1, $2, $3)',
    "BEGIN",
)


def _stamp(moment: datetime) -> str:
    """The way psql's \\copy prints a timestamptz with DateStyle ISO and TimeZone UTC."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


@dataclass(frozen=True)
class _App:
    name: str
    role: str
    database: str
    hosts: tuple[str, ...]


def _fleet(rng: random.Random, unique: bool) -> list[_App]:
    """Applications as deployed: each runs as one role against one database from a few hosts.

    ``unique`` instead draws role, database and host independently per session: the worst
    case for grouping (near-unique combinations), kept to show the cost does not explode.
    """
    roles = [f"app_{i}" for i in range(20)] + ["report", 'we"ird role']
    names = [f"svc-{i}" for i in range(25)] + ["PostgreSQL JDBC Driver", "sidekiq", ""]
    pool = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]
    apps = []
    for index, name in enumerate(names):
        first = rng.randrange(len(pool))
        count = rng.randint(2, 10)
        hosts = tuple(pool[(first + k) % len(pool)] for k in range(count))
        apps.append(_App(name, roles[index % len(roles)], DATABASES[index % 4], hosts))
    if unique:
        return [_App(app.name, "", "", tuple(pool)) for app in apps]
    return apps


DATABASES = ["appdb", "billing", "analytics", "Prod DB", "postgres"]


def write_dump(
    directory: Path, sessions: int, seed: int = 7, unique: bool = False
) -> tuple[Path, Path]:
    """An activity CSV of ``sessions`` client backends (plus background ones) and a settings CSV."""
    rng = random.Random(seed)
    fleet = _fleet(rng, unique)
    roles = [f"app_{i}" for i in range(20)] + ["report", 'we"ird role']
    activity = directory / f"activity-{sessions}{'-unique' if unique else ''}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ACTIVITY_COLUMNS)
    pid = 100
    for backend_type in _BACKGROUND:
        started = _stamp(NOW - timedelta(days=3))
        writer.writerow(
            ["", "", pid, "", "", "", "", "", "", "", started, "", "", "", "Activity",
             "AutoVacuumMain", "", "", "", "", "", backend_type]
        )  # fmt: skip
        pid += 1
    for _ in range(sessions):
        pid += 1
        app = rng.choice(fleet)
        user = app.role or rng.choice(roles)
        database = app.database or rng.choice(DATABASES)
        address = rng.choice(app.hosts) if rng.random() < 0.97 else ""
        roll = rng.random()
        backend_age = rng.uniform(5, 86400)
        if roll < 0.55:
            state = "idle"
            # Most idle sessions are pooled and recently used; some leaked long ago.
            leaked = rng.random() < 0.1
            state_age = rng.uniform(1800, backend_age) if leaked else rng.uniform(0, 60)
            state_age = min(state_age, backend_age)
        elif roll < 0.65:
            state = "idle in transaction" if rng.random() < 0.8 else "idle in transaction (aborted)"
            state_age = rng.uniform(0, min(backend_age, 1200))
        else:
            state = "active"
            state_age = rng.uniform(0, min(backend_age, 900)) if rng.random() < 0.05 else 0.05
        query_age = state_age + (rng.uniform(0, 0.5) if state != "active" else 0)
        in_transaction = state != "idle"
        xact_age = query_age + rng.uniform(0, 30) if in_transaction else None
        waiting = state == "active" and rng.random() < 0.2
        writer.writerow(
            [
                16384 + DATABASES.index(database),
                database,
                pid,
                "",
                10 + roles.index(user),
                user,
                app.name,
                address,
                "",
                rng.randint(30000, 60000) if address else -1,
                _stamp(NOW - timedelta(seconds=backend_age)),
                _stamp(NOW - timedelta(seconds=xact_age)) if xact_age is not None else "",
                _stamp(NOW - timedelta(seconds=query_age)),
                _stamp(NOW - timedelta(seconds=state_age)),
                ("Lock" if rng.random() < 0.5 else "LWLock") if waiting else "Client",
                ("transactionid" if waiting else "ClientRead"),
                state,
                rng.randint(1000, 10**6) if in_transaction and rng.random() < 0.3 else "",
                rng.randint(1000, 10**6) if in_transaction else "",
                rng.randint(-(2**62), 2**62),
                rng.choice(_QUERIES),
                "client backend",
            ]
        )
    activity.write_text(buffer.getvalue())
    settings = directory / f"settings-{sessions}{'-unique' if unique else ''}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SETTINGS_COLUMNS)
    max_connections = max(100, sessions + sessions // 10)
    for name, value, unit, context in (
        ("max_connections", str(max_connections), "", "postmaster"),
        ("superuser_reserved_connections", "3", "", "postmaster"),
        ("reserved_connections", "0", "", "postmaster"),
        ("shared_buffers", "524288", "8kB", "postmaster"),
        ("work_mem", "4096", "kB", "user"),
        ("server_version_num", "180000", "", "internal"),
    ):
        writer.writerow([name, value, unit, "", "", "", context, "integer", "default"] + [""] * 8)
    settings.write_text(buffer.getvalue())
    return activity, settings


def naive_three_queries(activity: Path) -> tuple[Counter[str], Counter[tuple[str, str, str]], list]:
    """The seed's three diagnostic queries, as a person would script them over DictReader."""
    with activity.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["backend_type"] == "client backend"]
    by_state: Counter[str] = Counter(row["state"] for row in rows)
    by_user_app: Counter[tuple[str, str, str]] = Counter(
        (row["usename"], row["application_name"], row["state"]) for row in rows
    )
    now = max(datetime.fromisoformat(row["state_change"]) for row in rows if row["state_change"])
    idle = sorted(
        (row for row in rows if row["state"] == "idle"),
        key=lambda row: row["state_change"],
    )[:20]
    oldest = [
        (
            row["pid"],
            row["usename"],
            row["application_name"],
            row["client_addr"],
            now - datetime.fromisoformat(row["state_change"]),
            row["query"][:80],
        )
        for row in idle
    ]
    return by_state, by_user_app, oldest


def psql_aligned(activity: Path) -> str:
    """The CSV dump as psql's default aligned output prints it (border 1, numbers right)."""
    with activity.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    widths = [max(len(header[i]), *(len(row[i]) for row in body)) for i in range(len(header))]
    numeric = [
        all(not row[i] or row[i].lstrip("-").isdigit() for row in body) for i in range(len(header))
    ]
    lines = [
        "|".join(f" {name.center(widths[i])} " for i, name in enumerate(header)).rstrip(),
        "+".join("-" * (width + 2) for width in widths),
    ]
    for row in body:
        cells = [
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i])
            for i, value in enumerate(row)
        ]
        lines.append(("|".join(f" {cell} " for cell in cells)).rstrip())
    lines.append(f"({len(body)} rows)")
    return "\n".join(lines) + "\n"


def psql_expanded(activity: Path) -> str:
    """The CSV dump as psql's ``\\x`` output prints it."""
    with activity.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    width = max(map(len, header))
    lines = []
    for number, row in enumerate(body, start=1):
        lines.append(f"-[ RECORD {number} ]" + "-" * max(width - 10, 1) + "+" + "-" * 20)
        lines.extend(
            f"{name.ljust(width)} | {value}".rstrip()
            for name, value in zip(header, row, strict=False)
        )
    return "\n".join(lines) + "\n"


def paste_formats(directory: Path, size: int, runs: int) -> None:
    """Parse time of one dump as CSV (both readers), psql aligned and psql expanded."""
    activity, _ = write_dump(directory, size, seed=11)
    aligned = directory / "activity.txt"
    aligned.write_text(psql_aligned(activity))
    expanded = directory / "activity-x.txt"
    expanded.write_text(psql_expanded(activity))
    data = activity.read_bytes()
    reference = sessions_from(parse_table(activity, data, HOW_TO))
    for path in (aligned, expanded):
        assert load_activity(path).sessions == reference.sessions, path  # same sessions
    timings = [
        ("CSV, pyarrow fast path", lambda: load_activity(activity)),
        ("CSV, csv module (reference)", lambda: sessions_from(parse_table(activity, data, HOW_TO))),
        ("psql aligned", lambda: load_activity(aligned)),
        ("psql expanded (\\x)", lambda: load_activity(expanded)),
    ]
    print(f"\nparse time of one {size}-session dump by format (median of {runs} runs, wall)")
    base = None
    for label, work in timings:
        wall, _ = _median(runs, work)
        base = base or wall
        path = {"psql aligned": aligned, "psql expanded (\\x)": expanded}.get(label, activity)
        print(
            f"  {label:<30} {wall * 1000:>8.0f} ms  {wall / base:>5.1f}x  "
            f"({path.stat().st_size / 1e6:.1f} MB)"
        )


def _median(runs: int, work: Callable[[], object]) -> tuple[float, float]:
    """Median wall-clock and median CPU seconds of ``runs`` calls of ``work``."""
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _profile(snapshot: Snapshot) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    diagnose(snapshot)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


def _row(
    label: str, size: int, activity: Path, settings: Path, runs: int
) -> tuple[float, Snapshot]:
    snapshot = snapshot_from_files(activity, settings)
    clients = sum(1 for s in snapshot.sessions if s.is_client)
    assert clients == size, (clients, size)
    result = diagnose(snapshot)
    assert result.totals.client_backends == size
    full, full_cpu = _median(runs, lambda: diagnose(snapshot_from_files(activity, settings)))
    alone, alone_cpu = _median(runs, lambda: diagnose(snapshot))
    naive, naive_cpu = _median(runs, lambda: naive_three_queries(activity))
    print(
        f"{label:<9} {size:>8} {full * 1000:>9.0f} ms {alone * 1000:>7.0f} ms "
        f"{alone_cpu * 1000:>7.0f} ms {len(result.findings):>4} {naive * 1000:>9.0f} ms "
        f"{full / naive:>6.2f}x {full_cpu / naive_cpu:>6.2f}x"
    )
    return full, snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile diagnose on the largest")
    parser.add_argument("--paste-size", type=int, default=10_000, help="sessions, pasted formats")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    header = (
        f"{'dump':<9} {'sessions':>8} {'parse+diag':>12} {'diagnose':>10} {'diag cpu':>10} "
        f"{'find':>4} {'naive 3q':>12} {'ratio':>7} {'cpu r.':>7}"
    )
    print(header)
    print("-" * len(header))
    largest: Snapshot | None = None
    verdict = 0
    with tempfile.TemporaryDirectory(prefix="pgrelief-bench-") as tmp:
        for size in sizes:
            activity, settings = write_dump(Path(tmp), size)
            full, largest = _row("realistic", size, activity, settings, args.runs)
            if size >= 100_000 and full >= 1.0:
                verdict = 1
        top = max(sizes)
        activity, settings = write_dump(Path(tmp), top, unique=True)
        _row("unique", top, activity, settings, args.runs)
        # Which reader the timings are of: pyarrow may be missing, or decline a file.
        fast = fast_activity(activity, activity.read_bytes()) is not None
        if args.paste_size:
            paste_formats(Path(tmp), args.paste_size, args.runs)
    reader = "pyarrow (fast path)" if fast else "csv module (reference path)"
    print(
        f"\nmedians of {args.runs} runs. parse+diag: snapshot_from_files + diagnose (breakdowns, "
        "findings, fixes), wall clock.\ndiagnose: on the parsed snapshot (wall, then CPU time "
        "of this process). naive 3q: the seed's three queries as\nPython group-bys over "
        "csv.DictReader rows (no findings, no fixes). ratio: parse+diag / naive, wall and CPU.\n"
        "realistic: applications run as one role from a few hosts; unique: role, database and "
        "host drawn per session (worst case for grouping).\n"
        f"activity CSV read by: {reader}"
    )
    if any(size >= 100_000 for size in sizes):
        print(
            "target 100k sessions in < 1 s (realistic, wall):", "MET" if verdict == 0 else "MISSED"
        )
    if args.profile and largest is not None:
        _profile(largest)
    return 0  # a benchmark informs; a busy machine must not fail `make bench`


if __name__ == "__main__":
    sys.exit(main())
