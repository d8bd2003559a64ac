#!/bin/bash
# eBPF-seen memory against NVML's per process: a PyTorch process allocates in steps; after each, the agent's
# per-pid eBPF bytes and NVML's used memory. NVML also counts the CUDA context, so the growth is compared:
# (NVML now - NVML after init) against eBPF bytes.
# usage: bash integration/gpu/agent_nvml.sh
set -u
. "$(dirname "$0")/agent_lib.sh"
header
agent_start --policy report
coproc P { python3 $B/steps.py 512 1024 2048 100 3000; }
printf "%-10s %12s %12s %12s %9s\n" step_MiB ebpf_MiB nvml_MiB nvml_growth diff_%
base=""
while read -r -u ${P[0]} _ pid total; do
  sleep 1.2
  e=$(status --json | python3 -c "import json,sys; r=json.load(sys.stdin); print(sum(p['ebpf_bytes'] for c in r['containers'] for p in c['pids'] if p['pid']==$pid))")
  n=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p=$pid '$1==p{print $2}')
  [ -z "$base" ] && base=$n
  python3 -c "e=$e/2**20; n=$n; g=n-$base; print(f'{$total:<10} {e:12.1f} {n:12} {g:12} {(abs(g-e)/e*100 if e else 0):9.2f}')"
  echo >&${P[1]}
done
agent_stop
