"""Run Debian's pgbouncer on this machine the way the operator's pod would run it.

The manifests are proven by running them, not by reading them: ``LocalPgBouncer.from_pod``
takes the ConfigMap and Deployment pgrelief built, lays out the pod's volumes (the projected
ConfigMap + Secrets, the memory emptyDir) at the container paths the ini names, inside a
private mount namespace so the host's /etc and /run are untouched, and runs the container's
own command (``/bin/sh -c <start script>``) with its environment, as an unprivileged user,
with no new privileges and the open-files limits a container runtime would give. Only two
lines of the ini change: ``listen_addr`` and ``listen_port``, because a pod listens on every
address of its own network namespace while a test may listen on loopback only, on a free port
(or, playing a Pod whose IP is 127.x.y.z, on that address and the pod's own port).

``LocalPgBouncer.plain`` runs any other ini (the domain reference's example) the same way.
Needs root (for the mount namespace) and util-linux (unshare, prlimit, setpriv).
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Self

from pgrelief.errors import PgreliefError

BINARY_ENV = "PGRELIEF_PGBOUNCER"
DEFAULT_BINARY = Path("/usr/sbin/pgbouncer")
RUN_AS = "postgres"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_START_TIMEOUT_S = 30.0


class PgBouncerError(PgreliefError):
    """pgbouncer is missing, or could not be set up, started or stopped."""


def find_pgbouncer() -> Path:
    """``$PGRELIEF_PGBOUNCER`` or Debian's /usr/sbin/pgbouncer; PgBouncerError if absent."""
    binary = Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise PgBouncerError(
            f"no pgbouncer binary at {binary}: install Debian's pgbouncer "
            f"(apt-get install pgbouncer) or set {BINARY_ENV}"
        )
    return binary


