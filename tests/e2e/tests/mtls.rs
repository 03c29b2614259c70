//! HBONE between agents: traffic between enrolled pods on different nodes is mutual TLS on the wire, and
//! each side knows the other's SPIFFE identity.
use warren_testbed::{AgentOptions, ECHO_PORT, Testbed, require_privileges, testapp_payload};

const MIB: usize = 1 << 20;

/// How many of 32 short runs of the payload, spread over it, appear verbatim in `wire`.
fn plaintext_runs(wire: &[u8], payload: &[u8]) -> usize {
    (0..32)
        .map(|i| &payload[i * payload.len() / 32..][..32])
        .filter(|run| wire.windows(run.len()).any(|w| w == *run))
        .count()
}

#[test]
fn enrolled_pods_talk_mtls_across_nodes_and_know_each_other() {
    require_privileges!();
    let bed = Testbed::new("mtls").unwrap();
    let (node1, node2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
    let a = node1.add_pod("a", true).unwrap();
    let c = node1.add_pod("c", false).unwrap();
    let b = node2.add_pod("b", true).unwrap();
    b.serve("v1").unwrap();
    let mtls = || AgentOptions { mtls: true, ..AgentOptions::default() };
    let agent1 = node1.start_agent_with(mtls()).unwrap();
    let agent2 = node2.start_agent_with(mtls()).unwrap();
    // What testapp sends: no part of it may appear in clear between the nodes.
    let payload = testapp_payload(MIB);

    let capture = bed.capture_fabric().unwrap();
    let result = a.send(b.socket(ECHO_PORT), MIB).unwrap();
    let wire = capture.stop();
    assert!(result.ok, "{result:?}");
    assert!(wire.len() > MIB, "the capture saw the transfer ({} bytes)", wire.len());
    assert_eq!(plaintext_runs(&wire, &payload), 0, "plaintext payload between the nodes");

    let outbound = &agent1.connections().unwrap()["recently_closed"][0];
    assert_eq!(outbound["protocol"], "hbone");
    assert_eq!(outbound["peer_identity"], "spiffe://cluster.local/ns/default/sa/b", "{outbound:#}");
    let inbound = &agent2.connections().unwrap()["recently_closed"][0];
    assert_eq!(inbound["protocol"], "hbone");
    assert_eq!(inbound["peer_identity"], "spiffe://cluster.local/ns/default/sa/a", "B's side knows A's identity: {inbound:#}");
    assert_eq!(inbound["original_dst"], b.socket(ECHO_PORT).to_string());
    assert_eq!(inbound["sent_bytes"], MIB as u64);

    // Control: C is not enrolled, so its bytes travel in clear (PERMISSIVE) — and the capture sees them.
    let capture = bed.capture_fabric().unwrap();
    let plain = c.send(b.socket(ECHO_PORT), MIB).unwrap();
    let wire = capture.stop();
    assert!(plain.ok, "{plain:?}");
    let seen = plaintext_runs(&wire, &payload);
    assert!(seen >= 16, "the capture must see a plaintext flow ({seen} of 32 runs)");
    let inbound = &agent2.connections().unwrap()["recently_closed"][1];
    assert_eq!((inbound["protocol"].as_str(), &inbound["peer_identity"]), (Some("tcp"), &serde_json::Value::Null));

    // The certificates the agents hold: one per local enrolled identity.
    let certificates: serde_json::Value = serde_json::from_str(&agent2.get("/certificates").unwrap()).unwrap();
    assert_eq!(certificates[0]["identity"], "spiffe://cluster.local/ns/default/sa/b", "{certificates:#}");
}
