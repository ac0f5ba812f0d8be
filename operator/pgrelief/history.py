"""What remediation must remember between cycles, whichever driver keeps it.

Three facts outlive a cycle: when pgrelief last terminated sessions or cancelled queries
(so ``maxPerHour`` is a sliding window, not a per-process counter; a cancel spends the budget
like a termination, so both are in ``terminations``), which queries it cancelled that were
still running when last seen (so a cancel that did not take escalates after
``cancel.escalateAfter``, even across ``pgrelief run --once`` processes), and the values a
limit or setting had before pgrelief first changed it (so ``--revert`` and ``onDelete:
Revert`` can put them back). The standalone runner keeps them in a state file, the operator
in the ConnectionPolicy's status; both hold this one value and serialise it with the same two
functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pgrelief.plan import PlanHistory, QueryIdentity

HISTORY_WINDOW = timedelta(hours=1)


@dataclass
class RemediationHistory:
    """Recent budget spends (terminations and cancels), the cancelled queries still running,
    and the recorded originals, keyed like ``plan`` keys them."""

    terminations: list[datetime] = field(default_factory=list)
    originals: dict[str, str | None] = field(default_factory=dict)
    cancels: dict[QueryIdentity, datetime] = field(default_factory=dict)

    def for_planning(
        self, now: datetime, backoff: Mapping[tuple[int, str | None], datetime] | None = None
    ) -> PlanHistory:
        return PlanHistory(
            terminations=tuple(_recent(self.terminations, now)),
            originals=dict(self.originals),
            backoff=dict(backoff or {}),
            cancelled=dict(self.cancels),
        )

    def add_cancels(self, cancels: Mapping[QueryIdentity, datetime]) -> None:
        """Remember queries just cancelled (the first cancel of a query wins)."""
        for query, when in cancels.items():
            self.cancels.setdefault(query, when)

    def forget_cancels_of(self, sessions: Iterable[tuple[int, str | None]]) -> None:
        """Forget the cancelled queries of sessions just terminated (an escalation)."""
        gone = set(sessions)
        self.cancels = {q: when for q, when in self.cancels.items() if (q[0], q[1]) not in gone}

    def keep_cancels(self, running: Iterable[QueryIdentity]) -> None:
        """Forget cancelled queries that are no longer running: the cancel took, or the
        session is gone; only a query still running can escalate."""
        still = set(running)
        self.cancels = {q: when for q, when in self.cancels.items() if q in still}

    def add_terminations(self, times: Iterable[datetime], now: datetime) -> bool:
        """Add termination times and forget those out of the window; True if anything changed."""
        kept = _recent([*self.terminations, *times], now)
        changed = kept != self.terminations
        self.terminations = kept
        return changed

    def add_originals(self, originals: Mapping[str, str | None]) -> bool:
        """Record originals not yet known (the first value found wins); True if any was new."""
        fresh = {k: v for k, v in originals.items() if k not in self.originals}
        self.originals.update(fresh)
        return bool(fresh)

    def to_json(self) -> dict[str, Any]:
        return {
            "terminations": [t.isoformat() for t in self.terminations],
            "originals": dict(self.originals),
            "cancels": [
                {"pid": pid, "backend_start": start, "query_start": query, "at": when.isoformat()}
                for (pid, start, query), when in self.cancels.items()
            ],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RemediationHistory:
        """Read back ``to_json``; a time without a zone (a hand edit) is taken as UTC."""
        return cls(
            terminations=[_aware(datetime.fromisoformat(t)) for t in raw.get("terminations", [])],
            originals=dict(raw.get("originals", {})),
            cancels={
                (int(c["pid"]), c["backend_start"], c["query_start"]): _aware(
                    datetime.fromisoformat(c["at"])
                )
                for c in raw.get("cancels", [])
            },
        )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _recent(times: Iterable[datetime], now: datetime) -> list[datetime]:
    """Times within the window before ``now``. A time in the future (the clock was set back
    since it was written) counts as ``now``: it blocks the budget for one window, not until
    the clock catches up with it."""
    return [min(t, now) for t in times if now - t < HISTORY_WINDOW]


class HistoryStore(Protocol):
    """Where a driver keeps its ``RemediationHistory``: a state file, or the policy's status.

    ``keep_originals`` returns only once the originals are durable, because the cycle calls it
    right before changing the values they describe; terminations may be persisted lazily.
    The cycle updates ``history.cancels`` in place before each ``note_terminations`` call,
    which is when a store that persists them saves them.
    """

    @property
    def history(self) -> RemediationHistory: ...

    def keep_originals(self, originals: Mapping[str, str | None]) -> None: ...

    def note_terminations(self, times: Iterable[datetime], now: datetime) -> None: ...

    def forget_originals(self) -> None: ...
