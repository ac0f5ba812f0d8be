"""Deciding what to do about one snapshot, within the policy's limits: the guardrails live here.

``plan`` is a pure function of (policy, snapshot, pressure level, recent history, now): it
returns the actions ``act`` will perform (or, in DryRun, only report) and every session it
chose not to touch with the reason why. Keeping the decision pure is what lets the safety
rules of DESIGN.md be checked exhaustively with hypothesis instead of against a live server.

Decisions documented here once:

- ``mode: Off`` plans nothing at all: no terminations and no ALTER of any kind. ``DryRun``
  plans exactly what ``Enforce`` would; only the executor differs.
- Terminations need pressure (WARNING or CRITICAL) when ``onlyUnderPressure``; an UNKNOWN
  pressure is not pressure. Limits and timeouts are durable configuration and are applied
  whatever the pressure.
- A session whose superuser status is unknown counts as a superuser while
  ``protect.superusers`` is on. Unix-socket sessions (no client_addr) match no CIDR.
- Oldest first means the longest time in the current state; ties go to the lower pid.
- Limits are compared with what the server has and only differences are emitted, so a
  second cycle emits nothing and a value changed by hand is put back (drift).

The package is split along those decisions: ``actions`` (what a plan is made of),
``terminations`` (which sessions, within the safety rules and budgets), ``limits`` (ALTER
ROLE/DATABASE/SYSTEM for what differs), ``revert`` (putting recorded originals back) and
``pg_values`` (PostgreSQL's units). This module joins them into one cycle's ``Plan`` and is
where every public name is imported from.
"""

from __future__ import annotations

from datetime import datetime

from pgrelief.diagnosis import Severity
from pgrelief.plan.actions import (
    HOUR,
    Action,
    Change,
    Plan,
    PlanHistory,
    Recommendation,
    SetDatabaseConnectionLimit,
    SetRoleConnectionLimit,
    SetRoleSetting,
    SetSystemSetting,
    SkippedSession,
    TerminateBackend,
    database_key,
    parse_key,
    role_key,
    session_identity,
    system_key,
)
from pgrelief.plan.limits import RELOADABLE_CONTEXTS, plan_limits
from pgrelief.plan.pg_values import format_pg_duration, setting_text
from pgrelief.plan.revert import original_value, plan_revert
from pgrelief.plan.terminations import is_superuser, plan_terminations, protection
from pgrelief.policy import ConnectionPolicySpec
from pgrelief.snapshot import Snapshot

__all__ = [
    "HOUR",
    "RELOADABLE_CONTEXTS",
    "Action",
    "Change",
    "Plan",
    "PlanHistory",
    "Recommendation",
    "SetDatabaseConnectionLimit",
    "SetRoleConnectionLimit",
    "SetRoleSetting",
    "SetSystemSetting",
    "SkippedSession",
    "TerminateBackend",
    "database_key",
    "format_pg_duration",
    "is_superuser",
    "parse_key",
    "plan",
    "plan_limits",
    "plan_revert",
    "plan_terminations",
    "protection",
    "role_key",
    "session_identity",
    "setting_text",
    "system_key",
]


def plan(
    policy_spec: ConnectionPolicySpec,
    snapshot: Snapshot,
    pressure: Severity,
    history: PlanHistory,
    now: datetime,
) -> Plan:
    """Everything the policy asks for that the snapshot shows is not yet so."""
    if policy_spec.remediation.mode == "Off":
        return Plan()
    terminations, skipped, exhausted = plan_terminations(
        policy_spec, snapshot, pressure, history, now
    )
    changes, recommendations = plan_limits(policy_spec, snapshot)
    originals: dict[str, str | None] = {}
    for change in changes:
        if change.key not in history.originals and change.key not in originals:
            originals[change.key] = original_value(change, snapshot)
    return Plan(
        actions=(*terminations, *changes, *recommendations),
        skipped=skipped,
        originals=originals,
        budget_exhausted=exhausted,
    )
