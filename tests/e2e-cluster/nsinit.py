"""PID 1 of the e2e cluster's namespaces (pid, mount, network, uts, ipc, cgroup).

``cluster.py`` starts this under ``unshare``. It gives the node a private view of the machine
(its own /sys and cgroup mounts, tmpfs over /run, /var/lib and /var/log, its own
resolv.conf and hosts, kernel tunables the kubelet insists on shown as files instead of being
set machine-wide, a port-less bridge with the node address), starts the daemons of plan.json in
order, each once the previous one is ready, and forwards the host-side loopback socket it
inherited to the API server. On SIGTERM it stops the daemons newest first, then kills what is
left; when it exits, the kernel kills anything remaining in the PID namespace and the mounts,
links, addresses, routes and iptables rules of the namespaces disappear with them.

    unshare ... python3 nsinit.py RUN_DIR        (never run directly)
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

STOP_GRACE_S = 10.0


class Init:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.plan: dict[str, Any] = json.loads((run_dir / "plan.json").read_text())
        self.logs = run_dir / "logs"
        self.status_file = run_dir / "status.json"
        self.children: dict[int, str] = {}  # pid -> service name
        self.exited: dict[str, int] = {}
        self.stopping = False
        self.phase = "setup"
        self.lock = threading.Lock()
        # Until setup's own commands are done, reaping any child would steal their exit
        # status from subprocess.run (which then reports success).
        self.reaping = threading.Event()

    # ------------------------------------------------------------------ status
    def write_status(self, phase: str, error: str | None = None) -> None:
        with self.lock:
            self.phase = phase
            status = {
                "phase": phase,
                "error": error,
                "services": {name: pid for pid, name in self.children.items()},
                "exited": self.exited,
                "time": time.time(),
            }
            tmp = self.status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(status))
            tmp.replace(self.status_file)

    def log(self, message: str) -> None:
        print(f"nsinit: {time.strftime('%H:%M:%S')} {message}", flush=True)

    # ------------------------------------------------------------------ the node's view
    def setup(self) -> None:
        plan = self.plan
        run = _run
        socket.sethostname(plan["hostname"])
        # Private already (unshare); shared inside, as the kubelet expects for its volumes.
        run("mount", "--make-rshared", "/")
        # /sys of this network namespace (/sys/class/net shows the node's links), then the
        # cgroup hierarchies as seen from the cgroup namespace: the node's root is the cgroup
        # cluster.py created, so the kubelet's /kubepods lands under it.
        run("mount", "-t", "sysfs", "sysfs", "/sys")
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "cgroup", "/sys/fs/cgroup")
        for name, fstype, options in plan["cgroup_mounts"]:
            target = Path("/sys/fs/cgroup", name)
            target.mkdir()
            run("mount", "-t", fstype, "-o", options, fstype, str(target))
        # Where a node's programs write by default, whatever their configuration says.
        for path in ("/run", "/var/lib", "/var/log"):
            run("mount", "-t", "tmpfs", "-o", "mode=0755", "pgrelief-e2e", path)
        for name in ("resolv.conf", "hosts"):
            run("mount", "--bind", str(self.run_dir / "etc" / name), f"/etc/{name}")
        # The kubelet requires these kernel settings (protectKernelDefaults refuses to start
        # otherwise, and without it the kubelet would change them for the whole machine).
        # The node sees files with the values it wants; the machine keeps its own.
        masks = self.run_dir / "etc" / "sysctl"
        for key, value in plan["masked_sysctls"].items():
            source = masks / key.replace("/", ".")
            source.write_text(f"{value}\n")
            run("mount", "--bind", str(source), f"/proc/sys/{key}")
        # The node's network: loopback, and a bridge with no ports holding the node address
        # (this kernel has no dummy links). The default route points into it, and a bridge
        # without ports drops what it is sent: nothing leaves the namespace.
        net = plan["network"]
        run("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", net["link"], "type", "bridge")
        run("ip", "addr", "add", net["node_cidr"], "dev", net["link"])
        run("ip", "link", "set", net["link"], "up")
        run("ip", "route", "add", "default", "dev", net["link"])
        for key, value in plan["netns_sysctls"].items():
            Path("/proc/sys", key).write_text(f"{value}\n")

    # ------------------------------------------------------------------ daemons
    def start_services(self) -> None:
        self.logs.mkdir(exist_ok=True)
        for service in self.plan["services"]:
            if self.stopping:
                return
            name = service["name"]
            self.write_status(f"starting {name}")
            self.log(f"starting {name}")
            with (self.logs / f"{name}.log").open("ab") as log:
                proc = subprocess.Popen(
                    service["argv"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**self.plan["env"], **service.get("env", {})},
                    cwd=self.run_dir,
                )
            with self.lock:
                self.children[proc.pid] = name
            self.wait_ready(name, service.get("ready"), service.get("timeout", 120))
            self.log(f"{name} ready")
        self.write_status("running")

    def wait_ready(self, name: str, ready: dict[str, Any] | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "not checked yet"
        while time.monotonic() < deadline:
            if name in self.exited:
                raise RuntimeError(f"{name} exited with code {self.exited[name]}")
            if ready is None:
                return
            ok, last = _probe(ready)
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout:.0f} s ({last})")

    def reap(self) -> None:
        if not self.reaping.is_set():
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with self.lock:
                name = self.children.pop(pid, None)
                if name is not None:
                    self.exited[name] = os.waitstatus_to_exitcode(status)
            if name is not None and not self.stopping:
                self.log(f"{name} exited with code {self.exited[name]}")
                self.write_status(self.phase, f"{name} exited with code {self.exited[name]}")

    def stop(self) -> None:
        self.stopping = True
        with self.lock:
            order = sorted(self.children.items(), reverse=True)  # newest first
        for pid, name in order:
            self.log(f"stopping {name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while pid in self.children and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)
        # Containers, shims, whatever is left in this PID namespace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        time.sleep(0.2)
        self.reap()

    # ------------------------------------------------------------------ API server forwarding
    def forward(self) -> None:
        fwd = self.plan["forward"]
        listener = socket.socket(fileno=fwd["fd"])
        target = (fwd["host"], fwd["port"])
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_splice, args=(conn, target), daemon=True).start()


def _splice(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    other.start()
    pump(client, upstream)
    other.join()
    client.close()
    upstream.close()


def _probe(ready: dict[str, Any]) -> tuple[bool, str]:
    try:
        if "unix" in ready:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(ready["unix"])
            return True, "ok"
        if "url" in ready:
            ctx = None
            if ready["url"].startswith("https"):
                ctx = ssl.create_default_context(cafile=ready["ca"])
                ctx.load_cert_chain(ready["cert"], ready["key"])
            with urllib.request.urlopen(ready["url"], context=ctx, timeout=2) as resp:
                body = resp.read(200).decode(errors="replace")
                return resp.status == 200, f"{resp.status} {body}"
        if "alive" in ready:
            time.sleep(ready["alive"])
            return True, "alive"
    except (OSError, ssl.SSLError) as exc:
        return False, str(exc)
    raise ValueError(f"unknown readiness check {ready}")


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


def main() -> int:
    # cluster.py sends SIGUSR1 before it gives up on a graceful stop: the log shows where.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    init = Init(Path(sys.argv[1]))

    # Signal handlers only set a flag: taking a lock in one (threading.Event.set does) can
    # deadlock against the very thread it interrupted.
    def on_term(_sig: int, _frame: object) -> None:
        init.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def boot() -> None:
        try:
            init.setup()
            init.reaping.set()
            threading.Thread(target=init.forward, daemon=True).start()
            init.start_services()
        except Exception as exc:
            init.log(f"failed: {exc}")
            init.write_status("failed", str(exc))
            init.stopping = True

    init.write_status("setup")
    threading.Thread(target=boot, daemon=True).start()
    while not init.stopping:
        time.sleep(0.2)
        init.reap()
    init.reaping.set()
    init.stop()
    if init.phase != "failed":
        init.write_status("stopped")
    init.log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
