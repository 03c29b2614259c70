//! `cargo xtask bench accel`: the local leg socket acceleration shortens, alone. In an enrolled pod, a
//! connection to the pod's own address from a socket with the agent's mark — the agent's inbound leg to an
//! app, exactly — carries 1 GiB one-way into the pod's sink (`WARREN_BENCH_ACCEL_MIB` to change), with a
//! 256 KiB write at a time:
//!
//! - `direct`: the node's agent runs without acceleration: plain loopback TCP in the pod;
//! - `local+accel`: the node's agent accelerates: sockops put both ends in `LOCAL_SOCKETS` and sk_msg hands
//!   each write to the peer socket's receive queue.
//!
//! Two nodes in one testbed, one per path, measured round after round (`WARREN_BENCH_ROUNDS`, default 5);
//! medians. Checks that the accelerated path really was (the agent's `sk_msg_redirected` counter grew by at
//! least a write's worth per MiB) and the plain one not. Target: accelerated ≥ 1.5 × plain. Writes
//! `target/bench/accel.json` (see `xtask::bench`). Without root, BPF, cgroup2 and netns it prints
//! `SKIPPED` and exits 0 (under `CI=true` it fails).
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use warren_testbed::{Agent, AgentOptions, Pod, Process, SINK_PORT, Testbed, check_privileges, in_ci};
use xtask::bench::{DIRECT, Report};

const ROUNDS: usize = 5;
const CHUNK: usize = 256 * 1024;
const ACCEL: &str = "local+accel";
const TARGET: f64 = 1.5;

struct Leg {
    name: &'static str,
    pod: Pod,
    agent: Agent,
    _sink: Process,
}

fn set_up(bed: &Testbed, index: usize, name: &'static str, accelerate: bool) -> Result<Leg> {
    let node = bed.add_node(&format!("node-{index}"))?;
    let pod = node.add_pod("app", true)?;
    let sink = pod.serve_with_sink("v1")?;
    let options = AgentOptions { socket_acceleration: accelerate, ebpf_log_level: "info", log: "info", ..AgentOptions::default() };
    let agent = node.start_agent_with(options)?;
    Ok(Leg { name, pod, agent, _sink: sink })
}

fn redirected(agent: &Agent) -> Result<f64> {
    agent.metric("warren_ebpf_events_total", &[("event", "sk_msg_redirected")])
}

/// MiB/s of `bytes` one-way into the pod's own sink, from the first write until the sink said it read all.
fn one_way(leg: &Leg, bytes: usize) -> Result<f64> {
    let mut stream = leg.pod.connect_as_agent(SocketAddrV4::new(leg.pod.ip, SINK_PORT))?;
    let before = redirected(&leg.agent)?;
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        write_all(&mut stream, &chunk[..n])?;
        left -= n;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    read_exact(&mut stream, &mut count)?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(u64::from_le_bytes(count) == bytes as u64, "{}: the sink read {} of {bytes} bytes", leg.name, u64::from_le_bytes(count));
    let messages = redirected(&leg.agent)? - before;
    let accelerated = messages >= (bytes / CHUNK) as f64;
    ensure!(
        accelerated == (leg.name == ACCEL),
        "{}: sk_msg redirected {messages} messages for {} writes: acceleration was {}",
        leg.name,
        bytes / CHUNK,
        if accelerated { "on" } else { "off" }
    );
    Ok(bytes as f64 / (1 << 20) as f64 / seconds)
}

/// Writes all of `data`, retrying the spurious EAGAIN a sockhash socket can return (docs/architecture.md).
fn write_all(stream: &mut TcpStream, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("writing"),
        }
    }
    Ok(())
}

fn read_exact(stream: &mut TcpStream, mut buf: &mut [u8]) -> Result<()> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => anyhow::bail!("the sink closed before answering"),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the sink's answer"),
        }
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if let Err(reason) = check_privileges() {
        if in_ci() {
            panic!("CI=true, but the accel bench cannot run here: {reason}");
        }
        println!("SKIPPED: accel bench needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let rounds: usize = std::env::var("WARREN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS).max(1);
    let mib: usize = std::env::var("WARREN_BENCH_ACCEL_MIB").ok().and_then(|r| r.parse().ok()).unwrap_or(1024);
    let bed = Testbed::new("bench-accel").unwrap();
    let legs = [(DIRECT, false), (ACCEL, true)]
        .into_iter()
        .enumerate()
        .map(|(i, (name, accelerate))| set_up(&bed, i, name, accelerate).unwrap_or_else(|e| panic!("setting up {name}: {e:#}")))
        .collect::<Vec<_>>();
    let mut samples = vec![vec![]; legs.len()];
    for round in 1..=rounds {
        for (leg, samples) in legs.iter().zip(&mut samples) {
            let mibs = one_way(leg, mib << 20).unwrap_or_else(|e| panic!("{e:#}"));
            eprintln!("accel bench: round {round}: {:<12} {mibs:.0} MiB/s", leg.name);
            samples.push(mibs);
        }
    }
    let mut report = Report::new("accel");
    for (leg, samples) in legs.iter().zip(samples) {
        report.add(leg.name, "throughput_1conn", median(samples), "MiB/s");
    }
    let ratio = report.rows().iter().find(|r| r.path == ACCEL).and_then(|r| r.ratio_to_direct).unwrap_or(0.0);
    let verdict = if ratio >= TARGET { "met" } else { "NOT met" };
    println!(
        "\nThe local leg alone (a pod's connection to its own address, as the agent's inbound leg), one-way {mib} MiB \
         in {CHUNK}-byte writes; medians of {rounds} rounds. Cells: value (× direct).\n\n{}\n\
         target: local+accel throughput_1conn ≥ {TARGET} × direct: {ratio:.2}× — {verdict}",
        report.table()
    );
    match report.write() {
        Ok(file) => eprintln!("accel bench: rows written to {}", file.display()),
        Err(e) => eprintln!("accel bench: {e:#}"),
    }
}
