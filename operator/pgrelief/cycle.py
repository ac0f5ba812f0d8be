"""One remediation cycle, observe -> diagnose -> plan -> act, shared by both drivers.

``pgrelief run`` (a state file, a loop, signals) and the operator (a ConnectionPolicy's status,
kopf) differ only in where they keep history and how often they call this; the order of the
steps, which records are written and when, and when the history is updated are decided here
once:

1. observe, diagnose, plan;
2. if the driver is stopping, stop here: nothing has been done yet;
3. keep the originals of the values about to change (durably, before the first change);
4. act, each record reaching the audit sink as it happens (a termination's or a cancel's
   before it);
5. remember the terminations and cancels done (the budget; a cancelled query escalates if it
   is still running later), and back off from sessions an attempt failed on, so one session
   pgrelief may not signal neither eats every cycle's budget nor floods the audit.

When to run the next cycle is decided here too, for both drivers: ``CycleReport.wait_s``.
Under pressure (and enforcing) the next cycle runs at the moment the next session crosses
its threshold (``Plan.next_deadline``), so relief comes when PostgreSQL's own timeout would
fire instead of up to an interval late. Cycles start at least ``DEADLINE_FLOOR_S`` apart. A
deadline that was already due when the snapshot was taken (sessions ``maxPerCycle`` left
over) waits ``DEADLINE_FLOOR_S`` after the cycle, so the loop never spins against the
server; one that passed while the cycle ran is new work: no wait beyond the floor. When
healthy, every ``spec.interval``.
"""

from __future__ import annotations

import threading
import time
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
    UNDER_PRESSURE,
    CancelQuery,
    Plan,
    QueryIdentity,
    SessionAction,
    SkippedSession,
    plan,
    plan_revert,
    query_identity,
    session_identity,
)
from pgrelief.policy import ConnectionPolicy
from pgrelief.snapshot import ACTIVE, Snapshot

BACKOFF_FIRST = timedelta(seconds=10)
BACKOFF_MAX = timedelta(minutes=10)
# The wait before the next cycle when the deadline was due at the snapshot already: sessions
# left over by maxPerCycle must not spin the loop against the server.
DEADLINE_FLOOR_S = 0.025
_SIGNALS = ("terminate", "cancel")


