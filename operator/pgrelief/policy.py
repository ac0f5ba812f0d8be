"""The ConnectionPolicy: what pgrelief may do to one PostgreSQL server, as one validated model.

This pydantic model is the single source of truth for the policy: ``pgrelief run`` reads it
from a file, the operator from the custom resource, and the CRD's OpenAPI schema is generated
from it (``pgrelief.crd``), so the three can never disagree about a field. Field names are a
contract (DESIGN.md): camelCase in YAML, snake_case in Python. Every field's description says
which SQL clause or PostgreSQL/PgBouncer setting it maps to; those descriptions are what
``kubectl explain connectionpolicy.spec`` shows.

The model is strict on purpose: an unknown field, a float where an integer is expected or a
duration without a unit is an error, because a typo in a safety policy silently ignored is a
policy that does not protect what its author thinks it protects.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pgrelief.durations import DurationError, parse_duration
from pgrelief.errors import PgreliefError

API_GROUP = "pgrelief.dev"
API_VERSION = "v1alpha1"
KIND = "ConnectionPolicy"
API_VERSION_FULL = f"{API_GROUP}/{API_VERSION}"

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a longer name in a policy would
# silently address a different (truncated) role, so it is refused instead.
MAX_IDENTIFIER_BYTES = 63
_INT4_MAX = 2**31 - 1

# The same grammar as pgrelief.durations.parse_duration, for the API server's own validation.
DURATION_PATTERN = r"^ *([0-9]+(\.[0-9]+)? *(ms|min|s|m|h|d) *)+$"

# pgbouncer.ini keys pgrelief writes itself: letting a policy set them would break the
# Deployment pgrelief reconciles (listening address, auth wiring, files inside the container)
# or contradict the dedicated spec fields.
RESERVED_PGBOUNCER_KEYS: frozenset[str] = frozenset(
    {
        "pool_mode",
        "max_client_conn",
        "default_pool_size",
        "reserve_pool_size",
        "listen_addr",
        "listen_port",
        "listen_backlog",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
        "auth_type",
        "auth_file",
        "auth_hba_file",
        "auth_query",
        "auth_user",
        "auth_dbname",
        "admin_users",
        "stats_users",
        "logfile",
        "pidfile",
        "user",
        "conffile",
        "service_name",
        "job_name",
        "so_reuseport",
        "peer_id",
    }
)
_PGBOUNCER_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")


def _check_duration(text: str) -> str:
    try:
        parse_duration(text)
    except DurationError as error:
        raise ValueError(str(error)) from None
    return text


def _check_positive_duration(text: str) -> str:
    if parse_duration(_check_duration(text)) <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return text


def _check_interval(text: str) -> str:
    if parse_duration(_check_duration(text)) < 0.1:
        raise ValueError(f"interval {text!r} is too short; the minimum is 100ms")
    return text


def _check_milliseconds(text: str) -> str:
    # These map to PostgreSQL settings whose unit is the millisecond: a fraction of one would
    # be rounded by the server and then never compare equal to what the policy says.
    seconds = parse_duration(_check_duration(text))
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError(f"duration {text!r} must be a whole number of milliseconds")
    if round(seconds * 1000) > _INT4_MAX:
        raise ValueError(f"duration {text!r} is longer than PostgreSQL accepts (about 24 days)")
    return text


def _check_identifier(name: str) -> str:
    if not name:
        raise ValueError("name must not be empty")
    if "\x00" in name:
        raise ValueError("name must not contain a NUL character")
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"name is {size} bytes in UTF-8; PostgreSQL names are at most "
            f"{MAX_IDENTIFIER_BYTES} bytes (longer ones are truncated)"
        )
    return name


def _check_cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network in CIDR notation: {error}") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
    return text


_DURATION_SCHEMA = WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN})

Duration = Annotated[str, AfterValidator(_check_duration), _DURATION_SCHEMA]
"""A duration string as ``pgrelief.durations.parse_duration`` reads it: 250ms, 10s, 5m, 1h."""
PositiveDuration = Annotated[str, AfterValidator(_check_positive_duration), _DURATION_SCHEMA]
IntervalDuration = Annotated[str, AfterValidator(_check_interval), _DURATION_SCHEMA]
MillisecondDuration = Annotated[str, AfterValidator(_check_milliseconds), _DURATION_SCHEMA]
Identifier = Annotated[
    str,
    AfterValidator(_check_identifier),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_BYTES}),
]
Cidr = Annotated[str, AfterValidator(_check_cidr)]
Percent = Annotated[int, Field(ge=1, le=100)]

Mode = Literal["Enforce", "DryRun", "Off"]
OnDelete = Literal["Keep", "Revert"]
PoolMode = Literal["transaction", "session", "statement"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


# Lists keyed by name: the API server itself rejects two entries for the same role/database.
_LIST_BY_NAME: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["name"],
}
# Keeps the CEL rule below within the API server's cost budget.
MAX_PGBOUNCER_PARAMETERS = 100


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
        use_attribute_docstrings=False,
    )


def _reject_duplicates(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is listed more than once")
        seen.add(name)


class CredentialsSecret(_Model):
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


class PostgresSpec(_Model):
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


class PressureSpec(_Model):
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


class TerminateSpec(_Model):
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


class BudgetSpec(_Model):
    """The most terminations pgrelief performs, whatever the rules match."""

    max_per_cycle: int = Field(
        default=10,
        ge=0,
        description="Most sessions terminated in one cycle (0 disables terminations).",
    )
    max_per_hour: int = Field(
        default=100, ge=0, description="Most sessions terminated in any sliding window of one hour."
    )


class ProtectSpec(_Model):
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


class RemediationSpec(_Model):
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


class RoleLimit(_Model):
    """Per-role limits, applied with ALTER ROLE. An absent field is left as the server has it."""

    name: Identifier = Field(
        description=(
            "Role name (pg_roles.rolname), exactly as in PostgreSQL (case-sensitive, at most "
            "63 bytes of UTF-8; any characters)."
        )
    )
    connection_limit: int | None = Field(
        default=None,
        ge=-1,
        le=_INT4_MAX,
        description="ALTER ROLE ... CONNECTION LIMIT (pg_roles.rolconnlimit); -1 means no limit.",
    )
    idle_in_transaction_session_timeout: MillisecondDuration | None = Field(
        default=None,
        description="ALTER ROLE ... SET idle_in_transaction_session_timeout; 0s disables it.",
    )
    idle_session_timeout: MillisecondDuration | None = Field(
        default=None,
        description="ALTER ROLE ... SET idle_session_timeout (PostgreSQL 14+); 0s disables it.",
    )
    statement_timeout: MillisecondDuration | None = Field(
        default=None, description="ALTER ROLE ... SET statement_timeout; 0s disables it."
    )

    def settings(self) -> dict[str, str]:
        """PostgreSQL setting name -> policy duration, for the timeouts that are set."""
        wanted = {
            "idle_in_transaction_session_timeout": self.idle_in_transaction_session_timeout,
            "idle_session_timeout": self.idle_session_timeout,
            "statement_timeout": self.statement_timeout,
        }
        return {name: value for name, value in wanted.items() if value is not None}


class DatabaseLimit(_Model):
    """Per-database limit, applied with ALTER DATABASE."""

    name: Identifier = Field(
        description=(
            "Database name (pg_database.datname), exactly as in PostgreSQL (case-sensitive, "
            "at most 63 bytes of UTF-8; any characters)."
        )
    )
    connection_limit: int = Field(
        ge=-1,
        le=_INT4_MAX,
        description=(
            "ALTER DATABASE ... CONNECTION LIMIT (pg_database.datconnlimit); -1 means no limit."
        ),
    )


class ServerLimits(_Model):
    """Server-wide settings. Reloadable ones are applied with ALTER SYSTEM SET and
    pg_reload_conf(); restart-only ones are only ever recommended."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!has(self.maxConnections) || "
                        "(has(self.superuserReservedConnections) ? "
                        "self.superuserReservedConnections : 0) + "
                        "(has(self.reservedConnections) ? self.reservedConnections : 0) "
                        "< self.maxConnections"
                    ),
                    "message": (
                        "superuserReservedConnections + reservedConnections must be lower "
                        "than maxConnections"
                    ),
                }
            ]
        }
    )

    idle_in_transaction_session_timeout: MillisecondDuration | None = Field(
        default=None,
        description=(
            "ALTER SYSTEM SET idle_in_transaction_session_timeout (reloadable); 0s disables it."
        ),
    )
    tcp_keepalives_idle: int | None = Field(
        default=None,
        ge=0,
        le=_INT4_MAX,
        description=(
            "ALTER SYSTEM SET tcp_keepalives_idle, in seconds (reloadable); 0 = OS default."
        ),
    )
    tcp_keepalives_interval: int | None = Field(
        default=None,
        ge=0,
        le=_INT4_MAX,
        description=(
            "ALTER SYSTEM SET tcp_keepalives_interval, in seconds (reloadable); 0 = OS default."
        ),
    )
    tcp_keepalives_count: int | None = Field(
        default=None,
        ge=0,
        le=_INT4_MAX,
        description="ALTER SYSTEM SET tcp_keepalives_count (reloadable); 0 = OS default.",
    )
    client_connection_check_interval: MillisecondDuration | None = Field(
        default=None,
        description=(
            "ALTER SYSTEM SET client_connection_check_interval (PostgreSQL 14+, reloadable); "
            "0s disables it."
        ),
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        le=262143,
        description="max_connections: needs a restart, so only ever recommended, never applied.",
    )
    superuser_reserved_connections: int | None = Field(
        default=None,
        ge=0,
        le=262143,
        description=(
            "superuser_reserved_connections: needs a restart, so only ever recommended, "
            "never applied."
        ),
    )
    reserved_connections: int | None = Field(
        default=None,
        ge=0,
        le=262143,
        description=(
            "reserved_connections (PostgreSQL 16+, slots for pg_use_reserved_connections): needs "
            "a restart, so only ever recommended, never applied."
        ),
    )

    @model_validator(mode="after")
    def _slots_left(self) -> ServerLimits:
        if self.max_connections is not None:
            reserved = (self.superuser_reserved_connections or 0) + (self.reserved_connections or 0)
            if reserved >= self.max_connections:
                raise ValueError(
                    f"superuserReservedConnections + reservedConnections ({reserved}) must be "
                    f"lower than maxConnections ({self.max_connections})"
                )
        return self


