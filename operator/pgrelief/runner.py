"""``pgrelief run``: the shared cycle in a loop, from a policy file, without Kubernetes.

What belongs to the standalone process lives here: the lifeline connection it owns, the loop
and its signals, the state file it remembers with, and the lines it prints. The cycle itself
(observe -> diagnose -> plan -> act) is ``pgrelief.cycle``, which the operator drives too.

Failure rules, because this runs unattended (cron, systemd, a sidecar):

- the audit file and the state location are checked before the first cycle: if either cannot
  be written, nothing is done and the message names the file;
- SIGTERM/SIGINT end the loop *and* a ``--once`` run cleanly: a cycle that has not started
  acting does not act, one that has finishes and writes its records and state; a cycle stuck
  on a frozen server is cut after a short grace;
- a server that is down or full at start does not end the loop: it retries with backoff;
- an audit or state write that fails mid-run stops the run, saying what was done and where
  the records are (records that could not be written are printed on stderr).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgrelief.audit import AuditLog, AuditRecord, AuditWriteError
from pgrelief.connection import ManagedConnection
from pgrelief.cycle import Cycle, CycleReport
from pgrelief.errors import ConnectFailed, PgreliefError, ServerRefused
from pgrelief.history import HistoryStore
from pgrelief.policy import ConnectionPolicy
from pgrelief.policy_file import load_policy
from pgrelief.state_file import StateFileError, StateStore, default_state_path

log = logging.getLogger(__name__)

CYCLE_DEADLINE_S = 30.0  # a cycle takes milliseconds; this only ever cuts a frozen server
STOP_GRACE_S = 5.0  # after SIGTERM, how long a cycle in progress may still take
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
EXIT_ACTIONS_FAILED = 1
EXIT_ERROR = 3


class RunStoppedError(PgreliefError):
    """The run cannot go on safely (its records or state cannot be written)."""


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
        on_records: Callable[[Sequence[AuditRecord]], None] | None = None,
        stopping: threading.Event | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self.connection = connection
        self.clock = clock
        self.stopping = stopping or threading.Event()
        self._audit = audit
        self._on_records = on_records
        self._cycle = Cycle(policy, store, self._record, dry_run=dry_run, clock=clock)

    @property
    def dry_run(self) -> bool:
        return self._cycle.dry_run

    def cycle(self) -> CycleReport:
        conn = self.connection.get()
        with self.connection.deadline(CYCLE_DEADLINE_S):
            return self._run_guarded(lambda: self._cycle.run(conn, self.stopping))

    def revert(self) -> CycleReport:
        conn = self.connection.get()
        with self.connection.deadline(CYCLE_DEADLINE_S):
            return self._run_guarded(lambda: self._cycle.revert(conn))

    def stop(self) -> None:
        """Ask the run to end: no new cycle, no new action; a stuck cycle is cut shortly.

        Safe in a signal handler: it takes no lock itself (the handler may have interrupted
        the main thread while it held the connection's), a helper thread does.
        """
        self.stopping.set()
        threading.Thread(
            target=self.connection.expire_within, args=(STOP_GRACE_S,), daemon=True
        ).start()

    def loop(self, *, on_cycle: Callable[[CycleReport], None]) -> None:
        """Cycles until ``stop``; outages are waited out, not fatal.

        Healthy, a cycle starts every ``spec.interval``; under pressure, at the moment the
        next session comes due if that is sooner (``CycleReport.wait_s``).
        """
        interval = self.policy.spec.interval_seconds
        retry = RETRY_FIRST_S
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                report = self.cycle()
                on_cycle(report)
            except (ConnectFailed, ServerRefused) as error:
                log.error("%s; retrying in %.0fs", error, retry)
                self.stopping.wait(retry)
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            except RunStoppedError:
                raise
            except PgreliefError as error:
                log.error("cycle failed: %s", error)
            except psycopg.OperationalError as error:
                # The lifeline dropped mid-cycle: the next cycle reconnects with backoff.
                log.error("lost the connection during a cycle: %s", str(error).splitlines()[0])
            else:
                retry = RETRY_FIRST_S
                self.stopping.wait(report.wait_s(interval, since=started))
                continue
            self.stopping.wait(max(started + interval - time.monotonic(), 0.0))

    def _record(self, records: Sequence[AuditRecord]) -> None:
        self._audit.write(records)
        if self._on_records is not None:
            self._on_records(records)

    def _run_guarded(self, run: Callable[[], CycleReport]) -> CycleReport:
        try:
            return run()
        except AuditWriteError as error:
            _print_unwritten(error.unwritten)
            done = sum(1 for r in error.unwritten if r.outcome == "done")
            raise RunStoppedError(
                f"stopped: {error}; {done} action(s) done whose records could not be written "
                "were printed on stderr; earlier records are in the file"
            ) from None
        except StateFileError as error:
            where = self._audit.path or "the output above"
            raise RunStoppedError(
                f"stopped: {error}; this cycle's actions are recorded in {where}"
            ) from None


def _print_unwritten(records: Sequence[AuditRecord]) -> None:
    for record in records:
        sys.stderr.write("unwritten audit record: " + record.to_line())
    sys.stderr.flush()


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


def describe_summary(report: CycleReport, *, dry_run: bool) -> str:
    """One human line per cycle, after its actions' lines: what a terminal user watches."""
    diagnosis = report.before
    totals = diagnosis.totals
    slots = diagnosis.server.usable_slots if diagnosis.server else 0
    line = (
        f"pressure {diagnosis.pressure.label}: {totals.client_backends}/{slots} slots "
        f"({totals.utilization_percent:.0f}%); actions done {report.count('done')}, "
        f"skipped {report.count('skipped')}, failed {report.count('failed')}"
        + (" [dry run]" if dry_run else "")
    )
    if report.stopped_before_acting:
        line += f"; stopped before acting ({len(report.plan.actions)} action(s) not attempted)"
    return line


def describe_record(record: AuditRecord) -> str:
    detail = f" ({record.detail})" if record.detail else ""
    return f"  {record.outcome:<7} {record.action:<14} {record.target}: {record.reason}{detail}"


def run_standalone(
    policy_file: Path,
    *,
    dsn: str | None,
    once: bool,
    dry_run: bool,
    audit_file: Path | None,
    state_file: Path | None,
    revert: bool,
) -> int:
    """The body of ``pgrelief run``: check, connect, then one cycle or a loop until SIGTERM.

    Returns the exit status: 0, or 1 when a ``--once``/``--revert`` cycle had failed actions.
    """
    policy = load_policy(policy_file)
    store = StateStore(state_file or default_state_path(policy))
    audit = AuditLog(path=audit_file)
    audit.check()
    forced_dry_run = dry_run or policy.spec.remediation.mode == "DryRun"
    if not forced_dry_run:
        store.check()
    if policy.spec.pgbouncer.enabled:
        print(
            "note: spec.pgbouncer is reconciled by the operator only; pgrelief run ignores it",
            file=sys.stderr,
        )
    stopping = threading.Event()
    target = dsn if dsn is not None else policy_dsn(policy)
    with ManagedConnection(target, stopping=stopping) as connection:
        runner = Runner(
            policy,
            connection,
            store,
            audit,
            dry_run=dry_run,
            on_records=_print_records,
            stopping=stopping,
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        if once or revert:
            connection.get()
            _warn_about_lifeline(connection)
            report = runner.revert() if revert else runner.cycle()
            print(describe_summary(report, dry_run=runner.dry_run), flush=True)
            return EXIT_ACTIONS_FAILED if report.count("failed") else 0
        runner.loop(
            on_cycle=lambda report: print(
                describe_summary(report, dry_run=runner.dry_run), flush=True
            ),
        )
        return 0


def _warn_about_lifeline(connection: ManagedConnection) -> None:
    if connection.lifeline and connection.lifeline.advice():
        print(
            f"warning: {connection.lifeline.summary()}; fix: "
            + " ".join(connection.lifeline.advice()),
            file=sys.stderr,
        )


def _print_records(records: Sequence[AuditRecord]) -> None:
    lines = [describe_record(r) for r in records if r.outcome != "intent"]
    if lines:
        print("\n".join(lines), flush=True)
