"""pgrelief installed for real: the image built here from the repository's Dockerfile, the chart
installed with ``helm install``, the operator running as pods under the chart's ServiceAccount
and RBAC on a real node, against PostgreSQL beside the cluster (the node's network namespace).

What the test API server (tests/kube) cannot show, shown here: the image starts and runs as
its non-root user with a read-only root file system; the kubelet's liveness probes pass; the
metrics Service answers from inside the cluster; sessions leaked by real application pods are
terminated and the Events name the pod's address; the managed PgBouncer runs as pods behind
its Service, carries pgbench, rolls on a policy change without failing a transaction and goes
with its policy; an operator process killed with SIGKILL is restarted by its Deployment and
keeps the hourly budget from the policy's status; ``helm uninstall`` keeps the CRD.

The tests share one release (module scope) and run in file order; the last uninstalls it.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgrelief import act
from pgrelief.manifests.common import object_name
from pgrelief.pgbouncer_auth import install_statements
from pgrelief.policy import validate_spec
from tests.e2e.release import (
    TXN_CLIENT,
    Release,
    client_pod,
    events,
    get,
    http_get,
    in_pod,
    items,
    kill_operator_process,
    leaky_deployment,
    new_role,
    pod_ips,
    sessions_of,
    wait_for,
    wait_for_len,
)
from tests.fixtures.e2e import E2ECluster, NetnsPostgres
from tests.kube.operator_harness import policy_manifest, secret_manifest

pytestmark = pytest.mark.e2e

CRD = "connectionpolicies.pgrelief.dev"
OPERATOR_ROLE = "pgrelief"
LOGIN_SECRET = "pg-login"
PGBOUNCER_USER_ID = 1001  # the pgbouncer image's user (tests/e2e-cluster/images/pgbouncer)
POOLER = object_name("shop")  # the managed PgBouncer's objects, of the policy "shop"
APP_PASSWORD = "app-secret"
LOOKUP_PASSWORD = "lookup-secret"
LOOKUP_SECRET = "pgbouncer-auth"


@pytest.fixture(scope="module")
def apps(e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres) -> Iterator[str]:
    """The namespace the operator watches (applications, policies, the login Secret)."""
    name = f"apps-{uuid.uuid4().hex[:6]}"
    e2e_cluster.kubectl("create", "namespace", name)
    with e2e_postgres.connect() as conn:
        conn.execute(
            f"do $$ begin if not exists (select from pg_roles where rolname = '{OPERATOR_ROLE}')"
            f" then create role {OPERATOR_ROLE} login; end if; end $$"
        )
        conn.execute(f"grant pg_read_all_stats, pg_signal_backend to {OPERATOR_ROLE}")
    wait_for("the default ServiceAccount", lambda: get(e2e_cluster, "sa", "default", "-n", name))
    e2e_cluster.apply(
        secret_manifest(LOGIN_SECRET, name, OPERATOR_ROLE, "trusted-from-pods"), namespace=name
    )
    yield name
    # Policies keep pgrelief's finalizer once the operator is gone (uninstalled): let them go.
    for policy in items(e2e_cluster, "cpol", "-n", name):
        e2e_cluster.kubectl(
            "patch", "cpol", policy["metadata"]["name"], "-n", name, "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}', check=False,
        )  # fmt: skip
    e2e_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(e2e_cluster: E2ECluster, apps: str) -> Iterator[Release]:
    image = e2e_cluster.project_image()
    namespace = f"pgrelief-{uuid.uuid4().hex[:6]}"
    e2e_cluster.kubectl("create", "namespace", namespace)
    installed = Release(e2e_cluster, "pgrelief", namespace, apps, image)
    installed.install()
    yield installed
    if installed.installed():
        installed.uninstall()
    e2e_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def client(e2e_cluster: E2ECluster, apps: str) -> str:
    return client_pod(e2e_cluster, apps)


def _policy(pg: NetnsPostgres, name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {"interval": "1s", **spec}
    return policy_manifest(
        name, namespace, host=pg.host, port=pg.port, secret=LOGIN_SECRET, spec=body
    )


def _cpol_row(cluster: E2ECluster, namespace: str, name: str) -> dict[str, str]:
    """``kubectl get cpol NAME`` as the user reads it: the printer columns by header."""
    header, row = cluster.kubectl("get", "cpol", name, "-n", namespace).stdout.splitlines()
    return dict(zip(header.split(), row.split(), strict=True))


def _samples(text: str, name: str, labels: dict[str, str]) -> list[float]:
    """Values of the samples of ``name`` (summed over the labels not given) in a scrape."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                key = tuple(sorted(labels.items()))
                found[key] = found.get(key, 0.0) + sample.value
    return list(found.values())


