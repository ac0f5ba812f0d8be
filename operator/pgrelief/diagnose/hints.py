"""What would free slots when nothing is old enough to: the threshold to pass, and how many.

A fresh spike (a deploy opening every pool at once, a retry storm) fills the server with
sessions younger than the default thresholds, so the findings name nothing to terminate and
the report would be CRITICAL with no way out. These lines say which sessions would free the
slots and the exact flag that lists them, without deciding for the reader that a minute-old
idle session is a leak.
"""

from __future__ import annotations

import math
from operator import attrgetter

from pgrelief.diagnose._counting import Context
from pgrelief.diagnosis import Severity
from pgrelief.durations import format_duration, human_age
from pgrelief.protection import spared_by_default
from pgrelief.snapshot import IDLE, IDLE_IN_TRANSACTION, Session
from pgrelief.snapshot import IDLE_IN_TRANSACTION_ABORTED as ABORTED

_STATE_AGE = attrgetter("state_age_s")


def threshold_hints(context: Context) -> list[str]:
    """Under pressure with no session past a threshold: what would free slots (cached)."""
    key = "threshold_hints"
    if key in context.cache:
        cached: list[str] = context.cache[key]
        return cached
    lines: list[str] = []
    if context.pressure >= Severity.WARNING and not (context.idle_in_tx or context.leaked):
        lines = _hints(context)
    context.cache[key] = lines
    return lines


def _hints(context: Context) -> list[str]:
    options = context.options
    allowed = max(math.ceil(context.usable * options.warning_percent / 100) - 1, 0)
    need = max(context.client_count - allowed, 1)
    lines = [
        f"Nothing is old enough to terminate with the thresholds used (idle ≥ "
        f"{human_age(options.idle_after_s)}, idle in transaction ≥ "
        f"{human_age(options.idle_in_transaction_after_s)}); {need} session(s) must go to get "
        f"below {options.warning_percent}% of the usable slots."
    ]
    for states, flag, what in (
        ((IDLE_IN_TRANSACTION, ABORTED), "--idle-in-transaction-after", "idle in transaction"),
        ((IDLE,), "--idle-after", "idle"),
    ):
        sessions = _candidates(context, states)
        if not sessions:
            continue
        count = min(need, len(sessions))
        threshold = _round_down(_STATE_AGE(sessions[count - 1]))
        caught = sum(1 for s in sessions if _STATE_AGE(s) >= threshold)
        lines.append(
            f"{len(sessions)} session(s) are {what}, the oldest for "
            f"{human_age(_STATE_AGE(sessions[0]))}: run again with {flag} "
            f"{format_duration(threshold)} to get the statement that terminates the {caught} "
            f"{what} for at least {human_age(threshold)}"
            + ("" if caught >= need else f" (not enough alone: {need} must go)")
            + "; a young idle session may be a pool warming up, not a leak: check its "
            "application first."
        )
    active = len(context.active)
    if active:
        lines.append(
            f"{active} session(s) are active: no threshold frees them safely. If they are a "
            "traffic spike, PgBouncer (transaction mode) queues it; if they wait on locks, end "
            "what holds the locks (lock_blocker), not them."
        )
    return lines


def _candidates(context: Context, states: tuple[str, ...]) -> list[Session]:
    """Sessions in ``states`` with a known age that `run` could terminate, oldest first."""
    own = context.own
    found = [
        s
        for s, state in zip(context.clients, context.states, strict=True)
        if state in states and s is not own and s.state_age_s is not None
    ]
    verdicts, _unknown = spared_by_default(found, context.snapshot)
    kept = [s for s, why in zip(found, verdicts, strict=True) if why is None]
    kept.sort(key=_STATE_AGE, reverse=True)
    return kept


def _round_down(seconds: float) -> float:
    """A threshold a person would type, no longer than ``seconds`` (so it still catches it)."""
    if seconds >= 600:
        return math.floor(seconds / 60) * 60
    if seconds >= 1:
        return float(math.floor(seconds))
    return math.floor(seconds * 10) / 10
