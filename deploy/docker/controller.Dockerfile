# warren-controller: Istio's APIs to per-node tables, the mesh CA. Context: the workspace root.
#   docker build -f deploy/docker/controller.Dockerfile -t warren-controller:dev .
# Without Docker, `cargo xtask images` builds the same image as a tarball that containerd imports.
FROM debian:bookworm AS build
WORKDIR /src
COPY . .
# No eBPF here: Debian's Rust is enough.
RUN apt-get update -q && apt-get install -y -q --no-install-recommends rustc-web cargo-web ca-certificates \
    && cargo build --release -p warren-controller

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/warren-controller /usr/local/bin/warren-controller
ENTRYPOINT ["/usr/local/bin/warren-controller"]
