"""Kubernetes Events pgrelief posts on a ConnectionPolicy: what to say, and the Event object.

Events are the audit humans read (``kubectl get events``, ``kubectl describe cpol``); the
complete trail is the audit records in the operator's log. So Events are bounded: at most
``PER_CYCLE_LIMIT`` per-session Events a cycle plus one summary, and a state that persists
(pressure, an exhausted budget, an unreachable database) is announced when it begins and when
it ends, not every cycle. Reasons are the CamelCase verbs of DESIGN.md.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pgrelief.audit import AuditRecord
from pgrelief.durations import human_age
from pgrelief.policy import API_VERSION_FULL, KIND
from pgrelief.workloads import Origin, Workload

PER_CYCLE_LIMIT = 10
COMPONENT = "pgrelief-operator"
REPORTING_CONTROLLER = "pgrelief.dev/operator"
_MESSAGE_LIMIT = 1024

BACKEND_TERMINATED = "BackendTerminated"
BACKENDS_TERMINATED = "BackendsTerminated"
WOULD_TERMINATE = "WouldTerminateBackend"
QUERY_CANCELLED = "QueryCancelled"
ROLE_LIMIT_APPLIED = "RoleLimitApplied"
DATABASE_LIMIT_APPLIED = "DatabaseLimitApplied"
SETTING_APPLIED = "SettingApplied"
WOULD_APPLY = "WouldApplyChange"
ACTION_FAILED = "ActionFailed"
PRESSURE_DETECTED = "PressureDetected"
PRESSURE_RELIEVED = "PressureRelieved"
BUDGET_EXHAUSTED = "RemediationBudgetExhausted"
POLICY_INVALID = "PolicyInvalid"
CREDENTIALS_MISSING = "CredentialsMissing"
DATABASE_UNREACHABLE = "DatabaseUnreachable"
DATABASE_REACHABLE = "DatabaseReachable"
REVERTED = "LimitsReverted"
REVERT_INCOMPLETE = "RevertIncomplete"

EventType = Literal["Normal", "Warning"]

_APPLIED = {
    "alter_role": ROLE_LIMIT_APPLIED,
    "alter_database": DATABASE_LIMIT_APPLIED,
    "alter_system": SETTING_APPLIED,
}
_ACTION_VERB = {"terminate": "Terminate", "cancel": "Cancel"}
_VERB_TEXT = {"terminate": "terminate", "cancel": "cancel the queries of"}
_PAST = {"terminate": "terminated", "cancel": "cancelled the queries of"}
_PRESSURE_RANK = {"healthy": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class EventNote:
    """One thing to announce. Equal notes posted close together become one Event's count."""

    reason: str
    type: EventType
    message: str
    action: str

    @property
    def key(self) -> str:
        return hashlib.sha1(
            f"{self.reason}\0{self.message}".encode(), usedforsecurity=False
        ).hexdigest()[:16]


def cycle_notes(
    records: Sequence[AuditRecord],
    *,
    limit: int = PER_CYCLE_LIMIT,
    origins: Mapping[int, Origin] | None = None,
) -> list[EventNote]:
    """The Events a cycle's audit records deserve: bounded per-session ones, plus a summary.

    With ``origins`` (the snapshot's attribution), each names the workload its session came
    from, and the summary counts them by workload.
    """
    notes: list[EventNote] = []
    sessions = [r for r in records if r.action in _ACTION_VERB and r.outcome != "intent"]
    terminated = [r for r in sessions if r.outcome == "done"]
    dry = [r for r in sessions if r.planned]
    failed = [r for r in records if r.outcome == "failed"]
    for record in (terminated + dry)[:limit]:
        notes.append(_session_note(record, _origin(record, origins)))
    shown = min(len(terminated) + len(dry), limit)
    if len(terminated) + len(dry) > shown:
        notes.append(_summary(terminated, dry, shown, origins))
    for record in records:
        if record.action in _APPLIED and record.outcome == "done":
            notes.append(
                EventNote(_APPLIED[record.action], "Normal", _describe_change(record), "Alter")
            )
        elif record.action in _APPLIED and record.planned:
            message = f"would apply (DryRun): {_describe_change(record)}"
            notes.append(EventNote(WOULD_APPLY, "Normal", message, "Alter"))
    for record in failed[:limit]:
        message = f"could not {record.action} {record.target}: {record.detail}"
        notes.append(EventNote(ACTION_FAILED, "Warning", message, _verb(record.action)))
    return notes


