"""The ConnectionPolicy model and policy files: valid policies load with the documented
defaults; invalid ones are refused with one line per problem naming the YAML field path."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgrelief.errors import PgreliefError
from pgrelief.policy import (
    API_GROUP,
    API_VERSION,
    API_VERSION_FULL,
    KIND,
    RESERVED_PGBOUNCER_KEYS,
    ConnectionPolicy,
    ConnectionPolicyStatus,
    ObjectMeta,
    PolicyError,
    validate_policy,
    validate_spec,
)
from pgrelief.policy_file import load_policy, parse_policy

REPO = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((REPO / "policies").glob("*.yaml"))

# The example from DESIGN.md, verbatim: the contract users write against.
DESIGN_EXAMPLE = """
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {name: orders-db, namespace: prod}
spec:
  postgres:                      # how to reach the server (the CLI's --dsn overrides it)
    host: orders-db-rw.prod.svc
    port: 5432
    database: postgres
    sslMode: prefer
    credentialsSecret: {name: orders-db-pgrelief, usernameKey: username, passwordKey: password}
  interval: 10s                  # durations are strings: 250ms, 10s, 5m, 1h
  pressure: {warningPercent: 70, criticalPercent: 90}   # of usable slots; integers, never floats
  remediation:
    mode: DryRun                 # Enforce | DryRun | Off ; default DryRun
    onlyUnderPressure: true      # terminate only at or above warningPercent
    terminate:
      idleInTransactionAfter: 5m
      idleInTransactionAbortedAfter: 1m
      idleAfter: 30m             # leaked idle sessions; absent = never
    budget: {maxPerCycle: 10, maxPerHour: 100}
    protect: {roles: [], applications: [], databases: [], clientCIDRs: [], superusers: true, listeners: true}
  limits:
    roles:     [{name: app_backend, connectionLimit: 50, idleInTransactionSessionTimeout: 60s,
                 idleSessionTimeout: 10m, statementTimeout: 30s}]
    databases: [{name: production, connectionLimit: 150}]
    server: {idleInTransactionSessionTimeout: 300s, tcpKeepalivesIdle: 60, tcpKeepalivesInterval: 10,
             tcpKeepalivesCount: 6, clientConnectionCheckInterval: 30s}
    onDelete: Keep               # Keep | Revert (restore the values found before pgrelief changed them)
  pgbouncer:
    enabled: false
    replicas: 2
    poolMode: transaction        # transaction | session | statement
    maxClientConn: 2000
    defaultPoolSize: 25          # absent = computed from usable slots and replicas
    reservePoolSize: 5
    parameters: {}               # further pgbouncer.ini keys; reserved keys are rejected
