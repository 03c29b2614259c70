//! The controller's push: one long-lived mTLS HTTP/2 stream to warren-controller (see
//! `warren_api::push`). Each update is applied — eBPF maps first, then the proxy's tables and the
//! workloads — and ACKed; one that cannot be applied is NACKed and the last good version stays. When the
//! stream breaks the agent keeps serving what it holds and reconnects with backoff; the controller's first
//! update on a new stream is a full snapshot, which replaces everything (no stale entries survive).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use warren_api::push::{self, FrameReader, Reply, Update};
use warren_identity::Identity;

use crate::{
    ebpf::Datapath,
    identity::Certificates,
    state::{MeshTables, Workloads},
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerSource {
    /// host:port of warren-controller's push service (15010).
    pub address: String,
    /// The controller's (and the agents') namespace: the controller's identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/warren-controller.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The ServiceAccount agents run as; the agent's client certificate carries that identity.
    #[serde(default = "default_agent_service_account")]
    pub agent_service_account: String,
}

fn default_namespace() -> String {
    "warren-system".into()
}
fn default_agent_service_account() -> String {
    "warren-agent".into()
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `inspect` shows about the push.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushStatus {
    pub controller: String,
    pub connected: bool,
    /// Version of the tables in force.
    pub version: u64,
    pub connects: u64,
    pub updates_applied: u64,
    pub updates_refused: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix milliseconds of the last applied update.
    pub applied_at_unix_ms: u64,
}

/// Applies pushed tables to this node: eBPF maps, the proxy's tables, the workloads.
pub struct Applier {
    pub node: String,
    pub datapath: Arc<Mutex<Datapath>>,
    pub tables: watch::Sender<Arc<MeshTables>>,
    pub workloads: watch::Sender<Workloads>,
    pub status: Arc<Mutex<PushStatus>>,
    /// Whose flow table the agent reports to the controller.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

impl Applier {
    fn write_maps(&self, index: &MeshTables) -> Result<()> {
        let routes = index.service_routes();
        let authz = crate::ebpf::l4_authz_entries(&index.l4_authz(&self.node));
        let mut datapath = self.datapath.lock().unwrap();
        datapath.sync_service_routes(&routes)?;
        datapath.sync_connect_faults(&index.connect_faults())?;
        datapath.sync_l4_authz(&authz)?;
        Ok(())
    }

    /// Makes `update` applied to the tables in force the tables in force, or leaves the previous ones (maps
    /// included) in force.
    pub fn apply(&self, update: Update) -> Result<()> {
        let index = self.tables.borrow().updated(update)?;
        self.install(index)
    }

    fn install(&self, index: MeshTables) -> Result<()> {
        if let Err(e) = self.write_maps(&index) {
            let previous = self.tables.borrow().clone();
            if let Err(restore) = self.write_maps(&previous) {
                warn!("restoring the maps of version {} failed: {restore:#}", previous.version);
            }
            return Err(e);
        }
        let workloads = index.workloads();
        self.tables.send_replace(Arc::new(index));
        self.workloads.send_if_modified(|current| {
            let changed = *current != workloads;
            *current = workloads;
            changed
        });
        Ok(())
    }
}

/// Runs the push client until the agent exits.
pub fn spawn(config: ControllerSource, certificates: Arc<Certificates>, applier: Arc<Applier>) {
    applier.status.lock().unwrap().controller = config.address.clone();
    tokio::spawn(async move {
        let trust_domain = certificates.trust_domain().to_string();
        let me = Identity::new(&trust_domain, &config.namespace, &config.agent_service_account);
        let controller = Identity::new(&trust_domain, &config.namespace, "warren-controller");
        let mut backoff = BACKOFF_START;
        loop {
            let started = Instant::now();
            let result = session(&config, &certificates, &me, &controller, &applier).await;
            {
                let mut status = applier.status.lock().unwrap();
                status.connected = false;
                status.last_error = result.as_ref().err().map(|e| format!("{e:#}"));
            }
            match result {
                Ok(()) => {
                    info!(controller = %config.address, "push stream closed by the controller")
                }
                Err(e) => {
                    warn!(controller = %config.address, "push stream: {e:#}; keeping version {}", applier.tables.borrow().version)
                }
            }
            // A stream that lived a while resets the backoff; a failing controller is retried ever slower.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_START;
            }
            let jitter = Duration::from_millis(
                u64::from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_millis())
                    % 50,
            );
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
}

async fn session(
    config: &ControllerSource,
    certificates: &Certificates,
    me: &Identity,
    controller: &Identity,
    applier: &Applier,
) -> Result<()> {
    let tls = certificates.client_config(me, controller).await.context("the agent's client certificate")?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&config.address))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {}: timed out", config.address))?
        .with_context(|| format!("connecting to {}", config.address))?;
    let _ = tcp.set_nodelay(true);
    let server_name = rustls::pki_types::ServerName::try_from("warren-controller").expect("a valid DNS name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .context("TLS handshake with the controller")?;
    let (mut requests, connection) = h2::client::Builder::new()
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .handshake::<_, Bytes>(stream)
        .await
        .context("HTTP/2 handshake with the controller")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("https://warren-controller{}", push::PATH))
        .header(push::NODE_HEADER, &applier.node)
        .body(())
        .expect("static request parts");
    let (response, mut replies) = requests.send_request(request, false).context("opening the push stream")?;
    let response = response.await.context("the controller's answer")?;
    if response.status() != http::StatusCode::OK {
        if response.status() == http::StatusCode::NOT_FOUND {
            let serves = response.headers().get(push::PATH_HEADER).and_then(|v| v.to_str().ok());
            bail!(
                "the controller does not serve this agent's push protocol {} (it serves {}): agent and controller \
                 are different versions",
                push::PATH,
                serves.unwrap_or("another")
            );
        }
        bail!("the controller answered {}", response.status());
    }
    {
        let mut status = applier.status.lock().unwrap();
        status.connected = true;
        status.connects += 1;
        status.last_error = None;
    }
    info!(controller = %config.address, "push stream open");
    let mut body = response.into_body();
    let mut frames = FrameReader::default();
    let mut report = tokio::time::interval(push::FLOW_REPORT_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            chunk = body.data() => {
                let Some(chunk) = chunk else { return Ok(()) };
                let chunk = chunk.context("reading the push stream")?;
                let _ = body.flow_control().release_capacity(chunk.len());
                frames.push(&chunk);
                while let Some(update) = frames.next::<Update>().map_err(anyhow::Error::msg)? {
                    let reply = handle(update, applier);
                    replies.send_data(Bytes::from(push::encode(&reply)), false).context("sending the reply")?;
                }
            }
            _ = report.tick() => {
                let graph = applier.telemetry.flows.graph(&applier.node);
                replies.send_data(Bytes::from(push::encode(&Reply::Flows { graph })), false).context("sending the flow report")?;
            }
        }
    }
}

/// Applies `update` to the tables in force (the only copy the agent keeps: a refused update leaves them).
fn handle(update: Update, applier: &Applier) -> Reply {
    let version = update.version;
    let (full, count) = (update.full, (update.upserts.len(), update.removals.len()));
    match applier.apply(update) {
        Ok(()) => {
            let mut status = applier.status.lock().unwrap();
            status.version = version;
            status.updates_applied += 1;
            status.applied_at_unix_ms =
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            info!(version, full, upserts = count.0, removals = count.1, "tables applied");
            // The previous tables and the update's frame are freed: give their pages back (glibc keeps
            // them in its arenas otherwise, and a full snapshot of a large mesh is tens of MiB).
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free pages of the allocator's arenas.
            unsafe {
                libc::malloc_trim(0);
            }
            Reply::Ack { version }
        }
        Err(e) => {
            let error = format!("{e:#}");
            warn!(version, "tables refused (NACK): {error}");
            let mut status = applier.status.lock().unwrap();
            status.updates_refused += 1;
            status.last_nack = Some(format!("version {version}: {error}"));
            Reply::Nack { version, error }
        }
    }
}
