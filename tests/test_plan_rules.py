"""Exact unit tests of the relief rules added to plan: harm order, cancels and their
escalation, include-only selectors, the next deadline, transaction_timeout's version gate,
and when a driver runs its next cycle (``CycleReport.wait_s``)."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest

from pgrelief.cycle import DEADLINE_FLOOR_S, CycleReport
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import Severity
from pgrelief.history import RemediationHistory
from pgrelief.plan import (
    CancelQuery,
    Plan,
    PlanHistory,
    Recommendation,
    SetRoleSetting,
    SetSystemSetting,
    TerminateBackend,
    plan,
    query_identity,
)
from pgrelief.snapshot import Session
from pgrelief.state_file import StateStore
from tests.factories import MANAGED_SETTINGS, enforce, role, session, snapshot
from tests.factories import TAKEN_AT as NOW

EMPTY = PlanHistory()
IDLE_RULES = {
    "idleAfter": "10m",
    "idleInTransactionAfter": "1m",
    "idleInTransactionAbortedAfter": "1m",
}


def pids(the_plan: Plan) -> list[int]:
    return [a.pid for a in the_plan.session_actions]


def skipped(the_plan: Plan) -> dict[int, str]:
    return {s.pid: s.why for s in the_plan.skipped}


def cancelled(s: Session, seconds_ago: float) -> PlanHistory:
    """A history in which pgrelief cancelled ``s``'s current query ``seconds_ago``."""
    key = query_identity(s.pid, s.backend_start, s.query_start)
    return PlanHistory(cancelled={key: NOW - timedelta(seconds=seconds_ago)})


# ---- harm order ------------------------------------------------------------------------------


def test_the_budget_goes_to_the_most_harmful_state_first_not_the_oldest() -> None:
    sessions = [
        session(1, "idle", 86400),
        session(2, "idle in transaction", 120),
        session(3, "idle in transaction (aborted)", 61),
        session(4, "idle in transaction", 3600),
    ]
    policy = enforce(terminate=IDLE_RULES, budget={"maxPerCycle": 1})
    first = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(first) == [3]
    assert skipped(first) == {p: "over budget: maxPerCycle 1" for p in (4, 2, 1)}
    assert [s.pid for s in first.skipped] == [4, 2, 1]  # reported in the same order
    everyone = enforce(terminate=IDLE_RULES, budget={"maxPerCycle": 10})
    assert pids(plan(everyone, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)) == [3, 4, 2, 1]


def test_running_queries_come_after_idle_sessions_escalations_before_cancels() -> None:
    stubborn = session(5, "active", 7200)
    sessions = [session(1, "idle", 700), session(2, "active", 9000), stubborn]
    policy = enforce(
        terminate={"idleAfter": "10m"}, cancel={"activeAfter": "5m", "escalateAfter": "30s"}
    )
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, cancelled(stubborn, 60), NOW)
    assert pids(result) == [1, 5, 2]
    assert [a.action for a in result.session_actions] == ["terminate", "terminate", "cancel"]


# ---- cancel and escalate ---------------------------------------------------------------------


def test_a_long_query_is_cancelled_with_the_identity_act_rechecks() -> None:
    long_query = session(7, "active", 700, query="select * from big")
    short_query = session(8, "active", 20)
    policy = enforce(terminate={}, cancel={"activeAfter": "10m"})
    result = plan(policy, snapshot([long_query, short_query]), Severity.WARNING, EMPTY, NOW)
    assert result.terminations == ()
    (action,) = result.cancels
    assert isinstance(action, CancelQuery)
    assert (action.pid, action.backend_start, action.query_start) == (
        7,
        long_query.backend_start,
        long_query.query_start,
    )
    assert action.action == "cancel"
    assert action.reason == "query running for 11m40s (rule activeAfter: 10m)"
    evidence = json.loads(json.dumps(action.evidence))
    assert evidence["query_start"] == long_query.query_start.isoformat()  # type: ignore[union-attr]
    assert evidence["last_query"] == "select * from big"
    # The short one is due when it reaches ten minutes.
    assert result.next_deadline == NOW + timedelta(seconds=580)


def test_without_a_cancel_rule_running_queries_are_never_touched() -> None:
    result = plan(enforce(), snapshot([session(1, "active", 10**6)]), Severity.CRITICAL, EMPTY, NOW)
    assert result.actions == () and result.skipped == ()
    assert result.next_deadline is None


