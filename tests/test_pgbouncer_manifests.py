"""The PgBouncer objects as data: what each carries, and what a spec change does to them.

These are the pure builders' contracts; tests/test_pgbouncer_pods.py runs the same objects
with the real pgbouncer, and tests/kube/test_pgbouncer_manifests.py has the API server accept
them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgrelief.manifests.common import SPEC_HASH, Owner, object_name, spec_hash
from pgrelief.manifests.pgbouncer import (
    CONFIG_HASH,
    CONFIG_INVALID,
    POOL_OVERSUBSCRIBED,
    PRESTOP_SLEEP_S,
    NotApplied,
    PgBouncerObjects,
    applied_default_pool_size,
    desired_pgbouncer,
)
from pgrelief.manifests.pgbouncer_config import ServerInputs
from pgrelief.pgbouncer_auth import (
    AuthFunctionCheck,
    auth_condition,
    auth_databases,
    auth_query_text,
    install_sql,
)
from pgrelief.pgbouncer_ini import DEFAULT_IMAGE, DEFAULT_LISTEN_PORT
from pgrelief.policy import ConnectionPolicySpec, PolicyError, validate_spec
from tests.factories import database as database_info
from tests.factories import role, session, snapshot

OWNER = Owner(name="orders", namespace="prod", uid="0b5f7a6e-1111-4222-8333-444455556666")
SERVER = ServerInputs(usable_slots=97)
PASSWORD = "s3cr3t-never-in-a-manifest"


def _spec(*, postgres: dict[str, Any] | None = None, **pgbouncer: Any) -> ConnectionPolicySpec:
    section: dict[str, Any] = {
        "enabled": True,
        "databases": ["orders"],
        "users": ["orders_app"],
        "auth": {
            "authQuery": {
                "user": "pgbouncer_auth",
                "passwordSecret": {"name": "orders-pgbouncer", "key": "password"},
            }
        },
    }
    section.update(pgbouncer)
    return validate_spec(
        {"postgres": postgres or {"host": "orders-db-rw.prod.svc"}, "pgbouncer": section}
    )


def _objects(spec: ConnectionPolicySpec | None = None, **kwargs: Any) -> PgBouncerObjects:
    result = desired_pgbouncer(OWNER, spec or _spec(), SERVER, **kwargs)
    assert isinstance(result, PgBouncerObjects), result
    return result


def _ini(objects: PgBouncerObjects) -> str:
    text: str = objects.config_map["data"]["pgbouncer.ini"]
    return text


def _container(objects: PgBouncerObjects) -> dict[str, Any]:
    (container,) = objects.deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_a_disabled_section_wants_no_objects() -> None:
    assert desired_pgbouncer(OWNER, validate_spec({}), SERVER) is None


def test_four_objects_share_name_namespace_labels_and_owner() -> None:
    objects = _objects()
    kinds = [manifest["kind"] for manifest in objects.all()]
    assert kinds == ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]
    for manifest in objects.all():
        meta = manifest["metadata"]
        assert meta["name"] == "orders-pgbouncer"
        assert meta["namespace"] == "prod"
        assert meta["labels"] == {
            "app.kubernetes.io/name": "pgbouncer",
            "app.kubernetes.io/instance": "orders-pgbouncer",
            "app.kubernetes.io/component": "connection-pooler",
            "app.kubernetes.io/managed-by": "pgrelief",
        }
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "pgrelief.dev/v1alpha1",
                "kind": "ConnectionPolicy",
                "name": "orders",
                "uid": OWNER.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["annotations"][SPEC_HASH] == spec_hash(manifest)
    selector = {
        "app.kubernetes.io/name": "pgbouncer",
        "app.kubernetes.io/instance": "orders-pgbouncer",
    }
    deployment = objects.deployment["spec"]
    assert deployment["selector"] == {"matchLabels": selector}
    assert selector.items() <= deployment["template"]["metadata"]["labels"].items()
    assert objects.service["spec"]["selector"] == selector
    assert objects.pod_disruption_budget["spec"]["selector"] == {"matchLabels": selector}


def test_the_pod_is_locked_down() -> None:
    objects = _objects()
    pod = objects.deployment["spec"]["template"]["spec"]
    container = _container(objects)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 998,
        "runAsGroup": 996,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # The only writable place is a small memory volume for the generated userlist.
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable == [{"name": "run", "mountPath": "/var/run/pgbouncer"}]
    assert "unix_socket_dir =" in _ini(objects).splitlines()  # nothing written to /tmp
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }


def test_image_readiness_rollout_and_drain() -> None:
    objects = _objects()
    container = _container(objects)
    assert container["image"] == DEFAULT_IMAGE
    assert container["ports"] == [
        {"name": "pgbouncer", "containerPort": DEFAULT_LISTEN_PORT, "protocol": "TCP"}
    ]
    assert f"listen_port = {DEFAULT_LISTEN_PORT}" in _ini(objects).splitlines()
    assert container["readinessProbe"]["tcpSocket"] == {"port": "pgbouncer"}
    spec = objects.deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "/bin/sh",
        "-c",
        f"sleep {PRESTOP_SLEEP_S}",
    ]
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_SLEEP_S
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert container["command"][2].endswith("exec pgbouncer /etc/pgbouncer/pgbouncer.ini\n")
    custom = _objects(
        _spec(image="registry.example/pgbouncer:1.23.1", terminationGracePeriodSeconds=120)
    )
    assert _container(custom)["image"] == "registry.example/pgbouncer:1.23.1"
    assert custom.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert _objects(default_image="mirror.example/pgbouncer:1.25.0").version == (1, 25)
    service = objects.service["spec"]
    assert service["ports"] == [
        {"name": "pgbouncer", "port": 5432, "targetPort": "pgbouncer", "protocol": "TCP"}
    ]
    assert objects.pod_disruption_budget["spec"]["maxUnavailable"] == 1


def test_the_config_checksum_rolls_the_pods_only_when_the_ini_changes() -> None:
    base = _objects()
    checksum = base.deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH]
    assert checksum == hashlib.sha256(_ini(base).encode()).hexdigest()
    edited = _objects(_spec(parameters={"server_idle_timeout": "600"}))
    assert "server_idle_timeout = 600" in _ini(edited).splitlines()
    assert edited.deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH] != checksum
    assert (
        edited.config_map["metadata"]["annotations"][SPEC_HASH]
        != base.config_map["metadata"]["annotations"][SPEC_HASH]
    )
    scaled = _objects(_spec(replicas=3, defaultPoolSize=10))
    same_ini = _objects(_spec(replicas=2, defaultPoolSize=10))
    # The ini says nothing about replicas: scaling does not restart the running pods...
    assert _ini(scaled) == _ini(same_ini)
    # ...but the Deployment changes, and so does its spec-hash.
    assert (
        scaled.deployment["metadata"]["annotations"][SPEC_HASH]
        != same_ini.deployment["metadata"]["annotations"][SPEC_HASH]
    )


def test_the_ini_points_at_the_server_with_the_budgets_sizes() -> None:
    objects = _objects(
        _spec(postgres={"host": "db.internal", "port": 6543, "sslMode": "verify-full"})
    )
    lines = _ini(objects).splitlines()
    budget = objects.budget
    assert "orders = host=db.internal port=6543 dbname=orders" in lines
    assert f"default_pool_size = {budget.default_pool_size}" in lines
    assert f"reserve_pool_size = {budget.reserve_pool_size}" in lines
    assert f"max_db_connections = {budget.max_db_connections}" in lines
    assert "max_client_conn = 2000" in lines
    assert "server_tls_sslmode = verify-full" in lines
    assert "pool_mode = transaction" in lines
    assert "max_prepared_statements = 200" in lines  # the default image is 1.21+
    assert "; point host= at your PostgreSQL server" not in lines


def test_auth_query_keeps_the_password_in_the_secret() -> None:
    objects = _objects()
    lines = _ini(objects).splitlines()
    assert "auth_type = scram-sha-256" in lines
    assert "auth_file = /var/run/pgbouncer/userlist.txt" in lines
    assert "auth_user = pgbouncer_auth" in lines
    assert "auth_query = SELECT usename, passwd FROM pgbouncer.get_auth($1)" in lines
    assert "auth_dbname = orders" in lines
    assert "pgbouncer_auth = max_user_connections=1" in lines
    container = _container(objects)
    assert container["env"] == [
        {"name": "PGRELIEF_AUTH_USER", "value": "pgbouncer_auth"},
        {
            "name": "PGRELIEF_AUTH_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "orders-pgbouncer", "key": "password"}},
        },
    ]
    assert "/var/run/pgbouncer/userlist.txt" in container["command"][2]


def test_a_userlist_secret_and_a_server_ca_are_projected_next_to_the_ini() -> None:
    spec = _spec(
        auth={"type": "md5", "userlistSecret": {"name": "pooler-users", "key": "userlist.txt"}},
        serverTLSCASecret={"name": "orders-ca", "key": "ca.crt"},
    )
    objects = _objects(spec)
    lines = _ini(objects).splitlines()
    assert "auth_type = md5" in lines
    assert "auth_file = /etc/pgbouncer/userlist.txt" in lines
    assert "server_tls_ca_file = /etc/pgbouncer/server-ca.crt" in lines
    assert not any(line.startswith("auth_user") for line in lines)
    (config,) = [
        v
        for v in objects.deployment["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "config"
    ]
    assert config["projected"]["sources"] == [
        {
            "configMap": {
                "name": "orders-pgbouncer",
                "items": [{"key": "pgbouncer.ini", "path": "pgbouncer.ini"}],
            }
        },
        {
            "secret": {
                "name": "pooler-users",
                "items": [{"key": "userlist.txt", "path": "userlist.txt"}],
            }
        },
        {"secret": {"name": "orders-ca", "items": [{"key": "ca.crt", "path": "server-ca.crt"}]}},
    ]
    assert _container(objects)["env"] == []
    assert "userlist" not in _container(objects)["command"][2]


def test_the_start_script_raises_the_open_files_limit_to_what_the_config_needs() -> None:
    objects = _objects()
    script = _container(objects)["command"][2]
    assert f"need={objects.budget.open_files}\n" in script
    assert 'ulimit -S -n "$need"' in script
    assert objects.budget.open_files == 2000 + objects.budget.max_db_connections + 100


def test_an_oversubscribed_spec_builds_nothing_and_says_why() -> None:
    result = desired_pgbouncer(OWNER, _spec(defaultPoolSize=60), SERVER)
    assert isinstance(result, NotApplied)
    assert result.reason == POOL_OVERSUBSCRIBED
    assert result.budget is not None and result.budget.over_by == 2 * 66 - 96
    condition = result.condition()
    assert (condition.type, condition.status, condition.reason) == (
        "PgBouncerReady",
        "False",
        "PoolOversubscribed",
    )
    assert condition.message is not None
    assert condition.message.startswith("PgBouncer not applied: the pools need 132 server")
    assert "what fits: defaultPoolSize 42 or less" in condition.message
    note = result.note()
    assert (note.reason, note.type, note.message) == (
        "PoolOversubscribed",
        "Warning",
        condition.message,
    )


def test_role_and_database_limits_come_from_the_server_and_the_policy() -> None:
    spec = validate_spec(
        {
            "postgres": {"host": "db"},
            "limits": {"roles": [{"name": "orders_app", "connectionLimit": 30}]},
            "pgbouncer": _spec().pgbouncer.model_dump(by_alias=True, exclude_none=True)
            | {"defaultPoolSize": 20},
        }
    )
    result = desired_pgbouncer(OWNER, spec, SERVER)
    assert isinstance(result, NotApplied)
    assert "role 'orders_app' CONNECTION LIMIT 30" in result.message
    server = replace(SERVER, database_limits={"orders": 40})
    result = desired_pgbouncer(OWNER, _spec(defaultPoolSize=20), server)
    assert isinstance(result, NotApplied)
    assert "database 'orders' CONNECTION LIMIT 40" in result.message


def test_a_config_the_image_cannot_run_is_not_applied() -> None:
    unknown = desired_pgbouncer(OWNER, _spec(), SERVER, default_image="mirror.example/pgb:stable")
    assert isinstance(unknown, NotApplied) and unknown.reason == CONFIG_INVALID
    assert "set spec.pgbouncer.version" in unknown.message
    no_host = desired_pgbouncer(OWNER, _spec(postgres={"port": 5432}), SERVER)
    assert isinstance(no_host, NotApplied) and no_host.reason == CONFIG_INVALID
    assert "postgres.host is required" in no_host.message


def test_server_inputs_from_a_snapshot() -> None:
    superuser = replace(session(10, usename="postgres"), is_superuser=True)
    own = replace(session(11, usename="pgrelief"), is_superuser=True)
    snap = snapshot(
        [superuser, own, session(12)],
        max_connections=100,
        superuser_reserved=3,
        roles=[role("orders_app", 40)],
        databases=[database_info("orders", 90)],
        own_pid=11,
    )
    inputs = ServerInputs.from_snapshot(snap)
    assert inputs == ServerInputs(
        usable_slots=97,
        superuser_sessions=1,  # pgrelief's own session is the lifeline, counted once
        role_limits={"orders_app": 40},
        database_limits={"orders": 90},
    )


def test_a_computed_pool_size_is_read_back_from_the_live_config_map() -> None:
    objects = _objects()
    assert applied_default_pool_size(objects.config_map) == objects.budget.default_pool_size
    assert applied_default_pool_size(None) is None
    assert applied_default_pool_size({"data": {}}) is None
    # A superuser session appears: the computed size no longer fits and shrinks, once...
    busier = replace(SERVER, superuser_sessions=2)
    shrunk = desired_pgbouncer(
        OWNER, _spec(), busier, previous_default_pool_size=objects.budget.default_pool_size
    )
    assert isinstance(shrunk, PgBouncerObjects)
    assert shrunk.budget.default_pool_size == objects.budget.default_pool_size - 1
    # ...and when it leaves, the smaller size still fits and stays: the pods do not flap.
    calm = _objects(previous_default_pool_size=shrunk.budget.default_pool_size)
    assert _ini(calm) == _ini(shrunk)
    assert _objects().budget.default_pool_size == objects.budget.default_pool_size


def test_ready_follows_the_available_replicas() -> None:
    objects = _objects()
    assert objects.condition(1).status == "False"
    assert objects.condition(1).reason == "ReplicasUnavailable"
    ready = objects.condition(2)
    assert (ready.status, ready.reason) == ("True", "Available")
    note = objects.reconciled_note()
    assert (note.reason, note.type) == ("PgBouncerReconciled", "Normal")
    assert note.message.startswith("PgBouncer orders-pgbouncer: 96 server connections at most")


@pytest.mark.parametrize(
    "name",
    ["orders", "a" * 60, "db.prod.example", "9lives", "x" * 253],
)
def test_object_names_are_valid_service_names(name: str) -> None:
    made = object_name(name)
    assert len(made) <= 63
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", made)
    assert object_name(name) == made
    if name == "orders":
        assert made == "orders-pgbouncer"


def test_nothing_secret_is_in_any_manifest() -> None:
    objects = _objects()
    for manifest in objects.all():
        assert PASSWORD not in repr(manifest)


# --- the lookup function --------------------------------------------------------------------


def test_the_install_sql_is_what_a_dba_runs() -> None:
    query = _spec().pgbouncer.auth.auth_query
    assert query is not None
    assert auth_query_text(query) == "SELECT usename, passwd FROM pgbouncer.get_auth($1)"
    assert install_sql(query).splitlines() == [
        "create schema if not exists pgbouncer;",
        "create or replace function pgbouncer.get_auth(p_usename text) returns table (usename "
        "name, passwd text) language sql stable security definer set search_path = pg_catalog, "
        "pg_temp as $$ select s.usename, s.passwd from pg_catalog.pg_shadow s where s.usename = "
        "p_usename and not s.usesuper and (s.valuntil is null or s.valuntil > pg_catalog.now()) "
        "$$;",
        "revoke all on function pgbouncer.get_auth(text) from public;",
        "grant usage on schema pgbouncer to pgbouncer_auth;",
        "grant execute on function pgbouncer.get_auth(text) to pgbouncer_auth;",
    ]
    assert install_sql(query, create_role=True).startswith("create role pgbouncer_auth login;\n")


def test_the_function_is_needed_where_pgbouncer_calls_it() -> None:
    spec = _spec(databases=["orders", "billing"])
    assert auth_databases(spec.pgbouncer, (1, 24)) == ("orders",)
    assert auth_databases(spec.pgbouncer, (1, 18)) == ("orders", "billing")
    assert (
        auth_databases(_spec(auth={"userlistSecret": {"name": "u", "key": "k"}}).pgbouncer, (1, 24))
        == ()
    )


def test_a_missing_role_or_function_is_one_condition_for_every_database() -> None:
    query = _spec().pgbouncer.auth.auth_query
    assert query is not None
    ready = AuthFunctionCheck("orders", True, True, True, True, True, True)
    assert auth_condition([ready], query) is None
    no_role = AuthFunctionCheck("billing", False, False, True, True, True, False)
    not_definer = AuthFunctionCheck("orders", True, True, True, False, False, True)
    condition = auth_condition([not_definer, no_role], query)
    assert condition is not None and condition.reason == "AuthFunctionMissing"
    assert condition.message is not None
    assert condition.message.startswith(
        "auth_query cannot log anyone in: in database 'orders': function "
        "pgbouncer.get_auth(text) is not SECURITY DEFINER, function pgbouncer.get_auth(text) is "
        "not owned by a superuser (pg_shadow needs one); in database 'billing': role "
        "'pgbouncer_auth' does not exist."
    )
    assert "create role pgbouncer_auth login;" in condition.message
    assert condition.message.endswith(
        "-- then set role pgbouncer_auth's password to the one in Secret 'orders-pgbouncer' key "
        "'password'"
    )


# --- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pgbouncer", "message"),
    [
        ({"enabled": True}, "databases: list the databases"),
        (
            {"enabled": True, "databases": ["a"]},
            "auth: set exactly one of authQuery (a lookup role) or userlistSecret",
        ),
        ({"databases": ["my db"]}, "cannot be a pgbouncer.ini key"),
        ({"databases": ["a", "a"]}, "'a' is listed more than once"),
        (
            {"version": "1.18", "parameters": {"max_prepared_statements": "10"}},
            "'max_prepared_statements' needs PgBouncer 1.21 or later; the image runs 1.18",
        ),
        ({"image": "mirror/pgbouncer:stable"}, "set pgbouncer.version"),
        (
            {
                "databases": ["a"],
                "auth": {
                    "authQuery": {
                        "user": "lookup",
                        "passwordSecret": {"name": "s", "key": "k"},
                        "database": "b",
                    }
                },
            },
            "auth.authQuery.database 'b' is not one of pgbouncer.databases",
        ),
        ({"parameters": {"max_db_connections": "500"}}, "'max_db_connections' is set by pgrelief"),
    ],
)
def test_the_spec_refuses_what_the_pooler_could_not_run(
    pgbouncer: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        validate_spec({"pgbouncer": pgbouncer})


# --- the property that matters, on the text PgBouncer reads ---------------------------------


@settings(max_examples=200, deadline=None)
@given(
    usable=st.integers(min_value=0, max_value=400),
    superusers=st.integers(min_value=0, max_value=10),
    replicas=st.integers(min_value=1, max_value=6),
    databases=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, unique=True),
    users=st.lists(st.sampled_from(["u1", "u2", "u3"]), unique=True),
    default=st.none() | st.integers(min_value=1, max_value=80),
    reserve=st.integers(min_value=0, max_value=10),
    direct=st.integers(min_value=0, max_value=50),
    auth_query=st.booleans(),
)
def test_no_config_that_could_exhaust_the_server_is_ever_built(
    usable: int,
    superusers: int,
    replicas: int,
    databases: list[str],
    users: list[str],
    default: int | None,
    reserve: int,
    direct: int,
    auth_query: bool,
) -> None:
    auth: dict[str, Any] = (
        {"authQuery": {"user": "lookup", "passwordSecret": {"name": "s", "key": "k"}}}
        if auth_query
        else {"userlistSecret": {"name": "s", "key": "k"}}
    )
    spec = _spec(
        replicas=replicas,
        databases=databases,
        users=users,
        reservePoolSize=reserve,
        directConnections=direct,
        auth=auth,
        **({} if default is None else {"defaultPoolSize": default}),
    )
    server = ServerInputs(usable_slots=usable, superuser_sessions=superusers)
    result = desired_pgbouncer(OWNER, spec, server)
    if isinstance(result, NotApplied):
        assert result.reason == POOL_OVERSUBSCRIBED
        return
    assert isinstance(result, PgBouncerObjects)
    ini = _ini(result)
    # What PgBouncer will read: a per-database cap, one line per database.
    cap = int(re.search(r"^max_db_connections = (\d+)$", ini, re.M).group(1))  # type: ignore[union-attr]
    entries = [d for d in databases if re.search(rf"^{d} = host=", ini, re.M)]
    assert entries == databases
    pods = result.deployment["spec"]["replicas"]
    assert pods * len(entries) * cap <= usable - 1 - superusers - direct
