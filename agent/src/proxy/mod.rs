//! The in-agent L4 proxy: listeners inside enrolled pods, the connection table, byte copying.
//!
//! - outbound: the workload's redirected connect lands on the agent's loopback listener in the pod's
//!   netns; the original destination comes from the eBPF map; the agent dials it from the pod's netns.
//! - inbound: sk_lookup hands connections for the pod's addresses to the agent's inbound listener; the
//!   original destination is the accepted socket's local address; the agent dials the workload over the
//!   pod's loopback (which sk_lookup never captures).
//! - between enrolled pods, with an identity configuration: HBONE ([`hbone`]) — the outbound side
//!   tunnels to the destination pod's port 15008 as its workload identity, the inbound side serves
//!   15008 in each enrolled pod and delivers to the workload, knowing the peer's identity.
pub mod authz;
pub mod connections;
pub mod copy;
pub mod gateway;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod sni;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use anyhow::Result;
use tokio::sync::watch;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};
use warren_api::authz::Decision;
use warren_identity::Identity;

pub use connections::{ConnectionInfo, ConnectionTable};

use self::{
    authz::{Authorizer, Enforcer},
    hbone::pool::Pool,
};
use crate::{
    ebpf::OriginalDstLookup,
    inpod::Netns,
    metrics::{DirectionLabels, Metrics},
    state::{MeshIndex, MeshTables},
    telemetry::{TcpMeter, TcpReport, Telemetry},
};

/// What every listener task shares.
#[derive(Clone)]
pub struct ProxyShared {
    pub original_dst: OriginalDstLookup,
    pub metrics: Arc<Metrics>,
    /// Istio's metrics and the access log.
    pub telemetry: Arc<Telemetry>,
    pub connections: ConnectionTable,
    /// Every enrolled workload by IP: destinations that take HBONE.
    pub mesh: Arc<RwLock<MeshIndex>>,
    /// The controller's tables (services, routes, policies), one immutable snapshot per version; empty
    /// without a controller.
    pub tables: watch::Sender<Arc<MeshTables>>,
    pub authorizer: Arc<Authorizer>,
    /// HBONE connections; `None` when the agent has no identity configuration (plain L4 only).
    pub hbone: Option<Arc<Pool>>,
    /// Per (service, subset, port): endpoint health and load, pool limits, retry budgets.
    pub clusters: Arc<crate::resilience::cluster::Clusters>,
}

impl ProxyShared {
    /// The tables in force.
    pub fn tables(&self) -> Arc<MeshTables> {
        self.tables.borrow().clone()
    }

    /// The HBONE pool and the identity to expect at `ip`, when a connection from `source` there goes as
    /// HBONE: the agent has identities and `ip` is an enrolled workload's.
    pub fn hbone_peer(&self, source: Option<&Identity>, ip: &IpAddr) -> Option<(Arc<Pool>, Identity)> {
        let pool = self.hbone.clone().filter(|_| source.is_some())?;
        let peer = self.mesh.read().unwrap().enrolled(ip)?.identity(pool.certificates().trust_domain());
        Some((pool, peer))
    }

    /// Authorizes an inbound connection from `client` (with the SPIFFE `identity` mTLS proved, if any) to
    /// `destination`, and records the decision.
    pub fn authorize(
        &self,
        client: SocketAddr,
        identity: Option<&str>,
        destination: SocketAddr,
        by: Enforcer,
    ) -> Decision {
        let connection = warren_api::authz::Connection::new(client.ip(), identity, destination);
        self.authorizer.check(&self.tables(), &connection, client, destination, by)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    /// Into the mesh through a gateway pod's server.
    Gateway,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        }
    }
    fn labels(self) -> DirectionLabels {
        DirectionLabels { direction: self.as_str() }
    }
}

/// What the connection table and metrics say about a proxied connection.
pub(crate) struct Record {
    pub direction: Direction,
    pub pod: Arc<String>,
    pub client: SocketAddr,
    pub destination: SocketAddr,
    /// "tcp" or "hbone".
    pub protocol: &'static str,
    /// The peer workload's SPIFFE identity, when mTLS proved it.
    pub peer_identity: Option<String>,
    /// Istio's labels for the connection's TCP metrics and access log line (`None`: not reported, as a
    /// connection the L7 proxy serves — its requests are).
    pub report: Option<TcpReport>,
}

impl Record {
    /// Adds the connection to `table`; returns its id.
    pub(crate) fn open_in(&self, table: &ConnectionTable) -> u64 {
        table.open(
            self.direction.as_str(),
            self.pod.to_string(),
            self.client,
            self.destination,
            self.protocol,
            self.peer_identity.clone(),
        )
    }
}

/// Proxies `client` to the upstream `open` establishes, and records it.
pub(crate) async fn forward<C, U>(client: C, record: Record, shared: ProxyShared, open: impl Future<Output = Result<U>>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let labels = record.direction.labels();
    metrics.connections_opened.get_or_create(&labels).inc();
    let id = record.open_in(&shared.connections);
    debug!(pod = %record.pod, client = %record.client, destination = %record.destination, id,
        direction = record.direction.as_str(), protocol = record.protocol, peer = ?record.peer_identity, "connection");
    let closer = shared.connections.closer(id);
    let meter = record.report.clone().map(|report| TcpMeter::open(&shared.telemetry, report));
    let mut meters = copy::Meters {
        a_to_b: vec![metrics.sent_bytes.get_or_create(&labels).clone()],
        b_to_a: vec![metrics.received_bytes.get_or_create(&labels).clone()],
    };
    if let Some(meter) = &meter {
        meters.a_to_b.push(meter.sent.clone());
        meters.b_to_a.push(meter.received.clone());
    }
    let (sent, received, error, flags) = match open.await {
        Ok(upstream) => {
            metrics.active_connections.get_or_create(&labels).inc();
            let result = tokio::select! {
                (transferred, error) = copy::copy_metered(client, upstream, &meters) => {
                    let flags = if error.is_some() { "UR" } else { "-" };
                    (transferred.a_to_b, transferred.b_to_a, error.map(|e| format!("copy: {e}")), flags)
                }
                // Dropping both sides closes them (an HBONE stream is reset).
                reason = closer.closed() => (0, 0, Some(reason), "-"),
            };
            metrics.active_connections.get_or_create(&labels).dec();
            result
        }
        Err(e) => {
            metrics.connections_failed.get_or_create(&labels).inc();
            (0, 0, Some(format!("connect {} ({}): {e:#}", record.destination, record.protocol)), "UF")
        }
    };
    if let Some(meter) = meter {
        meter.close(flags, record.client, record.destination, (sent, received));
    }
    metrics.connections_closed.get_or_create(&labels).inc();
    if let Some(e) = &error {
        warn!(pod = %record.pod, client = %record.client, destination = %record.destination,
            direction = record.direction.as_str(), "{e}");
    }
    shared.connections.close(id, sent, received, error);
}

/// Opens a connection from inside the pod's netns, so it carries the pod's source address.
pub(crate) async fn connect_from(netns: &Netns, dst: SocketAddr) -> Result<TcpStream> {
    let socket = netns.agent_socket(dst.is_ipv4()).await?;
    Ok(socket.connect(dst).await?)
}
