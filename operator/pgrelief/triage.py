"""A partial diagnosis from the seed's three triage queries, when that is all someone pasted.

The troubleshooter we model ourselves on asks for three queries first: connections by state,
by user × application × state, and the 20 oldest idle sessions. People paste their output
before anything else, and it already answers part of the question: how full the server is,
who holds the slots, and which idle sessions look leaked. This module turns those outputs into
the same ``Diagnosis`` (and so the same report and JSON) as a full dump, with what they cannot
tell said plainly and the command that gets the full dump printed.

It is pure: the rows arrive parsed (``dumps.triage`` reads them from any format). Counting
follows ``diagnose`` (NULL user or application shows as empty, groups and states biggest first,
utilisation against usable slots) and the leaked-idle finding *is* ``diagnose``'s, run on the
real sessions the oldest-idle list shows; a test holds both to the live diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from pgrelief.advice import quote_literal
from pgrelief.diagnose import DEFAULT_OPTIONS, DiagnoseOptions, diagnose
from pgrelief.diagnosis import (
    ADVICE,
    EMERGENCY_SQL,
    LEAKED_IDLE,
    ORM,
    PARTIAL_INPUT,
    SATURATION,
    Breakdown,
    Diagnosis,
    Finding,
    Fix,
    Group,
    ServerSummary,
    Severity,
    Totals,
)
from pgrelief.durations import human_age
from pgrelief.snapshot import (
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    NO_STATE,
    ServerFacts,
    Session,
    Snapshot,
)

OLDEST_IDLE_LIMIT = 20  # the seed's third query: ``limit 20``
FULL_DUMP = """-- in psql, as a superuser (a reserved slot) or as a role granted
-- pg_use_reserved_connections:
\\copy (select now(), * from pg_stat_activity) to 'activity.csv' csv header
\\copy (select * from pg_settings) to 'settings.csv' csv header
-- then, in a shell:
--   pgrelief diagnose --activity-file activity.csv --settings-file settings.csv
-- or in one go, psql's own output piped in:
--   psql -X -c 'select now(), * from pg_stat_activity' -c 'show all' \\
--     | pgrelief diagnose --activity-file -"""
_NEEDS_FULL_DUMP = (
    "needs the full pg_stat_activity dump: idle-in-transaction and long-running sessions "
    "(their ages and the statements that end or cancel them), lock waits, the breakdowns by "
    "client address and by database, the pooler and session-feature analysis (LISTEN, "
    "advisory locks), role monopolies and per-application pool sizes"
)


@dataclass(frozen=True, slots=True)
class UserAppCount:
    """One row of the second triage query."""

    usename: str | None
    application_name: str | None
    state: str | None
    count: int


@dataclass(frozen=True, slots=True)
class TriageInput:
    """What the triage query outputs showed; None for a query that was not given."""

    source: str
    server: ServerFacts
    by_state: Mapping[str | None, int] | None = None  # query 1
    by_user_app: Sequence[UserAppCount] | None = None  # query 2
    oldest_idle: Sequence[Session] | None = None  # query 3: real sessions, ages known
    taken_at: datetime | None = None  # from query 3: state_change + idle_duration


def diagnose_triage(triage: TriageInput, options: DiagnoseOptions = DEFAULT_OPTIONS) -> Diagnosis:
    """The diagnosis the triage outputs support, and a finding saying what they cannot."""
    facts = triage.server
    usable = facts.usable_slots
    by_state, lower_bound = _state_totals(triage)
    clients = sum(by_state.values())
    utilization = clients * 100.0 / usable if usable > 0 else 100.0
    pressure = _pressure(utilization, clients, usable, options)
    breakdown = _breakdown(triage)
    findings: list[Finding] = []
    if pressure != Severity.HEALTHY:
        findings.append(_saturation(triage, clients, utilization, pressure, by_state, breakdown))
    findings.extend(_leaked_idle(triage, options))
    findings.append(_partial(triage, by_state))
    status = max([pressure, *(f.severity for f in findings)])
    notes = [
        "partial diagnosis from the seed's triage queries only: "
        + _NEEDS_FULL_DUMP
        + " (the partial_input finding prints the command)"
    ]
    if lower_bound:
        notes.append(
            "only the oldest-idle list was given: the counts are the sessions it lists, a "
            "lower bound; add the output of triage query 1 or 2 for the totals"
        )
    if triage.by_state is not None and triage.by_user_app is not None:
        second = sum(row.count for row in triage.by_user_app)
        if second != clients:
            notes.append(
                f"query 1 counts {clients} client backends and query 2 {second}: they ran at "
                "different moments; the totals are query 1's"
            )
    return Diagnosis(
        status=status,
        pressure=pressure,
        server=ServerSummary(
            version_num=facts.version_num,
            max_connections=facts.max_connections,
            superuser_reserved_connections=facts.superuser_reserved_connections,
            reserved_connections=facts.reserved_connections,
            usable_slots=usable,
            assumed=facts.assumed,
        ),
        totals=Totals(client_backends=clients, utilization_percent=utilization, by_state=by_state),
        breakdown=breakdown,
        findings=tuple(findings),
        source=triage.source,
        taken_at=triage.taken_at.isoformat() if triage.taken_at else None,
        notes=tuple(notes),
    )


def _pressure(utilization: float, clients: int, usable: int, options: DiagnoseOptions) -> Severity:
    # diagnose's rule over the same numbers (a test holds the two to each other)
    if utilization >= options.critical_percent or clients >= usable:
        return Severity.CRITICAL
    if utilization >= options.warning_percent:
        return Severity.WARNING
    return Severity.HEALTHY


def _ordered(counts: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _state_totals(triage: TriageInput) -> tuple[dict[str, int], bool]:
    """Client backends by state, and whether that is only the oldest-idle list (a floor)."""
    counts: dict[str, int] = {}
    if triage.by_state is not None:
        rows: list[tuple[str | None, int]] = list(triage.by_state.items())
    elif triage.by_user_app is not None:
        rows = [(row.state, row.count) for row in triage.by_user_app]
    else:
        rows = [(session.state, 1) for session in triage.oldest_idle or ()]
    for state, count in rows:
        key = state or NO_STATE
        counts[key] = counts.get(key, 0) + count
    floor = triage.by_state is None and triage.by_user_app is None
    return _ordered(counts), floor


def _breakdown(triage: TriageInput) -> Breakdown:
    """By user and by application from query 2 (or the listed sessions); the rest unknown."""
    rows: list[tuple[str, str, str | None, int, float | None]]
    if triage.by_user_app is not None:
        rows = [
            (row.usename or "", row.application_name or "", row.state, row.count, None)
            for row in triage.by_user_app
        ]
    elif triage.by_state is None:
        rows = [
            (s.usename or "", s.application_name, s.state, 1, s.state_age_s)
            for s in triage.oldest_idle or ()
        ]
    else:
        return Breakdown()
    users: dict[str, list[tuple[str | None, int, float | None]]] = {}
    applications: dict[str, list[tuple[str | None, int, float | None]]] = {}
    for user, application, state, count, age in rows:
        users.setdefault(user, []).append((state, count, age))
        applications.setdefault(application, []).append((state, count, age))
    return Breakdown(by_user=_groups(users), by_application=_groups(applications))


def _groups(
    parts: Mapping[str, list[tuple[str | None, int, float | None]]],
) -> tuple[Group, ...]:
    groups = []
    for key, rows in parts.items():
        states: dict[str, int] = {}
        for state, count, _ in rows:
            states[state or NO_STATE] = states.get(state or NO_STATE, 0) + count
        ages = [age for _, _, age in rows if age is not None]
        total = sum(count for _, count, _ in rows)
        groups.append(Group(key, total, _ordered(states), max(ages, default=None)))
    return tuple(sorted(groups, key=lambda g: (-g.count, g.key)))


def _saturation(
    triage: TriageInput,
    clients: int,
    utilization: float,
    pressure: Severity,
    by_state: Mapping[str, int],
    breakdown: Breakdown,
) -> Finding:
    facts = triage.server
    usable = facts.usable_slots
    summary = (
        f"{clients} client backends hold {utilization:.0f}% of the {usable} usable connection slots"
    )
    if clients >= usable:
        summary += ": new connections from ordinary roles are refused ('too many clients')"
    evidence = [
        f"usable slots {usable} = max_connections {facts.max_connections} − "
        f"superuser_reserved_connections {facts.superuser_reserved_connections} − "
        f"reserved_connections {facts.reserved_connections}",
        "by state: " + ", ".join(f"{count} {state}" for state, count in by_state.items()),
    ]
    top = [
        f"{label} {quote_literal(groups[0].key) if groups[0].key else '(none)'} {groups[0].count}"
        for label, groups in (
            ("user", breakdown.by_user),
            ("application", breakdown.by_application),
        )
        if groups
    ]
    if top:
        evidence.append("largest holders: " + ", ".join(top))
    if facts.assumed:
        evidence.append(
            "not observed, PostgreSQL defaults assumed: "
            + ", ".join(facts.assumed)
            + " (add SHOW ALL to the paste, or give --settings-file, for exact numbers)"
        )
    advice = (
        "1. Get in through a reserved slot: connect as a superuser "
        f"({facts.superuser_reserved_connections} superuser-reserved slots), or as a role "
        "granted pg_use_reserved_connections (PostgreSQL 16+).\n"
        "2. Free slots: the leaked-idle statement below ends the idle sessions the oldest-idle "
        "list shows; for everything else dump pg_stat_activity (the partial_input finding "
        "prints the command) and run pgrelief on it for statements that re-check each "
        "session.\n"
        "3. Prevent the next time: timeouts and per-role limits, PgBouncer in front of the "
        "applications, right-sized ORM pools.\n"
        "Raising max_connections is not the fix: every backend costs memory, and hundreds of "
        "active backends add lock contention and context switching."
    )
    severity = Severity.CRITICAL if pressure == Severity.CRITICAL else Severity.WARNING
    fixes = (Fix(ADVICE, advice, "emergency triage"),)
    return Finding(SATURATION, severity, summary, tuple(evidence), (), fixes)


def _leaked_idle(triage: TriageInput, options: DiagnoseOptions) -> list[Finding]:
    """diagnose's own leaked-idle finding over the real sessions the oldest-idle list shows."""
    if not triage.oldest_idle or triage.taken_at is None:
        return []
    listed = Snapshot(
        taken_at=triage.taken_at,
        server=triage.server,
        sessions=tuple(triage.oldest_idle),
        source=triage.source,
    )
    found = diagnose(listed, options).finding(LEAKED_IDLE)
    if found is None:
        return []
    shown = len(triage.oldest_idle)
    evidence = (
        *found.evidence,
        f"from the oldest-idle list: {shown} idle session(s) listed"
        + (
            f", the query's limit of {OLDEST_IDLE_LIMIT}: more idle sessions may exist"
            if shown >= OLDEST_IDLE_LIMIT
            else ""
        ),
        "the list has no backend_start: the terminate statement matches pid and state only; "
        "the full dump gives statements that also re-check each session's start and last "
        "state change",
    )
    # Pool sizes divide a role's share by the application's client addresses: a list of the
    # oldest idle sessions holds neither the roles nor the addresses of the whole server.
    fixes = [fix for fix in found.fixes if fix.kind != ORM]
    fixes.append(
        Fix(
            ADVICE,
            "Pool sizes per application need the full dump (every session's role and client "
            "address); meanwhile turn on leak detection and recycling in the pool.",
            "application pool settings",
        )
    )
    return [replace(found, evidence=evidence, fixes=tuple(fixes))]


