//! TLS interop: a TLS 1.3 stack that is not rustls — the real `openssl s_client` — completes mutual TLS with
//! Warren's servers when it presents a certificate of the mesh: the agent's HBONE listener (15008 in an
//! enrolled pod) and the controller's push port (which wants the agents' identity). Without a client
//! certificate, or with one from another CA, it is refused (the controls).
//!
//! OpenSSL decodes the CertificateRequest's certificate_authorities as DER `Name`s and aborts the handshake
//! in `parse_ca_names` when they are not, so these tests are where a bad encoding shows outside rustls.
use std::{
    fs,
    net::SocketAddr,
    process::{Command, Output},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
use warren_identity::{CertificateAuthority, Identity, WorkloadCertificate, tls};
use warren_testbed::{AgentOptions, ControllerOptions, Testbed, require_privileges};

const HOUR: Duration = Duration::from_secs(3600);
const OPENSSL: &str = "/usr/bin/openssl";
/// What s_client sends once connected. It is not HTTP/2's preface, so the server's HTTP/2 layer ends the
/// connection and s_client (`-ign_eof`) exits by itself, its output complete — no sleeps, no kill.
const NOT_HTTP2: &str = "GET / HTTP/1.1\r\nHost: warren\r\n\r\n";
/// How openssl prints the root the server names in its CertificateRequest (the testbed's CA).
const CA_NAMES: &str = "Acceptable client certificate CA names\nCN = Warren root CA, O = cluster.local\n";
/// Printed when the server's NewSessionTicket arrives. A rustls server asking for a client certificate
/// sends its tickets only after it has verified that certificate, its CertificateVerify and Finished.
const TICKET: &str = "Post-Handshake New Session Ticket arrived";

/// The testbed's CA (the mesh root agents and controller are started with).
fn mesh_ca(bed: &Testbed) -> Result<CertificateAuthority> {
    let (cert, key) = bed.ca_files()?;
    Ok(CertificateAuthority::from_pem("cluster.local", &fs::read_to_string(cert)?, &fs::read_to_string(key)?)?)
}

/// `openssl s_client` to `to`: TLS 1.3 only, ALPN h2, the server's chain verified against the mesh root
/// (`-verify_return_error`: a bad server chain ends the handshake), presenting `client` if given.
fn s_client(bed: &Testbed, to: SocketAddr, client: Option<&WorkloadCertificate>) -> Result<Command> {
    let (root, _) = bed.ca_files()?;
    // sh feeds stdin; `timeout` only bounds a server that would never close.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"input=$1; shift; printf '%s' "$input" | exec timeout 30 "$@""#)
        .arg("sh")
        .arg(NOT_HTTP2)
        .arg(OPENSSL)
        .args(["s_client", "-tls1_3", "-alpn", "h2", "-ign_eof", "-verify_return_error", "-connect"])
        .arg(to.to_string())
        .arg("-CAfile")
        .arg(root);
    if let Some(cert) = client {
        let dir = bed.state_dir().join("s_client");
        fs::create_dir_all(&dir)?;
        let (cert_file, key_file) = (dir.join(format!("{}.pem", cert.serial)), dir.join(format!("{}-key.pem", cert.serial)));
        fs::write(&cert_file, cert.chain_pem.first().context("certificate without a chain")?)?;
        fs::write(&key_file, cert.key_pem.as_deref().context("certificate without its key")?)?;
        cmd.arg("-cert").arg(cert_file).arg("-key").arg(key_file);
    }
    Ok(cmd)
}

/// s_client's output, for the assertions and their messages.
struct Handshake {
    stdout: String,
    stderr: String,
}

impl Handshake {
    fn from(output: Output) -> Result<Handshake> {
        let handshake = Handshake {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        ensure!(output.status.code() != Some(124), "s_client did not finish in 30 s\n{handshake}");
        Ok(handshake)
    }

    /// TLS 1.3 completed, the server's chain verified, the root named as openssl understands it, and the
    /// server accepted our certificate (its tickets came); no alert either way.
    fn assert_accepted(&self) {
        assert!(!self.stderr.contains("parse_ca_names"), "openssl could not decode the CA names\n{self}");
        assert!(!self.stderr.contains("alert"), "an alert ended the handshake\n{self}");
        assert!(self.stdout.contains(CA_NAMES), "the CertificateRequest names the mesh root\n{self}");
        assert!(self.stdout.contains("New, TLSv1.3, Cipher is"), "TLS 1.3 negotiated\n{self}");
        assert!(self.stdout.contains("ALPN protocol: h2"), "{self}");
        assert!(self.stdout.contains("Verify return code: 0 (ok)"), "the server's chain verified\n{self}");
        assert!(self.stdout.contains(TICKET), "the server accepted the client certificate\n{self}");
    }

    /// The server ended the handshake with an alert and never got as far as issuing tickets.
    fn assert_refused(&self, alert: &str) {
        assert!(!self.stderr.contains("parse_ca_names"), "openssl could not decode the CA names\n{self}");
        assert!(self.stderr.contains(alert), "expected {alert:?}\n{self}");
        assert!(!self.stdout.contains(TICKET), "a refused client got a session ticket\n{self}");
    }

    /// The SPIFFE identity of the certificate the server presented (s_client prints the leaf).
    fn server_identity(&self) -> Result<Identity> {
        let cert = CertificateDer::from_pem_slice(self.stdout.as_bytes()).context("no server certificate in s_client's output")?;
        Ok(tls::spiffe_identity(&cert)?)
    }
}

impl std::fmt::Display for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--- s_client stdout\n{}\n--- s_client stderr\n{}", self.stdout, self.stderr)
    }
}

