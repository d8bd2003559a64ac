#!/bin/bash
# Two questions about the compute slice on a real GPU, each against unlimited runs in the same script:
#  A. Where a launch-bound loop (n=256) loses time inside its windows: enqueue vs synchronize vs GPU time,
#     with the shim build under test and with SPIN (a build that spins instead of sleeping while held).
#  B. Whether the period length changes what a 30% / 70% slice of a saturating matmul gets in throughput and
#     SM clock: periods of 50, 200 and 1000 ms (VGPU_PACING_PERIOD_MS).
# usage: [SPIN=/abs/lib.so] [PARTS=AB] bash integration/gpu/pacing_diag.sh [SECONDS]   (without SPIN that case
#        is skipped)
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-6}; T=$(mktemp -d)
export VGPU_CARD_DIR=$T/cards
split() { timeout $((D + 60)) python3 $G/small_kernel_split.py $D 256 2>&1; }
shim() { local lib=$1 c=$2 n=$3; shift 3; VGPU_LOG=info GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$lib \
  CUDA_DEVICE_MEMORY_LIMIT_0=20000m CUDA_DEVICE_SM_LIMIT=$c CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$n.cache "$@"; }
mm() {  # mm LABEL [shim args]: the n=4096 matmul loop, NVML sampled over its steady part
  local label=$1; shift
  "$@" timeout $((D + 60)) python3 $G/matmul_loop.py $((D + 2)) 4096 > $T/mm.txt 2>&1 & local p=$!
  until grep -q window $T/mm.txt 2>/dev/null || ! kill -0 $p 2>/dev/null; do sleep 0.1; done
  python3 $G/nvml_sampler.py $((D - 2)) > $T/u.txt; wait $p
  echo "$label: $(grep -o 'overall [0-9.]*' $T/mm.txt | awk '{print $2}') TFLOP/s | $(tail -1 $T/u.txt)"
}
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader)"
if [[ ${PARTS:-AB} == *A* ]]; then
echo "## A. launch-bound loop, n=256"
echo "== unlimited"; split
echo "== force 30"; shim $S 30 a split
[ -n "${SPIN:-}" ] && { echo "== force 30, spinning while held"; shim $SPIN 30 b split; }
echo "== unlimited"; split
echo "== shim, SM limit 100"; shim $S 100 c split
echo "== force 30"; shim $S 30 d split
echo "== unlimited"; split
fi
[[ ${PARTS:-AB} == *B* ]] || { rm -rf $T; exit 0; }
echo "## B. matmul n=4096 by period"
mm "unlimited"
for c in "30 50" "30 200" "30 1000" "70 50" "70 1000"; do
  set -- $c; VGPU_PACING_PERIOD_MS=$2 mm "force $1, $2 ms" shim $S $1 p$1-$2
done
mm "unlimited"
rm -rf $T
