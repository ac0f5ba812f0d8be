"""The lock pile-up finding: name the session holding the lock, not the sessions waiting for it.

A transaction left idle after an UPDATE or an ALTER keeps its locks; every session that
needs them waits, active, holding a slot, until the server is full. Cancelling the waiters
frees nothing for long (the application retries) and punishes the victims. The snapshot
carries ``pg_blocking_pids()`` of each lock waiter; this module follows those edges to the
root holders (sessions that wait on nobody) and gives the statement that ends them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import (
    EVIDENCE_ROWS,
    more,
    name_of,
    role_timeouts,
    since,
)
from pgrelief.diagnose.options import DEFAULT_OPTIONS
from pgrelief.diagnosis import ADVICE, EMERGENCY_SQL, LOCK_BLOCKER, Finding, Fix, Severity
from pgrelief.durations import human_age
from pgrelief.protection import spared_by_default
from pgrelief.snapshot import (
    ACTIVE,
    FASTPATH,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    Session,
)

LOCK_WAIT_MIN_S = 1.0  # shorter waits are ordinary traffic, not a pile-up
_PREPARED = (
    "pid 0 is not a session: a prepared transaction holds the lock (look in pg_prepared_xacts, "
    "then COMMIT PREPARED or ROLLBACK PREPARED it)"
)


@dataclass(frozen=True, slots=True)
class Blocking:
    """Who blocks whom: each root holder's pid with the waiters it holds up."""

    waiters_of: dict[int, list[Session]] = field(default_factory=dict)
    holder: dict[int, Session | None] = field(default_factory=dict)  # None: not a session seen
    victims: frozenset[int] = frozenset()  # waiters whose blocker is known


def blocking(context: Context) -> Blocking:
    """The root holders of the locks the snapshot's lock waiters wait for (cached)."""
    key = "blocking"
    if key in context.cache:
        cached: Blocking = context.cache[key]
        return cached
    waiters = [
        w
        for w in context.lock_waiters
        if w.blocked_by and (w.state_age_s is None or w.state_age_s >= LOCK_WAIT_MIN_S)
    ]
    found = Blocking()
    if waiters:
        by_pid = {s.pid: s for s in context.snapshot.sessions}
        for waiter in waiters:
            for root in _roots(waiter, by_pid):
                found.waiters_of.setdefault(root, []).append(waiter)
                found.holder[root] = by_pid.get(root)
        found = Blocking(
            found.waiters_of,
            found.holder,
            frozenset(w.pid for members in found.waiters_of.values() for w in members),
        )
    context.cache[key] = found
    return found


def _roots(waiter: Session, by_pid: dict[int, Session]) -> set[int]:
    """The holders at the end of the waiter's blocking chains (sessions waiting on nobody).

    pg_blocking_pids also names sessions queued ahead for a conflicting lock (an ALTER TABLE
    waiting behind an idle transaction blocks every SELECT after it): those are followed to
    what they wait for. Pid 0 is a prepared transaction.
    """
    roots: set[int] = set()
    seen = {waiter.pid}
    todo = list(waiter.blocked_by or ())
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        session = by_pid.get(pid)
        if session is not None and session.blocked_by:
            todo.extend(session.blocked_by)
        else:
            roots.add(pid)
    return roots


