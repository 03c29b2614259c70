//! The mesh's certificate authority (run by warren-controller): a root, generated on first start or
//! supplied by the user, that issues short-lived workload certificates for SPIFFE identities.
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::Identity;

/// Allowed clock skew between the CA and the peers that check its certificates.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate authority: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request: {0}")]
    Csr(String),
}

/// A certificate the CA issued, with its chain (leaf first, root last).
#[derive(Clone)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    pub chain_pem: Vec<String>,
    /// Present when the CA generated the key (tests, the embedded default); absent for CSRs.
    pub key_pem: Option<String>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub struct CertificateAuthority {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// A new self-signed root for `trust_domain`, valid for `lifetime`.
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "Warren root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        let root = params.self_signed(&key)?;
        Ok(CertificateAuthority { trust_domain: trust_domain.to_string(), root_pem: root.pem(), issuer: Issuer::new(params, key) })
    }

    /// A root the user supplies (or that an earlier start stored): certificate and key in PEM.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority { trust_domain: trust_domain.to_string(), root_pem: cert_pem.to_string(), issuer })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for `identity` with a fresh key pair, valid from `not_before` for `lifetime`.
    pub fn issue(&self, identity: &Identity, lifetime: Duration, not_before: SystemTime) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate()?;
        let mut cert = self.sign(identity, &key, lifetime, not_before)?;
        cert.key_pem = Some(key.serialize_pem());
        Ok(cert)
    }

    /// Signs the public key of a CSR for `identity` — the identity the caller was authorized for, never
    /// whatever names the CSR asks for.
    pub fn sign_csr(&self, csr_pem: &str, identity: &Identity, lifetime: Duration) -> Result<WorkloadCertificate, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        self.sign(identity, &csr.public_key, lifetime, SystemTime::now())
    }

    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        not_before: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let start = not_before - BACKDATE;
        let end = not_before + lifetime;
        params.not_before = OffsetDateTime::from(start);
        params.not_after = OffsetDateTime::from(end);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            chain_pem: vec![cert.pem(), self.root_pem.clone()],
            key_pem: None,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_before: start,
            not_after: end,
        })
    }
}

/// 128 random bits, first bit clear (positive INTEGER), from the kernel's CSPRNG.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut serial));
    if filled.is_err() {
        // Unique even without /dev/urandom: time plus a counter.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        serial = nanos.to_be_bytes();
    }
    serial[0] &= 0x7f;
    serial
}
