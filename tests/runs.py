"""Helpers the remediation tests share: a policy file, the real CLI, and what it left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres

POLICY = """\
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {{name: test, namespace: pytest}}
spec:
  interval: {interval}
  remediation:
    mode: {mode}
    onlyUnderPressure: {only_under_pressure}
    terminate: {terminate}
    cancel: {cancel}
    budget: {{maxPerCycle: {per_cycle}, maxPerHour: {per_hour}}}
    select: {select}
    protect:
      roles: [reporting]
      applications: {protect_applications}
      superusers: true
      listeners: true
  limits:
    roles: {roles}
    databases: {databases}
"""
AGE_PAST_THRESHOLD_S = 1.2
IDLE_RULES = "{idleAfter: 1s, idleInTransactionAfter: 1s, idleInTransactionAbortedAfter: 1s}"


def write_policy(
    tmp_path: Path,
    *,
    mode: str = "Enforce",
    only_under_pressure: bool = False,
    per_cycle: int = 100,
    per_hour: int = 1000,
    roles: str = "[]",
    databases: str = "[]",
    terminate: str = IDLE_RULES,
    cancel: str = "{}",
    select: str = "{}",
    protect_applications: str = "[nightly-export]",
    interval: str = "200ms",
) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        POLICY.format(
            interval=interval,
            terminate=terminate,
            cancel=cancel,
            select=select,
            protect_applications=protect_applications,
            mode=mode,
            only_under_pressure=str(only_under_pressure).lower(),
            per_cycle=per_cycle,
            per_hour=per_hour,
            roles=roles,
            databases=databases,
        ),
        encoding="utf-8",
    )
    return path


def pgrelief(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgrelief", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_once(server: EmbeddedPostgres, policy: Path, tmp_path: Path, *extra: str) -> list[dict]:
    """One ``pgrelief run --once``; returns the audit records that run appended."""
    audit = tmp_path / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    done = pgrelief(
        "run", "--policy", str(policy), "--dsn", server.dsn(), "--once",
        "--audit-file", str(audit), "--state-file", str(tmp_path / "state.json"), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = audit.read_text().splitlines() if audit.exists() else []
    return [json.loads(line) for line in lines[before:]]


def alive(admin: psycopg.Connection[tuple[object, ...]], pids: list[int]) -> set[int]:
    rows = admin.execute("select pid from pg_stat_activity where pid = any(%s)", (pids,))
    return {int(str(row[0])) for row in rows.fetchall()}


def terminated_pids(records: list[dict]) -> set[int]:
    return {
        int(r["target"].split()[-1])
        for r in records
        if r["action"] == "terminate" and r["outcome"] == "done"
    }
