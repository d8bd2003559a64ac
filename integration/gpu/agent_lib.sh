# Shared by the agent_*.sh scripts: paths, a cgroup runner, the agent started and stopped.
# The GPU machine has no cargo: target/release/{vgpu-agent,libvgpu.so} are built elsewhere and carried.
cd "$(dirname "$0")/../.."
R=$PWD; A=$R/target/release/vgpu-agent; G=$R/bench/gpu; B=$R/bench/agent
T=${T:-$(mktemp -d)}
LIBCUDA=${LIBCUDA:-/usr/local/nvidia/lib64/libcuda.so.1}
CG=/sys/fs/cgroup
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64
in_cg() { local cg=$1; shift; sh -c "echo \$\$ > $CG/$cg/cgroup.procs && exec \"\$@\"" sh "$@"; }
# A slice: its own cgroup and cache directory, bound by the `cgroup` file the agent reads.
mkslice() { mkdir -p $CG/$1 $T/caches/$1; echo /$1 > $T/caches/$1/cgroup; }
agent_start() {
  $A run --standalone --libcuda $LIBCUDA --cache-dir $T/caches --socket $T/agent.sock \
    --state-file $T/agent-state.json --metrics-addr ${METRICS_ADDR:-127.0.0.1:${METRICS_PORT:-9394}} "$@" > $T/agent.log 2>&1 &
  AGENT=$!
  for _ in $(seq 50); do [ -S $T/agent.sock ] && break; sleep 0.1; done
  [ -S $T/agent.sock ] || { echo "agent did not start:"; cat $T/agent.log; exit 1; }
}
agent_stop() { kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; rm -f $T/agent.sock; }
status() { $A status --socket $T/agent.sock "$@"; }
header() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  kernel: $(uname -r)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}
