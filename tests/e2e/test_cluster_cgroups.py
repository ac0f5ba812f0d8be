"""The cluster's only machine-wide traces are its cgroups, and the cgroup filesystem is shared by
every sandbox on the kernel (a CI job ran next to a developer's killed run and failed on
``FileExistsError: /sys/fs/cgroup/cpu/pgrelief-e2e``). Each run names its root uniquely, a start
sweeps the empty trees a killed run left and never touches a tree with a process in it, and the
machine check after a stop counts only the run's own tree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures.e2e import HARNESS

pytestmark = pytest.mark.e2e


def _harness_module(name: str) -> ModuleType:
    if str(HARNESS) not in sys.path:
        sys.path.insert(0, str(HARNESS))  # the harness modules import their siblings by name
    spec = importlib.util.spec_from_file_location(name, HARNESS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cgroups = _harness_module("cgroups")
hostcheck = _harness_module("hostcheck")


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """This process's directory in the first cgroup hierarchy; test trees are removed after."""
    parent, _ = cgroups._own_dirs()[0]
    before = set(parent.iterdir())
    yield parent
    leftovers = [str(p) for p in set(parent.iterdir()) - before]
    assert cgroups.remove_cgroups(leftovers) == []


def test_run_names_are_unique_and_recognised() -> None:
    names = {cgroups.new_cgroup_name() for _ in range(50)}
    assert len(names) == 50
    assert all(cgroups.is_e2e_cgroup_name(n) for n in names)
    assert cgroups.is_e2e_cgroup_name("pgrelief-e2e")  # what runs before unique names made
    assert not cgroups.is_e2e_cgroup_name("pgrelief-e2ex")


def test_a_start_sweeps_an_empty_leftover_tree_and_spares_a_live_one(own_dir: Path) -> None:
    leftover = own_dir / "pgrelief-e2e"  # the name the killed run of the CI failure used
    (leftover / "kubepods" / "besteffort").mkdir(parents=True)
    live = own_dir / cgroups.new_cgroup_name()
    live.mkdir()
    if (own_dir / "cpuset.cpus").exists():
        for setting in ("cpuset.cpus", "cpuset.mems"):
            (live / setting).write_text((own_dir / setting).read_text())
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (live / "cgroup.procs").write_text(str(sleeper.pid))
        young = cgroups.stale_cgroups()
        assert leftover not in young, "a tree just made may be a start in progress"

        later = time.time() + cgroups.STALE_AFTER_S + 1
        stale = cgroups.stale_cgroups(now=later)
        assert leftover in stale
        assert live not in stale, "a tree with a process is somebody's running node"
        assert cgroups.remove_cgroups([str(leftover)]) == []
        assert not leftover.exists()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_machine_check_counts_only_the_runs_own_tree() -> None:
    mine, theirs = "pgrelief-e2e-aaaa0000", "pgrelief-e2e-bbbb1111"
    before = hostcheck.snapshot()
    after = {**before, "cgroups": [*before["cgroups"], f"/sys/fs/cgroup/pids/{theirs}/kubepods"]}
    diffs, noise = hostcheck.compare(before, after, mine)
    assert diffs == []
    assert noise == [f"cgroup added: /sys/fs/cgroup/pids/{theirs}/kubepods"]

    after["cgroups"].append(f"/sys/fs/cgroup/pids/{mine}/kubepods")
    diffs, _ = hostcheck.compare(before, after, mine)
    assert diffs == [f"cgroup added: /sys/fs/cgroup/pids/{mine}/kubepods"]
