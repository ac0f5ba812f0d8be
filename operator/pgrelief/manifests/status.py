"""The ConnectionPolicy status after a cycle, and whether it is worth an API write.

Conditions follow metav1.Condition: ``lastTransitionTime`` moves only when a condition's
status really changes. The operator cycles as often as every 250 ms, so the status is not
rewritten every cycle: ``needs_write`` lets a meaningful change through at once (a condition,
the pressure level, an action, the budget history, the originals) and a mere change in the
connection counts at most every ``COUNTS_EVERY``, with a heartbeat every ``HEARTBEAT_EVERY``
so a stale ``lastDiagnosisTime`` shows a stuck worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from pgrelief.audit import AuditRecord
from pgrelief.diagnosis import Diagnosis, Severity
from pgrelief.history import RemediationHistory
from pgrelief.policy import (
    MAX_RECENT_ACTIONS,
    MAX_STATUS_FINDINGS,
    Condition,
    ConnectionPolicyStatus,
    RecentAction,
)

READY = "Ready"
UNDER_PRESSURE = "UnderPressure"
REMEDIATING = "Remediating"

COUNTS_EVERY = timedelta(seconds=30)
HEARTBEAT_EVERY = timedelta(minutes=5)
_TEXT_LIMIT = 512
# metav1.Condition allows 32 KiB; a condition may carry the SQL that fixes it.
_CONDITION_MESSAGE_LIMIT = 8192

# Fields whose change alone is not worth a write before COUNTS_EVERY has passed.
_COUNTS = frozenset(
    {"connections", "client_backends", "utilization_percent", "usable_slots", "findings"}
)
_ALWAYS_CHANGING = frozenset({"last_diagnosis_time", "conditions"})


def with_condition(
    conditions: Sequence[Condition],
    kind: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """``conditions`` with ``kind`` set; its transition time kept unless its status changed."""
    previous = next((c for c in conditions if c.type == kind), None)
    moved = previous is None or previous.status != status
    updated = Condition(
        type=kind,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message[:_CONDITION_MESSAGE_LIMIT],
        last_transition_time=now if moved or previous is None else previous.last_transition_time,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != kind), updated]


def after_cycle(
    previous: ConnectionPolicyStatus,
    *,
    generation: int | None,
    diagnosis: Diagnosis,
    records: Sequence[AuditRecord],
    history: RemediationHistory,
    mode: str,
    planned: int,
    now: datetime,
) -> ConnectionPolicyStatus:
    """The status a completed cycle leaves: Ready, what it saw, what it did, its memory."""
    outcomes = [r for r in records if r.outcome != "intent"]
    done = [r for r in outcomes if r.outcome == "done"]
    terminated = sum(1 for r in done if r.action == "terminate")
    failed = sum(1 for r in outcomes if r.outcome == "failed")
    totals = diagnosis.totals
    usable = diagnosis.server.usable_slots if diagnosis.server else None
    conditions = with_condition(
        previous.conditions,
        READY,
        "True",
        "CycleSucceeded",
        f"observing: {totals.client_backends}/{usable} usable slots in use; mode {mode}",
        generation,
        now,
    )
    conditions = _pressure_condition(conditions, diagnosis, generation, now)
    conditions = _remediating_condition(conditions, outcomes, done, mode, generation, now)
    recent = [*(previous.recent_actions or []), *(_recent(r) for r in _notable(outcomes))]
    return ConnectionPolicyStatus(
        observed_generation=generation,
        conditions=conditions,
        pressure=diagnosis.pressure.label,  # type: ignore[arg-type]
        utilization_percent=round(totals.utilization_percent),
        client_backends=totals.client_backends,
        usable_slots=usable,
        connections=dict(totals.by_state),
        findings=[
            f"[{f.severity.finding_label}] {f.kind}: {f.summary}"[:_TEXT_LIMIT]
            for f in diagnosis.findings[:MAX_STATUS_FINDINGS]
        ],
        last_diagnosis_time=now,
        last_action_time=max((r.ts for r in outcomes), default=previous.last_action_time),
        terminations_last_hour=len(history.for_planning(now).terminations),
        terminations_total=(previous.terminations_total or 0) + terminated,
        failed_actions_total=(previous.failed_actions_total or 0) + failed,
        planned_last_cycle=planned,
        recent_actions=recent[-MAX_RECENT_ACTIONS:],
        recent_terminations=list(history.terminations),
        originals=originals_of(history),
    )


def with_history(
    status: ConnectionPolicyStatus, history: RemediationHistory
) -> ConnectionPolicyStatus:
    """``status`` carrying ``history``: what survives a restart (budget window, originals)."""
    return status.model_copy(
        update={
            "recent_terminations": list(history.terminations),
            "originals": originals_of(history),
        }
    )


def originals_of(history: RemediationHistory) -> dict[str, str]:
    # A merge patch cannot store null in a map: "" stands for "was not set".
    return {k: "" if v is None else v for k, v in history.originals.items()}


def history_of(status: ConnectionPolicyStatus | None) -> RemediationHistory:
    """The remediation history a status carries (empty for a new policy)."""
    if status is None:
        return RemediationHistory()
    return RemediationHistory(
        terminations=list(status.recent_terminations or []),
        originals={k: (v or None) for k, v in (status.originals or {}).items()},
    )


def not_ready(
    previous: ConnectionPolicyStatus,
    *,
    generation: int | None,
    reason: str,
    message: str,
    now: datetime,
    observed: bool = True,
) -> ConnectionPolicyStatus:
    """Ready=False for ``reason`` (PolicyInvalid, DatabaseUnreachable, CredentialsMissing...).

    What cannot be known any more is Unknown, not its last value; the history is kept.
    ``observed`` is False when the current generation was not even readable (an invalid
    spec): observedGeneration then still says which generation was last acted on.
    """
    conditions = with_condition(
        previous.conditions, READY, "False", reason, message, generation, now
    )
    conditions = with_condition(
        conditions, UNDER_PRESSURE, "Unknown", reason, "no current diagnosis", generation, now
    )
    conditions = with_condition(
        conditions, REMEDIATING, "False", reason, "nothing is done", generation, now
    )
    return previous.model_copy(
        update={
            "conditions": conditions,
            "observed_generation": generation if observed else previous.observed_generation,
            "pressure": "unknown",
        }
    )


def needs_write(
    written: ConnectionPolicyStatus | None,
    wanted: ConnectionPolicyStatus,
    *,
    since_written: timedelta,
) -> bool:
    """Whether ``wanted`` is worth an API write now, given what was last ``written``."""
    if written is None or since_written >= HEARTBEAT_EVERY:
        return True
    if _condition_states(written) != _condition_states(wanted):
        return True
    old = written.model_dump(exclude=set(_ALWAYS_CHANGING))
    new = wanted.model_dump(exclude=set(_ALWAYS_CHANGING))
    changed = {key for key in new if new[key] != old.get(key)}
    if changed - _COUNTS:
        return True
    return bool(changed) and since_written >= COUNTS_EVERY


def _condition_states(status: ConnectionPolicyStatus) -> set[tuple[str, str, str | None]]:
    return {(c.type, c.status, c.reason) for c in status.conditions}


def _pressure_condition(
    conditions: list[Condition], diagnosis: Diagnosis, generation: int | None, now: datetime
) -> list[Condition]:
    pressure = diagnosis.pressure
    totals = diagnosis.totals
    message = f"{totals.utilization_percent:.0f}% of usable slots in use ({pressure.label})"
    if pressure is Severity.UNKNOWN:
        return with_condition(
            conditions, UNDER_PRESSURE, "Unknown", "PressureUnknown", message, generation, now
        )
    under = pressure in (Severity.WARNING, Severity.CRITICAL)
    reason = f"Pressure{pressure.label.capitalize()}"
    return with_condition(
        conditions, UNDER_PRESSURE, "True" if under else "False", reason, message, generation, now
    )


def _remediating_condition(
    conditions: list[Condition],
    outcomes: Sequence[AuditRecord],
    done: Sequence[AuditRecord],
    mode: str,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    if mode == "Off":
        return with_condition(
            conditions, REMEDIATING, "False", "RemediationOff", "mode is Off", generation, now
        )
    if done:
        kinds = sorted({r.action for r in done})
        message = f"{len(done)} action(s) done in the last cycle: {', '.join(kinds)}"
        return with_condition(
            conditions, REMEDIATING, "True", "ActionsTaken", message, generation, now
        )
    planned = [r for r in outcomes if r.dry_run]
    if planned:
        message = f"DryRun: {len(planned)} action(s) planned, none performed"
        return with_condition(conditions, REMEDIATING, "False", "DryRun", message, generation, now)
    return with_condition(
        conditions, REMEDIATING, "False", "NothingToDo", "no action was needed", generation, now
    )


def _notable(records: Sequence[AuditRecord]) -> list[AuditRecord]:
    # A protected session skipped for the hundredth time is not news; a dry-run plan is.
    return [r for r in records if r.outcome != "skipped" or r.dry_run]


def _recent(record: AuditRecord) -> RecentAction:
    return RecentAction(
        time=record.ts,
        action=record.action,
        target=record.target[:_TEXT_LIMIT],
        outcome=record.outcome,  # type: ignore[arg-type]
        reason=record.reason[:_TEXT_LIMIT],
        detail=record.detail[:_TEXT_LIMIT] or None,
        dry_run=record.dry_run,
    )
