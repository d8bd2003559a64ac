#!/bin/bash
# Per-call cost of the shim on a real GPU, as ratios against runs without it, interleaved in one script so the
# machine's drift hits both: the empty-kernel launch loop (no caps; memory limit only; SM limit 100) and
# cuMemAlloc/cuMemFree pairs. usage: SHIM=/abs/libvgpu.so bash overhead.sh [ROUNDS]
cd "$(dirname "$0")"
S=${SHIM:?set SHIM}; R=${1:-5}; T=$(mktemp -d)
nvcc -O2 -o $T/launch launch_bench.cu >/dev/null || exit 1
gcc -O2 -o $T/alloc alloc_bench.c -ldl || exit 1
us() { grep -o '([0-9.]* us' | tr -d '(' | awk '{print $1}' | sort -n | head -1; }  # best of the run's 3 passes
lim() { LD_PRELOAD=$S CUDA_DEVICE_MEMORY_LIMIT=40000m CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$1.cache "${@:2}"; }
for r in $(seq $R); do
  echo "base $( $T/launch | us )" >> $T/l; echo "mem $( lim l1 $T/launch | us )" >> $T/l
  echo "sm100 $( CUDA_DEVICE_SM_LIMIT=100 lim l2 $T/launch | us )" >> $T/l
  echo "base $( $T/alloc 20000 | awk '{print $2}' )" >> $T/a; echo "shim $( lim a1 $T/alloc 20000 | awk '{print $2}' )" >> $T/a
done
med() { grep "^$1 " $2 | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "launch loop, us per empty-kernel launch (median of $R runs, each the best of 3 passes of 200k):"
b=$(med base $T/l); m=$(med mem $T/l); s=$(med sm100 $T/l)
echo "  no shim $b | shim, memory limit $m ($(awk -v a=$m -v b=$b 'BEGIN{printf "%+.2f%%", (a/b-1)*100}')) | shim, SM limit 100 $s ($(awk -v a=$s -v b=$b 'BEGIN{printf "%+.2f%%", (a/b-1)*100}'))"
echo "  runs: $(tr '\n' ' ' < $T/l)"
b=$(med base $T/a); s=$(med shim $T/a)
echo "cuMemAlloc_v2+cuMemFree_v2 of 1 MiB, ns per pair (median of $R runs of 20k): no shim $b | shim $s (+$(awk -v a=$s -v b=$b 'BEGIN{printf "%.0f", a-b}') ns)"
echo "  runs: $(tr '\n' ' ' < $T/a)"
rm -rf $T
