"""Operator scale: many ConnectionPolicies, one ``pgrelief operator --standalone`` process.

Everything is real: the kube-testenv API server (started the way tests/fixtures/kube.py starts
it), ``--servers`` embedded PostgreSQL servers with a few static idle application sessions
each, one Secret per policy, and the operator as a local child process watching one
namespace. For each scenario the policies are created, the bench waits until every one is
Ready, lets start-up settle (``--warmup``), then measures a steady window (``--window``):

- lag: how late each cycle started behind its schedule, from the operator's own
  ``pgrelief_cycle_lag_seconds`` histogram (scraped at both ends of the window; p50/p95
  interpolated inside a bucket like PromQL's histogram_quantile, max = the highest bucket
  that filled, so "<= bound");
- operator CPU (utime+stime of /proc/<pid>/stat over the window) and RSS (VmRSS, VmHWM);
- API requests counted by the API server itself (``apiserver_request_total`` by verb and
  resource, scraped at both ends): status patches and Events per policy per minute;
- the CPU the API server and the PostgreSQL servers spent, the machine's load average.

Baselines measured in the same run: the bare cycle (observe, diagnose, plan, act; no kopf,
no status, no Events) run directly on the same servers, which is the floor an operator cycle
cannot go under; the operator with the same policies at a 1 h interval, which is what kopf
and idle daemons cost with no cycles at all; and the operator as it was before the scale
work (``--baseline-ref``, default the commit that added the lag histogram on top of the
1 Hz spec polling and a Timer thread per cycle), run from ``git archive`` of that commit on
the largest size, so "before" and "after" share the machine, the servers and the hour.

Run from the repository root (PYTHONPATH=$PWD/operator):
``python -m bench.operator_scale [--policies 100,300,1000]``; ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kubernetes import client

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.connection import ManagedConnection
from pgrelief.cycle import Cycle
from pgrelief.policy import validate_policy
from pgrelief.state_file import StateStore
from tests.fixtures.kube import KubeApiServer, build_testenv, start_apiserver
from tests.kube.operator_harness import (
    CRD_FILES,
    OperatorProcess,
    policy_manifest,
    secret_manifest,
)

TICK = os.sysconf("SC_CLK_TCK")
SPEC = {
    "remediation": {
        "mode": "Enforce",
        "onlyUnderPressure": True,
        "terminate": {"idleInTransactionAfter": "5m"},
    }
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Samples = list[tuple[str, dict[str, str], float]]
CRD_NAME = "connectionpolicies.pgrelief.dev"


# ---- reading numbers --------------------------------------------------------------------
def parse_metrics(text: str) -> Samples:
    samples: Samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found and not line.startswith("#"):
            labels = dict(_LABEL.findall(found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        value
        for metric, labels, value in samples
        if metric == name and all(labels.get(k) == v for k, v in match.items())
    )


def buckets(samples: Samples, name: str) -> dict[float, float]:
    return {
        float(labels["le"]): value
        for metric, labels, value in samples
        if metric == f"{name}_bucket"
    }


def quantile(cumulative: dict[float, float], q: float) -> float:
    """PromQL's histogram_quantile over cumulative bucket counts (inf when past the last)."""
    bounds = sorted(cumulative)
    count = cumulative[math.inf]
    if count == 0:
        return math.nan
    rank, lower, below = q * count, 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= rank:
            if math.isinf(bound):
                return math.inf
            inside = cumulative[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative[bound]
    return math.inf


def highest_filled(cumulative: dict[float, float]) -> float:
    bounds = sorted(cumulative)
    previous = 0.0
    top = 0.0
    for bound in bounds:
        if cumulative[bound] > previous:
            top = bound
        previous = cumulative[bound]
    return top


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def memory_mib(pid: int) -> tuple[float, float]:
    found = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(found["VmRSS"].split()[0]) / 1024, int(found["VmHWM"].split()[0]) / 1024


def tree_cpu_seconds(roots: set[int]) -> float:
    """CPU of ``roots`` and their children (a postmaster and its backends)."""
    seconds = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) in roots or int(fields[1]) in roots:
            seconds += (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def http_text(url: str, token: str | None = None, cadata: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cadata=cadata) if cadata else None
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        return str(response.read().decode())


# ---- the fleet ----------------------------------------------------------------------------
@dataclass
class Fleet:
    kube: KubeApiServer
    servers: list[EmbeddedPostgres]
    api: Any
    sessions: list[psycopg.Connection[Any]] = field(default_factory=list)

    @property
    def postmasters(self) -> set[int]:
        return {int((s.data_dir / "postmaster.pid").read_text().split()[0]) for s in self.servers}

    def apiserver_metrics(self) -> Samples:
        text = http_text(
            f"{self.kube.server}/metrics", self.kube.admin_token, self.kube.ca_data.decode()
        )
        return [s for s in parse_metrics(text) if s[0] == "apiserver_request_total"]


@contextmanager
def fleet(servers: int, per_server: int, app_sessions: int) -> Iterator[Fleet]:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="opscale-") as scratch:
        kube = start_apiserver(build_testenv(), Path(scratch))
        stack.callback(kube.stop)
        started: list[EmbeddedPostgres] = []
        stack.callback(lambda: [s.stop() for s in started])
        max_connections = per_server + app_sessions + 10
        with ThreadPoolExecutor(4) as pool:
            for server in pool.map(
                lambda _: EmbeddedPostgres(max_connections=max_connections).start(),
                range(servers),
            ):
                started.append(server)
        the_fleet = Fleet(kube, started, kube.api_client())
        for server in started:
            for n in range(app_sessions):
                conn = psycopg.connect(server.dsn(application_name=f"app-{n}"), autocommit=True)
                conn.execute("select 1")
                the_fleet.sessions.append(conn)
        stack.callback(lambda: [c.close() for c in the_fleet.sessions])
        yield the_fleet


