# Sourced by images/build.sh: podman with the settings this kind of machine needs
# (../../shared/REAL_NODE.md): runc (crun fails on this cgroup layout), cgroupfs and file
# events (no systemd), ulimits no higher than root's hard limits (root lacks
# CAP_SYS_RESOURCE, so podman's defaults fail with EPERM), and its own store under $cache.
pm() {
  podman --root "$cache/storage" --runroot "$cache/run" --runtime runc \
    --cgroup-manager cgroupfs --events-backend file --storage-driver overlay "$@"
}
ulimits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
