"""Audit records: one JSON line per action pgrelief took, skipped or would have taken.

The audit trail is how an operator answers "why was my session killed?" after the fact, so
every planned action produces exactly one outcome record, including dry runs and refusals,
with the evidence that justified it. The field names are a contract (DESIGN.md, ``pgrelief
run``).

A termination or a cancel cannot be undone, so its record is written *before* it happens: an
``intent`` record per session, flushed to disk, then the statement, then the outcome record.
A crash can therefore leave an intent without an outcome (something perhaps not done), never a
terminated session without a record. The file sink fsyncs every batch and says which file failed and
which records it could not write, so a caller can stop cleanly instead of acting blind.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pgrelief.errors import PgreliefError

Outcome = Literal["intent", "done", "skipped", "failed"]
AuditSink = Callable[[Sequence["AuditRecord"]], None]

# Characters str.splitlines() treats as line ends that json.dumps(ensure_ascii=False) leaves
# raw: a role named with one of them must not split a record in two for any reader.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_LINE_BREAKS_TABLE = str.maketrans(_LINE_BREAKS)
# The detail of a dry run's planned action. A session a rule spares is "skipped" in a dry run
# too, with the rule as its detail: only this one says "would have been done".
DRY_RUN_DETAIL = "dry run: nothing was changed"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    ts: datetime
    action: str
    target: str
    reason: str
    evidence: Mapping[str, Any]
    dry_run: bool
    outcome: Outcome
    detail: str = ""  # why it was skipped, or the error it failed with
    policy: str = ""

    @property
    def planned(self) -> bool:
        """A dry run's plan (what would have been done), not a session a rule spared."""
        return self.outcome == "skipped" and self.dry_run and self.detail == DRY_RUN_DETAIL

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts.astimezone(UTC).isoformat(timespec="milliseconds"),
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "evidence": _jsonable(self.evidence),
            "dry_run": self.dry_run,
            "outcome": self.outcome,
            "detail": self.detail,
            "policy": self.policy,
        }

    def to_line(self) -> str:
        """The record as one JSON line that every line splitter reads as one line."""
        text = json.dumps(self.to_json(), ensure_ascii=False)
        return text.translate(_LINE_BREAKS_TABLE) + "\n"


class AuditWriteError(PgreliefError):
    """The audit sink could not take records; ``unwritten`` are the ones that are not in it."""

    def __init__(self, path: Path, error: OSError, unwritten: Sequence[AuditRecord] = ()) -> None:
        self.path = path
        self.unwritten = list(unwritten)
        reason = error.strerror or str(error)
        super().__init__(f"cannot write the audit file {path}: {reason}")


@dataclass
class AuditLog:
    """Appends records, one JSON line each, to an optional file (fsynced) and stream.

    Safe to share between threads (the operator's cycles): a batch is never interleaved.
    """

    path: Path | None = None
    stream: IO[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self) -> None:
        """Fail now, naming the file, if records could not be appended to it later."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8"):
                pass
        except OSError as error:
            raise AuditWriteError(self.path, error) from None

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Append ``records``; when this returns they are on disk (file) and flushed (stream)."""
        lines = "".join(record.to_line() for record in records)
        if not lines:
            return
        with self._lock:
            if self.path is not None:
                _append_durably(self.path, lines.encode("utf-8"), records)
            if self.stream is not None:
                self.stream.write(lines)
                self.stream.flush()

    def __call__(self, records: Sequence[AuditRecord]) -> None:
        self.write(records)


def _append_durably(path: Path, data: bytes, records: Sequence[AuditRecord]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as error:
        raise AuditWriteError(path, error, records) from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as error:
            # A full disk may take half a batch: cut it off, so no reader sees half a record.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise AuditWriteError(path, error, records) from None
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
