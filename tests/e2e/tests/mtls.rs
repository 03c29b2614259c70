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

/// PeerAuthentication: STRICT refuses plaintext into an enrolled pod, PERMISSIVE (the default) accepts it,
/// and enrolled peers still get in over HBONE under STRICT. Applied live, as users' Istio YAML.
#[test]
fn peer_authentication_strict_refuses_plaintext_permissive_accepts() {
    require_privileges!();
    let bed = Testbed::new("peer-authn").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let server = node.add_pod("reviews", true).unwrap();
    let outsider = node.add_pod("legacy", false).unwrap();
    let member = node.add_pod("productpage", true).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent_with(AgentOptions { mtls: true, ..AgentOptions::default() }).unwrap();
    let target = server.socket(ECHO_PORT);

    // Default PERMISSIVE: plaintext from a pod outside the mesh gets in.
    assert!(outsider.send(target, 64 * 1024).unwrap().ok, "PERMISSIVE accepts plaintext");

    bed.apply_peer_authentication(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\n\
         spec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let refused = outsider.send(target, 64 * 1024).unwrap();
        if !refused.ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "STRICT never took effect");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(agent.metric("warren_inbound_plaintext_refused_total", &[]).unwrap() >= 1.0);
    // A mesh member still gets in: over HBONE, with its identity.
    assert!(member.send(target, 64 * 1024).unwrap().ok, "mTLS is accepted under STRICT");
    // The same agent carries both ends here; the inbound one knows the client's identity.
    let last = agent.connections().unwrap()["recently_closed"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c["direction"] == "inbound")
        .unwrap()
        .clone();
    assert_eq!((last["protocol"].as_str(), last["peer_identity"].as_str()),
        (Some("hbone"), Some("spiffe://cluster.local/ns/default/sa/productpage")));

    // A port-level PERMISSIVE exception for this workload lets plaintext in again on that port.
    bed.apply_peer_authentication(&format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: reviews, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    \"{ECHO_PORT}\": {{mode: PERMISSIVE}}\n"
    ))
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !outsider.send(target, 64 * 1024).unwrap().ok {
        assert!(std::time::Instant::now() < deadline, "port-level PERMISSIVE never took effect");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Certificates rotate at half their lifetime; a long-lived HBONE connection opened before keeps
/// working across two rotations, and `inspect certs` shows the identity, serial and time to rotation.
#[test]
fn a_long_lived_connection_survives_two_certificate_rotations() {
    require_privileges!();
    let bed = Testbed::new("rotation").unwrap();
    let (node1, node2) = (bed.add_node("node-1").unwrap(), bed.add_node("node-2").unwrap());
    let a = node1.add_pod("a", true).unwrap();
    let b = node2.add_pod("b", true).unwrap();
    b.serve("v1").unwrap();
    let short = || AgentOptions { mtls: true, certificate_lifetime_seconds: Some(4), ..AgentOptions::default() };
    let _agent1 = node1.start_agent_with(short()).unwrap();
    let agent2 = node2.start_agent_with(short()).unwrap();

    let serial = |agent: &warren_testbed::Agent| -> Option<String> {
        let certs: serde_json::Value = serde_json::from_str(&agent.get("/certificates").ok()?).ok()?;
        certs.as_array()?.iter().find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/b")?["serial"].as_str().map(String::from)
    };
    let long = std::thread::spawn({
        let (a, target) = (a.clone(), b.socket(ECHO_PORT));
        move || a.send_holding(target, 4 * MIB, std::time::Duration::from_millis(6500))
    });
    let mut serials: Vec<String> = vec![];
    while !long.is_finished() {
        if let Some(s) = serial(&agent2) {
            if serials.last() != Some(&s) {
                serials.push(s);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let result = long.join().unwrap().unwrap();
    assert!(result.ok, "the connection did not survive: {result:?}");
    assert!(serials.len() >= 3, "expected two rotations during the connection, saw serials {serials:?}");
    let connections = agent2.connections().unwrap();
    let inbound = connections["recently_closed"].as_array().unwrap().iter().find(|c| c["direction"] == "inbound").unwrap().clone();
    assert_eq!(inbound["protocol"], "hbone");

    let table = agent2.inspect_live(&["certs"]).unwrap();
    assert!(table.contains("IDENTITY") && table.contains("spiffe://cluster.local/ns/default/sa/b") && table.contains("2 certificates"), "{table}");
}
