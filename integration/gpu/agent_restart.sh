#!/bin/bash
# Issue 4: the agent restarted while a PyTorch process allocates (no shim): the calls made while no agent runs
# reach the next agent through the pinned ring buffer. Compares the agent's eBPF view with NVML's per-process
# figure after the restart. Uses a bpf filesystem of its own under $T.
# usage: bash integration/gpu/agent_restart.sh   (root; target/release/vgpu-agent carried)
set -u
. "$(dirname "$0")/agent_lib.sh"
header
mkdir -p $T/bpffs && mount -t bpf bpf $T/bpffs || { echo "cannot mount bpffs"; exit 1; }
mkslice vgpu-restart
PINS="--pin-dir $T/bpffs/vgpu-agent"
agent_start --policy report $PINS
# 30 chunks of 100 MiB, one every 0.2 s; the agent stops after the third and is away for 2 s (~10 chunks).
in_cg vgpu-restart env -u LD_PRELOAD python3 $B/alloc_chunks.py 3000 100 20 > $T/proc.log 2>&1 &
P=$!
until grep -q "allocated 300 MiB" $T/proc.log; do sleep 0.05; done
t0=$(date +%s%N); agent_stop; echo "agent stopped in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
sleep 2
agent_start --policy report $PINS
grep -E "took over|pinned" $T/agent.log
sleep 6
echo "process log:"; tail -2 $T/proc.log
echo "status after the restart:"; status
status --json | python3 -c "
import json,sys,subprocess
r=json.load(sys.stdin)
c=[c for c in r['containers'] if c.get('cgroup')=='/vgpu-restart'][0]
p=c['pids'][0]
print(f\"pid {p['pid']}: eBPF {p['ebpf_bytes']>>20} MiB (expected 3000 MiB of chunks + torch's first 2 MiB block), NVML {p['nvml_bytes']>>20} MiB (CUDA context included), partial={p['partial']}\")"
kill $P 2>/dev/null; agent_stop; sleep 1
umount -l $T/bpffs; rmdir $CG/vgpu-restart 2>/dev/null
