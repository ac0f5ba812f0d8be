"""What attribution costs (issue 13): the pod index's memory and lookups, and the cycle time
it adds.

Pods are built as the API server returns them (``kubectl get pods -o json`` items: metadata
with a ReplicaSet ownerReference and the pod-template-hash label, status with podIP(s) and
startTime), N of them in Deployments of 20 replicas. Measured, each against a baseline taken
in the same run:

- memory: the index (``PodRecord``s by uid, by IP and by namespace) against keeping the Pod
  objects themselves, as a naive informer cache would (both by tracemalloc);
- fill: ``pod_record`` + ``put_pod`` of every Pod (what the first list costs), and ``place``
  per lookup against a bare dict lookup by IP;
- cycle: ``diagnose`` of a snapshot of S client sessions from those Pods' addresses, without
  attribution (the baseline) and with ``attribute`` + ``diagnose`` (what a cycle adds).

Run: ``python bench/attribution_bench.py [--pods 10000] [--sessions 1000,10000] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pgrelief.attribution import PodIndex, attribute, pod_record
from pgrelief.diagnose import diagnose
from pgrelief.snapshot import CLIENT_BACKEND, ServerFacts, Session, Snapshot

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
REPLICAS = 20
NAMESPACES = 25


def pods(count: int) -> list[dict[str, Any]]:
    """``count`` Running Pods of Deployments with 20 replicas, across 25 namespaces."""
    items = []
    for n in range(count):
        deployment = f"app-{n // REPLICAS}"
        template = f"{n // REPLICAS:08x}"[:10]
        replica_set = f"{deployment}-{template}"
        ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        started = NOW - timedelta(hours=2, seconds=n % 3600)
        items.append({
            "metadata": {
                "name": f"{replica_set}-{n:05x}", "namespace": f"team-{n % NAMESPACES}",
                "uid": f"0b1c2d3e-{n:08x}-4f5a-8b9c-0d1e2f3a4b5c",
                "labels": {"app": deployment, "pod-template-hash": template},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": replica_set, "uid": f"rs-{n // REPLICAS:08x}",
                                     "controller": True, "blockOwnerDeletion": True}],
                "creationTimestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.2.3"}],
                     "nodeName": f"node-{n % 50}"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "hostIP": f"192.168.0.{n % 50}",
                       "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ")},
        })  # fmt: skip
    return items


def sessions(count: int, items: list[dict[str, Any]]) -> Snapshot:
    """A snapshot of ``count`` client sessions from random Pods' addresses (a tenth idle in
    transaction, one in 50 from an address no Pod has)."""
    rng = random.Random(13)
    rows = []
    for pid in range(1000, 1000 + count):
        pod = rng.choice(items)
        outside = rng.random() < 0.02
        state = "idle in transaction" if rng.random() < 0.1 else "idle"
        began = NOW - timedelta(minutes=rng.randint(1, 60))
        changed = NOW - timedelta(seconds=rng.randint(1, 50))
        rows.append(Session(
            pid=pid, backend_type=CLIENT_BACKEND, state=state, usename="app",
            datname="appdb", application_name="web",
            client_addr="172.16.0.9" if outside else pod["status"]["podIP"],
            client_port=40000 + pid % 20000, backend_start=began, xact_start=None,
            query_start=changed, state_change=changed, wait_event_type="Client",
            wait_event="ClientRead", query="select 1",
            backend_age_s=(NOW - began).total_seconds(),
            state_age_s=(NOW - changed).total_seconds(), is_superuser=False,
        ))  # fmt: skip
    server = ServerFacts(
        version_num=180000, max_connections=count + 100, superuser_reserved_connections=3,
        reserved_connections=0, settings={},
    )  # fmt: skip
    return Snapshot(taken_at=NOW, server=server, sessions=tuple(rows), source="bench")


def best(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def traced(build: Callable[[], object]) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return kept, after - before


def fill(items: list[dict[str, Any]]) -> PodIndex:
    index = PodIndex(clock=NOW.timestamp)
    for item in items:
        record = pod_record(item)
        if record is not None:
            index.put_pod(record)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--sessions", default="1000,10000")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    items = pods(args.pods)
    print(f"{args.pods} Pods in {args.pods // REPLICAS} Deployments, {NAMESPACES} namespaces")

    raw, raw_bytes = traced(lambda: pods(args.pods))  # the objects themselves (baseline)
    index, index_bytes = traced(lambda: fill(items))
    assert isinstance(index, PodIndex) and len(index) == args.pods
    print(
        f"memory: index {index_bytes / 2**20:.1f} MiB ({index_bytes / args.pods:.0f} B/Pod); "
        f"the Pod objects kept as listed (baseline) {raw_bytes / 2**20:.1f} MiB "
        f"({raw_bytes / args.pods:.0f} B/Pod): {raw_bytes / index_bytes:.1f}x less"
    )
    del raw
    took = best(args.runs, lambda: fill(items))
    print(f"fill: {took * 1000:.0f} ms for {args.pods} Pods ({took / args.pods * 1e6:.1f} us/Pod)")

    ips = [item["status"]["podIP"] for item in items]
    by_ip = {ip: item for ip, item in zip(ips, items, strict=True)}
    probe = random.Random(7).choices(ips, k=100_000)
    since = NOW - timedelta(minutes=5)
    place = best(args.runs, lambda: [index.place(ip, since) for ip in probe]) / len(probe)
    bare = best(args.runs, lambda: [by_ip.get(ip) for ip in probe]) / len(probe)
    print(
        f"lookup: place() {place * 1e6:.2f} us (owner resolved, start time checked); "
        f"a bare dict lookup by IP (baseline) {bare * 1e6:.3f} us"
    )

    for count in (int(n) for n in args.sessions.split(",")):
        shot = sessions(count, items)
        without = best(args.runs, lambda shot=shot: diagnose(shot))  # type: ignore[misc]

        def attributed(shot: Snapshot = shot) -> object:
            found = attribute(shot, index, scope="bench")
            return diagnose(replace(shot, attribution=found))

        with_it = best(args.runs, attributed)
        placed = attribute(shot, index, scope="bench")
        named = sum(1 for o in placed.origins.values() if o.workload is not None)
        added = (with_it - without) * 1000
        print(
            f"cycle, {count} sessions ({named} placed on workloads): diagnose {without * 1000:.1f}"
            f" ms (baseline), attribute + diagnose {with_it * 1000:.1f} ms: +{added:.1f} ms "
            f"({added / count * 1000:.2f} ms per 1,000 sessions)"
        )


if __name__ == "__main__":
    main()
