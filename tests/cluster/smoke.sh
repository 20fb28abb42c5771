#!/usr/bin/env bash
# Smoke test of the from-source control plane: etcd + kube-apiserver (+ controller-manager
# and scheduler), all on loopback with a temp dir; checks /readyz, `get ns`, and that a
# Deployment gets a ReplicaSet and Pod (controller-manager) and a scheduling decision
# (scheduler). Every process started here is stopped on exit.
#
#   tests/cluster/smoke.sh            # builds (or reuses cached) binaries first
#   KEEP=1 tests/cluster/smoke.sh     # keep the temp dir (logs) afterwards
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$("$here/build.sh")}"
work="$(mktemp -d /tmp/iterdpo-cluster.XXXXXX)"
pids=()
cleanup() {
  # stop in reverse start order (etcd last), waiting for each
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now)-$1:.1f}')"; }

ETCD_CLIENT=$(freeport); ETCD_PEER=$(freeport); API_PORT=$(freeport)
TOKEN="$(openssl rand -hex 16)"
SERVER="https://127.0.0.1:$API_PORT"

# --- etcd
t0=$(now)
"$BIN/etcd" --name default --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "default=http://127.0.0.1:$ETCD_PEER" \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$ETCD_CLIENT/health" >/dev/null; do
  kill -0 "${pids[0]}" 2>/dev/null || { tail -20 "$work/etcd.log"; exit 1; }
  sleep 0.2
done
echo "etcd healthy in $(since "$t0")s (port $ETCD_CLIENT)"

# --- kube-apiserver
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
echo "$TOKEN,admin,admin,system:masters" > "$work/tokens.csv"
t0=$(now)
"$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
  --bind-address 127.0.0.1 --secure-port "$API_PORT" --cert-dir "$work/certs" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$work/sa.key" --service-account-signing-key-file "$work/sa.key" \
  --authorization-mode RBAC --token-auth-file "$work/tokens.csv" \
  --service-cluster-ip-range 10.0.0.0/24 \
  > "$work/apiserver.log" 2>&1 &
pids+=($!)
K=("$BIN/kubectl" --server "$SERVER" --token "$TOKEN" --insecure-skip-tls-verify)
until "${K[@]}" get --raw /readyz >/dev/null 2>&1; do
  kill -0 "${pids[1]}" 2>/dev/null || { tail -30 "$work/apiserver.log"; exit 1; }
  sleep 0.2
done
echo "kube-apiserver ready in $(since "$t0")s (port $API_PORT)"
"${K[@]}" get --raw /readyz; echo
"${K[@]}" get ns

# --- controller-manager + scheduler, via a token kubeconfig
KC="$work/admin.kubeconfig"
"$BIN/kubectl" --kubeconfig "$KC" config set-cluster local --server "$SERVER" --insecure-skip-tls-verify=true >/dev/null
"$BIN/kubectl" --kubeconfig "$KC" config set-credentials admin --token "$TOKEN" >/dev/null
"$BIN/kubectl" --kubeconfig "$KC" config set-context local --cluster local --user admin >/dev/null
"$BIN/kubectl" --kubeconfig "$KC" config use-context local >/dev/null
"$BIN/kube-controller-manager" --kubeconfig "$KC" --leader-elect=false \
  --bind-address 127.0.0.1 --secure-port "$(freeport)" \
  --service-account-private-key-file "$work/sa.key" --use-service-account-credentials=false \
  > "$work/controller-manager.log" 2>&1 &
pids+=($!)
"$BIN/kube-scheduler" --kubeconfig "$KC" --leader-elect=false \
  --bind-address 127.0.0.1 --secure-port "$(freeport)" \
  > "$work/scheduler.log" 2>&1 &
pids+=($!)

"$BIN/kubectl" --kubeconfig "$KC" create deployment smoke --image=registry.invalid/none:0 >/dev/null
t0=$(now)
until "$BIN/kubectl" --kubeconfig "$KC" get events -A 2>/dev/null | grep -q FailedScheduling; do
  for p in "${pids[@]:2}"; do kill -0 "$p" 2>/dev/null || { tail -30 "$work"/*.log; exit 1; }; done
  python3 -c "import sys; sys.exit(0 if $(since "$t0") < 90 else 1)" || { echo "no scheduling event after 90s" >&2; tail -20 "$work/controller-manager.log" "$work/scheduler.log"; exit 1; }
  sleep 0.5
done
echo "deployment -> replicaset -> pod -> FailedScheduling (no nodes) in $(since "$t0")s"
"$BIN/kubectl" --kubeconfig "$KC" get deploy,rs,pods
"$BIN/kubectl" --kubeconfig "$KC" get events | grep FailedScheduling | head -1
echo "smoke OK"
