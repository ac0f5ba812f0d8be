#!/usr/bin/env bash
# Download, from PyPI only, the wheels that installing pgrelief needs: its runtime
# dependencies (binary wheels only: no compiler) and the build backend (setuptools, wheel).
# tests/test_image.py then runs the Dockerfile's install steps offline against this
# directory. Idempotent: a stamp of the dependency list skips the download when unchanged.
set -euo pipefail

DIR="${1:-${HOME}/.cache/pgrelief/wheelhouse}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

mkdir -p "${DIR}"
requirements="$("${PYTHON}" - "${ROOT}/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
build = project["build-system"]["requires"]
print("\n".join(sorted(project["project"]["dependencies"]) + sorted(build)))
PY
)"
stamp="$(printf '%s\n%s\n' "$("${PYTHON}" -c 'import sys; print(sys.version_info[:2])')" \
    "${requirements}" | sha256sum | cut -c1-16)"
if [[ -f "${DIR}/.stamp" && "$(cat "${DIR}/.stamp")" == "${stamp}" ]]; then
    exit 0
fi
printf '%s\n' "${requirements}" > "${DIR}/requirements.txt"
"${PYTHON}" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --dest "${DIR}" -r "${DIR}/requirements.txt"
echo "${stamp}" > "${DIR}/.stamp"