def test_a_cancelled_query_is_not_cancelled_again_without_escalation() -> None:
    running = session(7, "active", 900)
    policy = enforce(terminate={}, cancel={"activeAfter": "10m"})
    result = plan(policy, snapshot([running]), Severity.CRITICAL, cancelled(running, 5), NOW)
    assert result.actions == ()
    assert "still running; cancel.escalateAfter is not set" in skipped(result)[7]
    assert result.next_deadline is None


def test_a_cancelled_query_escalates_once_its_grace_is_over() -> None:
    running = session(7, "active", 900)
    policy = enforce(terminate={}, cancel={"activeAfter": "10m", "escalateAfter": "30s"})
    waiting = plan(policy, snapshot([running]), Severity.CRITICAL, cancelled(running, 10), NOW)
    assert waiting.actions == () and waiting.skipped == ()
    assert waiting.next_deadline == NOW + timedelta(seconds=20)

    due = plan(policy, snapshot([running]), Severity.CRITICAL, cancelled(running, 30), NOW)
    (action,) = due.session_actions
    assert isinstance(action, TerminateBackend)
    assert (action.state, action.state_change) == ("active", running.state_change)
    assert action.rule == "escalateAfter"
    assert action.reason == (
        "active for 15m0s, still running 30s after pgrelief cancelled it (rule escalateAfter: 30s)"
    )
    assert action.evidence["cancelled_ago_s"] == 30.0


def test_another_query_of_the_same_session_is_a_new_cancel_not_an_escalation() -> None:
    before = session(7, "active", 900, backend_age=5000)
    after = session(7, "active", 700, backend_age=5000)  # the same session, a later query
    assert after.backend_start == before.backend_start
    policy = enforce(terminate={}, cancel={"activeAfter": "10m", "escalateAfter": "30s"})
    result = plan(policy, snapshot([after]), Severity.CRITICAL, cancelled(before, 60), NOW)
    assert [a.action for a in result.session_actions] == ["cancel"]


def test_a_cancel_spends_the_budget_like_a_termination() -> None:
    policy = enforce(
        terminate={"idleAfter": "10m"},
        cancel={"activeAfter": "10m"},
        budget={"maxPerCycle": 5, "maxPerHour": 3},
    )
    sessions = [session(1, "idle", 700), session(2, "active", 700), session(3, "active", 800)]
    history = PlanHistory(terminations=[NOW - timedelta(minutes=5)])
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, history, NOW)
    assert pids(result) == [1, 3]
    assert skipped(result) == {2: "over budget: maxPerHour 3 (1 in the last hour)"}


def test_cancels_need_pressure_like_terminations() -> None:
    policy = enforce(terminate={}, cancel={"activeAfter": "1m"})
    result = plan(policy, snapshot([session(1, "active", 90)]), Severity.HEALTHY, EMPTY, NOW)
    assert result.actions == ()
    assert skipped(result) == {1: "not under pressure (healthy; onlyUnderPressure is set)"}


def test_protected_sessions_are_never_cancelled() -> None:
    policy = enforce(terminate={}, cancel={"activeAfter": "1m"}, protect={"roles": ["etl"]})
    sessions = [
        session(1, "active", 90, usename="etl"),
        session(2, "active", 90, is_superuser=True),
    ]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert result.actions == ()
    assert skipped(result) == {1: 'protected role "etl"', 2: "superuser (protect.superusers)"}


# ---- selectors -------------------------------------------------------------------------------


def test_selectors_include_only_matching_sessions_and_protections_win() -> None:
    sessions = [
        session(1, "idle", 700, application_name="checkout-api"),
        session(2, "idle", 700, application_name="checkout-admin"),
        session(3, "idle", 700, application_name="billing"),
        session(4, "idle", 700, application_name="checkout-api", datname="reports"),
        session(5, "idle", 700, application_name="checkout-api", usename="batch"),
    ]
    policy = enforce(
        select={"applications": ["checkout-*"], "databases": ["appdb"], "roles": ["app"]},
        protect={"applications": ["*-admin"]},
    )
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]
    assert skipped(result) == {
        2: "protected application 'checkout-admin' (matches '*-admin')",
        3: "application 'billing' not matched by select.applications",
        4: 'database "reports" not in select.databases',
        5: 'role "batch" not in select.roles',
    }


