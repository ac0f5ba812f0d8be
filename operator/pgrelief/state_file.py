"""The standalone runner's memory between runs: a small JSON file written atomically.

``pgrelief run --once`` from cron is a new process each time; without this file ``maxPerHour``
would reset every minute and ``--revert`` would not know what to restore.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from pgrelief.errors import PgreliefError
from pgrelief.history import RemediationHistory
from pgrelief.policy import ConnectionPolicy


class StateFileError(PgreliefError):
    """The state file cannot be read back, or written."""


class StateStore:
    """A ``HistoryStore`` in a JSON file, written only when its content changed, atomically:
    a killed process or a full disk never leaves half a file, nor a stray temporary one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history = self._load()
        self._saved = self.history.to_json()

    def check(self) -> None:
        """Fail now, naming the file, if the state could not be saved later."""
        probe = self._temporary()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            if self.path.exists() and not os.access(self.path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as error:
            raise self._write_error(error) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    def keep_originals(self, originals: Mapping[str, str | None]) -> None:
        self.history.add_originals(originals)
        self._save()

    def note_terminations(self, times: Iterable[datetime], now: datetime) -> None:
        # Also saves the cancels the cycle updated in place (see HistoryStore).
        self.history.add_terminations(times, now)
        self._save()

    def forget_originals(self) -> None:
        self.history.originals.clear()
        self._save()

    def _load(self) -> RemediationHistory:
        if self.path.is_dir():
            raise StateFileError(f"cannot write the state file {self.path}: it is a directory")
        if not self.path.exists():
            return RemediationHistory()
        try:
            return RemediationHistory.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
            raise StateFileError(f"cannot read state file {self.path}: {error!s}") from None

    def _save(self) -> None:
        """Write the history if it differs from what the file holds; durable on return."""
        content = self.history.to_json()
        if content == self._saved:
            return
        temporary = self._temporary()
        text = json.dumps(content, indent=2, ensure_ascii=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("w", encoding="utf-8") as sink:
                sink.write(text)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temporary, self.path)
            self._saved = content
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise self._write_error(error) from None

    def _temporary(self) -> Path:
        return self.path.with_suffix(self.path.suffix + ".tmp")

    def _write_error(self, error: OSError) -> StateFileError:
        reason = error.strerror or str(error)
        return StateFileError(f"cannot write the state file {self.path}: {reason}")


def default_state_path(policy: ConnectionPolicy) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    namespace = policy.metadata.namespace or "default"
    return base / "pgrelief" / f"{namespace}.{policy.metadata.name}.json"
