#!/bin/bash
# Agent overhead on one running training process: the agent is switched on and off every PHASE seconds while the
# process keeps stepping (uprobes attach to the libcuda file, so a running process is probed from the moment the
# agent attaches). Blocks of 20 steps are classed by whether the agent was attached for the whole block; medians
# compared. No process start-up in the comparison, so far less noise than separate runs.
# usage: bash integration/gpu/agent_toggle_bench.sh [SECONDS] [PHASE] [agent options...]
set -u
. "$(dirname "$0")/agent_lib.sh"
SECS=${1:-100}; PHASE=${2:-5}; shift 2 2>/dev/null; export METRICS_ADDR=off
header; echo "agent options: ${*:-(default probes)}"
python3 $B/step_times.py $SECS > $T/steps.txt 2>&1 &
PY=$!
while ! grep -q ready $T/steps.txt 2>/dev/null; do sleep 0.2; done
: > $T/phases
while kill -0 $PY 2>/dev/null; do
  echo "off $(date +%s.%N)" >> $T/phases; sleep $PHASE
  agent_start --policy report "$@"; echo "on $(date +%s.%N)" >> $T/phases; sleep $PHASE
  echo "off $(date +%s.%N)" >> $T/phases; agent_stop
done
python3 - $T <<'PY'
import statistics, sys
t = sys.argv[1]
ph = [(l.split()[0], float(l.split()[1])) for l in open(f"{t}/phases")]
blocks = [tuple(map(float, l.split())) for l in open(f"{t}/steps.txt") if l[0].isdigit()]
def state(ts_end, dur):  # the phase in force over [ts_end - dur, ts_end], or None if it changed inside
    start = ts_end - dur; cur = None
    for name, at in ph:
        if at <= start: cur = name
        elif at < ts_end: return None
    return cur
groups = {"on": [], "off": []}
for ts, ms in blocks:
    s = state(ts, ms * 20 / 1000 + 0.05)
    if s: groups[s].append(ms)
off, on = statistics.median(groups["off"]), statistics.median(groups["on"])
print(f"blocks of 20 steps: agent off n={len(groups['off'])} median {off:.3f} ms/step; agent on n={len(groups['on'])} median {on:.3f} ms/step; on/off = {on / off:.4f}")
PY
