#!/usr/bin/env bash
# Everything a fresh Debian 12 / Ubuntu machine needs (as root) to build vgpu, run its demo and its tests:
# gcc and make for the simulated GPU and the C clients, Python for the GPU scripts, and the eBPF toolchain
# (scripts/install-ebpf-toolchain.sh). Rust itself comes from rustup (rust-toolchain.toml pins 1.95.0).
# Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust with rustup (https://rustup.rs); rust-toolchain.toml selects 1.95.0." >&2
    exit 1
fi

PKGS=(gcc make libc6-dev python3 procps iproute2)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

scripts/install-ebpf-toolchain.sh
