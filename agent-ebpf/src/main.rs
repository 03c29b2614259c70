//! Warren's eBPF programs (built for bpfel-unknown-none by `warren-ebpf-build`, embedded in warren-agent).
//!
//! On the host this crate is an empty binary, so workspace-wide `cargo test`/`clippy` need no BPF target.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
