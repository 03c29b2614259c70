//! `cargo xtask bench l4`: the L4 paths side by side in one run. Each path is a client pod on one node and a
//! server pod on another, all in one testbed, so the paths are measured round after round on the same
//! machine state:
//!
//! - `direct`: neither pod enrolled, no agent (the no-mesh baseline every ratio is to);
//! - `plaintext`: both enrolled, the agents' plain L4 path;
//! - `hbone`: both enrolled, agents with identities: mTLS HTTP/2 CONNECT between the nodes;
//! - `+accel`: the same with socket acceleration (sockops/sk_msg) on the app ↔ agent legs;
//! - `ztunnel-hbone`, with `WARREN_BENCH_PEER_AGENT` (`cargo xtask bench l4 --peer-agent PATH`): Istio's
//!   ztunnel in place of Warren's agents — one ztunnel in each pod (dedicated mode, its fake CA), HBONE
//!   between them; the client reaches its ztunnel through ztunnel's SOCKS5 listener ([`ztunnel`]).
//!
//! Per path and round: one-way throughput (1 GiB, `WARREN_BENCH_L4_MIB` to change) on 1 and on 8
//! connections into a sink; new connection + 1-byte echo (p50, p99 of 200; HBONE connections pooled), and
//! for HBONE on fresh connections (`new_connection_fresh`: a TLS and HTTP/2 handshake each, see [`Fresh`]);
//! 1 KiB request → 1 KiB answer at 1000 rps open loop on 4 connections (p50/p90/p99/p99.9, from each
//! request's due time), the agents' CPU (utime + stime from /proc, per 1000 rps) and RSS over that window;
//! max rps closed loop. Each figure is the median of its rounds (`WARREN_BENCH_ROUNDS`, default 3). Prints
//! one table and the targets met or not (with a peer agent, Warren's against it too), writes `target/bench/l4.json` (see `xtask::bench`) and
//! `target/bench-l4.md`. A bench reports; it does not fail on timing. Without root, BPF, cgroup2 and netns it
//! prints `SKIPPED` and exits 0 (under `CI=true` it fails).
#[path = "l4/ztunnel.rs"]
mod ztunnel;

