//! Warren's eBPF programs (built for bpfel-unknown-none by `warren-ebpf-build`, embedded in warren-agent).
//!
//! | program | hook | job |
//! |---|---|---|
//! | `connect4`, `connect6` | cgroup connect | enrolled workloads' TCP connects → the agent's outbound listener |
//! | `track_sockets` | sock_ops | original destination by client tuple; sockets of local legs into the sockhash |
//! | `redirect_to_peer` | sk_msg on `LOCAL_SOCKETS` | hand bytes straight to the peer socket on those legs |
//! | `capture_inbound` | sk_lookup per enrolled pod netns | inbound connections → the agent's inbound listener |
//!
//! (A program may not be named like its ELF section — `fn sockops` in section "sockops" fails to link.)
//!
//! On the host this crate is an empty binary, so workspace-wide `cargo test`/`clippy` need no BPF target.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
