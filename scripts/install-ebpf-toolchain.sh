#!/usr/bin/env bash
# Installs what agent/build.rs needs to build agent-ebpf (the uprobe programs, target bpfel-unknown-none) on a
# Debian 12 machine without a nightly toolchain or rust-src:
#   - Debian's rustc-web (rustc 1.96 on LLVM 22) with libstd-rust-web-dev-bpf, its prebuilt `core` for bpfel;
#   - bpf-linker 0.13.0 built against the same LLVM 22 (a linker on another LLVM rejects the bitcode).
# Idempotent: quiet when everything is already installed. Run as root (apt-get).
# Env: BPF_LINKER_VERSION (default 0.13.0), LLVM_VERSION (default 22), CARGO (default: cargo on PATH).
set -euo pipefail

LLVM_VERSION="${LLVM_VERSION:-22}"
BPF_LINKER_VERSION="${BPF_LINKER_VERSION:-0.13.0}"
CARGO="${CARGO:-cargo}"
PKGS=(rustc-web libstd-rust-web-dev-bpf "llvm-${LLVM_VERSION}-dev" "libpolly-${LLVM_VERSION}-dev"
      libzstd-dev zlib1g-dev libxml2-dev)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-ebpf-toolchain: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # The packages come from bookworm-updates/security; a stale package index does not list them.
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The bpfel core must sit where Debian's rustc looks for it.
sysroot="$(/usr/bin/rustc --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/bpfel-unknown-none" ]; then
    echo "install-ebpf-toolchain: $sysroot/lib/rustlib/bpfel-unknown-none missing after install" >&2
    exit 1
fi

have_linker=""
if command -v bpf-linker >/dev/null 2>&1; then
    v="$(bpf-linker --version 2>/dev/null | awk '{print $2}')"
    [ "$v" = "$BPF_LINKER_VERSION" ] && have_linker=1
fi
if [ -z "$have_linker" ]; then
    echo "install-ebpf-toolchain: building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_VERSION}"
    LLVM_PREFIX="/usr/lib/llvm-${LLVM_VERSION}" "$CARGO" install --quiet --locked --force \
        "bpf-linker@${BPF_LINKER_VERSION}" --no-default-features --features "llvm-${LLVM_VERSION}"
fi
