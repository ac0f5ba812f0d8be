"""The ``pgbouncer`` section: the PgBouncer Deployment + ConfigMap the operator reconciles.

Every field names the pgbouncer.ini key or the pod field it maps to. What PgBouncer itself
would refuse is refused here already, with the field's path: a reserved or too-new setting in
``parameters``, a database name its ini parser cannot read, an image whose release cannot be
told; an enabled section needs its databases and exactly one way to check passwords.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

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
    LIST_OF_NAMES,
    MAX_PGBOUNCER_DATABASES,
    MAX_PGBOUNCER_PARAMETERS,
    MAX_PGBOUNCER_USERS,
    Identifier,
    PgBouncerKey,
    PolicyModel,
    reject_duplicates,
)
from pgrelief.pool_budget import MAX_OPEN_FILES


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
