//! `cargo xtask bench control`: the control plane, measured end to end in one run.
//!
//! 1. Initial sync at scale: warren-controller (directory mode) reads 10,000 Services with 100,000
//!    endpoints (Endpoints objects, no pods); one agent starts and the time until its pinned SERVICE_ROUTES
//!    map holds all 10,000 VIPs is measured, read straight from bpffs. Agent and controller RSS are compared
//!    with an agent and controller of the same run serving one Service. Then a few VirtualService edits at
//!    that scale: file written → the agent's map, with the stages from the controller's log.
//! 2. Update latency: 20 nodes, one agent each, one Service with a DestinationRule; a VirtualService's
//!    weights are rewritten 50 times and each agent's pinned SERVICE_ROUTES entry for the VIP is polled until
//!    it carries the new weights. The latency includes the controller's directory poll (every 5 ms here)
//!    and this bench's polling granularity.
//!
//! Prints a markdown table and writes it to `target/bench-control.md`, its rows to `target/bench/control.json`,
//! and each of issue 15's targets (snapshot size, agent and controller RSS at 10k services, edit → map
//! latency) as met or NOT met.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use warren_maps::{ServiceKey, ServiceRoute, name_id, names};
use warren_testbed::{Agent, AgentOptions, Controller, ControllerOptions, Node, Testbed, check_privileges, in_ci, in_netns};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
/// Services per YAML file (each file also holds their Endpoints objects).
const SERVICES_PER_FILE: usize = 2_500;
const SYNC_POLL: Duration = Duration::from_millis(20);
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// Before reading RSS: let the agent finish whatever follows the map write (workloads, proxy tables).
const SETTLE: Duration = Duration::from_secs(1);
/// VirtualService edits measured on the scale (and baseline) config.
const SCALE_EDITS: usize = 20;

const NODES: usize = 20;
const UPDATES: usize = 50;
/// The controllers' directory poll, everywhere in this bench.
const CONFIG_POLL_MS: u64 = 5;
const UPDATE_POLL: Duration = Duration::from_micros(500);
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30);
const VIP: &str = "10.96.0.10:80";

type Routes = BpfHashMap<MapData, ServiceKey, ServiceRoute>;

/// The agent's pinned SERVICE_ROUTES, once it exists.
fn open_routes(pin_dir: &Path) -> Option<Routes> {
    let data = MapData::from_pin(pin_dir.join(names::SERVICE_ROUTES)).ok()?;
    BpfHashMap::try_from(Map::HashMap(data)).ok()
}

fn count(routes: &Routes) -> usize {
    routes.keys().filter(Result::is_ok).count()
}

fn weights(route: &ServiceRoute) -> Vec<u32> {
    route.destinations[..(route.destination_count as usize).min(route.destinations.len())].iter().map(|d| d.weight).collect()
}

fn subsets(route: &ServiceRoute) -> Vec<(u32, u32)> {
    route.destinations[..(route.destination_count as usize).min(route.destinations.len())]
        .iter()
        .map(|d| (d.subset_id, d.weight))
        .collect()
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `key=value` of a tracing line (`key=123` or `key="x"`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!(" {key}=");
    let start = line.find(&pattern)? + pattern.len();
    Some(line[start..].split_whitespace().next().unwrap_or("").trim_matches('"'))
}

fn log_values(log: &str, message: &str, filter: impl Fn(&str) -> bool, key: &str) -> Vec<u64> {
    log.lines().filter(|l| l.contains(message) && filter(l)).filter_map(|l| field(l, key)?.parse().ok()).collect()
}

/// Seconds of the UTC day of a tracing line's timestamp (`2026-01-02T03:04:05.678901Z …`).
fn line_time(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split('Z').next()?;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds of the UTC day now, as the controller's log stamps it.
fn now_time() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64() % 86_400.0
}

/// From the controller's log, the stages of the change that became `version`: when it logged the directory
/// change (after re-reading it), when it had compiled, and each ACK of that version (of `node`, if given).
struct Stages {
    changed: f64,
    compiled: f64,
    acks: Vec<f64>,
}

fn stages(log: &str, version: u64, node: Option<&str>) -> Option<Stages> {
    let mut changed = None;
    let mut compiled = None;
    let mut acks = Vec::new();
    for line in log.lines() {
        if compiled.is_none() && line.contains("config directory changed") {
            changed = line_time(line);
        } else if compiled.is_none() && line.contains(" compiled ") && field(line, "version") == Some(&version.to_string()) {
            compiled = line_time(line);
        } else if line.contains(" ACK ")
            && field(line, "version") == Some(&version.to_string())
            && node.is_none_or(|n| field(line, "node") == Some(n))
        {
            acks.extend(line_time(line));
        }
    }
    Some(Stages { changed: changed?, compiled: compiled?, acks })
}

/// Seconds → Duration, tolerating a day boundary and clock granularity.
fn span(from: f64, to: f64) -> Duration {
    Duration::from_secs_f64((to - from).rem_euclid(86_400.0).min(3_600.0))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() { Duration::ZERO } else { percentile(&v, 0.5) }
}

fn max(values: &[Duration]) -> Duration {
    values.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn write_file(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
}

/// Replaces `dir/name` atomically (the controller never reads half a file).
fn replace_file(dir: &Path, name: &str, text: &str) {
    let tmp = dir.parent().expect("config dir has a parent").join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// `base + n`.
fn ip_at(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{warren.dev/mesh: enabled}}}}\n---\n")
}

