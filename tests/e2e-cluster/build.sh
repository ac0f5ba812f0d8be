#!/usr/bin/env bash
# Build the binaries of the end-to-end cluster once per source state: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy from the upstream main
# packages of the Go modules pinned in go.mod, and the pause binary from the same Kubernetes
# module's build/pause/linux/pause.c.
#
#   bash tests/e2e-cluster/build.sh [CACHE_DIR]     # CACHE_DIR default: $HOME/.cache/pgrelief
#
# Output: $CACHE_DIR/e2e-cluster-<k8s version>/<source hash>/bin/, reused while go.mod, go.sum
# and this script are unchanged. Build output goes to stderr; the last line on stdout is the
# bin directory. One build at a time: it shares the lock of tests/kube-testenv/build.sh, since
# two Kubernetes builds at once do not fit a 2-core machine (and they share the Go cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${1:-${HOME}/.cache/pgrelief}"

for tool in go gcc; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "e2e-cluster/build.sh: '${tool}' not found on PATH (Go >= 1.26 and gcc are needed)" >&2
        exit 1
    fi
done

cd "${here}"
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' go.mod)"
if [[ -z "${k8s_version}" ]]; then
    echo "e2e-cluster/build.sh: cannot find k8s.io/kubernetes in go.mod" >&2
    exit 1
fi
src_hash="$(cat go.mod go.sum build.sh | sha256sum | cut -c1-16)"

out_dir="${CACHE_DIR}/e2e-cluster-${k8s_version}/${src_hash}"
bin_dir="${out_dir}/bin"
stamp="${out_dir}/source-hash"
mkdir -p "${out_dir}" "${CACHE_DIR}/kube-testenv-${k8s_version}"

exec 9>"${CACHE_DIR}/kube-testenv-${k8s_version}/.lock"
flock 9

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${src_hash}" ]]; then
    echo "${bin_dir}"
    exit 0
fi

major="${k8s_version#v}"
major="${major%%.*}"
minor="${k8s_version#v*.}"
minor="${minor%%.*}"
# Build date: the release's publication time, so the build is reproducible.
build_date="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"

# Without these, every component reports v0.0.0-master and kubectl/Helm version checks fail.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
    ldflags+=" -X ${pkg}.gitMajor=${major}"
    ldflags+=" -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitCommit="
    ldflags+=" -X ${pkg}.gitTreeState=clean"
    ldflags+=" -X ${pkg}.buildDate=${build_date}"
done

echo "e2e-cluster/build.sh: building Kubernetes ${k8s_version} components into ${bin_dir}" \
    "(first build takes several minutes)" >&2
start=$(date +%s)
rm -rf "${bin_dir}.partial"
mkdir -p "${bin_dir}.partial"
# The same flags as kube-testenv (static, -trimpath): the packages both link come from the
# Go build cache.
CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "${ldflags}" \
    -o "${bin_dir}.partial/" \
    go.etcd.io/etcd/server/v3 \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy >&2
mv "${bin_dir}.partial/server" "${bin_dir}.partial/etcd"

# pause: the sandbox process of every pod (kubelet/containerd need an image with it).
k8s_dir="$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
pause_version="$(awk -F'[ =?]+' '$1 == "TAG" { print $2; exit }' "${k8s_dir}/build/pause/Makefile")"
gcc -Os -Wall -Werror -static -DVERSION="v${pause_version:-unknown}-pgrelief" \
    -o "${bin_dir}.partial/pause" "${k8s_dir}/build/pause/linux/pause.c"
strip "${bin_dir}.partial/pause"

rm -rf "${bin_dir}"
mv "${bin_dir}.partial" "${bin_dir}"
echo "${src_hash}" >"${stamp}"
echo "e2e-cluster/build.sh: built in $(($(date +%s) - start)) s" >&2
echo "${bin_dir}"
