"""Audit records: one JSON line per action pgrelief took, skipped or would have taken.

The audit trail is how an operator answers "why was my session killed?" after the fact, so
every planned action produces exactly one record, including dry runs and refusals, with the
evidence that justified it. The field names are a contract (DESIGN.md, ``pgrelief run``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

Outcome = Literal["done", "skipped", "failed"]


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


@dataclass
class AuditLog:
    """Collects records in memory and appends them, one JSON line each, to optional sinks."""

    path: Path | None = None
    stream: IO[str] | None = None
    records: list[AuditRecord] = field(default_factory=list)

    def write(self, records: Iterable[AuditRecord]) -> None:
        batch = list(records)
        self.records.extend(batch)
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in batch)
        if not lines:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as sink:
                sink.write(lines)
        if self.stream is not None:
            self.stream.write(lines)
            self.stream.flush()


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
