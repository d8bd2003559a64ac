#!/usr/bin/env bash
# The lab's slices on this host, without Kubernetes: on the real GPU if there is one, else on the bundled
# simulated GPU (it says which). Builds what it needs first (scripts/setup.sh, then a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p vgpu-shim -p vgpu-agent -p vgpu-scheduler -p vgpu-integration
B=$PWD/target/release; A=$B/vgpu-agent; T=$(mktemp -d); trap 'rm -rf $T' EXIT
export VGPU_CARD_DIR=$T/cards
# Bold headings on a terminal only; a log file gets plain text.
if [ -t 1 ]; then step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }; else step() { printf '\n### %s\n' "$*"; }; fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    REAL=1; echo "Running on the real GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
    gcc -O1 -o $T/client bench/gpu/client.c -ldl
    oom() { $A exec --gpumem 4000 --cache "$T/$1.cache" -- $T/client direct "${@:2}"; }
else
    REAL=0; SIM=$($B/sim-dir)
    export LD_LIBRARY_PATH=$SIM${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PATH=$SIM:$PATH VGPU_SIM_STATE=$T/sim.state
    # 15360 MiB like the lab's T4, and a CUDA context of 520 MiB as PyTorch's on a real card, so the loop stops
    # where the lab's does (3072 MiB); the simulated card names itself "NVIDIA Simulated H100" in nvidia-smi.
    export VGPU_SIM_MEMORY_MIB=15360 VGPU_SIM_CONTEXT_MIB=520
    echo "No NVIDIA GPU here: running on the simulated GPU (integration/simgpu: \"NVIDIA Simulated H100\" in nvidia-smi, sized 15360 MiB like the lab's T4, 520 MiB per CUDA context)"
    oom() { $A exec --gpumem 4000 --cache "$T/$1.cache" -- $SIM/cuda_oom "${@:2}"; }
fi

step "nvidia-smi inside a 4000 MiB slice (vgpu-agent exec --gpumem 4000 -- nvidia-smi)"
$A exec --gpumem 4000 -- nvidia-smi --query-gpu=memory.used,memory.total --format=csv

step "The lab's OOM test: 512 MiB chunks until the slice refuses"
oom pod-a 2>&1 | tail -4

step "Two slices side by side: each holds its own 4000 MiB; a second process of slice A shares A's budget"
if [ $REAL = 1 ]; then oom pod-a 6 30000 > $T/a.log 2>&1 & else oom pod-a -n 6 -H 30000 > $T/a.log 2>&1 & fi
HOLDER=$!
sleep 3; grep "Allocated" $T/a.log | tail -1 | sed 's/^/-- slice A holds: /' 
echo "-- slice B:"; oom pod-b 2>&1 | grep -E "Hit the limit|OOM" | tail -2
echo "-- a second process in slice A:"; oom pod-a 2>&1 | grep -E "Hit the limit|OOM|failed" | tail -2
pkill -9 -f "vgpu-agent exec --gpumem 4000 --cache $T/pod-a.cache" || true; wait $HOLDER 2>/dev/null || true
echo "-- after kill -9 of A's holder, a new process of A gets the slice back:"; oom pod-a 2>&1 | grep "Hit the limit"

step "Compute slice: 30% under GPU_CORE_UTILIZATION_POLICY=force against the whole card"
if [ $REAL = 1 ]; then
    if python3 -c "import torch" 2>/dev/null; then
        echo "-- unlimited:"; python3 bench/gpu/matmul_loop.py 5 | tail -1
        echo "-- gpucores 30, force:"; $A exec --gpumem 20000 --gpucores 30 --policy force -- python3 bench/gpu/matmul_loop.py 5 | tail -1
    else echo "(PyTorch not installed: skipped)"; fi
else
    echo "-- unlimited:"; $SIM/cuda_launch -u 500 -s 2 -k 10 | tail -1
    echo "-- gpucores 30, force:"; $A exec --gpucores 30 --policy force -- $SIM/cuda_launch -u 500 -s 2 -k 10 | tail -1
fi

step "What the node agent sees without running (vgpu-agent status, from the cache files alone)"
$A status --cache-dir $T 2>&1 | head -12 || true

step "Scheduling the lab on a 10-slot T4 (vgpu-scheduler simulate deploy/examples/lab3-simulate.yaml)"
$B/vgpu-scheduler simulate deploy/examples/lab3-simulate.yaml
