"""The ConnectionPolicy object and its spec: how to reach a server, pressure, remediation,
PgBouncer (``limits`` has its own module).

Every field's description says which SQL clause or PostgreSQL/PgBouncer setting it maps to;
those descriptions are what ``kubectl explain connectionpolicy.spec`` shows.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgrelief.durations import parse_duration
from pgrelief.pgbouncer_ini import (
    DEFAULT_IMAGE,
    RESERVED_PGBOUNCER_KEYS,
    SETTING_SINCE,
    PoolMode,
    Version,
    image_version,
    parameter_problem,
    parse_version,
)
from pgrelief.policy.fields import (
    API_VERSION_FULL,
    KIND,
    LIST_OF_NAMES,
    MAX_PGBOUNCER_DATABASES,
    MAX_PGBOUNCER_PARAMETERS,
    MAX_PGBOUNCER_USERS,
    ApiVersion,
    Cidr,
    Identifier,
    IntervalDuration,
    Kind,
    Mode,
    Percent,
    PgBouncerKey,
    PolicyModel,
    PositiveDuration,
    SslMode,
    reject_duplicates,
)
from pgrelief.policy.limits import LimitsSpec
from pgrelief.policy.status import ConnectionPolicyStatus
from pgrelief.pool_budget import MAX_OPEN_FILES


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


class SecretKey(PolicyModel):
    """One key of a Kubernetes Secret in the policy's namespace."""

    name: str = Field(
        min_length=1, description="Name of the Secret (same namespace as the policy)."
    )
    key: str = Field(min_length=1, description="Key in the Secret.")


class AuthQuerySpec(PolicyModel):
    """Clients authenticate against the server's own passwords: PgBouncer logs in as a lookup
    role and calls a SECURITY DEFINER function a DBA installs (pgbouncer.ini auth_user,
    auth_query, auth_dbname). The function's SQL is in the PgBouncerReady condition while it
    is missing."""

    user: PgBouncerKey = Field(
        description=(
            "The lookup role PgBouncer logs in as to run auth_query (pgbouncer.ini auth_user)."
        )
    )
    password_secret: SecretKey = Field(
        description=(
            "Secret key holding the lookup role's password; written into the pod's auth_file "
            "at start-up, never into the ConfigMap."
        )
    )
    schema_name: Identifier = Field(
        default="pgbouncer",
        alias="schema",
        description="Schema of the lookup function (pgbouncer.ini auth_query).",
    )
    function: Identifier = Field(
        default="get_auth",
        description=(
            "Name of the lookup function, called as <schema>.<function>($1) (pgbouncer.ini "
            "auth_query)."
        ),
    )
    database: PgBouncerKey | None = Field(
        default=None,
        description=(
            "Database, one of pgbouncer.databases, whose function PgBouncer calls "
            "(pgbouncer.ini auth_dbname, PgBouncer 1.20+); absent = the first of "
            "pgbouncer.databases. Older PgBouncer calls it in the database the client asks "
            "for, so the function must exist in every database."
        ),
    )


class PgBouncerAuthSpec(PolicyModel):
    """How PgBouncer checks client passwords without pgrelief storing them: auth_query through
    a lookup role, or a userlist file from a Secret the user keeps (exactly one)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.authQuery) && has(self.userlistSecret))",
                    "message": "set authQuery or userlistSecret, not both",
                }
            ]
        }
    )

    type: Literal["scram-sha-256", "md5"] = Field(
        default="scram-sha-256",
        description=(
            "pgbouncer.ini auth_type. md5 also accepts SCRAM secrets (and then uses SCRAM); "
            "scram-sha-256 refuses md5 ones."
        ),
    )
    auth_query: AuthQuerySpec | None = Field(default=None, description=AuthQuerySpec.__doc__)
    userlist_secret: SecretKey | None = Field(
        default=None,
        description=(
            'Secret key holding a complete userlist.txt ("user" "password-or-SCRAM-secret" '
            "per line), mounted as pgbouncer.ini auth_file."
        ),
    )


class PgBouncerResources(PolicyModel):
    """The PgBouncer container's resources (Kubernetes container resources)."""

    requests: dict[str, str] = Field(
        default_factory=lambda: {"cpu": "100m", "memory": "64Mi"},
        description="resources.requests of the pgbouncer container.",
    )
    limits: dict[str, str] = Field(
        default_factory=lambda: {"memory": "256Mi"},
        description=(
            "resources.limits of the pgbouncer container (no CPU limit by default: throttling "
            "a proxy adds latency to every query)."
        ),
    )


