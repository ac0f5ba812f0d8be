"""``pgrelief run``: the shared cycle in a loop, from a policy file, without Kubernetes.

What belongs to the standalone process lives here: the lifeline connection it owns, the loop
and its signals, the state file it remembers with, and the lines it prints. The cycle itself
(observe -> diagnose -> plan -> act) is ``pgrelief.cycle``, which the operator drives too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgrelief.audit import AuditLog
from pgrelief.connection import ManagedConnection
from pgrelief.cycle import Cycle, CycleReport
from pgrelief.errors import PgreliefError
from pgrelief.history import HistoryStore
from pgrelief.policy import ConnectionPolicy
from pgrelief.policy_file import load_policy
from pgrelief.state_file import StateStore, default_state_path

log = logging.getLogger(__name__)


class Runner:
    """Drives cycles of one policy against one server over one lifeline connection."""

    def __init__(
        self,
        policy: ConnectionPolicy,
        connection: ManagedConnection,
        store: HistoryStore,
        audit: AuditLog,
        *,
        dry_run: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self.connection = connection
        self.clock = clock
        self._cycle = Cycle(policy, store, audit, dry_run=dry_run, clock=clock)

    @property
    def dry_run(self) -> bool:
        return self._cycle.dry_run

    def cycle(self) -> CycleReport:
        return self._cycle.run(self.connection.get())

    def revert(self) -> CycleReport:
        return self._cycle.revert(self.connection.get())

    def loop(self, stop: threading.Event, *, on_cycle: Callable[[CycleReport], None]) -> None:
        interval = self.policy.spec.interval_seconds
        while not stop.is_set():
            started = self.clock()
            try:
                on_cycle(self.cycle())
            except PgreliefError as error:
                log.error("cycle failed: %s", error)
            except psycopg.OperationalError as error:
                # The lifeline dropped mid-cycle: the next cycle reconnects with backoff.
                log.error("lost the connection during a cycle: %s", str(error).splitlines()[0])
            elapsed = (self.clock() - started).total_seconds()
            stop.wait(max(interval - elapsed, 0.0))


def policy_dsn(policy: ConnectionPolicy) -> str:
    """libpq parameters from spec.postgres; the password only ever comes from the environment."""
    postgres = policy.spec.postgres
    if postgres.host is None:
        raise PgreliefError(
            "spec.postgres.host is not set: give the server with --dsn or in the policy"
        )
    params: dict[str, Any] = {
        "host": postgres.host,
        "port": postgres.port,
        "dbname": postgres.database,
        "sslmode": postgres.ssl_mode,
    }
    if postgres.user:
        params["user"] = postgres.user
    if postgres.password_env:
        password = os.environ.get(postgres.password_env)
        if password is None:
            raise PgreliefError(
                f"spec.postgres.passwordEnv names {postgres.password_env}, which is not set"
            )
        params["password"] = password
    return make_conninfo("", **params)


def describe_cycle(report: CycleReport, *, dry_run: bool) -> str:
    """One human line per cycle, then one per action: what a terminal user watches."""
    diagnosis = report.before
    totals = diagnosis.totals
    slots = diagnosis.server.usable_slots if diagnosis.server else 0
    done = sum(1 for r in report.records if r.outcome == "done")
    skipped = sum(1 for r in report.records if r.outcome == "skipped")
    failed = sum(1 for r in report.records if r.outcome == "failed")
    lines = [
        f"pressure {diagnosis.pressure.label}: {totals.client_backends}/{slots} slots "
        f"({totals.utilization_percent:.0f}%); actions done {done}, skipped {skipped}, "
        f"failed {failed}" + (" [dry run]" if dry_run else "")
    ]
    for record in report.records:
        detail = f" ({record.detail})" if record.detail else ""
        lines.append(
            f"  {record.outcome:<7} {record.action:<14} {record.target}: {record.reason}{detail}"
        )
    return "\n".join(lines)


def run_standalone(
    policy_file: Path,
    *,
    dsn: str | None,
    once: bool,
    dry_run: bool,
    audit_file: Path | None,
    state_file: Path | None,
    revert: bool,
) -> None:
    """The body of ``pgrelief run``: load, connect, then one cycle or a loop until SIGTERM."""
    policy = load_policy(policy_file)
    store = StateStore(state_file or default_state_path(policy))
    audit = AuditLog(path=audit_file)
    with ManagedConnection(dsn or policy_dsn(policy)) as connection:
        runner = Runner(policy, connection, store, audit, dry_run=dry_run)
        if connection.get() and connection.lifeline and connection.lifeline.advice():
            print(
                f"warning: {connection.lifeline.summary()}; fix: "
                + " ".join(connection.lifeline.advice()),
                file=sys.stderr,
            )
        if revert:
            print(describe_cycle(runner.revert(), dry_run=runner.dry_run), flush=True)
            return
        if once:
            print(describe_cycle(runner.cycle(), dry_run=runner.dry_run), flush=True)
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        runner.loop(
            stop,
            on_cycle=lambda report: print(
                describe_cycle(report, dry_run=runner.dry_run), flush=True
            ),
        )
