#!/usr/bin/env bash
# Everything a fresh Debian 12 / Ubuntu machine needs (as root) to build vgpu, run its demo and its tests:
# gcc and make for the simulated GPU and the C clients, Python for the GPU scripts, and the eBPF toolchain
# (scripts/install-ebpf-toolchain.sh), and for the install's checks (integration/tests/deploy_render.rs,
# deploy/images/ci-build.sh): debootstrap and buildah for the images, curl, jq and openssl for the
# bootstrap script, kubernetes-validate from PyPI. Rust itself comes from rustup (rust-toolchain.toml pins 1.95.0).
# Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust with rustup (https://rustup.rs); rust-toolchain.toml selects 1.95.0." >&2
    exit 1
fi

PKGS=(gcc make libc6-dev python3 procps iproute2 binutils debootstrap buildah curl jq openssl)
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

# The manifests are validated against Kubernetes' schemas (the versions deploy_render.rs names).
KV_VERSION=1.37.0
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    echo "setup: installing kubernetes-validate ${KV_VERSION} (PyPI)"
    python3 -m pip install --quiet "kubernetes-validate==${KV_VERSION}"
fi
# kustomize comes with kubectl, which Debian does not package; the machine image has it.
command -v kubectl >/dev/null 2>&1 ||
    echo "setup: kubectl not found: the deploy checks (integration/tests/deploy_render.rs) need it for 'kubectl kustomize'" >&2
