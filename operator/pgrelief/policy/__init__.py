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

The rooms: ``fields`` (API identity, field types and their checks, the strict base model),
``spec`` (the object and its spec), ``pgbouncer`` (the pooler section), ``limits`` (ALTER
ROLE/DATABASE/SYSTEM), ``status`` (what the operator writes back), ``errors`` (validation with
one line per bad field path). Import from here: the room a name lives in is not part of the
contract.
"""

from pgrelief.pgbouncer_ini import RESERVED_PGBOUNCER_KEYS, PoolMode
from pgrelief.policy.errors import PolicyError, format_errors, validate_policy, validate_spec
from pgrelief.policy.fields import (
    API_GROUP,
    API_VERSION,
    API_VERSION_FULL,
    DURATION_PATTERN,
    KIND,
    MAX_IDENTIFIER_BYTES,
    MAX_PGBOUNCER_PARAMETERS,
    Cidr,
    Duration,
    Identifier,
    IntervalDuration,
    MillisecondDuration,
    Mode,
    OnDelete,
    Percent,
    PgBouncerKey,
    PositiveDuration,
    SslMode,
)
from pgrelief.policy.limits import DatabaseLimit, LimitsSpec, RoleLimit, ServerLimits
from pgrelief.policy.pgbouncer import (
    AuthQuerySpec,
    PgBouncerAuthSpec,
    PgBouncerResources,
    PgBouncerSpec,
    SecretKey,
)
from pgrelief.policy.spec import (
    BudgetSpec,
    ConnectionPolicy,
    ConnectionPolicySpec,
    CredentialsSecret,
    ObjectMeta,
    PostgresSpec,
    PressureSpec,
    ProtectSpec,
    RemediationSpec,
    TerminateSpec,
)
from pgrelief.policy.status import (
    MAX_RECENT_ACTIONS,
    MAX_STATUS_FINDINGS,
    Condition,
    ConnectionPolicyStatus,
    RecentAction,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "API_VERSION_FULL",
    "DURATION_PATTERN",
    "KIND",
    "MAX_IDENTIFIER_BYTES",
    "MAX_PGBOUNCER_PARAMETERS",
    "MAX_RECENT_ACTIONS",
    "MAX_STATUS_FINDINGS",
    "RESERVED_PGBOUNCER_KEYS",
    "AuthQuerySpec",
    "BudgetSpec",
    "Cidr",
    "Condition",
    "ConnectionPolicy",
    "ConnectionPolicySpec",
    "ConnectionPolicyStatus",
    "CredentialsSecret",
    "DatabaseLimit",
    "Duration",
    "Identifier",
    "IntervalDuration",
    "LimitsSpec",
    "MillisecondDuration",
    "Mode",
    "ObjectMeta",
    "OnDelete",
    "Percent",
    "PgBouncerAuthSpec",
    "PgBouncerKey",
    "PgBouncerResources",
    "PgBouncerSpec",
    "PolicyError",
    "PoolMode",
    "PositiveDuration",
    "PostgresSpec",
    "PressureSpec",
    "ProtectSpec",
    "RecentAction",
    "RemediationSpec",
    "RoleLimit",
    "SecretKey",
    "ServerLimits",
    "SslMode",
    "TerminateSpec",
    "format_errors",
    "validate_policy",
    "validate_spec",
]
