#!/bin/bash
# Why a launch-bound loop runs slower inside its windows than unlimited: the loop alone, under force 30 with
# two shim builds (SPIN: spins the last 1 ms before its window instead of sleeping), and with a nice-19 CPU hog
# on the loop's own core (keeps the core out of idle states while the loop sleeps). All pinned to one core.
# usage: SPIN=/abs/libvgpu-spin.so bash integration/gpu/small_kernels_warmup.sh [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-6}; T=$(mktemp -d); C=3
export VGPU_CARD_DIR=$T/cards
run() { timeout $((D + 60)) taskset -c $C python3 $G/small_kernel_phases.py $D 256 2>&1 | grep -v "^  *[0-9]*- *[0-9]* "; }
shim() { local lib=$1 n=$2; shift 2; VGPU_LOG=info GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$lib \
  CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=30 CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$n.cache "$@"; }
hog() { taskset -c $C nice -n 19 python3 -c "while True: pass" & HOG=$!; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name --format=csv,noheader)"
echo "== unlimited"; run
echo "== force 30, sleeps until its window"; shim $S a run
echo "== force 30, spins the last 1 ms"; shim ${SPIN:?} b run
hog; echo "== force 30, sleeps, nice-19 hog on the same core"; shim $S c run; kill $HOG
hog; echo "== unlimited, nice-19 hog on the same core"; run; kill $HOG
echo "== unlimited again"; run
rm -rf $T
