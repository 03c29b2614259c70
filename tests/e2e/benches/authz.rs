//! `cargo xtask bench authz`: what AuthorizationPolicy costs a new connection through the mesh. A client pod on
//! node-1 opens a connection to a server pod on node-2, sends 64 bytes and reads the echo, then closes it
//! (HBONE: a new CONNECT stream on the agents' pooled mTLS connection, decided by the server's agent) — timed
//! inside the client pod by `warren-testapp connect-times`, from `connect()` to the echo back.
//!
//! Two configurations of the same mesh in the same run: no AuthorizationPolicy, and 100 selecting the server —
//! 99 DENY policies that do not match this client (other principals, namespaces, ipBlocks, ports, conditions)
//! and 1 ALLOW that admits it, so every connection is checked against all 100. Criterion measures both; then
//! alternating rounds (ABBA, each after a warm-up) give medians and p99 over every sample, and the ratio
//! 100 policies / none (target ≤ 1.1×). Before timing, the bench checks the 100 are enforced: another
//! enrolled client is refused with them and admitted without.
//!
//! Both pods reuse TIME_WAIT ports (`tcp_tw_reuse=1`, a wider port range): at this rate connect() would
//! otherwise slow down by milliseconds once ~10,000 closed connections wait — the same in both
//! configurations, but noise that swamps what is measured.
//!
//! Prints a markdown table and writes it to `target/bench-authz.md`. Without root, BPF, cgroup2 and netns it
//! prints `SKIPPED` and exits 0 (under `CI=true` it fails).
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use criterion::Criterion;
use warren_testbed::{
    Agent, AgentOptions, Controller, ControllerOptions, ECHO_PORT, Pod, Process, Testbed, check_privileges, in_ci,
};

const POLICIES: usize = 100;
const PING: usize = 64;
/// Alternating rounds of the summary (ABBA…), each configuration once per round.
/// Many short rounds: the machine's drift (±20 % between rounds on 2 busy cores) is slower than a round, so
/// it averages out over the alternations.
const ROUNDS: usize = 16;
const PER_ROUND: usize = 250;
/// Connections discarded at the start of each round (after a configuration change).
const WARM_UP: usize = 50;
const TARGET_RATIO: f64 = 1.1;

struct Mesh {
    _bed: Testbed,
    dir: PathBuf,
    controller: Controller,
    _client_agent: Agent,
    server_agent: Agent,
    _serving: Process,
    client: Pod,
    other: Pod,
    server: Pod,
}

