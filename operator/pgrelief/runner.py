"""``pgrelief run``: the whole pipeline in a loop, from a policy file, without Kubernetes.

One cycle is observe -> diagnose -> plan -> act over the persistent lifeline connection. What
must outlive a process lives in a small state file: the times of recent terminations (so
``maxPerHour`` holds across ``--once`` invocations run by cron) and the values found before
pgrelief first changed a limit or setting (so ``--revert`` can put them back).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgrelief.act import execute
from pgrelief.audit import AuditLog, AuditRecord
from pgrelief.connection import ManagedConnection
from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import Diagnosis
from pgrelief.errors import PgreliefError
from pgrelief.observe import take_snapshot
from pgrelief.plan import Plan, PlanHistory, plan, plan_revert
from pgrelief.policy import ConnectionPolicy
from pgrelief.policy_file import load_policy

log = logging.getLogger(__name__)

_HISTORY_WINDOW = timedelta(hours=1)


class StateFileError(PgreliefError):
    """The state file exists but cannot be read back."""


@dataclass
class RunState:
    """What one run leaves for the next: recent terminations and recorded originals."""

    terminations: list[datetime] = field(default_factory=list)
    originals: dict[str, Any] = field(default_factory=dict)

    def history(self, now: datetime) -> PlanHistory:
        recent = [t for t in self.terminations if now - t < _HISTORY_WINDOW]
        return PlanHistory(terminations=tuple(recent), originals=dict(self.originals))

    def absorb(self, records: list[AuditRecord], the_plan: Plan, now: datetime) -> None:
        done = [r for r in records if r.outcome == "done"]
        self.terminations = [t for t in self.terminations if now - t < _HISTORY_WINDOW]
        self.terminations.extend(r.ts for r in done if r.action == "terminate")
        if any(r.action != "terminate" for r in done):
            for key, value in the_plan.originals.items():
                self.originals.setdefault(key, value)


class StateStore:
    """JSON state file, written atomically so a killed process never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> RunState:
        if not self.path.exists():
            return RunState()
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return RunState(
                terminations=[datetime.fromisoformat(t) for t in raw.get("terminations", [])],
                originals=dict(raw.get("originals", {})),
            )
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise StateFileError(f"cannot read state file {self.path}: {error}") from None

    def save(self, state: RunState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(
            json.dumps(
                {
                    "terminations": [t.isoformat() for t in state.terminations],
                    "originals": state.originals,
                },
                indent=2,
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )
        os.replace(temporary, self.path)


def default_state_path(policy: ConnectionPolicy) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    namespace = policy.metadata.namespace or "default"
    return base / "pgrelief" / f"{namespace}.{policy.metadata.name}.json"


@dataclass(frozen=True)
class CycleReport:
    before: Diagnosis
    plan: Plan
    records: list[AuditRecord]


class Runner:
    """Drives cycles of one policy against one server."""

    def __init__(
        self,
        policy: ConnectionPolicy,
        connection: ManagedConnection,
        store: StateStore,
        audit: AuditLog,
        *,
        dry_run: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self.connection = connection
        self.store = store
        self.audit = audit
        self.dry_run = dry_run or policy.spec.remediation.mode == "DryRun"
        self.clock = clock
        self.state = store.load()
        self._reported_skips: set[tuple[int, datetime | None, str]] = set()

    @property
    def _policy_name(self) -> str:
        meta = self.policy.metadata
        return f"{meta.namespace or 'default'}/{meta.name}"

    def _options(self) -> DiagnoseOptions:
        pressure = self.policy.spec.pressure
        return DiagnoseOptions(
            warning_percent=pressure.warning_percent, critical_percent=pressure.critical_percent
        )

    def cycle(self) -> CycleReport:
        conn = self.connection.get()
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, self._options())
        now = self.clock()
        the_plan = plan(
            self.policy.spec, snapshot, diagnosis.pressure, self.state.history(now), now
        )
        records = self._carry_out(conn, the_plan, now)
        return CycleReport(before=diagnosis, plan=the_plan, records=records)

    def revert(self) -> CycleReport:
        conn = self.connection.get()
        snapshot = take_snapshot(conn)
        diagnosis = diagnose(snapshot, self._options())
        the_plan = plan_revert(self.policy.spec, snapshot, self.state.originals)
        records = execute(conn, the_plan.actions, dry_run=self.dry_run, policy=self._policy_name)
        self.audit.write(records)
        if not self.dry_run and all(r.outcome != "failed" for r in records):
            self.state.originals.clear()
            self.store.save(self.state)
        return CycleReport(before=diagnosis, plan=the_plan, records=records)

    def _carry_out(self, conn: Any, the_plan: Plan, now: datetime) -> list[AuditRecord]:
        records = execute(conn, the_plan.actions, dry_run=self.dry_run, policy=self._policy_name)
        records.extend(self._skip_records(the_plan, now))
        self.audit.write(records)
        if not self.dry_run:
            self.state.absorb(records, the_plan, now)
            self.store.save(self.state)
        return records

    def _skip_records(self, the_plan: Plan, now: datetime) -> list[AuditRecord]:
        # A protected session matches its rule every cycle; at a 250 ms interval re-recording it
        # would bury the real actions, so each (session, why) is reported once per runner.
        current = {(s.pid, s.candidate.backend_start, s.why) for s in the_plan.skipped}
        fresh = [
            s
            for s in the_plan.skipped
            if (s.pid, s.candidate.backend_start, s.why) not in self._reported_skips
        ]
        self._reported_skips = current
        return [
            AuditRecord(
                ts=now,
                action="terminate",
                target=skipped.target,
                reason=skipped.reason,
                evidence=skipped.evidence,
                dry_run=self.dry_run,
                outcome="skipped",
                detail=skipped.why,
                policy=self._policy_name,
            )
            for skipped in fresh
        ]

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
