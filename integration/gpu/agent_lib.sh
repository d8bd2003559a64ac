# Shared by the agent_*.sh scripts: paths, a cgroup runner, the agent started and stopped.
# The GPU machine has no cargo: target/release/{vgpu-agent,libvgpu.so} are built elsewhere and carried.
cd "$(dirname "$0")/../.."
R=$PWD; A=$R/target/release/vgpu-agent; G=$R/bench/gpu; B=$R/bench/agent
T=${T:-$(mktemp -d)}
LIBCUDA=${LIBCUDA:-/usr/local/nvidia/lib64/libcuda.so.1}
CG=/sys/fs/cgroup
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64
in_cg() { local cg=$1; shift; sh -c "echo \$\$ > $CG/$cg/cgroup.procs && exec \"\$@\"" sh "$@"; }
# A slice: its own cgroup and cache directory.
mkslice() { mkdir -p $CG/$1 $T/caches/$1; }
# Binds slice $1 with cache file $2 and a limit of $3 MiB on device 0 over the agent's bind socket, as
# `vgpu-agent exec` does: the agent takes limits from bindings only, never from the cache file.
bind_slice() {
  python3 -c "import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
b={'cgroup': '/'+sys.argv[2], 'cache': sys.argv[3], 'memory_limits': {'0': int(sys.argv[4]) << 20}, 'sm_limit': 0, 'policy': 'default', 'pid': 0}; \
s.sendall((json.dumps({'bind': b}) + '\n').encode()); print('bind', sys.argv[2], s.makefile().readline().strip())" \
    $T/bind.sock "$1" "$2" "$3"
}
agent_start() {
  $A run --standalone --libcuda $LIBCUDA --cache-dir $T/caches --socket $T/agent.sock --bind-socket $T/bind.sock \
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
