#!/usr/bin/env bash
# HAMi's Lab 3 (../shared/LAB3-gpu-partitioning.txt) through the whole vgpu stack, without a real cluster:
#   kube-standin      the API server (REST + watch; admission webhooks called as kube-apiserver calls them)
#   vgpu-scheduler    the admission webhook (TLS), the extender (filter, bind), events
#   sched-driver      kube-scheduler's part: filter and bind through the extender
#   vgpu-agent run    Kubernetes mode: registers the node and nvidia.com/gpu, answers Allocate, confirms it
#                     against PodResources, fills each container's limits file; eBPF host view
#   kubelet-harness   the kubelet: Registration, ListAndWatch, Allocate, PodResources; starts each container as
#                     a process with exactly Allocate's env and mounts, in its own mount namespace and cgroup
# It applies the lab's pods with kubectl and checks every row of the lab's "What This Lab Proved", prints a table
# like the lab's and exits non-zero on a failed row.
#
#   integration/lab3/run.sh           on the simulated GPU (CI): a 15360 MiB card like the lab's T4
#   integration/lab3/run.sh --gpu     on the real GPU of this host (PyTorch workloads, as in the lab)
# Binaries come from target/debug (or $VGPU_BIN); build with `cargo build --workspace` first.
# Needs root (mount namespaces, cgroups, eBPF) and a cgroup2 mount.
set -uo pipefail
cd "$(dirname "$0")/../.."
R=$PWD
GPU=0; KEEP=0
for a in "$@"; do
    case $a in
        --gpu) GPU=1 ;;
        --keep) KEEP=1 ;;
        *) echo "usage: $0 [--gpu] [--keep]" >&2; exit 2 ;;
    esac
