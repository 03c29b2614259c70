//! The agent's workload certificates: one per identity of an enrolled pod on this node, renewed when
//! half their lifetime has passed (existing connections keep the certificate they shook hands with;
//! new handshakes get the new one), plus the rustls configs built from them.
//!
//! Certificates come from warren-controller's CA (`identity.controller`: the agent generates the key and
//! sends a CSR with its pod-bound ServiceAccount token; the controller grants only identities of pods on
//! this node) or, in the embedded default without a controller, from a CA key the agent is given
//! (`identity.caKeyFile`).
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
    /// The mesh's root certificate (PEM; in a cluster, ConfigMap warren-root-cert).
    pub ca_cert_file: PathBuf,
    /// The root's key: the agent signs its own pods' certificates (the embedded default, no controller).
    #[serde(default)]
    pub ca_key_file: Option<PathBuf>,
    /// Or: ask warren-controller's CA, authenticated by the agent's pod-bound ServiceAccount token.
    #[serde(default)]
    pub controller: Option<ControllerCa>,
    /// Lifetime of certificates the agent signs itself (the controller decides for its own).
    #[serde(default = "default_lifetime")]
    pub certificate_lifetime_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerCa {
    /// host:port of the controller's CA service.
    pub address: String,
    /// The agent's ServiceAccount token (projected, bound to the agent's pod).
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// The controller's namespace (its identity is spiffe://<trust domain>/ns/<namespace>/sa/warren-controller).
    #[serde(default = "default_controller_namespace")]
    pub namespace: String,
}

fn default_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn default_controller_namespace() -> String {
    "warren-system".into()
}

/// Where workload certificates come from.
enum Source {
    /// The agent holds the CA key (embedded default).
    Local(CertificateAuthority),
    /// warren-controller signs CSRs; keys stay here.
    Controller { config: ControllerCa, tls: Arc<ClientConfig> },
}

fn default_trust_domain() -> String {
    warren_identity::DEFAULT_TRUST_DOMAIN.into()
}
fn default_lifetime() -> u64 {
    24 * 3600
}