def test_an_application_name_with_glob_characters_matches_itself() -> None:
    sessions = [
        session(1, "idle", 700, application_name="api [eu]"),
        session(2, "idle", 700, application_name="api e"),
    ]
    policy = enforce(protect={"applications": ["api [eu]"]})
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert skipped(result) == {
        1: "protected application 'api [eu]'",
        2: "protected application 'api e' (matches 'api [eu]')",
    }


def test_empty_selectors_select_everyone() -> None:
    policy = enforce(select={"roles": [], "applications": [], "databases": []})
    result = plan(policy, snapshot([session(1, "idle", 700)]), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]


# ---- the next deadline -----------------------------------------------------------------------


def test_the_next_deadline_is_the_first_threshold_crossing_of_a_session_left_alone() -> None:
    sessions = [
        session(1, "idle", 700),  # terminated now
        session(2, "idle in transaction", 45.5),  # crosses 1m in 14.5 s
        session(3, "idle", 590, application_name="web2"),  # crosses 10m in 10 s: protected
        session(4, "idle in transaction (aborted)", 50, application_name="other"),  # unselected
    ]
    policy = enforce(
        terminate=IDLE_RULES,
        protect={"applications": ["web2"]},
        select={"applications": ["web", "web2"]},
    )
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]
    assert result.next_deadline == NOW + timedelta(seconds=14.5)


def test_sessions_held_back_by_the_cycle_budget_are_due_at_once() -> None:
    policy = enforce(budget={"maxPerCycle": 1})
    sessions = [session(1, "idle", 700), session(2, "idle", 650), session(3, "idle", 500)]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, EMPTY, NOW)
    assert pids(result) == [1]
    assert result.next_deadline == NOW


def test_sessions_held_back_by_the_hourly_budget_are_due_when_the_window_frees() -> None:
    policy = enforce(budget={"maxPerCycle": 5, "maxPerHour": 3})
    spent = [NOW - timedelta(minutes=50), NOW - timedelta(minutes=20)]
    sessions = [session(1, "idle", 700), session(2, "idle", 650)]
    result = plan(policy, snapshot(sessions), Severity.CRITICAL, PlanHistory(spent), NOW)
    assert pids(result) == [1]
    # Three spends in the window now (two earlier, one this cycle): one more fits when the
    # one from 50 minutes ago leaves it, in 10 minutes.
    assert result.next_deadline == NOW + timedelta(minutes=10)


def test_a_zero_budget_sets_no_deadline() -> None:
    policy = enforce(budget={"maxPerCycle": 0})
    result = plan(policy, snapshot([session(1, "idle", 700)]), Severity.CRITICAL, EMPTY, NOW)
    assert result.actions == ()
    assert result.next_deadline is None


def test_a_backoff_is_due_when_it_ends() -> None:
    leak = session(1, "idle", 700)
    history = PlanHistory(
        backoff={(1, leak.backend_start.isoformat()): NOW + timedelta(seconds=40)}  # type: ignore[union-attr]
    )
    result = plan(enforce(), snapshot([leak]), Severity.CRITICAL, history, NOW)
    assert result.actions == ()
    assert result.next_deadline == NOW + timedelta(seconds=40)


def test_without_pressure_eligible_sessions_are_due_now_pressure_permitting() -> None:
    result = plan(enforce(), snapshot([session(1, "idle", 700)]), Severity.HEALTHY, EMPTY, NOW)
    assert result.actions == ()
    assert result.next_deadline == NOW


# ---- transaction_timeout ---------------------------------------------------------------------


@pytest.mark.parametrize(("version", "applied"), [(170000, True), (180001, True), (160004, False)])
def test_transaction_timeout_is_applied_from_postgres_17_and_recommended_before(
    version: int, applied: bool
) -> None:
    policy = enforce(
        limits={
            "roles": [{"name": "app", "transactionTimeout": "5m"}],
            "server": {"transactionTimeout": "1h"},
        }
    )
    server_settings = MANAGED_SETTINGS if version >= 170000 else {
        name: value for name, value in MANAGED_SETTINGS.items() if name != "transaction_timeout"
    }  # fmt: skip
    before = snapshot(roles=[role("app")], version_num=version, server_settings=server_settings)
    result = plan(policy, before, Severity.HEALTHY, EMPTY, NOW)
    if applied:
        assert result.recommendations == ()
        assert result.changes == (
            SetRoleSetting("app", "transaction_timeout", "300s", None, result.changes[0].reason),
            SetSystemSetting("transaction_timeout", "3600s", "0", result.changes[1].reason),
        )
    else:
        assert result.changes == ()
        texts = [r.text for r in result.recommendations]
        assert all(isinstance(r, Recommendation) for r in result.recommendations)
        assert texts == [
            "transaction_timeout needs PostgreSQL 17+; the server is 16.4, so it is not set "
            'for role "app"',
            "transaction_timeout needs PostgreSQL 17+; the server is 16.4, so it is not applied",
        ]


