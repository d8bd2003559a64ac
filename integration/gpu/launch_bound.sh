#!/bin/bash
# Launch-bound loop (bf16 n=256 matmuls, 10 per synchronize) at force 30, interleaved with unlimited runs of
# the same loop: the machine's speed for this loop drifts by tens of percent over minutes (runs 8-14), so one
# baseline is not enough. Prints every run and the ratio of the slice's mean to the unlimited runs' mean.
# CORES= and N= run another share or matrix size the same way (CORES=70 N=4096: a saturating slice).
# Needs target/release/libvgpu.so, PyTorch. usage: [CORES=30] [N=256] bash integration/gpu/launch_bound.sh [ROUNDS] [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; R=${1:-3}; D=${2:-5}; C=${CORES:-30}; N=${N:-256}; T=$(mktemp -d)
mm() { timeout $((D + 60)) "$@" python3 $G/matmul_loop.py $D $N 2>&1 | grep -o 'overall [0-9.]*' | awk '{print $2}'; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "pacing period: ${VGPU_PACING_PERIOD_MS:-default} ms; $R rounds of $D s"
u=$(mm env); echo "unlimited $u" | tee -a $T/runs
for r in $(seq $R); do
  s=$(mm env VGPU_CARD_DIR=$T/cards GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT_0=20000m \
    CUDA_DEVICE_SM_LIMIT=$C CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/s.cache)
  echo "force$C $s" | tee -a $T/runs
  u=$(mm env); echo "unlimited $u" | tee -a $T/runs
done
awk -v c=$C -v n=$N '/^unlimited/ {u+=$2; nu++} /^force/ {s+=$2; ns++}
  END {printf "n=%d force %d: mean %.3f TFLOP/s against unlimited mean %.3f: %.3f\n", n, c, s/ns, u/nu, (s/ns)/(u/nu)}' $T/runs
rm -rf $T
