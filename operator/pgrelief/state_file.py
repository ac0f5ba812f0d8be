"""The standalone runner's memory between runs: a small JSON file written atomically.

``pgrelief run --once`` from cron is a new process each time; without this file ``maxPerHour``
would reset every minute and ``--revert`` would not know what to restore.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from pgrelief.errors import PgreliefError
from pgrelief.history import RemediationHistory
from pgrelief.policy import ConnectionPolicy


class StateFileError(PgreliefError):
    """The state file exists but cannot be read back."""


class StateStore:
    """A ``HistoryStore`` in a JSON file; a killed process never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history = self._load()

    def keep_originals(self, originals: Mapping[str, str | None]) -> None:
        if self.history.add_originals(originals):
            self._save()

    def note_terminations(self, times: Iterable[datetime], now: datetime) -> None:
        self.history.add_terminations(times, now)
        self._save()

    def forget_originals(self) -> None:
        self.history.originals.clear()
        self._save()

    def _load(self) -> RemediationHistory:
        if not self.path.exists():
            return RemediationHistory()
        try:
            return RemediationHistory.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise StateFileError(f"cannot read state file {self.path}: {error}") from None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(
            json.dumps(self.history.to_json(), indent=2, ensure_ascii=False), encoding="utf-8"
        )
        os.replace(temporary, self.path)


def default_state_path(policy: ConnectionPolicy) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    namespace = policy.metadata.namespace or "default"
    return base / "pgrelief" / f"{namespace}.{policy.metadata.name}.json"
