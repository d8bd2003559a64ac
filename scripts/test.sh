#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: set-up, format and lint checks, the build (libvgpu.so, the
# agent with its eBPF programs, the simulated GPU), then every crate's unit and integration tests. The agent's
# eBPF tests attach real uprobes and so need root on a kernel with uprobes (they say so and skip otherwise);
# then the lab (integration/lab3/run.sh) through the whole stack.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
export VGPU_REQUIRE_EBPF=1
# The deploy checks must run here, not skip for a missing kubectl or kubernetes-validate.
export VGPU_REQUIRE_DEPLOY_TOOLS=1
cargo clippy --workspace --all-targets --locked -- -D warnings
# libvgpu.so must exist before the integration tests preload it.
cargo build --workspace --locked
# The images' root filesystems from those binaries, run in a chroot and committed by buildah.
deploy/images/ci-build.sh
cargo test --workspace --locked
# HAMi's Lab 3 through the whole stack on the simulated GPU (stand-in API server, webhook, extender, node agent,
# kubelet harness): every row of the lab's table must pass.
integration/lab3/run.sh