/// Waits until `log()` holds `needle` `count` times.
fn until_logged(log: impl Fn() -> String, needle: &str, count: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = log().matches(needle).count();
        if seen == count {
            return Ok(());
        }
        if seen > count || Instant::now() > deadline {
            bail!("expected {needle:?} {count} times in the log, saw it {seen} times:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn openssl_completes_mtls_with_the_agents_hbone_listener() {
    require_privileges!();
    hbone_scenario().unwrap();
}

fn hbone_scenario() -> Result<()> {
    let bed = Testbed::new("tls-interop-hbone")?;
    let node = bed.add_node("node-1")?;
    let server = node.add_pod("b", true)?;
    let client = node.add_pod("outsider", false)?;
    let agent = node.start_agent_with(AgentOptions { mtls: true, ..AgentOptions::default() })?;
    let mesh = mesh_ca(&bed)?;
    let hbone = SocketAddr::new(server.ip.into(), 15008);
    let refused = || agent.metric("warren_hbone_mtls_refused_total", &[]);

    // A workload certificate of the mesh: accepted, and openssl saw the pod's identity.
    let valid = mesh.issue(&Identity::new("cluster.local", "default", "outsider"), HOUR, SystemTime::now())?;
    let accepted = Handshake::from(client.run(s_client(&bed, hbone, Some(&valid))?)?)?;
    accepted.assert_accepted();
    assert_eq!(accepted.server_identity()?, Identity::new("cluster.local", "default", "b"));
    assert_eq!(refused()?, 0.0, "the agent refused nothing\n{}", agent.log());

    // Controls: no certificate; a certificate of the same identity from a CA the mesh does not trust.
    Handshake::from(client.run(s_client(&bed, hbone, None)?)?)?.assert_refused("alert certificate required");
    assert_eq!(refused()?, 1.0);
    let rogue = CertificateAuthority::generate("cluster.local", HOUR)?;
    let forged = rogue.issue(&Identity::new("cluster.local", "default", "outsider"), HOUR, SystemTime::now())?;
    Handshake::from(client.run(s_client(&bed, hbone, Some(&forged))?)?)?.assert_refused("alert");
    assert_eq!(refused()?, 2.0);
    assert!(agent.log().contains("InvalidSignatureForPublicKey"), "the agent says why\n{}", agent.log());
    Ok(())
}

#[test]
fn openssl_completes_mtls_with_the_controllers_push_port() {
    require_privileges!();
    push_scenario().unwrap();
}

fn push_scenario() -> Result<()> {
    let bed = Testbed::new("tls-interop-push")?;
    let dir = bed.state_dir().join("mesh-config");
    fs::create_dir_all(&dir)?;
    let controller = bed.start_controller(ControllerOptions { config_dir: Some(dir), kubeconfig: None, push_port: 0, config_poll_ms: None })?;
    let push: SocketAddr = controller.address().parse()?;
    let mesh = mesh_ca(&bed)?;
    // The controller runs in the host's netns: so does this s_client.
    let run = |client: Option<&WorkloadCertificate>| -> Result<Handshake> {
        Handshake::from(s_client(&bed, push, client)?.output().context("running openssl s_client")?)
    };
    // The controller logs each connection's end: past TLS, HTTP/2 fails on our input; else TLS failed.
    let (tls_done, tls_failed) = ("push connection: HTTP/2 handshake", "push connection: TLS handshake");

    // The agents' identity, as the push port requires.
    let agent = mesh.issue(&Identity::new("cluster.local", "warren-system", "warren-agent"), HOUR, SystemTime::now())?;
    let accepted = run(Some(&agent))?;
    accepted.assert_accepted();
    assert_eq!(accepted.server_identity()?, Identity::new("cluster.local", "warren-system", "warren-controller"));
    until_logged(|| controller.log(), tls_done, 1, Duration::from_secs(5))?;
    assert!(!controller.log().contains(tls_failed), "{}", controller.log());

    // Controls: no certificate; the agents' identity from a CA the mesh does not trust.
    run(None)?.assert_refused("alert certificate required");
    let rogue = CertificateAuthority::generate("cluster.local", HOUR)?;
    let forged = rogue.issue(&Identity::new("cluster.local", "warren-system", "warren-agent"), HOUR, SystemTime::now())?;
    run(Some(&forged))?.assert_refused("alert");
    until_logged(|| controller.log(), tls_failed, 2, Duration::from_secs(5))?;
    Ok(())
}