def create_policies(the_fleet: Fleet, namespace: str, count: int, interval: str) -> None:
    the_fleet.kube.kubectl("create", "namespace", namespace)
    core, custom = client.CoreV1Api(the_fleet.api), client.CustomObjectsApi(the_fleet.api)

    def create(n: int) -> None:
        server = the_fleet.servers[n % len(the_fleet.servers)]
        name = f"db-{n:04d}"
        core.create_namespaced_secret(
            namespace, secret_manifest(f"{name}-login", namespace, "postgres", "unused")
        )
        body = policy_manifest(
            name, namespace, host=server.host, port=server.port, secret=f"{name}-login",
            spec={**SPEC, "interval": interval},
        )  # fmt: skip
        custom.create_namespaced_custom_object(
            "pgrelief.dev", "v1alpha1", namespace, "connectionpolicies", body
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))


def not_ready(the_fleet: Fleet, namespace: str) -> list[dict[str, Any]]:
    """The policies not Ready, each with the conditions it has (to say why when it times out)."""
    custom = client.CustomObjectsApi(the_fleet.api)
    items = custom.list_namespaced_custom_object(
        "pgrelief.dev", "v1alpha1", namespace, "connectionpolicies"
    )["items"]
    return [
        item
        for item in items
        if not any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (item.get("status") or {}).get("conditions", [])
        )
    ]


# ---- one scenario -------------------------------------------------------------------------
@dataclass
class Point:
    at: float
    operator: Samples
    apiserver: Samples
    cpu: float
    apiserver_cpu: float
    postgres_cpu: float
    busy: tuple[float, float]
    load: float


