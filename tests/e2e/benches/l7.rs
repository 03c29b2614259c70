//! `cargo xtask bench l7`: what the L7 path costs a request, against the L4 (HBONE) path and no mesh, in one
//! run. A client pod on node-1 sends 1 KiB POSTs to an app on node-2 that answers 1 KiB (`/bytes/1024`),
//! on 4 keep-alive connections, with `warren-testapp load`:
//!
//! - at a fixed 1000 requests a second, open loop (as wrk2 and fortio: each request is due at its slot,
//!   answered or not the ones before, and its latency runs from when it was due — coordinated omission
//!   corrected), 10 s after a 2 s warm-up: p50/p90/p99;
//! - closed loop, each connection's next request as soon as the last is answered, 5 s after 1 s: max rps.
//!
//! Paths, each over HTTP/1.1 and HTTP/2 (h2c): **no mesh** (a pair of pods that is not enrolled, the same
//! nodes), **L4 HBONE** (both enrolled; a Service port named `tcp-web`: one mTLS CONNECT stream per
//! connection, bytes copied), **L7** (the same pods through a Service port named `http`: the client's agent
//! proxies each request, then HBONE). Before timing, each path is checked to be what it says: only L7 answers
//! carry the `x-request-id` the proxy adds, the L4 connection shows in the client agent's table as `hbone`,
//! and no agent saw the no-mesh pair.
//!
//! Both agents' CPU (utime + stime of /proc/<pid>/stat) and the app server's is sampled when the counted
//! 1000 rps part starts and ends, the agents' RSS after it: the app's own cost per request is the yardstick
//! of this machine (a proxy's reads and writes are twice an app's). The paths are measured round after round
//! (3 rounds, `WARREN_BENCH_ROUNDS` to change), and every figure is the median of its rounds, the p99 shown
//! with its range: one round's p99 on this noisy machine can double from a hiccup elsewhere. Prints a markdown table and writes it to `target/bench-l7.md`, with the targets:
//! the L7 path adds at most 1.5× what the L4 path adds at p99 (each against the no-mesh p99 of its protocol),
//! and an agent uses at most 0.05 vCPU per 1000 rps. Then the telemetry part ([`telemetry`]): the L7 path
//! with Istio's metrics, access logs and 1 % tracing on against all of them off, and the agents' RSS with
//! over 1000 distinct label sets. Then the resilience part ([`resilience`]): a DestinationRule using every
//! resilience feature against the plain L7 path. A bench reports; it does not fail on timing. Without
//! root, BPF, cgroup2 and netns it prints `SKIPPED` and exits 0 (under `CI=true` it fails).
#[path = "l7/resilience.rs"]
mod resilience;
#[path = "l7/telemetry.rs"]
mod telemetry;

use std::{fmt::Write as _, net::SocketAddr, time::Duration, time::Instant};

use warren_e2e::{directory_mesh_with, pod_yaml};
use warren_testbed::{
    Agent, AgentOptions, AppOptions, Controller, HttpRequests, Load, LoadReport, Pod, Process, Testbed, app, check_privileges, cpu_seconds, in_ci, rss_mib,
};

const RPS: u64 = 1000;
const CONNECTIONS: usize = 4;
const BODY_BYTES: usize = 1024;
const WARM_UP_MS: u64 = 2000;
const MEASURE_MS: u64 = 10_000;
const MAX_WARM_UP_MS: u64 = 1000;
const MAX_MS: u64 = 5000;
const APP_PORT: u16 = 9080;
/// Service `web`: port 80 named `http` (the L7 path).
const WEB: &str = "10.96.1.10:80";
/// Service `web-tcp`: the same pod, port 80 named `tcp-web` (the L4 path).
const WEB_TCP: &str = "10.96.1.11:80";
/// Rounds over all paths (`WARREN_BENCH_ROUNDS` overrides); figures are medians over them.
const ROUNDS: usize = 3;
const L7_OVER_L4_TARGET: f64 = 1.5;
const VCPU_PER_1000_RPS_TARGET: f64 = 0.05;

