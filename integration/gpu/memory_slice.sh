#!/bin/bash
# Issue 2 evidence on a real GPU: the memory slice under vgpu-agent exec. Needs target/release/{vgpu-agent,
# libvgpu.so} built elsewhere (the GPU machine has no cargo), PyTorch, nvcc, gcc, cgroup v2 at /sys/fs/cgroup.
# usage: bash integration/gpu/memory_slice.sh
set -u
cd "$(dirname "$0")/../.."
R=$PWD; A=$R/target/release/vgpu-agent; S=$R/target/release/libvgpu.so; G=$R/bench/gpu; T=$(mktemp -d)
export VGPU_CARD_DIR=$T/cards
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo; echo "### 1. the lab's oom-test loop: vgpu-agent exec --gpumem 4000 -- python3 oom_test.py"
$A exec --gpumem 4000 -- python3 $G/oom_test.py 2>&1 | tail -9

echo; echo "### 2. nvidia-smi inside the slice"
$A exec --gpumem 4000 -- nvidia-smi 2>&1 | sed -n '1,12p'
$A exec --gpumem 4000 -- nvidia-smi --query-gpu=memory.used,memory.total --format=csv

echo; echo "### 3. PyTorch with expandable segments (cuMemCreate/cuMemMap)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $A exec --gpumem 4000 -- python3 $G/oom_test.py 2>&1 | tail -5

echo; echo "### 4. driver-API paths: exported symbol via dlsym on libcuda's handle, and cuGetProcAddress_v2"
gcc -O1 -o $T/client $G/client.c -ldl
for m in direct proc; do echo "-- $m"; $A exec --gpumem 4000 -- $T/client $m 2>&1 | tail -3; done

echo; echo "### 5. two slices in their own cgroups; a second process shares slice A's budget; kill -9 returns memory"
mkdir -p /sys/fs/cgroup/vgpu-a /sys/fs/cgroup/vgpu-b
in_cg() { local cg=$1; shift; sh -c "echo \$\$ > /sys/fs/cgroup/$cg/cgroup.procs && exec \"\$@\"" sh "$@"; }
( while true; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | tr '\n' ';'; echo; sleep 0.5; done ) > $T/nvml.log 2>&1 &
SAMPLER=$!
in_cg vgpu-a $A exec --gpumem 4000 --cache $T/a.cache -- python3 $G/hold.py 3000 25 A1 > $T/a1.log 2>&1 &
A1=$!
in_cg vgpu-b $A exec --gpumem 4000 --cache $T/b.cache -- python3 $G/hold.py 3000 25 B1 > $T/b1.log 2>&1 &
sleep 12
in_cg vgpu-a $A exec --gpumem 4000 --cache $T/a.cache -- python3 $G/hold.py 3000 1 A2 2>&1 | grep -E "A2|OOM"
pkill -9 -f "hold.py 3000 25 A1"; sleep 1
echo "-- after kill -9 of A1:"
in_cg vgpu-a $A exec --gpumem 4000 --cache $T/a.cache -- python3 $G/hold.py 3000 1 A3 2>&1 | grep -E "A3|OOM"
wait $A1 2>/dev/null; cat $T/a1.log | grep -v "^$" | tail -2; sleep 1; kill $SAMPLER
wait 2>/dev/null; cat $T/b1.log | tail -2
echo "-- NVML per-process used memory (MiB), max seen per pid over the run:"
tr ';' '\n' < $T/nvml.log | awk -F', ' 'NF==2 {if ($2>m[$1]) m[$1]=$2} END {for (p in m) print "  pid " p ": " m[p] " MiB"}'
rmdir /sys/fs/cgroup/vgpu-a /sys/fs/cgroup/vgpu-b 2>/dev/null
rm -rf $T