class LimitsSpec(_Model):
    """Durable limits and timeouts; pgrelief applies only what differs from the server and
    restores them when changed by hand (drift)."""

    roles: list[RoleLimit] = Field(
        default_factory=list,
        description="Per-role limits (ALTER ROLE); one entry per role.",
        json_schema_extra=_LIST_BY_NAME,
    )
    databases: list[DatabaseLimit] = Field(
        default_factory=list,
        description="Per-database limits (ALTER DATABASE); one entry per database.",
        json_schema_extra=_LIST_BY_NAME,
    )
    server: ServerLimits = Field(default_factory=ServerLimits, description=ServerLimits.__doc__)
    on_delete: OnDelete = Field(
        default="Keep",
        description=(
            "When the policy is deleted (or `pgrelief run --revert`): Keep the applied limits, "
            "or Revert them to the values found before pgrelief first changed them."
        ),
    )

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, roles: list[RoleLimit]) -> list[RoleLimit]:
        _reject_duplicates([role.name for role in roles], "role")
        return roles

    @field_validator("databases")
    @classmethod
    def _unique_databases(cls, databases: list[DatabaseLimit]) -> list[DatabaseLimit]:
        _reject_duplicates([database.name for database in databases], "database")
        return databases


class PgBouncerSpec(_Model):
    """A PgBouncer Deployment + ConfigMap the operator reconciles in front of the server
    (pgbouncer.ini settings)."""

    enabled: bool = Field(default=False, description="Run PgBouncer for this server.")
    replicas: int = Field(default=2, ge=1, le=100, description="Number of PgBouncer pods.")
    pool_mode: PoolMode = Field(
        default="transaction",
        description=(
            "pgbouncer.ini pool_mode. transaction multiplexes best; LISTEN/NOTIFY, session SET, "
            "advisory locks held across transactions need session."
        ),
    )
    max_client_conn: int = Field(
        default=2000, ge=1, le=1_000_000, description="pgbouncer.ini max_client_conn (per replica)."
    )
    default_pool_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description=(
            "pgbouncer.ini default_pool_size (server connections per user/database pair and "
            "replica); absent = computed from usable slots and replicas."
        ),
    )
    reserve_pool_size: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="pgbouncer.ini reserve_pool_size (extra connections in spikes).",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="PgBouncer container image; absent = the operator's default.",
    )
    parameters: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_PGBOUNCER_PARAMETERS,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(k, !(k in "
                    + repr(sorted(RESERVED_PGBOUNCER_KEYS)).replace('"', "'")
                    + "))",
                    "message": "keys pgrelief sets itself cannot be overridden: "
                    + ", ".join(sorted(RESERVED_PGBOUNCER_KEYS)),
                }
            ]
        },
        description=(
            'Further pgbouncer.ini [pgbouncer] settings, e.g. server_idle_timeout: "300". Keys '
            "pgrelief owns (pool sizes, listen address, auth, files) are rejected."
        ),
    )

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, parameters: dict[str, str]) -> dict[str, str]:
        for key, value in parameters.items():
            if not _PGBOUNCER_KEY.match(key):
                raise ValueError(
                    f"{key!r} is not a pgbouncer.ini setting name (lowercase letters, digits, _)"
                )
            if key in RESERVED_PGBOUNCER_KEYS:
                raise ValueError(
                    f"{key!r} is set by pgrelief and cannot be overridden; reserved keys: "
                    + ", ".join(sorted(RESERVED_PGBOUNCER_KEYS))
                )
            if any(ch in value for ch in "\r\n\x00"):
                raise ValueError(f"value of {key!r} must be a single line")
        return parameters


