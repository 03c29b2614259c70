//! Outbound: connections an enrolled workload opened, redirected by connect4/6 to the agent's loopback
//! listener inside the workload's own netns. To another enrolled workload they go as HBONE (when the
//! agent has an identity configuration); anywhere else as plain TCP from the pod's netns. Connections to a
//! service port that carries HTTP go to the L7 proxy ([`super::http`]) instead, routed per request.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};
use warren_api::tables::{AppProtocol, OutboundTrafficPolicy};
use warren_identity::Identity;
use warren_maps::ConnectionKey;

use super::{
    Direction, ProxyShared, Record, connect_from, forward,
    http::{self, detect::Detected},
};
use crate::{inpod::Netns, state::pick_weighted};

pub async fn serve(
    listener: TcpListener,
    netns_cookie: u64,
    netns: Arc<Netns>,
    pod: Arc<String>,
    source: Option<Identity>,
    upstreams: Arc<http::Upstreams>,
    shared: ProxyShared,
) {
    info!(pod = %pod, addr = ?listener.local_addr().ok(), "outbound listener ready");
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %pod, "outbound accept failed: {e}");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let Some((original, fault_delay)) = original_dst(&shared, netns_cookie, peer) else {
            // Not redirected by us (someone dialed the port directly), or the record aged out.
            shared.metrics.original_dst_missing.inc();
            warn!(pod = %pod, client = %peer, "no original destination recorded; closing");
            continue;
        };
        let connection = Outbound { client, peer, original, netns: netns.clone(), pod: pod.clone(), source: source.clone() };
        let (shared, upstreams) = (shared.clone(), upstreams.clone());
        tokio::spawn(async move {
            // A connection fault connect4/6 decided (CONNECT_FAULTS): held before anything reaches upstream.
            if fault_delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(fault_delay.into())).await;
            }
            connection.proxy(shared, upstreams).await
        });
    }
}

/// One redirected connection.
struct Outbound {
    client: TcpStream,
    peer: SocketAddr,
    /// Where the workload connected.
    original: SocketAddr,
    netns: Arc<Netns>,
    pod: Arc<String>,
    source: Option<Identity>,
}

impl Outbound {
    /// A service port carrying HTTP (declared, or detected on a port that names no protocol) goes to the L7
    /// proxy, request by request; anything else is routed once, for the whole connection.
    async fn proxy(self, shared: ProxyShared, upstreams: Arc<http::Upstreams>) {
        let l7 = {
            let tables = shared.tables();
            tables.service_at(&self.original).map(|s| (s.key(), s.port(self.original.port()).map(|p| p.app_protocol())))
        };
        if let Some((service, Some(protocol))) = l7 {
            let http = protocol.is_http()
                || (protocol == AppProtocol::Detect && http::detect::detect(&self.client).await == Detected::Http);
            if http {
                let downstream = http::Downstream { pod: self.pod, client: self.peer, vip: self.original, service };
                return http::serve_outbound(self.client, downstream, upstreams, shared).await;
            }
        }
        self.proxy_tcp(shared).await
    }

    async fn proxy_tcp(self, shared: ProxyShared) {
        let Outbound { client, peer, original, netns, pod, source } = self;
        // REGISTRY_ONLY: what the registry does not know is refused (Istio's BlackHoleCluster).
        let tables = shared.tables();
        if tables.outbound_traffic_policy() == OutboundTrafficPolicy::RegistryOnly && !tables.registered(&original) {
            shared.metrics.registry_only_refused.inc();
            warn!(pod = %pod, client = %peer, destination = %original, "outboundTrafficPolicy REGISTRY_ONLY: not in the registry; refused");
            return reset(client);
        }
        drop(tables);
        // A service address goes to one of its endpoints, by the route the controller pushed.
        let original = match resolve_service(&shared, original).await {
            Ok(target) => target,
            Err(e) => {
                shared.metrics.no_endpoint.inc();
                warn!(pod = %pod, client = %peer, destination = %original, "{e}; closing");
                return reset(client);
            }
        };
        let hbone = shared.hbone.clone().zip(source).and_then(|(pool, source)| {
            let mesh = shared.mesh.read().unwrap();
            let peer = mesh.enrolled(&original.ip())?.identity(pool.certificates().trust_domain());
            Some((pool, source, peer))
        });
        let mut record = Record {
            direction: Direction::Outbound,
            pod,
            client: peer,
            destination: original,
            protocol: "tcp",
            peer_identity: None,
        };
        match hbone {
            Some((pool, source, peer_identity)) => {
                record.protocol = "hbone";
                record.peer_identity = Some(peer_identity.to_string());
                let open = async { pool.connect(&netns, &source, &peer_identity, original).await };
                forward(client, record, shared, open).await
            }
            None => forward(client, record, shared, connect_from(&netns, original)).await,
        }
    }
}

/// A zero linger: the client sees a reset, not an orderly close.
fn reset(client: TcpStream) {
    #[allow(deprecated)]
    let _ = client.set_linger(Some(std::time::Duration::ZERO));
}

/// `destination` itself unless it is a service VIP:port; then an endpoint picked by the L4 route's weights
/// (spread over the chosen service or subset's endpoints).
async fn resolve_service(shared: &ProxyShared, destination: SocketAddr) -> Result<SocketAddr, String> {
    let target = {
        let tables = shared.tables();
        let Some(route) = tables.l4_route(&destination) else {
            return Ok(destination);
        };
        let chosen = pick_weighted(&route.destinations, random())
            .ok_or_else(|| format!("service {} has no route destination", route.service))?;
        // The same choice of port and endpoint as the L7 proxy's.
        http::RouteTarget::resolve(&tables, chosen, destination.port(), Some(destination)).map_err(|e| e.to_string())?
    };
    Ok(target.resolved().await.map_err(|e| e.to_string())?.endpoint)
}

/// A cheap random number (std's per-process random hash keys, mixed with a counter).
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local!(static KEYS: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new());
    KEYS.with(|keys| {
        let mut hasher = keys.build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.finish()
    })
}

/// Where the client connected, and the connection-fault delay connect4/6 decided for it (ms, 0: none).
fn original_dst(shared: &ProxyShared, netns_cookie: u64, peer: SocketAddr) -> Option<(SocketAddr, u32)> {
    // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; the map holds it as IPv4.
    let peer = match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        v4 => v4,
    };
    let original = shared.original_dst.get(&ConnectionKey::new(netns_cookie, peer))?;
    Some((original.socket_addr()?, original.delay_ms))
}
