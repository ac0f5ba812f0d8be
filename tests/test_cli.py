"""The command line as scripts and monitoring use it: exit codes, JSON keys, one-line errors.

Every test runs the real ``pgrelief`` entry point in a subprocess against the embedded
PostgreSQL, so what is checked is exactly what a user's shell sees.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from pgrelief import diagnosis
from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.cli import cli
from pgrelief.crd import crd_yaml
from tests.fixtures.postgres import SessionFactory
from tests.test_dumps import copy_csv, json_agg

ROOT = Path(__file__).resolve().parent.parent
FINDING_KINDS = (
    diagnosis.SATURATION,
    diagnosis.IDLE_IN_TRANSACTION,
    diagnosis.LEAKED_IDLE,
    diagnosis.LONG_RUNNING,
    diagnosis.TRAFFIC_SPIKE,
    diagnosis.ROLE_MONOPOLY,
    diagnosis.NO_POOLER,
    diagnosis.MEMORY_OVERCOMMIT,
    diagnosis.RESERVED_ACCESS,
    diagnosis.LOCK_BLOCKER,
)


def pgrelief(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgrelief", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def diagnose_json(*args: str) -> tuple[int, dict[str, Any]]:
    done = pgrelief("diagnose", *args, "--format", "json")
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout)


def test_healthy_server_exits_0_with_the_json_contract(pg_server: EmbeddedPostgres) -> None:
    code, report = diagnose_json("--dsn", pg_server.dsn())
    assert code == 0, report
    assert {"server", "totals", "breakdown", "findings"} <= set(report)
    assert set(report["server"]) >= {
        "version_num",
        "max_connections",
        "superuser_reserved_connections",
        "reserved_connections",
        "usable_slots",
    }
    assert report["server"]["usable_slots"] == pg_server.usable_slots
    assert set(report["totals"]) >= {"client_backends", "utilization_percent", "by_state"}
    assert set(report["breakdown"]) == {
        "by_user",
        "by_application",
        "by_client_addr",
        "by_database",
    }
    assert report["status"] == "healthy"


def test_warning_pressure_exits_1(pg_server: EmbeddedPostgres, sessions: SessionFactory) -> None:
    wanted = math.ceil(pg_server.usable_slots * 0.75)
    for _ in range(wanted - 1):  # plus the diagnose session itself
        sessions.idle("app_backend", "web")
    code, report = diagnose_json("--dsn", pg_server.dsn())
    assert report["pressure"] == "warning"
    assert code == 1
    saturation = [f for f in report["findings"] if f["kind"] == "saturation"]
    assert saturation and saturation[0]["severity"] == "warning"


def test_full_server_exits_2_and_a_refusal_is_a_diagnosis(
    pg_server: EmbeddedPostgres, sessions: SessionFactory
) -> None:
    leaked = sessions.fill("app_backend", "leaky")
    code, report = diagnose_json("--dsn", pg_server.dsn())  # superuser: a reserved slot
    assert code == 2
    assert report["status"] == "critical"
    assert report["totals"]["by_state"]["idle"] >= len(leaked)

    code, refused = diagnose_json("--dsn", pg_server.dsn("app_backend"))
    assert code == 2
    assert refused["server"] is None
    finding = refused["findings"][0]
    assert finding["kind"] == "saturation"
    assert finding["severity"] == "critical"
    assert any("reserved" in fix["text"] for fix in finding["fixes"])


def test_text_report_names_the_leak(pg_server: EmbeddedPostgres, sessions: SessionFactory) -> None:
    for _ in range(3):
        sessions.idle_in_transaction("app_backend", "billing-worker")
    done = pgrelief("diagnose", "--dsn", pg_server.dsn(), "--idle-in-transaction-after", "0s")
    assert done.returncode in (0, 1, 2), done.stderr
    assert "idle_in_transaction" in done.stdout
    assert "billing-worker" in done.stdout
    assert "pg_terminate_backend" in done.stdout


@pytest.mark.parametrize("form", ["csv", "json"])
def test_offline_dump_gives_the_live_diagnosis(
    form: str, pg_server: EmbeddedPostgres, sessions: SessionFactory, tmp_path: Path
) -> None:
    sessions.incident()
    activity = tmp_path / f"activity.{form}"
    settings = tmp_path / f"settings.{form}"
    if form == "csv":
        copy_csv(pg_server, "select * from pg_stat_activity", activity)
        copy_csv(pg_server, "select * from pg_settings", settings, tcp=True)
    else:
        json_agg(pg_server, "select * from pg_stat_activity", activity)
        json_agg(pg_server, "select * from pg_settings", settings, alias="s", tcp=True)
    _, live = diagnose_json("--dsn", pg_server.dsn())
    _, offline = diagnose_json("--activity-file", str(activity), "--settings-file", str(settings))

    # The dump holds psql's session where the live view holds pgrelief's: same counts.
    assert offline["server"]["usable_slots"] == live["server"]["usable_slots"]
    assert offline["totals"]["client_backends"] == live["totals"]["client_backends"]
    live_users = {g["key"]: g["count"] for g in live["breakdown"]["by_user"]}
    offline_users = {g["key"]: g["count"] for g in offline["breakdown"]["by_user"]}
    assert offline_users == live_users
    # A dump has no pg_blocking_pids(): only the live view can name the lock holder.
    live_kinds = {f["kind"] for f in live["findings"]} - {diagnosis.LOCK_BLOCKER}
    assert {f["kind"] for f in offline["findings"]} == live_kinds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --dsn or --activity-file"),
        (("--dsn", "host=127.0.0.1 port=1 connect_timeout=2"), "cannot connect"),
        (("--activity-file", "/nonexistent/a.csv"), "no such file"),
        (("--activity-file", "/etc/passwd"), "not a dump pgrelief can read"),
        (("--dsn", "host=x", "--idle-after", "soon"), "cannot read duration"),
        (("--dsn", "host=x", "--memory", "lots"), "cannot read size"),
        (("--dsn", "host=x", "--warning-percent", "95"), "below --critical-percent"),
    ],
)
def test_bad_input_is_one_line_and_exit_3(args: tuple[str, ...], message: str) -> None:
    done = pgrelief("diagnose", *args)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pgrelief: error: ")
    assert message in lines[0]


def test_bad_password_never_shows_it(pg_server: EmbeddedPostgres) -> None:
    pg_server.create_role("cli_secret_role", password="right-horse")
    done = pgrelief("diagnose", "--dsn", pg_server.dsn("cli_secret_role", password="s3cr3t-Pw"))
    assert done.returncode == 3
    assert "s3cr3t-Pw" not in done.stderr + done.stdout
    assert "password authentication failed" in done.stderr


def test_size_computes_max_connections_and_pools() -> None:
    done = pgrelief("size", "--ram", "16GB", "--format", "json")
    assert done.returncode == 0, done.stderr
    sizing = json.loads(done.stdout)
    assert sizing["max_connections"] == 300
    assert sizing["memory_ceiling_connections"] == 402  # the seed's "around 400" for 16 GB
    assert sizing["superuser_reserved_connections"] == 5
    assert 0 < sizing["pgbouncer"]["default_pool_size"] <= 50
    bad = pgrelief("size", "--ram", "lots")
    assert bad.returncode == 3
    assert "cannot read size" in bad.stderr


def test_size_advises_a_small_server_instead_of_failing() -> None:
    done = pgrelief("size", "--ram", "1GB", "--format", "json")
    assert done.returncode == 0, done.stderr
    sizing = json.loads(done.stdout)
    assert sizing["usable_slots"] >= 5
    assert sizing["needs_pgbouncer"]
    assert any(line.startswith("small server:") for line in sizing["reasoning"])
    assert "alter system set work_mem = '1MB';" in sizing["sql"]


def test_every_option_says_what_it_does() -> None:
    missing = [
        f"{name} {param.opts[-1]}"
        for name, command in cli.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.help and param.name != "help"
    ]
    assert missing == []


def test_the_readme_names_what_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in re.findall(r"\b(policies/[\w.-]+\.yaml)", readme):
        assert (ROOT / path).exists(), path
    for kind in FINDING_KINDS:
        assert f"`{kind}`" in readme, kind
    assert "--max-connections" in readme and "--verbose" in readme


def test_crd_command_prints_the_committed_crd() -> None:
    done = pgrelief("crd")
    assert done.returncode == 0
    committed = (ROOT / "crds" / "connectionpolicies.pgrelief.dev.yaml").read_text()
    assert done.stdout == committed == crd_yaml()
