"""The e2e node's cgroups: one ``pgrelief-e2e`` directory per hierarchy, next to the caller's.

The node's cgroup namespace is rooted there, so everything the kubelet and runc create lands
under it (and the caller's own limits still apply). These directories are the only
machine-wide thing a running node adds; ``cluster.py`` records each before making it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_NAME = "pgrelief-e2e"


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


def create_cgroups(record: Callable[[Path], None]) -> list[Path]:
    """pgrelief-e2e next to this process's cgroup in every hierarchy: the node's cgroup root.
    ``record`` is called with each path before it is made, so a stop removes it either way."""
    made: list[Path] = []
    for hierarchy, fstype, options in cgroup_hierarchies():
        path = hierarchy / own_cgroup(hierarchy, fstype, options).lstrip("/") / CGROUP_NAME
        record(path)
        path.mkdir()
        if "cpuset" in options.split(","):
            # A cpuset cgroup takes no process until it has CPUs and memory nodes.
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((path.parent / name).read_text())
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
