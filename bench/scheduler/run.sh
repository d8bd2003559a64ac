#!/bin/sh
# Filter + bind latency, throughput and memory of vgpu-scheduler on simulated clusters of
# 100, 1,000 and 5,000 nodes x 8 GPUs, in-process and through the HTTP server on loopback.
# Each size runs in a fresh process so its memory figures are its own. Writes the tables to
# stdout and to bench/scheduler/results-<date>.md.
# Usage: bench/scheduler/run.sh [--quick]
set -eu
cd "$(dirname "$0")/../.."
BIN=$(cargo bench -p vgpu-scheduler --bench filter_bind --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
OUT="bench/scheduler/results-$(date -u +%Y-%m-%d).md"
{
  echo "# vgpu-scheduler filter+bind, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) CPUs, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  for mode in "" --http; do
    echo
    first=1
    for n in 100 1000 5000; do
      # shellcheck disable=SC2086
      if [ $first = 1 ]; then "$BIN" "$@" $mode --nodes $n; first=0; else "$BIN" "$@" $mode --nodes $n | tail -n +5; fi
    done
  done
} | tee "$OUT"
