#!/usr/bin/env bash
# Build the repository's Dockerfile for real, with podman, on a machine with no image
# registry: Debian stand-ins for the Dockerfile's public bases are made from Debian's
# packages (debootstrap), then the `operator`, `runtime-cpu` and GPU `runtime` targets are
# built on them. Everything lives in one podman store under the cache folder and is
# reused while an image's label `io.iterdpo.inputs` (a hash of the Dockerfile, the files it
# copies and the base it sits on) matches.
#
# The only stdout line is the podman store's root, so:
#   ROOT="$(tests/cluster/images/build.sh)"; podman --root "$ROOT" ... images
#
# Env:
#   ITERDPO_IMAGE_CACHE  cache root (default $HOME/.cache/iterdpo-images)
#   TARGETS              which targets (default "operator runtime-cpu runtime")
#   DEBIAN_MIRROR        debootstrap's mirror (default: the host's first deb.debian.org-style URI)
#   FORCE=1              rebuild even if cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cache="${ITERDPO_IMAGE_CACHE:-$HOME/.cache/iterdpo-images}"
TARGETS="${TARGETS:-operator runtime-cpu runtime}"
# shellcheck source=podman.sh
source "$here/podman.sh"
log() { echo "[images] $*" >&2; }

# Debian's packages for the builds (podman, runc, debootstrap) and for the real node
# (containerd, the CNI plugins, iptables; realnode.py): installed when missing, as root.
packages=(podman runc debootstrap containerd containernetworking-plugins iptables gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "missing Debian packages: ${missing[*]} (apt-get install them as root)"; exit 1; }
  log "installing ${missing[*]}"
  t0=$(date +%s)
  apt-get update -q > "$HOME/.iterdpo-apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}" >> "$HOME/.iterdpo-apt.log" 2>&1 \
    || { tail -20 "$HOME/.iterdpo-apt.log" >&2; log "apt-get install failed"; exit 1; }
  log "installed in $(( $(date +%s) - t0 ))s"
fi
mkdir -p "$cache"
exec 9> "$cache/.lock"
flock 9  # one build at a time: a concurrent prune removes another build's stages

label() {  # IMAGE -> its io.iterdpo.inputs label, empty when absent
  pm image inspect --format '{{ index .Labels "io.iterdpo.inputs" }}' "$1" 2> /dev/null || true
}
fresh() {  # IMAGE HASH: the image exists with that input hash
  [ "${FORCE:-0}" != 1 ] && [ "$(label "$1")" = "$2" ]
}

# ---- the bases: a plain Debian, and Debian with Python 3.11 (the python:slim stand-in) ----
mirror="${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2> /dev/null | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
# python:3.11-slim-bookworm gives `python` and `pip` on PATH, installs system-wide (no PEP 668
# marker) and has Python's headers (torch's C++ extensions and inductor compile against them).
python_pkgs=python3,python3-venv,python3-pip,python3-dev,python-is-python3,ca-certificates
base_debian=localhost/iterdpo-test/debian:bookworm
base_python=localhost/iterdpo-test/python:3.11-bookworm

debootstrap_image() {  # TAG INCLUDE: a Debian bookworm minbase with packages, imported as TAG
  local tag="$1" include="$2" t0 rootfs
  t0=$(date +%s)
  rootfs="$(mktemp -d "$cache/.rootfs.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$rootfs'" RETURN
  debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$rootfs" "$mirror" > "$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; log "debootstrap failed (mirror $mirror)"; exit 1; }
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | pm import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --change "LABEL io.iterdpo.inputs=$base_hash" - "$tag" > /dev/null
  log "$tag: $(( $(date +%s) - t0 ))s"
}
# The bases are rebuilt when their recipe (this function and the package list) changes.
base_hash="$({ declare -f debootstrap_image; echo "$python_pkgs"; } | sha256sum | cut -c1-16)"
fresh "$base_debian" "$base_hash" || debootstrap_image "$base_debian" ca-certificates
fresh "$base_python" "$base_hash" || debootstrap_image "$base_python" "$python_pkgs"

# The pod sandbox image of the real node: one static binary (pause.c), no registry needed.
pause=localhost/iterdpo-test/pause:3.10
pause_hash="$(sha256sum < "$here/pause.c" | cut -c1-16)"
if ! fresh "$pause" "$pause_hash"; then
  pause_dir="$(mktemp -d "$cache/.pause.XXXXXX")"
  gcc -Os -static -o "$pause_dir/pause" "$here/pause.c" && strip "$pause_dir/pause"
  tar -C "$pause_dir" -c pause | pm import -q --change 'ENTRYPOINT ["/pause"]' \
    --change "LABEL io.iterdpo.inputs=$pause_hash" - "$pause" > /dev/null
  rm -rf "$pause_dir"
  log "$pause: built"
fi

# ---- the Dockerfile's targets ----
# What the Dockerfile copies (its .dockerignore keeps the rest out): a change in any of it,
# or in a base, rebuilds the targets.
inputs_hash() {  # BASE_IMAGE_ID -> hash
  (cd "$repo" && { echo "$1"; cat Dockerfile .dockerignore pyproject.toml README.md;
    find iterdpo services operator requirements -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
      ! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
}
python_id="$(pm image inspect --format '{{.Id}}' "$base_python")"
debian_id="$(pm image inspect --format '{{.Id}}' "$base_debian")"
args=(--build-arg "PYTHON_BASE=$base_python" --build-arg "CUDA_BASE=$base_debian"
      --build-arg RUNTIME_PYTHON=python3.11
      --build-arg "VCS_REF=$(git -C "$repo" rev-parse HEAD 2> /dev/null || echo unknown)")
for target in $TARGETS; do
  case "$target" in
    operator) tag=localhost/iterdpo-operator:0.1.0 hash="$(inputs_hash "$python_id")" ;;
    runtime-cpu) tag=localhost/iterdpo:0.1.0-cpu hash="$(inputs_hash "$python_id")" ;;
    runtime) tag=localhost/iterdpo:0.1.0 hash="$(inputs_hash "$debian_id")" ;;
    *) log "TARGETS: unknown target '$target' (allowed: operator, runtime-cpu, runtime)"; exit 2 ;;
  esac
  if fresh "$tag" "$hash"; then log "cached: $tag"; continue; fi
  t0=$(date +%s)
  # --network host: RUN steps reach apt and PyPI; the host's CA bundle is the one pip trusts
  # here. --layers: unchanged steps are reused from the store.
  pm build --layers --network host -v /etc/ssl/certs:/etc/ssl/certs:ro "${ulimits[@]}" \
    --target "$target" "${args[@]}" --label "io.iterdpo.inputs=$hash" -t "$tag" \
    -f "$repo/Dockerfile" "$repo" > "$cache/build-$target.log" 2>&1 \
    || { tail -40 "$cache/build-$target.log" >&2; log "$target failed: $cache/build-$target.log"; exit 1; }
  log "$tag: $(( $(date +%s) - t0 ))s, $(pm image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.1f GB", $1/1e9}')"
done
pm image prune -f > /dev/null 2>&1 || log "image prune skipped (an image is in use)"  # the layers of replaced builds
echo "$cache/storage"