/// A Service without a selector and its Endpoints object.
fn service_yaml(out: &mut String, namespace: &str, name: &str, vip: Ipv4Addr, endpoints: impl Iterator<Item = Ipv4Addr>) {
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         subsets: [{{ports: [{{name: http, port: 8080}}], addresses: ["
    );
    for (i, ip) in endpoints.enumerate() {
        let _ = write!(out, "{}{{ip: {ip}}}", if i == 0 { "" } else { ", " });
    }
    out.push_str("]}]\n---\n");
}

const SCALE_VIPS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const SCALE_ENDPOINTS: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);

/// Writes `services` Services in namespace `bench`, `ENDPOINTS_PER_SERVICE` endpoints each, and the
/// namespace; returns the bytes written.
fn write_services(dir: &Path, services: usize) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    write_file(dir, "00-namespace.yaml", &namespace_yaml("bench"));
    let mut bytes = 0;
    for file in 0..services.div_ceil(SERVICES_PER_FILE) {
        let mut out = String::with_capacity(SERVICES_PER_FILE * 600);
        for s in file * SERVICES_PER_FILE..((file + 1) * SERVICES_PER_FILE).min(services) {
            let endpoints = (0..ENDPOINTS_PER_SERVICE).map(|e| ip_at(SCALE_ENDPOINTS, s * ENDPOINTS_PER_SERVICE + e));
            service_yaml(&mut out, "bench", &format!("svc-{s:05}"), ip_at(SCALE_VIPS, s + 1), endpoints);
        }
        bytes += out.len();
        write_file(dir, &format!("10-services-{file}.yaml"), &out);
    }
    bytes
}

/// A VirtualService splitting `host` between its subsets `a`/`b` (or v1/v2) `w` / `100 - w`. `pad` changes
/// the file's size, so that two writes within one mtime tick still differ in the controller's fingerprint.
fn virtual_service(namespace: &str, host: &str, (s1, s2): (&str, &str), w: u32, pad: usize) -> String {
    format!(
        "# edit{}\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: {namespace}}}\n\
         spec:\n  hosts: [{host}]\n  http:\n  - route:\n    - destination: {{host: {host}, subset: {s1}}}\n      weight: {w}\n    \
         - destination: {{host: {host}, subset: {s2}}}\n      weight: {}\n",
        " ".repeat(pad),
        100 - w
    )
}

/// Distinct weights for consecutive edits, never 0 or 100.
fn weight(i: usize) -> u32 {
    1 + (i as u32 * 37) % 99
}

/// Makes the host's `127.0.0.1:port` (the controller's push port) reachable inside `node`'s netns, as
/// `Node::reach_host_port` does but with TCP_NODELAY on both legs of the forwarder: without it the push's
/// small frames (h2 HEADERS, updates, ACKs) can wait for a delayed ACK, ~40 ms each — the testbed's cost,
/// not the control plane's. `WARREN_BENCH_FORWARDER=testbed` uses `Node::reach_host_port` instead.
/// The listener is returned, to be shut down before the testbed goes.
fn reach_controller(node: &Node, port: u16) -> Option<TcpListener> {
    if std::env::var("WARREN_BENCH_FORWARDER").is_ok_and(|v| v == "testbed") {
        node.reach_host_port(port).unwrap();
        return None;
    }
    let listener = in_netns(&node.netns, || TcpListener::bind(("127.0.0.1", port))).unwrap().unwrap();
    let accept = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for inbound in accept.incoming() {
            let Ok(inbound) = inbound else { return };
            // This thread is in the bench's own (host) netns.
            let Ok(host) = TcpStream::connect(("127.0.0.1", port)) else { continue };
            let _ = (inbound.set_nodelay(true), host.set_nodelay(true));
            let (Ok(inbound2), Ok(host2)) = (inbound.try_clone(), host.try_clone()) else { continue };
            for (mut from, mut to) in [(inbound, host2), (host, inbound2)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Some(listener)
}

/// Wakes the forwarders' accept loops so that they end (and release the nodes' netns).
fn stop_forwarders(listeners: Vec<Option<TcpListener>>) {
    for listener in listeners.into_iter().flatten() {
        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn controller_options(dir: &Path) -> ControllerOptions {
    ControllerOptions { config_dir: Some(dir.to_path_buf()), kubeconfig: None, push_port: 0, config_poll_ms: Some(CONFIG_POLL_MS) }
}

fn agent_options(controller: &Controller) -> AgentOptions {
    AgentOptions { mtls: true, controller: Some(controller.address()), ebpf_log_level: "info", log: "info", ..AgentOptions::default() }
}

fn check_alive(agent: &Agent, controller: &Controller) {
    if let Some(status) = agent.process.exited() {
        panic!("warren-agent exited ({status}):\n{}", tail(&agent.log(), 30));
    }
    if let Some(status) = controller.process.exited() {
        panic!("warren-controller exited ({status}):\n{}", tail(&controller.log(), 30));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// VirtualService edits after the initial sync: latency and its stages (medians and maxima in `Edits`).
#[derive(Default)]
struct Edits {
    /// Written → seen in the agent's map.
    total: Vec<Duration>,
    /// Written → the controller logged the directory change (poll + re-reading every file).
    read: Vec<Duration>,
    /// → compiled (validation + compile).
    compile: Vec<Duration>,
    /// → the agent's ACK (diff, send, the agent's apply).
    ack: Vec<Duration>,
}

/// One agent syncing against one controller: times and memory.
struct Sync {
    controller_start: Duration,
    /// Agent start → first entry in SERVICE_ROUTES, → all `want` entries.
    first_entry: Duration,
    all_entries: Duration,
    push_version: u64,
    agent_rss: (u64, u64),
    controller_rss: (u64, u64),
    snapshot_bytes: Option<u64>,
    compile_ms: Option<u64>,
    ack_ms: Option<u64>,
    edits: Edits,
}

/// Starts a controller on `dir` and an agent on a new node, waits until the agent's map holds `want`
/// entries, reads memory, then edits a VirtualService on the first service `SCALE_EDITS` times.
fn sync(bed: &Testbed, node_name: &str, dir: &Path, want: usize) -> Sync {
    let node = bed.add_node(node_name).unwrap();
    let started = Instant::now();
    let controller = bed.start_controller(controller_options(dir)).unwrap();
    let controller_start = started.elapsed();
    let forwarder = reach_controller(&node, controller.push_port);

    // Poll the pin from a thread that starts before the agent, so the agent's own start (eBPF load) is in.
    let pin_dir = node.pin_dir();
    let started = Instant::now();
    let poller = std::thread::spawn(move || {
        let mut first = None;
        let mut routes = None;
        loop {
            if routes.is_none() {
                routes = open_routes(&pin_dir);
            }
            if let Some(routes) = &routes {
                let n = count(routes);
                if n > 0 && first.is_none() {
                    first = Some(started.elapsed());
                }
                if n >= want {
                    return Ok((first.unwrap(), started.elapsed()));
                }
            }
            if started.elapsed() > SYNC_TIMEOUT {
                return Err(format!("SERVICE_ROUTES not at {want} entries after {SYNC_TIMEOUT:?}"));
            }
            std::thread::sleep(SYNC_POLL);
        }
    });
    let agent = node.start_agent_with(agent_options(&controller)).unwrap();
    let (first_entry, all_entries) = match poller.join().unwrap() {
        Ok(times) => times,
        Err(e) => panic!("{e}\nagent log:\n{}\ncontroller log:\n{}", tail(&agent.log(), 30), tail(&controller.log(), 30)),
    };
    std::thread::sleep(SETTLE);
    // Memory before /config: serving that JSON would grow the agent.
    let agent_rss = rss_kib(agent.process.pid);
    let controller_rss = rss_kib(controller.process.pid);
    let push_version = agent.config().ok().and_then(|c| c["push"]["version"].as_u64()).unwrap_or_else(|| {
        log_values(&agent.log(), "tables applied", |_| true, "version").last().copied().unwrap_or(0)
    });
    let log = controller.log();
    let node_filter = |l: &str| field(l, "node") == Some(node_name);
    let snapshot_bytes = log_values(&log, "sending update", |l| node_filter(l) && field(l, "full") == Some("true"), "bytes").first().copied();
    let compile_ms = log_values(&log, " compiled ", |_| true, "compile_ms").first().copied();
    let ack_ms = log_values(&log, " ACK ", node_filter, "ms").first().copied();

    // Edits of a VirtualService on the first service, one at a time.
    let routes = open_routes(&node.pin_dir()).unwrap();
    let vip = ServiceKey::new(SocketAddr::new(ip_at(SCALE_VIPS, 1).into(), 80));
    let mut edits = Edits::default();
    for i in 0..SCALE_EDITS {
        let w = weight(i);
        let written_at = now_time();
        replace_file(dir, "20-vs.yaml", &virtual_service("bench", "svc-00000", ("a", "b"), w, i % 2));
        let t0 = Instant::now();
        while !routes.get(&vip, 0).is_ok_and(|r| weights(&r) == [w, 100 - w]) {
            if t0.elapsed() > UPDATE_TIMEOUT {
                panic!(
                    "edit {i} not in the agent's map after {UPDATE_TIMEOUT:?}\nagent log:\n{}\ncontroller log:\n{}",
                    tail(&agent.log(), 20),
                    tail(&controller.log(), 20)
                );
            }
            std::thread::sleep(UPDATE_POLL);
        }
        edits.total.push(t0.elapsed());
        let version = push_version + 1 + i as u64;
        // The ACK is logged after the agent wrote its maps: wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let stage = loop {
            match stages(&controller.log(), version, Some(node_name)) {
                Some(s) if !s.acks.is_empty() => break Some(s),
                _ if Instant::now() > deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        if let Some(s) = stage {
            edits.read.push(span(written_at, s.changed));
            edits.compile.push(span(s.changed, s.compiled));
            edits.ack.push(span(s.compiled, s.acks[0]));
        }
    }
    check_alive(&agent, &controller);
    drop(routes);
    drop(agent);
    drop(controller);
    stop_forwarders(vec![forwarder]);
    Sync {
        controller_start,
        first_entry,
        all_entries,
        push_version,
        agent_rss,
        controller_rss,
        snapshot_bytes,
        compile_ms,
        ack_ms,
        edits,
    }
}

const UPDATE_BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {warren.dev/mesh: enabled}}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 7000}]}\n---\n\
    apiVersion: v1\nkind: Endpoints\nmetadata: {name: reviews, namespace: default}\n\
    subsets: [{ports: [{name: http, port: 7000}], addresses: [{ip: 10.244.0.2}, {ip: 10.244.1.2}]}]\n---\n\
    apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\n\
    spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n";

struct Updates {
    /// Every (agent, update) sample.
    samples: Vec<Duration>,
    /// Per update: until the last agent had it.
    slowest: Vec<Duration>,
    /// Per update, from the controller's log: written → directory change logged, → compiled, → first and
    /// last agent's ACK.
    read: Vec<Duration>,
    compile: Vec<Duration>,
    first_ack: Vec<Duration>,
    last_ack: Vec<Duration>,
}

fn update_latency() -> Updates {
    let bed = Testbed::new("bench-control-update").unwrap();
    let nodes: Vec<_> = (0..NODES).map(|i| bed.add_node(&format!("n{i}")).unwrap()).collect();
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir).unwrap();
    write_file(&dir, "00-base.yaml", UPDATE_BASE);
    let controller = bed.start_controller(controller_options(&dir)).unwrap();
    let forwarders: Vec<_> = nodes.iter().map(|n| reach_controller(n, controller.push_port)).collect();
    let agents: Vec<Agent> = nodes.iter().map(|n| n.start_agent_with(agent_options(&controller)).unwrap()).collect();
    let vip = ServiceKey::new(VIP.parse::<SocketAddr>().unwrap());

    // Every agent routes the service to its own endpoints first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let routes: Vec<Routes> = agents
        .iter()
        .map(|a| loop {
            if let Some(r) = open_routes(&a.pin_dir).filter(|r| r.get(&vip, 0).is_ok_and(|v| subsets(&v) == [(0, 100)])) {
                break r;
            }
            assert!(Instant::now() < deadline, "initial sync not on every agent:\n{}", tail(&a.log(), 30));
            std::thread::sleep(Duration::from_millis(20));
        })
        .collect();
    let initial_version = agents[0].config().unwrap()["push"]["version"].as_u64().unwrap();
    let (v1, v2) = (name_id(b"default/reviews/v1"), name_id(b"default/reviews/v2"));
    let mut samples = Vec::with_capacity(UPDATES * NODES);
    let mut slowest = Vec::with_capacity(UPDATES);
    let mut written = Vec::with_capacity(UPDATES);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..UPDATES {
        // A random phase against the controller's poll: 0–5 ms.
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_micros((seed >> 33) % (CONFIG_POLL_MS * 1000)));
        let w = weight(i);
        let want = [(v1, w), (v2, 100 - w)];
        written.push(now_time());
        replace_file(&dir, "10-vs.yaml", &virtual_service("default", "reviews", ("v1", "v2"), w, i % 2));
        let t0 = Instant::now();
        let mut pending: Vec<usize> = (0..NODES).collect();
        let mut last = Duration::ZERO;
        while !pending.is_empty() {
            pending.retain(|&a| {
                if routes[a].get(&vip, 0).is_ok_and(|r| subsets(&r) == want) {
                    let took = t0.elapsed();
                    samples.push(took);
                    last = last.max(took);
                    false
                } else {
                    true
                }
            });
            if t0.elapsed() > UPDATE_TIMEOUT {
                let a = pending[0];
                panic!(
                    "update {i} (v1 weight {w}) not on agent n{a} after {UPDATE_TIMEOUT:?}\nagent log:\n{}\ncontroller log:\n{}",
                    tail(&agents[a].log(), 20),
                    tail(&controller.log(), 40)
                );
            }
            std::thread::sleep(UPDATE_POLL);
        }
        slowest.push(last);
    }
    for agent in &agents {
        check_alive(agent, &controller);
    }
    // Let the last ACKs reach the controller's log.
    std::thread::sleep(Duration::from_millis(200));
    let log = controller.log();
    let (mut read, mut compile, mut first_ack, mut last_ack) = (vec![], vec![], vec![], vec![]);
    for (i, written_at) in written.iter().enumerate() {
        let Some(s) = stages(&log, initial_version + 1 + i as u64, None) else { continue };
        read.push(span(*written_at, s.changed));
        compile.push(span(s.changed, s.compiled));
        if s.acks.len() == NODES {
            let (first, last) = s.acks.iter().fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
            first_ack.push(span(s.compiled, first));
            last_ack.push(span(s.compiled, last));
        }
    }
    drop(routes);
    drop(agents);
    drop(controller);
    stop_forwarders(forwarders);
    Updates { samples, slowest, read, compile, first_ack, last_ack }
}

fn main() {
    if let Err(reason) = check_privileges() {
        if in_ci() {
            panic!("CI=true, but the control bench cannot run here: {reason}");
        }
        println!("SKIPPED: control bench needs root, BPF, cgroup2 and netns ({reason})");
        return;
    }
    let run_started = Instant::now();

    // 1. Initial sync: baseline (one service) and scale, one testbed, one after the other.
    let (base, scale, yaml_bytes, yaml_write) = {
        let bed = Testbed::new("bench-control-scale").unwrap();
        eprintln!("control bench: baseline sync (1 service)…");
        let base_dir = bed.state_dir().join("config-base");
        write_services(&base_dir, 1);
        let base = sync(&bed, "base", &base_dir, 1);
        let scale_dir = bed.state_dir().join("config-scale");
        let written = Instant::now();
        let yaml_bytes = write_services(&scale_dir, SERVICES);
        let yaml_write = written.elapsed();
        eprintln!("control bench: scale sync ({SERVICES} services, {} endpoints)…", SERVICES * ENDPOINTS_PER_SERVICE);
        let scale = sync(&bed, "scale", &scale_dir, SERVICES);
        (base, scale, yaml_bytes, yaml_write)
    };

    // 2. Update latency across 20 agents.
    eprintln!("control bench: update latency ({NODES} agents, {UPDATES} updates)…");
    let mut updates = update_latency();
    updates.samples.sort();
    updates.slowest.sort();

    let forwarder = if std::env::var("WARREN_BENCH_FORWARDER").is_ok_and(|v| v == "testbed") {
        "the testbed's `reach_host_port` forwarder"
    } else {
        "a TCP_NODELAY forwarder (node netns → host loopback)"
    };
    let mut out = String::new();
    let _ = writeln!(out, "## Control plane: initial sync at scale\n");
    let _ = writeln!(
        out,
        "{SERVICES} Services (one port each) with {} endpoints (Endpoints objects, no pods), {:.1} MiB of YAML in {} \
         files (written in {}); one agent, reaching the controller through {forwarder}; controllers poll their \
         directory every {CONFIG_POLL_MS} ms. Baseline: the same with one Service, in the same run.\n",
        SERVICES * ENDPOINTS_PER_SERVICE,
        yaml_bytes as f64 / (1 << 20) as f64,
        SERVICES.div_ceil(SERVICES_PER_FILE) + 1,
        ms(yaml_write)
    );
    let _ = writeln!(out, "| measurement | {SERVICES} services | baseline (1 service) | ratio |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { String::new() };
    let opt = |v: Option<u64>, unit: &str| v.map(|v| format!("{v} {unit}")).unwrap_or_else(|| "n/a".into());
    let median_max = |v: &[Duration]| if v.is_empty() { "n/a".into() } else { format!("{} / {}", ms(median(v)), ms(max(v))) };
    let rows: Vec<(String, String, String, String)> = vec![
        (
            "controller start (read YAML, compile, serve)".into(),
            ms(scale.controller_start),
            ms(base.controller_start),
            ratio(scale.controller_start.as_secs_f64(), base.controller_start.as_secs_f64()),
        ),
        ("controller compile (its log, `compile_ms`)".into(), opt(scale.compile_ms, "ms"), opt(base.compile_ms, "ms"), String::new()),
        (
            "full snapshot sent to the agent".into(),
            scale.snapshot_bytes.map(|b| format!("{b} B ({:.1} MiB)", b as f64 / (1 << 20) as f64)).unwrap_or_else(|| "n/a".into()),
            opt(base.snapshot_bytes, "B"),
            ratio(scale.snapshot_bytes.unwrap_or(0) as f64, base.snapshot_bytes.unwrap_or(0) as f64),
        ),
        ("agent start → first SERVICE_ROUTES entry".into(), ms(scale.first_entry), ms(base.first_entry), String::new()),
        (
            "**agent start → all SERVICE_ROUTES entries**".into(),
            format!("**{}** ({SERVICES} entries)", ms(scale.all_entries)),
            format!("{} (1 entry)", ms(base.all_entries)),
            ratio(scale.all_entries.as_secs_f64(), base.all_entries.as_secs_f64()),
        ),
        ("controller send → agent ACK, full snapshot (its log)".into(), opt(scale.ack_ms, "ms"), opt(base.ack_ms, "ms"), String::new()),
        ("agent push.version reached".into(), scale.push_version.to_string(), base.push_version.to_string(), String::new()),
        (
            "**agent RSS after sync** (VmRSS)".into(),
            format!("**{}**", mib(scale.agent_rss.0)),
            mib(base.agent_rss.0),
            format!("**{}**", ratio(scale.agent_rss.0 as f64, base.agent_rss.0 as f64)),
        ),
        ("agent peak RSS (VmHWM)".into(), mib(scale.agent_rss.1), mib(base.agent_rss.1), ratio(scale.agent_rss.1 as f64, base.agent_rss.1 as f64)),
        (
            "controller RSS after sync (VmRSS)".into(),
            mib(scale.controller_rss.0),
            mib(base.controller_rss.0),
            ratio(scale.controller_rss.0 as f64, base.controller_rss.0 as f64),
        ),
        (
            "controller peak RSS (VmHWM)".into(),
            mib(scale.controller_rss.1),
            mib(base.controller_rss.1),
            ratio(scale.controller_rss.1 as f64, base.controller_rss.1 as f64),
        ),
        (
            format!("**one VirtualService edit: written → agent map** (median / max of {SCALE_EDITS})"),
            format!("**{}**", median_max(&scale.edits.total)),
            median_max(&base.edits.total),
            ratio(median(&scale.edits.total).as_secs_f64(), median(&base.edits.total).as_secs_f64()),
        ),
        (
            "  … written → directory change logged (poll + re-reading every file)".into(),
            median_max(&scale.edits.read),
            median_max(&base.edits.read),
            String::new(),
        ),
        ("  … → compiled (validate + compile)".into(), median_max(&scale.edits.compile), median_max(&base.edits.compile), String::new()),
        ("  … → agent's ACK (diff, send, agent apply)".into(), median_max(&scale.edits.ack), median_max(&base.edits.ack), String::new()),
    ];
    for (what, a, b, r) in rows {
        let _ = writeln!(out, "| {what} | {a} | {b} | {r} |");
    }

    let _ = writeln!(out, "\n## Control plane: update latency\n");
    let _ = writeln!(
        out,
        "{NODES} agents (one per node, each through {forwarder}), one Service with a DestinationRule; a \
         VirtualService's v1/v2 weights rewritten {UPDATES} times (atomic rename, at a random 0–{CONFIG_POLL_MS} ms \
         phase), each agent's pinned SERVICE_ROUTES entry polled every {} µs until it carries the new weights. \
         Latency = file written → entry in the agent's map; **it includes the controller's directory poll (every \
         {CONFIG_POLL_MS} ms, so ≤ {CONFIG_POLL_MS} ms) and this bench's polling granularity**. Each update reached \
         every agent before the next was written.\n",
        UPDATE_POLL.as_micros()
    );
    let s = &updates.samples;
    let _ = writeln!(out, "| measurement | p50 | p99 | max | samples |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| **written → agent map**, every (agent, update) | **{}** | **{}** | **{}** | {} |",
        ms(percentile(s, 0.5)),
        ms(percentile(s, 0.99)),
        ms(s[s.len() - 1]),
        s.len()
    );
    let w = &updates.slowest;
    let _ = writeln!(
        out,
        "| written → last of {NODES} agents, per update | {} | {} | {} | {} |",
        ms(percentile(w, 0.5)),
        ms(percentile(w, 0.99)),
        ms(w[w.len() - 1]),
        w.len()
    );
    for (what, values) in [
        ("  … written → directory change logged (poll + read)", &mut updates.read),
        ("  … → compiled", &mut updates.compile),
        ("  … → first agent's ACK", &mut updates.first_ack),
        ("  … → last agent's ACK", &mut updates.last_ack),
    ] {
        values.sort();
        if values.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "| {what} (controller log) | {} | {} | {} | {} |",
            ms(percentile(values, 0.5)),
            ms(percentile(values, 0.99)),
            ms(values[values.len() - 1]),
            values.len()
        );
    }
    // Issue 15's targets, at 10k services / 100k endpoints and with 20 agents.
    let snapshot = scale.snapshot_bytes.unwrap_or(u64::MAX);
    let edit_p99 = {
        let mut v = scale.edits.total.clone();
        v.sort();
        if v.is_empty() { Duration::MAX } else { percentile(&v, 0.99) }
    };
    let targets: Vec<(String, String, bool)> = vec![
        (
            "full snapshot at 10k services ≤ 1 MiB".into(),
            format!("{snapshot} B ({:.2} MiB)", snapshot as f64 / (1 << 20) as f64),
            snapshot <= 1 << 20,
        ),
        ("agent RSS at 10k services ≤ 48 MiB".into(), mib(scale.agent_rss.0), scale.agent_rss.0 <= 48 * 1024),
        ("controller RSS at 10k services ≤ 96 MiB".into(), mib(scale.controller_rss.0), scale.controller_rss.0 <= 96 * 1024),
        (
            format!("one edit → every agent's map, p99 ≤ 100 ms ({NODES} agents, 1 service)"),
            ms(percentile(s, 0.99)),
            percentile(s, 0.99) <= Duration::from_millis(100),
        ),
        (
            format!("one edit → the agent's map at 10k services, p99 ≤ 100 ms ({SCALE_EDITS} edits, 1 agent)"),
            ms(edit_p99),
            edit_p99 <= Duration::from_millis(100),
        ),
    ];
    let _ = writeln!(out, "\n## Targets (issue 15)\n");
    let _ = writeln!(out, "| target | measured | |");
    let _ = writeln!(out, "|---|---:|---|");
    for (what, value, met) in &targets {
        let _ = writeln!(out, "| {what} | {value} | {} |", if *met { "met" } else { "**NOT met**" });
    }
    let _ = writeln!(
        out,
        "\nStages come from the controller's log timestamps (µs) against the bench's clock; ACKs are logged when \
         the controller reads them, after the agent wrote its maps.\n\nTotal bench time: {:.0} s.",
        run_started.elapsed().as_secs_f64()
    );

    println!("\n{out}");
    let mut report = xtask::bench::Report::new("control");
    for (path, sync) in [("10k-services", &scale), ("1-service", &base)] {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        report.add(path, "agent_rss", sync.agent_rss.0 as f64 / 1024.0, "MiB");
        report.add(path, "controller_rss", sync.controller_rss.0 as f64 / 1024.0, "MiB");
        report.add(path, "snapshot_bytes", sync.snapshot_bytes.unwrap_or(0) as f64, "B");
        report.add(path, "initial_sync", ms(sync.all_entries), "ms");
        if !sync.edits.total.is_empty() {
            report.add(path, "edit_to_map_p50", ms(median(&sync.edits.total)), "ms");
            report.add(path, "edit_to_map_max", ms(max(&sync.edits.total)), "ms");
        }
    }
    let path = format!("{NODES}-agents");
    report.add(&path, "update_to_map_p50", percentile(s, 0.5).as_secs_f64() * 1000.0, "ms");
    report.add(&path, "update_to_map_p99", percentile(s, 0.99).as_secs_f64() * 1000.0, "ms");
    // The targets' figures under one path.
    report.add("warren", "snapshot_bytes", snapshot as f64, "B");
    report.add("warren", "agent_rss_10k", scale.agent_rss.0 as f64 / 1024.0, "MiB");
    report.add("warren", "controller_rss_10k", scale.controller_rss.0 as f64 / 1024.0, "MiB");
    report.add("warren", "update_p99_20_agents", percentile(s, 0.99).as_secs_f64() * 1000.0, "ms");
    report.add("warren", "edit_p99_10k", edit_p99.as_secs_f64() * 1000.0, "ms");
    report.add("warren", "edit_p50_10k", median(&scale.edits.total).as_secs_f64() * 1000.0, "ms");
    report.add("warren", "edit_p50_1", median(&base.edits.total).as_secs_f64() * 1000.0, "ms");
    report.add("warren", "targets_met", targets.iter().filter(|t| t.2).count() as f64, "of 5");
    match report.write() {
        Ok(file) => eprintln!("control bench: rows written to {}", file.display()),
        Err(e) => eprintln!("control bench: {e:#}"),
    }
    let path = xtask::workspace_root().join("target").join("bench-control.md");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("control bench: results written to {}", path.display()),
        Err(e) => eprintln!("control bench: writing {}: {e}", path.display()),
    }
}
