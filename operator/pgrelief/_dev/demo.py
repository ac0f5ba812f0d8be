"""``make demo``: a connection incident on a throwaway server, explained and relieved.

It exists so a new user sees the whole product in under a minute with nothing installed but
the package: an embedded PostgreSQL with a small ``max_connections`` is exhausted by a leaky
application until a new client gets ``FATAL: sorry, too many clients already``; then the real
``pgrelief diagnose`` and ``pgrelief run --once`` commands (the same ones a user types) explain
it and free the leaked slots while the protected sessions survive; the new client gets in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgrelief._dev.embedded import EmbeddedPostgres

LEAKY_ROLE = "app_backend"
PROTECTED_ROLE = "reporting"
POLICY = """\
apiVersion: pgrelief.dev/v1alpha1
kind: ConnectionPolicy
metadata: {name: demo, namespace: demo}
spec:
  interval: 250ms
  pressure: {warningPercent: 70, criticalPercent: 90}
  remediation:
    mode: Enforce
    onlyUnderPressure: true
    terminate: {idleInTransactionAfter: 2s, idleAfter: 3s}
    budget: {maxPerCycle: 20, maxPerHour: 100}
    protect: {roles: [reporting], applications: [nightly-export], superusers: true, listeners: true}
  limits:
    roles:
      - {name: app_backend, connectionLimit: 8, idleInTransactionSessionTimeout: 30s}
"""


def _banner(text: str) -> None:
    print(f"\n\033[1m=== {text} ===\033[0m", flush=True)


def _pgrelief(*args: str) -> int:
    command = [sys.executable, "-m", "pgrelief", *args]
    print("$ pgrelief " + " ".join(args), flush=True)
    return subprocess.run(command, check=False).returncode


def _try_connect(server: EmbeddedPostgres) -> str:
    try:
        with psycopg.connect(server.dsn(LEAKY_ROLE, application_name="new-client")):
            return "connected"
    except psycopg.OperationalError as error:
        return "refused: " + str(error).strip().splitlines()[-1]


def main() -> int:
    started = time.monotonic()
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    with EmbeddedPostgres(max_connections=20, superuser_reserved_connections=3) as server:
        _banner(
            f"PostgreSQL {server.version} on 127.0.0.1:{server.port}, "
            f"max_connections=20, {server.usable_slots} usable slots"
        )
        server.create_role(LEAKY_ROLE)
        server.create_role(PROTECTED_ROLE)

        def session(role: str, app: str) -> psycopg.Connection[tuple[object, ...]]:
            conn = psycopg.connect(server.dsn(role, application_name=app), autocommit=True)
            held.append(conn)
            return conn

        try:
            # The incident: a checkout service leaks idle connections, a billing worker
            # abandons open transactions; a report and a LISTEN worker are legitimate.
            session(PROTECTED_ROLE, "nightly-report").execute("select 1")
            session(LEAKY_ROLE, "nightly-export").execute("select 1")
            session(LEAKY_ROLE, "notifier").execute("LISTEN orders")
            for _ in range(3):
                session(LEAKY_ROLE, "billing-worker").execute(
                    "begin; select count(*) from pg_class"
                )
            while True:
                try:
                    session(LEAKY_ROLE, "checkout-api").execute("select now()")
                except psycopg.OperationalError:
                    break
            print(f"leaky app opened {len(held)} connections; a new client now gets:")
            print("  " + _try_connect(server))
            time.sleep(3.2)  # the leaked sessions age past the policy's thresholds

            _banner("pgrelief diagnose: what is eating the slots?")
            _pgrelief(
                "diagnose",
                "--dsn",
                server.dsn(),
                "--idle-after",
                "3s",
                "--idle-in-transaction-after",
                "2s",
            )

            with tempfile.TemporaryDirectory(prefix="pgrelief-demo-") as scratch:
                policy = Path(scratch) / "policy.yaml"
                policy.write_text(POLICY, encoding="utf-8")
                audit = Path(scratch) / "audit.jsonl"
                _banner("pgrelief run --once: relieve the pressure within the policy")
                print(POLICY)
                _pgrelief(
                    "run",
                    "--policy",
                    str(policy),
                    "--dsn",
                    server.dsn(),
                    "--once",
                    "--audit-file",
                    str(audit),
                    "--state-file",
                    str(Path(scratch) / "s"),
                )

                _banner("a new client tries again")
                print("  " + _try_connect(server))
                alive = [c.info.backend_pid for c in held if not c.closed and _alive(c)]
                print(
                    f"  {len(alive)} of the {len(held)} sessions the demo opened are still open: "
                    "the protected report, export and LISTEN sessions"
                )

                _banner("after: pgrelief diagnose --format json (totals)")
                after = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pgrelief",
                        "diagnose",
                        "--dsn",
                        server.dsn(),
                        "--format",
                        "json",
                    ],
                    check=False,
                    capture_output=True,
                    text=True,
                )
                print(json.dumps(json.loads(after.stdout)["totals"], indent=2))

                _banner("audit trail (JSON lines)")
                for line in audit.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    print(
                        f"{record['outcome']:<8} {record['action']:<13} {record['target']:<30}"
                        f" {record['reason']}"
                    )
        finally:
            for conn in held:
                conn.close()
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


def _alive(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    try:
        conn.execute("select 1")
    except psycopg.Error:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
