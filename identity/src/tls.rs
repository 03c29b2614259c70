//! mTLS configurations for HBONE: TLS 1.3, ALPN `h2`, both sides present workload certificates, and both
//! sides verify the peer: chain to the mesh's roots, validity, key usage, and a SPIFFE identity in the
//! trust domain (the client additionally checks the server is one of the identities it expects).
//! This is what ztunnel does, so a Warren agent and a ztunnel sharing a root interoperate.
use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use crate::{Identity, WorkloadCertificate};

/// HBONE runs HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// The roots a mesh trusts and the trust domain its identities belong to.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    subjects: Vec<DistinguishedName>,
}

impl TrustBundle {
    pub fn from_pem(trust_domain: &str, roots_pem: &str) -> Result<Self, Error> {
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| Error::General(format!("trust bundle: {e}")))?;
        if roots.is_empty() {
            return Err(Error::General("trust bundle: no certificate in PEM".into()));
        }
        // The CertificateRequest's certificate_authorities (RFC 8446 4.2.4) are DER `Name`s. webpki's
        // anchor holds the subject's contents without their outer SEQUENCE, which other stacks refuse
        // (OpenSSL aborts in parse_ca_names; Go sends no certificate), so wrap them back in one.
        let subjects = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| DistinguishedName::in_sequence(a.subject.as_ref())))
            .collect();
        Ok(TrustBundle { trust_domain: trust_domain.to_string(), roots, subjects })
    }

    /// Checks the chain and returns the end entity's SPIFFE identity, which must be in our trust domain.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<Identity, Error> {
        let anchors: Vec<_> = self.roots.iter().filter_map(|r| webpki::anchor_from_trusted_cert(r).ok()).collect();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| Error::General(format!("peer certificate: {e}")))?;
        cert.verify_for_usage(algorithms.all, &anchors, intermediates, now, usage, None, None)
            .map_err(|e| Error::General(format!("peer certificate chain: {e}")))?;
        let identity = spiffe_identity(end_entity)?;
        if identity.trust_domain != self.trust_domain {
            return Err(Error::General(format!(
                "peer identity {identity} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(identity)
    }
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn spiffe_identity(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::General(format!("peer certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::General(format!("peer certificate SAN: {e}")))?
        .ok_or_else(|| Error::General("peer certificate has no subject alternative name".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|e: crate::IdentityError| Error::General(e.to_string())),
        [] => Err(Error::General("peer certificate has no SPIFFE URI SAN".into())),
        _ => Err(Error::General("peer certificate has more than one URI SAN".into())),
    }
}

/// The peer's identity on an established connection (its certificate was verified in the handshake).
pub fn peer_identity(connection: &rustls::CommonState) -> Option<Identity> {
    connection.peer_certificates()?.first().and_then(|cert| spiffe_identity(cert).ok())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_and_key(cert: &WorkloadCertificate, key_pem: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = cert
        .chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::General(format!("certificate: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::General(format!("private key: {e}")))?;
    Ok((chain, key))
}

/// Server side of HBONE: requires a client certificate from the mesh.
pub fn server_config(cert: &WorkloadCertificate, key_pem: &str, bundle: &TrustBundle) -> Result<ServerConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier { bundle: bundle.clone(), algorithms: provider.signature_verification_algorithms });
    let (chain, key) = chain_and_key(cert, key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Client side of HBONE: presents `cert` and accepts only a server with one of the `expected` identities.
pub fn client_config(
    cert: &WorkloadCertificate,
    key_pem: &str,
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier =
        Arc::new(SpiffeServerVerifier { bundle: bundle.clone(), expected, algorithms: provider.signature_verification_algorithms });
    let (chain, key) = chain_and_key(cert, key_pem)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Server side of the CA service: presents `cert`, asks no client certificate (agents authenticate with
/// a ServiceAccount token: they have no certificate before they ask for one).
pub fn server_config_without_client_auth(cert: &WorkloadCertificate, key_pem: &str) -> Result<ServerConfig, Error> {
    let (chain, key) = chain_and_key(cert, key_pem)?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
}

/// Client side of the CA service: no client certificate; accepts only a server with `expected` identity.
pub fn client_config_without_client_auth(bundle: &TrustBundle, expected: Identity) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.clone(),
        expected: vec![expected],
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: TrustBundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.bundle.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.bundle.verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth(), &self.algorithms)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used for HBONE".into()))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let identity = self.bundle.verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth(), &self.algorithms)?;
        if !self.expected.is_empty() && !self.expected.contains(&identity) {
            return Err(Error::General(format!("server identity {identity} is not the destination's")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used for HBONE".into()))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS versions a gateway server offers: `minProtocolVersion`/`maxProtocolVersion` as Istio writes them
/// (`TLSV1_2`, `TLSV1_3`; below 1.2 is not offered — a lower minimum still gets 1.2).
pub fn gateway_versions(min: Option<&str>, max: Option<&str>) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, Error> {
    let rank = |v: Option<&str>, default: u8| match v {
        None => Ok(default),
        Some("TLSV1_0" | "TLSV1_1" | "TLSV1_2") => Ok(2),
        Some("TLSV1_3") => Ok(3),
        Some(other) => Err(Error::General(format!("{other:?} is not a TLS version (TLSV1_2, TLSV1_3)"))),
    };
    let (min, max) = (rank(min, 2)?, rank(max, 3)?);
    let versions: Vec<_> = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(rank, _)| (min..=max).contains(rank))
        .map(|(_, v)| v)
        .collect();
    if versions.is_empty() {
        return Err(Error::General("minProtocolVersion is above maxProtocolVersion".into()));
    }
    Ok(versions)
}

/// A gateway's TLS server (Istio's SIMPLE, or MUTUAL when `client_ca_pem` is given): the Web PKI
/// certificate chain and key of a `credentialName` Secret, ALPN h2 and http/1.1.
pub fn gateway_server_config(
    chain_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ServerConfig, Error> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::General(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(Error::General("certificate: no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::General(format!("private key: {e}")))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                let cert = cert.map_err(|e| Error::General(format!("client CA: {e}")))?;
                roots.add(cert).map_err(|e| Error::General(format!("client CA: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::General(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
