#!/bin/bash
# Packs what the GPU machine needs for integration/gpu/lab3_gpu.sh (it has no cargo and no kubectl): the release
# binaries, stripped, and this machine's kubectl, into target/gpu-bundle/bundle.tar.xz (carried, not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=target/release; D=$(mktemp -d); mkdir -p target/gpu-bundle
for f in vgpu-agent vgpu-scheduler kube-standin kubelet-harness sched-driver libvgpu.so; do
    cp "$B/$f" "$D/"; strip "$D/$f" 2>/dev/null || true
done
cp -L "$(command -v kubectl)" "$D/kubectl"
# The simulated GPU, for the burst benchmark's simulated nodes.
cp -r "$("$B/sim-dir")" "$D/sim"
tar -C "$D" -cJf target/gpu-bundle/bundle.tar.xz .
ls -la target/gpu-bundle/bundle.tar.xz; rm -rf "$D"