class ConnectionPolicySpec(_Model):
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


class ConnectionPolicy(_Model):
    """A ConnectionPolicy object as a user writes it (kubectl apply) or a policy file holds it."""

    api_version: Literal["pgrelief.dev/v1alpha1"] = Field(
        default="pgrelief.dev/v1alpha1", description="Always pgrelief.dev/v1alpha1."
    )
    kind: Literal["ConnectionPolicy"] = Field(
        default="ConnectionPolicy", description="Always ConnectionPolicy."
    )
    metadata: ObjectMeta
    spec: ConnectionPolicySpec = Field(default_factory=ConnectionPolicySpec)
    status: dict[str, Any] | None = Field(
        default=None, description="Written by the operator; ignored when a policy is loaded."
    )


# ---- status: written by the operator, schema generated into the CRD --------------------------


class Condition(_Model):
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
        default=None, description="When the condition last changed status (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class ConnectionPolicyStatus(_Model):
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
        default=None, description="When the last diagnosis was taken (RFC 3339)."
    )
    last_action_time: datetime | None = Field(
        default=None, description="When pgrelief last performed (or, in DryRun, planned) an action."
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
    originals: dict[str, str] | None = Field(
        default=None,
        description=(
            "Values found before pgrelief first changed a limit or setting, keyed "
            "role:<name>:<setting>, database:<name>:connection_limit or system:<setting>; "
            "an empty string means the setting was not set. Restored on delete when "
            "limits.onDelete is Revert."
        ),
    )


# ---- errors that name the field path as written in YAML ---------------------------------------


class PolicyError(PgreliefError):
    """A policy that cannot be used; the message names each bad field path and the reason."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f"invalid policy {source}: " if source else "invalid policy: "
        super().__init__(where + "; ".join(self.problems))


def validate_policy(data: Any, source: str | None = None) -> ConnectionPolicy:
    """A ConnectionPolicy from plain data (one parsed YAML document), or PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError([f"expected a mapping, got {_type_name(data)}"], source)
    try:
        return ConnectionPolicy.model_validate(data)
    except ValidationError as error:
        raise PolicyError(format_errors(error, ConnectionPolicy), source) from None


def validate_spec(data: Any, source: str | None = None) -> ConnectionPolicySpec:
    """The spec alone (the operator gets it from the custom resource), or PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError([f"spec: expected a mapping, got {_type_name(data)}"], source)
    try:
        return ConnectionPolicySpec.model_validate(data)
    except ValidationError as error:
        raise PolicyError(
            format_errors(error, ConnectionPolicySpec, prefix=("spec",)), source
        ) from None


def format_errors(
    error: ValidationError, model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[str]:
    """One ``path: reason`` line per pydantic error, paths spelled as in YAML."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        message = str(item["msg"])
        kind = item["type"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        elif kind == "extra_forbidden":
            message = _unknown_field_message(model, loc)
        elif kind == "missing":
            message = "required field is missing"
        elif kind in _SHOW_INPUT and _is_scalar(item.get("input")):
            message += f" (got {item['input']!r})"
            if kind == "string_type" and isinstance(item["input"], int | float):
                message += "; quote it, and give durations a unit, e.g. '10s'"
        line = f"{_path(prefix + loc)}: {message}"
        if line not in lines:
            lines.append(line)
    return lines


_SHOW_INPUT = frozenset(
    {"literal_error", "string_type", "int_type", "bool_type", "int_from_float", "dict_type"}
)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _path(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(document)"


def _unknown_field_message(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return "unknown field"
    allowed = [info.alias or name for name, info in parent.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field{hint} (allowed: {', '.join(allowed)})"


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    """The model class inside ``X | None`` or ``list[X]``, if any."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "an empty document"
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
