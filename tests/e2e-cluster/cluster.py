"""A real single-node Kubernetes cluster for the end-to-end tests, and its exact undoing.

``start`` installs what is missing from Debian (containerd, runc, CNI plugins, buildah,
debootstrap, iptables, iproute2, conntrack), builds the Kubernetes binaries (build.sh) and the
images (images.py) or takes them from the cache, snapshots the machine (hostcheck.py), then
runs the whole node inside new pid/mount/network/uts/ipc/cgroup namespaces (nsinit.py is their
PID 1): etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet and
kube-proxy. Its only door to the machine is a loopback port forwarded to the API server; its
only machine-wide traces are the cgroups under ``pgrelief-e2e`` (created next to this
process's own) and its run directory. Both are recorded in state.json *before* they are made.

``stop`` undoes by that record, whatever state the last run died in: it stops the namespace's
PID 1 (the kernel then kills everything in it, and its mounts, links, routes and iptables
rules vanish with the namespaces), removes the cgroups and the run directory, and compares the
machine with the snapshot taken before the start: exit code 1 if anything differs.

    python3 tests/e2e-cluster/cluster.py start [--run-dir DIR]   # prints cluster.json
    python3 tests/e2e-cluster/cluster.py stop  [--run-dir DIR] [--keep-logs DIR]
    python3 tests/e2e-cluster/cluster.py status [--run-dir DIR]
    python3 tests/e2e-cluster/cluster.py image CONTEXT NAME [--build-arg K=V]  # build + import
        [--pip-wheelhouse DIR]                               # pip in RUN steps: offline
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import config
import hostcheck
import images
from cgroups import (
    cgroup_hierarchies,
    create_cgroups,
    new_cgroup_name,
    remove_cgroups,
    sweep_stale_cgroups,
)

HERE = Path(__file__).resolve().parent
APT_PACKAGES = {  # program -> Debian package
    "containerd": "containerd",
    "runc": "runc",
    f"{config.CNI_BIN_DIR}/bridge": "containernetworking-plugins",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "iptables": "iptables",
    "ip": "iproute2",
    "conntrack": "conntrack",
    "openssl": "openssl",
    "unshare": "util-linux",
    "gcc": "gcc",  # build.sh: the static pause binary
    "/usr/include/stdio.h": "libc6-dev",
}
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
# Where a run directory must not be: nsinit.py puts tmpfs over these inside the namespace.
FORBIDDEN_RUN_PARENTS = ("/run", "/var/lib", "/var/log")


class ClusterError(RuntimeError):
    """The cluster could not be started or stopped."""


def default_run_dir() -> Path:
    return images.cache_dir() / "e2e-run"


def log(message: str) -> None:
    print(f"e2e-cluster: {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- state and locking
@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One start or stop at a time on this machine: the cluster's names are fixed."""
    path = images.cache_dir() / "e2e-cluster.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def load_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((run_dir / "state.json").read_text())
    except FileNotFoundError:
        return None
    return state


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(run_dir / "state.json")


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a PID's identity over reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, start: str | None) -> bool:
    return pid is not None and start is not None and _start_time(pid) == start


# ---------------------------------------------------------------------- prerequisites
def ensure_packages() -> None:
    missing = sorted(
        {
            pkg
            for prog, pkg in APT_PACKAGES.items()
            if not (shutil.which(prog) or Path(prog).exists())
        }
    )
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Package scripts must not start a containerd of their own (outside our namespaces).
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not policy.exists()
    if created_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ClusterError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    finally:
        if created_policy:
            policy.unlink()


def build_binaries() -> Path:
    proc = subprocess.run(
        ["bash", str(HERE / "build.sh"), str(images.cache_dir())],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"build.sh failed (exit {proc.returncode})")
    return Path(lines[-1])


