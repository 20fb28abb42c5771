#!/usr/bin/env bash
# Build the test control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd) and the real node's kubelet and kube-proxy from Go modules at the versions pinned in
# versions.env, into a per-version cache folder. Skips the build when the
# binaries for the pinned versions (and current go.sum) already exist.
#
# Logs go to stderr; the only stdout line is the bin directory, so:
#   BIN="$(tests/cluster/build.sh)"
#
# Env:
#   ITERDPO_CLUSTER_CACHE  cache root (default $HOME/.cache/iterdpo-cluster)
#   NICE                   prefix for go commands (default "nice -n 19"; "" to disable)
#   FORCE=1                rebuild even if cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
# shellcheck disable=SC1091
source ./versions.env
NICE="${NICE-nice -n 19}"

root="${ITERDPO_CLUSTER_CACHE:-$HOME/.cache/iterdpo-cluster}"
dest="$root/${K8S_VERSION}-${ETCD_VERSION}"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd)
stamp="$(cat go.mod go.sum etcd/go.mod etcd/go.sum etcd/main.go | sha256sum | cut -c1-16)"

# shellcheck source=cache.sh
source ./cache.sh
cache_init cluster-build "$dest" "$stamp" "${bins[@]}"
others() {  # own caches: the Kubeflow training operator (~80 s cold), helm (~1.5-3 min cold),
  # CoreDNS (the real node's DNS) and the images (podman: ~15 min cold; images/build.sh)
  NICE="$NICE" ./kubeflow/build.sh >/dev/null
  NICE="$NICE" ./helm/build.sh >/dev/null
  NICE="$NICE" ./coredns/build.sh >/dev/null
  ./images/build.sh >/dev/null
}

if cache_hit; then
  log "cached: $bin (k8s $K8S_VERSION, etcd $ETCD_VERSION)"
  others
  echo "$bin"
  exit 0
fi

cache_begin
# Same version stamping as kubernetes' hack/lib/version.sh, so the binaries
# report v1.Y.Z instead of v0.0.0-master.
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ldx=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldx+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldx+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
flags=(-trimpath -buildvcs=false "-ldflags=-s -w$ldx")

total_start=$(date +%s)
for b in "${bins[@]}"; do
  t0=$(date +%s)
  if [ "$b" = etcd ]; then
    (cd etcd && $NICE go build "${flags[@]}" -o "$tmp/etcd" .)
  else
    $NICE go build "${flags[@]}" -o "$tmp/$b" "k8s.io/kubernetes/cmd/$b"
  fi
  log "$b: $(( $(date +%s) - t0 ))s, $(du -h "$tmp/$b" | cut -f1)"
done

cache_commit
others
log "built k8s $K8S_VERSION + etcd $ETCD_VERSION in $(( $(date +%s) - total_start ))s -> $bin"
echo "$bin"
