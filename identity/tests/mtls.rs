//! Real TLS 1.3 handshakes over loopback TCP between configs built by `warren_identity::tls`.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls::pki_types::ServerName};
use warren_identity::{
    CertificateAuthority, Identity, WorkloadCertificate,
    tls::{self, TrustBundle},
};
use x509_parser::{prelude::FromDer, x509::X509Name};

const HOUR: Duration = Duration::from_secs(3600);

fn mesh() -> (CertificateAuthority, TrustBundle) {
    let ca = CertificateAuthority::generate("cluster.local", 24 * HOUR).unwrap();
    let bundle = TrustBundle::from_pem("cluster.local", ca.root_pem()).unwrap();
    (ca, bundle)
}

fn server_identity() -> Identity {
    Identity::new("cluster.local", "bookinfo", "reviews")
}
fn client_identity() -> Identity {
    Identity::new("cluster.local", "bookinfo", "productpage")
}

fn issue(ca: &CertificateAuthority, id: &Identity) -> WorkloadCertificate {
    ca.issue(id, HOUR, SystemTime::now()).unwrap()
}

/// What each side learned: Ok(peer identity) or the error that ended the connection.
struct Outcome {
    server: Result<Identity, String>,
    client: Result<Identity, String>,
}

async fn handshake(server_cert: &WorkloadCertificate, client_cert: &WorkloadCertificate, bundle: &TrustBundle, expected: Vec<Identity>) -> Outcome {
    let server_config = tls::server_config(server_cert, server_cert.key_pem.as_ref().unwrap(), bundle).unwrap();
    let client_config = tls::client_config(client_cert, client_cert.key_pem.as_ref().unwrap(), bundle, expected).unwrap();
    handshake_with(server_config, client_config).await
}

async fn handshake_with(server_config: rustls::ServerConfig, client_config: rustls::ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls::peer_identity(tls.get_ref().1).ok_or("no peer identity")?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN_H2));
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = TlsConnector::from(Arc::new(client_config));
        let mut tls =
            connector.connect(ServerName::try_from("hbone").unwrap(), tcp).await.map_err(|e| e.to_string())?;
        let peer = tls::peer_identity(tls.get_ref().1).ok_or("no peer identity")?;
        // TLS 1.3 reports a rejected client certificate after the handshake: read to see it.
        let mut reply = vec![];
        tls.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
        if reply != b"ok" {
            return Err(format!("unexpected reply {reply:?}"));
        }
        Ok::<_, String>(peer)
    }
    .await;
    let server = server.await.unwrap();
    Outcome { server, client }
}

#[tokio::test]
async fn mutual_tls_between_workloads_of_one_mesh() {
    let (ca, bundle) = mesh();
    let outcome = handshake(&issue(&ca, &server_identity()), &issue(&ca, &client_identity()), &bundle, vec![server_identity()]).await;
    assert_eq!(outcome.server, Ok(client_identity()), "the server knows the client's identity");
    assert_eq!(outcome.client, Ok(server_identity()), "the client verified the server's identity");
}

/// Records the certificate authorities each CertificateRequest names (as the client received them on the
/// wire), then answers as the client's own resolver would.
#[derive(Debug)]
struct RecordCaNames {
    inner: Arc<dyn ResolvesClientCert>,
    seen: Mutex<Vec<Vec<Vec<u8>>>>,
}

