"""Placing sessions on workloads, pure: the pod index, reused addresses, the pooler's clients,
and what diagnose, the plan's protections and the workload Events make of it.

The operator end to end (real API server, real sessions) is tests/kube/test_operator_attribution*.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from pgrelief.attribution import (
    SKEW_S,
    TOMBSTONE_S,
    OwnerRef,
    PodIndex,
    PodRecord,
    attribute,
    pod_record,
)
from pgrelief.audit import DRY_RUN_DETAIL, AuditRecord
from pgrelief.diagnose import diagnose
from pgrelief.diagnosis import POOLER_WAITING, Severity
from pgrelief.manifests.events import BACKENDS_TERMINATED, WOULD_TERMINATE, workload_notes
from pgrelief.plan import PlanHistory, plan
from pgrelief.plan.selection import protect_of
from pgrelief.policy import ProtectSpec, WorkloadSelector
from pgrelief.protection import protection
from pgrelief.snapshot import IDLE_IN_TRANSACTION
from pgrelief.workloads import Attribution, Origin, PoolerClient, PoolerPool, PoolerView, Workload
from tests.factories import TAKEN_AT, enforce, session, snapshot

NOW = TAKEN_AT.timestamp()
SHOP = "shop"


def pod(
    name: str,
    ip: str,
    *,
    owner: tuple[str, str] | None = None,
    started_ago: float = 3600.0,
    labels: dict[str, str] | None = None,
    host_network: bool = False,
    phase: str = "Running",
) -> dict[str, Any]:
    """A Pod as the API returns it (started ``started_ago`` seconds before the snapshot)."""
    meta: dict[str, Any] = {"name": name, "namespace": SHOP, "uid": f"uid-{name}"}
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "uid": f"uid-{owner[1]}",
             "controller": True}
        ]  # fmt: skip
    if labels:
        meta["labels"] = labels
    started = datetime.fromtimestamp(NOW - started_ago, TAKEN_AT.tzinfo)
    return {
        "metadata": meta,
        "spec": {"hostNetwork": host_network},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": phase,
                   "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ")},
    }  # fmt: skip


def record(body: dict[str, Any]) -> PodRecord:
    found = pod_record(body)
    assert found is not None
    return found


def index_of(*pods: dict[str, Any]) -> PodIndex:
    index = PodIndex(clock=lambda: NOW)
    for body in pods:
        index.put_pod(record(body))
    return index


def since(seconds_ago: float) -> datetime:
    return TAKEN_AT - timedelta(seconds=seconds_ago)


def test_pods_resolve_to_their_top_owner() -> None:
    index = index_of(
        pod("api-7d4-x", "10.0.0.1", owner=("ReplicaSet", "api-7d4")),
        pod("web-5f-y", "10.0.0.2", owner=("ReplicaSet", "web-5f"),
            labels={"pod-template-hash": "5f"}),
        pod("report-29-z", "10.0.0.3", owner=("Job", "report-29")),
        pod("ledger-0", "10.0.0.4", owner=("StatefulSet", "ledger")),
        pod("agent-q", "10.0.0.5", owner=("DaemonSet", "agent")),
        pod("debug", "10.0.0.6"),
        pod("adhoc-j", "10.0.0.7", owner=("Job", "adhoc")),
    )  # fmt: skip
    index.put_controller("ReplicaSet", SHOP, "api-7d4", _owner("Deployment", "api"))
    index.put_controller("Job", SHOP, "report-29", _owner("CronJob", "report"))
    index.put_controller("Job", SHOP, "adhoc", None)  # a Job nothing owns is the workload
    placed = {ip: index.place(ip, since(60)) for ip in (f"10.0.0.{n}" for n in range(1, 9))}
    labels = {ip: o.workload.label if o and o.workload else o for ip, o in placed.items()}
    assert labels == {
        "10.0.0.1": "Deployment shop/api",
        "10.0.0.2": "Deployment shop/web",  # its ReplicaSet not seen: named by the template hash
        "10.0.0.3": "CronJob shop/report",
        "10.0.0.4": "StatefulSet shop/ledger",
        "10.0.0.5": "DaemonSet shop/agent",
        "10.0.0.6": "Pod shop/debug",
        "10.0.0.7": "Job shop/adhoc",
        "10.0.0.8": None,  # no Pod's address: not placed at all
    }
    origin = placed["10.0.0.1"]
    assert origin is not None and origin.pod == "api-7d4-x" and origin.workload is not None
    assert origin.workload.uid == "uid-api"  # what an Event on the Deployment needs


def test_an_owner_seen_later_changes_the_workload_a_pod_resolves_to() -> None:
    index = index_of(pod("etl-29-x", "10.0.0.3", owner=("Job", "etl-29")))
    first = index.place("10.0.0.3", since(60))
    assert first is not None and first.workload == Workload("Job", SHOP, "etl-29")
    index.put_controller("Job", SHOP, "etl-29", _owner("CronJob", "etl"))  # its Job listed
    later = index.place("10.0.0.3", since(60))
    assert later is not None and later.workload == Workload("CronJob", SHOP, "etl")
    index.delete_controller("Job", SHOP, "etl-29")
    gone = index.place("10.0.0.3", since(60))
    assert gone is not None and gone.workload == Workload("Job", SHOP, "etl-29")


def test_a_reused_address_is_not_blamed_on_the_pod_that_holds_it_now() -> None:
    index = index_of(pod("newcomer", "10.0.0.9", started_ago=30))
    assert index.place("10.0.0.9", since(10)) is not None  # began after the Pod started: it
    old = index.place("10.0.0.9", since(300))  # began before the Pod existed: not it
    assert old is not None and old.workload is None
    assert "reused address, not blamed" in old.why and "shop/newcomer" in old.why
    edge = index.place("10.0.0.9", since(30 + SKEW_S - 0.5))  # clocks disagree a little
    assert edge is not None and edge.workload == Workload("Pod", SHOP, "newcomer")


def test_a_deleted_pod_is_remembered_for_the_sessions_it_leaked() -> None:
    clock = [NOW]
    index = PodIndex(clock=lambda: clock[0])
    index.put_pod(record(pod("crashed", "10.0.0.9", owner=("StatefulSet", "ledger"))))
    clock[0] = NOW - 60
    index.delete_pod("uid-crashed")
    clock[0] = NOW
    index.put_pod(record(pod("newcomer", "10.0.0.9", started_ago=30)))
    leaked = index.place("10.0.0.9", since(600))
    assert leaked is not None and leaked.workload == Workload("StatefulSet", SHOP, "ledger")
    fresh = index.place("10.0.0.9", since(1))  # began after the crashed one was gone
    assert fresh is not None and fresh.workload == Workload("Pod", SHOP, "newcomer")
    assert len(index) == 1
    clock[0] = NOW + TOMBSTONE_S + 1
    index.delete_pod("uid-newcomer")  # expiry runs on deletions
    forgotten = index.place("10.0.0.9", since(600))
    assert forgotten is not None and forgotten.workload is None  # only the newcomer is known


def test_a_shared_address_names_no_one_but_says_who_it_may_be() -> None:
    index = index_of(
        pod("agent", "192.168.1.10", owner=("DaemonSet", "agent"), host_network=True),
        pod("exporter", "192.168.1.10", owner=("DaemonSet", "exporter"), host_network=True),
    )
    origin = index.place("::ffff:192.168.1.10", since(60))  # the same address, IPv4-mapped
    assert origin is not None and origin.workload is None and "node's" in origin.why
    assert {w.name for w in origin.possible} == {"agent", "exporter"}


def test_a_pod_without_an_ip_is_not_indexed_and_a_finished_one_has_ended() -> None:
    pending = pod("pending", "10.0.0.1")
    pending["status"] = {"phase": "Pending"}
    assert pod_record(pending) is None
    done = pod("job-x", "10.0.0.2", phase="Succeeded")
    done["status"]["containerStatuses"] = [
        {"state": {"terminated": {"finishedAt": since(100).strftime("%Y-%m-%dT%H:%M:%SZ")}}}
    ]
    finished = record(done)
    assert finished.ended is not None and abs(finished.ended - (NOW - 100)) < 1.0
    index = index_of(done)
    later = index.place("10.0.0.2", since(10))  # began after the Job's pod finished
    assert later is not None and later.workload is None


def test_sessions_through_the_pooler_are_the_applications_and_its_own_the_poolers() -> None:
    pooler = Workload("Deployment", SHOP, "shop-pgbouncer")
    index = index_of(pod("store-a", "10.0.0.1", owner=("StatefulSet", "store")))
    linked = session(101, IDLE_IN_TRANSACTION, 30, client_addr="10.0.9.9")
    own = session(102, "idle", 30, client_addr="10.0.9.9")
    reused_pid = session(103, "idle", 30, client_addr="10.0.0.1", backend_age=5)
    assert linked.backend_start is not None and own.backend_start is not None
    view = PoolerView(
        "shop-pgbouncer-x", SHOP, "10.0.9.9", pooler,
        clients=(_client("c1", "10.0.0.1"), _client("c2", "172.16.0.1")),
        servers=(_server(101, "c1", linked.backend_start), _server(102, "", own.backend_start),
                 _server(103, "c2", since(900))),
    )  # fmt: skip
    shot = snapshot([linked, own, reused_pid])
    found = attribute(shot, index, [view], scope="namespaces shop")
    assert found.origins[101] == Origin(
        Workload("StatefulSet", SHOP, "store"), "store-a", "shop-pgbouncer-x"
    )
    assert found.origins[102] == Origin(pooler, pod="shop-pgbouncer-x")
    # pid 103's backend started long after that server connection: not the same connection,
    # so the session is placed by its own address.
    assert found.origins[103].workload == Workload("StatefulSet", SHOP, "store")
    assert found.origins[103].via is None
    assert ("shop-pgbouncer-x", "c2") not in found.client_origins  # 172.16.0.1 is no Pod's


def test_diagnose_breaks_down_by_workload_and_a_waiting_pool_is_a_finding() -> None:
    api, ledger = Workload("Deployment", SHOP, "api"), Workload("StatefulSet", SHOP, "ledger")
    sessions = [
        session(1, IDLE_IN_TRANSACTION, 120),
        session(2, IDLE_IN_TRANSACTION, 30),
        session(3, "idle", 5),
        session(4, "active", 1),
        session(5, "idle", 9),
    ]
    origins = {1: Origin(api, "api-x"), 2: Origin(api, "api-y"), 3: Origin(ledger, "ledger-0"),
               4: Origin(None, why="reused")}  # fmt: skip
    pools = (PoolerPool("appdb", "app", 4, 3, 1, 0, 0, 12.5, "transaction"),)
    view = PoolerView("pgb-x", SHOP, "10.0.9.9", None, pools=pools)
    shot = replace(snapshot(sessions), attribution=Attribution(origins, (view,), scope="all"))
    result = diagnose(shot)
    groups = [
        (g.workload.label if g.workload else None, g.count) for g in result.breakdown.by_workload
    ]
    assert groups == [("Deployment shop/api", 2), ("StatefulSet shop/ledger", 1), (None, 2)]
    top = result.breakdown.by_workload[0]
    assert dict(top.by_state) == {IDLE_IN_TRANSACTION: 2} and top.oldest_state_age_s == 120
    [waiting] = [f for f in result.findings if f.kind == POOLER_WAITING]
    assert waiting.severity == Severity.CRITICAL  # waited longer than 10 s
    assert "3 PgBouncer client(s) wait" in waiting.summary
    calm = replace(view, pools=(replace(pools[0], maxwait_s=0.2),))
    quiet = replace(shot, attribution=Attribution(origins, (calm,), scope="all"))
    assert not [f for f in diagnose(quiet).findings if f.kind == POOLER_WAITING]


def test_protect_workloads_spares_the_listed_and_the_possible_and_all_without_an_index() -> None:
    ledger = Workload("StatefulSet", SHOP, "ledger-main")
    api = Workload("Deployment", SHOP, "api")
    protect = protect_of(
        ProtectSpec(
            workloads=[WorkloadSelector(kind="statefulset", namespace=SHOP, name="ledger-*")]
        )
    )
    spared_pid, killed_pid, maybe_pid, nowhere_pid = 1, 2, 3, 4
    sessions = [session(pid, IDLE_IN_TRANSACTION, 60) for pid in range(1, 5)]
    origins = {
        spared_pid: Origin(ledger, "ledger-main-0"),
        killed_pid: Origin(api, "api-x"),
        maybe_pid: Origin(None, why="a node's address", possible=(api, ledger)),
    }
    shot = replace(snapshot(sessions), attribution=Attribution(origins))
    why = {s.pid: text.text if (text := protection(s, shot, protect)) else None for s in sessions}
    assert why[spared_pid] == f"protected workload StatefulSet {SHOP}/ledger-main"
    assert why[killed_pid] is None and why[nowhere_pid] is None  # not from a Pod: not spared
    assert "may come from protected workload" in str(why[maybe_pid])
    blind = snapshot(sessions)  # no pod index: the protection must not lapse silently
    assert all(protection(s, blind, protect) is not None for s in sessions)
    other_namespace = protect_of(
        ProtectSpec(workloads=[WorkloadSelector(kind="StatefulSet", namespace="db", name="*")])
    )
    assert protection(sessions[0], shot, other_namespace) is None


def test_one_event_per_workload_whose_sessions_were_terminated() -> None:
    api, cron = Workload("Deployment", SHOP, "api"), Workload("CronJob", SHOP, "report")
    origins = {1: Origin(api), 2: Origin(api), 3: Origin(cron), 4: Origin(None, why="reused")}
    done = [_terminated(pid) for pid in (1, 2, 3, 4)]
    notes = dict(workload_notes(done, origins, policy="shop/orders"))
    assert list(notes) == [api, cron]  # the unknown one has no workload to post on
    assert notes[api].reason == BACKENDS_TERMINATED and notes[api].type == "Warning"
    assert notes[api].message == (
        "pgrelief terminated 2 leaked connection(s) of this Deployment's pods to database "
        "appdb (2 idle in transaction); ConnectionPolicy shop/orders"
    )
    planned = [replace(r, outcome="skipped", dry_run=True, detail=DRY_RUN_DETAIL) for r in done]
    spared = replace(planned[0], detail="protected role app")
    dry = dict(workload_notes([spared, *planned[2:]], origins, policy="shop/orders"))
    assert list(dry) == [cron] and dry[cron].reason == WOULD_TERMINATE
    assert "would terminate (DryRun) 1 leaked connection(s) of this CronJob's pods" in (
        dry[cron].message
    )


def _owner(kind: str, name: str) -> OwnerRef:
    return OwnerRef(kind, name, f"uid-{name}", "apps/v1" if kind != "CronJob" else "batch/v1")


def _client(ptr: str, addr: str) -> PoolerClient:
    return PoolerClient("app", "appdb", "active", addr, 40000, since(600), 0.0, ptr, "")


def _server(pid: int, link: str, connected: datetime) -> PoolerClient:
    return PoolerClient("app", "appdb", "active", "10.0.100.1", 5432, connected, 0.0, f"s{pid}",
                        link, remote_pid=pid)  # fmt: skip


def _terminated(pid: int) -> AuditRecord:
    evidence = {"pid": pid, "state": IDLE_IN_TRANSACTION, "datname": "appdb"}
    return AuditRecord(TAKEN_AT, "terminate", f"pid {pid}", "rule", evidence, False, "done")


def test_select_workloads_includes_only_sessions_placed_on_them_and_nothing_without_an_index() -> (
    None
):
    api, batch = Workload("Deployment", SHOP, "checkout-api"), Workload("CronJob", SHOP, "batch")
    placed_pid, other_pid, shared_pid, bare_pid = 1, 2, 3, 4
    sessions = [session(pid, "idle", 700) for pid in range(1, 5)]  # past enforce()'s idleAfter
    origins = {
        placed_pid: Origin(api, "checkout-api-7d9-x"),
        other_pid: Origin(batch, "batch-1-y"),
        shared_pid: Origin(None, why="a node's address", possible=(api, batch)),
    }
    policy = enforce(
        select={"workloads": [{"kind": "deployment", "namespace": SHOP, "name": "checkout-*"}]}
    )
    shot = replace(snapshot(sessions), attribution=Attribution(origins))
    result = plan(policy, shot, Severity.CRITICAL, PlanHistory(), TAKEN_AT)
    assert [a.pid for a in result.session_actions] == [placed_pid]
    skipped = {s.pid: s.why for s in result.skipped}
    assert skipped[other_pid] == f"CronJob {SHOP}/batch not matched by select.workloads"
    # Include-only acts less when in doubt: "may come from" a selected workload is not enough.
    assert skipped[shared_pid].startswith("not placed on a workload (a node's address)")
    assert skipped[bare_pid].startswith("not placed on a workload")
    blind = plan(policy, snapshot(sessions), Severity.CRITICAL, PlanHistory(), TAKEN_AT)
    assert blind.session_actions == ()
    assert {s.why for s in blind.skipped} == {
        "select.workloads is set but sessions are not placed on workloads (no pod index)"
    }
