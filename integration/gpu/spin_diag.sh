#!/bin/bash
# Does keeping the held thread on its CPU (spinning the last part of each hold instead of sleeping) give the
# launch-bound loop its in-window speed back, and at what CPU cost? The n=256 loop at force 30 with the shim
# under test and with builds that spin the last SPIN ms of each hold (VARIANTS="label=/abs/lib.so ..."),
# interleaved with unlimited runs. usage: VARIANTS=".." bash integration/gpu/spin_diag.sh [ROUNDS] [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; R=${1:-2}; D=${2:-5}; T=$(mktemp -d)
split() { timeout $((D + 60)) "$@" python3 $G/small_kernel_split.py $D 256 2>&1 | grep -v "^\[vgpu"; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
for r in $(seq $R); do
  echo "== unlimited"; split env
  for v in sleep=$S ${VARIANTS:-}; do
    echo "== force 30, ${v%%=*}"; rm -rf $T/cards
    split env VGPU_CARD_DIR=$T/cards GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=${v#*=} \
      CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=30 CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/${v%%=*}.cache
  done
done
echo "== unlimited"; split env
rm -rf $T
