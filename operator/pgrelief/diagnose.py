"""What is eating the connection slots: a Snapshot in, a Diagnosis with evidence and fixes out.

This is the troubleshooter's judgement, kept a pure function so that a live server, a pasted
dump and a generated test snapshot all get the same answer, and so the operator can run it
every few seconds on 100k sessions (one pass over the sessions; everything after that works on
aggregates and on the few sessions a finding names).

Counting choices (they matter for the numbers people compare with their own queries):

* Utilization counts ``client backend`` sessions against usable slots (max_connections minus
  both reserves), like PostgreSQL's "too many clients" check does. Other backend types are
  reported beside it: since PostgreSQL 12 autovacuum, background workers and WAL senders draw
  on their own process pools, not on max_connections.
* pgrelief's own session (``snapshot.own_pid``) is in the totals and breakdowns (it holds a
  slot, and the seed queries would count it too) but never in a finding's pids, its terminate
  statements or the counts that size a limit: we do not advise killing ourselves.
* Sessions whose age is unknown (a dump without timestamps) are counted but never judged
  leaked, stuck or long-running: there is no evidence for it.
"""

from __future__ import annotations

import gc
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, eq, is_, is_not, itemgetter
from typing import Any, cast

from pgrelief import advice
from pgrelief.diagnosis import (
    ADVICE,
    DURABLE_SQL,
    EMERGENCY_SQL,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LONG_RUNNING,
    MEMORY_OVERCOMMIT,
    NO_POOLER,
    ORM,
    PGBOUNCER,
    RESERVED_ACCESS,
    ROLE_MONOPOLY,
    SATURATION,
    TRAFFIC_SPIKE,
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
from pgrelief.sizing import (
    DEFAULT_AUTOVACUUM_MAX_WORKERS,
    DEFAULT_MAINTENANCE_WORK_MEM,
    DEFAULT_SHARED_BUFFERS,
    DEFAULT_TEMP_BUFFERS,
    DEFAULT_WORK_MEM,
    MB,
    RECOMMENDED_MAX_CONNECTIONS,
    RECOMMENDED_SUPERUSER_RESERVED,
    MemoryModel,
    fair_share,
    format_size,
    headroom_slots,
    os_reserve,
    pgbouncer_pool_sizes,
    pool_per_instance,
)
from pgrelief.snapshot import (
    ACTIVE,
    CLIENT_BACKEND,
    FASTPATH,
    IDLE,
    NO_STATE,
    Session,
    Snapshot,
)
from pgrelief.snapshot import IDLE_IN_TRANSACTION as STATE_IDLE_IN_TRANSACTION
from pgrelief.snapshot import IDLE_IN_TRANSACTION_ABORTED as STATE_ABORTED

LOCAL_SOCKET = "local socket"
_EVIDENCE_ROWS = 10  # per-group / per-session evidence lines before "... and N more"
_KIND_ORDER = (
    SATURATION,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LONG_RUNNING,
    TRAFFIC_SPIKE,
    ROLE_MONOPOLY,
    NO_POOLER,
    MEMORY_OVERCOMMIT,
    RESERVED_ACCESS,
)
# Tuning of the heuristics (documented in the findings' evidence when they fire).
TRAFFIC_SPIKE_SHARE = 0.4  # active sessions as a share of usable slots
TRAFFIC_SPIKE_MIN = 5
MONOPOLY_SHARE = 0.5  # of client backends
MONOPOLY_MIN_SLOTS_SHARE = 0.25  # of usable slots
MONOPOLY_MIN = 5
NO_POOLER_MIN = 20
NO_POOLER_FLOOR = 10
NO_POOLER_SLOTS_SHARE = 0.3
NO_POOLER_ACTIVE_RATIO = 0.2
MEMORY_MIN_USABLE = 10  # below this many usable slots, lowering max_connections is no fix
_POOLER_NAMES = ("pgbouncer", "pgpool", "odyssey", "pgcat", "supavisor", "pgdog")

_REFUSAL_CLIENTS = "sorry, too many clients already"
_REFUSAL_RESERVED = "remaining connection slots are reserved"
_REFUSAL_ROLE = "too many connections for role"
_REFUSAL_DATABASE = "too many connections for database"


class OptionsError(ValueError):
    """Diagnose options that contradict each other or are out of range."""


@dataclass(frozen=True, slots=True)
class DiagnoseOptions:
    """Thresholds of the findings; the CLI flags and a policy's pressure map onto these."""

    idle_after_s: float = 1800.0
    idle_in_transaction_after_s: float = 60.0
    long_running_after_s: float = 300.0
    warning_percent: int = 70
    critical_percent: int = 90
    memory_bytes: int | None = None  # --memory: enables the memory_overcommit finding
    stack: str | None = None  # forces the ORM advice: sqlalchemy | django | rails | hikaricp

    def __post_init__(self) -> None:
        for name in ("idle_after_s", "idle_in_transaction_after_s", "long_running_after_s"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must not be negative")
        if not 0 < self.warning_percent <= self.critical_percent:
            raise OptionsError(
                "pressure thresholds need 0 < warning_percent <= critical_percent, got "
                f"{self.warning_percent} and {self.critical_percent}"
            )
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise OptionsError("memory must be a positive size")
        if self.stack is not None and self.stack not in advice.STACKS:
            raise OptionsError(
                f"unknown stack {self.stack!r}; expected one of {', '.join(advice.STACKS)}"
            )


DEFAULT_OPTIONS = DiagnoseOptions()

# Client sessions are taken apart into columns once (C-level attrgetter maps); every count
# after that is a Counter over zipped columns, so nothing per-session runs in Python twice.
USER, APP, ADDR, DB, STATE = 0, 1, 2, 3, 4
_Key = tuple[str | None, str | None, str | None, str | None, str | None]
_COLUMN_GETTERS = (
    attrgetter("usename"),
    attrgetter("application_name"),
    attrgetter("client_addr"),
    attrgetter("datname"),
)
_STATE = attrgetter("state")
_STATE_AGE = attrgetter("state_age_s")
_QUERY_AGE = attrgetter("query_age_s")
_WAIT = attrgetter("wait_event_type", "wait_event")
_SAMPLE = 2000  # sessions sampled to decide whether combinations are few
_GC_PAUSE_FROM = 5000  # sessions
_PID = attrgetter("pid")
_USENAME = attrgetter("usename")
_APPLICATION = attrgetter("application_name")


@dataclass(frozen=True, slots=True)
class _Context:
    """What the finding builders share: the snapshot, options, columns and candidate lists."""

    snapshot: Snapshot
    options: DiagnoseOptions
    usable: int
    utilization: float
    pressure: Severity
    by_state: dict[str, int]
    breakdown: Breakdown
    own: Session | None
    others: int  # non-client backends
    clients: list[Session]  # client backends, own session included
    columns: tuple[list[str | None], ...]  # USER, APP, ADDR, DB values, parallel to clients
    states: list[str | None]  # parallel to clients
    combos: Counter[_Key] | None  # clients per (user, app, address, database, state), if few
    idle_in_tx: list[Session]
    leaked: list[Session]
    long_running: list[Session]
    active: list[Session]
    _cache: dict[object, Any] = field(default_factory=dict)

    @property
    def client_count(self) -> int:
        return len(self.clients)

    @property
    def candidates_total(self) -> int:
        """Client backends that count for remediation sizing: ours excluded."""
        return len(self.clients) - (1 if self.own is not None else 0)

    def projection(self, *indices: int) -> Counter[Any]:
        """Client backends counted by the given key columns (USER, APP, ADDR, DB, STATE)."""
        cache_key = ("projection", indices)
        if cache_key not in self._cache:
            if self.combos is not None:
                project = itemgetter(*indices)
                counts: Counter[Any] = Counter()
                for key, count in self.combos.items():
                    counts[project(key)] += count
            elif len(indices) == 1:
                counts = Counter(self._column(indices[0]))
            else:
                counts = Counter(zip(*(self._column(i) for i in indices), strict=True))
            self._cache[cache_key] = counts
        found: Counter[Any] = self._cache[cache_key]
        return found

    def _column(self, index: int) -> list[str | None]:
        return self.states if index == STATE else self.columns[index]

    def _beside(self, where: int, value: str | None, index: int) -> Counter[str | None]:
        """Counts of column ``index`` among the sessions whose column ``where`` is ``value``."""
        counts: Counter[str | None] = Counter()
        if self.combos is not None:
            for key, count in self.combos.items():
                if key[where] == value:
                    counts[key[index]] += count
            return counts
        column = self._column(index)
        return Counter(compress(column, map(_equals(value), self._column(where))))

    def counts_excluding_own(self, index: int) -> Counter[str | None]:
        counts: Counter[str | None] = Counter(self.projection(index))
        if self.own is not None:
            own_value = _COLUMN_GETTERS[index](self.own)
            counts[own_value] -= 1
            if counts[own_value] <= 0:
                del counts[own_value]
        return counts

    def addresses_of(self, index: int, value: str | None) -> int:
        """Distinct client addresses of the sessions whose column ``index`` is ``value``."""
        return len(self._beside(index, value, ADDR)) or 1

    def main_value(self, index: int, where: int, value: str | None) -> str | None:
        """The most common column ``index`` value among sessions whose ``where`` is value."""
        counts = self._beside(where, value, index)
        if not counts:
            return None
        return min(counts.items(), key=lambda item: (-item[1], str(item[0])))[0]

    def distinct(self, index: int) -> set[str | None]:
        return set(self.projection(index))

    def triples(self) -> set[tuple[str | None, str | None, str | None]]:
        """Distinct (database, user, application): PgBouncer's pools and who uses them."""
        return set(self.projection(DB, USER, APP))

    def distinct_roles(self) -> int:
        return len(self.projection(USER)) or 1

    def sessions_where(self, index: int, value: str | None) -> list[Session]:
        """Client sessions (ours excluded) whose column ``index`` is ``value``."""
        own = self.own
        return [
            s
            for s, v in zip(self.clients, self.columns[index], strict=True)
            if v == value and s is not own
        ]


def _equals(value: str | None) -> Callable[[str | None], bool]:
    """A C-level equality test against ``value`` for map(), None included."""
    # Not value.__eq__: str.__eq__(None) is NotImplemented, which is truthy.
    return partial(is_, None) if value is None else partial(eq, value)


def _combinations(
    columns: tuple[list[str | None], ...], states: list[str | None]
) -> Counter[_Key] | None:
    """Clients per (user, application, address, database, state) when such keys are few.

    Real servers have few: an application runs as one role on a handful of hosts. Folding a
    few hundred combinations is then cheaper than counting each column; with near-unique
    keys it is not, and the columns are counted directly (None).
    """
    total = len(states)
    step = max(total // _SAMPLE, 1)
    sample = set(zip(*(column[::step] for column in columns), states[::step], strict=True))
    if len(sample) * 4 > min(total, _SAMPLE):
        return None
    combos = Counter(zip(*columns, states, strict=True))
    return combos if len(combos) * 4 <= total else None


def diagnose(snapshot: Snapshot, options: DiagnoseOptions = DEFAULT_OPTIONS) -> Diagnosis:
    """Diagnose one snapshot: breakdowns, pressure, and findings with their evidence and fixes."""
    if len(snapshot.sessions) < _GC_PAUSE_FROM:
        return _diagnose(snapshot, options)
    # The columns and keys are hundreds of thousands of short-lived lists and tuples beside
    # the snapshot's long-lived sessions: each collection the allocations trigger would
    # rescan all of them (half the time at 100k sessions) and free nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _diagnose(snapshot, options)
    finally:
        if was_enabled:
            gc.enable()


def _diagnose(snapshot: Snapshot, options: DiagnoseOptions) -> Diagnosis:
    facts = snapshot.server
    usable = facts.usable_slots
    own_pid = snapshot.own_pid

    clients = [s for s in snapshot.sessions if s.backend_type == CLIENT_BACKEND]
    others = len(snapshot.sessions) - len(clients)
    own = next((s for s in clients if s.pid == own_pid), None) if own_pid is not None else None
    columns = tuple(list(map(getter, clients)) for getter in _COLUMN_GETTERS)
    states = list(map(_STATE, clients))
    ages = list(map(_STATE_AGE, clients))
    combos = _combinations(columns, states)

    # Candidates: C-level selection by state, then the age test on that subset only.
    # Ages unknown (None) are never judged: there is no evidence for them.
    def in_state(*wanted: str) -> list[Session]:
        return list(compress(clients, map(frozenset(wanted).__contains__, states)))

    def aged(
        sessions: list[Session], getter: Callable[[Session], float | None], at_least: float
    ) -> list[Session]:
        return [
            s
            for s in sessions
            if (age := getter(s)) is not None and age >= at_least and s is not own
        ]

    leaked = aged(in_state(IDLE), _STATE_AGE, options.idle_after_s)
    idle_in_tx = aged(
        in_state(STATE_IDLE_IN_TRANSACTION, STATE_ABORTED),
        _STATE_AGE,
        options.idle_in_transaction_after_s,
    )
    active = [s for s in in_state(ACTIVE, FASTPATH) if s is not own]
    long_running = aged(active, _QUERY_AGE, options.long_running_after_s)

    by_state, breakdown = _fold(columns, states, combos, ages)
    # No slot at all for ordinary roles is as full as it gets.
    utilization = len(clients) * 100.0 / usable if usable > 0 else 100.0
    pressure = _pressure(utilization, len(clients), usable, options)
    context = _Context(
        snapshot=snapshot,
        options=options,
        usable=usable,
        utilization=utilization,
        pressure=pressure,
        by_state=by_state,
        breakdown=breakdown,
        own=own,
        others=others,
        clients=clients,
        columns=columns,
        states=states,
        combos=combos,
        idle_in_tx=idle_in_tx,
        leaked=leaked,
        long_running=long_running,
        active=active,
    )
    findings: list[Finding] = []
    findings.extend(_saturation(context))
    findings.extend(_connection_limits(context))
    findings.extend(_idle_in_transaction(context))
    findings.extend(_leaked_idle(context))
    findings.extend(_long_running(context))
    findings.extend(_traffic_spike(context))
    findings.extend(_monopoly(context))
    findings.extend(_no_pooler(context))
    findings.extend(_memory_overcommit(context))
    findings.extend(_reserved_access(context))
    findings.sort(key=lambda f: (-int(f.severity), _KIND_ORDER.index(f.kind)))
    status = max([pressure, *(f.severity for f in findings)])
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
        totals=Totals(
            client_backends=len(clients),
            utilization_percent=utilization,
            by_state=by_state,
            other_backends=others,
        ),
        breakdown=breakdown,
        findings=tuple(findings),
        source=snapshot.source,
        taken_at=snapshot.taken_at.isoformat(),
    )


def _pressure(utilization: float, clients: int, usable: int, options: DiagnoseOptions) -> Severity:
    if utilization >= options.critical_percent or clients >= usable:
        return Severity.CRITICAL
    if utilization >= options.warning_percent:
        return Severity.WARNING
    return Severity.HEALTHY


_GROUP_DEFAULTS = ("", "", LOCAL_SOCKET, "")  # what a NULL user, address or database shows as


def _fold(
    columns: tuple[list[str | None], ...],
    states: list[str | None],
    combos: Counter[_Key] | None,
    ages: list[float | None],
) -> tuple[dict[str, int], Breakdown]:
    """Totals by state and the four breakdowns with their state split and oldest age.

    Counting folds the combination counts when there are few, else counts each column
    against the states at C speed.
    """
    totals: dict[str, int] = {}
    for state, count in Counter(states).items():
        totals[state or NO_STATE] = totals.get(state or NO_STATE, 0) + count
    pairs: list[Iterable[tuple[tuple[str | None, str | None], int]]]
    if combos is not None:
        folded: list[Counter[tuple[str | None, str | None]]] = [Counter() for _ in columns]
        for key, count in combos.items():
            state = key[STATE]
            for index, fold in enumerate(folded):
                fold[key[index], state] += count
        pairs = [fold.items() for fold in folded]
    else:
        pairs = [Counter(zip(column, states, strict=True)).items() for column in columns]
    distinct = [len({value for (value, _state), _n in column_pairs}) for column_pairs in pairs]
    oldest_raw = _oldest_per_value(columns, ages, distinct)
    groups: list[tuple[Group, ...]] = []
    for index, column_pairs in enumerate(pairs):
        default = _GROUP_DEFAULTS[index]
        tables: dict[str, _GroupAcc] = {}
        for (value, state), count in column_pairs:
            name = value or default
            state_name = state or NO_STATE
            group = tables.get(name)
            if group is None:
                tables[name] = _GroupAcc(count, {state_name: count}, None)
            else:
                group.count += count
                group.by_state[state_name] = group.by_state.get(state_name, 0) + count
        for value, oldest in oldest_raw[index].items():
            group = tables[value or default]
            if group.oldest is None or oldest > group.oldest:
                group.oldest = oldest
        groups.append(
            tuple(
                Group(name, g.count, _ordered(g.by_state), g.oldest)
                for name, g in sorted(tables.items(), key=lambda item: (-item[1].count, item[0]))
            )
        )
    return _ordered(totals), Breakdown(
        by_user=groups[USER],
        by_application=groups[APP],
        by_client_addr=groups[ADDR],
        by_database=groups[DB],
    )


def _oldest_per_value(
    columns: tuple[list[str | None], ...], ages: list[float | None], distinct: list[int]
) -> list[dict[str | None, float]]:
    """The oldest age of each value of each column, without a Python loop over sessions.

    Sessions are ordered by age (C-level sort) and taken oldest first in growing chunks; a
    dict built over a chunk in ascending order keeps each value's oldest (last write wins),
    and values already seen in an older chunk keep theirs. It stops once every value of every
    column has been seen, which on real servers is within the first few thousand sessions.
    """
    known = list(compress(range(len(ages)), map(is_not, repeat(None), ages)))
    known.sort(key=cast(Callable[[int], float], ages.__getitem__))
    found: list[dict[str | None, float]] = [{} for _ in columns]
    end = len(known)
    chunk = 2048
    while end > 0:
        start = max(end - chunk, 0)
        part = known[start:end]
        part_ages = cast(list[float], list(map(ages.__getitem__, part)))
        for index, column in enumerate(columns):
            if len(found[index]) < distinct[index]:
                newer = dict(zip(map(column.__getitem__, part), part_ages, strict=True))
                newer.update(found[index])
                found[index] = newer
        if all(len(f) >= n for f, n in zip(found, distinct, strict=True)):
            break
        end = start
        chunk *= 2
    return found


@dataclass(slots=True)
class _GroupAcc:
    count: int
    by_state: dict[str, int]
    oldest: float | None


def _ordered(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# --- helpers for the finding builders ---------------------------------------------------------


def _name(value: str | None) -> str:
    if value is None:
        return "(unknown)"
    if value == "":
        return "(none)"
    return advice.quote_literal(value)


def _addr(value: str | None) -> str:
    return value or LOCAL_SOCKET


def _oldest_first(sessions: Iterable[Session], age: str) -> list[Session]:
    """Sessions sorted by the given age, oldest first, ties by pid; unknown ages last.

    Two stable C-level sorts (pid, then age descending) instead of a Python key function:
    findings may name tens of thousands of sessions.
    """
    getter = attrgetter(age)
    known = [s for s in sessions if getter(s) is not None]
    unknown = [s for s in sessions if getter(s) is None]
    known.sort(key=_PID)
    known.sort(key=getter, reverse=True)  # reverse keeps equal ages in pid order
    unknown.sort(key=_PID)
    return known + unknown


_USER_APP = attrgetter("usename", "application_name")
_APP_ADDR = attrgetter("application_name", "client_addr")


@dataclass(frozen=True, slots=True)
class _Bucket:
    """Sessions of a finding sharing a key (e.g. application and client address)."""

    key: tuple[Any, ...]
    count: int
    oldest: Session
    roles: list[str]  # most common first, at most 3
    states: dict[str | None, int]


def _buckets(
    sessions: list[Session], key_of: Callable[[Session], tuple[Any, ...]], detail: int = 10
) -> list[_Bucket]:
    """Group oldest-first ``sessions`` by ``key_of``; biggest group first, ties by key.

    Counting and picking each group's oldest member are C-level (Counter, dict over the
    reversed order); only the ``detail`` biggest groups get their roles and states.
    """
    keys = list(map(key_of, sessions))
    counts = Counter(keys)
    oldest = dict(zip(reversed(keys), reversed(sessions), strict=True))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    detailed = {key for key, _ in ranked[:detail]}
    roles: dict[tuple[Any, ...], Counter[str]] = {key: Counter() for key in detailed}
    states: dict[tuple[Any, ...], dict[str | None, int]] = {key: {} for key in detailed}
    for (key, role), n in Counter(zip(keys, map(_USENAME, sessions), strict=True)).items():
        if key in detailed and role:
            roles[key][role] += n
    for (key, state), n in Counter(zip(keys, map(_STATE, sessions), strict=True)).items():
        if key in detailed:
            states[key][state] = n
    return [
        _Bucket(
            key=key,
            count=count,
            oldest=oldest[key],
            roles=[r for r, _ in sorted(roles[key].items(), key=lambda i: (-i[1], i[0]))[:3]]
            if key in detailed
            else [],
            states=states.get(key, {}),
        )
        for key, count in ranked
    ]


def _state_split(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in counts.items()) or "none"


def _more(total: int, shown: int, what: str) -> list[str]:
    return [f"... and {total - shown} more {what}"] if total > shown else []


def _terminate_fix(
    sessions: Sequence[Session],
    states: Sequence[str],
    age_column: str,
    min_age_s: float,
    what: str,
) -> Fix:
    """The emergency terminate statement: the oldest sessions by identity, the rest by pattern."""
    listed = sessions[: advice.MAX_LISTED]
    text = (
        f"-- terminate {len(listed)} {what}; each row re-checks pid, backend_start, state and "
        "state_change as observed,\n-- so a reused pid or a session that moved on is left alone\n"
        + advice.signal_sql(listed)
    )
    if len(sessions) > len(listed):
        text += (
            f"\n-- {len(sessions) - len(listed)} more match the same pattern; this re-checks "
            "state and age when it runs:\n"
            + advice.pattern_signal_sql(states, age_column, min_age_s)
        )
    return Fix(EMERGENCY_SQL, text, f"terminate the {len(sessions)} {what}")


def _version_at_least(context: _Context, version_num: int) -> bool | None:
    version = context.snapshot.server.version_num
    return None if version is None else version >= version_num


def _roles_of(sessions: Iterable[Session], limit: int = _EVIDENCE_ROWS) -> list[str]:
    counts = Counter(map(_USENAME, sessions))
    counts.pop(None, None)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return [str(role) for role, _ in ranked[:limit]]


def _orm_fixes(
    context: _Context, applications: Sequence[str], purpose: str, share: int | None = None
) -> list[Fix]:
    """ORM pool settings for the main applications of a finding, one fix per stack.

    Pool size per instance = the role's fair share of usable slots (or ``share``) divided by
    the application's distinct client addresses.
    """
    fixes: list[Fix] = []
    seen: set[str] = set()
    unknown: list[str] = []
    for application in applications:
        stack = context.options.stack or advice.guess_stack(application)
        if stack is None:
            unknown.append(application)
            continue
        if stack in seen:
            continue
        seen.add(stack)
        size, reason = _pool_size_for(context, application, share)
        fixes.append(
            Fix(
                ORM,
                f"# {reason}\n" + advice.orm_pool_settings(stack, size, application or None),
                f"{stack} pool settings ({purpose})",
            )
        )
    if unknown and not fixes:
        application = unknown[0]
        size, reason = _pool_size_for(context, application, share)
        fixes.append(
            Fix(
                ORM,
                f"# {reason}\n" + advice.orm_pool_settings_brief(size, application or None),
                f"application pool settings ({purpose}; stack not recognised, --stack picks one)",
            )
        )
    return fixes


def _pool_size_for(context: _Context, application: str, share: int | None) -> tuple[int, str]:
    instances = context.addresses_of(APP, application)
    role = context.main_value(USER, APP, application)
    if share is None:
        info = context.snapshot.roles.get(role) if role else None
        limit = info.connection_limit if info is not None else None
        roles = context.distinct_roles()
        share = fair_share(context.usable, roles, limit)
        basis = (
            f"the fair share of role {_name(role)}: ({context.usable} usable − "
            f"{headroom_slots(context.usable)} headroom) / {roles} role(s)"
            + (
                f", capped by its CONNECTION LIMIT {limit}"
                if limit is not None and limit >= 0
                else ""
            )
            + f" = {share}"
        )
    else:
        basis = f"the {share} connections the application should stay within"
    size = pool_per_instance(share, instances)
    return size, (
        f"pool per instance {size} = {basis} / {instances} client address(es) of "
        f"{_name(application)} (if a host runs several processes, divide again)"
    )


# --- findings ---------------------------------------------------------------------------------


def _slot_arithmetic(context: _Context) -> str:
    facts = context.snapshot.server
    return (
        f"usable slots {context.usable} = max_connections {facts.max_connections} − "
        f"superuser_reserved_connections {facts.superuser_reserved_connections} − "
        f"reserved_connections {facts.reserved_connections}"
    )


def _saturation(context: _Context) -> list[Finding]:
    options = context.options
    if context.pressure == Severity.HEALTHY:
        return []
    full = context.client_count >= context.usable
    free = max(context.usable - context.client_count, 0)
    summary = (
        f"{context.client_count} client backends hold {context.utilization:.0f}% of the "
        f"{context.usable} usable connection slots"
    )
    if full:
        summary += ": new connections from ordinary roles are refused ('too many clients')"
    evidence = [
        _slot_arithmetic(context),
        f"{context.client_count} client backends = {context.utilization:.1f}% of usable slots "
        f"(warning at {options.warning_percent}%, critical at {options.critical_percent}%); "
        f"{free} left for ordinary roles",
        f"by state: {_state_split(context.by_state)}",
    ]
    top = [
        f"{label} {_name(g.key) if label != 'client' else g.key} {g.count}"
        for label, groups in (
            ("user", context.breakdown.by_user),
            ("application", context.breakdown.by_application),
            ("client", context.breakdown.by_client_addr),
        )
        for g in groups[:1]
    ]
    if top:
        evidence.append("largest holders: " + ", ".join(top))
    if context.others:
        evidence.append(
            f"{context.others} other backends (autovacuum, background and parallel workers, WAL "
            "senders, ...) also run but are not counted: since PostgreSQL 12 they draw on "
            "their own pools (autovacuum_max_workers, max_worker_processes, max_wal_senders), "
            "not on max_connections"
        )
    if context.own is not None:
        evidence.append(
            f"includes pgrelief's own session (pid {context.own.pid}); it is never a "
            "terminate candidate"
        )
    assumed = context.snapshot.server.assumed
    if assumed:
        evidence.append(
            "not observed, PostgreSQL defaults assumed: "
            + ", ".join(assumed)
            + " (give --settings-file for exact numbers)"
        )
    fixes = [
        Fix(
            ADVICE,
            "1. Get in through a reserved slot: connect as a superuser "
            f"({context.snapshot.server.superuser_reserved_connections} superuser-reserved "
            "slots)"
            + (
                ", or as a role granted pg_use_reserved_connections (PostgreSQL 16+)"
                if _version_at_least(context, 160000) is not False
                else ""
            )
            + ".\n"
            "2. Free slots with the precise terminate statements of the idle-in-transaction "
            "and leaked-idle findings below (oldest first); cancel long-running queries "
            "before terminating them.\n"
            "3. Prevent the next time: timeouts and per-role limits (durable SQL below), "
            "PgBouncer in front of the applications, right-sized ORM pools.\n"
            "Raising max_connections is not the fix: every backend costs memory, and "
            "hundreds of active backends add lock contention and context switching.",
            "emergency triage",
        ),
        Fix(EMERGENCY_SQL, advice.DIAGNOSTIC_QUERIES, "the three diagnostic queries"),
    ]
    if context.snapshot.server.superuser_reserved_connections < RECOMMENDED_SUPERUSER_RESERVED:
        fixes.append(
            Fix(
                DURABLE_SQL,
                advice.alter_system_set(
                    [("superuser_reserved_connections", str(RECOMMENDED_SUPERUSER_RESERVED))],
                    reload=False,
                )
                + "\n-- takes effect after a restart",
                "keep more emergency slots",
            )
        )
    severity = Severity.CRITICAL if context.pressure == Severity.CRITICAL else Severity.WARNING
    return [Finding(SATURATION, severity, summary, tuple(evidence), (), tuple(fixes))]


def _connection_limits(context: _Context) -> list[Finding]:
    """Roles and databases at (or near) their own CONNECTION LIMIT ('too many connections for')."""
    warning = context.options.warning_percent
    free = max(context.usable - context.client_count, 0)
    user_counts = {g.key: g.count for g in context.breakdown.by_user}
    db_counts = {g.key: g.count for g in context.breakdown.by_database}
    evidence: list[str] = []
    fixes: list[Fix] = []
    severity = Severity.HEALTHY
    at_limit: list[str] = []
    entries: list[tuple[str, str, int, int]] = []
    for role in context.snapshot.roles.values():
        if role.is_superuser or role.connection_limit < 0:
            continue  # PostgreSQL does not enforce a role's limit on superusers
        entries.append(("role", role.name, role.connection_limit, user_counts.get(role.name, 0)))
    for database in context.snapshot.databases.values():
        if not database.allow_connections or database.connection_limit < 0:
            continue
        entries.append(
            ("database", database.name, database.connection_limit, db_counts.get(database.name, 0))
        )
    for kind, name, limit, count in sorted(entries, key=lambda e: (e[0] != "role", e[1])):
        if count == 0:
            continue  # a deliberate limit (often 0) with nobody affected
        if count >= limit:
            severity = Severity.CRITICAL
            at_limit.append(f"{kind} {_name(name)}")
            evidence.append(
                f"{kind} {_name(name)}: {count} client backends, CONNECTION LIMIT {limit}: its "
                f"new connections get 'too many connections for {kind} \"{name}\"'"
            )
        elif count * 100 >= warning * limit:
            severity = max(severity, Severity.WARNING)
            evidence.append(
                f"{kind} {_name(name)}: {count} client backends, {count * 100 // limit}% of its "
                f"CONNECTION LIMIT {limit}"
            )
        else:
            continue
        raise_to = limit + min(free, max(limit // 2, 1))
        statement = (
            advice.alter_role_connection_limit(name, raise_to)
            if kind == "role"
            else advice.alter_database_connection_limit(name, raise_to)
        )
        if free > 0:
            fixes.append(
                Fix(
                    DURABLE_SQL,
                    f"-- only if the limit is simply too low: {free} usable slots are free on "
                    f"the server\n{statement}",
                    f"raise {kind} {name}'s limit",
                )
            )
    if not evidence:
        return []
    fixes.insert(
        0,
        Fix(
            ADVICE,
            "A per-role or per-database limit refuses that role's new connections while the "
            "server still has slots. Free its own idle and idle-in-transaction sessions first "
            "(see those findings), then shrink its application pools; raise the limit only if "
            "its real concurrency needs it.",
            "what to do",
        ),
    )
    if at_limit:
        summary = (
            ", ".join(at_limit[:3])
            + (f" and {len(at_limit) - 3} more" if len(at_limit) > 3 else "")
            + " at its own CONNECTION LIMIT"
        )
    else:
        summary = f"{len(evidence)} role(s)/database(s) near their CONNECTION LIMIT"
    return [Finding(SATURATION, severity, summary, tuple(evidence), (), tuple(fixes))]


def _idle_in_transaction(context: _Context) -> list[Finding]:
    if not context.idle_in_tx:
        return []
    options = context.options
    threshold = options.idle_in_transaction_after_s
    sessions = _oldest_first(context.idle_in_tx, "state_age_s")
    aborted = [s for s in sessions if s.state == STATE_ABORTED]
    open_tx = [s for s in sessions if s.state != STATE_ABORTED]
    summary = (
        f"{len(sessions)} sessions idle in transaction for ≥ {human_age(threshold)} "
        f"({len(aborted)} aborted): they hold slots, locks and back vacuum's xmin horizon"
    )
    evidence: list[str] = []
    for label, part in (("idle in transaction", open_tx), ("aborted (never rolled back)", aborted)):
        if part:
            oldest = part[0]
            xact_ages = [s.xact_age_s for s in part if s.xact_age_s is not None]
            evidence.append(
                f"{label}: {len(part)}, oldest idle {human_age(oldest.state_age_s)}"
                + (f", oldest transaction open {human_age(max(xact_ages))}" if xact_ages else "")
            )
    buckets = _buckets(sessions, _USER_APP)
    for bucket in buckets[:_EVIDENCE_ROWS]:
        role, application = bucket.key
        evidence.append(
            f"user {_name(role)}, application {_name(application)}: {bucket.count} "
            f"({bucket.states.get(STATE_ABORTED, 0)} aborted), oldest idle "
            f"{human_age(bucket.oldest.state_age_s)}, "
            f"last query: {advice.query_sample(bucket.oldest.query)!r}"
        )
    evidence.extend(_more(len(buckets), _EVIDENCE_ROWS, "user/application groups"))

    fixes = [
        _terminate_fix(
            sessions,
            ("idle in transaction", "idle in transaction (aborted)"),
            "state_change",
            threshold,
            "idle-in-transaction sessions",
        )
    ]
    roles = _roles_of(sessions)
    role_timeout = advice.pg_duration_setting(max(threshold, 1.0))
    if roles:
        fixes.append(
            Fix(
                DURABLE_SQL,
                "-- new sessions of these roles are ended after this long idle in a transaction\n"
                + "\n".join(
                    advice.alter_role_set(role, "idle_in_transaction_session_timeout", role_timeout)
                    for role in roles
                ),
                "per-role idle_in_transaction_session_timeout",
            )
        )
    current = context.snapshot.server.setting_seconds("idle_in_transaction_session_timeout")
    server_timeout = max(threshold, 300.0)
    if current is None or current > server_timeout:
        fixes.append(
            Fix(
                DURABLE_SQL,
                (
                    "-- currently disabled (0)\n"
                    if current is None
                    else f"-- currently {human_age(current)}\n"
                )
                + advice.alter_system_set(
                    [
                        (
                            "idle_in_transaction_session_timeout",
                            advice.pg_duration_setting(server_timeout),
                        )
                    ]
                ),
                "server-wide idle_in_transaction_session_timeout (a backstop for every role)",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "In the application: commit or roll back on every path (a `with` block / "
            "try-finally around each transaction); an aborted transaction means an error was "
            "caught without a ROLLBACK. Do not hold a transaction open across network calls "
            "or user think-time.",
            "fix the cause",
        )
    )
    fixes.extend(_orm_fixes(context, _main_applications(sessions), "return connections promptly"))
    return [
        Finding(
            IDLE_IN_TRANSACTION,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(_PID, sessions)),
            tuple(fixes),
        )
    ]


def _main_applications(sessions: Iterable[Session], limit: int = 3) -> list[str]:
    counts: Counter[str] = Counter(map(_APPLICATION, sessions))
    return [app for app, _ in sorted(counts.items(), key=lambda i: (-i[1], i[0]))[:limit]]


def _leaked_idle(context: _Context) -> list[Finding]:
    if not context.leaked:
        return []
    threshold = context.options.idle_after_s
    sessions = _oldest_first(context.leaked, "state_age_s")
    buckets = _buckets(sessions, _APP_ADDR)
    summary = (
        f"{len(sessions)} sessions idle for ≥ {human_age(threshold)} from {len(buckets)} "
        "application/client group(s): the pattern of leaked connections"
    )
    evidence: list[str] = []
    for bucket in buckets[:_EVIDENCE_ROWS]:
        application, address = bucket.key
        users = ", ".join(_name(role) for role in bucket.roles)
        evidence.append(
            f"application {_name(application)} from {_addr(address)}: {bucket.count} idle ≥ "
            f"{human_age(threshold)}, oldest idle {human_age(bucket.oldest.state_age_s)}, "
            f"user(s) {users or '(unknown)'}; last query: "
            f"{advice.query_sample(bucket.oldest.query)!r}"
        )
    evidence.extend(_more(len(buckets), _EVIDENCE_ROWS, "groups"))

    fixes = [_terminate_fix(sessions, ("idle",), "state_change", threshold, "idle sessions")]
    keepalive_settings = [
        ("tcp_keepalives_idle", "60"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "6"),
    ]
    server_lines = advice.alter_system_set(keepalive_settings, reload=False)
    check_interval = _version_at_least(context, 140000)
    if check_interval is not False:
        server_lines += (
            "\n-- PostgreSQL 14+: cancel a running query whose client went away "
            "(checked while a query runs)\n"
            + advice.alter_system_set([("client_connection_check_interval", "30s")], reload=False)
        )
    fixes.append(
        Fix(
            DURABLE_SQL,
            "-- detect dead clients (crashed hosts, dropped NAT entries) in ~2 minutes "
            "instead of the OS default of ~2 hours\n" + server_lines + "\nselect pg_reload_conf();",
            "TCP keepalives",
        )
    )
    roles = _roles_of(sessions)
    if roles and _version_at_least(context, 140000) is not False:
        header = (
            "-- PostgreSQL 14+ (version not observed: check first)\n"
            if _version_at_least(context, 140000) is None
            else ""
        )
        fixes.append(
            Fix(
                DURABLE_SQL,
                header
                + "-- close these roles' sessions idle this long; their pools must reconnect "
                "(pre-ping/recycle, see the ORM settings)\n"
                + "\n".join(
                    advice.alter_role_set(
                        role, "idle_session_timeout", advice.pg_duration_setting(threshold)
                    )
                    for role in roles
                ),
                "per-role idle_session_timeout",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "A connection idle this long was checked out and never returned: look for an "
            "exception path that skips close()/release(). Use try-with-resources (Java), "
            "context managers (Python `with`), ensure blocks (Ruby). Set application_name to "
            "the service name and version so the leaking code shows up here.",
            "fix the leak",
        )
    )
    applications = [str(bucket.key[0]) for bucket in buckets[:3]]
    fixes.extend(_orm_fixes(context, applications, "leak detection and recycling"))
    return [
        Finding(
            LEAKED_IDLE,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(_PID, sessions)),
            tuple(fixes),
        )
    ]


def _long_running(context: _Context) -> list[Finding]:
    if not context.long_running:
        return []
    threshold = context.options.long_running_after_s
    sessions = _oldest_first(context.long_running, "query_age_s")
    summary = (
        f"{len(sessions)} queries active for ≥ {human_age(threshold)}; the longest has run "
        f"{human_age(sessions[0].query_age_s)}"
    )
    evidence = []
    for session in sessions[:_EVIDENCE_ROWS]:
        waiting = (
            f"waiting on {session.wait_event_type}:{session.wait_event}"
            if session.wait_event_type
            else "not waiting"
        )
        evidence.append(
            f"pid {session.pid}, user {_name(session.usename)}, application "
            f"{_name(session.application_name)}: running {human_age(session.query_age_s)}, "
            f"{waiting}; query: {advice.query_sample(session.query)!r}"
        )
    evidence.extend(_more(len(sessions), _EVIDENCE_ROWS, "queries"))
    listed = sessions[: advice.MAX_LISTED]
    fixes = [
        Fix(
            EMERGENCY_SQL,
            "-- cancel first: the query stops, the session and its slot stay; each row "
            "re-checks pid, backend_start, state and query_start\n"
            + advice.signal_sql(listed, cancel=True),
            f"cancel the {len(listed)} oldest queries",
        ),
        Fix(
            EMERGENCY_SQL,
            "-- still running a few seconds later? terminate the same sessions\n"
            + advice.signal_sql(listed),
            "then terminate what did not stop",
        ),
    ]
    roles = _roles_of(sessions)
    if roles:
        fixes.append(
            Fix(
                DURABLE_SQL,
                "-- applies to the roles' new sessions; reporting roles may need longer\n"
                + "\n".join(
                    advice.alter_role_set(
                        role, "statement_timeout", advice.pg_duration_setting(threshold)
                    )
                    for role in roles
                ),
                "per-role statement_timeout",
            )
        )
    return [
        Finding(
            LONG_RUNNING,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(_PID, sessions)),
            tuple(fixes),
        )
    ]


def _traffic_spike(context: _Context) -> list[Finding]:
    active = context.active
    threshold = max(TRAFFIC_SPIKE_MIN, math.ceil(context.usable * TRAFFIC_SPIKE_SHARE))
    if len(active) < threshold:
        return []
    sessions = _oldest_first(active, "query_age_s")
    wait_pairs = Counter(map(_WAIT, active))
    waits = Counter(
        {f"{kind}:{event}": n for (kind, event), n in wait_pairs.items() if kind is not None}
    )
    lock_waiters = sum(n for (kind, _event), n in wait_pairs.items() if kind == "Lock")
    waiting = sum(waits.values())
    share = len(active) * 100 / context.usable if context.usable else 100.0
    critical = share >= context.options.critical_percent
    summary = (
        f"{len(active)} sessions active at once ({share:.0f}% of usable slots), {waiting} of "
        f"them waiting ({lock_waiters} on locks): a traffic spike or a pile-up"
    )
    evidence = [
        f"{len(active)} active ≥ threshold {threshold} = max({TRAFFIC_SPIKE_MIN}, "
        f"{int(TRAFFIC_SPIKE_SHARE * 100)}% of {context.usable} usable slots)",
        f"waiting: {waiting} (lock waiters, wait_event_type 'Lock': {lock_waiters})"
        + (
            "; top wait events: " + ", ".join(f"{event} ×{n}" for event, n in waits.most_common(3))
            if waits
            else ""
        ),
    ]
    by_role = Counter(s.usename for s in active)
    by_app = Counter(s.application_name for s in active)
    evidence.append(
        "active by user: "
        + ", ".join(f"{_name(k)} {n}" for k, n in by_role.most_common(3))
        + "; by application: "
        + ", ".join(f"{_name(k)} {n}" for k, n in by_app.most_common(3))
    )
    fixes: list[Fix] = []
    if lock_waiters:
        fixes.append(Fix(EMERGENCY_SQL, advice.LOCK_WAITERS_QUERY, "find the blocking sessions"))
    fixes.append(_pgbouncer_fix(context, "queue the spike in PgBouncer instead of in PostgreSQL"))
    top_role = by_role.most_common(1)[0][0]
    if top_role and not _is_superuser(context, top_role):
        limit = fair_share(context.usable, context.distinct_roles())
        fixes.append(
            Fix(
                DURABLE_SQL,
                f"-- cap the busiest role at its fair share: ({context.usable} usable − "
                f"{headroom_slots(context.usable)} headroom) / {context.distinct_roles()} role(s)\n"
                + advice.alter_role_connection_limit(top_role, limit),
                "per-role connection limit",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "Do not raise max_connections for a spike: more active backends than CPU cores "
            "only add lock contention and context switching. Let PgBouncer (transaction mode) "
            "queue the excess, and look at what the active sessions wait on.",
            "don't raise max_connections",
        )
    )
    return [
        Finding(
            TRAFFIC_SPIKE,
            Severity.CRITICAL if critical else Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(_PID, sessions)),
            tuple(fixes),
        )
    ]


def _is_superuser(context: _Context, role: str) -> bool:
    info = context.snapshot.roles.get(role)
    return bool(info and info.is_superuser)


def _monopoly(context: _Context) -> list[Finding]:
    total = context.candidates_total
    minimum = max(MONOPOLY_MIN, math.ceil(context.usable * MONOPOLY_MIN_SLOTS_SHARE))
    findings: list[Finding] = []
    user_counts = context.counts_excluding_own(USER)
    covered_apps: set[str] = set()
    if len(user_counts) >= 2:
        for role, count in sorted(user_counts.items(), key=lambda i: (-i[1], str(i[0]))):
            if role is None or count < total * MONOPOLY_SHARE or count < minimum:
                continue
            findings.append(_role_monopoly(context, role, count, total, minimum))
            main_app = context.main_value(APP, USER, role)
            if main_app is not None:
                covered_apps.add(main_app)
    app_counts = context.counts_excluding_own(APP)
    if len(app_counts) >= 2:
        for application, count in sorted(app_counts.items(), key=lambda i: (-i[1], str(i[0]))):
            if (
                not application
                or application in covered_apps
                or count < total * MONOPOLY_SHARE
                or count < minimum
            ):
                continue
            findings.append(_application_monopoly(context, application, count, total, minimum))
    return findings


def _role_monopoly(context: _Context, role: str, count: int, total: int, minimum: int) -> Finding:
    sessions = _oldest_first(context.sessions_where(USER, role), "backend_age_s")
    states = _state_counts(sessions)
    active = states.get(ACTIVE, 0) + states.get(FASTPATH, 0)
    room = context.usable - headroom_slots(context.usable)
    half = max(1, room // 2)
    limit = min(max(half, math.ceil(active * 1.2)), max(room, 1))
    info = context.snapshot.roles.get(role)
    summary = (
        f"role {_name(role)} holds {count} of {total} client backends "
        f"({count * 100 // max(total, 1)}%)"
    )
    evidence = [
        f"{count} ≥ {int(MONOPOLY_SHARE * 100)}% of {total} client backends and ≥ {minimum} "
        f"= max({MONOPOLY_MIN}, {int(MONOPOLY_MIN_SLOTS_SHARE * 100)}% of {context.usable} "
        "usable slots)",
        f"its sessions by state: {_state_split(states)}",
        f"from {context.addresses_of(USER, role)} client address(es); main application "
        f"{_name(context.main_value(APP, USER, role))}",
    ]
    fixes: list[Fix] = []
    if info is not None and info.is_superuser:
        evidence.append("it is a superuser: PostgreSQL does not apply CONNECTION LIMIT to it")
        fixes.append(
            Fix(
                ADVICE,
                "Applications should not connect as a superuser: give this one its own "
                "ordinary role, then limit that role.",
                "use an ordinary role",
            )
        )
    elif info is not None and 0 <= info.connection_limit <= limit:
        evidence.append(f"it already has CONNECTION LIMIT {info.connection_limit}")
    else:
        fixes.append(
            Fix(
                DURABLE_SQL,
                f"-- n = max(half of ({context.usable} usable − {headroom_slots(context.usable)} "
                f"headroom) = {half}, its {active} active sessions × 1.2): the other roles "
                "keep the rest;\n-- existing sessions stay, new ones beyond n get 'too many "
                "connections for role'\n" + advice.alter_role_connection_limit(role, limit),
                f"limit role {role} to {limit} connections",
            )
        )
    fixes.extend(
        _orm_fixes(
            context,
            _main_applications(sessions),
            f"stay within the role's {limit} connections",
            share=limit,
        )
    )
    return Finding(
        ROLE_MONOPOLY,
        Severity.WARNING,
        summary,
        tuple(evidence),
        tuple(map(_PID, sessions)),
        tuple(fixes),
    )


def _application_monopoly(
    context: _Context, application: str, count: int, total: int, minimum: int
) -> Finding:
    sessions = _oldest_first(context.sessions_where(APP, application), "backend_age_s")
    room = context.usable - headroom_slots(context.usable)
    share = max(1, room // 2)
    roles = _roles_of(sessions, 3)
    summary = (
        f"application {_name(application)} holds {count} of {total} client backends "
        f"({count * 100 // max(total, 1)}%)"
    )
    evidence = [
        f"{count} ≥ {int(MONOPOLY_SHARE * 100)}% of {total} client backends and ≥ {minimum} "
        f"= max({MONOPOLY_MIN}, {int(MONOPOLY_MIN_SLOTS_SHARE * 100)}% of {context.usable} "
        "usable slots)",
        f"its sessions by state: {_state_split(_state_counts(sessions))}",
        f"from {context.addresses_of(APP, application)} client address(es) as user(s) "
        + ", ".join(_name(r) for r in roles),
    ]
    fixes = [
        Fix(
            ADVICE,
            "PostgreSQL cannot limit an application_name: size its pools (below) so all its "
            f"instances stay within {share} connections (half of the {room} slots left after "
            "headroom), and give it its own role if it shares one, so CONNECTION LIMIT can "
            "hold it.",
            "cap the application",
        ),
        *_orm_fixes(context, [application], f"stay within {share} connections", share=share),
    ]
    return Finding(
        ROLE_MONOPOLY,
        Severity.WARNING,
        summary,
        tuple(evidence),
        tuple(map(_PID, sessions)),
        tuple(fixes),
    )


def _state_counts(sessions: Iterable[Session]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state, n in Counter(map(_STATE, sessions)).items():
        counts[state or NO_STATE] = n
    return _ordered(counts)


def _no_pooler(context: _Context) -> list[Finding]:
    total = context.candidates_total
    threshold = max(
        NO_POOLER_FLOOR, min(NO_POOLER_MIN, math.ceil(context.usable * NO_POOLER_SLOTS_SHARE))
    )
    active = len(context.active)
    if total < threshold or active >= total * NO_POOLER_ACTIVE_RATIO:
        return []
    app_counts = context.counts_excluding_own(APP)
    pooled = sum(
        n for app, n in app_counts.items() if app and any(p in app.lower() for p in _POOLER_NAMES)
    )
    if pooled * 2 >= total:
        return []  # a pooler is already in front; its own pool sizing is another question
    idle = sum(n for state, n in context.by_state.items() if state not in (ACTIVE, FASTPATH))
    summary = (
        f"{total} client connections but only {active} active ({active * 100 // total}%): "
        "idle connections a pooler (PgBouncer) would share"
    )
    addresses = len(context.distinct(ADDR))
    evidence = [
        f"{total} client backends ≥ {threshold} and active ratio {active}/{total} < "
        f"{int(NO_POOLER_ACTIVE_RATIO * 100)}%",
        f"by state: {_state_split(context.by_state)} ({idle} not running a query)",
        f"from {addresses} client address(es) and {len(app_counts)} application name(s)",
    ]
    fix = _pgbouncer_fix(context, "put PgBouncer in front of the applications")
    evidence.extend(_session_feature_lines(context))
    severity = Severity.WARNING if context.pressure >= Severity.WARNING else Severity.HEALTHY
    return [
        Finding(
            NO_POOLER,
            severity,
            summary,
            tuple(evidence),
            (),
            (
                fix,
                Fix(
                    ADVICE,
                    "Point the applications at PgBouncer (port 6432) and keep admins, "
                    "migrations and pgrelief on direct connections. In transaction mode use SET "
                    "LOCAL instead of SET, and PgBouncer 1.21+ max_prepared_statements for "
                    "protocol-level prepared statements; applications listed as needing "
                    "session features use the *_session entry or connect directly.",
                    "switch the applications over",
                ),
            ),
        )
    ]


def _session_features(context: _Context) -> dict[str, dict[str, list[Session]]]:
    """Applications whose sessions' last statements show session-level features."""
    key = "session_features"
    if key in context._cache:
        cached: dict[str, dict[str, list[Session]]] = context._cache[key]
        return cached
    found: dict[str, dict[str, list[Session]]] = {}
    seen: dict[str, str | None] = {}  # many sessions run the same statement text
    feature_of = advice.session_feature
    own = context.own
    for session in context.clients:
        query = session.query
        if query in seen:
            feature = seen[query]
        else:
            feature = seen[query] = feature_of(query)
        if feature is not None and session is not own:
            found.setdefault(session.application_name, {}).setdefault(feature, []).append(session)
    context._cache[key] = found
    return found


def _session_feature_lines(context: _Context) -> list[str]:
    features = _session_features(context)
    lines = []
    for application, by_feature in sorted(features.items()):
        parts = ", ".join(
            f"{feature} ({len(s)} sessions)" for feature, s in sorted(by_feature.items())
        )
        lines.append(
            f"application {_name(application)} needs session mode or a direct connection: "
            f"last statements show {parts}"
        )
    return lines


def _pgbouncer_fix(context: _Context, title: str) -> Fix:
    """A pgbouncer.ini sized from usable slots, pool mode chosen from the session features seen."""
    features = _session_features(context)
    session_apps = set(features)
    applications = context.distinct(APP)
    all_session = bool(applications) and applications <= session_apps
    pool_mode = "session" if all_session else "transaction"
    pools = {
        (database, user)
        for database, user, application in context.triples()
        if application not in session_apps
    }
    databases = sorted({d or "" for d in context.distinct(DB)} - {""}) or ["mydb"]
    session_pools: dict[str, int] = {}
    if not all_session:
        for by_feature in features.values():
            for members in by_feature.values():
                for session in members:
                    if session.datname:
                        session_pools[session.datname] = session_pools.get(session.datname, 0) + 1
    session_slots = sum(session_pools.values())
    sizes = pgbouncer_pool_sizes(
        context.usable,
        1,
        pools=max(len(pools), 1),
        databases=len(databases),
        client_connections=context.candidates_total,
        direct_slots=headroom_slots(context.usable) + session_slots,
    )
    notes = list(sizes.reasoning)
    if all_session:
        notes.append(
            "session mode: every application's last statements show session features "
            "(LISTEN, advisory locks, PREPARE, SET, temp tables); move them to transaction-safe "
            "code to multiplex"
        )
    elif session_apps:
        names = ", ".join(_name(app) for app in sorted(session_apps))
        notes.append(
            f"transaction mode for everyone else; {names} use session features: connect them "
            "to the <db>_session entries below or directly to PostgreSQL"
        )
    else:
        notes.append(
            "transaction mode: no LISTEN, session advisory lock, PREPARE or session SET seen in "
            "the last statements (pg_stat_activity shows only the last one: check the code too)"
        )
    text = advice.pgbouncer_ini(
        pool_mode=pool_mode,
        default_pool_size=sizes.default_pool_size,
        reserve_pool_size=sizes.reserve_pool_size,
        max_client_conn=sizes.max_client_conn,
        max_db_connections=sizes.max_db_connections,
        databases=databases,
        session_pools={db: n + max(1, n // 5) for db, n in sorted(session_pools.items())},
        notes=notes,
    )
    return Fix(PGBOUNCER, text, title)


def _memory_overcommit(context: _Context) -> list[Finding]:
    memory = context.options.memory_bytes
    if memory is None:
        return []
    facts = context.snapshot.server
    assumed: list[str] = []

    def setting(name: str, default: int) -> int:
        value = facts.setting_bytes(name)
        if value is None:
            assumed.append(name)
            return default
        return value

    workers = facts.setting_int("autovacuum_max_workers")
    if workers is None:
        assumed.append("autovacuum_max_workers")
        workers = DEFAULT_AUTOVACUUM_MAX_WORKERS
    maintenance = setting("maintenance_work_mem", DEFAULT_MAINTENANCE_WORK_MEM)
    autovacuum_mem = facts.setting_bytes("autovacuum_work_mem")
    model = MemoryModel(
        shared_buffers=setting("shared_buffers", DEFAULT_SHARED_BUFFERS),
        work_mem=setting("work_mem", DEFAULT_WORK_MEM),
        temp_buffers=setting("temp_buffers", DEFAULT_TEMP_BUFFERS),
        maintenance_work_mem=autovacuum_mem if autovacuum_mem else maintenance,
        autovacuum_max_workers=workers,
    )
    max_connections = facts.max_connections
    worst = model.worst_case(max_connections)
    reserve = os_reserve(memory)
    safe = model.connections_within(memory - reserve)
    over = max_connections > safe
    if worst > memory:
        summary = (
            f"max_connections {max_connections} can use up to {format_size(worst)} in the worst "
            f"case: more than the {format_size(memory)} of RAM"
        )
    elif over:
        summary = (
            f"max_connections {max_connections} can use up to {format_size(worst)}: it leaves "
            f"less than the {format_size(reserve)} the OS and page cache need"
        )
    else:
        summary = (
            f"max_connections {max_connections} fits in {format_size(memory)}: worst case "
            f"{format_size(worst)}, up to {safe} connections would fit"
        )
    evidence = [
        "worst case = " + model.formula(max_connections),
        f"RAM {format_size(memory)} − OS/page-cache reserve {format_size(reserve)} leaves "
        f"room for ({format_size(memory - reserve)} − {format_size(model.fixed)}) / "
        f"{format_size(model.per_connection)} = {safe} connections",
        f"per-backend base {format_size(model.per_backend)} is an estimate (catalog caches, "
        "session state); a complex query can use several work_mem allocations",
    ]
    if assumed:
        evidence.append("not observed, PostgreSQL defaults assumed: " + ", ".join(assumed))
    fixes: list[Fix] = []
    minimum = facts.superuser_reserved_connections + facts.reserved_connections + MEMORY_MIN_USABLE
    if over and safe >= minimum:
        target = min(safe, RECOMMENDED_MAX_CONNECTIONS)
        note = (
            f"-- {context.client_count} client backends are connected now: put PgBouncer in front "
            "before lowering below that\n"
            if context.client_count > target
            else ""
        )
        fixes.append(
            Fix(
                DURABLE_SQL,
                note
                + advice.alter_system_set([("max_connections", str(target))], reload=False)
                + "\n-- takes effect after a restart",
                f"safe max_connections = {target}",
            )
        )
    if over and (safe < minimum or model.work_mem > DEFAULT_WORK_MEM):
        # A large work_mem is often the real overcommit: keeping max_connections and lowering
        # work_mem is the other way to fit.
        fixes.append(_work_mem_fix(model, memory - reserve, max_connections))
    if over:
        fixes.append(
            Fix(
                ADVICE,
                "Keep max_connections where memory is safe and let PgBouncer carry the "
                "application's connection count (transaction mode multiplexes thousands of "
                "clients onto a few dozen backends). `pgrelief size --ram "
                f"{format_size(memory)}` shows the full sizing.",
                "size with a pooler",
            )
        )
    return [
        Finding(
            MEMORY_OVERCOMMIT,
            Severity.WARNING if over else Severity.HEALTHY,
            summary,
            tuple(evidence),
            (),
            tuple(fixes),
        )
    ]


def _work_mem_fix(model: MemoryModel, budget: int, max_connections: int) -> Fix:
    """When memory cannot hold a useful max_connections, the per-connection cost must shrink."""
    per_connection = (budget - model.fixed) // max(max_connections, 1)
    fitting = (per_connection - model.per_backend - model.temp_buffers) // 2
    if fitting >= MB:
        value = fitting // MB
        return Fix(
            DURABLE_SQL,
            f"-- work_mem {format_size(model.work_mem)} × 2 per connection is what does not fit: "
            f"at {value}MB the {max_connections} connections fit in "
            f"{format_size(budget)}\n"
            + advice.alter_system_set([("work_mem", f"{value}MB")])
            + "\n-- for the few queries that need more: alter role <reporting role> set work_mem",
            f"lower work_mem to {value}MB",
        )
    lean = replace(model, work_mem=MB).connections_within(budget)
    return Fix(
        ADVICE,
        f"Even with work_mem at 1MB, {format_size(budget)} (RAM minus the OS reserve) holds only "
        f"{lean} connections next to shared_buffers {format_size(model.shared_buffers)} and "
        "autovacuum: "
        + (
            f"lower max_connections to {lean} and put PgBouncer in front, or add memory."
            if lean >= MEMORY_MIN_USABLE
            else "lower shared_buffers or add memory, and put PgBouncer in front."
        ),
        "memory is too small for this configuration",
    )


def _reserved_access(context: _Context) -> list[Finding]:
    facts = context.snapshot.server
    reserved = facts.superuser_reserved_connections + facts.reserved_connections
    if reserved > 0 and context.pressure == Severity.HEALTHY:
        return []
    if reserved > 0 and facts.superuser_reserved_connections >= RECOMMENDED_SUPERUSER_RESERVED:
        return []
    own = context.own
    role = own.usename if own is not None else None
    if role is not None and (
        (own is not None and own.is_superuser) or _is_superuser(context, role)
    ):
        role = None  # a superuser already has the superuser-reserved slots
    fixes = [_reserved_slots_fix(role, facts.version_num)]
    if reserved == 0:
        summary = "no reserved connection slots: when the server fills up, nobody can get in"
        severity = Severity.WARNING
    else:
        summary = (
            f"only {facts.superuser_reserved_connections} superuser-reserved slot(s) for "
            "emergency access while the server is under pressure"
        )
        severity = Severity.HEALTHY
    evidence = [
        f"superuser_reserved_connections = {facts.superuser_reserved_connections}, "
        f"reserved_connections = {facts.reserved_connections} (PostgreSQL 16+)",
    ]
    return [Finding(RESERVED_ACCESS, severity, summary, tuple(evidence), (), tuple(fixes))]


def _reserved_slots_fix(role: str | None, version_num: int | None) -> Fix:
    target = advice.quote_ident(role) if role else "monitoring_role"
    lines = [
        advice.alter_system_set(
            [("superuser_reserved_connections", str(RECOMMENDED_SUPERUSER_RESERVED))],
            reload=False,
        )
    ]
    if version_num is None or version_num >= 160000:
        lines.append(
            "-- PostgreSQL 16+: slots for a non-superuser monitoring/operator role"
            + ("" if role else " (replace monitoring_role with the role pgrelief connects as)")
        )
        lines.append(advice.alter_system_set([("reserved_connections", "3")], reload=False))
        lines.append(f"grant pg_use_reserved_connections to {target};")
    lines.append("-- the reserved-slot settings take effect after a restart")
    return Fix(DURABLE_SQL, "\n".join(lines), "emergency access for next time")


# --- the server refused us ----------------------------------------------------------------------


def _quoted_name(message: str, after: str) -> str | None:
    """The name PostgreSQL quotes after ``after`` in its message, if any.

    PostgreSQL prints the name raw between double quotes (no escaping), so the name runs to
    the last double quote on the line.
    """
    match = re.search(re.escape(after) + r' "(.*)"', message, re.IGNORECASE)
    return match.group(1) if match else None


def diagnose_refusal(message: str) -> Diagnosis:
    """A critical diagnosis for when the server refuses our connection for lack of slots.

    There is nothing to count (server=None, zero totals): the finding carries the server's own
    message and the emergency procedure to get in through a reserved slot and free slots.
    """
    lowered = message.lower()
    evidence = [f"server said: {message.strip()}"]
    targeted: list[Fix] = []
    if _REFUSAL_RESERVED in lowered:
        summary = "only reserved connection slots are left: every slot for ordinary roles is taken"
        evidence.append(
            "the remaining slots are kept for superusers (superuser_reserved_connections) or, "
            "on PostgreSQL 16+, roles granted pg_use_reserved_connections (reserved_connections)"
        )
    elif _REFUSAL_ROLE in lowered:
        summary = "the role is at its own CONNECTION LIMIT: its new connections are refused"
        evidence.append(
            "the server may still have free slots: only this role's limit is exhausted "
            "(pg_roles.rolconnlimit); connect as another role to look"
        )
        role = _quoted_name(message, _REFUSAL_ROLE)
        if role is not None:
            targeted.append(
                Fix(
                    EMERGENCY_SQL,
                    "-- the role's own sessions idle for over 10 minutes\n"
                    + advice.pattern_signal_sql(
                        ("idle",), "state_change", 600, filters={"usename": role}
                    ),
                    f"free slots of role {role}",
                )
            )
    elif _REFUSAL_DATABASE in lowered:
        summary = "the database is at its own CONNECTION LIMIT: new connections are refused"
        evidence.append(
            "only this database's limit (pg_database.datconnlimit) is exhausted; connect to "
            "another database (e.g. postgres) to look"
        )
    elif _REFUSAL_CLIENTS in lowered:
        summary = "the server is full: 'sorry, too many clients already'"
        evidence.append("every connection slot is taken, reserved ones included for this role")
    else:
        summary = "the server refused the connection for lack of slots"
    fixes = (
        Fix(
            ADVICE,
            "Connect through a reserved slot: as a superuser (PostgreSQL keeps "
            "superuser_reserved_connections slots, default 3, for this), or on PostgreSQL 16+ "
            "as a role granted pg_use_reserved_connections. For example:\n"
            "  psql 'host=<server> dbname=postgres user=postgres'\n"
            "  pgrelief diagnose --dsn 'host=<server> dbname=postgres user=postgres'\n"
            "The diagnosis from inside lists the exact sessions to terminate.",
            "get in through a reserved slot",
        ),
        Fix(EMERGENCY_SQL, advice.DIAGNOSTIC_QUERIES, "the three diagnostic queries"),
        Fix(
            EMERGENCY_SQL,
            "-- idle in transaction for over 5 minutes: abandoned transactions\n"
            + advice.pattern_signal_sql(
                ("idle in transaction", "idle in transaction (aborted)"), "state_change", 300
            )
            + "\n-- idle for over 30 minutes: likely leaked connections\n"
            + advice.pattern_signal_sql(("idle",), "state_change", 1800),
            "free slots (each statement re-checks state and age when it runs)",
        ),
        *targeted,
        _reserved_slots_fix(None, None),
    )
    finding = Finding(SATURATION, Severity.CRITICAL, summary, tuple(evidence), (), fixes)
    return Diagnosis(
        status=Severity.CRITICAL,
        pressure=Severity.CRITICAL,
        server=None,
        totals=Totals(client_backends=0, utilization_percent=0.0, by_state={}),
        breakdown=Breakdown(),
        findings=(finding,),
        source="live",
        taken_at=None,
    )
