"""The verdict: what holds the slots (who, since when), the one statement that frees them, and
the durable fixes, computed from the findings so the answer comes before the evidence.

A tired on-call engineer reads the first screen only. The findings stay complete (and the
JSON carries them); this module picks from them: the sessions every finding would have
terminated, as one statement, oldest lock holders first; the durable SQL, PgBouncer and ORM
fixes once each, in the findings' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import (
    Bucket,
    addr_of,
    bucketed,
    buckets_of,
    name_of,
    oldest_first,
    oldest_of,
    since,
    spared_lines,
)
from pgrelief.diagnose.hints import threshold_hints
from pgrelief.diagnose.locks import blocking
from pgrelief.diagnose.saturation import limits_hit
from pgrelief.diagnosis import (
    DURABLE_SQL,
    EMERGENCY_SQL,
    ORM,
    PGBOUNCER,
    Finding,
    Fix,
    Severity,
    Verdict,
)
from pgrelief.durations import human_age
from pgrelief.protection import spared_by_default
from pgrelief.snapshot import (
    ACTIVE,
    FASTPATH,
    IDLE,
    IDLE_IN_TRANSACTION,
    IDLE_IN_TRANSACTION_ABORTED,
    Session,
)

# The slot settings whose assumption changes every percentage in the report.
SLOT_SETTINGS = ("max_connections", "superuser_reserved_connections", "reserved_connections")
HOLDER_LINES = 4  # groups named in the summary before "... and N more"
_DURABLE_ORDER = (DURABLE_SQL, PGBOUNCER, ORM)
_USER_APP = attrgetter("usename", "application_name")
_APP_ADDR = attrgetter("application_name", "client_addr")


def verdict(context: Context, findings: Sequence[Finding], status: Severity) -> Verdict:
    facts = context.snapshot.server
    assumed = tuple(name for name in SLOT_SETTINGS if name in facts.assumed)
    summary = [_slots_line(context, assumed)]
    notes: list[str] = []
    if assumed:
        values = ", ".join(f"{name}={_fact(context, name)}" for name in assumed)
        notes.append(
            f"ASSUMED, not observed: {values} (PostgreSQL's defaults; the input has no "
            f"settings). The {context.utilization:.0f}% and the {status.label.upper()} status "
            "rest on them: pass --max-connections N (what SHOW max_connections says) or "
            "--settings-file."
        )
    holders = _holders(context)
    emergency: Fix | None = None
    if holders:
        summary.extend(_holder_lines(context, holders))
        emergency = _emergency(context, holders)
    else:
        summary.append(_composition(context))
    summary.append(_largest(context))
    notes.extend(threshold_hints(context))
    if emergency is not None:
        notes.extend(spared_lines(context, {s.state for s, _ in context.spared}))
    return Verdict(
        summary=tuple(summary),
        emergency=emergency,
        durable=_durable(findings),
        notes=tuple(notes),
        assumed=assumed,
    )


def _fact(context: Context, name: str) -> int:
    facts = context.snapshot.server
    value: int = getattr(facts, name)
    return value


def _slots_line(context: Context, assumed: tuple[str, ...]) -> str:
    line = (
        f"{context.client_count} of {context.usable} usable connection slots in use "
        f"({context.utilization:.0f}%)"
    )
    if context.client_count >= context.usable:
        line += ": new connections from ordinary roles are refused ('too many clients')"
    elif context.pressure == Severity.HEALTHY:
        line += ": no pressure"
    if assumed:
        line += " — on ASSUMED settings, see below"
    return line


def _holders(context: Context) -> list[Session]:
    """The sessions to free: idle lock holders, then idle in transaction, then leaked idle.

    When only some roles or databases are at their own CONNECTION LIMIT (the server has
    slots), theirs come first.
    """
    found = blocking(context)
    lock_holders = [
        holder
        for holder in found.holder.values()
        if holder is not None
        and holder.state not in (ACTIVE, FASTPATH)
        and _may_terminate(context, holder)
    ]
    sessions = [*oldest_of(context, "idle_in_tx"), *oldest_of(context, "leaked")]
    if lock_holders:
        chosen: dict[int, Session] = {}
        for session in (*oldest_first(lock_holders, "state_age_s"), *sessions):
            chosen.setdefault(session.pid, session)
        sessions = list(chosen.values())
    roles, databases = limits_hit(context)
    if context.pressure == Severity.HEALTHY and (roles or databases):
        sessions.sort(key=lambda s: s.usename not in roles and s.datname not in databases)
    return sessions


def _may_terminate(context: Context, session: Session) -> bool:
    return spared_by_default([session], context.snapshot)[0][0] is None


def _holder_lines(context: Context, holders: list[Session]) -> list[str]:
    found = blocking(context)
    lines = []
    for pid, waiters in sorted(found.waiters_of.items(), key=lambda i: -len(i[1])):
        holder = found.holder[pid]
        if holder is None:
            continue
        lines.append(
            f"pid {pid} (user {name_of(holder.usename)}, application "
            f"{name_of(holder.application_name)}) holds locks {len(waiters)} session(s) wait "
            f"for: {holder.state or 'unknown state'} {since(context, holder.state_age_s)}"
        )
    lock_pids = set(found.holder)
    if lock_pids:
        rest = [s for s in holders if s.pid not in lock_pids]
        in_tx_buckets = bucketed([s for s in rest if s.state != IDLE], _USER_APP, HOLDER_LINES)
        idle_buckets = bucketed([s for s in rest if s.state == IDLE], _APP_ADDR, HOLDER_LINES)
    else:  # every candidate: the findings' own groups
        in_tx_buckets = buckets_of(context, "idle_in_tx")
        idle_buckets = buckets_of(context, "leaked")
    # Only the biggest groups are worded: there may be thousands.
    ranked = sorted(
        [(b.count, True, b) for b in in_tx_buckets[:HOLDER_LINES]]
        + [(b.count, False, b) for b in idle_buckets[:HOLDER_LINES]],
        key=lambda g: -g[0],
    )
    for _count, in_transaction, bucket in ranked[:HOLDER_LINES]:
        lines.append(_group_line(context, bucket, in_transaction=in_transaction))
    others = len(in_tx_buckets) + len(idle_buckets) - min(len(ranked), HOLDER_LINES)
    if others > 0:
        grouped = sum(b.count for b in in_tx_buckets) + sum(b.count for b in idle_buckets)
        shown = sum(b.count for _c, _t, b in ranked[:HOLDER_LINES])
        lines.append(f"... and {grouped - shown} more in {others} other group(s)")
    return lines


def _group_line(context: Context, bucket: Bucket, *, in_transaction: bool) -> str:
    if in_transaction:
        role, application = bucket.key
        return (
            f"{bucket.count} idle in transaction from application {name_of(application)} "
            f"(user {name_of(role)}), the oldest {since(context, bucket.oldest.state_age_s)}"
        )
    application, address = bucket.key
    users = ", ".join(name_of(r) for r in bucket.roles) or "(unknown)"
    return (
        f"{bucket.count} idle from application {name_of(application)} on {addr_of(address)} "
        f"(user {users}), the oldest {since(context, bucket.oldest.state_age_s)}"
    )


def _composition(context: Context) -> str:
    """What the slots hold when nothing is to be freed: the states, and the thresholds."""
    options = context.options
    states = context.by_state
    active = states.get(ACTIVE, 0) + states.get(FASTPATH, 0)
    in_transaction = states.get(IDLE_IN_TRANSACTION, 0) + states.get(IDLE_IN_TRANSACTION_ABORTED, 0)
    return (
        f"{active} active, {states.get(IDLE, 0)} idle, {in_transaction} idle in transaction: "
        f"none that pgrelief would end is idle for ≥ {human_age(options.idle_after_s)} or "
        f"idle in a transaction for ≥ {human_age(options.idle_in_transaction_after_s)}"
    )


def _largest(context: Context) -> str:
    breakdown = context.breakdown
    parts = [
        f"{label} {name_of(groups[0].key) if quote else groups[0].key} {groups[0].count}"
        for label, groups, quote in (
            ("user", breakdown.by_user, True),
            ("application", breakdown.by_application, True),
            ("client", breakdown.by_client_addr, False),
            ("database", breakdown.by_database, True),
        )
        if groups
    ]
    return "largest holders: " + ", ".join(parts) if parts else "no client sessions"


def _emergency(context: Context, holders: list[Session]) -> Fix:
    """One terminate statement for every session to free: each row re-checks its identity.

    Sessions are listed by identity (the first ``MAX_LISTED``, in the order given); the rest
    by pattern, re-checking state and age when it runs."""
    options = context.options
    listed = holders[: advice.MAX_LISTED]
    text = (
        f"-- terminate {len(listed)} session(s), oldest first; each row re-checks pid, "
        "backend_start, state and state_change,\n-- so a reused pid or a session that moved "
        "on is left alone\n"
        + advice.signal_sql(listed, spare_superusers=context.unknown_superusers)
    )
    if len(holders) > len(listed):
        ages = {
            IDLE_IN_TRANSACTION: options.idle_in_transaction_after_s,
            IDLE_IN_TRANSACTION_ABORTED: options.idle_in_transaction_after_s,
            IDLE: options.idle_after_s,
        }
        text += (
            f"\n-- {len(holders) - len(listed)} more match the same pattern; this re-checks state "
            "and age when it runs:\n" + advice.pattern_signal_sql(ages, "state_change")
        )
    roles, databases = limits_hit(context)
    if context.pressure > Severity.HEALTHY or roles or databases:
        title = f"free {len(holders)} slot(s) now"
    else:
        title = f"end {len(holders)} stale session(s) (no slot pressure: when convenient)"
    return Fix(EMERGENCY_SQL, text, title)


def _durable(findings: Sequence[Finding]) -> tuple[Fix, ...]:
    """The findings' durable fixes once each; the ORM settings of every application as one
    fix (each finding names its own applications, with the same numbers: ``share_for``)."""
    seen: set[str] = set()
    chosen: list[Fix] = []
    pools: dict[str, list[str]] = {}
    for kind in _DURABLE_ORDER:
        for finding in findings:
            for fix in finding.fixes:
                if fix.kind != kind:
                    continue
                if kind == ORM:
                    for block in fix.text.split("\n\n"):
                        pools.setdefault(block, [])
                elif fix.text not in seen:
                    seen.add(fix.text)
                    chosen.append(fix)
    if pools:
        blocks = [b for b in pools if not b.startswith("# ... and ")]
        chosen.append(
            Fix(
                ORM,
                "\n\n".join(blocks),
                f"application pool settings for {len(blocks)} application(s), each within its "
                "role's share of the slots",
            )
        )
    return tuple(chosen)
