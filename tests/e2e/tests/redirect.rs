//! Outbound redirect: an enrolled pod's TCP connects go through warren-agent and arrive byte-exact; a pod
//! that is not enrolled is left alone.
use warren_testbed::{ECHO_PORT, HTTP_PORT, Testbed, bin_path, require_privileges};

const MIB: usize = 1 << 20;

fn opened(agent: &warren_testbed::Agent) -> f64 {
    agent.metric("warren_tcp_connections_opened_total", &[("direction", "outbound")]).unwrap()
}

#[test]
fn enrolled_pod_traffic_passes_through_the_agent_byte_exact() {
    require_privileges!();
    let bed = Testbed::new("redirect").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let enrolled = node.add_pod("a", true).unwrap();
    let server = node.add_pod("b", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();

    let result = enrolled.send(server.socket(ECHO_PORT), 4 * MIB).unwrap();
    assert!(result.ok, "echo through the agent: {result:?}");
    assert_eq!(result.received, 4 * MIB as u64);

    assert_eq!(opened(&agent), 1.0, "exactly one connection went through the agent");
    let sent = agent.metric("warren_tcp_sent_bytes_total", &[("direction", "outbound")]).unwrap();
    let received = agent.metric("warren_tcp_received_bytes_total", &[("direction", "outbound")]).unwrap();
    assert_eq!((sent, received), ((4 * MIB) as f64, (4 * MIB) as f64), "agent byte counters");

    // The agent recovered the destination the client dialed, from the eBPF map.
    let connections = agent.connections().unwrap();
    let closed = connections["recently_closed"].as_array().unwrap();
    assert_eq!(closed.len(), 1, "{connections:#}");
    assert_eq!(closed[0]["original_dst"], server.socket(ECHO_PORT).to_string());
    assert_eq!(closed[0]["pod"], "default/a");
    assert_eq!(closed[0]["error"], serde_json::Value::Null);

    // The eBPF side's own log line (aya-log) reached the agent's log.
    let dialed = format!("dialed {}:{ECHO_PORT}, redirected to 127.0.0.1:15001", server.ip);
    agent.process.wait_for(std::time::Duration::from_secs(5), |_, log| log.contains(&dialed)).unwrap();
    assert_eq!(agent.metric("warren_ebpf_events_total", &[("event", "connect4_redirected")]).unwrap(), 1.0);
}

#[test]
fn upstream_leaves_from_the_pods_own_address() {
    require_privileges!();
    let bed = Testbed::new("source-address").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let enrolled = node.add_pod("a", true).unwrap();
    let server = node.add_pod("b", false).unwrap();
    server.serve("v7").unwrap();
    let _agent = node.start_agent().unwrap();

    let mut get = std::process::Command::new(bin_path("warren-testapp").unwrap());
    get.args(["http-get", "--to", &server.socket(HTTP_PORT).to_string()]);
    let out = enrolled.run(get).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["version"], "v7");
    let client = reply["client"].as_str().unwrap();
    assert!(client.starts_with(&format!("{}:", enrolled.ip)), "server saw {client}, want the pod's own IP");
}

#[test]
fn pod_that_is_not_enrolled_is_not_redirected() {
    require_privileges!();
    let bed = Testbed::new("not-enrolled").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let enrolled = node.add_pod("a", true).unwrap();
    let outsider = node.add_pod("c", false).unwrap();
    let server = node.add_pod("b", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();

    let direct = outsider.send(server.socket(ECHO_PORT), MIB).unwrap();
    assert!(direct.ok, "{direct:?}");
    assert_eq!(direct.peer.as_deref(), Some(server.socket(ECHO_PORT).to_string().as_str()));
    assert_eq!(opened(&agent), 0.0, "the agent saw a connection of a pod that is not enrolled");
    assert_eq!(agent.metric("warren_ebpf_events_total", &[("event", "connect4_redirected")]).unwrap(), 0.0);

    // Same server, enrolled client: now it is redirected (the control for the assertion above).
    let redirected = enrolled.send(server.socket(ECHO_PORT), MIB).unwrap();
    assert!(redirected.ok, "{redirected:?}");
    assert_eq!(redirected.peer.as_deref(), Some("127.0.0.1:15001"), "connect4 rewrote the destination");
    assert_eq!(opened(&agent), 1.0);
}

#[test]
fn enrolled_pod_reaches_a_pod_on_another_node() {
    require_privileges!();
    let bed = Testbed::new("cross-node").unwrap();
    let (node1, node2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
    let client = node1.add_pod("a", true).unwrap();
    let server = node2.add_pod("b", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node1.start_agent().unwrap();

    let result = client.send(server.socket(ECHO_PORT), 2 * MIB).unwrap();
    assert!(result.ok, "{result:?}");
    assert_eq!(opened(&agent), 1.0);
    let connections = agent.connections().unwrap();
    assert_eq!(connections["recently_closed"][0]["original_dst"], server.socket(ECHO_PORT).to_string());
}
