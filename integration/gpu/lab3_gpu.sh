#!/bin/bash
# Issue 15 on the real GPU: the lab through the whole stack (integration/lab3/run.sh --gpu), then the lab's loop
# under vgpu-agent exec inside a pid namespace and outside it. Runs on the GPU machine from a bundle built here:
#   target/gpu-bundle/bundle.tar.xz  (release binaries, stripped: vgpu-agent, vgpu-scheduler, kube-standin,
#                                     kubelet-harness, sched-driver, sim-dir, libvgpu.so; and kubectl)
# usage (device tool, carry target/gpu-bundle): bash integration/gpu/lab3_gpu.sh OUTDIR
set -u
cd "$(dirname "$0")/../.."
R=$PWD; OUT=${1:-/tmp/lab3-gpu}; mkdir -p "$OUT"
B=$(mktemp -d); tar -C "$B" -xJf target/gpu-bundle/bundle.tar.xz
export PATH=$B:$PATH VGPU_BIN=$B
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo; echo "### 1. integration/lab3/run.sh --gpu"
bash integration/lab3/run.sh --gpu; echo "lab3 exit: $?"
echo; echo "### 2. the lab's loop in a 4000 MiB slice, outside and inside a pid namespace (no agent)"
echo "-- outside:"; $B/vgpu-agent exec --gpumem 4000 -- python3 bench/gpu/oom_test.py 2>&1 | grep -E "Hit the limit|OOM" | head -2
echo "-- inside (unshare --pid --fork --mount-proc):"
unshare --pid --fork --mount-proc $B/vgpu-agent exec --gpumem 4000 -- python3 bench/gpu/oom_test.py 2>&1 | grep -E "Hit the limit|OOM" | head -2
} 2>&1 | tee "$OUT/lab3-gpu.log"
