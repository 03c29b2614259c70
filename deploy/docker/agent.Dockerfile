# warren-agent, the node agent (its eBPF programs are compiled into the binary). Context: the workspace root.
#   docker build -f deploy/docker/agent.Dockerfile -t warren-agent:dev .
# Without Docker, `cargo xtask images` builds the same image as a tarball that containerd imports.
FROM debian:bookworm AS build
WORKDIR /src
COPY . .
# Debian's rustc-web and its prebuilt core for bpfel, LLVM 22, then bpf-linker (docs/ebpf-toolchain.md).
RUN bash xtask/scripts/install-deps.sh && cargo xtask setup && cargo build --release -p warren-agent

# glibc, libgcc and nothing else: the agent runs no other program.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/warren-agent /usr/local/bin/warren-agent
ENTRYPOINT ["/usr/local/bin/warren-agent"]
