//! The agent's HBONE listener (port 15008 in an enrolled pod) refuses clients whose certificate is forged,
//! expired, or of another trust domain — and accepts a valid one (the control).
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::io::AsyncReadExt;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use warren_identity::{CertificateAuthority, Identity, WorkloadCertificate, tls};
use warren_testbed::{AgentOptions, Agent, Pod, Testbed, in_netns, require_privileges};

const HOUR: Duration = Duration::from_secs(3600);

struct Setup {
    _bed: Testbed,
    agent: Agent,
    client: Pod,
    hbone: SocketAddr,
    mesh_ca: CertificateAuthority,
}

fn setup(label: &str) -> Setup {
    let bed = Testbed::new(label).unwrap();
    let node = bed.add_node("node-1").unwrap();
    let server = node.add_pod("b", true).unwrap();
    let client = node.add_pod("outsider", false).unwrap();
    let agent = node.start_agent_with(AgentOptions { mtls: true, ..AgentOptions::default() }).unwrap();
    let (cert, key) = bed.ca_files().unwrap();
    let mesh_ca = CertificateAuthority::from_pem(
        "cluster.local",
        &std::fs::read_to_string(cert).unwrap(),
        &std::fs::read_to_string(key).unwrap(),
    )
    .unwrap();
    let hbone = SocketAddr::new(server.ip.into(), 15008);
    Setup { _bed: bed, agent, client, hbone, mesh_ca }
}

/// mTLS handshake to the agent's HBONE listener from the client pod, presenting `cert`; then waits for
/// the server's verdict (TLS 1.3 reports a refused client certificate after the handshake).
fn present(setup: &Setup, cert: &WorkloadCertificate) -> Result<(), String> {
    let bundle = tls::TrustBundle::from_pem("cluster.local", setup.mesh_ca.root_pem()).unwrap();
    let expected = vec![Identity::new("cluster.local", "default", "b")];
    let config = tls::client_config(cert, cert.key_pem.as_ref().unwrap(), &bundle, expected).unwrap();
    let tcp = in_netns(&setup.client.netns, || std::net::TcpStream::connect(setup.hbone)).unwrap().unwrap();
    tcp.set_nonblocking(true).unwrap();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("hbone").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        // Accepted clients get the server's HTTP/2 SETTINGS; refused ones an alert.
        let mut first = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut first)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    })
}

fn refused(setup: &Setup) -> f64 {
    setup.agent.metric("warren_hbone_mtls_refused_total", &[]).unwrap()
}

fn client_identity() -> Identity {
    Identity::new("cluster.local", "default", "outsider")
}

#[test]
fn a_forged_client_certificate_is_refused() {
    require_privileges!();
    let setup = setup("hbone-forged");
    let valid = setup.mesh_ca.issue(&client_identity(), HOUR, SystemTime::now()).unwrap();
    assert_eq!(present(&setup, &valid), Ok(()), "control: the mesh's own certificate is accepted");
    // Same trust domain and identity, signed by a CA the mesh does not trust.
    let rogue = CertificateAuthority::generate("cluster.local", HOUR).unwrap();
    let forged = rogue.issue(&client_identity(), HOUR, SystemTime::now()).unwrap();
    let error = present(&setup, &forged).unwrap_err();
    assert!(error.contains("alert"), "{error}");
    assert_eq!(refused(&setup), 1.0);
}

#[test]
fn an_expired_client_certificate_is_refused() {
    require_privileges!();
    let setup = setup("hbone-expired");
    let expired = setup.mesh_ca.issue(&client_identity(), HOUR, SystemTime::now() - 3 * HOUR).unwrap();
    let error = present(&setup, &expired).unwrap_err();
    assert!(error.contains("alert"), "{error}");
    assert_eq!(refused(&setup), 1.0);
    assert!(logs(&setup.agent, "CertExpired"), "the agent says why");
}

#[test]
fn a_client_certificate_of_another_trust_domain_is_refused() {
    require_privileges!();
    let setup = setup("hbone-foreign");
    let foreign =
        setup.mesh_ca.issue(&Identity::new("evil.example", "default", "outsider"), HOUR, SystemTime::now()).unwrap();
    let error = present(&setup, &foreign).unwrap_err();
    assert!(error.contains("alert"), "{error}");
    assert_eq!(refused(&setup), 1.0);
    assert!(logs(&setup.agent, "is not in trust domain cluster.local"), "the agent says why");
}

/// Whether the agent's log gets `text` (its stderr reaches the testbed a moment after the refusal is
/// counted).
fn logs(agent: &Agent, text: &str) -> bool {
    warren_e2e::eventually(std::time::Duration::from_secs(5), || agent.log().contains(text).then_some(())).is_some()
}