@dataclass
class Result:
    label: str
    policies: int
    interval_s: float
    window_s: float
    load: tuple[float, float]
    cycles_per_s: float
    lag: tuple[float, float, float]
    cycle_ms: float
    cores: float
    rss_mib: float
    peak_mib: float
    requests: Counter[tuple[str, str]]
    apiserver_cores: float
    postgres_cores: float
    machine_cores: float
    not_ready: int
    warnings: Counter[str]
    slices: list[Slice]

    def per_policy_minute(self, *keys: tuple[str, str]) -> float:
        return sum(self.requests[k] for k in keys) / self.policies / (self.window_s / 60)

    def writes_per_policy_minute(self) -> float:
        """Every write the API server counted but its own lease renewals (the issue's target)."""
        writes = [k for k in self.requests if k[0] in WRITE_VERBS and k[1] != "leases"]
        return self.per_policy_minute(*writes)


STATUS_PATCH = ("PATCH", "connectionpolicies/status")
# The first commit of the scale work: the lag histogram on the operator as it was (a 1 Hz
# poll of the spec generation per sleeping policy, a deep copy of the body per cycle, one
# Timer thread per cycle deadline); it predates main's PgBouncer reconcile.
BASELINE_REF = "1a6c5a44999c4ab3ef39cb1bcb32cf95be2d9bd9"
EVENT_KEYS = (("POST", "events"), ("PATCH", "events"))
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


def point(the_fleet: Fleet, operator: OperatorProcess) -> Point:
    assert operator.process is not None
    return Point(
        at=time.monotonic(),
        operator=parse_metrics(operator.metrics()),
        apiserver=the_fleet.apiserver_metrics(),
        cpu=cpu_seconds(operator.process.pid),
        apiserver_cpu=cpu_seconds(the_fleet.kube.process.pid),
        postgres_cpu=tree_cpu_seconds(the_fleet.postmasters),
        busy=machine_busy(),
        load=load_average(),
    )


def requests_between(before: Samples, after: Samples) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for sign, samples in ((-1, before), (1, after)):
        for _, labels, value in samples:
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            counts[(labels.get("verb", ""), resource)] += sign * value
    return +counts


def run_scenario(
    the_fleet: Fleet,
    label: str,
    policies: int,
    interval: str,
    args: argparse.Namespace,
    window_s: float,
    tree: Tree,
) -> Result:
    namespace = "bench-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    work = Path(tempfile.mkdtemp(prefix=f"opscale-{namespace}-"))
    install_crds(the_fleet, tree.crds)
    create_policies(the_fleet, namespace, policies, interval)
    operator = OperatorProcess(
        the_fleet.kube,
        namespace,
        work,
        args=("--standalone", "--workers", str(args.workers)),
        env=tree.env,
    )
    operator.start()
    assert operator.process is not None
    print(f"{label}: operator pid {operator.process.pid}, log {operator.log_file}", flush=True)
    try:
        deadline = time.monotonic() + args.ready_timeout
        while waiting := not_ready(the_fleet, namespace):
            if time.monotonic() > deadline or not operator.alive():
                example = waiting[0].get("status") or {}
                raise RuntimeError(
                    f"{label}: {policies - len(waiting)}/{policies} Ready (one not: "
                    f"{example.get('conditions')}); log {operator.log_file}"
                )
            time.sleep(3)
        time.sleep(args.warmup)
        first = point(the_fleet, operator)
        log_from = len(operator.logs())
        slices = timeline(the_fleet, operator, first, window_s, args.sample_every)
        last = point(the_fleet, operator)
        warnings = Counter(
            re.sub(r"^\[[^]]*\]\s*", "", line)[:160]
            for line in operator.logs()[log_from:].splitlines()
            if "WARNING" in line or "ERROR" in line
        )
        assert operator.process is not None
        rss, peak = memory_mib(operator.process.pid)
        unready = len(not_ready(the_fleet, namespace))
    finally:
        operator.stop(timeout=120)
    span = last.at - first.at
    lag = lag_between(first.operator, last.operator)
    cycles = total(last.operator, "pgrelief_cycle_duration_seconds_count") - total(
        first.operator, "pgrelief_cycle_duration_seconds_count"
    )
    cycle_s = total(last.operator, "pgrelief_cycle_duration_seconds_sum") - total(
        first.operator, "pgrelief_cycle_duration_seconds_sum"
    )
    busy = (last.busy[0] - first.busy[0]) / (last.busy[1] - first.busy[1]) * (os.cpu_count() or 1)
    return Result(
        label=label,
        policies=policies,
        interval_s=validate_interval(interval),
        window_s=span,
        load=(first.load, last.load),
        cycles_per_s=cycles / span,
        lag=(quantile(lag, 0.5), quantile(lag, 0.95), highest_filled(lag)),
        cycle_ms=1000 * cycle_s / cycles if cycles else math.nan,
        cores=(last.cpu - first.cpu) / span,
        rss_mib=rss,
        peak_mib=peak,
        requests=requests_between(first.apiserver, last.apiserver),
        apiserver_cores=(last.apiserver_cpu - first.apiserver_cpu) / span,
        postgres_cores=(last.postgres_cpu - first.postgres_cpu) / span,
        machine_cores=busy,
        not_ready=unready,
        warnings=warnings,
        slices=slices,
    )


