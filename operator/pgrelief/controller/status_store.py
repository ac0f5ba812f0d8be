"""A policy's status as its memory: the operator's ``HistoryStore``, and a thrifty writer.

The budget window (recent terminations) and the originals live in the ConnectionPolicy's
status, so ``maxPerHour`` and ``onDelete: Revert`` survive an operator restart. Originals are
written the moment the cycle asks (before the first change they describe); everything else
goes out with the next status write, which ``manifests.status.needs_write`` keeps to
meaningful changes and a bounded rate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from pgrelief.controller.kube import Kube
from pgrelief.history import RemediationHistory
from pgrelief.manifests.status import history_of, needs_write, originals_of, with_history
from pgrelief.policy import ConnectionPolicyStatus

log = logging.getLogger(__name__)


class StatusStore:
    """The status of one ConnectionPolicy: what was last written, and its history."""

    def __init__(
        self, kube: Kube, namespace: str, name: str, status: ConnectionPolicyStatus | None
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.written = status
        self.history: RemediationHistory = history_of(status)
        self.writes = 0
        self._written_at: datetime | None = None
        self._lock = threading.Lock()

    # ---- HistoryStore -------------------------------------------------------------------
    def keep_originals(self, originals: Mapping[str, str | None]) -> None:
        if self.history.add_originals(originals):
            # Durable before the change it describes: a crash after the ALTER keeps it.
            self._patch({"originals": originals_of(self.history)})

    def note_terminations(self, times: Iterable[datetime], now: datetime) -> None:
        self.history.add_terminations(times, now)

    def forget_originals(self) -> None:
        self.history.originals.clear()

    # ---- writing ------------------------------------------------------------------------
    def write(self, wanted: ConnectionPolicyStatus, *, now: datetime | None = None) -> bool:
        """Write ``wanted`` (with the history) if it is worth it now; True if it was written."""
        moment = now or datetime.now(UTC)
        wanted = with_history(wanted, self.history)
        since = moment - self._written_at if self._written_at else None
        if since is not None and not needs_write(self.written, wanted, since_written=since):
            return False
        self._patch(wanted.model_dump(mode="json", by_alias=True, exclude_none=True))
        self.written = wanted
        self._written_at = moment
        return True

    def _patch(self, status: dict[str, object]) -> None:
        with self._lock:
            self.kube.patch_policy_status(self.namespace, self.name, status)
            self.writes += 1
