#!/bin/bash
# What the agent's uprobes cost per call, on this machine's kernel: a stand-in libcuda (agent/tests/fixture)
# called in a loop without an agent, with the agent's default probes (allocation, free, context) and with
# --launch-probes, interleaved rounds in one script. The fixture's calls cost a few ns, so the difference is the
# uprobe (trap, BPF program, return) itself.
# usage: bash bench/agent/uprobe_cost.sh [ROUNDS]   (root; needs target/release/vgpu-agent built with eBPF)
cd "$(dirname "$0")/../.."
R=${1:-5}; A=$PWD/target/release/vgpu-agent; F=$PWD/agent/tests/fixture; T=$(mktemp -d)
[ "$(id -u)" = 0 ] || { echo "needs root (eBPF)"; exit 1; }
mkdir -p $T/lib $T/caches
gcc -O1 -fPIC -shared -Wl,-soname,libcuda.so.1 -o $T/lib/libcuda.so.1 $F/fakecuda.c || exit 1
gcc -O1 -o $T/client $F/client.c -L$T/lib -l:libcuda.so.1 -Wl,-rpath,$T/lib || exit 1
agent() {
  $A run --standalone --policy report --libcuda $T/lib/libcuda.so.1 --cache-dir $T/caches --socket $T/a.sock \
    --state-file $T/state.json --metrics-addr off --pin-dir off "$@" > $T/agent.log 2>&1 &
  AG=$!; for _ in $(seq 100); do [ -S $T/a.sock ] && break; sleep 0.1; done
}
# The stopped agent leaves its probes with a holder process (no pins here): end it too, and wait until its
# links are released, so the next measurement runs without probes.
stop() {
  kill $AG; while kill -0 $AG 2>/dev/null; do sleep 0.1; done; rm -f $T/a.sock
  local h=$(python3 -c "import json; h=json.load(open('$T/state.json')).get('holder'); print(h[0] if h else '')")
  [ -n "$h" ] && { kill $h; while kill -0 $h 2>/dev/null; do sleep 0.1; done; }
}
launch() { $T/client -2000000 0 0 0 | awk '{print $4}'; }   # ns per cuLaunchKernel call
alloc() {  # ns per cuMemAlloc_v2 (20000 calls of 1 MiB), timed by the shell around the client
  local a=$(date +%s%N); $T/client 20000 1 0 0 >/dev/null; echo $(( ($(date +%s%N) - a) / 20000 ))
}
for r in $(seq $R); do
  echo "launch none $(launch)" >> $T/res; echo "alloc none $(alloc)" >> $T/res
  agent; echo "launch default $(launch)" >> $T/res; echo "alloc default $(alloc)" >> $T/res; stop
  agent --launch-probes; echo "launch probes $(launch)" >> $T/res; echo "alloc probes $(alloc)" >> $T/res; stop
done
med() { grep "^$1 $2 " $T/res | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), median of $R rounds"
echo "cuLaunchKernel, ns per call: no agent $(med launch none) | default probes $(med launch default) | --launch-probes $(med launch probes)"
echo "cuMemAlloc_v2 of 1 MiB (process start included, 20000 calls), ns per call: no agent $(med alloc none) | default probes $(med alloc default) | --launch-probes $(med alloc probes)"
rm -rf $T
