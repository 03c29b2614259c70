//! The in-agent L4 proxy: listeners inside enrolled pods, the connection table, byte copying.
//!
//! - outbound: the workload's redirected connect lands on the agent's loopback listener in the pod's
//!   netns; the original destination comes from the eBPF map; the agent dials it from the pod's netns.
//! - inbound: sk_lookup hands connections for the pod's addresses to the agent's inbound listener; the
//!   original destination is the accepted socket's local address; the agent dials the workload over the
//!   pod's loopback (which sk_lookup never captures).
pub mod connections;
pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod outbound;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Result;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

pub use connections::{ConnectionInfo, ConnectionTable};

use crate::{
    ebpf::OriginalDstLookup,
    inpod::Netns,
    metrics::{DirectionLabels, Metrics},
};

/// What every listener task shares.
#[derive(Clone)]
pub struct ProxyShared {
    pub original_dst: OriginalDstLookup,
    pub metrics: Arc<Metrics>,
    pub connections: ConnectionTable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
    fn labels(self) -> DirectionLabels {
        DirectionLabels { direction: self.as_str() }
    }
}

/// Proxies one accepted connection to `destination`, dialed from the pod's netns; records it.
pub(crate) async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    destination: SocketAddr,
    direction: Direction,
    netns: Arc<Netns>,
    shared: ProxyShared,
    pod: Arc<String>,
) {
    let metrics = &shared.metrics;
    let labels = direction.labels();
    metrics.connections_opened.get_or_create(&labels).inc();
    let id = shared.connections.open(direction.as_str(), pod.to_string(), peer, destination);
    debug!(pod = %pod, client = %peer, destination = %destination, id, direction = direction.as_str(), "connection");
    let (sent, received, error) = match connect_from(&netns, destination).await {
        Ok(upstream) => {
            metrics.active_connections.get_or_create(&labels).inc();
            let (transferred, error) = copy::copy_bidirectional(client, upstream).await;
            metrics.active_connections.get_or_create(&labels).dec();
            (transferred.a_to_b, transferred.b_to_a, error.map(|e| format!("copy: {e}")))
        }
        Err(e) => {
            metrics.connections_failed.get_or_create(&labels).inc();
            (0, 0, Some(format!("connect {destination}: {e:#}")))
        }
    };
    metrics.sent_bytes.get_or_create(&labels).inc_by(sent);
    metrics.received_bytes.get_or_create(&labels).inc_by(received);
    metrics.connections_closed.get_or_create(&labels).inc();
    if let Some(e) = &error {
        warn!(pod = %pod, client = %peer, destination = %destination, direction = direction.as_str(), "{e}");
    }
    shared.connections.close(id, sent, received, error);
}

/// Opens a connection from inside the pod's netns, so it carries the pod's source address.
async fn connect_from(netns: &Netns, dst: SocketAddr) -> Result<TcpStream> {
    let socket = netns.run(move || if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }).await??;
    socket.set_nodelay(true)?;
    Ok(socket.connect(dst).await?)
}