# ---------------------------------------------------------------------- talking to the cluster
def api_get(run_dir: Path, server: str, path: str) -> tuple[int, Any]:
    """GET from the API server as the cluster admin: (status, JSON body or None)."""
    p = config.Paths(run_dir)
    ctx = ssl.create_default_context(cafile=str(p.cert("ca")))
    ctx.load_cert_chain(str(p.cert("admin")), str(p.key("admin")))
    try:
        with urllib.request.urlopen(server + path, context=ctx, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def node_ready(run_dir: Path, server: str) -> bool:
    status, node = api_get(run_dir, server, f"/api/v1/nodes/{config.NODE_NAME}")
    if status != 200:
        return False
    conditions = node["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def import_images(run_dir: Path, built: dict[str, images.Image]) -> None:
    """Load the OCI archives into the node's containerd (namespace k8s.io, as the CRI uses)."""
    sock = config.Paths(run_dir).containerd_socket
    for image in built.values():
        cmd = [
            "ctr",
            "--address",
            str(sock),
            "-n",
            "k8s.io",
            "images",
            "import",
            str(image.archive),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ClusterError(f"importing {image.name}: {proc.stderr.strip()}")
    listed = subprocess.run(
        ["ctr", "--address", str(sock), "-n", "k8s.io", "images", "ls", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    missing = [i.name for i in built.values() if i.name not in listed]
    if missing:
        raise ClusterError(f"not in containerd after import: {missing} (have {listed})")


def log_tails(run_dir: Path, lines: int = 15) -> str:
    out = []
    for log_file in sorted((run_dir / "logs").glob("*.log")):
        tail = log_file.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log_file.name}\n" + "\n".join(tail))
    return "\n".join(out)


# ---------------------------------------------------------------------- start and stop
def start(run_dir: Path) -> dict[str, Any]:
    run_dir = run_dir.resolve()
    if any(run_dir.is_relative_to(parent) for parent in FORBIDDEN_RUN_PARENTS):
        raise ClusterError(f"the run directory cannot be under {', '.join(FORBIDDEN_RUN_PARENTS)}")
    if os.geteuid() != 0:
        raise ClusterError("the e2e cluster needs root (namespaces, cgroups, mounts)")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ensure_packages()
    bin_dir = build_binaries()
    timings["binaries_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    built = images.builder(bin_dir).all()
    timings["images_s"] = time.monotonic() - t1
    for short, image in built.items():
        timings[f"image_{short}_build_s"] = image.seconds

    with machine_lock():
        state = load_state(run_dir)
        if state is not None:
            if _alive(state.get("init_pid"), state.get("init_start")):
                raise ClusterError(f"a cluster is already running from {run_dir}: stop it first")
            log("cleaning up after a previous run that was not stopped")
            stop_locked(run_dir, keep_logs=None)
        swept, unswept = sweep_stale_cgroups()
        for path in swept:
            log(f"removed the cgroup tree a killed run left: {path}")
        if unswept:
            raise ClusterError(f"cgroups a killed run left could not be removed: {unswept}")
        run_dir.mkdir(parents=True)
        (run_dir / "logs").mkdir()
        hostcheck_file = run_dir / "host-before.json"
        hostcheck_file.write_text(json.dumps(hostcheck.snapshot()))
        state = {
            "run_dir": str(run_dir),
            "cgroup_name": new_cgroup_name(),
            "cgroups": [],
            "host_before": str(hostcheck_file),
        }
        save_state(run_dir, state)
        try:
            return _start_locked(run_dir, state, bin_dir, built, timings)
        except BaseException:
            log(f"start failed; logs:\n{log_tails(run_dir)}")
            stop_locked(run_dir, keep_logs=None)
            raise


def _start_locked(
    run_dir: Path,
    state: dict[str, Any],
    bin_dir: Path,
    built: dict[str, images.Image],
    timings: dict[str, float],
) -> dict[str, Any]:
    t_start = time.monotonic()
    p = config.Paths(run_dir)
    config.write_pki(p)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = f"https://127.0.0.1:{port}"
    config.write_kubeconfig(p.host_kubeconfig, server, p, "admin")
    mounts = [
        [str(h.relative_to("/sys/fs/cgroup")), fstype, opts]
        for h, fstype, opts in cgroup_hierarchies()
    ]
    config.write_plan(p, bin_dir, built["pause"].name, listener.fileno(), mounts)

    def record(path: Path) -> None:
        state["cgroups"].append(str(path))
        save_state(run_dir, state)

    cgroups = create_cgroups(state["cgroup_name"], record)

    # The shell joins the node's cgroups, then becomes unshare: the new cgroup namespace is
    # rooted there, and so is everything started inside.
    join = (
        'for cg in "$@"; do [ "$cg" = -- ] && break; echo $$ >"$cg"; shift; done; shift; exec "$@"'
    )
    cmd = [
        "sh", "-c", join, "sh", *(str(cg / "cgroup.procs") for cg in cgroups), "--",
        "unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
        "--propagation", "private", "--net", "--uts", "--ipc", "--cgroup",
        "--", sys.executable, str(HERE / "nsinit.py"), str(run_dir),
    ]  # fmt: skip
    with (run_dir / "logs" / "nsinit.log").open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=[listener.fileno()],
            start_new_session=True,  # a Ctrl-C meant for the caller does not reach the node
        )
    listener.close()
    state.update(unshare_pid=proc.pid, unshare_start=_start_time(proc.pid))
    save_state(run_dir, state)
    init_pid = _wait_for_child(proc.pid)
    state.update(init_pid=init_pid, init_start=_start_time(init_pid), server=server)
    save_state(run_dir, state)

    imported = False
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if time.monotonic() > deadline:
            raise ClusterError(f"the node is not Ready after {START_TIMEOUT_S} s")
        if proc.poll() is not None:
            raise ClusterError(f"the namespace's init exited ({proc.returncode})")
        status = _status(run_dir)
        if status.get("phase") == "failed" or status.get("error"):
            raise ClusterError(f"node start failed: {status.get('error')}")
        started = status.get("services", {})
        if not imported and "kubelet" in started:  # containerd is up
            timings["control_plane_and_containerd_s"] = time.monotonic() - t_start
            t_import = time.monotonic()
            # The base image is only built FROM (by buildah); the node never runs it.
            import_images(run_dir, {k: v for k, v in built.items() if k != "base"})
            timings["image_import_s"] = time.monotonic() - t_import
            imported = True
        if imported and status.get("phase") == "running" and node_ready(run_dir, server):
            break
        time.sleep(0.2)
    timings["start_to_node_ready_s"] = time.monotonic() - t_start
    info = {
        "kubeconfig": str(p.host_kubeconfig),
        "server": server,
        "node": config.NODE_NAME,
        "node_ip": config.NODE_IP,
        "pod_subnet": config.POD_SUBNET,
        "service_cidr": config.SERVICE_CIDR,
        "images": {short: image.name for short, image in built.items()},
        "image_archives": {short: str(image.archive) for short, image in built.items()},
        "run_dir": str(run_dir),
        "netns": f"/proc/{init_pid}/ns/net",
        "init_pid": init_pid,
        "containerd_socket": str(p.containerd_socket),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (run_dir / "cluster.json").write_text(json.dumps(info, indent=1))
    return info


def _wait_for_child(parent: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.01)
    raise ClusterError("unshare did not start the namespace's init")


def _status(run_dir: Path) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status


def stop(run_dir: Path, keep_logs: Path | None) -> int:
    with machine_lock():
        return stop_locked(run_dir.resolve(), keep_logs)


def stop_locked(run_dir: Path, keep_logs: Path | None) -> int:
    state = load_state(run_dir)
    if state is None:
        log(f"no cluster recorded in {run_dir}")
        return 0
    log(f"stopping the cluster recorded in {run_dir}")
    for pid_key, start_key, sig in (
        ("init_pid", "init_start", signal.SIGTERM),
        ("unshare_pid", "unshare_start", signal.SIGKILL),
    ):
        pid, started = state.get(pid_key), state.get(start_key)
        if not _alive(pid, started):
            continue
        assert pid is not None
        os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid, started) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _alive(pid, started):
            log(f"{pid_key} {pid} did not stop in {STOP_TIMEOUT_S} s: killing it")
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGUSR1)  # nsinit.py dumps its threads' stacks
                time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)  # the kernel kills the whole PID namespace with it
            while _alive(pid, started):
                _reap(pid)
                time.sleep(0.1)
        log(f"{pid_key} {pid} is gone")
    log("namespace stopped")
    left = remove_cgroups(state["cgroups"])
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for name in ("logs", "pod-logs"):
            if (run_dir / name).is_dir():
                shutil.copytree(run_dir / name, keep_logs / name, dirs_exist_ok=True)
        log("logs kept")
    before = None
    with contextlib.suppress(OSError, ValueError):
        before = json.loads(Path(state["host_before"]).read_text())
    log("cgroups removed")
    mounted = [m for m in hostcheck.snapshot()["mounts"] if f" {run_dir}" in f" {m}"]
    if mounted:
        raise ClusterError(f"refusing to remove {run_dir}: still mounted: {mounted}")
    log("nothing mounted under the run directory")
    # rm -rf is ~3x faster than shutil.rmtree on containerd's unpacked layers; and it does
    # not cross into another filesystem should anything be mounted after the check above.
    subprocess.run(["rm", "-rf", "--one-file-system", str(run_dir)], check=True)
    log("run directory removed")
    if left:
        log(f"cgroups that could not be removed: {left}")
    if before is None:
        log("no snapshot from before the start: nothing to compare with")
        return 1 if left else 0
    diffs, noise = hostcheck.compare(before, hostcheck.snapshot(), state.get("cgroup_name"))
    for line in noise:
        log(f"(not ours) {line}")
    for line in diffs:
        log(f"left behind: {line}")
    log(f"stopped; {len(diffs)} difference(s) from before the start")
    return 1 if diffs or left else 0


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def build_and_import(
    run_dir: Path,
    context: Path,
    short_name: str,
    build_args: dict[str, str],
    wheelhouse: Path | None = None,
) -> images.Image:
    """Build a Dockerfile here (FROM the local base by default: ``BASE_IMAGE``) and load it
    into the running cluster's containerd: the hook for the project's own Dockerfile, whose
    ``pip install`` runs offline from ``wheelhouse`` when one is given."""
    state = load_state(run_dir.resolve())
    if state is None or not _alive(state.get("init_pid"), state.get("init_start")):
        raise ClusterError(f"no cluster running from {run_dir}")
    b = images.builder(build_binaries())
    b.base()
    volumes = images.offline_pip(wheelhouse, b.root) if wheelhouse else None
    image = b.build_dockerfile(context, short_name, build_args=build_args, volumes=volumes)
    import_images(run_dir.resolve(), {short_name: image})
    return image


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status", "image"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--run-dir", type=Path, default=default_run_dir())
        if name == "stop":
            cmd.add_argument("--keep-logs", type=Path, help="copy the logs here first")
        if name == "image":
            cmd.add_argument("context", type=Path, help="directory with the Dockerfile")
            cmd.add_argument("name", help="the image becomes localhost/pgrelief/NAME:e2e")
            cmd.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
            cmd.add_argument(
                "--pip-wheelhouse", type=Path, help="RUN steps' pip installs from here only"
            )
    args = parser.parse_args(argv)
    # A SIGTERM to a start in progress unwinds like Ctrl-C: the half-started node is undone.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    try:
        if args.command == "start":
            print(json.dumps(start(args.run_dir), indent=1))
            return 0
        if args.command == "image":
            extra = dict(kv.split("=", 1) for kv in args.build_arg)
            image = build_and_import(
                args.run_dir, args.context, args.name, extra, args.pip_wheelhouse
            )
            built = {"name": image.name, "archive": str(image.archive), "seconds": image.seconds}
            print(json.dumps(built))
            return 0
        if args.command == "stop":
            return stop(args.run_dir, args.keep_logs)
        state = load_state(args.run_dir.resolve())
        running = state is not None and _alive(state.get("init_pid"), state.get("init_start"))
        info = args.run_dir / "cluster.json"
        print(info.read_text() if running and info.exists() else "not running")
        return 0 if running else 3
    except (ClusterError, images.ImageError) as exc:
        log(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
