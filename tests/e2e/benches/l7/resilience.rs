//! The l7 bench's resilience part: what a DestinationRule using every resilience feature (and a
//! VirtualService's retries) costs the L7 path's p99 at 1000 rps, against the plain L7 path (Istio's default
//! retry policy, least request, no limits) — in one mesh, the same pods behind three Services: `web` plain,
//! `web-b` with least request, warm-up, locality, every pool limit, outlier detection and a retry budget,
//! `web-c` the same with a ring hash by source IP in place of least request. Round after round, each figure
//! the median of its rounds (target: p99 within 5 %). Before timing, `inspect endpoints` must show each
//! policy in force on the client's agent.
use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use super::{Figures, Mesh, PATHS, measure_to};

const P99_TARGET: f64 = 1.05;

/// Everything Istio's connectionPool and outlierDetection offer, limits high enough that 1000 rps on 4
/// connections never meets them (a limit met would measure the 503s, not the bookkeeping).
const POOL_AND_OUTLIERS: &str = "    connectionPool:\n\
    \x20     tcp: {maxConnections: 1000, connectTimeout: 2s, tcpKeepalive: {time: 600s, interval: 60s, probes: 3}, maxConnectionDuration: 3600s}\n\
    \x20     http: {http1MaxPendingRequests: 1000, http2MaxRequests: 10000, maxRequestsPerConnection: 100000, maxRetries: 100, idleTimeout: 300s, h2UpgradePolicy: DO_NOT_UPGRADE}\n\
    \x20   outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, consecutiveLocalOriginFailures: 5, splitExternalLocalOriginErrors: true, interval: 5s, baseEjectionTime: 30s, maxEjectionPercent: 50, minHealthPercent: 0}\n\
    \x20   retryBudget: {percent: 25, minRetryConcurrency: 10}\n";

/// A route with its own retries and timeouts, for `host`.
fn virtual_service(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: default}}\n\
         spec:\n  hosts: [{host}]\n  http:\n  - timeout: 10s\n    retries: {{attempts: 3, perTryTimeout: 5s, \
         retryOn: \"5xx,connect-failure,refused-stream,reset\"}}\n    route:\n    - destination: {{host: {host}}}\n---\n"
    )
}

fn destination_rule(host: &str, load_balancer: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: default}}\n\
         spec:\n  host: {host}\n  trafficPolicy:\n{load_balancer}{POOL_AND_OUTLIERS}---\n"
    )
}

/// The configurations measured: (row, Service address, Host, expected load balancer in inspect endpoints).
const CONFIGS: [(&str, &str, &str, &str); 3] = [
    ("plain L7 (Istio's default retries)", "10.96.1.10:80", "web", "LEAST_REQUEST"),
    ("DestinationRule: least request + all", "10.96.1.12:80", "web-b", "LEAST_REQUEST"),
    ("DestinationRule: ring hash + all", "10.96.1.13:80", "web-c", "RING_HASH"),
];

const LEAST_REQUEST: &str = "    loadBalancer:\n      simple: LEAST_REQUEST\n      warmupDurationSecs: 10s\n\
    \x20     localityLbSetting: {enabled: true, failoverPriority: [topology.kubernetes.io/region]}\n";
const RING_HASH: &str = "    loadBalancer:\n      consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 1024}}\n\
    \x20     localityLbSetting: {enabled: true}\n";

pub fn run(rounds: usize) {
    let started = Instant::now();
    let mesh = Mesh::new().unwrap();
    let yaml = [
        destination_rule("web-b", LEAST_REQUEST),
        virtual_service("web-b"),
        destination_rule("web-c", RING_HASH),
        virtual_service("web-c"),
    ]
    .concat();
    let dir = mesh.bed.state_dir().join("mesh-config");
    warren_e2e::apply_config(&dir, &mesh.agents, "20-resilience.yaml", &yaml).unwrap();
    let l7 = PATHS.iter().find(|p| p.name == "L7, HTTP/1.1").expect("the L7 HTTP/1.1 path");
    mesh.check(l7).unwrap();
    for (name, service, host, _) in CONFIGS {
        let to: SocketAddr = service.parse().unwrap();
        let answer = mesh.client.http(to, &warren_testbed::HttpRequests::get("/", 1)).unwrap().remove(0);
        assert_eq!(answer.status, 200, "{name} via {host}: {answer:?}");
    }
    check_policies(&mesh);
    let mut figures: Vec<Figures> = CONFIGS.iter().map(|_| Figures { rounds: vec![] }).collect();
    for round in 1..=rounds.max(1) {
        for ((name, service, host, _), figures) in CONFIGS.iter().zip(&mut figures) {
            let r = measure_to(&mesh, l7, service.parse().unwrap(), host).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            eprintln!(
                "l7 bench: resilience round {round}: {name:<38} p50 {:>5} µs  p99 {:>5} µs  max {:>5} rps  agents {:.3} + {:.3} vCPU/1000 rps",
                r.paced.p50_us, r.paced.p99_us, r.max.achieved_rps as u64, r.vcpu[0], r.vcpu[1]
            );
            figures.rounds.push(r);
        }
    }
    check_policies(&mesh);
    let out = summary(&figures, started.elapsed());
    println!("\n{out}");
    match rows(&figures).write() {
        Ok(file) => eprintln!("l7 bench: resilience rows written to {}", file.display()),
        Err(e) => eprintln!("l7 bench: {e:#}"),
    }
    let file = xtask::workspace_root().join("target").join("bench-l7-resilience.md");
    match std::fs::write(&file, &out) {
        Ok(()) => eprintln!("l7 bench: resilience results written to {}", file.display()),
        Err(e) => eprintln!("l7 bench: writing {}: {e}", file.display()),
    }
}