@dataclass
class Slice:
    """One ``--sample-every`` stretch of the window: where a lag tail comes from."""

    start_s: float
    lag: dict[float, float]
    status_patches: float
    event_writes: float


def lag_between(before: Samples, after: Samples) -> dict[float, float]:
    earlier = buckets(before, "pgrelief_cycle_lag_seconds")
    return {
        bound: value - earlier.get(bound, 0.0)
        for bound, value in buckets(after, "pgrelief_cycle_lag_seconds").items()
    }


def timeline(
    the_fleet: Fleet, operator: OperatorProcess, first: Point, window_s: float, every: float
) -> list[Slice]:
    """Scrape both /metrics every ``every`` seconds (as Prometheus would) until the window ends."""
    slices: list[Slice] = []
    previous, previous_at = (first.operator, first.apiserver), first.at
    end = first.at + window_s
    while (now := time.monotonic()) < end:
        time.sleep(min(every, end - now))
        current = (parse_metrics(operator.metrics()), the_fleet.apiserver_metrics())
        requests = requests_between(previous[1], current[1])
        slices.append(
            Slice(
                start_s=previous_at - first.at,
                lag=lag_between(previous[0], current[0]),
                status_patches=requests[STATUS_PATCH],
                event_writes=sum(requests[k] for k in EVENT_KEYS),
            )
        )
        previous, previous_at = current, time.monotonic()
    return slices


def validate_interval(interval: str) -> float:
    body = policy_manifest("x", "x", host="h", port=1, spec={"interval": interval})
    return validate_policy(body).spec.interval_seconds


# ---- the floor: the bare cycle --------------------------------------------------------------
def bare_cycle(the_fleet: Fleet, cycles: int, with_deadline: bool) -> tuple[float, float]:
    """(CPU ms, wall ms) of one Cycle.run on a kept connection, no kopf, status or Events."""
    cpu: list[float] = []
    wall: list[float] = []
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        runs: list[tuple[Cycle, ManagedConnection]] = []
        for n, server in enumerate(the_fleet.servers[:20]):
            body = policy_manifest(f"db-{n}", "bench", host=server.host, port=server.port)
            body["spec"] = {**body["spec"], **SPEC}
            body["spec"]["postgres"] = {**body["spec"]["postgres"], "user": "postgres"}
            del body["spec"]["postgres"]["credentialsSecret"]
            policy = validate_policy(body)
            store = StateStore(Path(scratch) / f"{n}.json")
            connection = stack.enter_context(ManagedConnection(server.dsn()))
            runs.append((Cycle(policy, store, lambda _records: None), connection))
        for n in range(cycles):
            cycle, connection = runs[n % len(runs)]
            started, started_cpu = time.perf_counter(), time.thread_time()
            conn = connection.get()
            if with_deadline:
                with connection.deadline(30.0):
                    cycle.run(conn)
            else:
                cycle.run(conn)
            cpu.append(1000 * (time.thread_time() - started_cpu))
            wall.append(1000 * (time.perf_counter() - started))
    return statistics.median(cpu), statistics.median(wall)


