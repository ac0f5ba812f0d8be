"""The ConnectionPolicy object and its spec: how to reach a server, pressure, remediation
(``limits`` and ``pgbouncer`` have their own modules).

Every field's description says which SQL clause or PostgreSQL/PgBouncer setting it maps to;
those descriptions are what ``kubectl explain connectionpolicy.spec`` shows.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pgrelief.durations import parse_duration
from pgrelief.policy.fields import (
    API_VERSION_FULL,
    KIND,
    ApiVersion,
    Cidr,
    Identifier,
    IntervalDuration,
    Kind,
    Mode,
    Percent,
    PolicyModel,
    PositiveDuration,
    SslMode,
)
from pgrelief.policy.limits import LimitsSpec
from pgrelief.policy.pgbouncer import PgBouncerSpec
from pgrelief.policy.status import ConnectionPolicyStatus


class CredentialsSecret(PolicyModel):
    """A Kubernetes Secret in the policy's namespace holding the login pgrelief connects with."""

    name: str = Field(
        min_length=1, description="Name of the Secret (same namespace as the policy)."
    )
    username_key: str = Field(
        default="username",
        min_length=1,
        description="Key in the Secret whose value is the role name.",
    )
    password_key: str = Field(
        default="password",
        min_length=1,
        description="Key in the Secret whose value is the password.",
    )


class PostgresSpec(PolicyModel):
    """How pgrelief reaches the server (libpq connection parameters)."""

    host: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Server host name, IP address or Unix socket directory (libpq `host`). Required by "
            "the operator; `pgrelief run --dsn` may supply the server instead."
        ),
    )
    port: int = Field(default=5432, ge=1, le=65535, description="Server port (libpq `port`).")
    database: str = Field(
        default="postgres",
        min_length=1,
        description="Database pgrelief connects to for observing and acting (libpq `dbname`).",
    )
    ssl_mode: SslMode = Field(default="prefer", description="TLS requirement (libpq `sslmode`).")
    credentials_secret: CredentialsSecret | None = Field(
        default=None,
        description=(
            "Secret with the role and password to connect as (operator). The role needs "
            "pg_signal_backend (or superuser) to terminate sessions, CREATEROLE / database "
            "ownership for limits, and ALTER SYSTEM privilege for server settings."
        ),
    )
    user: str | None = Field(
        default=None,
        min_length=1,
        description="Role to connect as when no Secret is used (standalone; libpq `user`).",
    )
    password_env: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Name of an environment variable holding the password (standalone `pgrelief run`); "
            "the password itself never appears in a policy."
        ),
    )


