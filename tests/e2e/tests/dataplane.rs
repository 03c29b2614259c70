//! The data plane on real eBPF: outbound redirect and inbound capture between enrolled and other pods,
//! on one node and across nodes, IPv4 and IPv6; live enrollment; 1000 concurrent connections; agent
//! restart over pinned state; socket acceleration.
use std::{
    net::SocketAddr,
    thread::sleep,
    time::{Duration, Instant},
};

use warren_e2e::{CpuHogs, directory_mesh, namespace_yaml, pod_yaml};
use warren_testbed::{Agent, AgentOptions, ECHO_PORT, Pod, Testbed, now_ms, require_privileges};

const MIB: usize = 1 << 20;

fn count(agent: &Agent, direction: &str) -> u64 {
    agent.metric("warren_tcp_connections_opened_total", &[("direction", direction)]).unwrap() as u64
}

/// (outbound, inbound) connections an agent has proxied.
fn flows(agent: &Agent) -> (u64, u64) {
    (count(agent, "outbound"), count(agent, "inbound"))
}

fn ebpf_event(agent: &Agent, event: &str) -> u64 {
    agent.metric("warren_ebpf_events_total", &[("event", event)]).unwrap() as u64
}

fn echo(pod: &Pod, ipv6: bool) -> SocketAddr {
    if ipv6 { pod.socket6(ECHO_PORT) } else { pod.socket(ECHO_PORT) }
}

fn assert_byte_exact(from: &Pod, to: SocketAddr, bytes: usize) {
    let result = from.send(to, bytes).unwrap();
    assert!(result.ok, "{} → {to}: {result:?}", from.name);
    assert_eq!(result.received, bytes as u64);
}

