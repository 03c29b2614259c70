//! AuthorizationPolicy in the kernel for plaintext inbound connections, on real pods: an `L4_AUTHZ` entry
//! denying a source prefix makes sk_lookup refuse clients inside it (they see "connection refused") while
//! clients outside it — and the same client once the entry is gone — reach the pod through the agent.
//! The agent's eBPF counter and the `AUTHZ_DENIALS` record (client, destination, decision id), which the
//! agent turns into its denial log line and `warren_authz_decisions_total`, show the refusal happened in the
//! kernel, not in the agent's proxy (which never sees the connection).
//!
//! The entries are written straight into the pinned trie: nothing in this agent (no controller) syncs
//! L4_AUTHZ, so they stay as written.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::maps::{LpmTrie, Map, MapData};
use warren_maps::{AUTHZ_DENY, AuthzEntryKey, AuthzTarget, AuthzVerdict, names};
use warren_testbed::{Agent, ECHO_PORT, Pod, Testbed, require_privileges};

type Trie = LpmTrie<MapData, AuthzTarget, AuthzVerdict>;

fn trie(pin_dir: &Path) -> Trie {
    let data = MapData::from_pin(pin_dir.join(names::L4_AUTHZ)).expect("pinned L4_AUTHZ");
    LpmTrie::try_from(Map::LpmTrie(data)).unwrap()
}

/// The agent's denial log lines, once at least one is there (or `wait` passed).
fn denial_lines(agent: &Agent, wait: Duration) -> Vec<String> {
    let lines = || -> Vec<String> {
        agent.log().lines().filter(|l| l.contains("connection denied by AuthorizationPolicy")).map(String::from).collect()
    };
    warren_e2e::eventually(wait, || Some(lines()).filter(|l| !l.is_empty())).unwrap_or_else(lines)
}

/// `warren-agent inspect maps` (reads the pinned maps).
fn inspect_maps(agent: &Agent) -> String {
    let out = agent.inspect(&["maps"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inbound_denied(agent: &Agent) -> u64 {
    agent.metric("warren_ebpf_events_total", &[("event", "inbound_denied")]).unwrap() as u64
}

fn inbound_opened(agent: &Agent) -> u64 {
    agent.metric("warren_tcp_connections_opened_total", &[("direction", "inbound")]).unwrap() as u64
}

fn refused(from: &Pod, to: SocketAddr) -> bool {
    let result = from.send(to, 1024).unwrap();
    assert!(!result.ok, "{} → {to} should be refused: {result:?}", from.name);
    result.error.as_deref().unwrap_or("").contains("refused")
}

fn connects(from: &Pod, to: SocketAddr) -> bool {
    from.send(to, 64 << 10).unwrap().ok
}

/// `inside` (node 1, 10.244.0.x) and `outside` (node 2, 10.244.1.x), neither enrolled, connect to the
/// enrolled `server` on node 1, whose entry denies node 1's pod range 10.244.0.0/24 (fd00:10:244::/64).
fn source_prefix_deny(ipv6: bool) {
    let bed = Testbed::new(if ipv6 { "kauthz-v6" } else { "kauthz-v4" }).unwrap();
    let (node1, node2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
    let server = node1.add_pod("server", true).unwrap();
    let inside = node1.add_pod("inside", false).unwrap();
    let outside = node2.add_pod("outside", false).unwrap();
    let _echo = server.serve("v1").unwrap();
    let agent = node1.start_agent().unwrap();
    agent.wait_enrolled(&server, true, Duration::from_secs(10)).unwrap();
    let to = if ipv6 { server.socket6(ECHO_PORT) } else { server.socket(ECHO_PORT) };
    let (inside_ip, outside_ip): (IpAddr, IpAddr) =
        if ipv6 { (inside.ip6.into(), outside.ip6.into()) } else { (inside.ip.into(), outside.ip.into()) };
    // The inside pod's node's pod range (the key masks the address to the prefix).
    let len = if ipv6 { 64 } else { 24 };
    let key = AuthzEntryKey::new(to.ip(), to.port(), inside_ip, len).unwrap();
    let (prefix, _) = key.src();

    // Before any entry: both reach the pod through the agent's inbound capture.
    assert!(connects(&inside, to) && connects(&outside, to));
    assert_eq!((inbound_opened(&agent), inbound_denied(&agent)), (2, 0));

    let mut trie = trie(&agent.pin_dir);
    trie.insert(&key.trie_key(), AuthzVerdict { verdict: AUTHZ_DENY, decision_id: 0xa11c }, 0).unwrap();
    let maps = inspect_maps(&agent);
    let row = maps.lines().find(|l| l.starts_with(&to.ip().to_string())).unwrap_or_else(|| panic!("no L4_AUTHZ row:\n{maps}"));
    let want = [to.ip().to_string(), ECHO_PORT.to_string(), format!("{prefix}/{len}"), "deny".into(), 0xa11c.to_string()];
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), want.iter().map(String::as_str).collect::<Vec<_>>(), "{maps}");

    // Inside the prefix: refused by sk_lookup — counted and reported by the kernel; the proxy never saw it.
    assert!(refused(&inside, to));
    assert_eq!(inbound_denied(&agent), 1);
    assert_eq!(inbound_opened(&agent), 2, "a refused connection must not reach the agent");
    let line = denial_lines(&agent, Duration::from_secs(2));
    assert_eq!(line.len(), 1, "one denial line: {line:?}");
    let client = if ipv6 { format!("client=[{inside_ip}]:") } else { format!("client={inside_ip}:") };
    assert!(line[0].contains(&client) && line[0].contains(&format!("destination={to}")), "{}", line[0]);
    assert!(line[0].contains("kernel") && line[0].contains(&format!("decision_id={}", 0xa11c)), "{}", line[0]);
    assert_eq!(agent.metric("warren_authz_decisions_total", &[("decision", "deny")]).unwrap(), 1.0);

    // Control: outside the prefix, captured as before; nothing more is denied.
    assert!(connects(&outside, to), "outside {outside_ip} is not in {prefix}/{len}");
    assert_eq!((inbound_opened(&agent), inbound_denied(&agent)), (3, 1));
    assert_eq!(denial_lines(&agent, Duration::from_millis(100)).len(), 1, "no new denial");

    // Control: the same client, once the entry is removed.
    trie.remove(&key.trie_key()).unwrap();
    assert!(connects(&inside, to));
    assert_eq!((inbound_opened(&agent), inbound_denied(&agent)), (4, 1));
    let maps = inspect_maps(&agent);
    assert!(!maps.lines().any(|l| l.starts_with(&to.ip().to_string())), "entry still listed:\n{maps}");
    assert!(maps.contains("denial_events_lost"), "{maps}");
}

#[test]
fn sk_lookup_refuses_a_denied_source_prefix_ipv4() {
    require_privileges!();
    source_prefix_deny(false);
}

#[test]
fn sk_lookup_refuses_a_denied_source_prefix_ipv6() {
    require_privileges!();
    source_prefix_deny(true);
}
