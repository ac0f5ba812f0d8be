"""What pgrelief's database role needs, grant by grant, on a real server: the README's
troubleshooting table is these results (PostgreSQL 18 here; .ci/run repeats it on 15).

Each case creates the role ``relief`` with only the listed grants, leaks one idle-in-transaction
session of ``app_backend``, and runs ``pgrelief diagnose`` and one enforcing ``pgrelief run``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgrelief._dev.embedded import EmbeddedPostgres
from tests.runs import pgrelief

POLICY = """\
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {name: grants, namespace: pytest}
spec:
  remediation:
    mode: Enforce
    onlyUnderPressure: false
    terminate: {idleInTransactionAfter: 1s}
  limits:
    roles: [{name: app_backend, connectionLimit: 40, statementTimeout: 30s}]
    databases: [{name: appdb, connectionLimit: 90}]
    server: {idleInTransactionSessionTimeout: 300s}
"""
STATS = "GRANT pg_read_all_stats TO relief"
SIGNAL = "GRANT pg_signal_backend TO relief"
LIMITS = [
    "ALTER ROLE relief CREATEROLE",
    "GRANT app_backend TO relief WITH ADMIN OPTION",  # PG16+ needs it besides CREATEROLE
    "ALTER DATABASE appdb OWNER TO relief",
    "GRANT ALTER SYSTEM ON PARAMETER idle_in_transaction_session_timeout TO relief",
    "GRANT EXECUTE ON FUNCTION pg_reload_conf() TO relief",
]


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        pg.create_role("app_backend")
        with pg.connect() as conn:
            conn.execute("CREATE DATABASE appdb")
        yield pg


def _run(server: EmbeddedPostgres, grants: list[str], tmp_path: Path) -> tuple[Any, list[Any]]:
    with server.connect() as conn:
        conn.execute("DROP OWNED BY relief" if _exists(conn) else "SELECT 1")
        conn.execute("ALTER DATABASE appdb OWNER TO postgres")
        conn.execute("DROP ROLE IF EXISTS relief")
        conn.execute("CREATE ROLE relief LOGIN")
        for grant in grants:
            conn.execute(grant)  # type: ignore[arg-type]
    leak = psycopg.connect(server.dsn(user="app_backend"), application_name="leaky")
    try:
        leak.execute("SELECT 1")  # a transaction left open
        time.sleep(1.2)
        dsn = server.dsn(user="relief")
        diagnosis = json.loads(pgrelief("diagnose", "--dsn", dsn, "--format", "json").stdout)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY, encoding="utf-8")
        audit = tmp_path / "audit.jsonl"
        pgrelief(
            "run",
            "--policy",
            str(policy),
            "--dsn",
            dsn,
            "--once",
            "--audit-file",
            str(audit),
            "--state-file",
            str(tmp_path / "state.json"),
        )
    finally:
        leak.close()  # terminated by then, when relief could
    records = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    return diagnosis, [r for r in records if r["outcome"] != "intent"]


def _exists(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'relief'").fetchone() is not None


def _outcomes(records: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for record in records:
        out.setdefault(record["action"], set()).add(record["outcome"])
    return out


def test_without_pg_read_all_stats_other_sessions_are_unknown_and_never_candidates(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    diagnosis, records = _run(server, [SIGNAL], tmp_path)
    assert "idle in transaction" not in diagnosis["totals"]["by_state"]
    assert diagnosis["totals"]["by_state"].get("unknown", 0) >= 1
    assert "terminate" not in _outcomes(records)  # nothing selected, nothing attempted


def test_without_pg_signal_backend_terminations_fail_and_say_why(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    diagnosis, records = _run(server, [STATS], tmp_path)
    assert diagnosis["totals"]["by_state"]["idle in transaction"] == 1
    (failed,) = [r for r in records if r["action"] == "terminate"]
    assert failed["outcome"] == "failed"
    assert "grant it pg_signal_backend" in failed["detail"]


def test_the_two_roles_suffice_to_terminate_but_not_to_set_limits(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    _, records = _run(server, [STATS, SIGNAL], tmp_path)
    outcomes = _outcomes(records)
    assert outcomes["terminate"] == {"done"}
    assert outcomes["alter_role"] == outcomes["alter_database"] == {"failed"}
    assert outcomes["alter_system"] == {"failed"}
    details = " ".join(r["detail"] for r in records if r["outcome"] == "failed")
    assert "permission denied" in details and "must be owner of database appdb" in details


def test_limits_need_createrole_admin_ownership_and_parameter_grants(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    version = server.version
    grants = [STATS, SIGNAL, *(g for g in LIMITS if version >= 16 or "ADMIN OPTION" not in g)]
    _, records = _run(server, grants, tmp_path)
    assert {k: v for k, v in _outcomes(records).items()} == {
        "terminate": {"done"},
        "alter_role": {"done"},
        "alter_database": {"done"},
        "alter_system": {"done"},
    }
    with server.connect() as conn:
        conn.execute("ALTER SYSTEM RESET idle_in_transaction_session_timeout")
        conn.execute("SELECT pg_reload_conf()")
