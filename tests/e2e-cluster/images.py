"""Container images for the e2e cluster, built on this machine: nothing comes from a registry.

- ``base``: Debian bookworm made by ``debootstrap --variant=minbase`` with python3, pip and
  venv, standing in for the public ``python:3.11-slim`` a Dockerfile's ``BASE_IMAGE`` names.
- ``pause``: the pod sandbox, upstream ``pause.c`` built by tests/e2e-cluster/build.sh.
- ``pgbouncer``: Debian's pgbouncer on ``base``.
- ``client``: an application image (python3-psycopg, psql, pgbench) on ``base``.

Each is built with buildah (vfs storage, chroot isolation, ``--pull-never``) into an OCI
archive cached under ``$CACHE/e2e-images``, keyed by a hash of everything that went into it,
and imported into the cluster's containerd by ``cluster.py``. buildah's storage and temporary
files stay in the cache directory. ``build_dockerfile`` builds any Dockerfile the same way: it
is the hook for the project's own Dockerfile (``--build-arg BASE_IMAGE=...``).

    python3 tests/e2e-cluster/images.py build [NAME ...]
    python3 tests/e2e-cluster/images.py build-dockerfile DIR NAME [--build-arg K=V ...]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES_DIR = HERE / "images"
REGISTRY = "localhost/pgrelief"
TAG = "e2e"
SUITE = "bookworm"
# python3-pip/venv so a project Dockerfile can `pip install` as on python:3.11-slim.
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
MIRROR = os.environ.get("PGRELIEF_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BUILD_VERSION = "3"  # bump to rebuild every image after a change of this module's logic


class ImageError(RuntimeError):
    """An image could not be built."""


@dataclass(frozen=True)
class Image:
    name: str  # e.g. localhost/pgrelief/pgbouncer:e2e
    archive: Path  # OCI archive to import into containerd
    seconds: float  # build time; 0 when it came from the cache


def cache_dir() -> Path:
    return Path(os.environ.get("PGRELIEF_CACHE_DIR") or Path.home() / ".cache" / "pgrelief")


def image_name(short: str) -> str:
    return f"{REGISTRY}/{short}:{TAG}"


class Builder:
    """buildah with its storage, run root and temporary files inside ``root``."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root = root
        self.bin_dir = bin_dir  # tests/e2e-cluster/build.sh output (the pause binary)
        self.archives = root / "archives"
        self.tmp = root / "tmp"
        for d in (self.archives, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.built: dict[str, Image] = {}
        # buildah sets up its network backend on most commands, locking a file in its CNI
        # config dir (/etc/cni/net.d by default): point that dir into the cache.
        self.containers_conf = root / "containers.conf"
        self.containers_conf.write_text(
            f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{root / "cni"}"\n'
        )

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # A private mount namespace with a scratch /var/lib: buildah keeps a blob-info cache in
        # /var/lib/containers/cache whatever --root says, and it must not land on the machine.
        cmd = [
            "unshare",
            "--mount",
            "--fork",
            "--",
            "sh",
            "-c",
            'mount -t tmpfs -o mode=0755 pgrelief-buildah /var/lib && exec "$@"',
            "buildah",
            "buildah",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "vfs",
            *args,
        ]
        env = {
            **os.environ,
            "TMPDIR": str(self.tmp),
            "BUILDAH_ISOLATION": "chroot",
            "CONTAINERS_CONF": str(self.containers_conf),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if check and proc.returncode != 0:
            raise ImageError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def has_image(self, name: str) -> bool:
        return self.buildah("inspect", "--type", "image", name, check=False).returncode == 0

    def ensure_loaded(self, image: Image) -> None:
        """Put a cached archive back into buildah's storage (a local file, not a registry)."""
        if not self.has_image(image.name):
            image_id = self.buildah("pull", "--quiet", f"oci-archive:{image.archive}").stdout
            self.buildah("tag", image_id.split()[-1], image.name)

    def push(self, name: str, archive: Path) -> None:
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        self.buildah("push", "--quiet", name, f"oci-archive:{partial}:{name}")
        partial.replace(archive)
        # Older builds of the same image are not needed any more: drop their archives and,
        # now untagged, their copies in buildah's storage (vfs keeps full copies per layer).
        short = archive.name.rsplit("-", 1)[0]
        for old in self.archives.glob(f"{short}-*.tar"):
            if old != archive and old.name.rsplit("-", 1)[0] == short:
                old.unlink()
        self.buildah("rmi", "--prune", check=False)

    # ------------------------------------------------------------------ the images
    def base(self) -> Image:
        name = image_name("base")
        # What makes the base: not the rest of this file, whose edits must not rebuild it.
        recipe = inspect.getsource(Builder.base) + inspect.getsource(Builder._debootstrap)
        key = _digest(SUITE, MIRROR, *BASE_PACKAGES, BUILD_VERSION, recipe)
        archive = self.archives / f"base-{key}.tar"
        if archive.exists():
            image = Image(name, archive, 0.0)
            self.ensure_loaded(image)
            self.built[name] = image
            return image
        start = time.monotonic()
        rootfs_tar = self.tmp / f"rootfs-{key}.tar"
        self._debootstrap(rootfs_tar)
        ctr = self.buildah("from", "--quiet", "scratch").stdout.strip()
        try:
            self.buildah("add", "--quiet", ctr, str(rootfs_tar), "/")
            self.buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "python3",
                "--label",
                f"io.pgrelief.e2e.base={SUITE}",
                ctr,
            )
            self.buildah("commit", "--quiet", "--rm", ctr, name)
        except ImageError:
            self.buildah("rm", ctr, check=False)
            raise
        finally:
            rootfs_tar.unlink(missing_ok=True)
        self.push(name, archive)
        image = Image(name, archive, time.monotonic() - start)
        self.built[name] = image
        return image

    def _debootstrap(self, out_tar: Path) -> None:
        target = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.tmp))
        try:
            # A private mount namespace: the /proc and /sys debootstrap mounts into the target
            # vanish with it, even if it is killed half-way.
            cmd = [
                "unshare",
                "--mount",
                "--fork",
                "--",
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(target),
                MIRROR,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ImageError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            # As on python:3.11-slim, pip may install into the system interpreter.
            for marker in target.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                marker.unlink()
            python = target / "usr/bin/python"
            if not python.exists():
                python.symlink_to("python3")
            # As in Debian's official images: package scripts never start services.
            policy = target / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
                for child in (target / junk).glob("*"):
                    if child.is_file():
                        child.unlink()
            subprocess.run(
                [
                    "tar",
                    "-C",
                    str(target),
                    "--numeric-owner",
                    "--exclude=./dev/*",
                    "--exclude=./proc/*",
                    "--exclude=./sys/*",
                    "-cf",
                    str(out_tar),
                    ".",
                ],
                check=True,
                capture_output=True,
            )
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def pause(self) -> Image:
        binary = self.bin_dir / "pause"
        context = Path(tempfile.mkdtemp(prefix="pause-", dir=self.tmp))
        try:
            shutil.copy2(binary, context / "pause")
            shutil.copy2(IMAGES_DIR / "pause" / "Dockerfile", context / "Dockerfile")
            return self.build_dockerfile(context, "pause")
        finally:
            shutil.rmtree(context, ignore_errors=True)

    def build_dockerfile(
        self,
        context: Path,
        short_name: str,
        *,
        dockerfile: Path | None = None,
        build_args: dict[str, str] | None = None,
        volumes: dict[str, Path] | None = None,
    ) -> Image:
        """Build ``context`` (its Dockerfile, or ``dockerfile``) as localhost/pgrelief/NAME:e2e.

        Never pulls: a FROM must name ``scratch`` or an image already built here, such as
        ``image_name("base")`` (pass it as a build argument, e.g. BASE_IMAGE). ``volumes``
        (path in the build -> file or directory here) are bind-mounted read-only into every
        RUN step and never land in the image: a wheelhouse and a pip.conf pointing at it let
        a Dockerfile's ``pip install`` run offline, unchanged.
        """
        dockerfile = dockerfile or context / "Dockerfile"
        args = {"BASE_IMAGE": image_name("base"), **(build_args or {})}
        if short_name == "pause":
            args = dict(build_args or {})  # FROM scratch
        name = image_name(short_name)
        bases = [v for v in args.values() if v.startswith(f"{REGISTRY}/")]
        missing = [b for b in bases if b not in self.built]
        if missing:
            raise ImageError(f"build {', '.join(missing)} before {name}")
        mounts = sorted((volumes or {}).items())
        key = _digest(
            BUILD_VERSION,
            json.dumps(args, sort_keys=True),
            dockerfile.read_bytes(),
            _tree_digest(context),
            *(self.built[b].archive.name for b in bases),
            *(f"{target}={_tree_digest(source)}" for target, source in mounts),
        )
        archive = self.archives / f"{short_name}-{key}.tar"
        if archive.exists():
            self.built[name] = Image(name, archive, 0.0)
            return self.built[name]
        start = time.monotonic()
        build_arg_flags = [f"--build-arg={k}={v}" for k, v in args.items()]
        self.buildah(
            "bud",
            "--quiet",
            "--pull-never",
            "--isolation",
            "chroot",
            "--layers=false",
            # RUN steps share the build machine's network (apt fetches from the Debian mirror)
            # and no CNI is set up.
            "--network=host",
            "-f",
            str(dockerfile),
            *build_arg_flags,
            *(f"--volume={source}:{target}:ro" for target, source in mounts),
            "-t",
            name,
            str(context),
        )
        self.push(name, archive)
        self.built[name] = Image(name, archive, time.monotonic() - start)
        return self.built[name]

    def all(self, only: tuple[str, ...] = ()) -> dict[str, Image]:
        """Build (or take from the cache) every image; ``only`` limits which."""
        images: dict[str, Image] = {}
        wanted = only or ("base", "pause", "pgbouncer", "client")
        if any(n != "pause" for n in wanted):
            images["base"] = self.base()
        if "pause" in wanted:
            images["pause"] = self.pause()
        for short in ("pgbouncer", "client"):
            if short in wanted:
                images[short] = self.build_dockerfile(IMAGES_DIR / short, short)
        return images


def offline_pip(wheelhouse: Path, conf_dir: Path) -> dict[str, Path]:
    """Volumes for ``build_dockerfile`` that make every ``pip`` of a RUN step install from
    ``wheelhouse`` only (scripts/wheelhouse.sh fills it): the directory, and a pip.conf with
    ``no-index`` at /etc/pip.conf, which pip reads in and out of a virtualenv."""
    if not any(wheelhouse.glob("*.whl")):
        raise ImageError(f"no wheels in {wheelhouse}: run scripts/wheelhouse.sh {wheelhouse}")
    conf = conf_dir / "pip-offline.conf"
    conf.write_text("[global]\nno-index = true\nfind-links = /wheelhouse\n")
    return {"/wheelhouse": wheelhouse, "/etc/pip.conf": conf}


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree_digest(root: Path) -> str:
    """What a build can see of ``root``: a file's content, or a directory's files and their
    contents, without what its .dockerignore keeps out of the build (a repository's .git,
    caches and tests must not rebuild an image that never sees them)."""
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    ignored = dockerignore(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if ignored(relative):
            continue
        h.update(relative.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def dockerignore(root: Path) -> Callable[[str], bool]:
    """Whether ``root``'s .dockerignore keeps a (relative, /-separated) path out of the build.

    The rules of Docker's matcher: the last pattern that matches the path or one of its parent
    directories decides, ``!`` re-includes, ``*`` and ``?`` stay within one path segment and
    ``**`` spans any number of them.
    """
    try:
        lines = (root / ".dockerignore").read_text().splitlines()
    except FileNotFoundError:
        return lambda _path: False
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in lines:
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        include = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().strip("/")
        rules.append((include, re.compile(_glob_regex(pattern))))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for include, rule in rules:
            if any(rule.fullmatch(c) for c in candidates):
                verdict = not include
        return verdict

    return ignored


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def builder(bin_dir: Path) -> Builder:
    return Builder(cache_dir() / "e2e-images", bin_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, help="tests/e2e-cluster/build.sh output")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the harness's images")
    build.add_argument("names", nargs="*", choices=["base", "pause", "pgbouncer", "client", []])
    one = sub.add_parser("build-dockerfile", help="build a Dockerfile as localhost/pgrelief/NAME")
    one.add_argument("context", type=Path)
    one.add_argument("name")
    one.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    bin_dir = args.bin_dir or Path(os.environ.get("PGRELIEF_E2E_BIN_DIR", "."))
    b = builder(bin_dir)
    try:
        if args.command == "build":
            images = b.all(tuple(args.names))
        else:
            extra = dict(kv.split("=", 1) for kv in args.build_arg)
            b.base()
            images = {args.name: b.build_dockerfile(args.context, args.name, build_args=extra)}
    except ImageError as exc:
        print(f"images.py: {exc}", file=sys.stderr)
        return 1
    for short, image in images.items():
        took = f"built in {image.seconds:.0f} s" if image.seconds else "cached"
        print(f"{short}: {image.name} {image.archive} ({took})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
