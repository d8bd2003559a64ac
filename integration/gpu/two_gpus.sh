#!/bin/bash
# Compute slices on a machine with two or more GPUs: each card is paced on its own (one card file per GPU).
# Unlimited baselines on GPU 0 and GPU 1 together; then force 30 on GPU 0 beside force 60 on GPU 1 (each
# process seeing only its GPU), NVML sampled on both; then the same with both processes seeing every GPU and
# the second choosing CUDA device 1 itself. Needs target/release/libvgpu.so, PyTorch, pynvml.
# usage: bash integration/gpu/two_gpus.sh [SECONDS]
set -u
cd "$(dirname "$0")/../.."
S=$PWD/target/release/libvgpu.so; G=$PWD/bench/gpu; D=${1:-10}; T=$(mktemp -d)
export VGPU_CARD_DIR=$T/cards
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"; nvidia-smi --query-gpu=index,name,uuid,power.limit --format=csv,noheader
overall() { grep -o 'overall [0-9.]*' $1 | awk '{print $2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ printf "%.3f", a/b }'; }
mm() { timeout $((D + 60)) python3 $G/matmul_loop.py $D 4096 "$@" 2>&1; }
slice() { local n=$1 c=$2; shift 2; GPU_CORE_UTILIZATION_POLICY=force LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT=20000m \
  CUDA_DEVICE_SM_LIMIT=$c CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$n.cache "$@"; }
sample() { until grep -q window $1 2>/dev/null; do sleep 0.1; done; python3 $G/nvml_sampler.py $((D - 3)) $2 | tail -1; }
CUDA_VISIBLE_DEVICES=0 mm > $T/b0.txt & CUDA_VISIBLE_DEVICES=1 mm > $T/b1.txt & wait
b0=$(overall $T/b0.txt); b1=$(overall $T/b1.txt)
echo "unlimited, both GPUs at once: GPU 0 $b0 TFLOP/s, GPU 1 $b1 TFLOP/s"
CUDA_VISIBLE_DEVICES=0 slice g0 30 mm > $T/s0.txt & CUDA_VISIBLE_DEVICES=1 slice g1 60 mm > $T/s1.txt &
sample $T/s1.txt 1 > $T/v1.txt & u0=$(sample $T/s0.txt 0); wait
echo "force 30 on GPU 0: $(ratio $(overall $T/s0.txt) $b0) of its unlimited | NVML GPU 0 $u0"
echo "force 60 on GPU 1: $(ratio $(overall $T/s1.txt) $b1) of its unlimited | NVML GPU 1 $(cat $T/v1.txt)"
echo "card files: $(ls $T/cards | tr '\n' ' ')"
rm -rf $T/cards
slice h0 30 mm > $T/t0.txt & slice h1 60 mm 1 > $T/t1.txt &
sample $T/t1.txt 1 > $T/u1.txt & u0=$(sample $T/t0.txt 0); wait
echo "both seeing every GPU: force 30 on device 0: $(ratio $(overall $T/t0.txt) $b0) | NVML GPU 0 $u0"
echo "                       force 60 on device 1: $(ratio $(overall $T/t1.txt) $b1) | NVML GPU 1 $(cat $T/u1.txt)"
echo "card files: $(ls $T/cards | tr '\n' ' ')"
rm -rf $T
