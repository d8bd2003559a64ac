#!/bin/sh
# The agent DaemonSet's init container (in the agent image as /usr/local/bin/vgpu-prepare-host):
# puts on the host what Allocate mounts into GPU containers, and links the host's NVML and libcuda for
# the agent.
# Paths are the DaemonSet's mounts; VGPU_PREPARE_ROOT prefixes them all (the image test runs it so).
set -eu
R="${VGPU_PREPARE_ROOT:-}"
SHIM_SRC="$R/opt/vgpu/lib/libvgpu.so"
HOST_VGPU="$R/usr/local/vgpu"
CARDS="$R/run/vgpu/cards"
HOST="$R/host"
LINKS="$R/opt/vgpu/driver"

# A new libvgpu.so goes in by rename: containers already running keep the file they mapped.
install -D -m 0644 "$SHIM_SRC" "$HOST_VGPU/libvgpu.so.new"
mv -f "$HOST_VGPU/libvgpu.so.new" "$HOST_VGPU/libvgpu.so"
mkdir -p "$HOST_VGPU/containers"
# Every slice on a card coordinates through a file here, whatever user its container runs as.
mkdir -p "$CARDS"
chmod 1777 "$CARDS"

# Follows a link inside a root of the host (the host's own, or the GPU Operator's driver root): an
# absolute target is that root's path, not this container's.
resolve() { # ROOT FILE
    f="$2" n=0
    while [ -L "$f" ] && [ "$n" -lt 16 ]; do
        t=$(readlink "$f")
        case "$t" in
        /*) f="$1$t" ;;
        *) f="$(dirname "$f")/$t" ;;
        esac
        n=$((n + 1))
    done
    [ -f "$f" ] && echo "$f"
}

mkdir -p "$LINKS"
rm -f "$LINKS"/libnvidia-ml.so.1 "$LINKS"/libcuda.so.1
for layout in run/nvidia/driver:usr/lib/x86_64-linux-gnu run/nvidia/driver:usr/lib64 \
    :usr/lib/x86_64-linux-gnu :usr/lib64 :usr/local/nvidia/lib64; do
    root="$HOST/${layout%%:*}"
    root="${root%/}"
    d="$root/${layout#*:}"
    if lib=$(resolve "$root" "$d/libnvidia-ml.so.1"); then
        # The link names the path as the agent's container sees it (VGPU_PREPARE_ROOT left out).
        ln -s "${lib#"$R"}" "$LINKS/libnvidia-ml.so.1"
        echo "vgpu-prepare-host: NVML is ${d#"$HOST"}/libnvidia-ml.so.1 on the host"
        # The driver's libcuda beside it: the agent probes it from the start (--libcuda), before any
        # process maps it.
        if cuda=$(resolve "$root" "$d/libcuda.so.1"); then
            ln -s "${cuda#"$R"}" "$LINKS/libcuda.so.1"
        else
            echo "vgpu-prepare-host: no libcuda.so.1 beside it: the agent probes libcuda once a process maps it" >&2
        fi
        exit 0
    fi
done
echo "vgpu-prepare-host: no libnvidia-ml.so.1 in the host's /run/nvidia/driver/usr/lib/x86_64-linux-gnu," \
    "/run/nvidia/driver/usr/lib64, /usr/lib/x86_64-linux-gnu, /usr/lib64 or /usr/local/nvidia/lib64:" \
    "the agent starts without NVML and registers no GPU. Install the NVIDIA driver (or wait for the GPU" \
    "Operator's driver) and restart the agent pod on this node." >&2
