//! The l4 bench's peer agent: Istio's ztunnel (a binary the user built; `cargo xtask bench l4 --peer-agent
//! PATH`) on the same L4 path as Warren's `hbone`, in the same testbed and rounds, so the ratios compare in
//! one run.
//!
//! `ztunnel-hbone`: a client pod on one node, a server pod on another, a ztunnel in each (dedicated mode —
//! ztunnel's mode without a cluster — with its fake CA, workloads from a local file), mTLS HBONE between
//! them. Dedicated mode has no redirect, so the client sends through its ztunnel's SOCKS5 listener on the
//! pod's loopback: the throughput and round-trip figures carry nothing of SOCKS5 (the handshake is done
//! before the timed part; the connections are kept alive), and each new connection writes the greeting, the
//! CONNECT and its first bytes at once, as a client writes its first bytes to a transparent proxy (ztunnel
//! answers SOCKS5 before it dials): one connect to the local listener, as with a redirect, and two small
//! replies to read. What Istio's ambient mode does instead — iptables rules in the pod's netns redirecting
//! to ztunnel's in-pod sockets — would need iptables here. ztunnel's CPU and RSS are its process's, as the
//! agents'; it runs with its defaults (2 worker threads on this machine, log level info).
use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Result, ensure};
use warren_testbed::{
    ECHO_PORT, Node, Pod, Process, Testbed, eventually,
    ztunnel::{self, SOCKS5, identity, local_config},
};
use xtask::bench::Report;

/// The peer's path in the report.
pub const PATH: &str = "ztunnel-hbone";
/// Set by `cargo xtask bench l4 --peer-agent PATH`: the ztunnel binary.
pub const PEER_AGENT_ENV: &str = "WARREN_BENCH_PEER_AGENT";
/// What the header of the table says of the peer's path.
pub const DESCRIPTION: &str = " ztunnel-hbone: Istio's ztunnel in place of the agents, one in each pod (dedicated \
    mode, its fake CA), HBONE between them; the client reaches its ztunnel through its SOCKS5 listener on the pod's \
    loopback (no redirect in that mode): a new connection writes the SOCKS5 greeting, its CONNECT and its first \
    bytes at once; fresh HBONE connections from a ztunnel with POOL_MAX_STREAMS_PER_CONNECTION=1 to a server pod of their own.";

/// Starts a ztunnel in each of `pods` (client, server, fresh client, fresh server; each with its node), all of
/// them in one local config; the fresh client's never reuses an HBONE connection.
pub fn start(bed: &Testbed, binary: &Path, pods: [(&Pod, &Node); 4]) -> Result<Vec<Process>> {
    let listed: Vec<(&Pod, &str)> = pods.iter().map(|(pod, node)| (*pod, node.name.as_str())).collect();
    let config = bed.state_dir().join("ztunnel-local.yaml");
    std::fs::write(&config, local_config(&listed))?;
    let fresh_client = pods[2].0;
    pods.iter()
        .map(|(pod, _)| {
            let env: &[(&str, &str)] = if pod.name == fresh_client.name { &[("POOL_MAX_STREAMS_PER_CONNECTION", "1")] } else { &[] };
            ztunnel::start(binary, pod, &config, "info", env)
        })
        .collect()
}

/// The path is HBONE between the two ztunnels: an echo through the client's, and the server's ztunnel
/// logged an inbound connection with the client's identity (which it has only from mTLS).
pub fn check(path: &super::Path) -> Result<()> {
    let to = path.server.socket(ECHO_PORT);
    path.client.connect_times_via(SOCKS5, to, 1, 4096)?;
    if let super::Fresh::Proxy { client, server } = &path.fresh {
        client.connect_times_via(SOCKS5, server.socket(ECHO_PORT), 1, 4096)?;
    }
    let server = &path.ztunnels[1];
    let client = identity(&path.client);
    let logged = eventually(Duration::from_secs(5), || {
        let log = server.stdout() + &server.stderr();
        log.lines().any(|l| l.contains("inbound") && l.contains(&client)).then_some(())
    });
    ensure!(logged.is_some(), "{}: the server's ztunnel logged no inbound connection from {client}: {}", path.name, server.stdout());
    Ok(())
}

/// Warren against the peer, as the issue sets it: (Warren's path, metric, what must hold).
enum Target {
    /// Warren's value at least this many times the peer's.
    Times(&'static str, &'static str, f64),
    /// Warren's value below the peer's.
    Below(&'static str, &'static str),
}

const TARGETS: [Target; 3] =
    [Target::Times("hbone", "throughput_1conn", 1.3), Target::Below("hbone", "p50_1000rps"), Target::Below("hbone", "p99_1000rps")];

pub fn verdicts(report: &Report) -> String {
    let rows = report.rows();
    let value = |path: &str, metric: &str| rows.iter().find(|r| r.path == path && r.metric == metric).map_or(f64::NAN, |r| r.value);
    let mut out = String::new();
    for target in TARGETS {
        let (path, metric, text, held) = match target {
            Target::Times(path, metric, at_least) => {
                let ratio = value(path, metric) / value(PATH, metric);
                (path, metric, format!("{ratio:.2}× {PATH}'s (target ≥ {at_least}×)"), ratio >= at_least)
            }
            Target::Below(path, metric) => {
                let (ours, theirs) = (value(path, metric), value(PATH, metric));
                (path, metric, format!("{ours:.0} µs vs {PATH}'s {theirs:.0} µs (target: below)"), ours < theirs)
            }
        };
        let _ = writeln!(out, "- {path} {metric}: {text}: {}", if held { "met" } else { "**NOT met**" });
    }
    out
}
