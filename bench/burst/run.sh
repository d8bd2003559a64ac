#!/usr/bin/env bash
# Burst benchmark (issue 15; HAMi #1367: 40 parallel pods hit bind timeouts behind the node lock): N vGPU pods
# created at once onto M simulated nodes: one stand-in API server, the scheduler (webhook, extender), the
# kube-scheduler driver, and per node a vgpu-agent (Kubernetes mode) and a kubelet harness. Reports p50/p99/max
# from create to allocated and to Running, BindingFailed events, UnexpectedAdmissionError pods, and checks that no
# device ID is held by two pods (each harness's PodResources record, via the agents' confirmation: none revoked).
#   bench/burst/run.sh [PODS=200] [NODES=20]      (root; binaries from target/release or $VGPU_BIN)
set -uo pipefail
cd "$(dirname "$0")/../.."
R=$PWD; PODS=${1:-200}; NODES=${2:-20}
B=${VGPU_BIN:-$R/target/release}
T=$(mktemp -d /tmp/vgpu-burst.XXXXXX); chmod 755 "$T"
CG2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts); CG=${CG2:-/sys/fs/cgroup}/vgpu-burst-$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 1
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    pkill -9 -f "$T/" 2>/dev/null; sleep 0.5
    [ -d "$CG" ] && find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -n "${KEEP:-}" ] && echo "kept $T" || rm -rf "$T"
}
trap cleanup EXIT
SIM=$("$B/sim-dir"); export LD_LIBRARY_PATH=$SIM PATH=$SIM:$PATH VGPU_SIM_MEMORY_MIB=81920
openssl rand -hex 32 > "$T/seal.key"
printf 'admin-token,kubernetes-admin,1,"system:masters"\nsched-token,system:serviceaccount:vgpu-system:vgpu-scheduler,2\nagent-token,system:serviceaccount:vgpu-system:vgpu-agent,3\nkubelet-token,system:node:n,4,"system:nodes"\n' > "$T/tokens.csv"
{
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=burst-ca" -keyout "$T/ca.key" -out "$T/ca.crt"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$T/tls.key" -out "$T/tls.csr"
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$T/ext.cnf"
    openssl x509 -req -in "$T/tls.csr" -CA "$T/ca.crt" -CAkey "$T/ca.key" -CAcreateserial -days 1 -extfile "$T/ext.cnf" -out "$T/tls.crt"
} >/dev/null 2>&1
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WH=$(port); EXT=$(port); SM=$(port)
"$B/kube-standin" --listen 127.0.0.1:0 --token-auth-file "$T/tokens.csv" --tls-cert-file "$T/tls.crt" \
    --tls-private-key-file "$T/tls.key" --mutating-webhook "https://127.0.0.1:$WH/mutate" \
    --validating-webhook "https://127.0.0.1:$WH/validate" --webhook-ca "$T/ca.crt" > "$T/standin.out" 2> "$T/standin.log" &
PIDS+=($!)
for _ in $(seq 50); do API=$(head -1 "$T/standin.out" 2>/dev/null | grep -o '[0-9]*$'); [ -n "$API" ] && break; sleep 0.1; done
kc() { printf 'apiVersion: v1\nkind: Config\nclusters: [{name: s, cluster: {server: "https://127.0.0.1:%s", certificate-authority: "%s"}}]\nusers: [{name: u, user: {token: %s}}]\ncontexts: [{name: c, context: {cluster: s, user: u, namespace: default}}]\ncurrent-context: c\n' "$API" "$T/ca.crt" "$1" > "$2"; }
kc sched-token "$T/sched.kc"; kc agent-token "$T/agent.kc"; kc kubelet-token "$T/kubelet.kc"
KUBECONFIG=$T/sched.kc "$B/vgpu-scheduler" serve --extender-listen 127.0.0.1:$EXT --metrics-listen 127.0.0.1:$SM \
    --webhook-listen 127.0.0.1:$WH --tls-cert "$T/tls.crt" --tls-key "$T/tls.key" --seal-key-file "$T/seal.key" \
    > "$T/scheduler.log" 2>&1 &
PIDS+=($!)
KUBECONFIG=$T/sched.kc "$B/sched-driver" --extender "http://127.0.0.1:$EXT" --parallel 16 > "$T/driver.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 "$NODES"); do
    N=$T/node$i; mkdir -p "$N/dp" "$N/pr" "$N/containers" "$N/cards" "$CG/node$i"
    cp "$B/libvgpu.so" "$N/libvgpu.so"
    ( export VGPU_SIM_NODE=$i VGPU_SIM_STATE=$N/sim.state
      KUBECONFIG=$T/kubelet.kc exec "$B/kubelet-harness" --node-name node$i --device-plugin-dir "$N/dp" \
        --pod-resources-socket "$N/pr/kubelet.sock" --cgroup-root "$CG/node$i" --run-dir "$N/kubelet" ) > "$N/kubelet.log" 2>&1 &
    PIDS+=($!)
    ( export VGPU_SIM_NODE=$i VGPU_SIM_STATE=$N/sim.state
      KUBECONFIG=$T/agent.kc exec "$B/vgpu-agent" run --node-name node$i --device-plugin-dir "$N/dp" \
        --pod-resources-socket "$N/pr/kubelet.sock" --containers-dir "$N/containers" --shim-lib "$N/libvgpu.so" \
        --card-dir "$N/cards" --seal-key-file "$T/seal.key" --cache-dir "$N/containers" --socket "$N/agent.sock" \
        --bind-socket off --state-file "$N/state.json" --pin-dir off --metrics-addr off --policy report ) > "$N/agent.log" 2>&1 &
    PIDS+=($!)
done
# Every node registered and offering its vGPUs before the burst.
for _ in $(seq 600); do
    ready=$(KUBECONFIG=$T/sched.kc kubectl get nodes -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{" "}{.metadata.annotations.hami\.io/node-nvidia-register}{"\n"}{end}' 2>/dev/null | grep -c '^10 .*GPU-')
    [ "$ready" -ge "$NODES" ] && break; sleep 0.2
done
echo "burst: $ready/$NODES nodes ready; $PODS pods of 1 vGPU / 1000 MiB at once"
python3 bench/burst/burst.py "https://127.0.0.1:$API" "$T/ca.crt" admin-token "$PODS" "$T/result.json"
revoked=$(cat "$T"/node*/agent.log | grep -ci "revoked")
echo "agents: $revoked revoked allocations (a container found on another pod's devices)"
dups=$(for i in $(seq 1 "$NODES"); do KUBECONFIG=$T/sched.kc kubectl get pods -o jsonpath="{range .items[?(@.spec.nodeName==\"node$i\")]}{.metadata.annotations.hami\.io/vgpu-devices-allocated}{\"\n\"}{end}" 2>/dev/null; done | grep -c . )
echo "pods with an allocation recorded: $dups"
cp "$T/result.json" "${BURST_OUT:-/tmp/burst-result.json}"