"""  # noqa: E501 (verbatim from DESIGN.md)


def problems(spec_yaml: str) -> list[str]:
    """The error lines for a policy whose spec is ``spec_yaml``."""
    text = "kind: ConnectionPolicy\nmetadata: {name: p}\nspec:\n" + textwrap.indent(
        textwrap.dedent(spec_yaml), "  "
    )
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    return list(caught.value.problems)


def test_design_example_loads_with_every_field() -> None:
    policy = parse_policy(DESIGN_EXAMPLE)
    spec = policy.spec
    assert policy.metadata.name == "orders-db"
    assert policy.metadata.namespace == "prod"
    assert spec.postgres.host == "orders-db-rw.prod.svc"
    assert spec.postgres.credentials_secret is not None
    assert spec.postgres.credentials_secret.password_key == "password"
    assert spec.interval_seconds == 10.0
    assert (spec.pressure.warning_percent, spec.pressure.critical_percent) == (70, 90)
    assert spec.remediation.terminate.threshold_seconds() == {
        "idle in transaction": 300.0,
        "idle in transaction (aborted)": 60.0,
        "idle": 1800.0,
    }
    assert spec.limits.roles[0].settings() == {
        "idle_in_transaction_session_timeout": "60s",
        "idle_session_timeout": "10m",
        "statement_timeout": "30s",
    }
    assert spec.limits.server.tcp_keepalives_count == 6
    assert spec.pgbouncer.default_pool_size == 25


def test_minimal_policy_gets_the_documented_defaults() -> None:
    policy = parse_policy(
        "apiVersion: pgrelief.dev/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: a}\n"
    )
    spec = policy.spec
    assert spec.remediation.mode == "DryRun"
    assert spec.remediation.only_under_pressure is True
    assert spec.remediation.terminate.threshold_seconds() == {}  # absent rules never terminate
    assert (spec.remediation.budget.max_per_cycle, spec.remediation.budget.max_per_hour) == (
        10,
        100,
    )
    protect = spec.remediation.protect
    assert (protect.superusers, protect.listeners) == (True, True)
    assert (spec.pressure.warning_percent, spec.pressure.critical_percent) == (70, 90)
    assert spec.interval == "10s"
    assert spec.limits.on_delete == "Keep"
    assert (spec.postgres.port, spec.postgres.database, spec.postgres.ssl_mode) == (
        5432,
        "postgres",
        "prefer",
    )
    bouncer = spec.pgbouncer
    assert (bouncer.enabled, bouncer.replicas, bouncer.pool_mode) == (False, 2, "transaction")
    assert (bouncer.max_client_conn, bouncer.default_pool_size, bouncer.reserve_pool_size) == (
        2000,
        None,
        5,
    )


def test_snake_case_names_work_in_python() -> None:
    spec = validate_spec({"remediation": {"mode": "Enforce"}})
    again = spec.model_copy(update={"interval": "250ms"})
    assert again.interval_seconds == 0.25
    assert spec.model_dump(by_alias=True)["remediation"]["onlyUnderPressure"] is True


@pytest.mark.parametrize(
    ("spec_yaml", "expected"),
    [
        (
            "remediation: {mode: enforce}",
            "spec.remediation.mode: Input should be 'Enforce', 'DryRun' or 'Off' (got 'enforce')",
        ),
        (
            "limits: {roles: [{name: app, connectionLimit: -2}]}",
            "spec.limits.roles[0].connectionLimit: Input should be greater than or equal to -1",
        ),
        (
            "limits: {databases: [{name: shop, connectionLimit: -5}]}",
            "spec.limits.databases[0].connectionLimit: Input should be greater than or equal to -1",
        ),
        (
            "remediation: {terminate: {idleAfter: 5 minutes}}",
            "spec.remediation.terminate.idleAfter: cannot read duration '5 minutes'; "
            "expected e.g. 250ms, 10s, 5m, 1h",
        ),
        (
            "interval: 10",
            "spec.interval: Input should be a valid string (got 10); quote it, and give "
            "durations a unit, e.g. '10s'",
        ),
        (
            "remediation: {terminate: {idleAftr: 5m}}",
            "spec.remediation.terminate.idleAftr: unknown field; did you mean 'idleAfter'? "
            "(allowed: idleInTransactionAfter, idleInTransactionAbortedAfter, idleAfter)",
        ),
        (
            "pressure: {warningPercent: 90, criticalPercent: 80}",
            "spec.pressure: warningPercent (90) must be lower than criticalPercent (80)",
        ),
        (
            "pressure: {warningPercent: 90}",
            "spec.pressure: warningPercent (90) must be lower than criticalPercent (90)",
        ),
        (
            "pressure: {warningPercent: 70.5}",
            "spec.pressure.warningPercent: Input should be a valid integer (got 70.5)",
        ),
        (
            "pressure: {criticalPercent: 101}",
            "spec.pressure.criticalPercent: Input should be less than or equal to 100",
        ),
        (
            "pgbouncer: {parameters: {pool_mode: session}}",
            "spec.pgbouncer.parameters: 'pool_mode' is set by pgrelief and cannot be overridden; "
            "reserved keys: " + ", ".join(sorted(RESERVED_PGBOUNCER_KEYS)),
        ),
        (
            "pgbouncer: {parameters: {server_idle_timeout: 300}}",
            "spec.pgbouncer.parameters.server_idle_timeout: Input should be a valid string "
            "(got 300); quote it, and give durations a unit, e.g. '10s'",
        ),
        (
            'pgbouncer: {parameters: {server_lifetime: "1\\nauth_type = trust"}}',
            "spec.pgbouncer.parameters: value of 'server_lifetime' must be a single line",
        ),
        (
            'pgbouncer: {parameters: {"Bad Key": "1"}}',
            "spec.pgbouncer.parameters: 'Bad Key' is not a pgbouncer.ini setting name "
            "(lowercase letters, digits, _)",
        ),
        (
            "pgbouncer: {poolMode: pooled}",
            "spec.pgbouncer.poolMode: Input should be 'transaction', 'session' or 'statement' "
            "(got 'pooled')",
        ),
        (
            "remediation: {protect: {clientCIDRs: [10.0.0.1/8]}}",
            "spec.remediation.protect.clientCIDRs[0]: '10.0.0.1/8' has host bits set; "
            "did you mean 10.0.0.0/8?",
        ),
        (
            "remediation: {protect: {clientCIDRs: [office]}}",
            "spec.remediation.protect.clientCIDRs[0]: 'office' is not an IP network in CIDR "
            "notation: 'office' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            "limits: {roles: [{name: " + "é" * 32 + "}]}",
            "spec.limits.roles[0].name: name is 64 bytes in UTF-8; PostgreSQL names are at "
            "most 63 bytes (longer ones are truncated)",
        ),
        (
            'limits: {roles: [{name: ""}]}',
            "spec.limits.roles[0].name: name must not be empty",
        ),
        (
            "limits: {roles: [{name: app}, {name: app}]}",
            "spec.limits.roles: role 'app' is listed more than once",
        ),
        (
            "limits: {databases: [{name: x, connectionLimit: 1}, {name: x, connectionLimit: 2}]}",
            "spec.limits.databases: database 'x' is listed more than once",
        ),
        (
            "limits: {databases: [{name: x}]}",
            "spec.limits.databases[0].connectionLimit: required field is missing",
        ),
        (
            "limits: {onDelete: Restore}",
            "spec.limits.onDelete: Input should be 'Keep' or 'Revert' (got 'Restore')",
        ),
        (
            "limits: {roles: [{name: app, statementTimeout: 1.5ms}]}",
            "spec.limits.roles[0].statementTimeout: duration '1.5ms' must be a whole number "
            "of milliseconds",
        ),
        (
            "limits: {server: {maxConnections: 10, superuserReservedConnections: 10}}",
            "spec.limits.server: superuserReservedConnections + reservedConnections (10) must "
            "be lower than maxConnections (10)",
        ),
        (
            "limits: {server: {tcpKeepalivesIdle: -1}}",
            "spec.limits.server.tcpKeepalivesIdle: Input should be greater than or equal to 0",
        ),
        (
            "remediation: {terminate: {idleAfter: 0s}}",
            "spec.remediation.terminate.idleAfter: duration '0s' must be greater than zero",
        ),
        (
            "remediation: {cancel: {escalateAfter: 30s}}",
            "spec.remediation.cancel: escalateAfter needs activeAfter: only a cancelled query "
            "escalates",
        ),
        (
            "remediation: {cancel: {activeAfter: 0s}}",
            "spec.remediation.cancel.activeAfter: duration '0s' must be greater than zero",
        ),
        (
            "remediation: {select: {roles: [app, app2], colour: blue}}",
            "spec.remediation.select.colour: unknown field (allowed: roles, applications, "
            "databases, workloads)",
        ),
        (
            "limits: {roles: [{name: app, transactionTimeout: 0.5ms}]}",
            "spec.limits.roles[0].transactionTimeout: duration '0.5ms' must be a whole number "
            "of milliseconds",
        ),
        (
            "interval: 10ms",
            "spec.interval: interval '10ms' is too short; the minimum is 100ms",
        ),
        (
            "remediation: {budget: {maxPerHour: -1}}",
            "spec.remediation.budget.maxPerHour: Input should be greater than or equal to 0",
        ),
        (
            'remediation: {onlyUnderPressure: "yes"}',
            "spec.remediation.onlyUnderPressure: Input should be a valid boolean (got 'yes')",
        ),
        (
            "postgres: {sslMode: on}",
            "spec.postgres.sslMode: Input should be 'disable', 'allow', 'prefer', 'require', "
            "'verify-ca' or 'verify-full' (got True)",
        ),
        (
            "postgres: {port: 70000}",
            "spec.postgres.port: Input should be less than or equal to 65535",
        ),
        (
            "remediaton: {}",
            "spec.remediaton: unknown field; did you mean 'remediation'? (allowed: postgres, "
            "interval, pressure, remediation, limits, pgbouncer)",
        ),
    ],
)
def test_invalid_policy_names_field_path_and_reason(spec_yaml: str, expected: str) -> None:
    assert problems(spec_yaml) == [expected]


def test_every_problem_is_reported_at_once_in_one_line() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(
            "kind: ConnectionPolicy\nmetadata: {name: p}\n"
            "spec: {remediation: {mode: Sometimes}, interval: forever, bogus: 1}\n",
            "bad.yaml",
        )
    error = caught.value
    assert isinstance(error, PgreliefError)
    assert len(error.problems) == 3
    message = str(error)
    assert "\n" not in message
    assert message.startswith("invalid policy bad.yaml: ")
    assert "spec.remediation.mode:" in message
    assert "spec.interval: cannot read duration 'forever'" in message
    assert "spec.bogus: unknown field" in message


@pytest.mark.parametrize(
    "name",
    [
        'we"ird',
        "with space",
        "semi;colon",
        "x'; DROP ROLE postgres; --",
        "名前",
        "a" * 63,
        "é" * 31 + "a",  # 63 bytes
        "Ümlaut-ünicode ✓",
    ],
)
def test_any_postgres_name_up_to_63_bytes_is_accepted(name: str) -> None:
    spec = validate_spec(
        {
            "limits": {
                "roles": [{"name": name, "connectionLimit": 1}],
                "databases": [{"name": name, "connectionLimit": 1}],
            },
            "remediation": {"protect": {"roles": [name], "databases": [name]}},
        }
    )
    assert spec.limits.roles[0].name == name
    assert spec.limits.databases[0].name == name


def test_names_differing_in_case_are_different_roles() -> None:
    spec = validate_spec({"limits": {"roles": [{"name": "App"}, {"name": "app"}]}})
    assert [r.name for r in spec.limits.roles] == ["App", "app"]


def test_cidrs_accept_ipv4_ipv6_and_single_hosts() -> None:
    spec = validate_spec(
        {"remediation": {"protect": {"clientCIDRs": ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]}}}
    )
    assert [str(n) for n in spec.remediation.protect.networks()] == [
        "10.0.0.0/8",
        "fd00::/8",
        "192.0.2.7/32",
    ]


def test_durations_keep_their_text() -> None:
    spec = validate_spec({"interval": "1h30m", "remediation": {"terminate": {"idleAfter": "90s"}}})
    assert spec.interval == "1h30m"
    assert spec.interval_seconds == 5400.0
    assert spec.remediation.terminate.idle_after == "90s"


def test_validate_spec_prefixes_paths_with_spec() -> None:
    with pytest.raises(PolicyError) as caught:
        validate_spec({"remediation": {"mode": "Never"}})
    assert caught.value.problems == (
        "spec.remediation.mode: Input should be 'Enforce', 'DryRun' or 'Off' (got 'Never')",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no YAML document found; expected a ConnectionPolicy"),
        (
            "spec: [",
            "YAML syntax error at line 1, column 8: expected the node content, "
            "but found '<stream end>'",
        ),
        ("- 1\n- 2\n", "expected a mapping, got a list"),
        (
            "apiVersion: pgrelief.dev/v1\nkind: ConnectionPolicy\nmetadata: {name: a}\n",
            "apiVersion: Input should be 'pgrelief.dev/v1alpha1' (got 'pgrelief.dev/v1')",
        ),
        (
            "kind: Deployment\nmetadata: {name: a}\n",
            "kind: Input should be 'ConnectionPolicy' (got 'Deployment')",
        ),
        ("kind: ConnectionPolicy\n", "metadata: required field is missing"),
        (
            "kind: ConnectionPolicy\nmetadata: {name: a}\n---\n"
            "kind: ConnectionPolicy\nmetadata: {name: b}\n",
            "expected exactly one ConnectionPolicy (pgrelief.dev/v1alpha1) document, found "
            "ConnectionPolicy, ConnectionPolicy",
        ),
    ],
)
def test_unusable_documents(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "f.yaml")
    assert caught.value.problems == (expected,)


def test_multi_document_file_with_one_policy(tmp_path: Path) -> None:
    path = tmp_path / "bundle.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {password: x}\n"
        "---\n"
        "apiVersion: pgrelief.dev/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: db}\n"
        "spec: {remediation: {mode: Enforce}}\n---\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert policy.metadata.name == "db"
    assert policy.spec.remediation.mode == "Enforce"


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(missing)
    assert str(caught.value) == f"invalid policy {missing}: file not found"


def test_object_read_back_from_the_cluster_loads() -> None:
    policy = validate_policy(
        {
            "apiVersion": "pgrelief.dev/v1alpha1",
            "kind": "ConnectionPolicy",
            "metadata": {
                "name": "db",
                "namespace": "prod",
                "uid": "1234",
                "generation": 3,
                "labels": {"team": "a"},
            },
            "spec": {},
            "status": {"observedGeneration": 3},
        }
    )
    assert policy.metadata.namespace == "prod"


def test_status_read_back_from_the_cluster_is_typed() -> None:
    # As `kubectl get cpol -o yaml` prints it: timestamps are RFC 3339 strings.
    policy = validate_policy(
        {
            "apiVersion": "pgrelief.dev/v1alpha1",
            "kind": "ConnectionPolicy",
            "metadata": {"name": "db"},
            "status": {
                "observedGeneration": 2,
                "pressure": "warning",
                "lastDiagnosisTime": "2025-01-15T12:00:05Z",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Observed",
                        "lastTransitionTime": "2025-01-15T12:00:00Z",
                        "observedGeneration": 2,
                    }
                ],
                "originals": {"role:app:connection_limit": "-1"},
            },
        }
    )
    assert isinstance(policy.status, ConnectionPolicyStatus)
    assert policy.status.pressure == "warning"
    assert policy.status.last_diagnosis_time == datetime(2025, 1, 15, 12, 0, 5, tzinfo=UTC)
    (ready,) = policy.status.conditions
    assert (ready.type, ready.status, ready.observed_generation) == ("Ready", "True", 2)
    assert ready.last_transition_time == datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


def test_a_malformed_status_is_a_one_line_error() -> None:
    with pytest.raises(PolicyError) as caught:
        validate_policy(
            {
                "apiVersion": "pgrelief.dev/v1alpha1",
                "kind": "ConnectionPolicy",
                "metadata": {"name": "db"},
                "status": {"conditions": [{"type": "Ready", "status": "yes"}], "phase": "Ok"},
            }
        )
    assert str(caught.value) == (
        "invalid policy: status.conditions[0].status: Input should be 'True', 'False' or "
        "'Unknown' (got 'yes'); status.phase: unknown field (allowed: observedGeneration, "
        "conditions, pressure, utilizationPercent, clientBackends, usableSlots, "
        "lastDiagnosisTime, lastActionTime, terminationsLastHour, terminationsTotal, "
        "plannedLastCycle, connections, findings, workloads, recentActions, recentTerminations, "
        "failedActionsTotal, originals)"
    )


def test_the_api_version_is_spelled_once() -> None:
    assert API_VERSION_FULL == f"{API_GROUP}/{API_VERSION}" == "pgrelief.dev/v1alpha1"
    assert ConnectionPolicy(metadata=ObjectMeta(name="x")).api_version == API_VERSION_FULL
    assert ConnectionPolicy(metadata=ObjectMeta(name="x")).kind == KIND == "ConnectionPolicy"


def test_policies_directory_has_the_three_examples() -> None:
    names = {path.name for path in POLICY_FILES}
    assert {"dryrun-starter.yaml", "enforce-with-limits.yaml", "pgbouncer.yaml"} <= names


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_every_example_policy_loads(path: Path) -> None:
    policy = load_policy(path)
    assert isinstance(policy, ConnectionPolicy)
    assert policy.spec.postgres.host
    assert policy.metadata.namespace


def test_example_policies_cover_the_three_modes_of_use() -> None:
    policies = {path.name: load_policy(path) for path in POLICY_FILES}
    assert policies["dryrun-starter.yaml"].spec.remediation.mode == "DryRun"
    enforcing = policies["enforce-with-limits.yaml"].spec
    assert enforcing.remediation.mode == "Enforce"
    assert enforcing.limits.roles and enforcing.limits.databases
    assert policies["pgbouncer.yaml"].spec.pgbouncer.enabled
