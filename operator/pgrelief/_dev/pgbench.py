"""Real client load for the pooler tests and benchmarks: pgbench, and a backend sampler.

A pooler is judged by what its clients and the server see: pgbench reports how many of its
clients connected and finished their transactions, and ``BackendSampler`` counts, every few
milliseconds on the server, the backends the pooled roles hold, so "never more server
connections than the pool" is measured rather than assumed.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from psycopg import sql

from pgrelief._dev.embedded import EmbeddedPostgres

PGBENCH_ENV = "PGRELIEF_PGBENCH"
DEFAULT_PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")


def pgbench_path() -> Path:
    return Path(os.environ.get(PGBENCH_ENV) or DEFAULT_PGBENCH)


@dataclass(frozen=True, slots=True)
class PgbenchRun:
    """One pgbench run: its exit status, output, and the numbers it printed."""

    returncode: int | None  # None: killed at the timeout (clients hung)
    stdout: str
    stderr: str
    clients: int
    processed: int | None
    expected: int | None
    failed_transactions: int | None
    tps: float | None
    seconds: float

    @property
    def completed(self) -> bool:
        return self.returncode == 0 and self.processed == self.expected

    def error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if "error" in line or "FATAL" in line]
        return lines[0] if lines else ""


def run_pgbench(
    arguments: Sequence[str],
    *,
    port: int,
    user: str,
    password: str,
    dbname: str,
    clients: int = 1,
    timeout: float = 300,
) -> PgbenchRun:
    """pgbench over TCP to 127.0.0.1:``port`` (a server or a pooler); a hang is a result."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": password, "LC_ALL": "C"}
    dsn = f"host=127.0.0.1 port={port} user={user} dbname={dbname}"
    argv = [str(pgbench_path()), *arguments, dsn]
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        code: int | None = done.returncode
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as hung:
        code = None
        stdout = _text(hung.stdout)
        stderr = _text(hung.stderr)
    seconds = time.monotonic() - started
    processed = re.search(r"actually processed: (\d+)(?:/(\d+))?", stdout)
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", stdout)
    return PgbenchRun(
        returncode=code,
        stdout=stdout,
        stderr=stderr,
        clients=clients,
        processed=int(processed.group(1)) if processed else None,
        expected=int(processed.group(2)) if processed and processed.group(2) else None,
        failed_transactions=int(failed.group(1)) if failed else None,
        tps=float(tps.group(1)) if tps else None,
        seconds=seconds,
    )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class BackendSampler:
    """``with BackendSampler(pg, roles) as s: ...; s.peak``: the most client backends of
    ``roles`` seen at once, sampled every ``every`` seconds on a superuser connection."""

    def __init__(self, pg: EmbeddedPostgres, roles: Sequence[str], every: float = 0.01) -> None:
        self.pg = pg
        self.roles = list(roles)
        self.every = every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            with self.pg.connect() as conn:
                while not self._stop.is_set():
                    row = conn.execute(
                        "select count(*) from pg_stat_activity "
                        "where backend_type = 'client backend' and usename = any(%s)",
                        (self.roles,),
                    ).fetchone()
                    count = row[0] if row else 0
                    self.peak = max(self.peak, count if isinstance(count, int) else 0)
                    self.samples += 1
                    time.sleep(self.every)
        except BaseException as failure:  # reported by __exit__, never lost in the thread
            self._error = failure

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None and exc is None:
            raise RuntimeError(f"the backend sampler failed: {self._error}") from self._error


@dataclass(frozen=True, slots=True)
class PgbenchDatabase:
    """An application database initialised for pgbench, owned by a role with a SCRAM password,
    and the lookup role PgBouncer's auth_query logs in as (``prepare``)."""

    pg: EmbeddedPostgres
    database: str = "appdb"
    app_role: str = "app"
    app_password: str = "app secret pw"
    auth_role: str = "pgbouncer_auth"
    auth_password: str = 'lookup "pw" x'  # a double quote: userlist.txt must escape it

    def prepare(self, scale: int = 1) -> PgbenchDatabase:
        self.pg.create_role(self.app_role, password=self.app_password)
        self.pg.create_role(self.auth_role, password=self.auth_password)
        with self.pg.connect() as conn:
            conn.execute(
                sql.SQL("create database {} owner {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.app_role)
                )
            )
        init = self.pgbench(["-i", "-s", str(scale), "-q"], port=self.pg.port)
        if not init.completed and init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {init.stderr.strip()[-500:]}")
        return self

    def pgbench(
        self, arguments: Sequence[str], *, port: int, clients: int = 1, timeout: float = 300
    ) -> PgbenchRun:
        """pgbench as the application role against ``port`` (the server or a pooler)."""
        return run_pgbench(
            arguments,
            port=port,
            user=self.app_role,
            password=self.app_password,
            dbname=self.database,
            clients=clients,
            timeout=timeout,
        )

    def sampler(self) -> BackendSampler:
        """Counts the backends of the application and lookup roles."""
        return BackendSampler(self.pg, [self.app_role, self.auth_role])
