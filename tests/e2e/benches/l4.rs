//! `cargo xtask bench l4`: the L4 path in one run — no mesh, through the agent (plain L4), through the agent
//! with sockops/sk_msg acceleration, and through the agent as HBONE (mTLS HTTP/2 CONNECT). Client and server are pods on one node (both enrolled in the meshed
//! cases, so a byte crosses the agent's outbound and inbound legs). Criterion measures echo throughput
//! (256 KiB each way per iteration) and 64-byte round trips; then a fixed run of round trips gives p50/p99
//! and a table with ratios against the no-mesh baseline of the same run.
use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput};
use warren_testbed::{AgentOptions, ECHO_PORT, Testbed, check_privileges};

const CHUNK: usize = 256 * 1024;
const PING: usize = 64;
const ROUND_TRIPS: usize = 20_000;
const STREAM_BYTES: usize = 256 << 20;
/// Paced requests: 64-byte round trips at a fixed 1000 per second, for the p99 under steady load.
const PACED_RPS: u64 = 1000;
const PACED_REQUESTS: usize = 5000;

/// Blocking read of exactly `buf.len()` bytes that retries the spurious EAGAIN an accelerated socket
/// can return (see docs/architecture.md, "Socket acceleration").
fn read_full(stream: &mut TcpStream, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => panic!("echo server closed"),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn echo(stream: &mut TcpStream, out: &[u8], back: &mut [u8]) {
    stream.write_all(out).unwrap();
    read_full(stream, back);
}

struct Figures {
    name: &'static str,
    mib_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    paced_p99_us: f64,
}

/// p99 of round trips sent on a fixed schedule (open loop: a slow reply does not delay the next slot's
/// start beyond the reply itself).
fn paced_p99(stream: &mut TcpStream, out: &[u8], back: &mut [u8]) -> f64 {
    let interval = Duration::from_micros(1_000_000 / PACED_RPS);
    let start = Instant::now();
    let mut samples: Vec<Duration> = Vec::with_capacity(PACED_REQUESTS);
    for i in 0..PACED_REQUESTS {
        let slot = start + interval * i as u32;
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        echo(stream, out, back);
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() * 99 / 100].as_secs_f64() * 1e6
}

fn main() {
    if let Err(reason) = check_privileges() {
        eprintln!("l4 bench skipped: needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut figures = vec![];
    let scenarios = [
        ("no mesh", None),
        ("agent", Some((false, false))),
        ("agent + sk_msg", Some((true, false))),
        ("agent + HBONE", Some((false, true))),
    ];
    for (name, agent) in scenarios {
        let bed = Testbed::new("bench-l4").unwrap();
        let node = bed.add_node("node-1").unwrap();
        let meshed = agent.is_some();
        let client = node.add_pod("client", meshed).unwrap();
        let server = node.add_pod("server", meshed).unwrap();
        server.serve("v1").unwrap();
        let _agent = agent.map(|(socket_acceleration, mtls)| {
            node.start_agent_with(AgentOptions { socket_acceleration, mtls, ebpf_log_level: "info", ..AgentOptions::default() })
                .unwrap()
        });
        let mut stream = client.connect(server.socket(ECHO_PORT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (out, mut back) = (vec![0x5au8; CHUNK], vec![0u8; CHUNK]);

        let mut group = criterion.benchmark_group("l4/echo-throughput");
        group.throughput(Throughput::Bytes(2 * CHUNK as u64));
        group.bench_function(name, |b| b.iter(|| echo(&mut stream, &out, &mut back)));
        group.finish();
        let mut group = criterion.benchmark_group("l4/round-trip-64B");
        group.bench_function(name, |b| b.iter(|| echo(&mut stream, &out[..PING], &mut back[..PING])));
        group.finish();

        // Fixed runs for the summary: percentiles need every sample.
        let mut samples: Vec<Duration> = (0..ROUND_TRIPS)
            .map(|_| {
                let t = Instant::now();
                echo(&mut stream, &out[..PING], &mut back[..PING]);
                t.elapsed()
            })
            .collect();
        samples.sort();
        let started = Instant::now();
        for _ in 0..STREAM_BYTES / CHUNK {
            echo(&mut stream, &out, &mut back);
        }
        let mib_per_s = (2 * STREAM_BYTES) as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();
        let percentile = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
        let paced_p99_us = paced_p99(&mut stream, &out[..PING], &mut back[..PING]);
        figures.push(Figures { name, mib_per_s, p50_us: percentile(0.50), p99_us: percentile(0.99), paced_p99_us });
    }

    let base = &figures[0];
    println!(
        "\nL4 summary (one connection; {} back-to-back round trips of {PING} B; {} MiB echoed each way; \
         {PACED_REQUESTS} round trips paced at {PACED_RPS}/s):",
        ROUND_TRIPS,
        STREAM_BYTES >> 20
    );
    println!(
        "{:<16} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>13} {:>7}",
        "path", "MiB/s", "× base", "p50 µs", "× base", "p99 µs", "× base", "p99@1krps µs", "× base"
    );
    for f in &figures {
        println!(
            "{:<16} {:>9.0} {:>7.2} {:>9.1} {:>7.2} {:>9.1} {:>7.2} {:>13.1} {:>7.2}",
            f.name,
            f.mib_per_s,
            f.mib_per_s / base.mib_per_s,
            f.p50_us,
            f.p50_us / base.p50_us,
            f.p99_us,
            f.p99_us / base.p99_us,
            f.paced_p99_us,
            f.paced_p99_us / base.paced_p99_us
        );
    }
}
