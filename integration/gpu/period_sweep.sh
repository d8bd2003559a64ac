#!/bin/bash
# How the pacing period trades NVML's view against throughput on a power-capped card: a bf16 n=4096 matmul
# slice at force 30 and 70 for several VGPU_PACING_PERIOD_MS values (throughput vs unlimited, NVML at 10 Hz
# as pacing.sh samples it), then raw NVML readings at 50 Hz by phase in the period for 1 s periods.
# Needs target/release/libvgpu.so, PyTorch, pynvml. usage: bash integration/gpu/period_sweep.sh [SECONDS] [PERIODS..]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-6}; shift; PERIODS=${*:-50 100 167 250 333 500 1000}; T=$(mktemp -d)
mm() {  # mm LABEL CORES PERIOD SAMPLER...: the loop (with the shim unless CORES is -) and a sampler beside it
  local label=$1 c=$2 per=$3; shift 3
  rm -rf $T/cards
  if [ "$c" = - ]; then timeout $((D + 60)) python3 $G/matmul_loop.py $((D + 2)) 4096 > $T/mm.txt 2>&1 & else
    VGPU_CARD_DIR=$T/cards VGPU_PACING_PERIOD_MS=$per GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$S \
    CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=$c CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$c-$per.cache \
    timeout $((D + 60)) python3 $G/matmul_loop.py $((D + 2)) 4096 > $T/mm.txt 2>&1 & fi
  local p=$!
  until grep -q window $T/mm.txt 2>/dev/null || ! kill -0 $p 2>/dev/null; do sleep 0.1; done
  "$@" > $T/u.txt; wait $p
  echo "$label: $(grep -o 'overall [0-9.]*' $T/mm.txt | awk '{print $2}') TFLOP/s | $(tail -2 $T/u.txt | tr '\n' ' ')"
}
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader)"
mm unlimited - 0 python3 $G/nvml_sampler.py $((D - 2))
for per in $PERIODS; do for c in 30 70; do
  mm "force $c, $per ms" $c $per python3 $G/nvml_sampler.py $((D - 2))
done; done
mm unlimited - 0 python3 $G/nvml_sampler.py $((D - 2))
for c in 10 30; do
  echo "== raw NVML at 50 Hz, force $c, 1000 ms periods"
  mm "force $c, 1000 ms" $c 1000 python3 $G/nvml_raw.py $((D - 2)) 50 1000
  grep samples $T/u.txt | cut -c1-1500
done
rm -rf $T
