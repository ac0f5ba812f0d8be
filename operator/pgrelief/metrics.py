"""Prometheus metrics of the operator, per ConnectionPolicy (the only prometheus_client user).

Utilization is measured against *usable* slots (max_connections minus both reserves), the
number at which PostgreSQL starts refusing ordinary clients; the usual exporters divide by
max_connections and alert too late. Series of a deleted policy are removed with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pgrelief.audit import AuditRecord
from pgrelief.diagnosis import Diagnosis

NAMESPACE = "pgrelief"
POLICY_LABELS = ("namespace", "policy")
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WORKLOAD_LABELS = ("workload_namespace", "workload_kind", "workload")
WORKLOAD_SERIES = 20  # workloads exported per policy (the biggest holders): bounded cardinality
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class OperatorMetrics:
    """The operator's series, in a registry of its own (tests start several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = POLICY_LABELS
        self.connections = Gauge(
            "connections",
            "Client backends by pg_stat_activity state at the last diagnosis.",
            [*labels, "state"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.client_backends = Gauge(
            "client_backends",
            "Client backends at the last diagnosis.",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.usable_slots = Gauge(
            "usable_slots",
            "max_connections - superuser_reserved_connections - reserved_connections.",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.utilization = Gauge(
            "utilization_ratio",
            "Client backends / usable slots at the last diagnosis (1.0 = clients refused).",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.pressure = Gauge(
            "pressure_level",
            "Pressure of the last diagnosis: 0 healthy, 1 warning, 2 critical, 3 unknown.",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.actions = Counter(
            "actions",
            "Actions by kind, outcome and rule (terminate rules: idleAfter, ...).",
            [*labels, "action", "outcome", "rule"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.cycle_seconds = Histogram(
            "cycle_duration_seconds",
            "Wall time of one observe-diagnose-plan-act cycle.",
            labels,
            namespace=NAMESPACE,
            buckets=CYCLE_BUCKETS,
            registry=self.registry,
        )
        # One series for the process, not per policy: a cycle starts late because the shared
        # pool or the event loop is saturated, which is the operator's state, not a policy's.
        self.cycle_lag = Histogram(
            "cycle_lag_seconds",
            "How late a cycle started behind its schedule (pool queueing, a busy event loop).",
            namespace=NAMESPACE,
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.cycle_failures = Counter(
            "cycle_failures",
            "Cycles that could not complete, by reason (DatabaseUnreachable, ...).",
            [*labels, "reason"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.last_success = Gauge(
            "last_successful_cycle_timestamp_seconds",
            "Unix time of the last cycle that completed.",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.ready = Gauge(
            "policy_ready",
            "1 when the policy's Ready condition is True.",
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.workload_connections = Gauge(
            "workload_connections",
            f"Client backends by the workload they come from and state (the {WORKLOAD_SERIES} "
            "biggest workloads; workload_kind empty: sessions no Pod could be blamed for).",
            [*labels, *WORKLOAD_LABELS, "state"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.pooler_waiting = Gauge(
            "pooler_clients_waiting",
            "PgBouncer clients waiting for a server connection (SHOW POOLS cl_waiting), by pod.",
            [*labels, "pooler_pod"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.pooler_max_wait = Gauge(
            "pooler_max_wait_seconds",
            "How long the longest-waiting PgBouncer client has waited (SHOW POOLS maxwait).",
            [*labels, "pooler_pod"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self._workload_series: dict[tuple[str, str], set[tuple[str, ...]]] = {}
        self._pooler_series: dict[tuple[str, str], set[str]] = {}

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def cycle_done(
        self,
        key: tuple[str, str],
        diagnosis: Diagnosis,
        records: Sequence[AuditRecord],
        seconds: float,
        finished: datetime,
    ) -> None:
        totals = diagnosis.totals
        for state, count in totals.by_state.items():
            self.connections.labels(*key, state).set(count)
        self.client_backends.labels(*key).set(totals.client_backends)
        usable = diagnosis.server.usable_slots if diagnosis.server else 0
        self.usable_slots.labels(*key).set(usable)
        self.utilization.labels(*key).set(totals.client_backends / usable if usable else 0.0)
        self.pressure.labels(*key).set(int(diagnosis.pressure))
        for record in records:
            if record.outcome == "intent":
                continue
            rule = str(record.evidence.get("rule") or "")
            self.actions.labels(*key, record.action, record.outcome, rule).inc()
        self.cycle_seconds.labels(*key).observe(seconds)
        self.last_success.labels(*key).set(finished.timestamp())
        self.ready.labels(*key).set(1)
        self._workloads(key, diagnosis)

    def _workloads(self, key: tuple[str, str], diagnosis: Diagnosis) -> None:
        """The workload and pooler series of this cycle; those of the last that are gone go."""
        series: set[tuple[str, ...]] = set()
        for group in diagnosis.breakdown.by_workload[:WORKLOAD_SERIES]:
            workload = group.workload
            names = (workload.namespace, workload.kind, workload.name) if workload else ("", "", "")
            for state, count in group.by_state.items():
                self.workload_connections.labels(*key, *names, state).set(count)
                series.add((*names, state))
        for stale in self._workload_series.get(key, set()) - series:
            self.workload_connections.remove(*key, *stale)
        self._workload_series[key] = series
        pods: set[str] = set()
        for pooler in diagnosis.poolers:
            waiting = sum(p.cl_waiting for p in pooler.pools if p.database != "pgbouncer")
            longest = max((p.maxwait_s for p in pooler.pools), default=0.0)
            self.pooler_waiting.labels(*key, pooler.pod).set(waiting)
            self.pooler_max_wait.labels(*key, pooler.pod).set(longest)
            pods.add(pooler.pod)
        for stale_pod in self._pooler_series.get(key, set()) - pods:
            self.pooler_waiting.remove(*key, stale_pod)
            self.pooler_max_wait.remove(*key, stale_pod)
        self._pooler_series[key] = pods

    def cycle_failed(self, key: tuple[str, str], reason: str) -> None:
        self.cycle_failures.labels(*key, reason).inc()
        self.ready.labels(*key).set(0)
        self.pressure.labels(*key).set(3)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop every series of a deleted policy."""
        for metric in (
            self.connections,
            self.client_backends,
            self.usable_slots,
            self.utilization,
            self.pressure,
            self.actions,
            self.cycle_seconds,
            self.cycle_failures,
            self.last_success,
            self.ready,
            self.workload_connections,
            self.pooler_waiting,
            self.pooler_max_wait,
        ):
            metric.remove_by_labels(dict(zip(POLICY_LABELS, key, strict=True)))
        self._workload_series.pop(key, None)
        self._pooler_series.pop(key, None)