def lock_blockers(context: Context) -> list[Finding]:
    found = blocking(context)
    if not found.waiters_of:
        return []
    ranked = sorted(
        found.waiters_of.items(),
        key=lambda item: (-len(item[1]), -(_age(found.holder[item[0]]) or 0.0), item[0]),
    )
    waiting = len(found.victims)
    top_pid, top_waiters = ranked[0]
    summary = (
        f"{_who(context, top_pid, found.holder[top_pid])} holds the lock(s) "
        f"{len(top_waiters)} waiting session(s) need"
        + (f"; {len(ranked)} holders block {waiting} sessions in all" if len(ranked) > 1 else "")
        + ": end the holder, not the sessions waiting for it"
    )
    evidence = []
    for pid, members in ranked[:EVIDENCE_ROWS]:
        holder = found.holder[pid]
        longest = max((w.state_age_s or 0.0 for w in members), default=0.0)
        line = (
            f"pid {pid}: {_who(context, pid, holder)}; {len(members)} session(s) wait for it "
            f"(longest {human_age(longest)}; pids {_pids(members)})"
        )
        if holder is not None and holder.query:
            line += f"; its last query: {advice.query_sample(holder.query)!r}"
        evidence.append(line)
    evidence.extend(more(len(ranked), EVIDENCE_ROWS, "holders"))
    evidence.append(
        f"a wait counts after {human_age(LOCK_WAIT_MIN_S)}; waiters found with pg_blocking_pids(), "
        "followed through sessions queued behind the holder"
    )
    idle_holders: list[Session] = []
    active_holders: list[Session] = []
    for pid, _members in ranked:
        holder = found.holder[pid]
        if holder is None:
            evidence.append(
                _PREPARED
                if pid == 0
                else f"pid {pid} had left pg_stat_activity when the snapshot was taken"
            )
            continue
        why = spared_by_default([holder], context.snapshot)[0][0]
        if why is not None:
            evidence.append(
                f"pid {pid} is not in the statements ({why.text}): pgrelief never targets it; "
                "end it yourself if that is right"
            )
        elif holder.state in (ACTIVE, FASTPATH):
            active_holders.append(holder)
        else:
            idle_holders.append(holder)
    fixes: list[Fix] = []
    spare = context.unknown_superusers or any(h.is_superuser is None for h in idle_holders)
    if idle_holders:
        fixes.append(
            Fix(
                EMERGENCY_SQL,
                f"-- end {len(idle_holders)} idle transaction(s) holding the locks; their "
                "waiters proceed. Each row re-checks\n-- pid, backend_start, state and "
                "state_change, so a holder that has moved on is left alone\n"
                + advice.signal_sql(idle_holders, spare_superusers=spare),
                f"end the {len(idle_holders)} blocking transaction(s)",
            )
        )
    if active_holders:
        fixes.append(
            Fix(
                EMERGENCY_SQL,
                "-- the holders are running a statement: cancel it first (its transaction "
                "rolls back and releases the locks)\n"
                + advice.signal_sql(active_holders, cancel=True, spare_superusers=spare)
                + "\n-- still holding a few seconds later? terminate the same sessions\n"
                + advice.signal_sql(active_holders, spare_superusers=spare),
                f"cancel the {len(active_holders)} blocking statement(s)",
            )
        )
    roles = _roles(idle_holders)
    if roles:
        fixes.append(
            role_timeouts(
                roles,
                "idle_in_transaction_session_timeout",
                DEFAULT_OPTIONS.idle_in_transaction_after_s,
                "a transaction left open holds its locks: end it after this long idle",
                "per-role idle_in_transaction_session_timeout",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "Do not cancel the waiting sessions: they are the victims, and the application "
            "retries them into the same queue. End the holder; then make migrations and DDL "
            "take their locks with a short lock_timeout (SET lock_timeout = '5s') and commit "
            "promptly, so a long transaction cannot queue everyone behind it.",
            "end the holder, not the waiters",
        )
    )
    return [
        Finding(
            LOCK_BLOCKER,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(pid for pid, _ in ranked),
            tuple(fixes),
        )
    ]


def _who(context: Context, pid: int, holder: Session | None) -> str:
    if holder is None:
        return "a prepared transaction" if pid == 0 else f"pid {pid}"
    state = holder.state or "unknown state"
    if holder.state in (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED):
        what = f"{state} {since(context, holder.state_age_s)}"
        if holder.xact_age_s is not None:
            what += f", transaction open {human_age(holder.xact_age_s)}"
    else:
        what = f"{state} {since(context, holder.query_age_s)}"
    return (
        f"pid {pid} (user {name_of(holder.usename)}, application "
        f"{name_of(holder.application_name)}), {what}"
    )


def _age(holder: Session | None) -> float | None:
    return None if holder is None else holder.xact_age_s or holder.state_age_s


def _pids(sessions: list[Session]) -> str:
    pids = sorted(s.pid for s in sessions)
    shown = ", ".join(map(str, pids[:EVIDENCE_ROWS]))
    return shown + (f" +{len(pids) - EVIDENCE_ROWS}" if len(pids) > EVIDENCE_ROWS else "")


def _roles(sessions: Iterable[Session]) -> list[str]:
    return sorted({s.usename for s in sessions if s.usename})
