#!/bin/bash
# What the pacing period costs a latency-bound service: request_latency.py unlimited and as a force 30 slice with
# 50 ms and 500 ms (default) periods. Needs target/release/libvgpu.so, PyTorch. usage: bash integration/gpu/latency.sh [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-10}; T=$(mktemp -d)
lat() { timeout $((D + 60)) "$@" python3 $G/request_latency.py $D 50 2>&1; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "== unlimited"; lat env
for per in 50 500; do
  echo "== force 30, $per ms periods"; rm -rf $T/cards
  lat env PERIOD_MS=$per VGPU_LOG=info VGPU_CARD_DIR=$T/cards VGPU_PACING_PERIOD_MS=$per GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$S \
    CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=30 CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$per.cache
done
rm -rf $T
