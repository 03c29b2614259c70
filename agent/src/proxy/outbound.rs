//! Outbound: connections an enrolled workload opened, redirected by connect4 to 127.0.0.1:<outbound port>
//! inside its own netns. The agent recovers the original destination and, for now, forwards plain L4
//! bytes there from the pod's netns.
use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};
use warren_maps::ConnectionKey;

use crate::{
    ebpf::OriginalDstLookup,
    inpod::Netns,
    metrics::{Metrics, OUTBOUND},
    proxy::ConnectionTable,
};

/// Everything an outbound listener needs about its pod.
pub struct OutboundPod {
    /// `namespace/name`
    pub pod: String,
    pub netns: Arc<Netns>,
    pub listener: TcpListener,
    pub netns_cookie: u64,
}

#[derive(Clone)]
pub struct ProxyShared {
    pub original_dst: OriginalDstLookup,
    pub metrics: Arc<Metrics>,
    pub connections: ConnectionTable,
}

impl OutboundPod {
    /// Binds the outbound listener on 127.0.0.1:`port` inside the pod's netns.
    pub fn bind(pod: String, netns: Arc<Netns>, port: u16) -> Result<Self> {
        let std_listener = netns
            .run_blocking(move || std::net::TcpListener::bind(("127.0.0.1", port)))?
            .with_context(|| format!("binding 127.0.0.1:{port} in the netns of {pod}"))?;
        std_listener.set_nonblocking(true)?;
        let netns_cookie = crate::sys::socket_netns_cookie(&std_listener).context("SO_NETNS_COOKIE")?;
        let listener = TcpListener::from_std(std_listener)?;
        Ok(OutboundPod { pod, netns, listener, netns_cookie })
    }

    pub async fn serve(self, shared: ProxyShared) {
        let pod = Arc::new(self.pod);
        info!(pod = %pod, addr = ?self.listener.local_addr().ok(), "outbound listener ready");
        loop {
            let (client, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(pod = %pod, "accept failed: {e}");
                    continue;
                }
            };
            let key = ConnectionKey::new(self.netns_cookie, peer);
            let Some(original) = shared.original_dst.get(&key).and_then(|o| o.socket_addr()) else {
                // Not redirected by us (someone dialed the port directly), or the record aged out.
                shared.metrics.original_dst_missing.inc();
                warn!(pod = %pod, client = %peer, "no original destination recorded; closing");
                continue;
            };
            let (netns, shared, pod) = (self.netns.clone(), shared.clone(), pod.clone());
            tokio::spawn(async move { forward(client, peer, original, netns, shared, pod).await });
        }
    }
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
    netns: Arc<Netns>,
    shared: ProxyShared,
    pod: Arc<String>,
) {
    let metrics = &shared.metrics;
    metrics.connections_opened.get_or_create(&OUTBOUND).inc();
    let id = shared.connections.open("outbound", pod.to_string(), peer, original);
    debug!(pod = %pod, client = %peer, original_dst = %original, id, "outbound connection");
    let upstream = connect_from(&netns, original).await;
    let (sent, received, error) = match upstream {
        Ok(mut upstream) => {
            metrics.active_connections.get_or_create(&OUTBOUND).inc();
            let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            metrics.active_connections.get_or_create(&OUTBOUND).dec();
            match result {
                Ok((sent, received)) => (sent, received, None),
                Err(e) => (0, 0, Some(format!("copy: {e}"))),
            }
        }
        Err(e) => {
            metrics.connections_failed.get_or_create(&OUTBOUND).inc();
            (0, 0, Some(format!("connect {original}: {e:#}")))
        }
    };
    metrics.sent_bytes.get_or_create(&OUTBOUND).inc_by(sent);
    metrics.received_bytes.get_or_create(&OUTBOUND).inc_by(received);
    metrics.connections_closed.get_or_create(&OUTBOUND).inc();
    if let Some(e) = &error {
        warn!(pod = %pod, client = %peer, original_dst = %original, "{e}");
    }
    shared.connections.close(id, sent, received, error);
}

/// Opens the upstream connection from inside the pod's netns, so it carries the pod's source address.
async fn connect_from(netns: &Netns, dst: SocketAddr) -> Result<TcpStream> {
    let socket = netns
        .run(move || if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() })
        .await??;
    Ok(socket.connect(dst).await?)
}
