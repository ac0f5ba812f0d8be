"""The e2e node's cgroups: one ``pgrelief-e2e-<run>`` directory per hierarchy, next to the caller's.

The node's cgroup namespace is rooted there, so everything the kubelet and runc create lands
under it (and the caller's own limits still apply). These directories are the only
machine-wide thing a running node adds; ``cluster.py`` records each before making it.

The cgroup filesystem is the kernel's, and other sandboxes on the same kernel (a CI run next
to a developer's) see it too: each run names its directories uniquely, and a start first
sweeps away the empty trees a killed run left (a tree with a process in it is somebody's
running node and is left alone).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_PREFIX = "pgrelief-e2e"
# A tree younger than this may be a concurrent start between its mkdir and its first process.
STALE_AFTER_S = 120.0


def new_cgroup_name() -> str:
    return f"{CGROUP_PREFIX}-{secrets.token_hex(4)}"


def is_e2e_cgroup_name(name: str) -> bool:
    return name == CGROUP_PREFIX or name.startswith(f"{CGROUP_PREFIX}-")


def cgroup_hierarchies() -> list[tuple[Path, str, str]]:
    """(mount point, fstype, super options) of every cgroup hierarchy of this machine."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype in ("cgroup", "cgroup2"):
            opts = [o for o in options.split(",") if o not in ("rw", "ro")]
            found.append((Path(fields[4]), fstype, ",".join(opts) or "rw"))
    return found


def own_cgroup(hierarchy: Path, fstype: str, options: str) -> str:
    """This process's cgroup in a hierarchy, from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        names = set(controllers.split(",")) if controllers else set()
        if (fstype == "cgroup2" and not controllers) or (
            names and names <= set(options.split(","))
        ):
            return path
    return "/"


def _own_dirs() -> list[tuple[Path, str]]:
    """(this process's cgroup directory, the hierarchy's options) for every hierarchy."""
    return [
        (hierarchy / own_cgroup(hierarchy, fstype, options).lstrip("/"), options)
        for hierarchy, fstype, options in cgroup_hierarchies()
    ]


def _holds_processes(root: Path) -> bool:
    for dirpath, _, _ in os.walk(root):
        with contextlib.suppress(OSError):
            if (Path(dirpath) / "cgroup.procs").read_text().strip():
                return True
    return False


def stale_cgroups(now: float | None = None) -> list[Path]:
    """e2e cgroup trees that no process uses any more and that are not being set up."""
    now = time.time() if now is None else now
    stale = []
    for parent, _ in _own_dirs():
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                if not (child.is_dir() and is_e2e_cgroup_name(child.name)):
                    continue
                if now - child.stat().st_mtime < STALE_AFTER_S or _holds_processes(child):
                    continue
                stale.append(child)
    return stale


def sweep_stale_cgroups() -> tuple[list[str], list[str]]:
    """Remove what a killed run left: (trees removed, directories that would not go)."""
    stale = [str(path) for path in stale_cgroups()]
    return stale, remove_cgroups(stale)


def create_cgroups(name: str, record: Callable[[Path], None]) -> list[Path]:
    """``name`` next to this process's cgroup in every hierarchy: the node's cgroup root.
    ``record`` is called with each path before it is made, so a stop removes it either way."""
    made: list[Path] = []
    for parent, options in _own_dirs():
        path = parent / name
        record(path)
        path.mkdir()
        if "cpuset" in options.split(","):
            # A cpuset cgroup takes no process until it has CPUs and memory nodes.
            for setting in ("cpuset.cpus", "cpuset.mems"):
                (path / setting).write_text((path.parent / setting).read_text())
        made.append(path)
    return made


def remove_cgroups(paths: list[str]) -> list[str]:
    """Kill what is left in them, remove them deepest first; return what could not go."""
    left = []
    for root in map(Path, paths):
        if not root.exists():
            continue
        dirs = sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda d: len(d.parts))
        for d in reversed(dirs):
            began = time.monotonic()
            deadline = began + 10
            while d.exists():
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(str(d))
                        break
                    time.sleep(0.1)
            if time.monotonic() - began > 1:
                print(f"e2e-cluster: removing {d} took {time.monotonic() - began:.1f} s")
    return left
