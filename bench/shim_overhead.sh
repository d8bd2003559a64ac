#!/bin/bash
# What the shim adds per call, against the same program without it, interleaved in one script (ratios, not
# absolute times: the machines are noisy). On a machine without a GPU it runs on the simulated GPU, where the
# driver side costs next to nothing, so the difference is the shim's own work per call.
# usage: bash bench/shim_overhead.sh [ROUNDS]   (needs target/release/libvgpu.so and the integration build)
cd "$(dirname "$0")/.."
R=${1:-7}; S=$PWD/target/release/libvgpu.so; T=$(mktemp -d)
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  SIM=$(ls -d target/*/build/vgpu-integration-*/out/sim 2>/dev/null | head -1)
  [ -n "$SIM" ] || { echo "no GPU and no simulated GPU: cargo build -p vgpu-integration first"; exit 1; }
  export LD_LIBRARY_PATH=$PWD/$SIM VGPU_SIM_STATE=$T/state; echo "simulated GPU ($SIM)"
else echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"; fi
gcc -O2 -o $T/alloc bench/gpu/alloc_bench.c -ldl && gcc -O2 -o $T/client bench/gpu/client.c -ldl || exit 1
shim() { LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT=40000m CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/c.cache "$@"; }
for r in $(seq $R); do
  echo "launch base $($T/client launch 2000000 | awk '{print $2}')" >> $T/res
  echo "launch shim $(shim $T/client launch 2000000 | awk '{print $2}')" >> $T/res
  echo "launch sm100 $(CUDA_DEVICE_SM_LIMIT=100 shim $T/client launch 2000000 | awk '{print $2}')" >> $T/res
  echo "alloc base $($T/alloc 20000 | awk '{print $2}')" >> $T/res
  echo "alloc shim $(shim $T/alloc 20000 | awk '{print $2}')" >> $T/res
done
med() { grep "^$1 $2 " $T/res | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
lb=$(med launch base); ls=$(med launch shim); l1=$(med launch sm100); ab=$(med alloc base); as=$(med alloc shim)
echo "cuLaunchKernel through the cuGetProcAddress pointer (invalid function: the driver's cheapest path), ns per call, median of $R:"
echo "  no shim $lb | shim $ls (+$(awk -v a=$ls -v b=$lb 'BEGIN{printf "%.1f", a-b}') ns) | shim with CUDA_DEVICE_SM_LIMIT=100 $l1 (+$(awk -v a=$l1 -v b=$lb 'BEGIN{printf "%.1f", a-b}') ns)"
echo "cuMemAlloc_v2 + cuMemFree_v2 (1 MiB), ns per pair, median of $R:"
echo "  no shim $ab | shim $as (+$(awk -v a=$as -v b=$ab 'BEGIN{printf "%.1f", a-b}') ns, ratio $(awk -v a=$as -v b=$ab 'BEGIN{printf "%.3f", a/b}'))"
rm -rf $T
