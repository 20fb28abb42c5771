#!/usr/bin/env bash
# Build helm (helm.sh/helm/v3/cmd/helm at the version pinned in go.mod) into a
# per-version cache folder. Skips the build when the binary exists and the stamp
# (hash of go.mod/go.sum) matches.
#
# Logs go to stderr; the only stdout line is the bin directory, so:
#   BIN="$(tests/cluster/helm/build.sh)"   # -> .../helm-v3.22.0/bin/helm
#
# Env:
#   ITERDPO_CLUSTER_CACHE  cache root (default $HOME/.cache/iterdpo-cluster)
#   NICE                   prefix for go commands (default "nice -n 19"; "" to disable)
#   FORCE=1                rebuild even if cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
NICE="${NICE-nice -n 19}"
pkg=helm.sh/helm/v3
# shellcheck source=../cache.sh
source ../cache.sh
cache_tool helm-build "$pkg" helm helm

cache_begin

# The same -X stamping as helm's Makefile: `helm version` reports the release, and the
# default .Capabilities.KubeVersion (helm template, helm lint) follows the client-go it
# is built with (k8s.io/client-go v0.Y.Z -> Kubernetes v1.Y), not the built-in v1.20.
k8s="$(awk '$1 == "k8s.io/client-go" {print $2; exit}' go.mod)"   # v0.37.0
k8s_minor="${k8s#v0.}"; k8s_minor="${k8s_minor%%.*}"
ldflags="-s -w -X $pkg/internal/version.version=$version -X $pkg/internal/version.gitTreeState=clean"
for p in lint/rules chartutil; do
  ldflags+=" -X $pkg/pkg/$p.k8sVersionMajor=1 -X $pkg/pkg/$p.k8sVersionMinor=$k8s_minor"
done

t0=$(date +%s)
# -mod=readonly (the default) against the committed go.sum: a build never rewrites go.mod.
$NICE go build -trimpath -buildvcs=false "-ldflags=$ldflags" -o "$tmp/helm" "$pkg/cmd/helm"
log "helm $version: $(( $(date +%s) - t0 ))s, $(du -h "$tmp/helm" | cut -f1)"

cache_commit
echo "$bin"
