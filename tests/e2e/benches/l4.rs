//! `cargo xtask bench l4`: the L4 paths side by side in one run. Each path is a client pod on one node and a
//! server pod on another, all in one testbed, so the paths are measured round after round on the same
//! machine state:
//!
//! - `direct`: neither pod enrolled, no agent (the no-mesh baseline every ratio is to);
//! - `plaintext`: both enrolled, the agents' plain L4 path;
//! - `hbone`: both enrolled, agents with identities: mTLS HTTP/2 CONNECT between the nodes;
//! - `+accel`: the same with socket acceleration (sockops/sk_msg) on the app ↔ agent legs.
//!
//! Per path and round: one-way throughput (1 GiB, `WARREN_BENCH_L4_MIB` to change) on 1 and on 8
//! connections into a sink; new connection + 1-byte echo (p50, p99 of 200; HBONE connections pooled);
//! 1 KiB request → 1 KiB answer at 1000 rps open loop on 4 connections (p50/p90/p99/p99.9, from each
//! request's due time), the agents' CPU (utime + stime from /proc, per 1000 rps) and RSS over that window;
//! max rps closed loop. Each figure is the median of its rounds (`WARREN_BENCH_ROUNDS`, default 3). Prints
//! one table and the targets met or not, writes `target/bench/l4.json` (see `xtask::bench`) and
//! `target/bench-l4.md`. A bench reports; it does not fail on timing. Without root, BPF, cgroup2 and netns it
//! prints `SKIPPED` and exits 0 (under `CI=true` it fails).
use std::{
    fmt::Write as _,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
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

/// A path: its name in the report and how its agents run (`None`: no mesh).
struct PathSpec {
    name: &'static str,
    agents: Option<AgentOptions>,
}

fn specs() -> Vec<PathSpec> {
    let agent = |mtls, socket_acceleration| {
        Some(AgentOptions { mtls, socket_acceleration, ebpf_log_level: "info", log: "info", ..AgentOptions::default() })
    };
    vec![
        PathSpec { name: DIRECT, agents: None },
        PathSpec { name: "plaintext", agents: agent(false, false) },
        PathSpec { name: "plaintext+accel", agents: agent(false, true) },
        PathSpec { name: "hbone", agents: agent(true, false) },
        PathSpec { name: "hbone+accel", agents: agent(true, true) },
    ]
}

/// A path as set up: the pods, their servers, the agents of both nodes.
struct Path {
    name: &'static str,
    client: Pod,
    server: Pod,
    agents: Vec<Agent>,
    _servers: [Process; 2],
}

fn set_up(bed: &Testbed, index: usize, spec: PathSpec) -> Result<Path> {
    let nodes = [bed.add_node(&format!("node-{}", 2 * index + 1))?, bed.add_node(&format!("node-{}", 2 * index + 2))?];
    let meshed = spec.agents.is_some();
    let tag = spec.name.replace('+', "-");
    let client = nodes[0].add_pod(&format!("client-{tag}"), meshed)?;
    let server = nodes[1].add_pod(&format!("server-{tag}"), meshed)?;
    let app = AppOptions { port: APP_PORT, quiet: true, ..AppOptions::new("server", "v1") };
    let servers = [server.serve_with_sink("v1")?, server.serve_app(&app)?];
    let agents = match spec.agents {
        Some(options) => {
            let agents = nodes.iter().map(|n| n.start_agent_with(options.clone())).collect::<Result<Vec<_>>>()?;
            agents[0].wait_enrolled(&client, true, Duration::from_secs(15))?;
            agents[1].wait_enrolled(&server, true, Duration::from_secs(15))?;
            agents
        }
        None => vec![],
    };
    Ok(Path { name: spec.name, client, server, agents, _servers: servers })
}

impl Path {
    /// The path is what its name says: a connection shows in the client agent's table with the path's
    /// protocol (none for direct).
    fn check(&self) -> Result<()> {
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
    let streams = (0..connections).map(|_| path.client.connect(to)).collect::<Result<Vec<_>>>()?;
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

/// One round of every figure of `path` into `figures` (metric, value, unit).
fn measure(path: &Path, bytes: usize) -> Result<Vec<(&'static str, f64, &'static str)>> {
    let mut figures = vec![
        ("throughput_1conn", one_way(path, 1, bytes)?, "MiB/s"),
        ("throughput_8conn", one_way(path, 8, bytes)?, "MiB/s"),
    ];
    let mut times = path.client.connect_times(path.server.socket(ECHO_PORT), NEW_CONNECTIONS, 1)?;
    times.sort();
    figures.push(("new_connection", percentile(&times, 0.5), "µs"));
    figures.push(("new_connection_p99", percentile(&times, 0.99), "µs"));

    let to = path.server.socket(APP_PORT);
    let paced = Load { path: format!("/bytes/{}", PACED.body_bytes), ..PACED };
    let mut load = path.client.spawn_load(to, &paced)?;
    let pids: Vec<u32> = path.agents.iter().map(|a| a.process.pid).collect();
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
    let max = path.client.load(to, &Load { rps: 0, warm_up_ms: 1000, duration_ms: 5000, ..paced })?;
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
    let started = Instant::now();
    let bed = Testbed::new("bench-l4").unwrap();
    let paths: Vec<Path> = specs().into_iter().enumerate().map(|(i, spec)| set_up(&bed, i, spec).unwrap()).collect();
    for path in &paths {
        path.check().unwrap_or_else(|e| panic!("{e:#}"));
    }
    let mut samples: Vec<Vec<(&str, Vec<f64>, &str)>> = paths.iter().map(|_| vec![]).collect();
    for round in 1..=rounds {
        for (path, samples) in paths.iter().zip(&mut samples) {
            let figures = measure(path, mib << 20).with_context(|| path.name).unwrap_or_else(|e| panic!("{e:#}"));
            let line: Vec<String> = figures.iter().map(|(m, v, u)| format!("{m} {v:.1} {u}")).collect();
            eprintln!("l4 bench: round {round}: {:<16} {}", path.name, line.join(", "));
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
    let out = format!(
        "L4 paths, client pod → server pod on another node; one-way {mib} MiB into a sink on 1 and 8 connections; \
         {NEW_CONNECTIONS} new connections with a 1-byte echo (HBONE pooled); 1 KiB request → 1 KiB answer at \
         1000 rps open loop on 4 connections, agents' CPU (the busier of the two, per 1000 rps) and RSS (the larger) \
         over it; max rps closed loop. Medians of {rounds} rounds; {:.0?} in all. Cells: value (× direct).\n\n{}\n{}",
        started.elapsed(),
        report.table(),
        verdicts(&report)
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
