"""The ConnectionPolicy status: what the operator writes back, in Kubernetes' conventions.

``observedGeneration`` and metav1.Condition-shaped ``conditions`` (no ``phase``); the CRD's
status schema is generated from these models like the spec's. The status comes back from the
API server as JSON, timestamps as RFC 3339 strings: those fields alone accept a string
(``strict=False``), everything else is as strict as the spec.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, Strict

from pgrelief.policy.fields import PolicyModel


class Condition(PolicyModel):
    """A metav1.Condition: one aspect of the policy's state."""

    type: str = Field(min_length=1, max_length=316, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None,
        max_length=1024,
        description="CamelCase machine-readable reason for the last transition.",
    )
    message: str | None = Field(
        default=None, max_length=32768, description="Human-readable details of the last transition."
    )
    last_transition_time: datetime | None = Field(
        default=None, strict=False, description="When the condition last changed status (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


MAX_RECENT_ACTIONS = 10
MAX_STATUS_FINDINGS = 5


class RecentAction(PolicyModel):
    """One action of a recent cycle, as its audit record says (the full trail is the log)."""

    time: datetime = Field(strict=False, description="When it happened (RFC 3339).")
    action: str = Field(description="terminate, cancel, alter_role, alter_database, ...")
    target: str = Field(description='What it acted on, e.g. "pid 4242" or "role app".')
    outcome: Literal["done", "skipped", "failed"] = Field(description="What happened.")
    reason: str = Field(max_length=512, description="Why it was planned.")
    detail: str | None = Field(
        default=None, max_length=512, description="Why skipped, or the error it failed with."
    )
    dry_run: bool = Field(default=False, description="True when only planned (DryRun).")


class ConnectionPolicyStatus(PolicyModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Current conditions; at least Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    pressure: Literal["healthy", "warning", "critical", "unknown"] | None = Field(
        default=None, description="Pressure level of the last diagnosis."
    )
    utilization_percent: int | None = Field(
        default=None,
        ge=0,
        description="Client backends as a percent of usable slots at the last diagnosis.",
    )
    client_backends: int | None = Field(
        default=None, ge=0, description="Client backends seen at the last diagnosis."
    )
    usable_slots: int | None = Field(
        default=None,
        ge=0,
        description="max_connections - superuser_reserved_connections - reserved_connections.",
    )
    last_diagnosis_time: datetime | None = Field(
        default=None, strict=False, description="When the last diagnosis was taken (RFC 3339)."
    )
    last_action_time: datetime | None = Field(
        default=None,
        strict=False,
        description="When pgrelief last performed (or, in DryRun, planned) an action.",
    )
    terminations_last_hour: int | None = Field(
        default=None,
        ge=0,
        description="Sessions terminated in the last hour (counts against maxPerHour).",
    )
    terminations_total: int | None = Field(
        default=None, ge=0, description="Sessions terminated since the policy was created."
    )
    planned_last_cycle: int | None = Field(
        default=None,
        ge=0,
        description="Actions planned in the last cycle (performed unless DryRun).",
    )
    connections: dict[str, int] | None = Field(
        default=None,
        description="Client backends by pg_stat_activity state at the last diagnosis.",
    )
    findings: list[str] | None = Field(
        default=None,
        max_length=MAX_STATUS_FINDINGS,
        description="The last diagnosis' findings, most severe first, one line each.",
    )
    recent_actions: list[RecentAction] | None = Field(
        default=None,
        max_length=MAX_RECENT_ACTIONS,
        description=f"The last {MAX_RECENT_ACTIONS} actions performed, skipped or failed.",
    )
    recent_terminations: list[Annotated[datetime, Strict(False)]] | None = Field(
        default=None,
        description=(
            "When sessions were terminated in the last hour: the sliding window maxPerHour is "
            "counted over, kept here so it survives an operator restart."
        ),
    )
    failed_actions_total: int | None = Field(
        default=None, ge=0, description="Actions that failed since the policy was created."
    )
    originals: dict[str, str] | None = Field(
        default=None,
        description=(
            "Values found before pgrelief first changed a limit or setting, keyed "
            "role:<name>:<setting>, database:<name>:connection_limit or system:<setting>; "
            "an empty string means the setting was not set. Restored on delete when "
            "limits.onDelete is Revert."
        ),
    )
