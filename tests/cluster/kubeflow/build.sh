#!/usr/bin/env bash
# Build the Kubeflow training operator v1 (cmd/training-operator.v1 of
# github.com/kubeflow/training-operator at the version pinned in go.mod) into a
# per-version cache folder. Skips the build when the binary exists and the stamp
# (hash of go.mod/go.sum) matches.
#
# Logs go to stderr; the only stdout line is the bin directory, so:
#   BIN="$(tests/cluster/kubeflow/build.sh)"   # -> .../kubeflow-v1.8.1/bin/training-operator
#
# Env:
#   ITERDPO_CLUSTER_CACHE  cache root (default $HOME/.cache/iterdpo-cluster)
#   NICE                   prefix for go commands (default "nice -n 19"; "" to disable)
#   FORCE=1                rebuild even if cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
NICE="${NICE-nice -n 19}"
pkg=github.com/kubeflow/training-operator
# shellcheck source=../cache.sh
source ../cache.sh
cache_tool kubeflow-build "$pkg" kubeflow training-operator

cache_begin

t0=$(date +%s)
# -mod=readonly (the default) against the committed go.sum: a build never rewrites go.mod.
$NICE go build -trimpath -buildvcs=false "-ldflags=-s -w" -o "$tmp/training-operator" "$pkg/cmd/training-operator.v1"
log "training-operator $version: $(( $(date +%s) - t0 ))s, $(du -h "$tmp/training-operator" | cut -f1)"

cache_commit
echo "$bin"
