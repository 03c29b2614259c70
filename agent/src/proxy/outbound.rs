//! Outbound: connections an enrolled workload opened, redirected by connect4/6 to the agent's loopback
//! listener inside the workload's own netns. To another enrolled workload they go as HBONE (when the
//! agent has an identity configuration); anywhere else as plain TCP from the pod's netns. Connections to a
//! service port that carries HTTP go to the L7 proxy ([`super::http`]) instead, routed per request.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};
use warren_api::{
    tables::{AppProtocol, MESH_GATEWAY, OutboundTrafficPolicy},
    workloads::Pod,
};
use warren_identity::Identity;
use warren_maps::ConnectionKey;

use super::{
    Direction, ProxyShared, Record, connect_from, forward,
    hbone::{
        client::TunnelRequest,
        headers::{Baggage, ForwardedFor},
    },
    http::{self, detect::Detected},
    sni,
};
use crate::{
    inpod::Netns,
    telemetry::{
        self, TcpReport,
        peers::{ServiceMeta, UNKNOWN},
    },
    state::{
        pick_weighted,
        tls_routes::{self, TlsContext},
    },
};

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
    /// REGISTRY_ONLY first (what the registry does not know is refused, Istio's BlackHoleCluster). Then a
    /// service port carrying HTTP (declared, or detected on a port that names no protocol) goes to the L7
    /// proxy, request by request; a TLS port whose VirtualService has `tls` rules is routed by its SNI;
    /// anything else is routed once, for the whole connection.
    async fn proxy(self, shared: ProxyShared, upstreams: Arc<http::Upstreams>) {
        let (registered, service) = {
            let tables = shared.tables();
            let registered =
                tables.outbound_traffic_policy() == OutboundTrafficPolicy::AllowAny || tables.registered(&self.original);
            let service = tables.service_at(&self.original).map(|s| {
                let protocol = s.port(self.original.port()).map(|p| p.app_protocol());
                (s.key(), protocol, tables.tls_route(&s.key()).is_some())
            });
            (registered, service)
        };
        if !registered {
            shared.metrics.registry_only_refused.inc();
            warn!(pod = %self.pod, client = %self.peer, destination = %self.original,
                "outboundTrafficPolicy REGISTRY_ONLY: not in the registry; refused");
            return reset(self.client);
        }
        match service {
            Some((service, Some(protocol), _))
                if protocol.is_http()
                    || (protocol == AppProtocol::Detect && http::detect::detect(&self.client).await == Detected::Http) =>
            {
                let downstream = http::Downstream { pod: self.pod, client: self.peer, vip: self.original, service };
                http::serve_outbound(self.client, downstream, upstreams, shared).await
            }
            Some((service, _, true)) => self.proxy_tls(shared, service).await,
            _ => self.proxy_tcp(shared, Vec::new()).await,
        }
    }

    /// By the service's `tls` rules on the ClientHello's SNI; a connection no rule takes goes to the service
    /// itself. The ClientHello is sent on first, unchanged (TLS is not terminated).
    async fn proxy_tls(mut self, shared: ProxyShared, service: String) {
        let (hello, sni) = match sni::read_client_hello(&mut self.client).await {
            Ok(read) => read,
            Err(e) => {
                warn!(pod = %self.pod, client = %self.peer, destination = %self.original, "tls route: {e}; closing");
                return reset(self.client);
            }
        };
        let target = {
            let tables = shared.tables();
            let source = tables.pod(&self.pod).map(|p| p.as_ref());
            let rule = tables.tls_route(&service).and_then(|route| {
                let context = TlsContext {
                    sni: sni.as_deref(),
                    port: self.original.port(),
                    gateway: MESH_GATEWAY,
                    namespace: &route.origin.namespace,
                    source,
                };
                tls_routes::select(&route.tls, &context)
            });
            let destination = rule.and_then(|r| pick_weighted(&r.destinations, random()));
            destination.map(|d| http::RouteTarget::resolve(&tables, d, self.original.port(), Some(self.original)))
        };
        match target {
            Some(Ok(target)) => match target.resolved().await {
                Ok(target) => self.forward_tcp(shared, target.endpoint, hello).await,
                Err(e) => self.refuse_unroutable(&shared, e.to_string()),
            },
            Some(Err(e)) => self.refuse_unroutable(&shared, e.to_string()),
            None => self.proxy_tcp(shared, hello).await,
        }
    }

    /// To the service's endpoint by its L4 route (or where the client sent it), `first` sent ahead.
    async fn proxy_tcp(self, shared: ProxyShared, first: Vec<u8>) {
        match resolve_service(&shared, self.original).await {
            Ok(target) => self.forward_tcp(shared, target, first).await,
            Err(e) => self.refuse_unroutable(&shared, e),
        }
    }

    fn refuse_unroutable(self, shared: &ProxyShared, error: String) {
        shared.metrics.no_endpoint.inc();
        warn!(pod = %self.pod, client = %self.peer, destination = %self.original, "{error}; closing");
        reset(self.client)
    }

    async fn forward_tcp(self, shared: ProxyShared, destination: SocketAddr, first: Vec<u8>) {
        let Outbound { client, peer, original, netns, pod, source } = self;
        let addressed = Addressed { service: shared.telemetry.service_addressed(&shared.tables(), &original), original };
        let record =
            Record { direction: Direction::Outbound, pod, client: peer, destination, protocol: "tcp", peer_identity: None, report: None };
        forward_tcp(client, record, &netns, source, first, shared, addressed).await
    }
}