struct Mesh {
    bed: Testbed,
    _controller: Controller,
    agents: [Agent; 2],
    apps: [Process; 2],
    client: Pod,
    server: Pod,
    plain_client: Pod,
    plain_server: Pod,
}

const SERVICES: &str = "apiVersion: v1\nkind: Namespace\n\
    metadata: {name: default, labels: {warren.dev/mesh: enabled}}\n---\n\
    apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
    spec: {clusterIP: 10.96.1.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web-tcp, namespace: default}\n\
    spec: {clusterIP: 10.96.1.11, selector: {app: web}, ports: [{name: tcp-web, port: 80, targetPort: 9080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web-b, namespace: default}\n\
    spec: {clusterIP: 10.96.1.12, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web-c, namespace: default}\n\
    spec: {clusterIP: 10.96.1.13, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n";

impl Mesh {
    fn new() -> anyhow::Result<Mesh> {
        Mesh::with("bench-l7", AgentOptions { ebpf_log_level: "info", log: "info", ..Default::default() }, &[])
    }

    /// The mesh with agents started with `options` (telemetry settings, for the telemetry part), the nodes
    /// reaching the host's `host_ports` (a collector) on their loopback.
    fn with(label: &str, options: AgentOptions, host_ports: &[u16]) -> anyhow::Result<Mesh> {
        let bed = Testbed::new(label)?;
        let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
        for port in host_ports {
            n1.reach_host_port(*port)?;
            n2.reach_host_port(*port)?;
        }
        let client = n1.add_pod("sleep", true)?;
        let server = n2.add_pod("web", true)?;
        let plain_client = n1.add_pod_in("plain", "plain-sleep", false)?;
        let plain_server = n2.add_pod_in("plain", "plain-web", false)?;
        let quiet = |name| AppOptions { port: APP_PORT, quiet: true, ..AppOptions::new(name, "v1") };
        let apps = [server.serve_app(&quiet("web"))?, plain_server.serve_app(&quiet("plain-web"))?];
        let dir = bed.state_dir().join("mesh-config");
        std::fs::create_dir_all(&dir)?;
        let pods = [
            pod_yaml(&client, "node-1", "app: sleep"),
            pod_yaml(&server, "node-2", "app: web"),
            pod_yaml(&plain_client, "node-1", "app: plain-sleep"),
            pod_yaml(&plain_server, "node-2", "app: plain-web"),
        ];
        std::fs::write(dir.join("00-mesh.yaml"), format!("{SERVICES}{}", pods.concat()))?;
        let (controller, agents) = directory_mesh_with(&bed, &dir, &[&n1, &n2], options)?;
        let agents: [Agent; 2] = agents.try_into().map_err(|_| anyhow::anyhow!("two agents"))?;
        let timeout = Duration::from_secs(15);
        agents[0].wait_enrolled(&client, true, timeout)?;
        agents[0].wait_enrolled(&plain_client, false, timeout)?;
        agents[1].wait_enrolled(&server, true, timeout)?;
        agents[1].wait_enrolled(&plain_server, false, timeout)?;
        for agent in &agents {
            agent.wait_config(timeout, |c| c.to_string().contains("default/web-tcp"))?;
        }
        Ok(Mesh { bed, _controller: controller, agents, apps, client, server, plain_client, plain_server })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    NoMesh,
    L4,
    L7,
}

struct Path {
    name: &'static str,
    kind: Kind,
    http2: bool,
}

const PATHS: [Path; 6] = [
    Path { name: "no mesh, HTTP/1.1", kind: Kind::NoMesh, http2: false },
    Path { name: "L4 HBONE, HTTP/1.1", kind: Kind::L4, http2: false },
    Path { name: "L7, HTTP/1.1", kind: Kind::L7, http2: false },
    Path { name: "no mesh, HTTP/2", kind: Kind::NoMesh, http2: true },
    Path { name: "L4 HBONE, HTTP/2", kind: Kind::L4, http2: true },
    Path { name: "L7, HTTP/2", kind: Kind::L7, http2: true },
];

impl Mesh {
    /// Who sends, and where to.
    fn route(&self, path: &Path) -> (&Pod, SocketAddr) {
        match path.kind {
            Kind::NoMesh => (&self.plain_client, self.plain_server.socket(APP_PORT)),
            Kind::L4 => (&self.client, WEB_TCP.parse().unwrap()),
            Kind::L7 => (&self.client, WEB.parse().unwrap()),
        }
    }

    /// HBONE connections the client's agent opened (or closed lately) to the server pod.
    fn hbone_to_server(&self) -> anyhow::Result<usize> {
        let table = self.agents[0].connections()?;
        let all = ["open", "recently_closed"].iter().filter_map(|k| table[k].as_array().cloned()).flatten();
        let server = self.server.socket(APP_PORT).to_string();
        Ok(all.filter(|c| c["original_dst"] == server.as_str() && c["protocol"] == "hbone").count())
    }

    /// The path is what its name says (see the module's doc).
    fn check(&self, path: &Path) -> anyhow::Result<()> {
        let (from, to) = self.route(path);
        let mut request = HttpRequests::get("/", 1);
        request.http2 = path.http2;
        let hbone_before = self.hbone_to_server()?;
        let result = from.http(to, &request)?.remove(0);
        let answer = result.app().ok_or_else(|| anyhow::anyhow!("{}: no app answer: {result:?}", path.name))?;
        let proxied = answer.headers.contains_key("x-request-id");
        anyhow::ensure!(proxied == (path.kind == Kind::L7), "{}: x-request-id {proxied}: {answer:?}", path.name);
        let want = if path.http2 { "HTTP/2.0" } else { "HTTP/1.1" };
        anyhow::ensure!(result.version == want, "{}: answered over {}", path.name, result.version);
        match path.kind {
            Kind::NoMesh => {
                let ips = [self.plain_client.ip.to_string(), self.plain_server.ip.to_string()];
                for agent in &self.agents {
                    let table = agent.connections()?.to_string();
                    let seen = ips.iter().any(|ip| table.contains(ip));
                    anyhow::ensure!(!seen, "{}: an agent proxied the plain pods: {table}", path.name);
                }
            }
            Kind::L4 => {
                // Closed when the client's connection closed: poll briefly.
                let opened = warren_e2e::eventually(Duration::from_secs(2), || {
                    (self.hbone_to_server().ok()? > hbone_before).then_some(())
                });
                let table = self.agents[0].connections()?;
                anyhow::ensure!(opened.is_some(), "{}: no new HBONE connection to the server: {table}", path.name);
            }
            Kind::L7 => {}
        }
        Ok(())
    }
}

/// One round's figures for one path.
struct Round {
    paced: LoadReport,
    max: LoadReport,
    /// vCPU per 1000 rps: the client's agent, the server's agent, and the app server itself.
    vcpu: [f64; 3],
    /// RSS in MiB, client's agent and server's.
    rss: [f64; 2],
}

/// A path's rounds; every figure reported is the median over them.
struct Figures {
    rounds: Vec<Round>,
}

impl Figures {
    fn median(&self, figure: impl Fn(&Round) -> f64) -> f64 {
        let mut values: Vec<f64> = self.rounds.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }

    fn p99(&self) -> f64 {
        self.median(|r| r.paced.p99_us as f64)
    }

    fn p99_range(&self) -> (u64, u64) {
        let p99s = self.rounds.iter().map(|r| r.paced.p99_us);
        (p99s.clone().min().unwrap_or(0), p99s.max().unwrap_or(0))
    }
}

fn measure(mesh: &Mesh, path: &Path) -> anyhow::Result<Round> {
    measure_to(mesh, path, mesh.route(path).1, "web")
}

/// [`measure`] to another Service (`to`, with its `host`) than the path's own, from the path's client.
fn measure_to(mesh: &Mesh, path: &Path, to: SocketAddr, host: &str) -> anyhow::Result<Round> {
    let from = mesh.route(path).0;
    let paced = Load {
        rps: RPS,
        warm_up_ms: WARM_UP_MS,
        duration_ms: MEASURE_MS,
        connections: CONNECTIONS,
        body_bytes: BODY_BYTES,
        http2: path.http2,
        host: Some(host.into()),
        path: format!("/bytes/{BODY_BYTES}"),
        timeout_ms: 10_000,
    };
    let mut load = from.spawn_load(to, &paced)?;
    let app = if path.kind == Kind::NoMesh { &mesh.apps[1] } else { &mesh.apps[0] };
    let pids = [mesh.agents[0].process.pid, mesh.agents[1].process.pid, app.pid];
    let wait = Duration::from_millis(WARM_UP_MS + MEASURE_MS) + Duration::from_secs(30);
    load.wait_for_line("measuring", wait)?;
    let (started, before) = (Instant::now(), pids.map(cpu_seconds));
    load.wait_for_line("measured", wait)?;
    let (window, after) = (started.elapsed().as_secs_f64(), pids.map(cpu_seconds));
    let rss = [rss_mib(pids[0]), rss_mib(pids[1])];
    let paced_report = app::load_report(load)?;
    let per_1000 = paced_report.achieved_rps.max(1.0) / 1000.0;
    let vcpu = [0, 1, 2].map(|i| (after[i] - before[i]) / window / per_1000);
    let max = Load { rps: 0, warm_up_ms: MAX_WARM_UP_MS, duration_ms: MAX_MS, ..paced };
    let max = from.load(to, &max)?;
    Ok(Round { paced: paced_report, max, vcpu, rss })
}

fn main() {
    if let Err(reason) = check_privileges() {
        if in_ci() {
            panic!("CI=true, but the l7 bench cannot run here: {reason}");
        }
        println!("SKIPPED: l7 bench needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let rounds: usize = std::env::var("WARREN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    // `WARREN_BENCH_L7=telemetry` runs only the telemetry part, `paths` only the paths, `resilience` only
    // that part; default all three.
    let parts = std::env::var("WARREN_BENCH_L7").unwrap_or_else(|_| "paths,telemetry,resilience".into());
    if parts.contains("paths") {
        paths(rounds);
    }
    if parts.contains("telemetry") {
        telemetry::run(rounds);
    }
    if parts.contains("resilience") {
        resilience::run(rounds);
    }
}

/// The paths part: no mesh, L4 and L7, over HTTP/1.1 and HTTP/2.
fn paths(rounds: usize) {
    let started = Instant::now();
    let mesh = Mesh::new().unwrap();
    for path in &PATHS {
        mesh.check(path).unwrap();
    }
    let mut figures: Vec<Figures> = PATHS.iter().map(|_| Figures { rounds: vec![] }).collect();
    // Round after round over every path, so that a slow spell of the machine spreads over the paths.
    for round in 1..=rounds.max(1) {
        for (path, figures) in PATHS.iter().zip(&mut figures) {
            let r = measure(&mesh, path).unwrap_or_else(|e| panic!("{}: {e:#}", path.name));
            eprintln!(
                "l7 bench: round {round}: {:<19} p50 {:>5} µs  p90 {:>5} µs  p99 {:>5} µs  max {:>5} rps  \
                 agents {:.3} + {:.3}, app {:.3} vCPU/1000 rps",
                path.name, r.paced.p50_us, r.paced.p90_us, r.paced.p99_us, r.max.achieved_rps as u64, r.vcpu[0],
                r.vcpu[1], r.vcpu[2]
            );
            figures.rounds.push(r);
        }
    }
    let out = summary(&figures, started.elapsed());
    println!("\n{out}");
    match rows(&figures).write() {
        Ok(file) => eprintln!("l7 bench: rows written to {}", file.display()),
        Err(e) => eprintln!("l7 bench: {e:#}"),
    }
    let file = xtask::workspace_root().join("target").join("bench-l7.md");
    match std::fs::write(&file, &out) {
        Ok(()) => eprintln!("l7 bench: results written to {}", file.display()),
        Err(e) => eprintln!("l7 bench: writing {}: {e}", file.display()),
    }
}

/// The paths part as `target/bench/l7.json` rows: paths `direct`, `hbone` (the L4 path) and `l7`; HTTP/2's
/// metrics end in `_h2`.
fn rows(figures: &[Figures]) -> xtask::bench::Report {
    let mut report = xtask::bench::Report::new("l7");
    for (path, f) in PATHS.iter().zip(figures) {
        let name = match path.kind {
            Kind::NoMesh => xtask::bench::DIRECT,
            Kind::L4 => "hbone",
            Kind::L7 => "l7",
        };
        let suffix = if path.http2 { "_h2" } else { "" };
        let mut add = |metric: &str, value: f64, unit: &str| report.add(name, &format!("{metric}{suffix}"), value, unit);
        add("p50_1000rps", f.median(|r| r.paced.p50_us as f64), "µs");
        add("p90_1000rps", f.median(|r| r.paced.p90_us as f64), "µs");
        add("p99_1000rps", f.p99(), "µs");
        add("max_rps", f.median(|r| r.max.achieved_rps), "rps");
        if path.kind != Kind::NoMesh {
            add("cpu_1000rps", f.median(|r| r.vcpu[0].max(r.vcpu[1])), "vCPU");
            add("rss_1000rps", f.median(|r| r.rss[0].max(r.rss[1])), "MiB");
        }
    }
    report
}

fn summary(figures: &[Figures], took: Duration) -> String {
    let rounds = figures[0].rounds.len();
    let mut out = format!(
        "{BODY_BYTES} B POST → {BODY_BYTES} B answer, pod on node-1 → pod on node-2, {CONNECTIONS} keep-alive \
         connections (HTTP/2: {CONNECTIONS} connections, a stream per request). Latency: {RPS} rps open loop \
         (from each request's due time), {} s counted after {} s warm-up. Max rps: closed loop, {} s after {} s. \
         CPU over the counted {RPS} rps part, per 1000 rps achieved; RSS after it. {rounds} rounds over all \
         paths: each figure is the median of its rounds (errors: the sum). {took:.0?} in all.\n\n\
         | path | p50 µs | p90 µs | p99 µs | p99 range µs | max µs | errors | rps | sent late p99 µs | \
         p99 added µs | × L4's | max rps | agent vCPU/1000 rps (client + server) | app vCPU/1000 rps | \
         agent RSS MiB (client, server) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        MEASURE_MS / 1000,
        WARM_UP_MS / 1000,
        MAX_MS / 1000,
        MAX_WARM_UP_MS / 1000
    );
    // Rows come in threes per protocol: no mesh, L4, L7.
    let added = |i: usize| figures[i].p99() - figures[i - i % 3].p99();
    let mut verdicts = vec![];
    for (i, (path, f)) in PATHS.iter().zip(figures).enumerate() {
        let (added_text, ratio_text) = match path.kind {
            Kind::NoMesh => ("—".to_string(), "—".to_string()),
            Kind::L4 => (format!("{:+.0}", added(i)), "1".to_string()),
            Kind::L7 => {
                let (l7, l4) = (added(i), added(i - 1));
                verdicts.push(p99_verdict(path.name, l7, l4));
                let ratio = if l4 > 0.0 { format!("{:.2}", l7 / l4) } else { "n/a".to_string() };
                (format!("{l7:+.0}"), ratio)
            }
        };
        let errors: u64 = f.rounds.iter().map(|r| r.paced.errors + r.max.errors).sum();
        let (low, high) = f.p99_range();
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {low}–{high} | {:.0} | {errors} | {:.0} | {:.0} | {added_text} | \
             {ratio_text} | {:.0} | {:.3} + {:.3} | {:.3} | {:.1}, {:.1} |",
            path.name,
            f.median(|r| r.paced.p50_us as f64),
            f.median(|r| r.paced.p90_us as f64),
            f.p99(),
            f.median(|r| r.paced.max_us as f64),
            f.median(|r| r.paced.achieved_rps),
            f.median(|r| r.paced.dispatch_late_p99_us as f64),
            f.median(|r| r.max.achieved_rps),
            f.median(|r| r.vcpu[0]),
            f.median(|r| r.vcpu[1]),
            f.median(|r| r.vcpu[2]),
            f.median(|r| r.rss[0]),
            f.median(|r| r.rss[1]),
        )
        .unwrap();
    }
    out += "\n";
    for verdict in verdicts {
        writeln!(out, "- {verdict}").unwrap();
    }
    writeln!(out, "- {}", cpu_verdict(figures)).unwrap();
    writeln!(
        out,
        "- *sent late*: how late after its due time the load generator handed a request to its connection (p99) — \
         its own delay on this machine, part of every latency in the row (a busy machine shows there first)."
    )
    .unwrap();
    let errors: Vec<String> = PATHS
        .iter()
        .zip(figures)
        .flat_map(|(p, f)| {
            let kinds = f.rounds.iter().flat_map(|r| r.paced.error_kinds.iter().chain(&r.max.error_kinds));
            kinds.map(move |e| format!("{}: {e}", p.name))
        })
        .collect();
    if !errors.is_empty() {
        writeln!(out, "- Errors: {}.", errors.join("; ")).unwrap();
    }
    out
}

fn p99_verdict(name: &str, l7: f64, l4: f64) -> String {
    if l4 <= 0.0 {
        return format!("{name}: the L4 path adds nothing measurable at p99 ({l4:+.0} µs), L7 adds {l7:+.0} µs");
    }
    let held = if l7 / l4 <= L7_OVER_L4_TARGET { "met" } else { "NOT met" };
    format!(
        "{name}: L7 adds {l7:+.0} µs at p99, L4 {l4:+.0} µs: **{:.2}×** (target ≤ {L7_OVER_L4_TARGET}×): {held}",
        l7 / l4
    )
}

/// The worst agent against the target, and against the app server's own cost on this machine: the app reads
/// each request and writes each answer once, a proxy on either end does both twice (from one socket, to
/// another) plus TLS, so about twice the app is what a proxy's system calls alone cost here.
fn cpu_verdict(figures: &[Figures]) -> String {
    let meshed = PATHS.iter().zip(figures).filter(|(p, _)| p.kind != Kind::NoMesh);
    let per_agent = meshed.flat_map(|(p, f)| {
        let app = f.median(|r| r.vcpu[2]);
        [0, 1].map(|i| (p.name, f.median(|r| r.vcpu[i]), app))
    });
    let (worst_path, worst, app) =
        per_agent.max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or(("-", 0.0, 0.0));
    let held = if worst <= VCPU_PER_1000_RPS_TARGET { "met" } else { "NOT met" };
    format!(
        "Agent CPU: at most {worst:.3} vCPU per 1000 rps for one agent ({worst_path}; target ≤ \
         {VCPU_PER_1000_RPS_TARGET}): {held}. The app server itself used {app:.3} vCPU per 1000 rps on that path \
         ({:.1}× for the agent). The no-mesh rows show the agents' idle use over the same window.",
        if app > 0.0 { worst / app } else { 0.0 }
    )
}