def _partial(triage: TriageInput, by_state: Mapping[str, int]) -> Finding:
    given = []
    if triage.by_state is not None:
        given.append(f"query 1 ({sum(triage.by_state.values())} client backends by state)")
    if triage.by_user_app is not None:
        given.append(f"query 2 ({len(triage.by_user_app)} user/application/state rows)")
    if triage.oldest_idle is not None:
        oldest = max((s.state_age_s or 0.0 for s in triage.oldest_idle), default=None)
        given.append(
            f"query 3 ({len(triage.oldest_idle)} oldest idle sessions"
            + (f", the oldest idle {human_age(oldest)})" if oldest else ")")
        )
    evidence = ["given: " + ", ".join(given), _NEEDS_FULL_DUMP]
    in_transaction = by_state.get(IDLE_IN_TRANSACTION, 0) + by_state.get(
        IDLE_IN_TRANSACTION_ABORTED, 0
    )
    if in_transaction:
        evidence.append(
            f"{in_transaction} session(s) idle in transaction: the triage output has neither "
            "their ages nor their pids; they hold locks and slots, so dump them first"
        )
    if triage.oldest_idle is None and by_state.get(IDLE):
        evidence.append(
            f"{by_state[IDLE]} idle session(s): add triage query 3 (or the full dump) to see "
            "which are leaked"
        )
    return Finding(
        PARTIAL_INPUT,
        Severity.HEALTHY,
        "the triage queries answer how full the server is and who holds the slots; the rest "
        "needs the full pg_stat_activity dump",
        tuple(evidence),
        (),
        (Fix(EMERGENCY_SQL, FULL_DUMP, "get the full dump"),),
    )


def diagnose_offline(
    found: Snapshot | TriageInput,
    options: DiagnoseOptions = DEFAULT_OPTIONS,
    notes: Sequence[str] = (),
) -> Diagnosis:
    """The diagnosis of what a paste held: the full one for a snapshot, else the partial one;
    with the paste's own notes (encoding, unused tables) first."""
    if isinstance(found, Snapshot):
        diagnosis = diagnose(found, options)
    else:
        diagnosis = diagnose_triage(found, options)
    return replace(diagnosis, notes=(*notes, *diagnosis.notes))