@dataclass(frozen=True)
class CycleReport:
    before: Diagnosis
    plan: Plan
    records: list[AuditRecord]
    stopped_before_acting: bool = False
    snapshot: Snapshot | None = None  # what was observed (the operator sizes PgBouncer from it)
    dry_run: bool = False
    # time.monotonic() at which plan.next_deadline falls (the snapshot's server time mapped
    # onto the moment its statement was sent); None when there is none.
    deadline_at: float | None = None
    # The deadline was not after the snapshot: work left over, not a threshold still to come.
    deadline_was_due: bool = False

    @property
    def next_deadline(self) -> datetime | None:
        """When (server clock) the next session this cycle did not act on comes due."""
        return self.plan.next_deadline

    @property
    def under_pressure(self) -> bool:
        return self.before.pressure in UNDER_PRESSURE

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.records if r.outcome == outcome)

    def wait_s(self, interval_s: float, *, since: float, now: float | None = None) -> float:
        """Seconds until the next cycle should start.

        ``since`` is ``time.monotonic()`` when this cycle started. Healthy, in DryRun, or
        with nothing coming due: the rest of ``interval_s``. Under pressure and enforcing:
        until the next deadline if that is sooner (no wait if it passed during this cycle),
        but no sooner than ``DEADLINE_FLOOR_S`` after ``since``; ``DEADLINE_FLOOR_S`` when it
        was due at the snapshot already.
        """
        now = time.monotonic() if now is None else now
        regular = max(since + interval_s - now, 0.0)
        if self.deadline_at is None or self.dry_run or not self.under_pressure:
            return regular
        if self.deadline_was_due:
            return DEADLINE_FLOOR_S
        # Never sooner than DEADLINE_FLOOR_S after this cycle started: sessions coming due a
        # few milliseconds apart (a burst of leaks) share one cycle instead of one each.
        return max(min(regular, self.deadline_at - now), since + DEADLINE_FLOOR_S - now, 0.0)


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
        # What the driver knows that the server does not (the operator: which workload each
        # session comes from), added to each snapshot before it is diagnosed.
        self.enrich: Callable[[Snapshot], Snapshot] | None = None

    @property
    def dry_run(self) -> bool:
        return self.force_dry_run or self.policy.spec.remediation.mode == "DryRun"

    def run(self, conn: Connection, stopping: threading.Event | None = None) -> CycleReport:
        snapshot = take_snapshot(conn)
        # The snapshot's clock_timestamp() was read on the server before its rows came back:
        # mapped from now, a deadline falls a moment late, never early. An early wake would
        # find the session a hair short of its threshold and wait out DEADLINE_FLOOR_S.
        observed_at = time.monotonic()
        if self.enrich is not None:
            snapshot = self.enrich(snapshot)
        diagnosis = diagnose(snapshot, diagnose_options(self.policy))
        now = self.clock()
        self._forget_gone({session_identity(s.pid, s.backend_start) for s in snapshot.sessions})
        self.store.history.keep_cancels(
            query_identity(s.pid, s.backend_start, s.query_start)
            for s in snapshot.sessions
            if s.state == ACTIVE
        )
        history = self.store.history.for_planning(
            now, {key: b.retry_at for key, b in self._backoff.items()}
        )
        the_plan = plan(self.policy.spec, snapshot, diagnosis.pressure, history, now)
        dry_run = self.dry_run
        deadline_at = (
            None
            if the_plan.next_deadline is None
            else observed_at + (the_plan.next_deadline - snapshot.taken_at).total_seconds()
        )
        if stopping is not None and stopping.is_set():
            return CycleReport(diagnosis, the_plan, [], True, snapshot=snapshot, dry_run=dry_run)
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
            session_actions = the_plan.session_actions
            self._back_off(session_actions, records, now)
            self.store.history.add_cancels(_cancelled(session_actions, records))
            self.store.history.forget_cancels_of(_terminated(session_actions, records))
            self.store.note_terminations(
                (r.ts for r in records if r.outcome == "done" and r.action in _SIGNALS), now
            )
        return CycleReport(
            before=diagnosis,
            plan=the_plan,
            records=[*records, *skips],
            snapshot=snapshot,
            dry_run=dry_run,
            deadline_at=deadline_at,
            deadline_was_due=(
                the_plan.next_deadline is not None and the_plan.next_deadline <= snapshot.taken_at
            ),
        )

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
        return CycleReport(before=diagnosis, plan=the_plan, records=records, dry_run=dry_run)

    def _back_off(
        self, actions: Iterable[SessionAction], records: list[AuditRecord], now: datetime
    ) -> None:
        failed = {r.target for r in records if r.action in _SIGNALS and r.outcome == "failed"}
        for action in actions:
            if action.target not in failed:
                continue
            previous = self._backoff.get(action.identity)
            failures = previous.failures + 1 if previous else 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            self._backoff[action.identity] = _Backoff(failures, now + delay)

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
                action=skipped.candidate.action,
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


def _terminated(
    actions: Iterable[SessionAction], records: list[AuditRecord]
) -> set[tuple[int, str | None]]:
    """The sessions this cycle terminated: their cancelled queries cannot escalate again."""
    done = {r.target for r in records if r.action == "terminate" and r.outcome == "done"}
    return {a.identity for a in actions if a.action == "terminate" and a.target in done}


def _cancelled(
    actions: Iterable[SessionAction], records: list[AuditRecord]
) -> dict[QueryIdentity, datetime]:
    """The queries this cycle cancelled, by query identity, with the time of the cancel."""
    done = {r.target: r.ts for r in records if r.action == "cancel" and r.outcome == "done"}
    return {
        a.query: done[a.target] for a in actions if isinstance(a, CancelQuery) and a.target in done
    }
