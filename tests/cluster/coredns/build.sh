#!/usr/bin/env bash
# Build CoreDNS (github.com/coredns/coredns at the version pinned in go.mod, with main.go's
# plugins) into a per-version cache folder: the real node's cluster DNS. Skips the build when
# the binary exists and the stamp (hash of go.mod, go.sum and main.go) matches.
#
# Logs go to stderr; the only stdout line is the bin directory, so:
#   BIN="$(tests/cluster/coredns/build.sh)"   # -> .../coredns-v1.15.0/bin/coredns
#
# Env: ITERDPO_CLUSTER_CACHE, NICE, FORCE=1 (as ../build.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
NICE="${NICE-nice -n 19}"
module=github.com/coredns/coredns
version="$(awk -v m="$module" '($1 == m) {print $2; exit} ($1 == "require" && $2 == m) {print $3; exit}' go.mod)"
root="${ITERDPO_CLUSTER_CACHE:-$HOME/.cache/iterdpo-cluster}"
# shellcheck source=../cache.sh
source ../cache.sh
cache_init coredns-build "$root/coredns-$version" "$(cat go.mod go.sum main.go | sha256sum | cut -c1-16)" coredns
if cache_hit; then
  log "cached: $bin (coredns $version)"
  echo "$bin"
  exit 0
fi
cache_begin
t0=$(date +%s)
# CoreDNS' Makefile stamps the git commit; the version is compiled in from coremain.
$NICE go build -trimpath -buildvcs=false -ldflags="-s -w -X $module/coremain.GitCommit=$version" -o "$tmp/coredns" .
log "coredns $version: $(( $(date +%s) - t0 ))s, $(du -h "$tmp/coredns" | cut -f1)"
cache_commit
echo "$bin"
