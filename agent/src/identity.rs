//! The agent's workload certificates: one per identity of an enrolled pod on this node, renewed when
//! half their lifetime has passed (existing connections keep the certificate they shook hands with;
//! new handshakes get the new one), plus the rustls configs built from them.
//!
//! Certificates come from a [`CertificateAuthority`] the agent is given (`identity:` in its config: the
//! embedded default). The controller's CA, which authenticates the node before signing CSRs, replaces
//! this source.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use rustls::{ClientConfig, ServerConfig};
use serde::{Deserialize, Serialize};
use warren_identity::{CertificateAuthority, Identity, WorkloadCertificate, tls::TrustBundle};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The mesh's root certificate (PEM).
    pub ca_cert_file: PathBuf,
    /// Its key (PEM): with it the agent signs its own pods' certificates (embedded default).
    pub ca_key_file: PathBuf,
    #[serde(default = "default_lifetime")]
    pub certificate_lifetime_seconds: u64,
}

fn default_trust_domain() -> String {
    warren_identity::DEFAULT_TRUST_DOMAIN.into()
}
fn default_lifetime() -> u64 {
    24 * 3600
}

struct Issued {
    certificate: WorkloadCertificate,
    server: Arc<ServerConfig>,
    clients: HashMap<Identity, Arc<ClientConfig>>,
}

pub struct Certificates {
    ca: CertificateAuthority,
    bundle: TrustBundle,
    lifetime: Duration,
    issued: Mutex<HashMap<Identity, Issued>>,
}

/// What `inspect certs` shows.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateInfo {
    pub identity: String,
    pub serial: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub renews_in_seconds: u64,
    pub chain: Vec<String>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Certificates {
    pub fn load(config: &IdentityConfig) -> Result<Self> {
        let read = |path: &PathBuf, field: &str| {
            std::fs::read_to_string(path).with_context(|| format!("identity.{field}: cannot read {}", path.display()))
        };
        let cert_pem = read(&config.ca_cert_file, "caCertFile")?;
        let key_pem = read(&config.ca_key_file, "caKeyFile")?;
        let ca = CertificateAuthority::from_pem(&config.trust_domain, &cert_pem, &key_pem).context("identity: loading the CA")?;
        let bundle = TrustBundle::from_pem(&config.trust_domain, &cert_pem).context("identity: trust bundle")?;
        Ok(Certificates {
            ca,
            bundle,
            lifetime: Duration::from_secs(config.certificate_lifetime_seconds),
            issued: Mutex::default(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.bundle.trust_domain
    }

    /// Runs `f` on the current certificate for `identity`, issuing or renewing it first when needed.
    fn with_issued<R>(&self, identity: &Identity, f: impl FnOnce(&mut Issued) -> Result<R>) -> Result<R> {
        let mut issued = self.issued.lock().unwrap();
        let now = SystemTime::now();
        let stale = issued.get(identity).is_none_or(|i| {
            let half = i.certificate.not_before + (i.certificate.not_after.duration_since(i.certificate.not_before).unwrap_or_default() / 2);
            now >= half
        });
        if stale {
            let certificate = self.ca.issue(identity, self.lifetime, now)?;
            let key = certificate.key_pem.clone().expect("the CA generated the key");
            let server = Arc::new(warren_identity::tls::server_config(&certificate, &key, &self.bundle)?);
            tracing::info!(identity = %identity, serial = %certificate.serial, "workload certificate issued");
            issued.insert(identity.clone(), Issued { certificate, server, clients: HashMap::new() });
        }
        f(issued.get_mut(identity).expect("just ensured"))
    }

    /// Renews every certificate past half its lifetime (called periodically, so certificates rotate
    /// even while no new connection asks for one).
    pub fn renew_due(&self) {
        let identities: Vec<Identity> = self.issued.lock().unwrap().keys().cloned().collect();
        for identity in identities {
            if let Err(e) = self.with_issued(&identity, |_| Ok(())) {
                tracing::warn!(identity = %identity, "certificate renewal failed: {e:#}");
            }
        }
    }

    /// TLS server config presenting `identity` (HBONE inbound).
    pub fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>> {
        self.with_issued(identity, |i| Ok(i.server.clone()))
    }

    /// TLS client config presenting `source` and accepting only `destination` (HBONE outbound).
    pub fn client_config(&self, source: &Identity, destination: &Identity) -> Result<Arc<ClientConfig>> {
        let bundle = self.bundle.clone();
        self.with_issued(source, |i| {
            if let Some(config) = i.clients.get(destination) {
                return Ok(config.clone());
            }
            let key = i.certificate.key_pem.as_deref().expect("the CA generated the key");
            let config =
                Arc::new(warren_identity::tls::client_config(&i.certificate, key, &bundle, vec![destination.clone()])?);
            i.clients.insert(destination.clone(), config.clone());
            Ok(config)
        })
    }

    pub fn snapshot(&self) -> Vec<CertificateInfo> {
        let now = SystemTime::now();
        let issued = self.issued.lock().unwrap();
        let mut infos: Vec<CertificateInfo> = issued
            .values()
            .map(|i| {
                let c = &i.certificate;
                let half = c.not_before + c.not_after.duration_since(c.not_before).unwrap_or_default() / 2;
                CertificateInfo {
                    identity: c.identity.to_string(),
                    serial: c.serial.clone(),
                    not_before_unix: unix(c.not_before),
                    not_after_unix: unix(c.not_after),
                    renews_in_seconds: half.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                    chain: c.chain_pem.clone(),
                }
            })
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }
}