# ---- when the next cycle runs ----------------------------------------------------------------


def report(
    pressure: Severity, deadline_at: float | None, *, dry_run: bool = False, was_due: bool = False
) -> CycleReport:
    diagnosis = diagnose(snapshot([]), DiagnoseOptions())
    return CycleReport(
        before=dataclasses.replace(diagnosis, pressure=pressure),
        plan=Plan(),
        records=[],
        dry_run=dry_run,
        deadline_at=deadline_at,
        deadline_was_due=was_due,
    )


def test_healthy_cycles_keep_the_interval() -> None:
    assert report(Severity.HEALTHY, 100.3).wait_s(1.0, since=100.0, now=100.1) == pytest.approx(0.9)


def test_under_pressure_the_next_cycle_runs_at_the_deadline() -> None:
    due = report(Severity.CRITICAL, 100.3)
    assert due.wait_s(1.0, since=100.0, now=100.1) == pytest.approx(0.2)
    assert report(Severity.WARNING, 105.0).wait_s(1.0, since=100.0, now=100.1) == pytest.approx(0.9)


def test_work_left_over_at_the_snapshot_waits_the_floor() -> None:
    left_over = report(Severity.CRITICAL, 99.0, was_due=True)
    assert left_over.wait_s(1.0, since=100.0, now=100.1) == DEADLINE_FLOOR_S
    # Even when the cycle outran its interval: the floor keeps it off the server a moment.
    assert left_over.wait_s(1.0, since=100.0, now=102.0) == DEADLINE_FLOOR_S


def test_a_deadline_that_passed_during_the_cycle_runs_the_next_at_once() -> None:
    assert report(Severity.CRITICAL, 100.05).wait_s(1.0, since=100.0, now=100.1) == 0.0


def test_a_deadline_about_to_come_is_kept_to_the_moment() -> None:
    soon = report(Severity.CRITICAL, 100.101)
    assert soon.wait_s(1.0, since=100.0, now=100.1) == pytest.approx(0.001)


def test_cycles_start_at_least_the_floor_apart() -> None:
    # A short cycle (5 ms), sessions coming due right after it: the next waits out the floor
    # and takes every session due by then, instead of one cycle each.
    assert report(Severity.CRITICAL, 100.008).wait_s(1.0, since=100.0, now=100.005) == (
        pytest.approx(DEADLINE_FLOOR_S - 0.005)
    )
    assert report(Severity.CRITICAL, 100.004).wait_s(1.0, since=100.0, now=100.005) == (
        pytest.approx(DEADLINE_FLOOR_S - 0.005)
    )


def test_dry_run_and_no_deadline_keep_the_interval() -> None:
    assert report(Severity.CRITICAL, 100.3, dry_run=True).wait_s(
        1.0, since=100.0, now=100.1
    ) == pytest.approx(0.9)
    assert report(Severity.CRITICAL, None).wait_s(1.0, since=100.0, now=100.1) == pytest.approx(0.9)


# ---- the cancels remembered ------------------------------------------------------------------


def test_cancelled_queries_survive_the_state_file_and_are_forgotten_once_they_end(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    running = (7, "2025-03-14T11:00:00+00:00", "2025-03-14T11:50:00+00:00")
    store.history.add_cancels({running: NOW})
    store.note_terminations([NOW], NOW)
    again = StateStore(path)
    assert again.history.cancels == {running: NOW}
    assert again.history.for_planning(NOW).cancelled == {running: NOW}

    again.history.keep_cancels([])  # the query ended: nothing is left to escalate
    again.note_terminations([], NOW)
    assert StateStore(path).history.cancels == {}
    assert json.loads(path.read_text())["cancels"] == []


def test_a_state_file_from_before_cancels_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"terminations": [NOW.isoformat()], "originals": {}}))
    assert StateStore(path).history == RemediationHistory(terminations=[NOW], originals={})
