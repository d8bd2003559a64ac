#!/bin/bash
# Issue 3 evidence on a real GPU: compute slices as ratios to an unlimited run in the same script, with NVML
# utilization sampled at 10 Hz for the single-slice cases. Needs target/release/libvgpu.so, PyTorch, pynvml.
# The unlimited runs are repeated at the end; ratios are against the mean of the two (the machine drifts).
# Pacing period: VGPU_PACING_PERIOD_MS from the caller's environment, else the contract's default (1000 ms).
# usage: bash integration/gpu/pacing.sh [SECONDS per case]
set -u
cd "$(dirname "$0")/../.."
R=$PWD; S=$R/target/release/libvgpu.so; G=$R/bench/gpu; D=${1:-10}; T=$(mktemp -d)
export VGPU_CARD_DIR=$T/cards
mm() { timeout $((D + 60)) python3 $G/matmul_loop.py "$@" 2>&1; }
overall() { grep -o 'overall [0-9.]*' | awk '{print $2}'; }
slice() {  # slice NAME CORES POLICY ARGS...: the matmul loop as its own container (own cache file)
  local n=$1 c=$2 p=$3; shift 3
  GPU_CORE_UTILIZATION_POLICY=$p LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=$c \
    CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$n.cache mm "$@"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.3f", a/b; else print "n/a" }'; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader)"
echo "pacing period: ${VGPU_PACING_PERIOD_MS:-default} ms"
unlimited() {  # unlimited TAG: both loops without the shim, NVML sampled over the big one
  mm $D 4096 > $T/base$1.txt & local p=$!
  until grep -q window $T/base$1.txt 2>/dev/null || ! kill -0 $p 2>/dev/null; do sleep 0.1; done
  python3 $G/nvml_sampler.py $((D - 3)) > $T/u100$1.txt; wait $p
  mm $D 256 | overall > $T/small$1.txt
  echo "unlimited ($1) bf16 matmul n=4096: $(overall < $T/base$1.txt) TFLOP/s; n=256 (launch-bound): $(cat $T/small$1.txt) TFLOP/s"
  echo "    unlimited NVML: $(tail -1 $T/u100$1.txt)"
}
unlimited first
base=$(overall < $T/basefirst.txt); small=$(cat $T/smallfirst.txt)
r=$(slice n0 0 force $D 256 | overall); echo "n=256 with the shim and no SM limit: $(ratio $r $small) of unlimited"
# The sampler starts once the slice is running (its first per-second line), so start-up is not counted.
sampled() {  # sampled NAME CORES POLICY N: the slice with NVML sampled over its steady part
  slice $1 $2 $3 $D $4 > $T/$1.txt & local p=$!
  until grep -q window $T/$1.txt 2>/dev/null || ! kill -0 $p 2>/dev/null; do sleep 0.1; done
  python3 $G/nvml_sampler.py $((D - 3)) > $T/u$1.txt; wait $p
}
for c in 10 30 50 70; do
  sampled f$c $c force 4096; r=$(overall < $T/f$c.txt)
  echo "force $c%: $r TFLOP/s = $(ratio $r $base) of unlimited | NVML $(tail -1 $T/uf$c.txt)"
  echo "    NVML 1 s means: $(head -1 $T/uf$c.txt | cut -d: -f2)"
done
r=$(slice d30 30 default $D 4096 | overall); echo "default 30% alone: $(ratio $r $base) of unlimited"
both() { python3 $G/overlap.py $T/a.txt $T/b.txt $base; }
slice c30 30 force $D 4096 > $T/a.txt & slice c50 50 force $D 4096 > $T/b.txt; wait
echo "force 30 + force 50 together: $(ratio $(overall < $T/a.txt) $base) and $(ratio $(overall < $T/b.txt) $base) of unlimited alone; $(both)"
slice p30 30 force $D 4096 > $T/a.txt & slice p70 70 force $D 4096 > $T/b.txt; wait
echo "force 30 + force 70 together (card full, clock as under full load): $(ratio $(overall < $T/a.txt) $base) and $(ratio $(overall < $T/b.txt) $base) of unlimited alone; $(both)"
slice e30 30 default $D 4096 > $T/a.txt & slice e50 50 default $D 4096 > $T/b.txt; wait
echo "default 30 + default 50 together: $(ratio $(overall < $T/a.txt) $base) and $(ratio $(overall < $T/b.txt) $base) of unlimited alone; $(both)"
slice r30 30 default $((D + 4)) 4096 > $T/c.txt & (sleep 3; slice r50 50 default $((D / 2)) 4096 > $T/d.txt); wait
echo "default 30 while a default 50 runs from ~3 s for $((D / 2)) s, then alone (TFLOP/s per second; unlimited = $base):"
echo "    $(grep window $T/c.txt | awk '{printf "%s ", $3} END {print ""}')"
echo "    the 50's windows: $(grep window $T/d.txt | awk '{printf "%s ", $3} END {print ""}')"
sampled s30 30 force 256
unlimited last
mean() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", (a+b)/2}'; }
base2=$(mean $base $(overall < $T/baselast.txt)); small2=$(mean $small $(cat $T/smalllast.txt))
echo "small kernels n=256 force 30%: $(overall < $T/s30.txt) TFLOP/s = $(ratio $(overall < $T/s30.txt) $small2) of the mean unlimited ($small2) | NVML $(tail -1 $T/us30.txt)"
echo "force 10/30/50/70 against the mean unlimited n=4096 ($base2 TFLOP/s): $(for c in 10 30 50 70; do printf "%s " $(ratio $(overall < $T/f$c.txt) $base2); done)"
rm -rf $T
