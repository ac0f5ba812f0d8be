"""One remediation cycle, observe -> diagnose -> plan -> act, shared by both drivers.

``pgrelief run`` (a state file, a loop, signals) and the operator (a ConnectionPolicy's status,
kopf) differ only in where they keep history and how often they call this; the order of the
steps, which records are written and when, and when the history is updated are decided here
once:

1. observe, diagnose, plan;
2. if the driver is stopping, stop here: nothing has been done yet;
3. keep the originals of the values about to change (durably, before the first change);
4. act, each record reaching the audit sink as it happens (a termination's before it);
5. remember the terminations done, and back off from sessions an attempt failed on, so one
   session pgrelief may not signal neither eats every cycle's budget nor floods the audit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pgrelief.act import Connection, execute
from pgrelief.audit import AuditRecord, AuditSink
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import Diagnosis
from pgrelief.history import HistoryStore
from pgrelief.observe import take_snapshot
from pgrelief.plan import (
    Plan,
    SkippedSession,
    TerminateBackend,
    plan,
    plan_revert,
    session_identity,
)
from pgrelief.policy import ConnectionPolicy
from pgrelief.snapshot import Snapshot

BACKOFF_FIRST = timedelta(seconds=10)
BACKOFF_MAX = timedelta(minutes=10)


@dataclass(frozen=True)
class CycleReport:
    before: Diagnosis
    plan: Plan
    records: list[AuditRecord]
    stopped_before_acting: bool = False
    snapshot: Snapshot | None = None  # what was observed (the operator sizes PgBouncer from it)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.records if r.outcome == outcome)


def policy_label(policy: ConnectionPolicy) -> str:
    """``namespace/name``: how audit records and logs name a policy."""
    meta = policy.metadata
    return f"{meta.namespace or 'default'}/{meta.name}"


def diagnose_options(policy: ConnectionPolicy) -> DiagnoseOptions:
    pressure = policy.spec.pressure
    return DiagnoseOptions(
        warning_percent=pressure.warning_percent, critical_percent=pressure.critical_percent
    )


@dataclass
class _Backoff:
    failures: int
    retry_at: datetime


class Cycle:
    """The cycle of one policy; ``policy`` may be replaced between runs (a spec change)."""

    def __init__(
        self,
        policy: ConnectionPolicy,
        store: HistoryStore,
        audit: AuditSink,
        *,
        dry_run: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self.store = store
        self.audit = audit
        self.force_dry_run = dry_run
        self.clock = clock
        self._reported_skips: set[tuple[int, datetime | None, str]] = set()
        self._backoff: dict[tuple[int, str | None], _Backoff] = {}

    @property
    def dry_run(self) -> bool:
        return self.force_dry_run or self.policy.spec.remediation.mode == "DryRun"

    def run(self, conn: Connection, stopping: threading.Event | None = None) -> CycleReport:
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, diagnose_options(self.policy))
        now = self.clock()
        self._forget_gone({session_identity(s.pid, s.backend_start) for s in snapshot.sessions})
        history = self.store.history.for_planning(
            now, {key: b.retry_at for key, b in self._backoff.items()}
        )
        the_plan = plan(self.policy.spec, snapshot, diagnosis.pressure, history, now)
        if stopping is not None and stopping.is_set():
            return CycleReport(diagnosis, the_plan, [], True, snapshot)
        dry_run = self.dry_run
        if not dry_run and the_plan.originals:
            self.store.keep_originals(the_plan.originals)
        skips = self._skip_records(the_plan, now, dry_run)
        self.audit(skips)
        records = execute(
            conn,
            the_plan.actions,
            dry_run=dry_run,
            policy=policy_label(self.policy),
            sink=self.audit,
            clock=self.clock,
        )
        if not dry_run:
            self._back_off(the_plan.terminations, records, now)
            self.store.note_terminations(
                (r.ts for r in records if r.outcome == "done" and r.action == "terminate"), now
            )
        return CycleReport(diagnosis, the_plan, [*records, *skips], snapshot=snapshot)

    def revert(self, conn: Connection) -> CycleReport:
        """Restore every recorded original the server no longer has (whatever the mode)."""
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, diagnose_options(self.policy))
        the_plan = plan_revert(self.policy.spec, snapshot, self.store.history.originals)
        dry_run = self.dry_run
        records = execute(
            conn,
            the_plan.actions,
            dry_run=dry_run,
            policy=policy_label(self.policy),
            sink=self.audit,
            clock=self.clock,
        )
        if not dry_run and all(r.outcome != "failed" for r in records):
            self.store.forget_originals()
        return CycleReport(before=diagnosis, plan=the_plan, records=records)

    def _back_off(
        self, terminations: Iterable[TerminateBackend], records: list[AuditRecord], now: datetime
    ) -> None:
        failed = {r.target for r in records if r.action == "terminate" and r.outcome == "failed"}
        for termination in terminations:
            if termination.target not in failed:
                continue
            previous = self._backoff.get(termination.identity)
            failures = previous.failures + 1 if previous else 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            self._backoff[termination.identity] = _Backoff(failures, now + delay)

    def _forget_gone(self, present: set[tuple[int, str | None]]) -> None:
        for identity in [i for i in self._backoff if i not in present]:
            del self._backoff[identity]

    def _skip_records(self, the_plan: Plan, now: datetime, dry_run: bool) -> list[AuditRecord]:
        # A protected session matches its rule every cycle; at a 250 ms interval re-recording it
        # would bury the real actions, so each (session, why) is reported once while it lasts.
        current = {_skip_key(s) for s in the_plan.skipped}
        fresh = [s for s in the_plan.skipped if _skip_key(s) not in self._reported_skips]
        self._reported_skips = current
        return [
            AuditRecord(
                ts=now,
                action="terminate",
                target=skipped.target,
                reason=skipped.reason,
                evidence=skipped.evidence,
                dry_run=dry_run,
                outcome="skipped",
                detail=skipped.why,
                policy=policy_label(self.policy),
            )
            for skipped in fresh
        ]


def _skip_key(skipped: SkippedSession) -> tuple[int, datetime | None, str]:
    return (skipped.pid, skipped.candidate.backend_start, skipped.why)
