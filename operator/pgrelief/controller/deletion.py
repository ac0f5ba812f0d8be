"""What deleting a ConnectionPolicy does: ``limits.onDelete: Revert`` puts the originals back.

The originals come from the status (written before pgrelief first changed each value), so a
revert works after an operator restart too. The revert is the shared cycle's, over a
connection of its own (the policy's worker has stopped by then). When the database stays
unreachable, the kopf handler retries a bounded number of times and then lets the policy go
with a Warning Event naming what was not reverted: deletion never hangs forever.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgrelief.connection import ManagedConnection
from pgrelief.controller.credentials import policy_conninfo
from pgrelief.controller.status_store import StatusStore
from pgrelief.controller.worker import OperatorContext, status_of
from pgrelief.cycle import Cycle
from pgrelief.errors import PgreliefError
from pgrelief.policy import PolicyError, validate_policy

REVERT_ATTEMPTS = 4
REVERT_RETRY_S = 5.0
DEADLINE_S = 30.0


@dataclass(frozen=True)
class RevertResult:
    """``reverted``: what was put back; ``left``: what was not (empty when complete)."""

    reverted: list[str]
    left: list[str]


def revert_on_delete(context: OperatorContext, raw: Mapping[str, Any]) -> RevertResult | None:
    """Revert the recorded originals if the policy asks for it; None when there is nothing to do.

    Raises ``PgreliefError`` when the database cannot be reached (the caller retries).
    """
    meta = raw["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    store = StatusStore(context.kube, namespace, name, status_of(raw))
    originals = dict(store.history.originals)
    spec = raw.get("spec") or {}
    on_delete = (spec.get("limits") or {}).get("onDelete", "Keep")
    if on_delete != "Revert" or not originals:
        return None
    try:
        policy = validate_policy(
            {key: raw[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in raw}
        )
    except PolicyError as error:
        return RevertResult([], [f"{key} (the spec is invalid: {error})" for key in originals])
    cycle = Cycle(policy, store, context.audit)
    with ManagedConnection(
        lambda: policy_conninfo(context.kube, policy), reconnect_within_s=REVERT_RETRY_S
    ) as connection:
        conn = connection.get()
        with connection.deadline(DEADLINE_S):
            report = cycle.revert(conn)
    reverted = [f"{r.target}: {r.reason}" for r in report.records if r.outcome == "done"]
    left = [
        f"{r.target}: {r.detail or r.reason}"
        for r in report.records
        if r.outcome == "failed" or r.action == "recommend"
    ]
    return RevertResult(reverted, left)


def unreachable_result(raw: Mapping[str, Any], error: PgreliefError) -> RevertResult:
    """What was not reverted when the database never answered."""
    status = status_of(raw)
    originals = (status.originals or {}) if status is not None else {}
    return RevertResult(
        [], [f"{key} (was {value or 'not set'!r}): {error}" for key, value in originals.items()]
    )