struct Issued {
    certificate: WorkloadCertificate,
    key_pem: String,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

pub struct Certificates {
    source: Source,
    bundle: TrustBundle,
    lifetime: Duration,
    issued: Mutex<HashMap<Identity, Arc<Issued>>>,
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
        let bundle = TrustBundle::from_pem(&config.trust_domain, &cert_pem).context("identity: trust bundle")?;
        let source = match (&config.ca_key_file, &config.controller) {
            (Some(key), None) => Source::Local(
                CertificateAuthority::from_pem(&config.trust_domain, &cert_pem, &read(key, "caKeyFile")?)
                    .context("identity: loading the CA")?,
            ),
            (None, Some(controller)) => {
                let expected = Identity::new(&config.trust_domain, &controller.namespace, "warren-controller");
                let tls = warren_identity::tls::client_config_without_client_auth(&bundle, expected)?;
                Source::Controller { config: controller.clone(), tls: Arc::new(tls) }
            }
            (Some(_), Some(_)) => anyhow::bail!("identity: set caKeyFile or controller, not both"),
            (None, None) => anyhow::bail!("identity: set caKeyFile (sign locally) or controller (ask warren-controller)"),
        };
        Ok(Certificates { source, bundle, lifetime: Duration::from_secs(config.certificate_lifetime_seconds), issued: Mutex::default() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.bundle.trust_domain
    }

    /// The current certificate for `identity`, issued or renewed (past half its lifetime) first if needed.
    async fn current(&self, identity: &Identity) -> Result<Arc<Issued>> {
        let now = SystemTime::now();
        if let Some(issued) = self.issued.lock().unwrap().get(identity) {
            let c = &issued.certificate;
            if now < c.not_before + c.not_after.duration_since(c.not_before).unwrap_or_default() / 2 {
                return Ok(issued.clone());
            }
        }
        let (certificate, key_pem) = match &self.source {
            Source::Local(ca) => {
                let certificate = ca.issue(identity, self.lifetime, now)?;
                let key = certificate.key_pem.clone().expect("the CA generated the key");
                (certificate, key)
            }
            Source::Controller { config, tls } => controller::request(config, tls.clone(), identity).await?,
        };
        let server = Arc::new(warren_identity::tls::server_config(&certificate, &key_pem, &self.bundle)?);
        tracing::info!(identity = %identity, serial = %certificate.serial, "workload certificate issued");
        let issued = Arc::new(Issued { certificate, key_pem, server, clients: Mutex::default() });
        self.issued.lock().unwrap().insert(identity.clone(), issued.clone());
        Ok(issued)
    }

    /// Renews every certificate past half its lifetime (called periodically, so certificates rotate
    /// even while no new connection asks for one).
    pub async fn renew_due(&self) {
        let identities: Vec<Identity> = self.issued.lock().unwrap().keys().cloned().collect();
        for identity in identities {
            if let Err(e) = self.current(&identity).await {
                tracing::warn!(identity = %identity, "certificate renewal failed: {e:#}");
            }
        }
    }

    /// TLS server config presenting `identity` (HBONE inbound).
    pub async fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>> {
        Ok(self.current(identity).await?.server.clone())
    }

    /// TLS client config presenting `source` and accepting only `destination` (HBONE outbound).
    pub async fn client_config(&self, source: &Identity, destination: &Identity) -> Result<Arc<ClientConfig>> {
        let issued = self.current(source).await?;
        if let Some(config) = issued.clients.lock().unwrap().get(destination) {
            return Ok(config.clone());
        }
        let config = Arc::new(warren_identity::tls::client_config(
            &issued.certificate,
            &issued.key_pem,
            &self.bundle,
            vec![destination.clone()],
        )?);
        issued.clients.lock().unwrap().insert(destination.clone(), config.clone());
        Ok(config)
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

/// The agent's side of warren-controller's CA service.
mod controller {
    use std::{sync::Arc, time::{Duration, SystemTime}};

    use anyhow::{Context, Result, bail};
    use rustls::ClientConfig;
    use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
    use warren_identity::{Identity, WorkloadCertificate};

    use super::ControllerCa;

    /// Generates a key, sends a CSR for `identity` with the agent's token; returns the certificate and key.
    pub async fn request(config: &ControllerCa, tls: Arc<ClientConfig>, identity: &Identity) -> Result<(WorkloadCertificate, String)> {
        let token = std::fs::read_to_string(&config.token_file)
            .with_context(|| format!("identity.controller.tokenFile: cannot read {}", config.token_file.display()))?;
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
        let body = serde_json::json!({ "identity": identity.to_string(), "csr": csr }).to_string();
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&config.address))
            .await
            .context("connecting to the controller's CA: timed out")?
            .with_context(|| format!("connecting to the controller's CA at {}", config.address))?;
        let stream = TlsConnector::from(tls)
            .connect(ServerName::try_from("warren-controller").expect("valid name"), tcp)
            .await
            .context("TLS to the controller's CA")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP to the controller's CA")?;
        tokio::spawn(connection);
        let request = http::Request::post("/v1/certificates")
            .header(http::header::HOST, "warren-controller")
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .context("a CSR request")?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            anyhow::Ok((status, http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes()))
        };
        let (status, answer) = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .context("the controller's CA did not answer")??;
        let json: serde_json::Value =
            serde_json::from_slice(&answer).context("the controller's CA answered with no JSON")?;
        if status != 200 {
            bail!("the controller's CA refused {identity} ({status}): {}", json["error"].as_str().unwrap_or("?"));
        }
        let chain: Vec<String> =
            json["chain"].as_array().map(|c| c.iter().filter_map(|p| p.as_str().map(String::from)).collect()).unwrap_or_default();
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(json["notAfterUnix"].as_u64().unwrap_or(0));
        let certificate = WorkloadCertificate {
            identity: identity.clone(),
            chain_pem: chain,
            key_pem: None,
            serial: json["serial"].as_str().unwrap_or_default().to_string(),
            not_before: SystemTime::now(),
            not_after,
        };
        Ok((certificate, key.serialize_pem()))
    }
}