/// What the client addressed (a service VIP, a workload, an outside address), for telemetry.
pub(crate) struct Addressed {
    pub service: Arc<ServiceMeta>,
    pub original: SocketAddr,
}

impl Addressed {
    /// The hostname of the service addressed, if the client addressed one.
    fn service_host(&self) -> Option<String> {
        Some(self.service.host.clone()).filter(|host| host != UNKNOWN)
    }
}

/// `f` of the pod `key` (`namespace/name`), as this version's tables know it, else as the agent's own
/// source does (a mesh without a controller).
pub(crate) fn with_pod<T>(shared: &ProxyShared, key: &str, f: impl FnOnce(&Pod) -> T) -> Option<T> {
    if let Some(pod) = shared.tables().pod(key) {
        return Some(f(pod));
    }
    shared.mesh.read().unwrap().pod(key).map(f)
}

/// The CONNECT of a tunnel for `record.client` (a connection of `record.pod`, or one it serves as a
/// gateway) to `record.destination`, which addressed `service_host`.
fn tunnel_request(shared: &ProxyShared, record: &Record, service_host: Option<String>) -> TunnelRequest {
    let (client, destination) = (record.client, record.destination);
    let cluster = &shared.telemetry.cluster;
    let described = with_pod(shared, &record.pod, |pod| (forwarded_for(pod, client, &destination), Baggage::of(pod, cluster)));
    let unknown_pod = || (ForwardedFor { ip: canonical(client.ip()), port: Some(client.port()) }, Baggage::default());
    let (forwarded_for, baggage) = described.unwrap_or_else(unknown_pod);
    TunnelRequest { destination, forwarded_for, service_host, baggage }
}

/// `forwarded: for=` of `client`: its own address — but the pod's, of the destination's family, where it
/// reached the agent over loopback (every redirected connect does), keeping its port: the address the
/// peer would have seen without the mesh, as ztunnel's in-pod redirect leaves it.
fn forwarded_for(pod: &Pod, client: SocketAddr, destination: &SocketAddr) -> ForwardedFor {
    let ip = canonical(client.ip());
    let pod_ip = || pod.ips.iter().find(|ip| ip.is_ipv4() == destination.is_ipv4()).or(pod.ips.first()).copied();
    let ip = if ip.is_loopback() { pod_ip().unwrap_or(ip) } else { ip };
    ForwardedFor { ip, port: Some(client.port()) }
}

