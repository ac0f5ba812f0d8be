"""One ConnectionPolicy's life in the operator: its lifeline, its cycles, its status and Events.

A kopf daemon runs ``PolicyWorker.run`` for each policy. Why a daemon and not a timer: a
timer's interval is fixed when the handler is declared, but every policy has its own
``spec.interval`` (250ms...1h) that may change at any time, and under pressure a cycle wakes
at the next session's deadline rather than the interval. A daemon also owns state for the
policy's lifetime — the lifeline connection kept across cycles, the cycle's memory of what it
already reported — and is stopped by kopf (closing that connection) when the policy goes.

The event loop is never blocked: each cycle is one job in a shared thread pool (sync psycopg
and the sync kubernetes client), so a slow or frozen server delays only its own policy. The
loop only sleeps until the next cycle, the stop, or a new generation of the spec.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgrelief.audit import AuditSink
from pgrelief.connection import ManagedConnection
from pgrelief.controller.attribution import Attributor, PolicyAttribution
from pgrelief.controller.credentials import CredentialsError, policy_conninfo
from pgrelief.controller.events import EventRecorder
from pgrelief.controller.kube import Kube, KubeError
from pgrelief.controller.pgbouncer import PgBouncerReconciler
from pgrelief.controller.status_store import StatusStore
from pgrelief.cycle import Cycle, CycleReport
from pgrelief.errors import ConnectFailed, PgreliefError, ServerRefused
from pgrelief.manifests import events as notes
from pgrelief.manifests.common import Owner
from pgrelief.manifests.status import after_cycle, not_ready, with_condition
from pgrelief.metrics import OperatorMetrics
from pgrelief.observe import connect
from pgrelief.pgbouncer_auth import READY_CONDITION as PGBOUNCER_READY
from pgrelief.policy import (
    Condition,
    ConnectionPolicy,
    ConnectionPolicyStatus,
    PolicyError,
    validate_policy,
)

log = logging.getLogger(__name__)

CYCLE_DEADLINE_S = 30.0
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
_KEPT = ("apiVersion", "kind", "metadata", "spec", "status")
_IDLE_S = 3600.0


@dataclass
class OperatorContext:
    """What every worker shares: the API, the pool its cycles run in, metrics, the audit."""

    kube: Kube
    executor: Executor
    metrics: OperatorMetrics
    audit: AuditSink
    instance: str
    workers: dict[tuple[str, str], PolicyWorker] = field(default_factory=dict)
    attributor: Attributor | None = None  # None: sessions are not placed on workloads


class PolicyWorker:
    """Drives one policy's cycles; ``run`` is its kopf daemon body."""

    def __init__(self, context: OperatorContext, raw: Mapping[str, Any]) -> None:
        meta = raw["metadata"]
        self.context = context
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = (self.namespace, self.name)
        self.events = EventRecorder(
            context.kube,
            {"name": self.name, "namespace": self.namespace, "uid": meta.get("uid")},
            context.instance,
        )
        self.store = StatusStore(context.kube, self.namespace, self.name, status_of(raw))
        self.pgbouncer = PgBouncerReconciler(
            context.kube, Owner(self.name, self.namespace, meta.get("uid") or "")
        )
        self.attribution = (
            PolicyAttribution(context.attributor, context.kube, context.instance)
            if context.attributor is not None
            else None
        )
        self._pgbouncer_problem: str | None = None
        self.finished = asyncio.Event()
        # Set by ``notice`` (a new spec) and ``nudge`` (a managed object changed); it stays set
        # through a running step, so a wake-up during the step makes the next sleep zero.
        self._wake = asyncio.Event()
        self.generation: int | None = None
        self.cycles = 0
        self._connection: ManagedConnection | None = None
        self._connection_key: tuple[Any, ...] | None = None
        self._cycle: Cycle | None = None
        self._policy: ConnectionPolicy | None = None
        self._problem: str | None = None  # the ongoing problem already announced as an Event
        self._pressure: str | None = self.store.written.pressure if self.store.written else None
        self._budget_exhausted = False
        self._retry = RETRY_FIRST_S

    # ---- the daemon ---------------------------------------------------------------------
    async def run(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Cycle until kopf stops the daemon (the policy is deleted, or the operator stops)."""
        loop = asyncio.get_running_loop()
        due = time.monotonic()
        try:
            while not stopped:
                snapshot = _plain(body)
                self.generation = snapshot["metadata"].get("generation")
                delay = await loop.run_in_executor(self.context.executor, self.step, snapshot, due)
                due = await self._sleep(delay, stopped, body)
        finally:
            await loop.run_in_executor(self.context.executor, self.close)
            self.finished.set()

    def close(self) -> None:
        if self.attribution is not None:
            self.attribution.close()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def notice(self, generation: int | None) -> None:
        """A watch event of the policy arrived (kopf's ``on.event``): a new spec wakes us."""
        if generation != self.generation:
            self._wake.set()

    def nudge(self) -> None:
        """Something pgrelief manages for this policy changed (its PgBouncer): look again now."""
        self._wake.set()

    async def _sleep(self, delay: float, stopped: Any, body: Mapping[str, Any]) -> float:
        """Sleep ``delay``, or less: until stopped, a new generation of the spec, or a nudge.

        kopf keeps ``body`` up to date from the watch stream; ``notice`` wakes us when the
        generation moves and ``nudge`` when a managed PgBouncer object changes: one wait per
        cycle, no polling (1,000 sleeping policies polling
        once a second cost a quarter of a core). Returns when the next cycle was due (the
        deadline, or the moment a new generation was noticed).
        """
        deadline = time.monotonic() + delay
        if stopped or self._due_now(body):
            return min(deadline, time.monotonic())
        waits = {
            asyncio.ensure_future(stopped.wait(delay)),
            asyncio.ensure_future(self._wake.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._wake.clear()
        return min(deadline, time.monotonic())

    def _due_now(self, body: Mapping[str, Any]) -> bool:
        """A wake-up that came while the step ran (in the pool) is not lost: it is taken here."""
        woken = self._wake.is_set()
        self._wake.clear()
        return woken or body.get("metadata", {}).get("generation") != self.generation

    # ---- one step (in a worker thread) --------------------------------------------------
    def step(self, raw: Mapping[str, Any], due: float | None = None) -> float:
        """Validate the spec, then run one cycle and publish what it found and did; returns
        the seconds to wait before the next step.

        ``due``: when (``time.monotonic``) the cycle should have started; how late it starts
        here, in the pool thread, is the lag the scale benchmark reads from the metrics.
        """
        if due is not None:
            self.context.metrics.cycle_lag.observe(max(0.0, time.monotonic() - due))
        generation = raw["metadata"].get("generation")
        try:
            policy = validate_policy(
                {key: raw[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in raw},
                source=f"ConnectionPolicy {self.namespace}/{self.name}",
            )
        except PolicyError as error:
            self._fail(notes.POLICY_INVALID, str(error), generation, marker=f"gen {generation}")
            return _IDLE_S
        cycle = self._prepare(policy)
        assert self._connection is not None
        started = time.monotonic()
        try:
            conn = self._connection.get()
            with self._connection.deadline(CYCLE_DEADLINE_S):
                report = cycle.run(conn)
        except CredentialsError as error:
            self._fail(notes.CREDENTIALS_MISSING, str(error), generation, marker=str(error))
            return self._backoff()
        except (ConnectFailed, ServerRefused, psycopg.OperationalError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self._fail(notes.DATABASE_UNREACHABLE, message, generation)
            return min(self._backoff(), policy.spec.interval_seconds)
        except (PgreliefError, psycopg.Error) as error:
            self._fail(None, f"the cycle failed: {error}", generation)
            return min(self._backoff(), policy.spec.interval_seconds)
        self._publish(policy, report, generation, time.monotonic() - started)
        self._retry = RETRY_FIRST_S
        # Under pressure, the moment the next session comes due (the shared cycle decides).
        return report.wait_s(policy.spec.interval_seconds, since=started)

    def _prepare(self, policy: ConnectionPolicy) -> Cycle:
        """The cycle for ``policy``: a new lifeline if how to reach the server changed."""
        self._policy = policy
        postgres = policy.spec.postgres
        key = (postgres.model_dump_json(), policy.metadata.namespace)
        if self._connection is None or key != self._connection_key:
            self.close()
            self._connection = ManagedConnection(self._conninfo, reconnect_within_s=RETRY_FIRST_S)
            self._connection_key = key
        if self._cycle is None:
            self._cycle = Cycle(policy, self.store, self.context.audit)
            if self.attribution is not None:
                enrich = self.attribution.enrich
                self._cycle.enrich = lambda snapshot: enrich(snapshot, self._current_policy())
        self._cycle.policy = policy
        return self._cycle

    def _current_policy(self) -> ConnectionPolicy:
        assert self._policy is not None
        return self._policy

    def _conninfo(self) -> str:
        assert self._policy is not None
        return policy_conninfo(self.context.kube, self._policy)

    def _publish(
        self, policy: ConnectionPolicy, report: CycleReport, generation: int | None, took: float
    ) -> None:
        now = datetime.now(UTC)
        self.cycles += 1
        diagnosis = report.before
        announcements = self._recovered()
        attribution = report.snapshot.attribution if report.snapshot is not None else None
        origins = attribution.origins if attribution is not None else None
        announcements += notes.cycle_notes(report.records, origins=origins)
        summary = (
            f"{diagnosis.totals.client_backends}/"
            f"{diagnosis.server.usable_slots if diagnosis.server else '?'} usable slots in use"
        )
        pressure = notes.pressure_note(self._pressure, diagnosis.pressure.label, summary)
        if pressure is not None:
            announcements.append(pressure)
        self._pressure = diagnosis.pressure.label
        if report.plan.budget_exhausted and not self._budget_exhausted:
            budget = policy.spec.remediation.budget
            announcements.append(
                notes.EventNote(
                    notes.BUDGET_EXHAUSTED,
                    "Warning",
                    f"more sessions matched than the budget allows (maxPerCycle "
                    f"{budget.max_per_cycle}, maxPerHour {budget.max_per_hour}); the rest wait",
                    "Terminate",
                )
            )
        self._budget_exhausted = report.plan.budget_exhausted
        wanted = after_cycle(
            self._previous_status(),
            generation=generation,
            diagnosis=diagnosis,
            records=report.records,
            history=self.store.history,
            mode=policy.spec.remediation.mode,
            planned=len(report.plan.actions),
            now=now,
        )
        conditions, pgbouncer_notes = self._reconcile_pgbouncer(policy, report, generation, now)
        announcements += pgbouncer_notes
        self._write(wanted.model_copy(update={"conditions": conditions(wanted)}), now)
        self.events.record(announcements, now=now)
        if self.attribution is not None:
            self.attribution.announce(report, f"{self.namespace}/{self.name}", now)
        self.context.metrics.cycle_done(self.key, diagnosis, report.records, took, now)

    def _reconcile_pgbouncer(
        self, policy: ConnectionPolicy, report: CycleReport, generation: int | None, now: datetime
    ) -> tuple[Callable[[ConnectionPolicyStatus], list[Condition]], list[notes.EventNote]]:
        """Reconcile the pooler; the conditions it leaves and the Events it deserves."""
        assert report.snapshot is not None
        announce: list[notes.EventNote] = []
        try:
            outcome = self.pgbouncer.reconcile(
                policy, report.snapshot, lambda database: self._connect_to(policy, database)
            )
            condition, found = outcome.condition, outcome.notes
        except (KubeError, PgreliefError, psycopg.Error) as error:
            message = f"could not reconcile PgBouncer: {error}"
            condition = Condition(
                type=PGBOUNCER_READY, status="False", reason="ReconcileFailed", message=message
            )
            found = [notes.EventNote("PgBouncerReconcileFailed", "Warning", message, "Reconcile")]
        for note in found:
            # A reconciled pooler is news each time; a problem only when it is a new one.
            if note.type == "Normal" or note.message != self._pgbouncer_problem:
                announce.append(note)
        self._pgbouncer_problem = next((n.message for n in found if n.type == "Warning"), None)

        def conditions(status: ConnectionPolicyStatus) -> list[Condition]:
            if condition is None:
                return [c for c in status.conditions if c.type != PGBOUNCER_READY]
            return with_condition(
                status.conditions,
                PGBOUNCER_READY,
                condition.status,
                condition.reason or "",
                condition.message or "",
                generation,
                now,
            )

        return conditions, announce

    def _connect_to(self, policy: ConnectionPolicy, database: str) -> psycopg.Connection[Any]:
        """A short-lived connection to ``database`` as the policy's role (auth_query checks)."""
        return connect(make_conninfo(policy_conninfo(self.context.kube, policy), dbname=database))

    def _recovered(self) -> list[notes.EventNote]:
        problem, self._problem = self._problem, None
        if problem is not None and problem.startswith(notes.DATABASE_UNREACHABLE):
            message = "the database answers again"
            return [notes.EventNote(notes.DATABASE_REACHABLE, "Normal", message, "Observe")]
        return []

    def _fail(
        self, event_reason: str | None, message: str, generation: int | None, *, marker: str = ""
    ) -> None:
        """Ready=False; a Warning Event when this problem begins, not every cycle it lasts."""
        now = datetime.now(UTC)
        problem = f"{event_reason or 'CycleFailed'}: {marker}"
        if event_reason is not None and problem != self._problem:
            self.events.record([notes.EventNote(event_reason, "Warning", message, "Observe")])
        self._problem = problem
        reason = event_reason or "CycleFailed"
        wanted = not_ready(
            self._previous_status(),
            generation=generation,
            reason=reason,
            message=message,
            now=now,
            observed=event_reason != notes.POLICY_INVALID,
        )
        self._write(wanted, now)
        self._pressure = None
        self.context.metrics.cycle_failed(self.key, reason)

    def _write(self, wanted: ConnectionPolicyStatus, now: datetime) -> None:
        try:
            self.store.write(wanted, now=now)
        except KubeError as error:
            log.warning("%s/%s: could not write the status: %s", self.namespace, self.name, error)

    def _previous_status(self) -> ConnectionPolicyStatus:
        return self.store.written or ConnectionPolicyStatus()

    def _backoff(self) -> float:
        delay = self._retry
        self._retry = min(self._retry * 2, RETRY_MAX_S)
        return delay


def status_of(raw: Mapping[str, Any]) -> ConnectionPolicyStatus | None:
    status = raw.get("status")
    if not status:
        return None
    try:
        return ConnectionPolicyStatus.model_validate(status)
    except ValueError:
        log.warning("ignoring a status that does not match the schema")
        return None


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A detached copy of what a step reads of kopf's live body, safe in another thread.

    It runs on the event loop every cycle: the status and managedFields (most of the
    object, and what a step never reads) are left out.
    """
    plain = {key: _copy(body[key]) for key in ("apiVersion", "kind", "spec") if key in body}
    meta = body.get("metadata") or {}
    plain["metadata"] = {k: _copy(v) for k, v in meta.items() if k != "managedFields"}
    return plain


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