def pressure_note(previous: str | None, current: str, summary: str) -> EventNote | None:
    """PressureDetected when pressure appears or rises, PressureRelieved when it is gone."""
    before = _PRESSURE_RANK.get(previous or "", 0)
    after = _PRESSURE_RANK.get(current)
    if after is None:
        return None
    if after > before:
        return EventNote(
            PRESSURE_DETECTED, "Warning", f"connection pressure {current}: {summary}", "Observe"
        )
    if after == 0 and before > 0:
        message = f"connection pressure back to healthy: {summary}"
        return EventNote(PRESSURE_RELIEVED, "Normal", message, "Observe")
    return None


def event_manifest(
    note: EventNote,
    *,
    policy: Mapping[str, Any],
    name: str,
    count: int,
    first: datetime,
    last: datetime,
    instance: str,
) -> dict[str, Any]:
    """A core/v1 Event about ``policy`` (its metadata: name, namespace, uid), or about
    another object when the mapping also says its ``apiVersion`` and ``kind`` (a workload)."""
    meta = policy
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": meta.get("apiVersion") or API_VERSION_FULL,
            "kind": meta.get("kind") or KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": note.reason,
        "message": note.message[:_MESSAGE_LIMIT],
        "type": note.type,
        "action": note.action,
        "count": count,
        "firstTimestamp": _seconds(first),
        "lastTimestamp": _seconds(last),
        # MicroTime must carry microseconds: the kubernetes client's own formatting does not.
        "eventTime": _micro(first),
        "source": {"component": COMPONENT},
        "reportingComponent": REPORTING_CONTROLLER,
        "reportingInstance": instance[:128],
    }


def event_name(policy_name: str, note: EventNote, first: datetime) -> str:
    return f"{policy_name}.{note.key}{int(first.timestamp() * 1000):x}"[:253]


def _session_note(record: AuditRecord, origin: Origin | None = None) -> EventNote:
    evidence = record.evidence
    who = ", ".join(
        f"{label} {value}"
        for label, value in (
            ("role", evidence.get("usename")),
            ("application", repr(evidence.get("application_name") or "")),
            ("client", evidence.get("client_addr") or "local socket"),
            ("database", evidence.get("datname")),
            ("from", _origin_text(origin) if origin is not None else None),
        )
        if value is not None
    )
    age = evidence.get("state_age_s")
    # A cancel's reason already says how long its query has run: no state part for it.
    state = f"{evidence.get('state')} for {human_age(float(age))}" if age is not None else ""
    what = f"{record.target} ({'; '.join(part for part in (who, state, record.reason) if part)})"
    if record.outcome == "done":
        reason = QUERY_CANCELLED if record.action == "cancel" else BACKEND_TERMINATED
        verb = "cancelled the query of" if record.action == "cancel" else "terminated"
        return EventNote(reason, "Normal", f"{verb} {what}", _verb(record.action))
    verb = "cancel (DryRun) the query of" if record.action == "cancel" else "terminate (DryRun)"
    return EventNote(WOULD_TERMINATE, "Normal", f"would {verb} {what}", "DryRun")


def _summary(
    terminated: Sequence[AuditRecord],
    dry: Sequence[AuditRecord],
    shown: int,
    origins: Mapping[int, Origin] | None = None,
) -> EventNote:
    records = [*terminated, *dry]
    rules = Counter(str(r.evidence.get("rule") or r.action) for r in records)
    by_rule = ", ".join(f"{rule} {count}" for rule, count in rules.most_common())
    counts = Counter((r.outcome != "done", r.action) for r in records)
    done = [
        f"would {_VERB_TEXT[action]} {count} (DryRun)" if was_dry else f"{_PAST[action]} {count}"
        for (was_dry, action), count in sorted(counts.items(), key=_summary_order)
    ]
    by_workload = ""
    if origins is not None:
        groups = Counter(
            (_workload_label(_origin(r, origins)), str(r.evidence.get("state") or "?"))
            for r in records
        )
        parts = [
            f"{count} {state.replace(' ', '-')} session(s) from {label}"
            for (label, state), count in groups.most_common(PER_CYCLE_LIMIT)
        ]
        by_workload = "; " + ", ".join(parts) if parts else ""
    message = (
        f"{' and '.join(done)} sessions this cycle ({by_rule}){by_workload}; "
        f"{shown} are separate Events, the operator's audit log has every one"
    )
    return EventNote(BACKENDS_TERMINATED, "Normal", message, "Terminate")


