# vgpu-scheduler image (the extender, the webhook, and the install's bootstrap Job), from the
# repository root:
#   docker build -f deploy/images/scheduler.Dockerfile -t REGISTRY/vgpu-scheduler:TAG .
# kube-scheduler is not in it: the Deployment runs registry.k8s.io/kube-scheduler (of the cluster's
# version) as a second container. CI builds the runtime stage's root filesystem with the same steps
# and runs the binaries from it: deploy/images/ci-build.sh.

FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vgpu-scheduler

FROM docker.io/library/debian:bookworm-slim
# What vgpu-bootstrap uses: curl for the API server, openssl for the webhook's keys, jq for JSON.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl jq openssl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vgpu-scheduler /usr/local/bin/vgpu-scheduler
COPY deploy/images/vgpu-bootstrap.sh /usr/local/bin/vgpu-bootstrap
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/vgpu-scheduler"]
