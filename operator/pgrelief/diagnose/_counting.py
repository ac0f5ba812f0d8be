"""The counting engine: one pass over the sessions, then everything works on aggregates.

Private to the package because its shape serves speed, not readers: client sessions are
taken apart into columns once (C-level attrgetter maps) and counted as Counters over zipped
columns or, when (user, application, address, database, state) combinations are few, by
folding those. The finding builders only see the ``Context`` it hands them: totals,
breakdowns, candidate lists and cached projections.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, eq, is_not, itemgetter, not_
from typing import Any, cast

from pgrelief.diagnose.options import DiagnoseOptions
from pgrelief.diagnosis import Breakdown, Group, Severity
from pgrelief.protection import Spared, spared_by_default
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

LOCAL_SOCKET = "local socket"  # what a NULL client_addr (a Unix socket) shows as

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
STATE_OF = attrgetter("state")
_WAIT_TYPE = attrgetter("wait_event_type")
_STATE_AGE = attrgetter("state_age_s")
_QUERY_AGE = attrgetter("query_age_s")
_SAMPLE = 2000  # sessions sampled to decide whether combinations are few


@dataclass(frozen=True, slots=True)
class Context:
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
    idle_in_tx: list[Session]  # past the threshold and not protected (as `run` protects)
    leaked: list[Session]
    long_running: list[Session]
    active: list[Session]
    lock_waiters: list[Session]  # active, waiting on a heavyweight lock
    idle: list[Session]  # every idle client backend, whatever its age
    # Sessions past a threshold that `run` would never terminate, and why (superusers,
    # LISTEN sessions): named in the findings, never in their statements.
    spared: list[tuple[Session, Spared]]
    # Some candidates' superuser status is unknown (offline input): the statements then ask
    # the server to skip superusers when they run.
    unknown_superusers: bool
    # Answers several builders ask (projections, session features): computed once.
    cache: dict[object, Any] = field(default_factory=dict)

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
        if cache_key not in self.cache:
            if self.combos is not None:
                project = itemgetter(*indices)
                counts: Counter[Any] = Counter()
                for key, count in self.combos.items():
                    counts[project(key)] += count
            elif len(indices) == 1:
                counts = Counter(self._column(indices[0]))
            else:
                counts = Counter(zip(*(self._column(i) for i in indices), strict=True))
            self.cache[cache_key] = counts
        found: Counter[Any] = self.cache[cache_key]
        return found

    def _column(self, index: int) -> list[str | None]:
        return self.states if index == STATE else self.columns[index]

    def _beside(self, where: int, value: str | None, index: int) -> Counter[str | None]:
        """Counts of column ``index`` among the sessions whose column ``where`` is ``value``.

        Findings ask this of many values (each application's role and addresses): the pair
        projection is split by ``where`` once, then every answer is a lookup. Read-only.
        """
        cache_key = ("beside", where, index)
        table: dict[str | None, Counter[str | None]] | None = self.cache.get(cache_key)
        if table is None:
            table = {}
            for (outer, inner), count in self.projection(where, index).items():
                found = table.get(outer)
                if found is None:
                    found = table[outer] = Counter()
                found[inner] += count
            self.cache[cache_key] = table
        return table.get(value) or Counter()

    def pair_count(self, where: int, value: str | None, index: int, other: str | None) -> int:
        """Client backends whose column ``where`` is ``value`` and column ``index`` ``other``."""
        return self._beside(where, value, index).get(other, 0)

    def counts_excluding_own(self, index: int) -> Counter[str | None]:
        """Client backends by one column, pgrelief's own session left out (cached: read-only)."""
        cache_key = ("excluding_own", index)
        if cache_key not in self.cache:
            counts: Counter[str | None] = Counter(self.projection(index))
            if self.own is not None:
                own_value = _COLUMN_GETTERS[index](self.own)
                counts[own_value] -= 1
                if counts[own_value] <= 0:
                    del counts[own_value]
            self.cache[cache_key] = counts
        found: Counter[str | None] = self.cache[cache_key]
        return found

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


def count(snapshot: Snapshot, options: DiagnoseOptions) -> Context:
    """The one pass over the sessions: columns, candidates, totals, breakdowns and pressure."""
    usable = snapshot.server.usable_slots
    own_pid = snapshot.own_pid

    # List comprehensions reading slots attributes are the fastest pass on CPython 3.11+
    # (specialised attribute loads): about twice map(attrgetter) over 100k sessions.
    clients = [s for s in snapshot.sessions if s.backend_type == CLIENT_BACKEND]
    others = len(snapshot.sessions) - len(clients)
    own = next((s for s in clients if s.pid == own_pid), None) if own_pid is not None else None
    applications: list[str | None] = [s.application_name for s in clients]
    columns: tuple[list[str | None], ...] = (
        [s.usename for s in clients],
        applications,
        [s.client_addr for s in clients],
        [s.datname for s in clients],
    )
    states = [s.state for s in clients]
    ages = [s.state_age_s for s in clients]
    combos = _combinations(columns, states)

    # Candidates: selection by state, then the age test on that subset only.
    # Ages unknown (None) are never judged: there is no evidence for them.
    def in_state(*wanted: str) -> list[Session]:
        if len(wanted) == 1:
            [state] = wanted
            return [s for s in clients if s.state == state]
        return [s for s in clients if s.state in wanted]

    def aged(
        sessions: list[Session], getter: Callable[[Session], float | None], at_least: float
    ) -> list[Session]:
        return [
            s
            for s in sessions
            if (age := getter(s)) is not None and age >= at_least and s is not own
        ]

    spared: list[tuple[Session, Spared]] = []
    unknown: list[bool] = []

    def unprotected(sessions: list[Session]) -> list[Session]:
        """The sessions `run` could terminate by default (pgrelief.protection decides)."""
        verdicts, kept_unknown = spared_by_default(sessions, snapshot)
        if kept_unknown:
            unknown.append(True)
        if not any(verdicts):
            return sessions
        pairs = cast(Iterable[tuple[Session, Spared]], zip(sessions, verdicts, strict=True))
        spared.extend(compress(pairs, verdicts))  # only the pairs with a reason
        return list(compress(sessions, map(not_, verdicts)))

    idle = in_state(IDLE)
    leaked = unprotected(aged(idle, _STATE_AGE, options.idle_after_s))
    idle_in_tx = unprotected(
        aged(
            in_state(STATE_IDLE_IN_TRANSACTION, STATE_ABORTED),
            _STATE_AGE,
            options.idle_in_transaction_after_s,
        )
    )
    active = [s for s in clients if s.state in (ACTIVE, FASTPATH) and s is not own]
    long_running = unprotected(aged(active, _QUERY_AGE, options.long_running_after_s))
    lock_waiters = list(compress(active, map(partial(eq, "Lock"), map(_WAIT_TYPE, active))))

    by_state, breakdown = _fold(columns, states, combos, ages)
    # No slot at all for ordinary roles is as full as it gets.
    utilization = len(clients) * 100.0 / usable if usable > 0 else 100.0
    pressure = _pressure(utilization, len(clients), usable, options)
    return Context(
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
        lock_waiters=lock_waiters,
        idle=idle,
        spared=spared,
        unknown_superusers=bool(unknown),
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
                Group(name, g.count, ordered(g.by_state), g.oldest)
                for name, g in sorted(tables.items(), key=lambda item: (-item[1].count, item[0]))
            )
        )
    return ordered(totals), Breakdown(
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


def ordered(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
