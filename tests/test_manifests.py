"""The pure builders of what the operator writes: status, its write policy, and Events."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pgrelief.audit import DRY_RUN_DETAIL, AuditRecord
from pgrelief.diagnosis import Breakdown, Diagnosis, Finding, ServerSummary, Severity, Totals
from pgrelief.history import RemediationHistory
from pgrelief.manifests.events import (
    BACKEND_TERMINATED,
    BACKENDS_TERMINATED,
    PRESSURE_DETECTED,
    PRESSURE_RELIEVED,
    QUERY_CANCELLED,
    ROLE_LIMIT_APPLIED,
    WOULD_TERMINATE,
    cycle_notes,
    event_manifest,
    pressure_note,
)
from pgrelief.manifests.status import (
    COUNTS_EVERY,
    HEARTBEAT_EVERY,
    READY,
    after_cycle,
    history_of,
    needs_write,
    not_ready,
    with_condition,
)
from pgrelief.plan import CancelQuery
from pgrelief.policy import ConnectionPolicyStatus

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def diagnosis(clients: int = 10, pressure: Severity = Severity.HEALTHY) -> Diagnosis:
    return Diagnosis(
        status=pressure,
        source="live",
        taken_at=NOW.isoformat(),
        breakdown=Breakdown(),
        server=ServerSummary(
            version_num=180000,
            max_connections=25,
            superuser_reserved_connections=3,
            reserved_connections=2,
            usable_slots=20,
        ),
        totals=Totals(
            client_backends=clients,
            utilization_percent=clients * 5.0,
            by_state={"idle": clients},
            other_backends=5,
        ),
        findings=tuple(Finding("leaked_idle", Severity.WARNING, f"finding {n}") for n in range(8)),
        pressure=pressure,
    )


def terminated(pid: int, *, dry_run: bool = False, outcome: str = "done") -> AuditRecord:
    return AuditRecord(
        ts=NOW,
        action="terminate",
        target=f"pid {pid}",
        reason="idle in transaction for 5m (rule idleInTransactionAfter: 1m)",
        evidence={
            "usename": "app",
            "application_name": "checkout",
            "client_addr": "10.0.0.5",
            "datname": "shop",
            "state": "idle in transaction",
            "state_age_s": 300.0,
            "rule": "idleInTransactionAfter",
        },
        dry_run=dry_run,
        outcome=outcome,  # type: ignore[arg-type]
        detail="" if outcome == "done" else DRY_RUN_DETAIL,
    )


def test_a_condition_moves_its_transition_time_only_when_its_status_changes() -> None:
    first = with_condition([], READY, "True", "CycleSucceeded", "ok", 1, NOW)
    later = NOW + timedelta(minutes=5)
    same = with_condition(first, READY, "True", "CycleSucceeded", "still ok", 2, later)
    assert same[0].last_transition_time == NOW and same[0].message == "still ok"
    flipped = with_condition(same, READY, "False", "DatabaseUnreachable", "down", 2, later)
    assert flipped[0].last_transition_time == later


def test_the_status_after_a_cycle_is_bounded_and_carries_the_history() -> None:
    history = RemediationHistory(terminations=[NOW], originals={"role:app:statement_timeout": None})
    previous = ConnectionPolicyStatus(terminations_total=4)
    records = [terminated(pid) for pid in range(12)]
    status = after_cycle(
        previous,
        generation=3,
        diagnosis=diagnosis(pressure=Severity.WARNING),
        records=records,
        history=history,
        mode="Enforce",
        planned=12,
        now=NOW,
    )
    assert status.terminations_total == 16
    assert len(status.recent_actions or []) == 10
    assert len(status.findings or []) == 5
    assert status.originals == {"role:app:statement_timeout": ""}
    assert history_of(status).originals == {"role:app:statement_timeout": None}
    assert {c.type: c.status for c in status.conditions} == {
        "Ready": "True",
        "UnderPressure": "True",
        "Remediating": "True",
    }
    assert status.utilization_percent == 50 and status.usable_slots == 20


def test_not_ready_keeps_the_history_and_says_what_is_unknown() -> None:
    history = RemediationHistory(originals={"database:shop:connection_limit": "-1"})
    ok = after_cycle(
        ConnectionPolicyStatus(),
        generation=1,
        diagnosis=diagnosis(),
        records=[],
        history=history,
        mode="Enforce",
        planned=0,
        now=NOW,
    )
    down = not_ready(
        ok, generation=2, reason="PolicyInvalid", message="bad", now=NOW, observed=False
    )
    assert down.observed_generation == 1  # the invalid generation was not acted on
    assert down.pressure == "unknown" and down.originals == ok.originals
    assert {c.type: c.status for c in down.conditions}["UnderPressure"] == "Unknown"


def test_only_meaningful_changes_are_written_at_once() -> None:
    def status(clients: int, pressure: Severity = Severity.HEALTHY) -> ConnectionPolicyStatus:
        return after_cycle(
            ConnectionPolicyStatus(),
            generation=1,
            diagnosis=diagnosis(clients, pressure),
            records=[],
            history=RemediationHistory(),
            mode="Enforce",
            planned=0,
            now=NOW,
        )

    written = status(10)
    soon = timedelta(seconds=1)
    assert needs_write(None, written, since_written=soon)
    assert not needs_write(written, status(10), since_written=soon)
    assert not needs_write(written, status(11), since_written=soon)
    assert needs_write(written, status(11), since_written=COUNTS_EVERY)
    assert needs_write(written, status(18, Severity.WARNING), since_written=soon)
    assert needs_write(written, status(10), since_written=HEARTBEAT_EVERY)


def test_a_storm_of_terminations_is_ten_events_and_a_summary() -> None:
    notes = cycle_notes([terminated(pid) for pid in range(200)])
    assert [n.reason for n in notes].count(BACKEND_TERMINATED) == 10
    summary = [n for n in notes if n.reason == BACKENDS_TERMINATED]
    assert len(summary) == 1 and "terminated 200 sessions" in summary[0].message
    assert "idleInTransactionAfter 200" in summary[0].message


def test_session_events_name_the_session_and_dry_run_says_would() -> None:
    [done] = cycle_notes([terminated(4242)])
    assert done.reason == BACKEND_TERMINATED
    for part in ("pid 4242", "role app", "application 'checkout'", "client 10.0.0.5",
                 "idle in transaction for 5m"):  # fmt: skip
        assert part in done.message
    [would] = cycle_notes([terminated(7, dry_run=True, outcome="skipped")])
    assert would.reason == WOULD_TERMINATE and would.message.startswith("would terminate (DryRun)")


def test_a_session_spared_by_a_rule_in_dry_run_is_no_would_terminate() -> None:
    # In DryRun a protected session's record is "skipped" with dry_run set, as a plan is: only
    # the plan says "would terminate" (the spared session once read as about to be killed).
    would = terminated(7, dry_run=True, outcome="skipped")
    spared = replace(terminated(8, dry_run=True, outcome="skipped"), detail="protected role app")
    notes = cycle_notes([would, spared])
    assert [n.reason for n in notes] == [WOULD_TERMINATE] and "pid 7 " in notes[0].message
    status = after_cycle(
        ConnectionPolicyStatus(),
        generation=1,
        diagnosis=diagnosis(),
        records=[spared],
        history=RemediationHistory(),
        mode="DryRun",
        planned=0,
        now=NOW,
    )
    remediating = next(c for c in status.conditions if c.type == "Remediating")
    assert remediating.reason == "NothingToDo" and not status.recent_actions


def test_limit_changes_and_failures_are_announced() -> None:
    alter = AuditRecord(NOW, "alter_role", 'role "app"', "connectionLimit is 5", {}, False, "done")
    failed = terminated(9, outcome="failed")
    reasons = [n.reason for n in cycle_notes([alter, failed])]
    assert reasons == [ROLE_LIMIT_APPLIED, "ActionFailed"]


def test_pressure_is_announced_when_it_begins_rises_and_ends_only() -> None:
    assert pressure_note(None, "warning", "s").reason == PRESSURE_DETECTED  # type: ignore[union-attr]
    assert pressure_note("warning", "critical", "s").reason == PRESSURE_DETECTED  # type: ignore[union-attr]
    assert pressure_note("critical", "critical", "s") is None
    assert pressure_note("critical", "warning", "s") is None
    assert pressure_note("warning", "healthy", "s").reason == PRESSURE_RELIEVED  # type: ignore[union-attr]
    assert pressure_note("healthy", "healthy", "s") is None


def test_the_event_object_is_a_valid_core_v1_event() -> None:
    [note] = cycle_notes([terminated(1)])
    body = event_manifest(
        note,
        policy={"name": "orders", "namespace": "prod", "uid": "u-1"},
        name="orders.abc",
        count=3,
        first=NOW,
        last=NOW + timedelta(seconds=5),
        instance="pod-1",
    )
    assert body["involvedObject"] == {
        "apiVersion": "pgrelief.dev/v1alpha1",
        "kind": "ConnectionPolicy",
        "name": "orders",
        "namespace": "prod",
        "uid": "u-1",
    }
    assert body["eventTime"] == "2026-12-05T12:00:00.000000Z"  # MicroTime needs microseconds
    assert body["lastTimestamp"] == "2026-12-05T12:00:05Z" and body["count"] == 3


def cancelled(pid: int, *, dry_run: bool = False) -> AuditRecord:
    action = CancelQuery(
        pid=pid,
        backend_start=NOW,
        query_start=NOW,
        usename="app",
        datname="shop",
        application_name="reports",
        client_addr=None,
        age_s=720.0,
        threshold="10m",
    )
    return AuditRecord(
        ts=NOW,
        action=action.action,
        target=action.target,
        reason=action.reason,
        evidence=action.evidence,
        dry_run=dry_run,
        outcome="skipped" if dry_run else "done",
        detail=DRY_RUN_DETAIL if dry_run else "",
    )


def test_a_cancel_is_a_query_cancelled_event_that_reads_like_one() -> None:
    [done] = cycle_notes([cancelled(5)])
    assert done.reason == QUERY_CANCELLED and done.action == "Cancel"
    assert done.message == (
        "cancelled the query of pid 5 (role app, application 'reports', client local socket, "
        "database shop; query running for 12m0s (rule activeAfter: 10m))"
    )
    [would] = cycle_notes([cancelled(6, dry_run=True)])
    assert would.message.startswith("would cancel (DryRun) the query of pid 6 (role app")


def test_the_summary_counts_cancels_apart_from_terminations() -> None:
    notes = cycle_notes(
        [cancelled(p) for p in range(3)]
        + [terminated(p) for p in range(10, 19)]
        + [cancelled(20, dry_run=True)]
    )
    [summary] = [n for n in notes if n.reason == BACKENDS_TERMINATED]
    assert summary.message.startswith(
        "terminated 9 and cancelled the queries of 3 and would cancel the queries of 1 (DryRun) "
        "sessions this cycle (idleInTransactionAfter 9, activeAfter 4)"
    )