def _healthz_answered(release: Release, pod: str) -> bool:
    """The kubelet's liveness probe got 200 from kopf's /healthz (kopf logs each request)."""
    for line in release.logs(pod).splitlines():
        probe = '"GET /healthz' in line and "kube-probe/" in line
        if probe and json.loads(line).get("response_status") == 200:
            return True
    return False


# ------------------------------------------------------------------------------ the chart
def test_the_chart_runs_the_image_built_here_under_its_service_account_with_live_probes(
    e2e_cluster: E2ECluster, release: Release, client: str
) -> None:
    pods = release.pods()
    assert len(pods) == 2  # the chart's default: one acts, one stands by
    (account,) = items(
        e2e_cluster,
        "sa",
        "-n",
        release.namespace,
        "-l",
        f"app.kubernetes.io/instance={release.name}",
    )
    for pod in pods:
        spec, status = pod["spec"], pod["status"]
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        (container,) = spec["containers"]
        assert (container["image"], container["imagePullPolicy"]) == (release.image, "Never")
        (state,) = status["containerStatuses"]
        assert state["ready"] and state["restartCount"] == 0 and "running" in state["state"]
        # The Dockerfile's user, and a root file system the container cannot write.
        name = pod["metadata"]["name"]
        ns = release.namespace
        assert (
            e2e_cluster.kubectl("exec", "-n", ns, name, "--", "id", "-u").stdout.strip() == "10001"
        )
        touch = e2e_cluster.kubectl("exec", "-n", ns, name, "--", "touch", "/x", check=False)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    # The kubelet probes liveness (first after 15 s) and the operator answers.
    for pod in pods:
        name = pod["metadata"]["name"]
        probed = functools.partial(_healthz_answered, release, name)
        wait_for(f"a liveness probe of {name} answered", probed, timeout=90)
    # Metrics: each pod's endpoint, and the Service in front of them, from inside the cluster.
    service = get(e2e_cluster, "svc", f"{release.name}-metrics", "-n", release.namespace)
    port = service["spec"]["ports"][0]["port"]
    for pod in pods:
        text = http_get(
            e2e_cluster, release.apps, client, f"http://{pod['status']['podIP']}:{port}/metrics"
        )
        assert "# TYPE pgrelief_" in text
    text = http_get(
        e2e_cluster, release.apps, client, f"http://{service['spec']['clusterIP']}:{port}/metrics"
    )
    assert "# TYPE pgrelief_" in text
    for pod in pods:
        assert release.refusals(pod["metadata"]["name"]) == []


