"""The lifeline: one persistent monitoring connection that survives a full server.

When the server refuses clients, a tool that opens a fresh connection per cycle is locked out
exactly when it is needed. pgrelief opens one autocommit connection, keeps it across cycles,
bounds every statement it runs (statement_timeout, lock_timeout) so it can never become part
of the pile-up, reconnects with backoff when it is lost, and reports whether its role may use
the reserved slots that let it back in when everything else is taken.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from pgrelief.advice import quote_ident
from pgrelief.errors import ConnectFailed, ServerRefused
from pgrelief.observe import connect

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgrelief"
STATEMENT_TIMEOUT = "5s"
LOCK_TIMEOUT = "1s"

_LIFELINE_QUERY = sql.SQL(
    """
    select current_user::text,
           r.rolsuper,
           current_setting('server_version_num')::int,
           current_setting('superuser_reserved_connections')::int,
           coalesce(current_setting('reserved_connections', true), '0')::int,
           coalesce((select pg_has_role(current_user, g.oid, 'USAGE')
                       from pg_roles g where g.rolname = 'pg_use_reserved_connections'), false)
      from pg_roles r
     where r.rolname = current_user
    """
)


@dataclass(frozen=True, slots=True)
class Lifeline:
    """Whether our role can still get in when ordinary clients are refused."""

    role: str
    is_superuser: bool
    may_use_reserved_role: bool  # PG16+: member of pg_use_reserved_connections
    superuser_reserved_connections: int
    reserved_connections: int
    version_num: int

    @property
    def reserved_slots_for_us(self) -> int:
        if self.is_superuser:
            return self.superuser_reserved_connections + self.reserved_connections
        if self.may_use_reserved_role:
            return self.reserved_connections
        return 0

    def advice(self) -> list[str]:
        """What to grant or set so the next reconnect during an outage succeeds."""
        if self.reserved_slots_for_us > 0:
            return []
        role = quote_ident(self.role)
        if self.version_num >= 160000:
            lines = [f"GRANT pg_use_reserved_connections TO {role};"]
            if self.reserved_connections == 0:
                lines.append("ALTER SYSTEM SET reserved_connections = '3';  -- needs a restart")
            return lines
        return [
            f"-- PostgreSQL {self.version_num // 10000} has no reserved slots for "
            "non-superusers (pg_use_reserved_connections is PG16+): keep pgrelief's "
            "connection open, or run it as a superuser"
        ]

    def summary(self) -> str:
        slots = self.reserved_slots_for_us
        if slots:
            return f"role {self.role!r} can use {slots} reserved slot(s) when the server is full"
        return f"role {self.role!r} cannot use any reserved slot when the server is full"


class _Watchdog:
    """One thread that runs every connection's deadline, however many connections there are.

    Every cycle arms a deadline and disarms it milliseconds later. A ``threading.Timer`` per
    cycle is a thread started (and waited for) per cycle: at the operator's 100 cycles a second
    that was the largest cost of a cycle after the cycle's own work. Disarmed deadlines are
    dropped lazily, all at once, when the thread next wakes.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int]] = []  # a heap of (time.monotonic(), token)
        self._actions: dict[int, Callable[[], None]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, seconds: float, action: Callable[[], None]) -> int:
        """Run ``action`` on the watchdog's thread in ``seconds``, unless cancelled first."""
        with self._changed:
            token = next(self._tokens)
            self._actions[token] = action
            heapq.heappush(self._due, (time.monotonic() + seconds, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pgrelief-deadlines", daemon=True
                )
                self._thread.start()
            elif self._due[0][1] == token:
                self._changed.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._changed:
            self._actions.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._due and self._due[0][1] not in self._actions:
                        heapq.heappop(self._due)
                    left = self._due[0][0] - time.monotonic() if self._due else None
                    if left is not None and left <= 0:
                        break
                    self._changed.wait(left)
                action = self._actions.pop(heapq.heappop(self._due)[1])
            try:
                action()
            except Exception:  # a deadline that cannot cut must not stop the others
                log.exception("a connection deadline failed")


_WATCHDOG = _Watchdog()


class ManagedConnection:
    """The persistent autocommit connection, reopened with exponential backoff when lost."""

    def __init__(
        self,
        dsn: str | Callable[[], str],
        *,
        statement_timeout: str = STATEMENT_TIMEOUT,
        lock_timeout: str = LOCK_TIMEOUT,
        reconnect_within_s: float = 10.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self._dsn = dsn
        self._statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        self._reconnect_within_s = reconnect_within_s
        # Set when the process is stopping: reconnect attempts end at once instead of retrying.
        self._stopping = stopping or threading.Event()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self.lifeline: Lifeline | None = None
        self._guard = threading.Lock()
        self._armed = False
        self._timer: int | None = None  # the watchdog's token for the armed deadline
        self.expired = 0  # deadlines that had to cut the connection

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        """The open connection, reconnecting first when it was closed or broken."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop()
        retrying = Retrying(
            retry=retry_if_exception_type((ServerRefused, ConnectFailed)),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=stop_after_delay(self._reconnect_within_s) | stop_when_event_set(self._stopping),
            sleep=self._pause,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                self._conn = self._open()
        assert self._conn is not None
        return self._conn

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _open(self) -> psycopg.Connection[tuple[object, ...]]:
        # A provider is asked again at every reconnect: a rotated password is picked up.
        dsn = self._dsn() if callable(self._dsn) else self._dsn
        conn = connect(dsn, application_name=APPLICATION_NAME)
        conn.autocommit = True
        conn.execute(
            sql.SQL(
                "select set_config('statement_timeout', {}, false),"
                " set_config('lock_timeout', {}, false)"
            ).format(sql.Literal(self._statement_timeout), sql.Literal(self._lock_timeout))
        )
        row = conn.execute(_LIFELINE_QUERY).fetchone()
        if row is not None:
            self.lifeline = Lifeline(
                role=str(row[0]),
                is_superuser=bool(row[1]),
                version_num=int(str(row[2])),
                superuser_reserved_connections=int(str(row[3])),
                reserved_connections=int(str(row[4])),
                may_use_reserved_role=bool(row[5]),
            )
            if self.lifeline.reserved_slots_for_us == 0:
                log.warning(
                    "%s; fix: %s", self.lifeline.summary(), " ".join(self.lifeline.advice())
                )
        return conn

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Bound everything done on the connection inside the block to ``seconds``.

        statement_timeout is enforced by the server, so it does nothing when the server is
        frozen (a stopped backend) or cut off by a partition while the kernel still
        acknowledges: the client would wait forever, deaf to SIGTERM. When the deadline
        passes, the socket is shut down under libpq, whose wait then fails at once; the
        connection counts as lost and the next ``get`` reconnects.
        """
        with self._guard:
            self._armed = True
            self._arm(seconds)
        try:
            yield
        finally:
            with self._guard:
                self._armed = False
                if self._timer is not None:
                    _WATCHDOG.cancel(self._timer)
                    self._timer = None

    def expire_within(self, seconds: float) -> None:
        """Shorten a running deadline (a stop was asked for): at most ``seconds`` more."""
        with self._guard:
            if self._armed:
                self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            _WATCHDOG.cancel(self._timer)
        self._timer = _WATCHDOG.schedule(seconds, self._expire)

    def _expire(self) -> None:
        with self._guard:
            if not self._armed or self._conn is None or self._conn.closed:
                return
            self.expired += 1
            try:
                # A duplicate descriptor: shutting it down cuts the shared socket for libpq
                # without closing libpq's own descriptor under it.
                with socket.socket(fileno=os.dup(self._conn.fileno())) as cut:
                    cut.shutdown(socket.SHUT_RDWR)
            except (OSError, psycopg.Error):
                log.debug("could not shut down the connection's socket", exc_info=True)

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                log.debug("closing a broken connection failed", exc_info=True)
        self._conn = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ManagedConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
