#!/bin/bash
# The agent's own cost: RSS and CPU over 20 s idle, then under 10k launches/s (bench/agent/paced_launch.cu)
# with launch probes on, then with them off.
# usage: bash integration/gpu/agent_resources.sh
set -u
. "$(dirname "$0")/agent_lib.sh"
header
nvcc -O2 -o $T/paced $B/paced_launch.cu
tck=$(getconf CLK_TCK)
measure() { # label seconds
  local s0 s1; s0=$(awk '{print $14+$15}' /proc/$AGENT/stat); sleep $2; s1=$(awk '{print $14+$15}' /proc/$AGENT/stat)
  echo "$1: cpu $(python3 -c "print(f'{($s1-$s0)/$tck/$2*100:.2f}')")% of one core, $(grep VmRSS /proc/$AGENT/status | tr -s ' ')"
}
agent_start --policy report --launch-probes
measure "idle (launch probes on)" 20
$T/paced 10000 25 & P=$!; sleep 3; measure "10k launches/s (launch probes on)" 20; wait $P
status | tail -4
agent_stop
agent_start --policy report
$T/paced 10000 25 & P=$!; sleep 3; measure "10k launches/s (default probes)" 20; wait $P
agent_stop
