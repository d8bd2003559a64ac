#!/usr/bin/env bash
# CI's image build (scripts/test.sh runs it after `cargo build`). No container registry is reachable
# from CI, so the Dockerfiles' build stages cannot be pulled; this does their runtime stages with the
# same steps instead:
#   1. a Debian bookworm minbase root made offline-from-registries by debootstrap (the Debian mirror is
#      the one source; cached in $VGPU_IMAGE_CACHE, ~2 min the first time) stands in for
#      debian:bookworm-slim;
#   2. each image's root filesystem: that base, the Dockerfile's RUN and COPY steps, with the binaries
#      cargo built (debug ones, stripped: CI builds no release);
#   3. the binaries run from each root in a chroot (--version, the shim preloaded, the agent's init
#      script on a fake host with the driver on two layouts);
#   4. buildah (vfs storage, chroot isolation, no daemon) commits each root as an OCI image and runs
#      the binary from the image.
# Needs root, debootstrap and buildah (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${VGPU_IMAGE_BIN:-target/debug}"
CACHE="${VGPU_IMAGE_CACHE:-/var/cache/vgpu-images}"
WORK="$(mktemp -d /var/tmp/vgpu-images.XXXXXX)"
STORE="$WORK/storage"
BUILDAH=(buildah --storage-driver vfs --root "$STORE/root" --runroot "$STORE/run")
cleanup() {
    "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
    "${BUILDAH[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { echo "images: $*"; }
fail() { echo "images: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap and chroot)"
for t in debootstrap buildah strip; do
    command -v "$t" >/dev/null || fail "$t is missing; scripts/setup.sh installs it"
done
for b in vgpu-agent vgpu-scheduler libvgpu.so; do
    [ -f "$BIN/$b" ] || fail "$BIN/$b is missing; run cargo build --workspace first"
done

# 1. The base, made once per machine.
base="$CACHE/bookworm-minbase"
if [ ! -f "$base/.complete" ]; then
    say "debootstrap --variant=minbase bookworm (once; cached in $base)"
    rm -rf "$base"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase bookworm "$base" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    chroot "$base" apt-get clean
    touch "$base/.complete"
fi

# 2. The roots, as the Dockerfiles' runtime stages make them.
rootfs() { # NAME: a fresh copy of the base
    local r="$WORK/$1"
    cp -a "$base" "$r"
    rm -f "$r/.complete"
    echo "$r"
}
add() { # ROOT SRC DEST MODE (a COPY line; binaries stripped of debug info)
    install -D -m "$4" "$2" "$1$3"
    case "$4" in 0755) strip --strip-debug "$1$3" 2>/dev/null || true ;; esac
}

agent="$(rootfs agent)"
add "$agent" "$BIN/vgpu-agent" /usr/local/bin/vgpu-agent 0755
add "$agent" "$BIN/libvgpu.so" /opt/vgpu/lib/libvgpu.so 0755
add "$agent" deploy/images/vgpu-prepare-host.sh /usr/local/bin/vgpu-prepare-host 0755

sched="$(rootfs scheduler)"
# The Dockerfile's RUN, in the root (the mirror's address from the base's sources.list).
cp /etc/resolv.conf "$sched/etc/resolv.conf"
chroot "$sched" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates curl jq openssl && rm -rf /var/lib/apt/lists/*' \
    >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; fail "apt-get install in the scheduler's root"; }
add "$sched" "$BIN/vgpu-scheduler" /usr/local/bin/vgpu-scheduler 0755
add "$sched" deploy/images/vgpu-bootstrap.sh /usr/local/bin/vgpu-bootstrap 0755

# Every COPY destination of the Dockerfiles is in its root.
for pair in "agent.Dockerfile:$agent" "scheduler.Dockerfile:$sched"; do
    df="deploy/images/${pair%%:*}" r="${pair#*:}"
    while read -r dest; do
        [ -e "$r$dest" ] || fail "$df copies to $dest, which CI's root lacks"
    done < <(sed -n 's/^COPY .* \(\/[^ ]*\)$/\1/p' "$df")
done

# 3. The binaries, run from the roots.
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
out="$(chroot "$agent" /usr/local/bin/vgpu-agent --version)"
[ "$out" = "vgpu-agent $version" ] || fail "agent root: vgpu-agent --version said '$out'"
say "agent root: $out"
chroot "$agent" /usr/local/bin/vgpu-agent unpin --help >/dev/null || fail "agent root: vgpu-agent unpin --help"
chroot "$agent" env LD_PRELOAD=/opt/vgpu/lib/libvgpu.so /bin/true || fail "agent root: libvgpu.so does not load"
say "agent root: libvgpu.so preloads into /bin/true"
out="$(chroot "$sched" /usr/local/bin/vgpu-scheduler --version)"
[ "$out" = "vgpu-scheduler $version" ] || fail "scheduler root: vgpu-scheduler --version said '$out'"
say "scheduler root: $out"
chroot "$sched" sh -c 'command -v curl && command -v jq && command -v openssl' >/dev/null ||
    fail "scheduler root: vgpu-bootstrap's tools are missing"
chroot "$sched" sh -n /usr/local/bin/vgpu-bootstrap || fail "scheduler root: vgpu-bootstrap does not parse"

# The agent's init container on a fake host, in a copy of its root: the driver as Debian packages
# it (relative links) and as a driver container may (an absolute link inside its own root).
check_prepare() { # LAYOUT-DIR LINK-TARGET EXPECTED-RESOLVED
    local r="$WORK/prepare"
    rm -rf "$r"
    cp -a "$agent" "$r"
    mkdir -p "$r/host/$1" "$(dirname "$r/host/$3")"
    echo fake-nvml >"$r/host/$3"
    ln -s "$2" "$r/host/$1/libnvidia-ml.so.1"
    echo fake-cuda >"$r/host/$1/libcuda.so.580.1"
    ln -s libcuda.so.580.1 "$r/host/$1/libcuda.so.1"
    chroot "$r" /usr/local/bin/vgpu-prepare-host >"$WORK/prepare.log" 2>&1 ||
        { cat "$WORK/prepare.log" >&2; fail "vgpu-prepare-host on /$1"; }
    cmp -s "$r/opt/vgpu/lib/libvgpu.so" "$r/usr/local/vgpu/libvgpu.so" || fail "prepare-host: libvgpu.so not on the host"
    [ -d "$r/usr/local/vgpu/containers" ] || fail "prepare-host: no containers directory"
    [ "$(stat -c %a "$r/run/vgpu/cards")" = 1777 ] || fail "prepare-host: card directory not 1777"
    [ "$(readlink "$r/opt/vgpu/driver/libnvidia-ml.so.1")" = "/host/$3" ] ||
        fail "prepare-host: NVML link is $(readlink "$r/opt/vgpu/driver/libnvidia-ml.so.1"), not /host/$3"
    [ "$(chroot "$r" cat /opt/vgpu/driver/libnvidia-ml.so.1)" = fake-nvml ] || fail "prepare-host: NVML link dangles"
    [ "$(chroot "$r" cat /opt/vgpu/driver/libcuda.so.1)" = fake-cuda ] || fail "prepare-host: no libcuda link"
    say "agent root: vgpu-prepare-host found NVML on /$1"
}
check_prepare usr/lib64 libnvidia-ml.so.580.1 usr/lib64/libnvidia-ml.so.580.1
check_prepare run/nvidia/driver/usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.1 \
    run/nvidia/driver/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.1
rm -rf "$WORK/prepare"
# With no driver it says so and still lets the agent start.
r="$WORK/prepare"
cp -a "$agent" "$r"
chroot "$r" /usr/local/bin/vgpu-prepare-host 2>"$WORK/prepare.log" || fail "prepare-host without a driver failed"
grep -q "no libnvidia-ml.so.1" "$WORK/prepare.log" || fail "prepare-host without a driver said nothing"
rm -rf "$r"

# 4. OCI images with buildah, run from the image.
image() { # NAME ROOT ENTRYPOINT
    local c
    c="$("${BUILDAH[@]}" from scratch)"
    "${BUILDAH[@]}" copy --quiet "$c" "$2/" / >/dev/null
    "${BUILDAH[@]}" config --entrypoint "[\"$3\"]" --label "org.opencontainers.image.version=$version" "$c"
    "${BUILDAH[@]}" commit --quiet --format oci "$c" "localhost/$1:$version" >/dev/null
    "${BUILDAH[@]}" rm "$c" >/dev/null
    c="$("${BUILDAH[@]}" from "localhost/$1:$version")"
    out="$("${BUILDAH[@]}" run --isolation chroot "$c" -- "$3" --version)"
    [ "$out" = "$1 $version" ] || fail "image $1: $3 --version said '$out'"
    "${BUILDAH[@]}" rm "$c" >/dev/null
    say "image localhost/$1:$version built by buildah; from it: $out"
}
image vgpu-agent "$agent" /usr/local/bin/vgpu-agent
image vgpu-scheduler "$sched" /usr/local/bin/vgpu-scheduler
say "ok"
