//! The l7 bench's telemetry part: what Istio's metrics, the access log and 1 % tracing (to an OTLP
//! receiver in the bench) cost the L7 path's p99 at 1000 rps, against all of them off — a mesh of each,
//! round after round, each figure the median of its rounds (target: within 10 %); and what the agents
//! hold with over 1000 distinct label sets (400 response codes × 3 services, both reporters).
use std::{fmt::Write as _, time::Instant};

use warren_testbed::{AgentOptions, HttpRequests, otlp::OtlpReceiver};

use super::{Figures, Mesh, PATHS, measure, rss_mib};

const P99_TARGET: f64 = 1.10;
/// Distinct label sets: a response code each, to three services.
const CODES: std::ops::RangeInclusive<u16> = 200..=599;
const SERVICES: [&str; 3] = ["10.96.1.10:80", "10.96.1.12:80", "10.96.1.13:80"];

pub fn run(rounds: usize) {
    let started = Instant::now();
    let receiver = OtlpReceiver::start().unwrap();
    let port = receiver.address.port();
    let options = |telemetry: serde_json::Value| AgentOptions { ebpf_log_level: "info", log: "info", telemetry: Some(telemetry), ..Default::default() };
    let off = serde_json::json!({"metrics": false, "accessLog": false});
    // `WARREN_BENCH_TELEMETRY` (the agent config's `telemetry`, JSON) replaces "all on", to see what one
    // part costs; `{endpoint}` in it is the receiver's URL.
    let endpoint = format!("http://127.0.0.1:{port}");
    let on = match std::env::var("WARREN_BENCH_TELEMETRY") {
        Ok(json) => serde_json::from_str(&json.replace("{endpoint}", &endpoint)).expect("WARREN_BENCH_TELEMETRY: JSON"),
        Err(_) => serde_json::json!({"metrics": true, "accessLog": true, "tracing": {"endpoint": endpoint, "samplingPercent": 1}}),
    };
    let l7 = PATHS.iter().find(|p| p.name == "L7, HTTP/1.1").expect("the L7 HTTP/1.1 path");
    let (mut quiet, mut full) = (Figures { rounds: vec![] }, Figures { rounds: vec![] });
    for round in 1..=rounds.max(1) {
        for (name, telemetry, figures) in [("all off", &off, &mut quiet), ("all on", &on, &mut full)] {
            let mesh = Mesh::with("bench-telemetry", options(telemetry.clone()), &[port]).unwrap();
            mesh.check(l7).unwrap();
            let r = measure(&mesh, l7).unwrap_or_else(|e| panic!("telemetry {name}: {e:#}"));
            eprintln!(
                "l7 bench: telemetry round {round}: {name:<7} p50 {:>5} µs  p99 {:>5} µs  agents {:.3} + {:.3} vCPU/1000 rps, RSS {:.1} + {:.1} MiB",
                r.paced.p50_us, r.paced.p99_us, r.vcpu[0], r.vcpu[1], r.rss[0], r.rss[1]
            );
            figures.rounds.push(r);
        }
    }
    let spans = receiver.spans().len();
    let labels = match std::env::var("WARREN_BENCH_LABELS").as_deref() {
        Ok("0") => [(0, 0.0, 0.0); 2],
        _ => label_sets(&Mesh::with("bench-labels", options(on.clone()), &[port]).unwrap()),
    };
    let out = summary(&quiet, &full, spans, labels, started.elapsed());
    println!("\n{out}");
    let file = xtask::workspace_root().join("target").join("bench-l7-telemetry.md");
    match std::fs::write(&file, &out) {
        Ok(()) => eprintln!("l7 bench: telemetry results written to {}", file.display()),
        Err(e) => eprintln!("l7 bench: writing {}: {e}", file.display()),
    }
}

/// The label sets each agent reports and its RSS before and after them: (series, before MiB, after MiB)
/// for the client's agent and the server's.
fn label_sets(mesh: &Mesh) -> [(usize, f64, f64); 2] {
    let before = [0, 1].map(|i| rss_mib(mesh.agents[i].process.pid));
    for service in SERVICES {
        for code in CODES {
            let result = mesh.client.http(service.parse().unwrap(), &HttpRequests::get(&format!("/status/{code}"), 1)).unwrap();
            assert_eq!(result[0].status, code, "GET /status/{code} via {service}: {result:?}");
        }
    }
    [0, 1].map(|i| {
        let text = mesh.agents[i].scrape("/stats/prometheus").unwrap();
        let series = text.lines().filter(|l| l.starts_with("istio_requests_total{")).count();
        (series, before[i], rss_mib(mesh.agents[i].process.pid))
    })
}

fn summary(off: &Figures, on: &Figures, spans: usize, labels: [(usize, f64, f64); 2], took: std::time::Duration) -> String {
    let rounds = off.rounds.len();
    let mut out = format!(
        "Telemetry cost on the L7 path (HTTP/1.1, 1000 rps open loop, as above): Istio's metrics, the access log \
         and tracing at 1 % (OTLP to a receiver in the bench; {spans} spans received) all on, against all off. \
         A fresh two-node mesh per configuration and round, {rounds} rounds; medians. {took:.0?} in all.\n\n\
         | telemetry | p50 µs | p99 µs | p99 range µs | errors | agent vCPU/1000 rps (client + server) | agent RSS MiB (client, server) |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (name, f) in [("all off", off), ("metrics + logs + 1 % tracing", on)] {
        let (low, high) = f.p99_range();
        let errors: u64 = f.rounds.iter().map(|r| r.paced.errors + r.max.errors).sum();
        writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {low}–{high} | {errors} | {:.3} + {:.3} | {:.1}, {:.1} |",
            f.median(|r| r.paced.p50_us as f64),
            f.p99(),
            f.median(|r| r.vcpu[0]),
            f.median(|r| r.vcpu[1]),
            f.median(|r| r.rss[0]),
            f.median(|r| r.rss[1]),
        )
        .unwrap();
    }
    let ratio = if off.p99() > 0.0 { on.p99() / off.p99() } else { f64::NAN };
    let held = if ratio <= P99_TARGET { "met" } else { "NOT met" };
    writeln!(out, "\n- p99 with telemetry on: **{ratio:.2}×** all off (target ≤ {P99_TARGET}×): {held}.").unwrap();
    for (agent, (series, before, after)) in ["client's", "server's"].iter().zip(labels) {
        writeln!(
            out,
            "- The {agent} agent with {series} `istio_requests_total` label sets (each with its three histograms): \
             RSS {before:.1} → {after:.1} MiB ({:+.1} MiB).",
            after - before
        )
        .unwrap();
    }
    out
}