def pgbouncer_version(binary: Path | None = None) -> tuple[int, int]:
    out = subprocess.run(
        [str(binary or find_pgbouncer()), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if found is None:
        raise PgBouncerError(f"cannot read the pgbouncer version from {out!r}")
    return int(found.group(1)), int(found.group(2))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def local_ini(ini: str, port: int, address: str = "127.0.0.1") -> str:
    """``ini`` listening on ``address``:``port`` instead of the pod's address; nothing else."""
    changed = ini
    for key, value in (("listen_addr", address), ("listen_port", str(port))):
        changed, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", changed, flags=re.M)
        if count != 1:
            raise PgBouncerError(f"the ini has {count} {key} lines, expected one")
    return changed


@dataclass(frozen=True, slots=True)
class Mount:
    """A directory of files the container sees at ``path`` (a pod volume's content)."""

    path: str
    files: Mapping[str, str]
    writable: bool = False


class LocalPgBouncer:
    """``with LocalPgBouncer(...) as pgb: ... pgb.port``: one pgbouncer in a mount namespace."""

    def __init__(
        self,
        command: Sequence[str],
        mounts: Sequence[Mount],
        *,
        env: Mapping[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
        port: int | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        if os.geteuid() != 0:
            raise PgBouncerError("running pgbouncer as a pod needs root (a mount namespace)")
        self.binary = find_pgbouncer()
        for tool in ("unshare", "prlimit", "setpriv", "mount"):
            if shutil.which(tool) is None:
                raise PgBouncerError(f"{tool} (util-linux) is needed to run pgbouncer as a pod")
        self.command = list(command)
        self.mounts = list(mounts)
        self.env = dict(env or {})
        self.nofile = nofile
        self.port = port or free_port()
        self.address = address
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_pod(
        cls,
        config_map: Mapping[str, Any],
        deployment: Mapping[str, Any],
        *,
        secrets: Mapping[tuple[str, str], str] | None = None,
        nofile: tuple[int, int] | None = None,
        listen: tuple[str, int] | None = None,
    ) -> LocalPgBouncer:
        """The pod of ``deployment``: its projected/emptyDir volumes, command and environment.

        ``secrets`` maps (Secret name, key) to the value the cluster would hold; ``listen``
        is (address, port) to listen on (default: 127.0.0.1 and a free port).
        """
        secrets = secrets or {}
        data = dict(config_map["data"])
        address, port = listen or ("127.0.0.1", free_port())
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = []
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            files: dict[str, str] = {}
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    if source["configMap"]["name"] != config_map["metadata"]["name"]:
                        raise PgBouncerError("the pod mounts a ConfigMap we were not given")
                    for item in source["configMap"]["items"]:
                        files[item["path"]] = local_ini(data[item["key"]], port, address)
                if "secret" in source:
                    name = source["secret"]["name"]
                    for item in source["secret"]["items"]:
                        files[item["path"]] = secrets[(name, item["key"])]
            mounts.append(
                Mount(mount["mountPath"], files, writable=not mount.get("readOnly", False))
            )
        env: dict[str, str] = {}
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            else:
                ref = variable["valueFrom"]["secretKeyRef"]
                env[variable["name"]] = secrets[(ref["name"], ref["key"])]
        return cls(container["command"], mounts, env=env, nofile=nofile, port=port, address=address)

    @classmethod
    def plain(
        cls,
        ini: str,
        *,
        config_dir: str = "/etc/pgbouncer",
        files: Mapping[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> LocalPgBouncer:
        """``pgbouncer <config_dir>/pgbouncer.ini`` with ``files`` next to it."""
        port = free_port()
        content = {"pgbouncer.ini": local_ini(ini, port), **(files or {})}
        return cls(
            ["pgbouncer", f"{config_dir}/pgbouncer.ini"],
            [Mount(config_dir, content)],
            nofile=nofile,
            port=port,
        )

    # ----------------------------------------------------------------- lifecycle
    @property
    def log_file(self) -> Path:
        if self._base is None:
            raise PgBouncerError("pgbouncer is not started")
        return self._base / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def process_group(self) -> int:
        """The pod's process group: its command and whatever that started (a session of its own)."""
        if self._process is None:
            raise PgBouncerError("pgbouncer is not started")
        return self._process.pid

    def start(self, *, wait: bool = True) -> Self:
        user = pwd.getpwnam(RUN_AS)
        self._base = Path(tempfile.mkdtemp(prefix="pgrelief-pgbouncer-"))
        self._base.chmod(0o755)
        script = ["set -e", "mount -t tmpfs -o mode=0755 pgrelief-run /run"]
        args: list[str] = []
        for index, mount in enumerate(self.mounts):
            source = self._base / f"volume{index}"
            source.mkdir()
            for name, text in mount.files.items():
                path = source / name
                path.write_text(text, encoding="utf-8")
                # What a projected volume with defaultMode 0440 and fsGroup looks like.
                os.chown(path, 0, user.pw_gid)
                path.chmod(0o440)
            if mount.writable:
                os.chown(source, user.pw_uid, user.pw_gid)
                source.chmod(0o700)
            else:
                source.chmod(0o755)
            target = os.path.realpath(mount.path)
            if not target.startswith("/run/") and not Path(target).is_dir():
                raise PgBouncerError(f"{mount.path} does not exist here to mount over")
            at, what = f"${{{index * 2 + 1}}}", f"${{{index * 2 + 2}}}"
            script.append(f'mkdir -p "{at}" && mount --bind "{what}" "{at}"')
            args += [target, str(source)]
        script.append(f"shift {len(args)}")
        script.append('exec "$@"')
        limits = [f"--nofile={self.nofile[0]}:{self.nofile[1]}"] if self.nofile else []
        environment = [
            f"{k}={v}" for k, v in {"PATH": _PATH, "HOME": "/nonexistent", **self.env}.items()
        ]
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            "\n".join(script),
            "pgrelief-pod",
            *args,
            "prlimit",
            *limits,
            "--",
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--no-new-privs",
            "--",
            "env",
            "-i",
            *environment,
            *self.command,
        ]
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        finally:
            log.close()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Until pgbouncer accepts TCP connections; PgBouncerError with its log if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise PgBouncerError(f"pgbouncer exited: {self.log().strip()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.address, self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise PgBouncerError(f"pgbouncer did not listen within {timeout}s: {self.log()[-2000:]}")

    def wait_exit(self, timeout: float = _START_TIMEOUT_S) -> int:
        if self._process is None:
            raise PgBouncerError("pgbouncer is not started")
        return self._process.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM to the pod's command, as the kubelet stops a container (``wait_exit``)."""
        if self._process is None:
            raise PgBouncerError("pgbouncer is not started")
        self._process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Safe shutdown, then SIGKILL to the whole process group: before 1.23 the pod's
        command is a shell with pgbouncer as its child, and killing the shell alone left
        pgbouncer running (a client's open transaction holds its safe shutdown forever)."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # 1.18: safe shutdown; the pod gets SIGTERM
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
