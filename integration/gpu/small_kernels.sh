#!/bin/bash
# Launch-bound loop at 30% (force): where the time goes, phase by phase in the 50 ms period, against the same
# loop unlimited and with the shim at CUDA_DEVICE_SM_LIMIT=100, in one script. Needs target/release/libvgpu.so.
# usage: bash integration/gpu/small_kernels.sh [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-6}; T=$(mktemp -d)
export VGPU_CARD_DIR=$T/cards
run() { timeout $((D + 60)) python3 $G/small_kernel_phases.py $D 256 2>&1; }
shim() { local c=$1; shift; VGPU_LOG=info GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT_0=20000m \
  CUDA_DEVICE_SM_LIMIT=$c CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$c.cache "$@"; }
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)  governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo n/a)"
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource))"
python3 -c "
import time; n=200000; t=time.perf_counter()
for _ in range(n): time.monotonic_ns()
print(f'clock_gettime(CLOCK_MONOTONIC) from Python: {(time.perf_counter()-t)/n*1e9:.0f} ns per call')"
echo "== unlimited"; run
echo "== shim, SM limit 100"; shim 100 run
echo "== shim, force 30"; shim 30 run
echo "== unlimited again"; run
rm -rf $T