def _summary_order(item: tuple[tuple[bool, str], int]) -> tuple[bool, int]:
    (was_dry, action), _count = item
    return (was_dry, list(_ACTION_VERB).index(action))  # done first, terminations first


def workload_notes(
    records: Sequence[AuditRecord],
    origins: Mapping[int, Origin],
    *,
    policy: str,
    limit: int = PER_CYCLE_LIMIT,
) -> list[tuple[Workload, EventNote]]:
    """One Event per workload whose sessions a cycle terminated (or, DryRun, would have), to
    post on the workload itself: what its team sees in ``kubectl describe deployment``."""
    # Connections ended, not queries cancelled: a cancelled query's session lives on.
    sessions = [
        r for r in records if r.action == "terminate" and (r.outcome == "done" or r.planned)
    ]
    by_workload: dict[Workload, list[AuditRecord]] = {}
    for record in sessions:
        origin = _origin(record, origins)
        if origin is not None and origin.workload is not None:
            by_workload.setdefault(origin.workload, []).append(record)
    ranked = sorted(by_workload.items(), key=lambda item: (-len(item[1]), item[0].label))
    return [
        (workload, _workload_note(workload, group, policy)) for workload, group in ranked[:limit]
    ]


def _workload_note(workload: Workload, records: Sequence[AuditRecord], policy: str) -> EventNote:
    # No ages in the text: the same sessions seen again fold into one Event's count.
    dry = all(r.outcome != "done" for r in records)
    states = Counter(str(r.evidence.get("state") or "?") for r in records)
    databases = sorted({str(r.evidence["datname"]) for r in records if r.evidence.get("datname")})
    what = ", ".join(f"{n} {state}" for state, n in states.most_common())
    where = f" to database {', '.join(databases)}" if databases else ""
    subject = f"{len(records)} leaked connection(s) of this {workload.kind}'s pods{where} ({what})"
    if dry:
        message = f"pgrelief would terminate (DryRun) {subject}; ConnectionPolicy {policy}"
        return EventNote(WOULD_TERMINATE, "Normal", message, "DryRun")
    message = f"pgrelief terminated {subject}; ConnectionPolicy {policy}"
    return EventNote(BACKENDS_TERMINATED, "Warning", message, "Terminate")


def workload_ref(workload: Workload) -> dict[str, Any]:
    """The involved object of an Event posted on ``workload`` (``EventRecorder``'s mapping)."""
    return {
        "apiVersion": workload.api_version or _API_VERSIONS.get(workload.kind, "v1"),
        "kind": workload.kind,
        "name": workload.name,
        "namespace": workload.namespace,
        "uid": workload.uid,
    }


_API_VERSIONS = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1",
    "CronJob": "batch/v1",
    "Job": "batch/v1",
}


def _origin(record: AuditRecord, origins: Mapping[int, Origin] | None) -> Origin | None:
    pid = record.evidence.get("pid")
    if origins is None or not isinstance(pid, int):
        return None
    return origins.get(pid)


def _workload_label(origin: Origin | None) -> str:
    return origin.label if origin is not None else "no known workload"


def _origin_text(origin: Origin) -> str:
    if origin.workload is None:
        return f"unknown workload ({origin.why})" if origin.why else "unknown workload"
    pod = f" pod {origin.pod}" if origin.pod else ""
    via = f" via PgBouncer {origin.via}" if origin.via else ""
    return f"{origin.workload.label}{pod}{via}"


def _describe_change(record: AuditRecord) -> str:
    return f"{record.target}: {record.reason}"


def _verb(action: str) -> str:
    return _ACTION_VERB.get(action, "Alter")


def _seconds(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
