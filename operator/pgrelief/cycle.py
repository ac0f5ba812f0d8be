"""One remediation cycle, observe -> diagnose -> plan -> act, shared by both drivers.

``pgrelief run`` (a state file, a loop, signals) and the operator (a ConnectionPolicy's status,
kopf) differ only in where they keep history and how often they call this; the order of the
steps, which records are written and when the history is updated are decided here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pgrelief.act import Connection, execute
from pgrelief.audit import AuditLog, AuditRecord
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import Diagnosis
from pgrelief.history import HistoryStore
from pgrelief.observe import take_snapshot
from pgrelief.plan import Plan, SkippedSession, plan, plan_revert
from pgrelief.policy import ConnectionPolicy


@dataclass(frozen=True)
class CycleReport:
    before: Diagnosis
    plan: Plan
    records: list[AuditRecord]


def policy_label(policy: ConnectionPolicy) -> str:
    """``namespace/name``: how audit records and logs name a policy."""
    meta = policy.metadata
    return f"{meta.namespace or 'default'}/{meta.name}"


def diagnose_options(policy: ConnectionPolicy) -> DiagnoseOptions:
    pressure = policy.spec.pressure
    return DiagnoseOptions(
        warning_percent=pressure.warning_percent, critical_percent=pressure.critical_percent
    )


class Cycle:
    """The cycle of one policy; ``policy`` may be replaced between runs (a spec change)."""

    def __init__(
        self,
        policy: ConnectionPolicy,
        store: HistoryStore,
        audit: AuditLog,
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

    @property
    def dry_run(self) -> bool:
        return self.force_dry_run or self.policy.spec.remediation.mode == "DryRun"

    def run(self, conn: Connection) -> CycleReport:
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, diagnose_options(self.policy))
        now = self.clock()
        history = self.store.history.for_planning(now)
        the_plan = plan(self.policy.spec, snapshot, diagnosis.pressure, history, now)
        dry_run = self.dry_run
        if not dry_run and the_plan.originals:
            # Before the first change, so a crash right after it cannot lose the value to revert to.
            self.store.keep_originals(the_plan.originals)
        records = execute(conn, the_plan.actions, dry_run=dry_run, policy=policy_label(self.policy))
        records.extend(self._skip_records(the_plan, now, dry_run))
        self.audit.write(records)
        if not dry_run:
            self.store.note_terminations(
                (r.ts for r in records if r.outcome == "done" and r.action == "terminate"), now
            )
        return CycleReport(before=diagnosis, plan=the_plan, records=records)

    def revert(self, conn: Connection) -> CycleReport:
        """Restore every recorded original the server no longer has (whatever the mode)."""
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, diagnose_options(self.policy))
        the_plan = plan_revert(self.policy.spec, snapshot, self.store.history.originals)
        dry_run = self.dry_run
        records = execute(conn, the_plan.actions, dry_run=dry_run, policy=policy_label(self.policy))
        self.audit.write(records)
        if not dry_run and all(r.outcome != "failed" for r in records):
            self.store.forget_originals()
        return CycleReport(before=diagnosis, plan=the_plan, records=records)

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