fn pod_yaml(pod: &Pod, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, uid: {}, labels: {{app: {}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {}, containers: [{{name: app, image: testapp}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.uid, pod.name, pod.name, pod.ip
    )
}

/// 99 DENY policies that never match `sleep` on the echo port, then the ALLOW that admits it — all selecting
/// the server, as users write them.
fn policies() -> String {
    let mut out = String::new();
    let head = |out: &mut String, name: &str, action: &str| {
        write!(
            out,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  selector:\n    matchLabels:\n      app: server\n  action: {action}\n  rules:\n"
        )
        .unwrap();
    };
    for i in 0..POLICIES - 1 {
        head(&mut out, &format!("deny-{i:02}"), "DENY");
        let rule = match i % 5 {
            0 => format!("  - from:\n    - source:\n        principals: [\"cluster.local/ns/team-{i}/sa/client\", \"cluster.local/ns/default/sa/sleep-{i}*\"]\n"),
            1 => format!("  - from:\n    - source:\n        namespaces: [\"team-{i}\", \"*-{i}\"]\n"),
            2 => format!("  - from:\n    - source:\n        ipBlocks: [\"10.{}.0.0/16\", \"192.168.{i}.0/24\"]\n", 100 + i),
            3 => format!("  - to:\n    - operation:\n        ports: [\"{}\", \"{}\"]\n", 10_000 + i, 20_000 + i),
            _ => format!(
                "  - from:\n    - source:\n        principals: [\"*/sa/robot-{i}\"]\n    to:\n    - operation:\n        ports: [\"{ECHO_PORT}\"]\n  \
                 - when:\n    - key: source.ip\n      values: [\"172.{}.0.0/16\"]\n",
                16 + i % 16
            ),
        };
        out += &rule;
    }
    head(&mut out, "allow-sleep", "ALLOW");
    out += "  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/sleep\"]\n";
    out
}

impl Mesh {
    fn new() -> Mesh {
        let bed = Testbed::new("bench-authz").unwrap();
        let (n1, n2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
        let client = n1.add_pod("sleep", true).unwrap();
        let other = n1.add_pod("notsleep", true).unwrap();
        let server = n2.add_pod("server", true).unwrap();
        let serving = server.serve("v1").unwrap();
        // Thousands of connections a second, each leaving a TIME_WAIT socket in both pods: past ~10,000 of
        // them connect() spends milliseconds looking for a free port (the first full run here went bimodal,
        // 0.7 ms / 5 ms, by round). Both configurations alike: reuse TIME_WAIT ports, and a wider range.
        for pod in [&client, &server] {
            pod.sysctl("net/ipv4/tcp_tw_reuse", "1").unwrap();
            pod.sysctl("net/ipv4/ip_local_port_range", "20000 65000").unwrap();
        }
        let dir = bed.state_dir().join("mesh-config");
        std::fs::create_dir_all(&dir).unwrap();
        let mesh = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {warren.dev/mesh: enabled}}\n---\n".to_string()
            + &pod_yaml(&client, "node-1")
            + &pod_yaml(&other, "node-1")
            + &pod_yaml(&server, "node-2");
        std::fs::write(dir.join("00-mesh.yaml"), mesh).unwrap();
        let controller = bed
            .start_controller(ControllerOptions { config_dir: Some(dir.clone()), kubeconfig: None, push_port: 0, config_poll_ms: Some(20) })
            .unwrap();
        let options = AgentOptions { mtls: true, controller: Some(controller.address()), ebpf_log_level: "info", log: "info", ..Default::default() };
        for node in [&n1, &n2] {
            node.reach_host_port(controller.push_port).unwrap();
        }
        let (client_agent, server_agent) = (n1.start_agent_with(options.clone()).unwrap(), n2.start_agent_with(options).unwrap());
        client_agent.wait_enrolled(&client, true, Duration::from_secs(15)).unwrap();
        client_agent.wait_enrolled(&other, true, Duration::from_secs(15)).unwrap();
        server_agent.wait_enrolled(&server, true, Duration::from_secs(15)).unwrap();
        Mesh { _bed: bed, dir, controller, _client_agent: client_agent, server_agent, _serving: serving, client, other, server }
    }

    fn target(&self) -> SocketAddr {
        self.server.socket(ECHO_PORT)
    }

    /// Applies the 100 policies (or removes them) and waits until the server's agent holds them.
    fn set_policies(&self, on: bool) {
        let path = self.dir.join("10-policies.yaml");
        if on {
            std::fs::write(&path, policies()).unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
        let want = if on { POLICIES } else { 0 };
        self.server_agent
            .wait_config(Duration::from_secs(10), |c| c["policies"].as_array().is_some_and(|p| p.len() == want))
            .unwrap();
    }

    /// The policies are what decides: with them, another enrolled client is refused; without, admitted. And
    /// every one of them is taken as written (none invalid, none with a field Warren does not honour).
    fn check_enforced(&self, on: bool) {
        let log = self.controller.log();
        assert!(!log.contains("invalid:") && !log.contains("does not honour"), "the policies must all apply as written:\n{log}");
        assert!(self.client.connect_times(self.target(), 1, PING).is_ok(), "sleep must always get in");
        let other = self.other.connect_times(self.target(), 1, PING);
        assert_eq!(other.is_err(), on, "notsleep with the policies {}: {other:?}", if on { "applied" } else { "removed" });
    }

    /// TIME_WAIT sockets in the client's and the server's pod (each connection leaves one in each: the
    /// client closes first, and so does the server's agent towards the workload).
    fn time_wait(&self) -> String {
        let tw = |pod: &Pod| {
            let out = std::process::Command::new("ip").args(["netns", "exec", &pod.netns, "cat", "/proc/net/sockstat"]).output();
            let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            let tcp = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or_default().to_string();
            tcp.split_whitespace().skip_while(|w| *w != "tw").nth(1).unwrap_or("?").to_string()
        };
        format!("TIME_WAIT: client pod {}, server pod {}", tw(&self.client), tw(&self.server))
    }

    fn samples(&self, count: usize) -> Vec<Duration> {
        self.client.connect_times(self.target(), count, PING).unwrap()
    }
}

#[derive(Default)]
struct Figures {
    samples: Vec<Duration>,
    round_medians: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if let Err(reason) = check_privileges() {
        if in_ci() {
            panic!("CI=true, but the authz bench cannot run here: {reason}");
        }
        println!("SKIPPED: authz bench needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let mesh = Mesh::new();
    for on in [true, false] {
        mesh.set_policies(on);
        mesh.check_enforced(on);
    }

    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let configurations = [("no policies", false), ("100 policies", true)];
    {
        let mut group = criterion.benchmark_group("authz/hbone-connect-echo-64B");
        for (name, on) in configurations {
            mesh.set_policies(on);
            group.bench_function(name, |b| b.iter_custom(|iters| mesh.samples(iters as usize).iter().sum()));
        }
        group.finish();
    }

    // The summary: every sample of alternating rounds, so drift on a noisy machine hits both alike.
    let started = Instant::now();
    let mut figures = [Figures::default(), Figures::default()];
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            mesh.set_policies(configurations[i].1);
            mesh.samples(WARM_UP);
            let mut samples = mesh.samples(PER_ROUND);
            samples.sort();
            eprintln!(
                "authz bench: round {round} {:<13} p50 {:>6.0} µs  p99 {:>6.0} µs   {}",
                configurations[i].0,
                micros(percentile(&samples, 0.5)),
                micros(percentile(&samples, 0.99)),
                mesh.time_wait()
            );
            figures[i].round_medians.push(percentile(&samples, 0.5));
            figures[i].samples.extend(samples);
        }
    }
    mesh.set_policies(true);
    mesh.check_enforced(true);

    let mut out = format!(
        "New connection through the mesh (HBONE, node-1 → node-2), connect → 64 B echo → close, timed in the client \
         pod; {ROUNDS} alternating rounds of {PER_ROUND} connections per configuration (after {WARM_UP} warm-up each), \
         {:.0?} in all.\n\n| AuthorizationPolicies on the server | connections | p50 µs | p90 µs | p99 µs | mean µs | \
         round p50s µs (min–max) |\n|---|---|---|---|---|---|---|\n",
        started.elapsed()
    );
    // Round by round (both configurations measured back to back): the ratio of their medians.
    let mut round_ratios: Vec<f64> = figures[1]
        .round_medians
        .iter()
        .zip(&figures[0].round_medians)
        .map(|(with, without)| with.as_secs_f64() / without.as_secs_f64())
        .collect();
    round_ratios.sort_by(f64::total_cmp);
    let median_round_ratio = round_ratios[round_ratios.len() / 2];
    let mut stats = Vec::new();
    for ((name, _), f) in configurations.iter().zip(&mut figures) {
        f.samples.sort();
        f.round_medians.sort();
        let mean = f.samples.iter().sum::<Duration>() / f.samples.len() as u32;
        let (p50, p90, p99) = (percentile(&f.samples, 0.5), percentile(&f.samples, 0.9), percentile(&f.samples, 0.99));
        writeln!(
            out,
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}–{:.0} |",
            f.samples.len(),
            micros(p50),
            micros(p90),
            micros(p99),
            micros(mean),
            micros(f.round_medians[0]),
            micros(*f.round_medians.last().unwrap())
        )
        .unwrap();
        stats.push((p50, p99, mean));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let (p50_ratio, p99_ratio, mean_ratio) =
        (ratio(stats[1].0, stats[0].0), ratio(stats[1].1, stats[0].1), ratio(stats[1].2, stats[0].2));
    writeln!(
        out,
        "\n100 policies / none: **p50 {p50_ratio:.3}×**, p99 {p99_ratio:.3}×, mean {mean_ratio:.3}× (round by round, p50: \
         median {median_round_ratio:.3}×, {:.3}–{:.3}×); target ≤ {TARGET_RATIO}× at p50: {}.",
        round_ratios[0],
        round_ratios.last().unwrap(),
        if p50_ratio <= TARGET_RATIO { "met" } else { "NOT met" }
    )
    .unwrap();
    println!("\n{out}");
    let path = xtask::workspace_root().join("target").join("bench-authz.md");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("authz bench: results written to {}", path.display()),
        Err(e) => eprintln!("authz bench: writing {}: {e}", path.display()),
    }
}
