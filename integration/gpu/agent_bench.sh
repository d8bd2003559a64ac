#!/bin/bash
# Overhead of the agent's probes on a small PyTorch training step (bench/gpu/train_step.py, ~310 launches
# per ~12 ms step): ROUNDS interleaved rounds of {no agent, agent with default probes, agent with
# --launch-probes}; medians per mode. Then the empty-kernel launch cost with and without launch probes.
# usage: ROUNDS=15 bash integration/gpu/agent_bench.sh
set -u
. "$(dirname "$0")/agent_lib.sh"
header
ROUNDS=${ROUNDS:-15}
export METRICS_ADDR=off
step() { python3 $G/train_step.py 512 200 | awk '{print $3}'; }
: > $T/none; : > $T/default; : > $T/launch
for r in $(seq $ROUNDS); do
  step >> $T/none
  agent_start --policy report; step >> $T/default; agent_stop
  agent_start --policy report --launch-probes; step >> $T/launch; agent_stop
  echo "round $r: none $(tail -1 $T/none) default $(tail -1 $T/default) launch-probes $(tail -1 $T/launch)"
done
python3 - $T <<'PY'
import statistics, sys
t = sys.argv[1]
v = {m: [float(x) for x in open(f"{t}/{m}") if x.strip()] for m in ("none", "default", "launch")}
base = statistics.median(v["none"])
for m, xs in v.items():
    med = statistics.median(xs)
    print(f"{m:8} median {med:.3f} ms/step  ({(med / base - 1) * 100:+.2f}% vs none)  min {min(xs):.3f} max {max(xs):.3f} n={len(xs)}")
PY
echo; echo "### empty-kernel launches (bench/gpu/launch_bench.cu)"
nvcc -O2 -o $T/launch_bench $G/launch_bench.cu
echo "-- no agent"; $T/launch_bench
agent_start --policy report; echo "-- agent, default probes"; $T/launch_bench; agent_stop
agent_start --policy report --launch-probes; echo "-- agent, --launch-probes"; $T/launch_bench; agent_stop