impl ResolvesClientCert for RecordCaNames {
    fn resolve(&self, root_hint_subjects: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.seen.lock().unwrap().push(root_hint_subjects.iter().map(|n| n.to_vec()).collect());
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

#[tokio::test]
async fn the_certificate_request_names_the_root_by_its_der_subject() {
    let (ca, bundle) = mesh();
    let (server_cert, client_cert) = (issue(&ca, &server_identity()), issue(&ca, &client_identity()));
    let server_config = tls::server_config(&server_cert, server_cert.key_pem.as_ref().unwrap(), &bundle).unwrap();
    let mut client_config =
        tls::client_config(&client_cert, client_cert.key_pem.as_ref().unwrap(), &bundle, vec![server_identity()]).unwrap();
    let recorder = Arc::new(RecordCaNames { inner: client_config.client_auth_cert_resolver.clone(), seen: Mutex::default() });
    client_config.client_auth_cert_resolver = recorder.clone();
    let outcome = handshake_with(server_config, client_config).await;
    assert_eq!(outcome.server, Ok(client_identity()));
    assert_eq!(outcome.client, Ok(server_identity()));

    let root_der = CertificateDer::from_pem_slice(ca.root_pem().as_bytes()).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(root_der.as_ref()).unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    let [names] = seen.as_slice() else { panic!("expected one CertificateRequest, saw {seen:?}") };
    let [name] = names.as_slice() else { panic!("expected the one root among the CA names, got {names:?}") };
    // RFC 8446 4.2.4: each entry is a DER `Name` (RFC 5280), a SEQUENCE of RDNs — what other stacks
    // decode (OpenSSL's d2i_X509_NAME, Go's comparison with RawIssuer).
    let (rest, parsed) = X509Name::from_der(name).expect("the CA name is a DER Name");
    assert!(rest.is_empty(), "{} bytes after the Name", rest.len());
    assert_eq!(parsed.as_raw(), root.subject().as_raw(), "exactly the root's subject, outer SEQUENCE included");
    assert_eq!(parsed.to_string(), "CN=Warren root CA, O=cluster.local");

    // Control: the subject without its outer SEQUENCE (what webpki's trust anchor holds) is not a Name,
    // so the check above tells the two encodings apart.
    let anchor = webpki::anchor_from_trusted_cert(&root_der).unwrap();
    assert!(X509Name::from_der(anchor.subject.as_ref()).is_err());
    assert_ne!(name.as_slice(), anchor.subject.as_ref());
}

#[tokio::test]
async fn a_forged_client_certificate_is_refused() {
    let (ca, bundle) = mesh();
    // Same trust domain, same identity, but signed by a CA the mesh does not trust.
    let (rogue, _) = mesh();
    let outcome = handshake(&issue(&ca, &server_identity()), &issue(&rogue, &client_identity()), &bundle, vec![]).await;
    let error = outcome.server.unwrap_err();
    // The rogue root has the same name as ours, so the chain is found and its signature fails.
    assert!(error.contains("peer certificate chain: InvalidSignatureForPublicKey"), "{error}");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let (ca, bundle) = mesh();
    let expired = ca.issue(&client_identity(), HOUR, SystemTime::now() - 3 * HOUR).unwrap();
    assert!(expired.not_after < SystemTime::now());
    let outcome = handshake(&issue(&ca, &server_identity()), &expired, &bundle, vec![]).await;
    let error = outcome.server.unwrap_err();
    assert!(error.contains("CertExpired"), "{error}");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn a_client_certificate_of_another_trust_domain_is_refused() {
    let (ca, bundle) = mesh();
    // Signed by the mesh's own CA, but for an identity outside its trust domain.
    let foreign = issue(&ca, &Identity::new("evil.example", "bookinfo", "productpage"));
    let outcome = handshake(&issue(&ca, &server_identity()), &foreign, &bundle, vec![]).await;
    let error = outcome.server.unwrap_err();
    assert!(error.contains("is not in trust domain cluster.local"), "{error}");
}

#[tokio::test]
async fn a_server_with_an_unexpected_identity_is_refused() {
    let (ca, bundle) = mesh();
    let impostor = issue(&ca, &Identity::new("cluster.local", "bookinfo", "ratings"));
    let outcome = handshake(&impostor, &issue(&ca, &client_identity()), &bundle, vec![server_identity()]).await;
    let error = outcome.client.unwrap_err();
    assert!(error.contains("is not the destination's"), "{error}");
}

#[test]
fn csr_gets_the_authorized_identity_not_the_requested_one() {
    let (ca, _) = mesh();
    // The requester asks for someone else's identity in its CSR.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let cert = ca.sign_csr(&csr, &client_identity(), HOUR).unwrap();
    let der = rustls::pki_types::CertificateDer::from(
        rustls::pki_types::pem::PemObject::from_pem_slice(cert.chain_pem[0].as_bytes()).map(|d: rustls::pki_types::CertificateDer| d.to_vec()).unwrap(),
    );
    assert_eq!(tls::spiffe_identity(&der).unwrap(), client_identity());
    assert!(cert.key_pem.is_none(), "the CA never sees the requester's key");
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(lifetime > HOUR && lifetime < HOUR + Duration::from_secs(120), "{lifetime:?}");
}