done
B=${VGPU_BIN:-$R/target/debug}
T=$(mktemp -d /tmp/vgpu-lab3.XXXXXX); chmod 755 "$T"
NODE=lab3-node
# The cgroup2 hierarchy (on a hybrid host it is not /sys/fs/cgroup itself but e.g. /sys/fs/cgroup/unified).
CG2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
CG=${CG2:-/sys/fs/cgroup}/vgpu-lab3-$$
PIDS=()
# Mount targets the kubelet harness may have to create on the host (an empty /etc/ld.so.preload, an empty
# /usr/local/vgpu): removed at the end if they were not there before.
HAD_PRELOAD=0; [ -e /etc/ld.so.preload ] && HAD_PRELOAD=1
HAD_VGPU_DIR=0; [ -e /usr/local/vgpu ] && HAD_VGPU_DIR=1
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    pkill -9 -f "$T/" 2>/dev/null
    if [ -d "$CG" ]; then find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null; fi
    [ $HAD_PRELOAD = 0 ] && [ -f /etc/ld.so.preload ] && [ ! -s /etc/ld.so.preload ] && rm -f /etc/ld.so.preload
    [ $HAD_VGPU_DIR = 0 ] && rmdir /usr/local/vgpu 2>/dev/null
    [ $KEEP = 1 ] && echo "lab3: kept $T" || rm -rf "$T"
}
trap cleanup EXIT
log() { printf '[lab3 %s] %s\n' "$(date -u +%T)" "$*" >&2; }
die() { log "FATAL: $*"; for f in "$T"/*.log; do echo "--- $f"; tail -30 "$f"; done; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mount namespaces, cgroups, eBPF)"
for b in kube-standin kubelet-harness sched-driver vgpu-agent vgpu-scheduler libvgpu.so; do
    [ -e "$B/$b" ] || die "$B/$b missing: cargo build --workspace"
done

# --- the GPU: real or simulated -----------------------------------------------------------------------------
POD_ENV=""
if [ $GPU = 1 ]; then
    nvidia-smi -L >/dev/null || die "--gpu: no NVIDIA GPU here"
    PY=$(command -v python3)
    # What an image's environment would carry: its PATH and where the driver's libraries are.
    POD_ENV="PATH=$PATH${LD_LIBRARY_PATH:+ LD_LIBRARY_PATH=$LD_LIBRARY_PATH} HOME=/root"
    echo "lab3: on the real GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
else
    SIM=$("$B/sim-dir") || die "sim-dir"
    export VGPU_SIM_STATE=$T/sim.state VGPU_SIM_MEMORY_MIB=15360 VGPU_SIM_CONTEXT_MIB=520
    export LD_LIBRARY_PATH=$SIM${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PATH=$SIM:$PATH
    # What an image's environment would carry: where its libcuda and nvidia-smi are (the simulated ones).
    POD_ENV="LD_LIBRARY_PATH=$SIM VGPU_SIM_STATE=$T/sim.state VGPU_SIM_MEMORY_MIB=15360 VGPU_SIM_CONTEXT_MIB=520 PATH=$SIM:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "lab3: no real GPU asked for: on the simulated GPU (integration/simgpu, a 15360 MiB card like the lab's T4, 520 MiB per CUDA context like PyTorch's on a real card)"
fi

# --- identities, keys, certificates ---------------------------------------------------------------------------
openssl rand -hex 32 > "$T/seal.key"
cat > "$T/tokens.csv" <<TOK
admin-token,kubernetes-admin,1,"system:masters"
sched-token,system:serviceaccount:vgpu-system:vgpu-scheduler,2
agent-token,system:serviceaccount:vgpu-system:vgpu-agent,3
kubelet-token,system:node:$NODE,4,"system:nodes"
TOK
# A CA of the lab's own and one certificate for 127.0.0.1 signed by it: it serves the API (kubectl sends tokens
# only over HTTPS) and the webhook. rustls refuses a CA certificate used as a server's, so the two are separate.
{
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=vgpu-lab3-ca" \
        -keyout "$T/ca.key" -out "$T/ca.crt"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$T/webhook.key" -out "$T/webhook.csr"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$T/ext.cnf"
    openssl x509 -req -in "$T/webhook.csr" -CA "$T/ca.crt" -CAkey "$T/ca.key" -CAcreateserial -days 1 \
        -extfile "$T/ext.cnf" -out "$T/webhook.crt"
} >/dev/null 2>&1 || die "openssl"
kubeconfig() { # $1 token, $2 file
    cat > "$2" <<KC
apiVersion: v1
kind: Config
clusters: [{name: standin, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$T/ca.crt"}}]
users: [{name: u, user: {token: $1}}]
contexts: [{name: c, context: {cluster: standin, user: u, namespace: default}}]
current-context: c
KC
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WEBHOOK_PORT=$(free_port); EXT_PORT=$(free_port); SCHED_METRICS=$(free_port); AGENT_METRICS=$(free_port)

# --- start the stack -------------------------------------------------------------------------------------------
"$B/kube-standin" --listen 127.0.0.1:0 --token-auth-file "$T/tokens.csv" \
    --tls-cert-file "$T/webhook.crt" --tls-private-key-file "$T/webhook.key" \
    --mutating-webhook "https://127.0.0.1:$WEBHOOK_PORT/mutate" \
    --validating-webhook "https://127.0.0.1:$WEBHOOK_PORT/validate" \
    --webhook-ca "$T/ca.crt" --webhook-exempt-namespace kube-system --webhook-exempt-namespace vgpu-system \
    > "$T/standin.out" 2> "$T/standin.log" &
PIDS+=($!)
for _ in $(seq 50); do API_PORT=$(head -1 "$T/standin.out" 2>/dev/null | grep -o '[0-9]*$'); [ -n "$API_PORT" ] && break; sleep 0.1; done
[ -n "${API_PORT:-}" ] || die "kube-standin did not start"
kubeconfig admin-token "$T/admin.kubeconfig"; kubeconfig sched-token "$T/sched.kubeconfig"
kubeconfig agent-token "$T/agent.kubeconfig"; kubeconfig kubelet-token "$T/kubelet.kubeconfig"
export KUBECONFIG=$T/admin.kubeconfig
K() { kubectl --request-timeout=10s "$@"; }
log "API on 127.0.0.1:$API_PORT"

KUBECONFIG=$T/sched.kubeconfig "$B/vgpu-scheduler" serve \
    --extender-listen 127.0.0.1:$EXT_PORT --metrics-listen 127.0.0.1:$SCHED_METRICS \
    --webhook-listen 127.0.0.1:$WEBHOOK_PORT --tls-cert "$T/webhook.crt" --tls-key "$T/webhook.key" \
    --seal-key-file "$T/seal.key" > "$T/scheduler.log" 2>&1 &
PIDS+=($!)
KUBECONFIG=$T/sched.kubeconfig "$B/sched-driver" --extender "http://127.0.0.1:$EXT_PORT" > "$T/driver.log" 2>&1 &
PIDS+=($!)

mkdir -p "$T/device-plugins" "$T/pod-resources" "$T/containers" "$T/cards" "$CG"
chmod 1777 "$T/cards"
cp "$B/libvgpu.so" "$T/libvgpu.so"
KUBECONFIG=$T/kubelet.kubeconfig "$B/kubelet-harness" --node-name $NODE --device-plugin-dir "$T/device-plugins" \
    --pod-resources-socket "$T/pod-resources/kubelet.sock" --cgroup-root "$CG" --run-dir "$T/kubelet" \
    > "$T/kubelet.log" 2>&1 &
PIDS+=($!)
sleep 1
KUBECONFIG=$T/agent.kubeconfig RUST_LOG=info "$B/vgpu-agent" run --node-name $NODE \
    --device-plugin-dir "$T/device-plugins" --pod-resources-socket "$T/pod-resources/kubelet.sock" \
    --containers-dir "$T/containers" --shim-lib "$T/libvgpu.so" --card-dir "$T/cards" \
    --seal-key-file "$T/seal.key" --cache-dir "$T/containers" --socket "$T/agent.sock" \
    --state-file "$T/agent-state.json" --pin-dir off --metrics-addr 127.0.0.1:$AGENT_METRICS \
    --policy enforce > "$T/agent.log" 2>&1 &
PIDS+=($!)

wait_for() { # $1 seconds, $2... command; true when it succeeds
    local n=$(( $1 * 5 )); shift
    for _ in $(seq $n); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
alloc_of() { K get pod "$1" -o jsonpath='{.metadata.annotations.hami\.io/vgpu-devices-allocated}'; }
phase_of() { K get pod "$1" -o jsonpath='{.status.phase}'; }
is_phase() { [ "$(phase_of "$1")" = "$2" ]; }
podlog() { cat "$T/kubelet/logs/default_$1_app.log" 2>/dev/null; }
events_of() { K get events --field-selector "involvedObject.name=$1" -o jsonpath='{range .items[*]}{.reason}{": "}{.message}{"\n"}{end}'; }

# --- the pods: the lab's manifests; on the simulated GPU the PyTorch commands become the simulated clients -----
mkpod() { # $1 name, $2 command (sh -c), $3 resources (yaml flow map), $4 extra env (NAME=value ...)
    local envs="" kv
    for kv in $POD_ENV $4; do envs+="        - {name: ${kv%%=*}, value: \"${kv#*=}\"}"$'\n'; done
    cat > "$T/$1.yaml" <<POD
apiVersion: v1
kind: Pod
metadata:
  name: $1
spec:
  restartPolicy: Never
  containers:
    - name: app
      image: lab3/host-process
      command: ["sh", "-c", $(printf '%s' "$2" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      env:
$envs        - {name: VGPU_LOG_DUMMY, value: "1"}
      resources:
        limits: $3
POD
}
if [ $GPU = 1 ]; then
    OOM_CMD="$PY $R/bench/gpu/oom_test.py"
    BURN_CMD="$PY $R/bench/gpu/matmul_loop.py 30"
else
    OOM_CMD="cuda_oom"
    BURN_CMD="cuda_launch -u 500 -s 12 -k 10"
fi
mkpod gpumem-pod-a "nvidia-smi; sleep infinity" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000}' ""
mkpod gpumem-pod-b "sleep infinity" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000}' ""
mkpod oom-test-pod "$OOM_CMD" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000}' ""
mkpod gpucores-pod "$BURN_CMD" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000, nvidia.com/gpucores: 30}' "GPU_CORE_UTILIZATION_POLICY=force"
mkpod gpucores-default-pod "$BURN_CMD" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000, nvidia.com/gpucores: 30}' "GPU_CORE_UTILIZATION_POLICY=default"

ROWS=(); FAIL=0
row() { # $1 claim, $2 evidence, $3 ok(0/1)
    ROWS+=("$([ "$3" = 1 ] && echo PASS || echo FAIL)|$1|$2"); [ "$3" = 1 ] || FAIL=1
    log "$([ "$3" = 1 ] && echo PASS || echo FAIL): $1: $2"
}

# --- step 1: the node offers 10 vGPUs ---------------------------------------------------------------------------
wait_for 30 sh -c "kubectl get node $NODE -o jsonpath='{.metadata.annotations.hami\.io/node-nvidia-register}' | grep -q GPU-" \
    || die "the agent did not register the node"
wait_for 20 sh -c "[ \"\$(kubectl get node $NODE -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')\" -gt 0 ]" \
    || die "the kubelet harness shows no nvidia.com/gpu"
ALLOCATABLE=$(K get node $NODE -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')
NGPU=$(K get node $NODE -o jsonpath='{.metadata.annotations.hami\.io/node-nvidia-register}' | grep -o '"id"' | wc -l)
row "The node offers 10 vGPUs per card" "allocatable nvidia.com/gpu=$ALLOCATABLE on $NGPU card(s)" \
    $([ "$ALLOCATABLE" = $((10 * NGPU)) ] && echo 1 || echo 0)

# --- step 2: two pods on one card -------------------------------------------------------------------------------
K apply -f "$T/gpumem-pod-a.yaml" -f "$T/gpumem-pod-b.yaml" >&2 || die "kubectl apply"
wait_for 60 is_phase gpumem-pod-a Running; wait_for 60 is_phase gpumem-pod-b Running
A=$(alloc_of gpumem-pod-a); Bv=$(alloc_of gpumem-pod-b)
ok=0; [[ "$A" =~ ^GPU-[^,]+,NVIDIA,4000,0:\;$ ]] && [ "$A" = "$Bv" ] && is_phase gpumem-pod-a Running && is_phase gpumem-pod-b Running && ok=1
row "Multiple Pods can share one physical GPU" "both Running, a: $A b: $Bv" $ok

# --- step 3: nvidia-smi inside a pod ----------------------------------------------------------------------------
wait_for 20 sh -c "grep -q MiB '$T/kubelet/logs/default_gpumem-pod-a_app.log'"
# nvidia-smi pads the figures (`   0MiB /   4000MiB`): compare them without the padding.
SMI=$(podlog gpumem-pod-a | grep -o '[0-9]*MiB *\/ *[0-9]*MiB' | head -1 | tr -s ' ')
row "VRAM ceiling visible in nvidia-smi" "nvidia-smi in gpumem-pod-a: $SMI" $([ "$SMI" = "0MiB / 4000MiB" ] && echo 1 || echo 0)

# --- step 4: OOM past the limit, neighbours keep running --------------------------------------------------------
K apply -f "$T/oom-test-pod.yaml" >&2
wait_for 120 sh -c "[ \"\$(kubectl get pod oom-test-pod -o jsonpath='{.status.phase}')\" = Succeeded ] || [ \"\$(kubectl get pod oom-test-pod -o jsonpath='{.status.phase}')\" = Failed ]"
OOMLINE=$(podlog oom-test-pod | grep -o 'Device 0 OOM [0-9]* / [0-9]*' | head -1)
HIT=$(podlog oom-test-pod | grep -o 'Hit the limit after [0-9]* MiB' | head -1)
HITMIB=$(echo "$HIT" | grep -o '[0-9]*' | head -1)
ok=0; [ -n "$OOMLINE" ] && [[ "$OOMLINE" == *" / 4194304000" ]] && [ -n "$HITMIB" ] && [ "$HITMIB" -lt 4000 ] && [ "$HITMIB" -ge 3072 ] && ok=1
row "VRAM limits are enforced, not cosmetic" "$HIT; $OOMLINE" $ok
ok=0; is_phase gpumem-pod-a Running && is_phase gpumem-pod-b Running && ok=1
row "A Pod hitting its limit does not disturb neighbors" "oom-test-pod $(phase_of oom-test-pod); a $(phase_of gpumem-pod-a), b $(phase_of gpumem-pod-b)" $ok
EV=$(events_of oom-test-pod)
ok=0; echo "$EV" | grep -q '^FilteringSucceed: find fit node(' && echo "$EV" | grep -q "^BindingSucceed: Successfully binding node \[$NODE\] to default/oom-test-pod" && ok=1
row "The scheduler's decisions as events" "$(echo "$EV" | grep -E '^(FilteringSucceed|BindingSucceed)' | tr '\n' ';' | cut -c1-160)" $ok

# --- a tenant's environment cannot lift the limits Allocate set (issue 16: the limits file is the root of trust) --
mkpod tenant-env-pod "$OOM_CMD" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 4000}' \
    "CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_MEMORY_LIMIT=20000m VGPU_LIMITS_FILE=/nonexistent CUDA_DISABLE_CONTROL=true CUDA_DEVICE_MEMORY_SHARED_CACHE=/tmp/mine.cache"
K apply -f "$T/tenant-env-pod.yaml" >&2
wait_for 120 sh -c "[ \"\$(kubectl get pod tenant-env-pod -o jsonpath='{.status.phase}')\" = Succeeded ] || [ \"\$(kubectl get pod tenant-env-pod -o jsonpath='{.status.phase}')\" = Failed ]"
THIT=$(podlog tenant-env-pod | grep -o 'Hit the limit after [0-9]* MiB' | head -1)
TMIB=$(echo "$THIT" | grep -o '[0-9]*' | head -1)
ok=0; [ -n "$TMIB" ] && [ "$TMIB" -lt 4000 ] && podlog tenant-env-pod | grep -q ' / 4194304000' && ok=1
row "A tenant's environment cannot lift its limits" "env asks 20000m, VGPU_LIMITS_FILE=/nonexistent, CUDA_DISABLE_CONTROL=true: $THIT" $ok

# --- step 5: gpucores 30 under force, and bursting under default ------------------------------------------------
share_of() { # $1 pod: the share of the card its workload got
    if [ $GPU = 1 ]; then podlog "$1" | grep -o 'nvml_mean [0-9.]*' | tail -1 | awk '{print $2/100}'
    else podlog "$1" | grep -o 'overall busy [0-9.]*' | tail -1 | awk '{print $3}'; fi
}
run_share() { # $1 pod
    K apply -f "$T/$1.yaml" >&2
    if [ $GPU = 1 ]; then
        wait_for 60 is_phase "$1" Running
        sleep 4   # PyTorch's start (CUDA context, first kernels) before the loop
        # The lab samples utilization from the host (the driver pod's nvidia-smi); so does this, at 10 Hz.
        "$PY" "$R/bench/gpu/util_sampler.py" 15 > "$T/$1.util" 2>&1 || true
        K delete pod "$1" --wait=false >&2
        grep -o 'util mean=[0-9.]*' "$T/$1.util" | sed 's/util mean=/nvml_mean /'  >> "$T/kubelet/logs/default_$1_app.log"
    else
        wait_for 60 sh -c "[ \"\$(kubectl get pod $1 -o jsonpath='{.status.phase}')\" = Succeeded ]"
    fi
}
run_share gpucores-pod
F=$(share_of gpucores-pod)
ok=$(awk -v f="${F:-0}" 'BEGIN{print (f>=0.27 && f<=0.33)?1:0}')
row "Compute limits hold (force)" "gpucores 30, force: $(awk -v f="${F:-0}" 'BEGIN{printf "%.1f%%", f*100}') of the card" $ok
run_share gpucores-default-pod
D=$(share_of gpucores-default-pod)
ok=$(awk -v f="${D:-0}" 'BEGIN{print (f>=0.6)?1:0}')
row "default policy bursts on an idle card" "gpucores 30, default, card otherwise idle: $(awk -v f="${D:-0}" 'BEGIN{printf "%.1f%%", f*100}')" $ok

# --- a forged pod: placement written by hand, nodeName set directly -------------------------------------------
cat > "$T/forged.yaml" <<POD
apiVersion: v1
kind: Pod
metadata:
  name: forged
  annotations:
    hami.io/vgpu-node: $NODE
    hami.io/bind-phase: allocating
    hami.io/vgpu-devices-to-allocate: "$(echo "$A" | sed 's/,4000,/,15000,/')"
spec:
  nodeName: $NODE
  restartPolicy: Never
  containers:
    - name: app
      image: lab3/host-process
      command: ["sleep", "infinity"]
      resources:
        limits: {nvidia.com/gpu: 1, nvidia.com/gpumem: 15000}
POD
WEB=$(K apply -f "$T/forged.yaml" 2>&1); webrc=$?
row "A forged pod is refused by the webhook" "$(echo "$WEB" | tr '\n' ' ' | cut -c1-150)" $([ $webrc != 0 ] && echo 1 || echo 0)
# kube-system is exempt from the webhook (so the cluster cannot lock itself out): the node must refuse it.
K create namespace kube-system >/dev/null 2>&1
K -n kube-system apply -f "$T/forged.yaml" >&2
wait_for 30 sh -c "[ \"\$(kubectl -n kube-system get pod forged -o jsonpath='{.status.phase}')\" = Failed ]"
FP=$(K -n kube-system get pod forged -o jsonpath='{.status.phase} {.status.reason}: {.status.message}')
ok=0; [[ "$FP" == Failed\ UnexpectedAdmissionError* ]] && [[ "$FP" == *seal* ]] && is_phase gpumem-pod-a Running && [ "$(alloc_of gpumem-pod-a)" = "$A" ] && ok=1
row "A forged pod that skips the webhook is refused at Allocate" "$(echo "$FP" | cut -c1-160)" $ok

K -n kube-system delete pod forged --wait=false >/dev/null 2>&1

# --- the 11th pod on a card of 10 slots ------------------------------------------------------------------------
running=2   # gpumem-pod-a and -b hold a slot each; the finished pods hold none
for i in $(seq 1 $((10 * NGPU - running))); do
    mkpod slot-$i "sleep infinity" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 100}' ""
    K apply -f "$T/slot-$i.yaml" >/dev/null
done
for i in $(seq 1 $((10 * NGPU - running))); do wait_for 60 is_phase slot-$i Running || break; done
mkpod slot-eleventh "sleep infinity" '{nvidia.com/gpu: 1, nvidia.com/gpumem: 100}' ""
K apply -f "$T/slot-eleventh.yaml" >&2
wait_for 30 sh -c "kubectl get events --field-selector involvedObject.name=slot-eleventh -o jsonpath='{.items[*].reason}' | grep -q Failed"
RUNNING=$(K get pods -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c Running)
EV11=$(events_of slot-eleventh | grep -E 'FilteringFailed|FailedScheduling' | head -2 | tr '\n' ' ')
ok=0; [ "$(phase_of slot-eleventh)" = Pending ] && [ -z "$(K get pod slot-eleventh -o jsonpath='{.spec.nodeName}')" ] \
    && echo "$EV11" | grep -q CardTimeSlicingExhausted && [ "$RUNNING" = $((10 * NGPU)) ] && ok=1
row "The 11th pod on a card of 10 slots is refused" "$RUNNING running; slot-eleventh Pending: $(echo "$EV11" | cut -c1-150)" $ok

# --- the table ---------------------------------------------------------------------------------------------------
echo
echo "What this lab proved ($( [ $GPU = 1 ] && echo "real GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" || echo "simulated GPU" ), $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "| | Claim | Evidence |"
echo "|---|---|---|"
for r in "${ROWS[@]}"; do IFS='|' read -r s c e <<< "$r"; echo "| $s | $c | $e |"; done
echo
echo "--- nvidia-smi inside gpumem-pod-a:"; podlog gpumem-pod-a | head -14
[ $FAIL = 0 ] && echo "lab3: all rows passed" || { echo "lab3: FAILED rows above"; for f in "$T"/*.log; do echo "--- $f"; tail -15 "$f"; done; }
exit $FAIL