class PressureSpec(PolicyModel):
    """When the server counts as under pressure: client backends as a percent of usable slots
    (max_connections - superuser_reserved_connections - reserved_connections)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # has(): the CRD's `default: {}` is checked against this rule as is.
                    "rule": (
                        "!has(self.warningPercent) || !has(self.criticalPercent) || "
                        "self.warningPercent < self.criticalPercent"
                    ),
                    "message": "warningPercent must be lower than criticalPercent",
                }
            ]
        }
    )

    warning_percent: Percent = Field(
        default=70,
        description="Utilization (percent of usable slots) at or above which pressure is warning.",
    )
    critical_percent: Percent = Field(
        default=90,
        description="Utilization (percent of usable slots) at or above which pressure is critical.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PressureSpec:
        if self.warning_percent >= self.critical_percent:
            raise ValueError(
                f"warningPercent ({self.warning_percent}) must be lower than "
                f"criticalPercent ({self.critical_percent})"
            )
        return self


class TerminateSpec(PolicyModel):
    """Which sessions are stale enough to terminate (pg_terminate_backend), by
    pg_stat_activity.state and the time since pg_stat_activity.state_change. An absent rule
    never terminates anything."""

    idle_in_transaction_after: PositiveDuration | None = Field(
        default=None,
        description=(
            "Terminate sessions in state 'idle in transaction' for at least this long "
            "(like idle_in_transaction_session_timeout, but only under pressure and within budget)."
        ),
    )
    idle_in_transaction_aborted_after: PositiveDuration | None = Field(
        default=None,
        description=(
            "Terminate sessions in state 'idle in transaction (aborted)' for at least this long."
        ),
    )
    idle_after: PositiveDuration | None = Field(
        default=None,
        description=(
            "Terminate sessions in state 'idle' for at least this long: leaked connections "
            "(like idle_session_timeout). Pool connections are idle too: keep this well above "
            "the pool's own idle timeout."
        ),
    )

    def threshold_seconds(self) -> dict[str, float]:
        """pg_stat_activity.state -> minimum state age, for the rules that are set."""
        rules = {
            "idle in transaction": self.idle_in_transaction_after,
            "idle in transaction (aborted)": self.idle_in_transaction_aborted_after,
            "idle": self.idle_after,
        }
        return {state: parse_duration(text) for state, text in rules.items() if text is not None}


class BudgetSpec(PolicyModel):
    """The most terminations pgrelief performs, whatever the rules match."""

    max_per_cycle: int = Field(
        default=10,
        ge=0,
        description="Most sessions terminated in one cycle (0 disables terminations).",
    )
    max_per_hour: int = Field(
        default=100, ge=0, description="Most sessions terminated in any sliding window of one hour."
    )


class ProtectSpec(PolicyModel):
    """Sessions pgrelief never terminates, whatever the rules say. Matching is exact
    (case-sensitive, like PostgreSQL names)."""

    roles: list[Identifier] = Field(
        default_factory=list,
        description="Never terminate sessions of these roles (pg_stat_activity.usename).",
    )
    applications: list[str] = Field(
        default_factory=list,
        description=(
            "Never terminate sessions with these application_name values "
            "(pg_stat_activity.application_name)."
        ),
    )
    databases: list[Identifier] = Field(
        default_factory=list,
        description=(
            "Never terminate sessions connected to these databases (pg_stat_activity.datname)."
        ),
    )
    client_cidrs: list[Cidr] = Field(
        default_factory=list,
        alias="clientCIDRs",
        description=(
            "Never terminate sessions whose pg_stat_activity.client_addr is in one of these "
            "networks (CIDR, IPv4 or IPv6). Unix-socket sessions have no address and are not "
            "matched by any CIDR."
        ),
    )
    superusers: bool = Field(
        default=True,
        description=(
            "Never terminate sessions of superuser roles (pg_roles.rolsuper); a session whose "
            "superuser status is unknown counts as a superuser."
        ),
    )
    listeners: bool = Field(
        default=True,
        description=(
            "Never terminate sessions whose last statement was LISTEN: they hold a notification "
            "channel subscription and look idle."
        ),
    )

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(text) for text in self.client_cidrs]


class RemediationSpec(PolicyModel):
    """What pgrelief does about pressure: terminate stale sessions and apply `limits`."""

    mode: Mode = Field(
        default="DryRun",
        description=(
            "Enforce: perform the actions. DryRun: plan and report every action (audit, Events) "
            "but change nothing. Off: no remediation at all (no terminations, no ALTER ROLE/"
            "DATABASE/SYSTEM); diagnosis and status still run."
        ),
    )
    only_under_pressure: bool = Field(
        default=True,
        description=(
            "Terminate sessions only while utilization is at or above pressure.warningPercent. "
            "Limits and timeouts are applied regardless."
        ),
    )
    terminate: TerminateSpec = Field(
        default_factory=TerminateSpec, description=TerminateSpec.__doc__
    )
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description=BudgetSpec.__doc__)
    protect: ProtectSpec = Field(default_factory=ProtectSpec, description=ProtectSpec.__doc__)


class ConnectionPolicySpec(PolicyModel):
    """Desired state: how to reach one PostgreSQL server, when it is under connection
    pressure, and what pgrelief may do about it."""

    postgres: PostgresSpec = Field(default_factory=PostgresSpec, description=PostgresSpec.__doc__)
    interval: IntervalDuration = Field(
        default="10s",
        description="Time between two observe -> diagnose -> plan -> act cycles (min 100ms).",
    )
    pressure: PressureSpec = Field(default_factory=PressureSpec, description=PressureSpec.__doc__)
    remediation: RemediationSpec = Field(
        default_factory=RemediationSpec, description=RemediationSpec.__doc__
    )
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description=LimitsSpec.__doc__)
    pgbouncer: PgBouncerSpec = Field(
        default_factory=PgBouncerSpec, description=PgBouncerSpec.__doc__
    )

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)


class ObjectMeta(BaseModel):
    """The Kubernetes object metadata pgrelief reads; everything else is kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)


class ConnectionPolicy(PolicyModel):
    """A ConnectionPolicy object as a user writes it (kubectl apply) or a policy file holds it."""

    api_version: ApiVersion = Field(
        default=API_VERSION_FULL, description=f"Always {API_VERSION_FULL}."
    )
    kind: Kind = Field(default=KIND, description=f"Always {KIND}.")
    metadata: ObjectMeta
    spec: ConnectionPolicySpec = Field(default_factory=ConnectionPolicySpec)
    status: ConnectionPolicyStatus | None = Field(
        default=None,
        description=(
            "Written by the operator; read back as the API server returns it. "
            "`pgrelief run` acts on the spec only."
        ),
    )
