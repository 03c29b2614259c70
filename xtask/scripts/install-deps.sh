#!/bin/bash
# Installs, idempotently, what Warren's build and tests need from Debian (apt), as root:
# the eBPF toolchain (rustc-web + prebuilt core for bpfel, LLVM 22 for bpf-linker), iproute2, and g++
# (cargo-fuzz's libfuzzer-sys compiles libFuzzer, which is C++), Debian's prometheus and chromium (the telemetry tests
# run a real Prometheus, promtool, and a headless browser on the mesh graph page).
# Re-runs apt-get install a few times: some images delete downloaded .debs between dpkg batches.
set -u
PKGS="rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev iproute2 bc curl openssl g++ prometheus chromium"
missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then echo "missing Debian packages:$missing (run as root: apt-get install$missing)" >&2; exit 1; fi
echo "installing:$missing" >&2
apt-get update -q >/dev/null || true
for i in 1 2 3 4 5; do
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null && exit 0
  echo "apt-get install attempt $i failed, retrying" >&2
done
echo "could not install:$missing" >&2
exit 1