/// A v4 address on a dual-stack socket shows up as `::ffff:a.b.c.d`: it is `a.b.c.d`.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Proxies `client` to `record.destination` from the pod's netns: as HBONE (mTLS as `source`) when the
/// destination is an enrolled workload and the agent has identities, else plain TCP; `first` (bytes
/// already read off the client, such as a ClientHello) goes to the upstream ahead of the rest. Reported
/// by the source's agent as a connection to `addressed`.
pub(crate) async fn forward_tcp<C>(
    client: C,
    mut record: Record,
    netns: &Netns,
    source: Option<Identity>,
    first: Vec<u8>,
    shared: ProxyShared,
    addressed: Addressed,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let destination = record.destination;
    let service_host = addressed.service_host();
    let hbone = shared.hbone_peer(source.as_ref(), &destination.ip()).zip(source).map(|((pool, peer), source)| (pool, source, peer));
    let to = telemetry::Outbound { pod: &record.pod, service: addressed.service, endpoint: Some(destination.ip()), mtls: hbone.is_some() };
    let traffic = shared.telemetry.outbound(&shared.tables(), &shared.mesh, to);
    record.report = Some(TcpReport { traffic, addressed: addressed.original });
    let ahead = |mut upstream: Box<dyn Upstream>| async move {
        if !first.is_empty() {
            upstream.write_all(&first).await?;
        }
        anyhow::Ok(upstream)
    };
    match hbone {
        Some((pool, source, peer_identity)) => {
            record.protocol = "hbone";
            record.peer_identity = Some(peer_identity.to_string());
            let request = tunnel_request(&shared, &record, service_host);
            let open = async {
                let stream = pool.connect(netns, &source, &peer_identity, &request).await?;
                ahead(Box::new(stream)).await
            };
            forward(client, record, shared.clone(), open).await
        }
        None => {
            let open = async { ahead(Box::new(connect_from(netns, destination).await?)).await };
            forward(client, record, shared.clone(), open).await
        }
    }
}

/// An upstream connection, TCP or an HBONE stream.
pub(crate) trait Upstream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Upstream for T {}

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
    // The map holds a v4 client of a dual-stack socket as IPv4.
    let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
    let original = shared.original_dst.get(&ConnectionKey::new(netns_cookie, peer))?;
    Some((original.socket_addr()?, original.delay_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dual_stack_pod() -> Pod {
        serde_json::from_value(serde_json::json!({"name": "sleep", "uid": "u", "ips": ["10.1.0.5", "fd00::5"]})).unwrap()
    }

    fn shown(pod: &Pod, client: &str, destination: &str) -> String {
        forwarded_for(pod, client.parse().unwrap(), &destination.parse().unwrap()).to_string()
    }

    #[test]
    fn forwarded_names_the_pod_where_the_client_came_over_loopback() {
        let pod = dual_stack_pod();
        // Redirected connects reach the agent from loopback: the pod's address of the destination's family.
        assert_eq!(shown(&pod, "127.0.0.1:41000", "10.2.0.7:80"), r#""10.1.0.5:41000""#);
        assert_eq!(shown(&pod, "[::1]:41000", "[fd00::7]:80"), r#""[fd00::5]:41000""#);
        assert_eq!(shown(&pod, "[::ffff:127.0.0.1]:41000", "10.2.0.7:80"), r#""10.1.0.5:41000""#);
        // Control: a client that is not on loopback (a gateway's, from outside) is named as itself.
        assert_eq!(shown(&pod, "192.0.2.9:5000", "10.2.0.7:80"), r#""192.0.2.9:5000""#);
        assert_eq!(shown(&pod, "[::ffff:192.0.2.9]:5000", "10.2.0.7:80"), r#""192.0.2.9:5000""#);
        // A pod with no address of that family: its other one, rather than loopback.
        let v4_only = Pod { ips: vec!["10.1.0.5".parse().unwrap()], ..pod };
        assert_eq!(shown(&v4_only, "[::1]:41000", "[fd00::7]:80"), r#""10.1.0.5:41000""#);
    }
}