/// A, B enrolled on node 1; D enrolled on node 2; C on node 1 not enrolled. Each flow must arrive
/// byte-exact, and each agent must have proxied exactly the enrolled ends of it.
fn enrolled_and_other_pods(ipv6: bool) {
    let bed = Testbed::new(if ipv6 { "flows-v6" } else { "flows-v4" }).unwrap();
    let (node1, node2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
    let a = node1.add_pod("a", true).unwrap();
    let b = node1.add_pod("b", true).unwrap();
    let c = node1.add_pod("c", false).unwrap();
    let d = node2.add_pod("d", true).unwrap();
    for pod in [&a, &b, &c, &d] {
        pod.serve("v1").unwrap();
    }
    let agent1 = node1.start_agent().unwrap();
    let agent2 = node2.start_agent().unwrap();

    // A → B, same node: out of A and into B, both through node 1's agent.
    assert_byte_exact(&a, echo(&b, ipv6), 2 * MIB);
    assert_eq!((flows(&agent1), flows(&agent2)), ((1, 1), (0, 0)), "A → B");

    // A → D, other node: out through node 1's agent, in through node 2's.
    assert_byte_exact(&a, echo(&d, ipv6), 2 * MIB);
    assert_eq!((flows(&agent1), flows(&agent2)), ((2, 1), (0, 1)), "A → D");

    // A → C (not enrolled): only the outbound end is meshed.
    assert_byte_exact(&a, echo(&c, ipv6), MIB);
    assert_eq!((flows(&agent1), flows(&agent2)), ((3, 1), (0, 1)), "A → C");

    // C → A: only the inbound end is meshed.
    assert_byte_exact(&c, echo(&a, ipv6), MIB);
    assert_eq!((flows(&agent1), flows(&agent2)), ((3, 2), (0, 1)), "C → A");

    // The agent saw the right destinations: the inbound original destination is A's own address.
    let connections = agent1.connections().unwrap();
    let last_inbound = connections["recently_closed"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c["direction"] == "inbound")
        .unwrap()
        .clone();
    assert_eq!(last_inbound["original_dst"], echo(&a, ipv6).to_string());
    assert_eq!(last_inbound["pod"], "default/a");
    assert_eq!(last_inbound["sent_bytes"], MIB as u64);
    let redirected = if ipv6 { "connect6_redirected" } else { "connect4_redirected" };
    assert_eq!(ebpf_event(&agent1, redirected), 3, "A's three outbound connects");
    assert_eq!(ebpf_event(&agent1, "inbound_captured") + ebpf_event(&agent2, "inbound_captured"), 3);
}

#[test]
fn enrolled_and_other_pods_ipv4() {
    require_privileges!();
    enrolled_and_other_pods(false);
}

#[test]
fn enrolled_and_other_pods_ipv6() {
    require_privileges!();
    enrolled_and_other_pods(true);
}

#[test]
fn enroll_and_unenroll_a_running_pod_while_it_connects() {
    require_privileges!();
    let bed = Testbed::new("live-enroll").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("client", false).unwrap();
    let server = node.add_pod("server", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();
    let target = server.socket(ECHO_PORT);

    let client_loop = client.connect_loop(target, 10, 3000).unwrap();
    sleep(Duration::from_millis(700));
    let enroll_asked = now_ms();
    node.set_enrolled(&client, true).unwrap();
    agent.wait_enrolled(&client, true, Duration::from_secs(5)).unwrap();
    let enrolled = now_ms();
    sleep(Duration::from_millis(1000));
    let unenroll_asked = now_ms();
    node.set_enrolled(&client, false).unwrap();
    agent.wait_enrolled(&client, false, Duration::from_secs(5)).unwrap();
    let unenrolled = now_ms();
    let attempts = client_loop.attempts().unwrap();

    assert!(attempts.len() > 100, "{} attempts", attempts.len());
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let via_agent = |a: &&warren_testbed::Attempt| a.peer.as_deref() == Some("127.0.0.1:15001");
    let direct = |a: &&warren_testbed::Attempt| a.peer.as_deref() == Some(target.to_string().as_str());
    // Around the agent before enrollment and after un-enrollment, through it in between.
    assert!(attempts.iter().filter(|a| a.at_ms < enroll_asked).all(|a| direct(&a)));
    let between: Vec<_> = attempts.iter().filter(|a| a.at_ms > enrolled && a.at_ms < unenroll_asked).collect();
    assert!(between.len() > 20 && between.iter().all(via_agent), "{between:?}");
    assert!(attempts.iter().filter(|a| a.at_ms > unenrolled + 50).all(|a| direct(&a)));
    let through_agent = attempts.iter().filter(via_agent).count() as u64;
    assert_eq!(count(&agent, "outbound"), through_agent, "the agent carried exactly the enrolled flows");
}

/// A cgroup v1 kubelet on a hybrid host (as this machine's local node runs one) names its pods only in
/// cgroup v1 hierarchies and leaves all of them in one cgroup v2 group. Enrollment keyed by network
/// namespace still takes exactly the enrolled pods: inbound to an enrolled server is captured while its
/// neighbour in the same v2 group connects around the agent, and a running client is enrolled and
/// un-enrolled live, its connections never failing.
#[test]
fn pods_of_a_cgroup_v1_kubelet_are_enrolled_by_their_network_namespace() {
    require_privileges!();
    let bed = Testbed::new("v1-kubelet").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod_v1_kubelet("client", false).unwrap();
    let neighbour = node.add_pod_v1_kubelet("neighbour", false).unwrap();
    let server = node.add_pod_v1_kubelet("server", true).unwrap();
    assert_eq!(client.cgroup, server.cgroup, "the node's pods share one cgroup v2 group");
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();
    agent.wait_enrolled(&server, true, Duration::from_secs(5)).unwrap();
    let target = server.socket(ECHO_PORT);

    // The neighbour, in the server's v2 group but not enrolled: not redirected, yet captured inbound.
    let direct = neighbour.send(target, 64 * 1024).unwrap();
    assert!(direct.ok, "{direct:?}");
    assert_eq!(direct.peer.as_deref(), Some(target.to_string().as_str()), "the neighbour dialed directly");
    assert_eq!(flows(&agent), (0, 1), "inbound to the enrolled server only");

    let client_loop = client.connect_loop(target, 10, 2500).unwrap();
    sleep(Duration::from_millis(500));
    let enroll_asked = now_ms();
    node.set_enrolled(&client, true).unwrap();
    agent.wait_enrolled(&client, true, Duration::from_secs(5)).unwrap();
    let enrolled = now_ms();
    sleep(Duration::from_millis(800));
    let unenroll_asked = now_ms();
    node.set_enrolled(&client, false).unwrap();
    agent.wait_enrolled(&client, false, Duration::from_secs(5)).unwrap();
    let unenrolled = now_ms();
    let attempts = client_loop.attempts().unwrap();

    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let via_agent = |a: &&warren_testbed::Attempt| a.peer.as_deref() == Some("127.0.0.1:15001");
    assert!(attempts.iter().filter(|a| a.at_ms < enroll_asked).all(|a| !via_agent(&a)), "redirected before enrollment");
    let between: Vec<_> = attempts.iter().filter(|a| a.at_ms > enrolled && a.at_ms < unenroll_asked).collect();
    assert!(between.len() > 20 && between.iter().all(via_agent), "not redirected while enrolled: {between:?}");
    assert!(attempts.iter().filter(|a| a.at_ms > unenrolled + 50).all(|a| !via_agent(&a)), "redirected after");
    let through_agent = attempts.iter().filter(via_agent).count() as u64;
    assert_eq!(count(&agent, "outbound"), through_agent, "the agent carried exactly the enrolled client's flows");

    // And the neighbour still goes around the agent.
    let outbound_before = count(&agent, "outbound");
    assert!(neighbour.send(target, 1024).unwrap().ok);
    assert_eq!(count(&agent, "outbound"), outbound_before, "the neighbour was redirected");
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// 1000 connections open at once through one agent (socket acceleration on, the default), 16 KiB echoed on
/// each, byte-exact; then everything they held is released.
fn a_thousand_concurrent_connections(name: &str, cpu_hogs: usize) {
    let bed = Testbed::new(name).unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("client", true).unwrap();
    let server = node.add_pod("server", true).unwrap();
    let echo_server = server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();
    let pid = agent.process.pid;

    // Warm up (lazy allocations, thread pools), then take the baseline.
    assert_byte_exact(&client, server.socket(ECHO_PORT), 64 * 1024);
    sleep(Duration::from_millis(300));
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));

    let hogs = CpuHogs::start(cpu_hogs).unwrap();
    let result = client.send_concurrently(server.socket(ECHO_PORT), 16 * 1024, 1000).unwrap();
    drop(hogs);
    let warnings: Vec<String> = agent.log().lines().filter(|l| l.contains("WARN")).map(String::from).collect();
    assert_eq!(
        result["ok"],
        true,
        "{result:#}\nagent warnings:\n{}\nserver: {}",
        warnings.join("\n"),
        echo_server.stderr()
    );
    assert_eq!(result["received"], 16 * 1024 * 1000);
    assert_eq!(flows(&agent), (1001, 1001));
    // Both local legs of every connection were accelerated (client ↔ agent, agent ↔ server: 4 sockets).
    let (sockets, redirected) = (ebpf_event(&agent, "accelerated_socket"), ebpf_event(&agent, "sk_msg_redirected"));
    eprintln!(
        "accelerated sockets {sockets}, messages redirected {redirected}, passed {}; the client retried {} spurious EAGAINs",
        ebpf_event(&agent, "sk_msg_passed"),
        result["spurious_eagain"]
    );
    assert_eq!(sockets, 4 * 1001, "accelerated sockets");
    assert!(redirected > 0, "no message was redirected");

    // Everything the connections held is released (RSS within 2 MiB of the baseline).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active = agent.metric("warren_tcp_active_connections", &[]).unwrap();
        let (fds, rss) = (fd_count(pid), rss_kib(pid));
        if active == 0.0 && fds == fds_before && rss <= rss_before + 2048 {
            eprintln!("agent fds {fds_before} → {fds}, RSS {rss_before} KiB → {rss} KiB");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back to baseline: active {active}, fds {fds_before} → {fds}, RSS {rss_before} KiB → {rss} KiB"
        );
        sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thousand_concurrent_connections_through_the_agent() {
    require_privileges!();
    a_thousand_concurrent_connections("thousand", 0);
}

/// The load under which the kernel's sockmap once reset a few percent of accelerated connections (the
/// passive end joining the map after the active end had sent; docs/architecture.md): 20 runs in a row
/// pass now (issue 15), where about one in five failed before.
#[test]
fn a_thousand_concurrent_connections_with_three_cpu_hogs() {
    require_privileges!();
    a_thousand_concurrent_connections("thousand-hogs", 3);
}

#[test]
fn agent_restart_keeps_redirecting_and_recovers_within_a_second() {
    require_privileges!();
    let bed = Testbed::new("restart").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("client", true).unwrap();
    let server = node.add_pod("server", false).unwrap();
    server.serve("v1").unwrap();
    let first = node.start_agent().unwrap();

    let client_loop = client.connect_loop(server.socket(ECHO_PORT), 10, 3500).unwrap();
    sleep(Duration::from_millis(800));
    first.stop();
    let stopped = now_ms();
    sleep(Duration::from_millis(400));
    let second = node.start_agent().unwrap();
    let ready = now_ms();
    let attempts = client_loop.attempts().unwrap();

    let before: Vec<_> = attempts.iter().filter(|a| a.at_ms < stopped - 100).collect();
    assert!(!before.is_empty() && before.iter().all(|a| a.ok), "before the restart: {before:?}");
    let after: Vec<_> = attempts.iter().filter(|a| a.at_ms > ready + 1000).collect();
    assert!(after.len() > 20, "{} attempts after recovery", after.len());
    assert!(after.iter().all(|a| a.ok && a.peer.as_deref() == Some("127.0.0.1:15001")), "after recovery: {after:?}");
    // The pinned programs kept redirecting while no agent ran: every connect of the client — the ones
    // during the gap included — was redirected, counted in the pinned map both agents shared.
    let gap = attempts.iter().filter(|a| a.at_ms > stopped && a.at_ms < ready).count();
    assert!(gap > 0, "no attempts while the agent was down");
    assert_eq!(ebpf_event(&second, "connect4_redirected") as usize, attempts.len());
}

/// Bytes through the agent with sockops/sk_msg on and off; the counters prove which path carried them.
#[test]
fn socket_acceleration_carries_the_local_legs_and_can_be_turned_off() {
    require_privileges!();
    for accelerate in [true, false] {
        let bed = Testbed::new("sockmap").unwrap();
        let node = bed.add_node("node-1").unwrap();
        let client = node.add_pod("client", true).unwrap();
        let server = node.add_pod("server", true).unwrap();
        server.serve("v1").unwrap();
        let agent = node
            .start_agent_with(AgentOptions { socket_acceleration: accelerate, ..AgentOptions::default() })
            .unwrap();
        assert_byte_exact(&client, server.socket(ECHO_PORT), 8 * MIB);
        assert_byte_exact(&client, server.socket6(ECHO_PORT), 2 * MIB);
        let (sockets, messages) = (ebpf_event(&agent, "accelerated_socket"), ebpf_event(&agent, "sk_msg_redirected"));
        if accelerate {
            // Per connection: both ends of the outbound leg and of the inbound leg.
            assert_eq!(sockets, 8, "accelerated sockets");
            assert!(messages > 0, "sk_msg redirected nothing");
            // Both legs redirect both ways: were one leg's ends keyed apart (the server's `[::]` listener
            // holds a v4-mapped AF_INET6 socket, the agent's end is AF_INET), its messages would all take
            // the normal path — as many as the legs that work. (A handshake race may leave one direction
            // of one leg on it: a quarter of a connection's messages at most.)
            let passed = ebpf_event(&agent, "sk_msg_passed");
            assert!(passed * 2 < messages, "{passed} messages took the normal path, {messages} were redirected");
        } else {
            assert_eq!((sockets, messages), (0, 0), "acceleration was off");
        }
    }
}

/// The pod label `warren.dev/socket-acceleration=false` keeps a pod's sockets out of acceleration (for
/// workloads that read and write one socket from two threads with blocking I/O; docs/architecture.md):
/// its connections are proxied as before, only the other pod's leg joins `LOCAL_SOCKETS`. The control is
/// the same client without the label.
#[test]
fn a_pod_labelled_out_of_socket_acceleration_keeps_plain_sockets() -> anyhow::Result<()> {
    require_privileges!(Ok(()));
    let bed = Testbed::new("sockmap-optout")?;
    let node = bed.add_node("node-1")?;
    let (plain, fast, server) = (node.add_pod("plain", true)?, node.add_pod("fast", true)?, node.add_pod("server", true)?);
    let _serving = server.serve("v1")?;
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let pods = pod_yaml(&plain, "node-1", "app: plain, warren.dev/socket-acceleration: \"false\"")
        + &pod_yaml(&fast, "node-1", "app: fast")
        + &pod_yaml(&server, "node-1", "app: server");
    std::fs::write(dir.join("00-mesh.yaml"), format!("{}{pods}", namespace_yaml("default")))?;
    let (_controller, agents) = directory_mesh(&bed, &dir, &[&node])?;
    let agent = &agents[0];
    for pod in [&plain, &fast, &server] {
        agent.wait_enrolled(pod, true, Duration::from_secs(15))?;
    }
    let accelerated = || ebpf_event(agent, "accelerated_socket");
    let before = accelerated();
    assert_byte_exact(&plain, server.socket(ECHO_PORT), MIB);
    assert_eq!(accelerated() - before, 2, "only the server's leg (agent ↔ server) joins the map");
    let before = accelerated();
    assert_byte_exact(&fast, server.socket(ECHO_PORT), MIB);
    assert_eq!(accelerated() - before, 4, "the unlabelled client's leg joins it too");
    Ok(())
}

/// SIGTERM: the agent stops accepting but lets a connection in flight finish (within the drain timeout).
#[test]
fn sigterm_drains_open_connections() {
    require_privileges!();
    let bed = Testbed::new("drain").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("client", true).unwrap();
    let server = node.add_pod("server", false).unwrap();
    server.serve("v1").unwrap();
    // Generous drain timeout: the transfer below must finish inside it even on a loaded machine.
    let agent = node.start_agent_with(AgentOptions { drain_timeout_seconds: 60, ..AgentOptions::default() }).unwrap();

    // A connection that stays open for a while: a large exchange from another thread.
    let target = server.socket(ECHO_PORT);
    let long = std::thread::spawn({
        let client = client.clone();
        move || client.send(target, 128 * MIB)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric("warren_tcp_active_connections", &[]).unwrap() < 1.0 {
        assert!(Instant::now() < deadline, "the long connection never became active");
        sleep(Duration::from_millis(10));
    }
    agent.process.signal(libc::SIGTERM);
    sleep(Duration::from_millis(200));
    // New connections are refused while draining...
    let refused = client.send(target, 1024).unwrap();
    assert!(!refused.ok, "a new connection was accepted during drain: {refused:?}");
    // ...while the one in flight completes byte-exact, and then the agent exits cleanly.
    let result = long.join().unwrap().unwrap();
    assert!(result.ok, "{result:?}");
    let status = agent.process.wait_exit(Duration::from_secs(10)).expect("agent exited after draining");
    assert!(status.success(), "{status}");
    assert!(agent.log().contains("drained; exiting open_connections=0"), "{}", agent.log());
}