class PgBouncerSpec(PolicyModel):
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
        default=2000,
        ge=1,
        le=MAX_OPEN_FILES,
        description=(
            "pgbouncer.ini max_client_conn (per replica). The pod raises its open-files limit "
            "to fit it; one the container runtime cannot give is refused."
        ),
    )
    default_pool_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description=(
            "pgbouncer.ini default_pool_size (server connections per user/database pair and "
            "replica); absent = computed from usable slots and replicas. One that does not fit "
            "the server's usable slots is refused (PoolOversubscribed)."
        ),
    )
    reserve_pool_size: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="pgbouncer.ini reserve_pool_size (extra connections in spikes).",
    )
    databases: list[PgBouncerKey] = Field(
        default_factory=list,
        max_length=MAX_PGBOUNCER_DATABASES,
        json_schema_extra=LIST_OF_NAMES,
        description=(
            "pgbouncer.ini [databases]: one entry `<name> = host=<postgres.host> "
            "port=<postgres.port> dbname=<name>` each; clients use the same database name "
            "through PgBouncer. Required when enabled."
        ),
    )
    users: list[Identifier] = Field(
        default_factory=list,
        max_length=MAX_PGBOUNCER_USERS,
        json_schema_extra=LIST_OF_NAMES,
        description=(
            "Roles clients log in as through PgBouncer: each (database, user) pair is a pool "
            "of default_pool_size + reserve_pool_size server connections per replica, counted "
            "against the server's usable slots and the role's CONNECTION LIMIT. Roles not "
            "listed still log in and share pgbouncer.ini max_db_connections; absent = one pool "
            "per database is budgeted."
        ),
    )
    direct_connections: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description=(
            "Server connections kept out of the pools for clients that bypass PgBouncer "
            "(migrations, session-mode workers, admin tools); with pgrelief's own connection and "
            "the superuser sessions seen, the headroom the pools leave free."
        ),
    )
    auth: PgBouncerAuthSpec = Field(
        default_factory=PgBouncerAuthSpec, description=PgBouncerAuthSpec.__doc__
    )
    server_tls_ca_secret: SecretKey | None = Field(
        default=None,
        alias="serverTLSCASecret",
        description=(
            "Secret key with the CA certificate that signs the server's certificate "
            "(pgbouncer.ini server_tls_ca_file); pgbouncer.ini server_tls_sslmode follows "
            "postgres.sslMode."
        ),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "PgBouncer container image; absent = the operator's default. It must have /bin/sh "
            "and pgbouncer on its PATH and run as a non-root user."
        ),
    )
    version: str | None = Field(
        default=None,
        pattern=r"^v?[0-9]+\.[0-9]+(\.[0-9]+)?$",
        description=(
            "PgBouncer release the image runs, e.g. 1.24; it decides which pgbouncer.ini "
            "settings may be written (max_prepared_statements needs 1.21). Absent = read from "
            "the image tag."
        ),
    )
    run_as_user: int = Field(
        default=998,
        ge=1,
        description=(
            "Pod securityContext.runAsUser (non-root; 998 is the default image's pgbouncer user)."
        ),
    )
    run_as_group: int = Field(
        default=996, ge=1, description="Pod securityContext.runAsGroup and fsGroup."
    )
    resources: PgBouncerResources = Field(
        default_factory=PgBouncerResources, description=PgBouncerResources.__doc__
    )
    termination_grace_period_seconds: int = Field(
        default=60,
        ge=10,
        le=3600,
        description=(
            "Pod terminationGracePeriodSeconds: how long a stopping pod lets clients finish "
            "(PgBouncer 1.23+ treats SIGTERM as SHUTDOWN WAIT_FOR_CLIENTS) before it is killed."
        ),
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
            "pgrelief owns (pool sizes, listen address, auth, TLS, files) are rejected, and so "
            "are settings newer than the image's PgBouncer."
        ),
    )

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, parameters: dict[str, str]) -> dict[str, str]:
        for key, value in parameters.items():
            problem = parameter_problem(key, value)
            if problem is not None:
                raise ValueError(problem)
        return parameters

    @field_validator("version")
    @classmethod
    def _version(cls, version: str | None) -> str | None:
        if version is not None:
            parse_version(version)
        return version

    def resolved_version(self, default_image: str = DEFAULT_IMAGE) -> Version | None:
        """The PgBouncer release the pods run: ``version``, else the image tag's (None when
        neither says)."""
        if self.version is not None:
            return parse_version(self.version)
        return image_version(self.image or default_image)

    @model_validator(mode="after")
    def _consistent(self) -> PgBouncerSpec:
        version = self.resolved_version()
        if version is None:
            raise ValueError(
                f"cannot tell the PgBouncer version of image {self.image!r} from its tag; "
                "set pgbouncer.version"
            )
        for key, value in self.parameters.items():
            problem = parameter_problem(key, value, version)
            if problem is not None:
                raise ValueError(f"parameters: {problem}")
        query = self.auth.auth_query
        if query is not None and query.database is not None:
            if query.database not in self.databases:
                raise ValueError(
                    f"auth.authQuery.database {query.database!r} is not one of pgbouncer.databases"
                )
            if version < SETTING_SINCE["auth_dbname"]:
                raise ValueError(
                    "auth.authQuery.database needs PgBouncer 1.20 (auth_dbname); older releases "
                    "call the function in every database"
                )
        reject_duplicates(self.databases, "pgbouncer database")
        reject_duplicates(self.users, "pgbouncer user")
        if self.enabled:
            if not self.databases:
                raise ValueError("databases: list the databases clients reach through PgBouncer")
            if (query is None) == (self.auth.userlist_secret is None):
                raise ValueError(
                    "auth: set exactly one of authQuery (a lookup role) or userlistSecret"
                )
        return self


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