# ------------------------------------------------------------------------------ leaked sessions
def test_sessions_leaked_by_application_pods_are_terminated_and_the_events_name_them(
    e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres, release: Release, apps: str, client: str
) -> None:
    cluster, pg = e2e_cluster, e2e_postgres
    role = new_role(pg, "checkout")
    leaky = leaky_deployment(
        "checkout", cluster.image("client"), 3, pg, user=role, application="checkout-api"
    )
    cluster.apply(leaky, namespace=apps)
    leaked = wait_for_len("3 leaked sessions", lambda: sessions_of(pg, role), 3)
    ips = pod_ips(cluster, apps, "app=checkout")
    assert set(leaked.values()) == set(ips.values())  # the server sees each pod's own address
    policy = _policy(
        pg, "orders", apps,
        remediation={"mode": "Enforce", "onlyUnderPressure": False,
                     "terminate": {"idleInTransactionAfter": "2s"}},
    )  # fmt: skip
    cluster.apply(policy, namespace=apps)
    try:
        wait_for("the leaked sessions terminated", lambda: not sessions_of(pg, role))
        terminated = wait_for_len(
            "3 BackendTerminated Events",
            lambda: events(cluster, apps, "orders", "BackendTerminated"),
            3,
        )
        messages = sorted(e["message"] for e in terminated)
        expected = sorted(
            f"terminated pid {pid} (role {role}, application 'checkout-api', client {ip}, "
            "database postgres; idle in transaction for "
            for pid, ip in leaked.items()
        )
        assert [m[: len(e)] for m, e in zip(messages, expected, strict=True)] == expected
        acting = {e["reportingInstance"] for e in terminated}
        assert len(acting) == 1 and acting <= {p["metadata"]["name"] for p in release.pods()}
        (pod,) = acting

        # kubectl get cpol: what the user reads.
        wait_for("the policy Ready", lambda: _cpol_row(cluster, apps, "orders")["READY"] == "True")
        row = _cpol_row(cluster, apps, "orders")
        assert (row["PRESSURE"], row["MODE"]) == ("healthy", "Enforce")
        status = get(cluster, "cpol", "orders", "-n", apps)["status"]
        assert status["terminationsTotal"] == 3 and len(status["recentTerminations"]) == 3

        # The audit in the acting pod's log: intent, then outcome, for each session.
        done = {r["target"] for r in release.audit(pod) if r["outcome"] == "done"}
        assert done == {f"pid {pid}" for pid in leaked}
        # Its metrics, scraped from a pod; the standby exports nothing for the policy.
        labels = {"namespace": apps, "policy": "orders"}
        for name, address in pod_ips(
            cluster, release.namespace, f"app.kubernetes.io/instance={release.name}"
        ).items():
            text = http_get(cluster, apps, client, f"http://{address}:9090/metrics")
            ready = _samples(text, "pgrelief_policy_ready", labels)
            done_total = _samples(
                text, "pgrelief_actions_total", {**labels, "action": "terminate", "outcome": "done"}
            )
            if name == pod:
                assert (ready, done_total) == ([1.0], [3.0]), text[-3000:]
            else:
                assert (ready, done_total) == ([], []), text[-3000:]
    finally:
        cluster.kubectl("delete", "cpol", "orders", "-n", apps, "--timeout=60s")
        cluster.kubectl("delete", "deployment", "checkout", "-n", apps, "--wait=false")


# ------------------------------------------------------------------------------ PgBouncer
def _pgbouncer_database(pg: NetnsPostgres, cluster: E2ECluster, apps: str) -> tuple[str, str, str]:
    """An application role (password) owning its database, and a lookup role whose password
    is in a Secret, with the lookup function installed as a DBA would: (role, db, lookup)."""
    role = new_role(pg, "shop", password=APP_PASSWORD)
    lookup = new_role(pg, "pgbouncer_auth", password=LOOKUP_PASSWORD)
    database = f"{role}_db"
    with pg.connect() as conn:
        conn.execute(f'create database "{database}" owner "{role}"')
    query = validate_spec(
        {"pgbouncer": _pgbouncer(role, database, lookup)}
    ).pgbouncer.auth.auth_query
    assert query is not None
    with pg.connect(dbname=database) as conn:
        for statement in install_statements(query):
            conn.execute(act.composed(statement))
    secret = secret_manifest(LOOKUP_SECRET, apps, lookup, LOOKUP_PASSWORD)
    cluster.apply(secret, namespace=apps)
    return role, database, lookup


def _pgbouncer(role: str, database: str, lookup: str, **changes: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "replicas": 2,
        # The pgbouncer image built here: Debian's 1.18, whose settings the builders gate.
        "image": "localhost/pgrelief/pgbouncer:e2e",
        "version": "1.18",
        "runAsUser": PGBOUNCER_USER_ID,
        "runAsGroup": PGBOUNCER_USER_ID,
        "databases": [database],
        "users": [role],
        "defaultPoolSize": 4,
        "reservePoolSize": 0,
        "maxClientConn": 200,
        "auth": {
            "authQuery": {
                "user": lookup,
                "passwordSecret": {"name": LOOKUP_SECRET, "key": "password"},
            }
        },
        **changes,
    }


def _pooler_pods(cluster: E2ECluster, apps: str) -> list[dict[str, Any]]:
    return items(cluster, "pods", "-n", apps, "-l", f"app.kubernetes.io/instance={POOLER}")


