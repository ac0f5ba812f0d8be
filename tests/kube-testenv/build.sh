#!/usr/bin/env bash
# Build kube-testenv (etcd + kube-apiserver + kube-controller-manager in one binary) once per
# source state.
#
#   bash tests/kube-testenv/build.sh [CACHE_DIR]     # CACHE_DIR default: $HOME/.cache/pgrelief
#
# The binary goes to $CACHE_DIR/kube-testenv-<k8s version>/<source hash>/kube-testenv, outside
# the repo, and is reused as long as the sources here (go.mod, go.sum, *.go, this script) are
# unchanged. One directory per source hash: git worktrees on different sources share the
# cache without rebuilding over each other. Build output goes to stderr; the last line on
# stdout is the binary's path.
# Cold build on 2 cores: ~8 min and ~0.5 GiB of Go modules; see README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${1:-${HOME}/.cache/pgrelief}"

if ! command -v go >/dev/null 2>&1; then
    echo "kube-testenv/build.sh: 'go' not found on PATH (Go >= 1.26 is needed)" >&2
    exit 1
fi

cd "${here}"
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' go.mod)"
if [[ -z "${k8s_version}" ]]; then
    echo "kube-testenv/build.sh: cannot find k8s.io/kubernetes in go.mod" >&2
    exit 1
fi
src_hash="$(cat go.mod go.sum ./*.go build.sh | sha256sum | cut -c1-16)"

version_dir="${CACHE_DIR}/kube-testenv-${k8s_version}"
out_dir="${version_dir}/${src_hash}"
bin="${out_dir}/kube-testenv"
stamp="${out_dir}/source-hash"
mkdir -p "${out_dir}"

# One build at a time per cache dir (parallel test workers may all ask for it, and two Go
# builds of Kubernetes at once do not fit a 2-core machine).
exec 9>"${version_dir}/.lock"
flock 9

if [[ -x "${bin}" && -f "${stamp}" && "$(cat "${stamp}")" == "${src_hash}" ]]; then
    echo "${bin}"
    exit 0
fi

major="${k8s_version#v}"
major="${major%%.*}"
minor="${k8s_version#v*.}"
minor="${minor%%.*}"
# Build date: the release's publication time, so the build is reproducible.
build_date="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"

ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
    ldflags+=" -X ${pkg}.gitMajor=${major}"
    ldflags+=" -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitCommit="
    ldflags+=" -X ${pkg}.gitTreeState=clean"
    ldflags+=" -X ${pkg}.buildDate=${build_date}"
done

echo "kube-testenv/build.sh: building kube-testenv ${k8s_version} into ${out_dir}" \
    "(first build takes several minutes)" >&2
start=$(date +%s)
CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "${ldflags}" \
    -o "${bin}.partial" . >&2
mv -f "${bin}.partial" "${bin}"
echo "${src_hash}" >"${stamp}"
echo "kube-testenv/build.sh: built in $(($(date +%s) - start)) s" >&2
echo "${bin}"
