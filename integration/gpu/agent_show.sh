#!/bin/bash
# Issue 4 "Show": vgpu-agent status beside two PyTorch slices; a process of a 4000 MiB slice started WITHOUT
# LD_PRELOAD allocating 6000 MiB is reported and, under enforce, killed within 1 s while its neighbour runs.
# usage: bash integration/gpu/agent_show.sh   (root; target/release/{vgpu-agent,libvgpu.so} carried)
set -u
. "$(dirname "$0")/agent_lib.sh"
header
mkslice vgpu-agent-a; mkslice vgpu-agent-b
agent_start --policy enforce
bind_slice vgpu-agent-a $T/caches/vgpu-agent-a/a.cache 4000; bind_slice vgpu-agent-b $T/caches/vgpu-agent-b/b.cache 4000
echo; echo "### 1. two slices running PyTorch under vgpu-agent exec (4000 MiB each)"
in_cg vgpu-agent-a $A exec --gpumem 4000 --cache $T/caches/vgpu-agent-a/a.cache -- python3 $G/hold.py 2000 60 A1 > $T/a1.log 2>&1 &
in_cg vgpu-agent-b $A exec --gpumem 4000 --cache $T/caches/vgpu-agent-b/b.cache -- python3 $B/train_loop.py 45 B1 > $T/b1.log 2>&1 &
sleep 15
status
echo; nvidia-smi --query-compute-apps=pid,used_memory --format=csv
echo; echo "### 2. in slice A, a process without LD_PRELOAD allocates 6000 MiB in 500 MiB steps (policy enforce)"
in_cg vgpu-agent-a env -u LD_PRELOAD python3 $B/alloc_chunks.py 6000 500 > $T/rogue.log 2>&1
echo "rogue exit status: $? (137 = SIGKILL)"; cat $T/rogue.log | tail -4
grep -E "enforce:|uprobes see" $T/agent.log
echo; echo "-- kills as the agent recorded them (latency from the allocation's uprobe to SIGKILL):"
status --json | python3 -c "import json,sys; r=json.load(sys.stdin); [print(k) for k in r['agent']['kills']]"
echo; echo "-- the neighbour B kept running:"; tail -2 $T/b1.log
status
echo; echo "### 3. the same under --policy report: flagged, not killed"
agent_stop; agent_start --policy report
in_cg vgpu-agent-a env -u LD_PRELOAD python3 $B/alloc_chunks.py 6000 500 2 > $T/rogue2.log 2>&1 &
ROGUE2=$!
sleep 6; status; wait $ROGUE2; tail -1 $T/rogue2.log
echo; echo "### 4. metrics"
curl -s 127.0.0.1:${METRICS_PORT:-9394}/metrics | grep -v '^#' | grep -E "HostGPU|HostCore|vGPU_|hami_|vgpu_container_(ebpf|charged|nvml)|vgpu_agent" | head -40
agent_stop
pkill -f "[h]old.py 2000 60 A1"; pkill -f "[t]rain_loop.py 45 B1"   # leave the GPU to whatever runs next
echo; echo "agent log:"; tail -30 $T/agent.log
rmdir $CG/vgpu-agent-a $CG/vgpu-agent-b 2>/dev/null