use std::{
    fmt::Write as _,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use warren_testbed::{
    Agent, AgentOptions, AppOptions, ECHO_PORT, Load, Pod, Process, SINK_PORT, Testbed, app, check_privileges, cpu_seconds,
    in_ci, rss_anon_mib, rss_mib,
};
use xtask::bench::{DIRECT, Report};

const ROUNDS: usize = 3;
const APP_PORT: u16 = 9080;
const CHUNK: usize = 256 * 1024;
const NEW_CONNECTIONS: usize = 200;
/// New connections per round on fresh HBONE connections (Warren: a client pod each, see [`Fresh`]).
const FRESH_CONNECTIONS: usize = 30;
const PACED: Load = Load {
    rps: 1000,
    warm_up_ms: 2000,
    duration_ms: 10_000,
    connections: 4,
    body_bytes: 1024,
    http2: false,
    host: None,
    path: String::new(),
    timeout_ms: 10_000,
};

/// What carries a path's traffic.
enum Proxy {
    /// No mesh.
    None,
    /// Warren's agent on both nodes.
    Warren(AgentOptions),
    /// A ztunnel (this binary) in each pod.
    Ztunnel(PathBuf),
}

/// A path: its name in the report and what carries it.
struct PathSpec {
    name: &'static str,
    proxy: Proxy,
}

fn specs(peer_agent: Option<PathBuf>) -> Vec<PathSpec> {
    let agent = |mtls, socket_acceleration| {
        Proxy::Warren(AgentOptions { mtls, socket_acceleration, ebpf_log_level: "info", log: "info", ..AgentOptions::default() })
    };
    let mut specs = vec![
        PathSpec { name: DIRECT, proxy: Proxy::None },
        PathSpec { name: "plaintext", proxy: agent(false, false) },
        PathSpec { name: "plaintext+accel", proxy: agent(false, true) },
        PathSpec { name: "hbone", proxy: agent(true, false) },
        PathSpec { name: "hbone+accel", proxy: agent(true, true) },
    ];
    if let Some(binary) = peer_agent {
        specs.push(PathSpec { name: ztunnel::PATH, proxy: Proxy::Ztunnel(binary) });
    }
    specs
}

/// How a path measures new connections on fresh HBONE connections (`new_connection_fresh`), which pool
/// theirs per (source workload, destination).
enum Fresh {
    /// Not an HBONE path (every connection is fresh anyway), or not measured.
    None,
    /// Warren: no knob turns its pool off, so each fresh connection comes from a client pod of its own
    /// ([`FRESH_CONNECTIONS`] per round, each used in one round only). Before timing, each pod echoes once
    /// to the server's IPv6 address — a pooled connection of its own (the pool's key is the address), which
    /// leaves the pod's certificate and its TLS config for the server's identity made — so the timed
    /// connection, to the IPv4 address, pays the HBONE dial (TCP, mTLS, HTTP/2) and nothing else. These
    /// pods, their server and their agents are on two nodes of their own, so the connections they leave
    /// pooled weigh on no other figure (the path's agents' RSS).
    Pods { pods: Vec<Pod>, server: Pod, _agents: Vec<Agent>, _server: Process },
    /// ztunnel: a client pod whose ztunnel runs with `POOL_MAX_STREAMS_PER_CONNECTION=1`, so that it dials a
    /// new HBONE connection for every connection, to a server pod (with its ztunnel) of its own.
    Proxy { client: Pod, server: Pod },
}

/// A path as set up: the pods, their servers, what proxies them.
struct Path {
    name: &'static str,
    client: Pod,
    server: Pod,
    /// Warren's agents (client node's first).
    agents: Vec<Agent>,
    /// The ztunnels of the client and the server (in that order): the client reaches its own through
    /// SOCKS5.
    ztunnels: Vec<Process>,
    fresh: Fresh,
    _servers: Vec<Process>,
}

fn set_up(bed: &Testbed, index: usize, spec: PathSpec, rounds: usize) -> Result<Path> {
    let nodes = [bed.add_node(&format!("node-{}", 2 * index + 1))?, bed.add_node(&format!("node-{}", 2 * index + 2))?];
    let meshed = matches!(spec.proxy, Proxy::Warren(_));
    let tag = spec.name.replace('+', "-");
    let client = nodes[0].add_pod(&format!("client-{tag}"), meshed)?;
    let server = nodes[1].add_pod(&format!("server-{tag}"), meshed)?;
    let app = AppOptions { port: APP_PORT, quiet: true, ..AppOptions::new("server", "v1") };
    let mut servers = vec![server.serve_with_sink("v1")?, server.serve_app(&app)?];
    let (mut agents, mut ztunnels, mut fresh) = (vec![], vec![], Fresh::None);
    match spec.proxy {
        Proxy::None => {}
        Proxy::Warren(options) => {
            agents = nodes.iter().map(|n| n.start_agent_with(options.clone())).collect::<Result<Vec<_>>>()?;
            agents[0].wait_enrolled(&client, true, Duration::from_secs(15))?;
            agents[1].wait_enrolled(&server, true, Duration::from_secs(15))?;
            if options.mtls && spec.name == "hbone" {
                let nodes = [bed.add_node(&format!("node-{}-fresh", 2 * index + 1))?, bed.add_node(&format!("node-{}-fresh", 2 * index + 2))?];
                let pods = (0..FRESH_CONNECTIONS * rounds)
                    .map(|i| nodes[0].add_pod(&format!("fresh-{tag}-{i}"), true))
                    .collect::<Result<Vec<_>>>()?;
                let server = nodes[1].add_pod(&format!("fresh-server-{tag}"), true)?;
                let serving = server.serve("v1")?;
                let agents = nodes.iter().map(|n| n.start_agent_with(options.clone())).collect::<Result<Vec<_>>>()?;
                for pod in &pods {
                    agents[0].wait_enrolled(pod, true, Duration::from_secs(15))?;
                }
                agents[1].wait_enrolled(&server, true, Duration::from_secs(15))?;
                fresh = Fresh::Pods { pods, server, _agents: agents, _server: serving };
            }
        }
        Proxy::Ztunnel(binary) => {
            let fresh_client = nodes[0].add_pod(&format!("fresh-{tag}"), false)?;
            let fresh_server = nodes[1].add_pod(&format!("fresh-server-{tag}"), false)?;
            servers.push(fresh_server.serve("v1")?);
            let pods = [(&client, &nodes[0]), (&server, &nodes[1]), (&fresh_client, &nodes[0]), (&fresh_server, &nodes[1])];
            let mut started = ztunnel::start(bed, &binary, pods)?.into_iter();
            ztunnels = started.by_ref().take(2).collect();
            servers.extend(started);
            fresh = Fresh::Proxy { client: fresh_client, server: fresh_server };
        }
    }
    Ok(Path { name: spec.name, client, server, agents, ztunnels, fresh, _servers: servers })
}

impl Path {
    /// The path is what its name says: a connection shows in the client agent's table with the path's
    /// protocol (none for direct); ztunnel's serving side logged the client's identity.
    fn check(&self) -> Result<()> {
        if !self.ztunnels.is_empty() {
            return ztunnel::check(self);
        }
        let result = self.client.send(self.server.socket(ECHO_PORT), 4096)?;
        ensure!(result.ok, "{}: echo failed: {result:?}", self.name);
        let Some(agent) = self.agents.first() else { return Ok(()) };
        let want = if self.name.starts_with("hbone") { "hbone" } else { "tcp" };
        let found = warren_e2e::eventually(Duration::from_secs(2), || {
            let table = agent.connections().ok()?;
            let closed = table["recently_closed"].as_array()?.clone();
            closed.iter().any(|c| c["protocol"] == want).then_some(())
        });
        ensure!(found.is_some(), "{}: no {want} connection in the client's agent: {}", self.name, agent.connections()?);
        Ok(())
    }

    /// Through ztunnel's SOCKS5 listener on a ztunnel path.
    fn via_socks5(&self) -> bool {
        !self.ztunnels.is_empty()
    }

    /// A connection from the client pod to `to`, as the client's app would open it.
    fn open(&self, to: SocketAddr) -> Result<TcpStream> {
        if self.via_socks5() { warren_testbed::ztunnel::connect(&self.client, to) } else { self.client.connect(to) }
    }

    fn connect_times(&self, pod: &Pod, to: SocketAddr, count: usize) -> Result<Vec<Duration>> {
        if self.via_socks5() {
            pod.connect_times_via(warren_testbed::ztunnel::SOCKS5, to, count, 1)
        } else {
            pod.connect_times(to, count, 1)
        }
    }

    fn spawn_load(&self, to: SocketAddr, load: &Load) -> Result<Process> {
        if self.via_socks5() {
            self.client.spawn_load_via(warren_testbed::ztunnel::SOCKS5, to, load)
        } else {
            self.client.spawn_load(to, load)
        }
    }

    /// The processes that proxy the path (the agents, or the ztunnels), for their CPU and RSS.
    fn proxy_pids(&self) -> Vec<u32> {
        self.agents.iter().map(|a| a.process.pid).chain(self.ztunnels.iter().map(|z| z.pid)).collect()
    }

    /// `new_connection_fresh`: round `round`'s (1-based) connections on fresh HBONE connections.
    fn fresh_times(&self, round: usize) -> Result<Option<Vec<Duration>>> {
        match &self.fresh {
            Fresh::None => Ok(None),
            Fresh::Pods { pods, server, .. } => {
                let to = server.socket(ECHO_PORT);
                let pods = &pods[(round - 1) * FRESH_CONNECTIONS..round * FRESH_CONNECTIONS];
                for pod in pods {
                    let warm = pod.send(server.socket6(ECHO_PORT), 1)?;
                    ensure!(warm.ok, "{}: {}'s warm-up echo over IPv6 failed: {warm:?}", self.name, pod.name);
                }
                let mut times = vec![];
                for pod in pods {
                    times.extend(pod.connect_times(to, 1, 1)?);
                }
                Ok(Some(times))
            }
            Fresh::Proxy { client, server } => {
                Ok(Some(client.connect_times_via(warren_testbed::ztunnel::SOCKS5, server.socket(ECHO_PORT), FRESH_CONNECTIONS, 1)?))
            }
        }
    }
}

/// Writes all of `data`, retrying the spurious EAGAIN an accelerated socket can return (docs/architecture.md).
fn write_retrying(stream: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `bytes` in all, split over `connections` at once, into the server's sink; MiB/s from the first
/// write until every sink said it had read its share.
fn one_way(path: &Path, connections: usize, bytes: usize) -> Result<f64> {
    let to = path.server.socket(SINK_PORT);
    let streams = (0..connections).map(|_| path.open(to)).collect::<Result<Vec<_>>>()?;
    let share = bytes / connections;
    let started = Instant::now();
    let senders: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let chunk = vec![0x5au8; CHUNK];
                let mut left = share;
                while left > 0 {
                    let n = left.min(CHUNK);
                    write_retrying(&mut stream, &chunk[..n])?;
                    left -= n;
                }
                stream.shutdown(Shutdown::Write)?;
                let mut count = [0u8; 8];
                read_retrying(&mut stream, &mut count)?;
                Ok(u64::from_le_bytes(count))
            })
        })
        .collect();
    for sender in senders {
        let read = sender.join().map_err(|_| anyhow::anyhow!("a sender panicked"))??;
        ensure!(read == share as u64, "{}: the sink read {read} of {share} bytes", path.name);
    }
    Ok(bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Round `round` of every figure of `path` into `figures` (metric, value, unit).
fn measure(path: &Path, bytes: usize, round: usize) -> Result<Vec<(&'static str, f64, &'static str)>> {
    let mut figures = vec![
        ("throughput_1conn", one_way(path, 1, bytes)?, "MiB/s"),
        ("throughput_8conn", one_way(path, 8, bytes)?, "MiB/s"),
    ];
    let mut times = path.connect_times(&path.client, path.server.socket(ECHO_PORT), NEW_CONNECTIONS)?;
    times.sort();
    figures.push(("new_connection", percentile(&times, 0.5), "µs"));
    figures.push(("new_connection_p99", percentile(&times, 0.99), "µs"));
    if let Some(mut times) = path.fresh_times(round)? {
        times.sort();
        figures.push(("new_connection_fresh", percentile(&times, 0.5), "µs"));
        figures.push(("new_connection_fresh_p99", percentile(&times, 0.99), "µs"));
    }

    let to = path.server.socket(APP_PORT);
    let paced = Load { path: format!("/bytes/{}", PACED.body_bytes), ..PACED };
    let mut load = path.spawn_load(to, &paced)?;
    let pids = path.proxy_pids();
    let wait = Duration::from_millis(paced.warm_up_ms + paced.duration_ms) + Duration::from_secs(30);
    load.wait_for_line("measuring", wait)?;
    let (started, before): (_, Vec<f64>) = (Instant::now(), pids.iter().map(|p| cpu_seconds(*p)).collect());
    load.wait_for_line("measured", wait)?;
    let window = started.elapsed().as_secs_f64();
    let after: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let report = app::load_report(load)?;
    ensure!(report.errors == 0, "{}: {} errors at 1000 rps: {:?}", path.name, report.errors, report.error_kinds);
    for (metric, us) in [("p50_1000rps", report.p50_us), ("p90_1000rps", report.p90_us), ("p99_1000rps", report.p99_us), ("p999_1000rps", report.p999_us)] {
        figures.push((metric, us as f64, "µs"));
    }
    if !pids.is_empty() {
        let per_1000 = report.achieved_rps.max(1.0) / 1000.0;
        let busiest = before.iter().zip(&after).map(|(b, a)| (a - b) / window / per_1000).fold(0.0, f64::max);
        figures.push(("cpu_1000rps", busiest, "vCPU"));
        figures.push(("rss_1000rps", pids.iter().map(|p| rss_mib(*p)).fold(0.0, f64::max), "MiB"));
        // Of which the agent's own allocations (the rest: pages of its binary, shared by every agent).
        figures.push(("rss_anon_1000rps", pids.iter().map(|p| rss_anon_mib(*p)).fold(0.0, f64::max), "MiB"));
    }
    let max = app::load_report(path.spawn_load(to, &Load { rps: 0, warm_up_ms: 1000, duration_ms: 5000, ..paced })?)?;
    ensure!(max.errors == 0, "{}: {} errors at max rps: {:?}", path.name, max.errors, max.error_kinds);
    figures.push(("max_rps", max.achieved_rps, "rps"));
    Ok(figures)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The targets for the L4 paths: (path, metric, ratio to direct at most / at least).
enum Target {
    AtLeast(&'static str, &'static str, f64),
    AtMost(&'static str, &'static str, f64),
    /// Microseconds added over direct, at most.
    AddsAtMost(&'static str, &'static str, f64),
    /// An absolute value, at most.
    ValueAtMost(&'static str, &'static str, f64),
}

const TARGETS: [Target; 6] = [
    Target::AtLeast("hbone", "throughput_1conn", 0.4),
    Target::AtLeast("plaintext", "throughput_1conn", 0.6),
    Target::AtMost("hbone", "new_connection", 1.5),
    Target::AddsAtMost("hbone", "p99_1000rps", 200.0),
    Target::ValueAtMost("hbone", "cpu_1000rps", 0.04),
    Target::ValueAtMost("hbone", "rss_1000rps", 12.0),
];

fn verdicts(report: &Report) -> String {
    let rows = report.rows();
    let find = |path: &str, metric: &str| rows.iter().find(|r| r.path == path && r.metric == metric);
    let mut out = String::new();
    for target in TARGETS {
        let (path, metric, text, held) = match target {
            Target::AtLeast(path, metric, at_least) => {
                let ratio = find(path, metric).and_then(|r| r.ratio_to_direct).unwrap_or(f64::NAN);
                (path, metric, format!("{ratio:.2}× direct (target ≥ {at_least}×)"), ratio >= at_least)
            }
            Target::AtMost(path, metric, at_most) => {
                let ratio = find(path, metric).and_then(|r| r.ratio_to_direct).unwrap_or(f64::NAN);
                (path, metric, format!("{ratio:.2}× direct (target ≤ {at_most}×)"), ratio <= at_most)
            }
            Target::AddsAtMost(path, metric, at_most) => {
                let added = find(path, metric).zip(find(DIRECT, metric)).map_or(f64::NAN, |(r, d)| r.value - d.value);
                (path, metric, format!("{added:+.0} µs over direct (target ≤ +{at_most} µs)"), added <= at_most)
            }
            Target::ValueAtMost(path, metric, at_most) => {
                let value = find(path, metric).map_or(f64::NAN, |r| r.value);
                (path, metric, format!("{value:.3} (target ≤ {at_most})"), value <= at_most)
            }
        };
        let _ = writeln!(out, "- {path} {metric}: {text}: {}", if held { "met" } else { "**NOT met**" });
    }
    out
}

fn main() {
    if let Err(reason) = check_privileges() {
        if in_ci() {
            panic!("CI=true, but the l4 bench cannot run here: {reason}");
        }
        println!("SKIPPED: l4 bench needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let rounds: usize = std::env::var("WARREN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS).max(1);
    let mib: usize = std::env::var("WARREN_BENCH_L4_MIB").ok().and_then(|r| r.parse().ok()).unwrap_or(1024);
    let peer_agent = std::env::var_os(ztunnel::PEER_AGENT_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    let started = Instant::now();
    let bed = Testbed::new("bench-l4").unwrap();
    let paths: Vec<Path> = specs(peer_agent.clone())
        .into_iter()
        .enumerate()
        .map(|(i, spec)| set_up(&bed, i, spec, rounds).unwrap_or_else(|e| panic!("setting up: {e:#}")))
        .collect();
    for path in &paths {
        path.check().unwrap_or_else(|e| panic!("{e:#}"));
    }
    eprintln!("l4 bench: {} paths set up and checked in {:.0?}", paths.len(), started.elapsed());
    let mut samples: Vec<Vec<(&str, Vec<f64>, &str)>> = paths.iter().map(|_| vec![]).collect();
    for round in 1..=rounds {
        for (path, samples) in paths.iter().zip(&mut samples) {
            let took = Instant::now();
            let figures = measure(path, mib << 20, round).with_context(|| path.name).unwrap_or_else(|e| panic!("{e:#}"));
            let line: Vec<String> = figures.iter().map(|(m, v, u)| format!("{m} {v:.1} {u}")).collect();
            eprintln!("l4 bench: round {round}: {:<16} ({:.0?}) {}", path.name, took.elapsed(), line.join(", "));
            for (metric, value, unit) in figures {
                match samples.iter_mut().find(|(m, ..)| *m == metric) {
                    Some((_, values, _)) => values.push(value),
                    None => samples.push((metric, vec![value], unit)),
                }
            }
        }
    }
    let mut report = Report::new("l4");
    for (path, samples) in paths.iter().zip(samples) {
        for (metric, values, unit) in samples {
            report.add(path.name, metric, median(values), unit);
        }
    }
    let peer = if peer_agent.is_some() { ztunnel::DESCRIPTION } else { "" };
    let out = format!(
        "L4 paths, client pod → server pod on another node; one-way {mib} MiB into a sink on 1 and 8 connections; \
         {NEW_CONNECTIONS} new connections with a 1-byte echo (HBONE pooled), and {FRESH_CONNECTIONS} on fresh HBONE \
         connections (new_connection_fresh); 1 KiB request → 1 KiB answer at 1000 rps open loop on 4 connections, \
         agents' CPU (the busier of the two, per 1000 rps) and RSS (the larger) over it; max rps closed loop.{peer} \
         Medians of {rounds} rounds; {:.0?} in all. Cells: value (× direct).\n\n{}\n{}{}",
        started.elapsed(),
        report.table(),
        verdicts(&report),
        if peer_agent.is_some() { ztunnel::verdicts(&report) } else { String::new() },
    );
    println!("\n{out}");
    match report.write() {
        Ok(file) => eprintln!("l4 bench: rows written to {}", file.display()),
        Err(e) => eprintln!("l4 bench: {e:#}"),
    }
    let file = xtask::workspace_root().join("target").join("bench-l4.md");
    if let Err(e) = std::fs::write(&file, &out) {
        eprintln!("l4 bench: writing {}: {e}", file.display());
    }
}
