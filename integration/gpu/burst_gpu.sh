#!/bin/bash
# The burst benchmark (bench/burst/run.sh) on the GPU machine's 16 cores (it needs no GPU: simulated nodes), from
# the bundle of integration/gpu/make_bundle.sh plus the simulated GPU's directory (sim/ in the bundle).
# usage: bash integration/gpu/burst_gpu.sh OUTDIR [PODS] [NODES]
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/burst}; mkdir -p "$OUT"
B=$(mktemp -d); tar -C "$B" -xJf target/gpu-bundle/bundle.tar.xz
printf '#!/bin/sh\necho %s/sim\n' "$B" > "$B/sim-dir"; chmod +x "$B/sim-dir"
export PATH=$B:$PATH VGPU_BIN=$B BURST_OUT=$OUT/burst-result.json
{ echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  cores: $(nproc)"
  bash bench/burst/run.sh "${2:-200}" "${3:-20}"; } 2>&1 | tee "$OUT/burst.log"