@dataclass(frozen=True)
class Tree:
    """Which operator a scenario runs: its CRDs, and the environment that imports its code."""

    crds: list[Path]
    env: dict[str, str]


def baseline_tree(ref: str, scratch: Path) -> Tree:
    """The operator of ``ref``, unpacked; its own CRDs (today's default fields it rejects)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "operator", "crds"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    return Tree(
        sorted((scratch / "crds").glob("*.yaml")), {"PYTHONPATH": str(scratch / "operator")}
    )


def install_crds(the_fleet: Fleet, crds: list[Path]) -> None:
    for path in crds:
        the_fleet.kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    the_fleet.kube.kubectl("wait", "--for=condition=Established", "crd/" + CRD_NAME)
    time.sleep(2)  # the API server serves a changed schema a moment after it is stored


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="opscale-baseline-")


# ---- printing -----------------------------------------------------------------------------
def seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return ">30s"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def print_results(results: Iterable[Result], floor_cpu_ms: float) -> None:
    head = (
        f"{'scenario':<22}{'load1':>11}{'cyc/s':>7}{'lag p50':>8}{'p95':>7}{'max<=':>7}"
        f"{'cycle':>7}{'CPU':>6}{'ms/cyc':>7}{'xfloor':>7}{'RSS':>6}{'peak':>6}"
        f"{'st/p/m':>7}{'ev/p/m':>7}{'wr/p/m':>7}{'apisrv':>7}{'pg':>6}{'machine':>8}"
    )
    print(head)
    for r in results:
        per_cycle = 1000 * r.cores / r.cycles_per_s if r.cycles_per_s else math.nan
        print(
            f"{r.label:<22}{r.load[0]:>5.1f}->{r.load[1]:<4.1f}{r.cycles_per_s:>7.1f}"
            f"{seconds(r.lag[0]):>8}{seconds(r.lag[1]):>7}{seconds(r.lag[2]):>7}"
            f"{r.cycle_ms:>5.1f}ms{r.cores:>6.2f}{per_cycle:>7.2f}"
            f"{per_cycle / floor_cpu_ms:>6.1f}x{r.rss_mib:>6.0f}{r.peak_mib:>6.0f}"
            f"{r.per_policy_minute(STATUS_PATCH):>7.2f}{r.per_policy_minute(*EVENT_KEYS):>7.2f}"
            f"{r.writes_per_policy_minute():>7.2f}"
            f"{r.apiserver_cores:>7.2f}{r.postgres_cores:>6.2f}{r.machine_cores:>8.2f}"
        )
    print(
        "\nload1: load average at window start->end; cyc/s: cycles completed; lag: start behind"
        " schedule (operator histogram, window delta); cycle: mean wall time; CPU: operator"
        " cores (user+sys); ms/cyc: operator CPU per cycle; xfloor: / bare cycle CPU; RSS/peak:"
        " MiB; st/p/m, ev/p/m: status patches, Event writes per policy per minute (counted by"
        " the API server); wr/p/m: all API writes per policy per minute (leases left out);"
        " apisrv, pg, machine: cores used by the API server+etcd, all"
        " PostgreSQL processes, the whole machine."
    )
    for r in results:
        others = {
            f"{verb} {res}": round(n)
            for (verb, res), n in sorted(r.requests.items())
            if (verb, res) not in (STATUS_PATCH, *EVENT_KEYS) and n >= 1
        }
        print(
            f"{r.label}: window {r.window_s:.0f}s, {r.not_ready} not Ready at the end, "
            f"{r.warnings.total()} WARNING/ERROR log lines in it; other API requests in it: "
            f"{others}"
        )
        for line, count in r.warnings.most_common(3):
            print(f"    {count} x {line}")
        worst = sorted(r.slices, key=lambda s: (highest_filled(s.lag), quantile(s.lag, 0.95)))
        for piece in reversed(worst[-3:]):
            print(
                f"    slice at +{piece.start_s:.0f}s: {piece.lag[math.inf]:.0f} cycles, lag p95 "
                f"{seconds(quantile(piece.lag, 0.95))}, max <= {seconds(highest_filled(piece.lag))}"
                f"; {piece.status_patches:.0f} status patches, {piece.event_writes:.0f} Event "
                f"writes in it"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="100,300,1000")
    parser.add_argument("--interval", default="10s")
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--app-sessions", type=int, default=5)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeat-largest", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--window", type=float, default=300)
    parser.add_argument("--idle-window", type=float, default=120)
    parser.add_argument("--sample-every", type=float, default=10)
    parser.add_argument("--quiet-policies", type=int, default=100)
    parser.add_argument("--quiet-interval", default="1s")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument(
        "--baseline-ref",
        default=BASELINE_REF,
        help="git commit whose operator is the 'before' (run on the largest size)",
    )
    parser.add_argument("--skip", default="", help="comma list of: floor,idle,baseline,quiet,scale")
    args = parser.parse_args()
    sizes = [int(n) for n in args.policies.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    largest = max(sizes)
    per_server = math.ceil(largest / args.servers)
    print(
        f"{args.servers} PostgreSQL servers x up to {per_server} policies each, "
        f"{args.app_sessions} idle app sessions per server, one Secret per policy; operator "
        f"--workers {args.workers}; {os.cpu_count()} CPUs"
    )
    results: list[Result] = []
    with ExitStack() as stack, fleet(args.servers, per_server, args.app_sessions) as the_fleet:
        floor_cpu = math.nan
        if "floor" not in skip:
            floor_cpu, floor_wall = bare_cycle(the_fleet, 400, with_deadline=False)
            deadline_cpu, deadline_wall = bare_cycle(the_fleet, 400, with_deadline=True)
            print(
                f"floor: bare Cycle.run {floor_cpu:.2f} ms CPU / {floor_wall:.2f} ms wall; "
                f"inside connection.deadline {deadline_cpu:.2f} / {deadline_wall:.2f} ms "
                f"(median of 400, load {load_average():.1f})",
                flush=True,
            )
        today = Tree(CRD_FILES, {})
        plan: list[tuple[str, int, str, float, Tree]] = []
        if "idle" not in skip:
            plan.append((f"{largest} @1h (idle)", largest, "1h", args.idle_window, today))
        if "baseline" not in skip:
            old = baseline_tree(args.baseline_ref, Path(stack.enter_context(scratch_dir())))
            label = f"{largest} @{args.interval} before"
            plan.append((label, largest, args.interval, 0, old))
        if "scale" not in skip:
            for size in sizes:
                repeats = args.repeat_largest if size == largest else 1
                for n in range(repeats):
                    suffix = f" #{n + 1}" if repeats > 1 else ""
                    plan.append((f"{size} @{args.interval}{suffix}", size, args.interval, 0, today))
        if "quiet" not in skip:
            label = f"{args.quiet_policies} @{args.quiet_interval} quiet"
            plan.append((label, args.quiet_policies, args.quiet_interval, 0, today))
        for label, size, interval, window, tree in plan:
            result = run_scenario(
                the_fleet, label, size, interval, args, window or args.window, tree
            )
            results.append(result)
            print_results([result], floor_cpu)
            print(flush=True)
    print("\nall scenarios:")
    print_results(results, floor_cpu)


if __name__ == "__main__":
    main()