def _rolled(cluster: E2ECluster, apps: str, template_hash: str) -> bool:
    """Every pooler pod is of the new template and ready, and the old ones are gone."""
    pods = _pooler_pods(cluster, apps)
    return len(pods) == 2 and all(
        p["metadata"]["labels"].get("pod-template-hash") == template_hash
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
        for p in pods
    )


def _new_template(cluster: E2ECluster, apps: str, before: dict[str, Any]) -> str | None:
    """The pod-template-hash of the pooler's ReplicaSet for a changed Deployment, once the
    Deployment controller has made it."""
    deployment = get(cluster, "deployment", POOLER, "-n", apps)
    generation = deployment["metadata"]["generation"]
    if generation <= before["metadata"]["generation"]:
        return None
    if deployment["status"].get("observedGeneration", 0) < generation:
        return None
    revision = deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
    for replica_set in items(
        cluster, "rs", "-n", apps, "-l", f"app.kubernetes.io/instance={POOLER}"
    ):
        meta = replica_set["metadata"]
        if meta["annotations"].get("deployment.kubernetes.io/revision") == revision:
            return str(meta["labels"]["pod-template-hash"])
    return None


def test_the_managed_pgbouncer_pools_rolls_without_a_failed_transaction_and_goes_with_its_policy(
    e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres, release: Release, apps: str, client: str
) -> None:
    cluster, pg = e2e_cluster, e2e_postgres
    role, database, lookup = _pgbouncer_database(pg, cluster, apps)
    spec = _pgbouncer(role, database, lookup)
    policy = _policy(pg, "shop", apps, remediation={"mode": "DryRun"}, pgbouncer=spec)
    cluster.apply(policy, namespace=apps)

    # Two pods behind the Service, the condition saying so.
    def ready() -> dict[str, Any]:
        found = get(cluster, "cpol", "shop", "-n", apps).get("status", {}).get("conditions", [])
        return next(
            (c for c in found if c["type"] == "PgBouncerReady" and c["status"] == "True"), {}
        )

    condition = wait_for("PgBouncerReady", ready, timeout=120)
    assert condition["message"].startswith("2/2 PgBouncer replicas available")
    pooler_ips = set(pod_ips(cluster, apps, f"app.kubernetes.io/instance={POOLER}").values())
    assert len(pooler_ips) == 2
    slices = items(
        cluster, "endpointslices", "-n", apps, "-l", f"kubernetes.io/service-name={POOLER}"
    )
    served = {
        a
        for s in slices
        for e in s["endpoints"]
        if e["conditions"].get("ready")
        for a in e["addresses"]
    }
    assert served == pooler_ips
    service_ip = get(cluster, "svc", POOLER, "-n", apps)["spec"]["clusterIP"]

    # pgbench from a pod, through the Service: 16 clients share 2 x 4 server connections.
    init = in_pod(
        cluster,
        apps,
        client,
        "pgbench",
        "-i",
        "-s",
        "1",
        "-h",
        pg.host,
        "-p",
        str(pg.port),
        "-U",
        role,
        database,
    )
    assert "done in" in init.stderr, init.stderr
    bench = in_pod(
        cluster, apps, client, "env", f"PGPASSWORD={APP_PASSWORD}", "pgbench", "-n", "-S",
        "-c", "16", "-j", "2", "-T", "5", "-h", service_ip, "-p", "5432", "-U", role, database,
    )  # fmt: skip
    assert "number of failed transactions: 0 (0.000%)" in bench.stdout, bench.stdout + bench.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", bench.stdout)
    assert processed is not None and int(processed.group(1)) > 100
    server_side = sessions_of(pg, role)
    assert set(server_side.values()) == pooler_ips  # both pods pooled, seen by their addresses
    assert len(server_side) <= 2 * 4

    # A policy change rolls the pods while a client keeps transactions going through them.
    with pg.connect(user=role, dbname=database) as conn:
        conn.execute("create table roll_counter (client int primary key, n bigint not null)")
        conn.execute("insert into roll_counter select g, 0 from generate_series(0, 3) g")
    in_pod(
        cluster,
        apps,
        client,
        "sh",
        "-c",
        "rm -f /tmp/stop; cat > /tmp/txn_client.py",
        input=TXN_CLIENT.read_text(),
    )
    load = subprocess.Popen(
        [*cluster.kubectl_command(), "exec", "-n", apps, client, "--",
         "env", f"PGPASSWORD={APP_PASSWORD}", "python3", "/tmp/txn_client.py",
         "--host", service_ip, "--dbname", database, "--user", role, "--clients", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        before = get(cluster, "deployment", POOLER, "-n", apps)
        time.sleep(3)
        policy["spec"]["pgbouncer"] = {**spec, "maxClientConn": 300}
        cluster.apply(policy, namespace=apps)
        new_hash = wait_for("the new ReplicaSet", lambda: _new_template(cluster, apps, before))
        changed = get(cluster, "deployment", POOLER, "-n", apps)
        assert changed["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
        # Counted from the pods themselves (Ready, not terminating): the Deployment's own
        # availableReplicas sums its ReplicaSets' statuses, which lag one another mid-roll.
        serving: list[int] = []
        reported: list[int] = []

        def rolled() -> bool:
            pods = items(cluster, "pods", "-n", apps, "-l", f"app.kubernetes.io/instance={POOLER}")
            serving.append(sum(1 for pod in pods if _serving(pod)))
            status = get(cluster, "deployment", POOLER, "-n", apps)["status"]
            reported.append(status.get("availableReplicas", 0))
            return _rolled(cluster, apps, new_hash)

        assert new_hash is not None
        wait_for("the pods rolled", rolled, timeout=180)
        print(f"pods serving during the roll: {serving}; Deployment reported: {reported}")
        assert min(serving) >= 2, (serving, reported)  # never below the wanted replicas
        time.sleep(2)
    finally:
        in_pod(cluster, apps, client, "touch", "/tmp/stop")
        out, err = load.communicate(timeout=60)
    counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert counts, err
    with pg.connect(user=role, dbname=database) as conn:
        rows = conn.execute("select client, n from roll_counter order by client").fetchall()
    # No transaction failed mid-way, and the database holds exactly what was reported committed.
    assert counts["failed"] == 0, counts["errors"]
    assert [int(str(n)) for _, n in rows] == counts["per_client"]
    assert counts["committed"] > 100
    print(f"transactions through the roll: {counts}")

    # The policy deleted: garbage collection takes the pooler with it.
    cluster.kubectl("delete", "cpol", "shop", "-n", apps, "--timeout=60s")
    wait_for(
        "the pooler collected",
        lambda: (
            not any(
                items(cluster, kind, "-n", apps, "-l", f"app.kubernetes.io/instance={POOLER}")
                for kind in (
                    "deployments",
                    "replicasets",
                    "pods",
                    "configmaps",
                    "services",
                    "poddisruptionbudgets",
                )
            )
        ),
        timeout=120,
    )


def _serving(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# ------------------------------------------------------------------------------ SIGKILL
def _restarted(cluster: E2ECluster, release: Release, pod: str) -> dict[str, Any] | None:
    """The pod, once its container has been restarted and is ready again."""
    found = get(cluster, "pod", pod, "-n", release.namespace)
    statuses = found.get("status", {}).get("containerStatuses") or [{}]
    if statuses[0].get("restartCount", 0) >= 1 and statuses[0].get("ready"):
        return found
    return None


def test_an_operator_killed_while_relieving_is_restarted_and_keeps_the_hourly_budget(
    e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres, release: Release, apps: str
) -> None:
    """Five leaked sessions, a budget of one termination a cycle and three an hour. The acting
    operator is killed (SIGKILL, no chance to write anything) right after its first
    termination: its Deployment's pod restarts the container, a replica takes over, and
    between them exactly three sessions are terminated, each once: the hour's window comes
    back from the policy's status, not from the dead process's memory."""
    cluster, pg = e2e_cluster, e2e_postgres
    role = new_role(pg, "billing")
    cluster.apply(
        leaky_deployment(
            "billing", cluster.image("client"), 5, pg, user=role, application="billing"
        ),
        namespace=apps,
    )
    leaked = wait_for_len("5 leaked sessions", lambda: sessions_of(pg, role), 5)
    policy = _policy(
        pg, "budget", apps,
        remediation={"mode": "Enforce", "onlyUnderPressure": False,
                     "terminate": {"idleInTransactionAfter": "1s"},
                     "budget": {"maxPerCycle": 1, "maxPerHour": 3}},
    )  # fmt: skip
    cluster.apply(policy, namespace=apps)
    try:
        first = wait_for(
            "the first termination", lambda: events(cluster, apps, "budget", "BackendTerminated")
        )
        victim = first[0]["reportingInstance"]
        kill_operator_process(victim)
        killed = time.monotonic()
        restarted = wait_for(
            f"{victim} restarted by the kubelet", lambda: _restarted(cluster, release, victim)
        )
        restart_s = time.monotonic() - killed
        last = restarted["status"]["containerStatuses"][0]["lastState"]["terminated"]
        assert last["exitCode"] == 137 and last["reason"] == "Error"  # SIGKILL
        # Relief resumes (after the dead replica's peering entry expires) up to the budget.
        wait_for("3 sessions terminated", lambda: len(sessions_of(pg, role)) == 2, timeout=180)
        print(
            f"SIGKILL of the acting operator: container restarted in {restart_s:.1f} s, "
            f"the budget used up {time.monotonic() - killed:.1f} s after the kill"
        )
        wait_for(
            "RemediationBudgetExhausted",
            lambda: events(cluster, apps, "budget", "RemediationBudgetExhausted"),
            timeout=60,
        )
        time.sleep(5)  # a few more cycles: the budget holds
        survivors = sessions_of(pg, role)
        assert len(survivors) == 2 and set(survivors) < set(leaked)
        # Every container's audit, the killed one's included: each session terminated once.
        records = [
            r
            for pod in release.pods()
            for previous in ((False, True) if pod["metadata"]["name"] == victim else (False,))
            for r in release.audit(pod["metadata"]["name"], previous=previous)
            if r["policy"] == f"{apps}/budget" and r["action"] == "terminate"
        ]
        done = [r["target"] for r in records if r["outcome"] == "done"]
        assert sorted(done) == sorted({f"pid {pid}" for pid in leaked if pid not in survivors})
        messages = [e["message"] for e in events(cluster, apps, "budget", "BackendTerminated")]
        assert len(messages) == 3 and len(set(messages)) == 3
        status = get(cluster, "cpol", "budget", "-n", apps)["status"]
        assert len(status["recentTerminations"]) == 3 and status["terminationsLastHour"] == 3
    finally:
        cluster.kubectl("delete", "cpol", "budget", "-n", apps, "--timeout=120s")
        cluster.kubectl("delete", "deployment", "billing", "-n", apps, "--wait=false")


# ------------------------------------------------------------------------------ uninstall
def test_helm_uninstall_removes_the_operator_and_keeps_the_crd_and_the_policies(
    e2e_cluster: E2ECluster, e2e_postgres: NetnsPostgres, release: Release, apps: str
) -> None:
    cluster = e2e_cluster
    cluster.apply(
        _policy(e2e_postgres, "kept", apps, remediation={"mode": "DryRun"}), namespace=apps
    )
    wait_for(
        "the policy served",
        lambda: (
            get(cluster, "cpol", "kept", "-n", apps).get("status", {}).get("observedGeneration")
        ),
    )
    release.uninstall()
    instance = f"app.kubernetes.io/instance={release.name}"
    wait_for(
        "the operator's pods gone",
        lambda: not items(cluster, "pods", "-n", release.namespace, "-l", instance),
        timeout=120,
    )
    for namespace, kinds in (
        (release.namespace, "deployments,replicasets,services,serviceaccounts"),
        (apps, "roles,rolebindings,kopfpeerings"),
    ):
        assert items(cluster, kinds, "-n", namespace, "-l", instance) == [], kinds
    assert not items(cluster, "clusterroles,clusterrolebindings", "-l", instance)
    assert get(cluster, "crd", CRD)["metadata"]["name"] == CRD
    assert get(cluster, "cpol", "kept", "-n", apps)["spec"]["remediation"]["mode"] == "DryRun"