/// The client's agent holds each Service's cluster with the policy written for it, and nothing overflowed
/// or was ejected (a limit met or an ejection would make the figures about something else).
fn check_policies(mesh: &Mesh) {
    let view = mesh.agents[0].endpoints().unwrap();
    for (name, _, host, lb) in CONFIGS {
        let service = format!("default/{host}");
        let cluster = view.clusters.iter().find(|c| c.service == service).unwrap_or_else(|| panic!("{name}: no cluster for {service}: {view:?}"));
        assert_eq!(cluster.load_balancer, lb, "{name}: {cluster:?}");
        let configured = host != "web";
        assert_eq!(cluster.outlier_detection, configured, "{name}: outlier detection: {cluster:?}");
        assert_eq!(cluster.limits.max_connections.is_some(), configured, "{name}: pool limits: {cluster:?}");
        assert_eq!(cluster.overflows, Default::default(), "{name}: a limit was met: {cluster:?}");
        assert!(cluster.endpoints.iter().all(|e| e.health == "HEALTHY"), "{name}: an endpoint is not healthy: {cluster:?}");
    }
}

/// `target/bench/l7-resilience.json`: paths `l7` (plain), `l7+dr-least-request`, `l7+dr-ring-hash`; no
/// direct path in this part (the plain L7 path is its baseline: its table and verdicts say the ratios).
fn rows(figures: &[Figures]) -> xtask::bench::Report {
    let mut report = xtask::bench::Report::new("l7-resilience");
    for (path, f) in ["l7", "l7+dr-least-request", "l7+dr-ring-hash"].into_iter().zip(figures) {
        report.add(path, "p50_1000rps", f.median(|r| r.paced.p50_us as f64), "µs");
        report.add(path, "p99_1000rps", f.p99(), "µs");
        report.add(path, "max_rps", f.median(|r| r.max.achieved_rps), "rps");
        report.add(path, "cpu_1000rps", f.median(|r| r.vcpu[0].max(r.vcpu[1])), "vCPU");
    }
    report
}

fn summary(figures: &[Figures], took: std::time::Duration) -> String {
    let rounds = figures[0].rounds.len();
    let mut out = format!(
        "Resilience cost on the L7 path (HTTP/1.1, 1000 rps open loop, as above): the same pods behind a plain \
         Service and two with a DestinationRule using every resilience feature (pool limits not met, outlier \
         detection, locality, warm-up, retry budget) and a VirtualService with retries. One mesh, {rounds} rounds \
         over the three; medians. {took:.0?} in all.\n\n\
         | configuration | p50 µs | p99 µs | p99 range µs | errors | × plain p99 | max rps | agent vCPU/1000 rps (client + server) |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let plain = figures[0].p99();
    let mut verdicts = vec![];
    for ((name, ..), f) in CONFIGS.iter().zip(figures) {
        let (low, high) = f.p99_range();
        let errors: u64 = f.rounds.iter().map(|r| r.paced.errors + r.max.errors).sum();
        let ratio = if plain > 0.0 { f.p99() / plain } else { f64::NAN };
        writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {low}–{high} | {errors} | {ratio:.2} | {:.0} | {:.3} + {:.3} |",
            f.median(|r| r.paced.p50_us as f64),
            f.p99(),
            f.median(|r| r.max.achieved_rps),
            f.median(|r| r.vcpu[0]),
            f.median(|r| r.vcpu[1]),
        )
        .unwrap();
        if !std::ptr::eq(f, &figures[0]) {
            let held = if ratio <= P99_TARGET { "met" } else { "NOT met" };
            verdicts.push(format!("{name}: p99 **{ratio:.2}×** plain L7 (target ≤ {P99_TARGET}×): {held}."));
        }
    }
    out += "\n";
    for verdict in verdicts {
        writeln!(out, "- {verdict}").unwrap();
    }
    out
}
