# vgpu-agent image, from the repository root:
#   docker build -f deploy/images/agent.Dockerfile -t REGISTRY/vgpu-agent:TAG .
# (or podman/buildah bud). CI builds the runtime stage's root filesystem with the same steps from a
# debootstrap base and cargo's binaries, and runs them from it: deploy/images/ci-build.sh.

# The CI toolchain: Rust as rust-toolchain.toml pins it, and the eBPF toolchain of scripts/setup.sh.
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/install-ebpf-toolchain.sh \
    && cargo build --release --locked -p vgpu-agent -p vgpu-shim

# The same Debian release as the build stage, so the binaries find the glibc they were linked with.
FROM docker.io/library/debian:bookworm-slim
# The agent (its eBPF programs are inside the binary).
COPY --from=build /src/target/release/vgpu-agent /usr/local/bin/vgpu-agent
# The shim Allocate mounts into every GPU container; the init container copies it to the host.
COPY --from=build /src/target/release/libvgpu.so /opt/vgpu/lib/libvgpu.so
COPY deploy/images/vgpu-prepare-host.sh /usr/local/bin/vgpu-prepare-host
ENTRYPOINT ["/usr/local/bin/vgpu-agent"]
