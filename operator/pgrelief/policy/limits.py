"""The ``limits`` part of the spec: what pgrelief applies with ALTER ROLE, DATABASE and SYSTEM.

Kept apart from the rest of the spec because each field here maps to one PostgreSQL setting
or clause that ``plan`` turns into DDL (and, with ``onDelete: Revert``, back again).
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, field_validator, model_validator

from pgrelief.policy.fields import (
    INT4_MAX,
    LIST_BY_NAME,
    Identifier,
    MillisecondDuration,
    OnDelete,
    PolicyModel,
    reject_duplicates,
)


class RoleLimit(PolicyModel):
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
        le=INT4_MAX,
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
    transaction_timeout: MillisecondDuration | None = Field(
        default=None,
        description=(
            "ALTER ROLE ... SET transaction_timeout (PostgreSQL 17+; on older servers it is "
            "only recommended): the longest a transaction, or a statement outside one, may "
            "last; 0s disables it."
        ),
    )

    def settings(self) -> dict[str, str]:
        """PostgreSQL setting name -> policy duration, for the timeouts that are set."""
        wanted = {
            "idle_in_transaction_session_timeout": self.idle_in_transaction_session_timeout,
            "idle_session_timeout": self.idle_session_timeout,
            "statement_timeout": self.statement_timeout,
            "transaction_timeout": self.transaction_timeout,
        }
        return {name: value for name, value in wanted.items() if value is not None}


class DatabaseLimit(PolicyModel):
    """Per-database limit, applied with ALTER DATABASE."""

    name: Identifier = Field(
        description=(
            "Database name (pg_database.datname), exactly as in PostgreSQL (case-sensitive, "
            "at most 63 bytes of UTF-8; any characters)."
        )
    )
    connection_limit: int = Field(
        ge=-1,
        le=INT4_MAX,
        description=(
            "ALTER DATABASE ... CONNECTION LIMIT (pg_database.datconnlimit); -1 means no limit."
        ),
    )


class ServerLimits(PolicyModel):
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
    transaction_timeout: MillisecondDuration | None = Field(
        default=None,
        description=(
            "ALTER SYSTEM SET transaction_timeout (PostgreSQL 17+, reloadable; on older servers "
            "it is only recommended); 0s disables it."
        ),
    )
    tcp_keepalives_idle: int | None = Field(
        default=None,
        ge=0,
        le=INT4_MAX,
        description=(
            "ALTER SYSTEM SET tcp_keepalives_idle, in seconds (reloadable); 0 = OS default."
        ),
    )
    tcp_keepalives_interval: int | None = Field(
        default=None,
        ge=0,
        le=INT4_MAX,
        description=(
            "ALTER SYSTEM SET tcp_keepalives_interval, in seconds (reloadable); 0 = OS default."
        ),
    )
    tcp_keepalives_count: int | None = Field(
        default=None,
        ge=0,
        le=INT4_MAX,
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


class LimitsSpec(PolicyModel):
    """Durable limits and timeouts; pgrelief applies only what differs from the server and
    restores them when changed by hand (drift)."""

    roles: list[RoleLimit] = Field(
        default_factory=list,
        description="Per-role limits (ALTER ROLE); one entry per role.",
        json_schema_extra=LIST_BY_NAME,
    )
    databases: list[DatabaseLimit] = Field(
        default_factory=list,
        description="Per-database limits (ALTER DATABASE); one entry per database.",
        json_schema_extra=LIST_BY_NAME,
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
        reject_duplicates([role.name for role in roles], "role")
        return roles

    @field_validator("databases")
    @classmethod
    def _unique_databases(cls, databases: list[DatabaseLimit]) -> list[DatabaseLimit]:
        reject_duplicates([database.name for database in databases], "database")
        return databases
