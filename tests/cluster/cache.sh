# Sourced by build.sh, kubeflow/build.sh and helm/build.sh: a per-version cache folder of
# binaries, reused while its stamp (a hash of the build inputs) matches; a build goes to a
# temporary folder that replaces bin/ only once every binary is built.
#
#   cache_init PREFIX DEST STAMP BINARY...   (sets $bin, $tmp after cache_begin)
#   cache_hit     succeeds if FORCE != 1, the stamp matches and every binary is executable
#   cache_begin   needs go; makes $tmp (removed on exit unless committed)
#   cache_commit  moves $tmp to $bin and writes the stamp

cache_init() {
  _cache_prefix="$1" _cache_dest="$2" _cache_stamp="$3"
  shift 3
  _cache_bins=("$@")
  bin="$_cache_dest/bin"
}

log() { echo "[$_cache_prefix] $*" >&2; }

cache_hit() {
  [ "${FORCE:-0}" != 1 ] || return 1
  [ "$(cat "$_cache_dest/stamp" 2>/dev/null)" = "$_cache_stamp" ] || return 1
  local b
  for b in "${_cache_bins[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

cache_begin() {
  command -v go >/dev/null || { log "go not found"; exit 1; }
  mkdir -p "$_cache_dest"
  tmp="$(mktemp -d "$_cache_dest/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  export CGO_ENABLED=0
}

cache_commit() {
  rm -rf "$bin"
  mv "$tmp" "$bin"
  trap - EXIT
  echo "$_cache_stamp" > "$_cache_dest/stamp"
}

# A tool built from one Go module pinned in ./go.mod: sets $version, and exits printing the
# bin folder when the cache already holds it. The cache folder is <root>/NAME-<version>.
#   cache_tool PREFIX MODULE NAME BINARY
cache_tool() {
  local prefix="$1" module="$2" name="$3" binary="$4"
  version="$(awk -v m="$module" '$1 == m && $2 ~ /^v/ {print $2; exit}' go.mod)"
  [ -n "$version" ] || { echo "[$prefix] no $module version in go.mod" >&2; exit 1; }
  local root="${ITERDPO_CLUSTER_CACHE:-$HOME/.cache/iterdpo-cluster}"
  cache_init "$prefix" "$root/$name-$version" "$(cat go.mod go.sum | sha256sum | cut -c1-16)" "$binary"
  if cache_hit; then
    log "cached: $bin ($binary $version)"
    echo "$bin"
    exit 0
  fi
}
