//! Inbound, two ways into an enrolled pod:
//! - plain TCP that sk_lookup hands to the agent's inbound listener (15006); the accepted socket's local
//!   address is where the client was going;
//! - HBONE on the pod's port 15008 (never captured): mTLS proves the peer's identity, each CONNECT names
//!   the destination — one of the pod's own addresses, or (from ztunnel) a service hostname and port that
//!   this pod backs. Refusals carry ztunnel's statuses (400 not here, 401 policy, 503 unreachable).
//!
//! Either way the agent dials the workload inside the pod (a self-addressed connection sk_lookup lets by).
//! On an HTTP port whose policies name request attributes, the connection goes to the inbound L7 stage
//! ([`http::inbound`]), which decides each request.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ::http::StatusCode;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use warren_identity::Identity;

use super::{
    Direction, ProxyShared, Record,
    authz::Enforcer,
    connect_from, forward,
    gateway::{self, GatewayPod},
    hbone::{
        self,
        headers::{Baggage, HboneAddress},
        server::{Connect, PendingTunnel},
    },
    http,
    outbound::{canonical, with_pod},
};
use crate::{
    inpod::Netns,
    state::{MeshTables, peer_authentication::Mode},
    telemetry::{self, TcpReport},
};

/// `gateway`: the pod as a gateway (its outbound upstreams), for connections to a server port of a Gateway
/// that selects it.
pub async fn serve(listener: TcpListener, netns: Arc<Netns>, pod: Arc<String>, gateway: Arc<GatewayPod>, shared: ProxyShared) {
    info!(pod = %pod, addr = ?listener.local_addr().ok(), "inbound listener ready");
    let workload = http::Upstreams::local(netns.clone(), shared.clone());
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %pod, "inbound accept failed: {e}");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let Ok(destination) = client.local_addr() else {
            continue;
        };
        // A gateway's server port: served as the gateway (its clients are outside the mesh, so neither
        // PeerAuthentication nor the workload's policies apply here, as in Istio).
        let servers = shared.tables().gateways().servers(&pod, destination.port()).cloned();
        if let Some(servers) = servers {
            tokio::spawn(gateway::serve(client, peer, destination, servers, gateway.clone(), shared.clone()));
            continue;
        }
        // PeerAuthentication: STRICT takes mTLS (HBONE) only; plaintext is closed at once.
        if shared.mesh.read().unwrap().inbound_mode(&destination) == Mode::Strict {
            shared.metrics.plaintext_refused.inc();
            warn!(pod = %pod, client = %peer, %destination, "plaintext refused: PeerAuthentication STRICT");
            // A zero linger resets the connection (no blocking on drop, unlike a positive linger).
            #[allow(deprecated)]
            let _ = client.set_linger(Some(std::time::Duration::ZERO));
            continue;
        }
        // The kernel refused what its table decides; the agent decides again with the full policy (the same
        // evaluation), so a connection that raced a table change is still checked. Where the policies name
        // request attributes, each request decides instead.
        let per_request = shared.tables().authorizes_requests(&destination);
        if !per_request && !shared.authorize(peer, None, destination, Enforcer::Plaintext).allowed {
            shared.metrics.policy_refused.inc();
            #[allow(deprecated)]
            let _ = client.set_linger(Some(std::time::Duration::ZERO));
            continue;
        }
        // An HTTP port: request by request (reported, and decided when the policies ask).
        if shared.tables().inbound_http(&destination) {
            let inbound = http::inbound::Inbound { pod: pod.clone(), client: peer, destination, identity: None };
            tokio::spawn(http::inbound::serve_inbound(client, inbound, workload.clone(), shared.clone()));
            continue;
        }
        let record = Record {
            direction: Direction::Inbound,
            pod: pod.clone(),
            client: peer,
            destination,
            protocol: "tcp",
            peer_identity: None,
            report: Some(report(&shared, &pod, peer, destination, None, None)),
        };
        let (netns, shared) = (netns.clone(), shared.clone());
        tokio::spawn(async move { forward(client, record, shared, connect_from(&netns, destination)).await });
    }
}

/// The pod's HBONE server, presenting the pod's own identity. A CONNECT to one of the pod's gateway server
/// ports (a mesh client routed to a gateway, as to an egress gateway) is served as the gateway.
pub async fn serve_hbone(
    listener: TcpListener,
    netns: Arc<Netns>,
    pod: Arc<String>,
    identity: Identity,
    pod_ips: Arc<Vec<IpAddr>>,
    gateway: Arc<GatewayPod>,
    shared: ProxyShared,
) {
    info!(pod = %pod, addr = ?listener.local_addr().ok(), identity = %identity, "HBONE listener ready");
    let Some(pool) = shared.hbone.clone() else {
        return;
    };
    let workload = http::Upstreams::local(netns.clone(), shared.clone());
    let server = Arc::new(HboneServer { netns, pod, pod_ips, gateway, workload, shared });
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %server.pod, "HBONE accept failed: {e}");
                continue;
            }
        };
        // HTTP/2 sends small control frames (WINDOW_UPDATE, SETTINGS ACK) while data is in flight: without
        // NODELAY they wait for delayed ACKs and the tunnel crawls.
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else { continue };
        let (server, pool, identity) = (server.clone(), pool.clone(), identity.clone());
        tokio::spawn(async move {
            let config = match pool.certificates().server_config(&identity).await {
                Ok(config) => config,
                Err(e) => {
                    warn!(pod = %server.pod, "no certificate for {identity}: {e:#}");
                    return;
                }
            };
            let tls = match TlsAcceptor::from(config).accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    warn!(pod = %server.pod, client = %remote, "HBONE mTLS refused: {e}");
                    server.shared.metrics.mtls_refused.inc();
                    return;
                }
            };
            let Some(peer) = warren_identity::tls::peer_identity(tls.get_ref().1) else {
                return;
            };
            let arrival = Arrival { remote, local: canonical(local.ip()) };
            let result = hbone::server::serve(tls, peer, move |connect, tunnel| server.clone().open(connect, tunnel, arrival)).await;
            if let Err(e) = result {
                warn!(client = %remote, "HBONE connection: {e:#}");
            }
        });
    }
}

/// One pod's HBONE server: what each CONNECT to it needs.
struct HboneServer {
    netns: Arc<Netns>,
    pod: Arc<String>,
    pod_ips: Arc<Vec<IpAddr>>,
    gateway: Arc<GatewayPod>,
    /// The pod's own workload, for ports served request by request.
    workload: Arc<http::Upstreams>,
    shared: ProxyShared,
}

/// An HBONE connection's two ends: the client's address, and the pod address it arrived on.
#[derive(Clone, Copy)]
struct Arrival {
    remote: SocketAddr,
    local: IpAddr,
}

/// Why the pod's HBONE server refused a CONNECT.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} is not an address of this pod")]
    NotThisPod(SocketAddr),
    #[error("no service {0}")]
    UnknownService(String),
    #[error("service {host} has no port {port}")]
    NoServicePort { host: String, port: u16 },
    #[error("this pod is not an endpoint of {0}")]
    NotAnEndpoint(String),
    #[error("AuthorizationPolicy denies it")]
    Denied,
    #[error("workload unreachable: {0:#}")]
    Unreachable(anyhow::Error),
}

impl Refusal {
    /// ztunnel's answers: 400 for a destination that is not this pod (Warren counts a service it does not
    /// back as one); 503 for a hostname or service port it cannot resolve (ztunnel's
    /// `find_inbound_upstream` failures) and for an unreachable workload; 401 for a policy denial.
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NotThisPod(_) | Refusal::NotAnEndpoint(_) => StatusCode::BAD_REQUEST,
            Refusal::UnknownService(_) | Refusal::NoServicePort { .. } | Refusal::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Denied => StatusCode::UNAUTHORIZED,
        }
    }
}

impl HboneServer {
    /// Opens one CONNECT's tunnel: to the pod as a gateway, to its per-request stage, or straight to its
    /// workload — after the pod's AuthorizationPolicy let the peer in.
    async fn open(self: Arc<Self>, connect: Connect, tunnel: PendingTunnel, arrival: Arrival) {
        let (shared, remote) = (&self.shared, arrival.remote);
        let destination = match self.destination(&connect.address, arrival.local) {
            Ok(destination) => destination,
            Err(refusal) => return self.refuse(tunnel, &connect, remote, refusal),
        };
        let baggage = with_pod(shared, &self.pod, |pod| Baggage::of(pod, &shared.telemetry.cluster)).unwrap_or_default();
        let servers = shared.tables().gateways().servers(&self.pod, destination.port()).cloned();
        if let Some(servers) = servers {
            let Ok(stream) = tunnel.accept(&baggage) else { return };
            return gateway::serve(stream, remote, destination, servers, self.gateway.clone(), shared.clone()).await;
        }
        // The peer's identity is what its certificate proved in this connection's handshake.
        let identity = connect.peer.to_string();
        // Where the policies name request attributes, each request decides.
        let per_request = shared.tables().authorizes_requests(&destination);
        if !per_request && !shared.authorize(remote, Some(&identity), destination, Enforcer::Hbone).allowed {
            shared.metrics.policy_refused.inc();
            return self.refuse(tunnel, &connect, remote, Refusal::Denied);
        }
        let namespace = self.pod.split_once('/').map_or("", |(namespace, _)| namespace);
        if shared.tables().inbound_http_for(&destination, addressed_service(&connect), namespace) {
            let Ok(stream) = tunnel.accept(&baggage) else { return };
            let inbound = http::inbound::Inbound { pod: self.pod.clone(), client: remote, destination, identity: Some(identity) };
            return http::inbound::serve_inbound(stream, inbound, self.workload.clone(), shared.clone()).await;
        }
        let upstream = match connect_from(&self.netns, destination).await {
            Ok(upstream) => upstream,
            Err(e) => return self.refuse(tunnel, &connect, remote, Refusal::Unreachable(e)),
        };
        let Ok(stream) = tunnel.accept(&baggage) else { return };
        let report = report(shared, &self.pod, remote, destination, Some(&identity), addressed_service(&connect));
        let record = Record {
            direction: Direction::Inbound,
            pod: self.pod.clone(),
            client: remote,
            destination,
            protocol: "hbone",
            peer_identity: Some(identity),
            report: Some(report),
        };
        forward(stream, record, shared.clone(), async { Ok(upstream) }).await
    }

    /// Where a CONNECT that arrived on `local` goes ([`upstream_of`]).
    fn destination(&self, address: &HboneAddress, local: IpAddr) -> Result<SocketAddr, Refusal> {
        let namespace = self.pod.split_once('/').map_or("", |(namespace, _)| namespace);
        let here = ThisPod { namespace, ips: &self.pod_ips, local };
        upstream_of(&self.shared.tables(), &here, address)
    }

    fn refuse(&self, tunnel: PendingTunnel, connect: &Connect, remote: SocketAddr, refusal: Refusal) {
        let status = refusal.status();
        let trace = connect.trace.map(|t| t.to_string());
        // A denial has its own line, from the authorizer.
        if !matches!(refusal, Refusal::Denied) {
            warn!(pod = %self.pod, peer = %connect.peer, client = %remote, authority = %connect.address, trace = ?trace,
                "HBONE CONNECT: {refusal}; answered {status}");
        }
        tunnel.refuse(status);
    }
}

/// The pod a CONNECT arrived at.
struct ThisPod<'a> {
    namespace: &'a str,
    ips: &'a [IpAddr],
    /// The address the connection arrived on.
    local: IpAddr,
}

/// Where a CONNECT to `address` goes: one of the pod's own addresses as named; for a service hostname,
/// the service port's target port on the address the connection arrived on — if the pod is one of the
/// service's endpoints (ztunnel forwards there without asking).
fn upstream_of(tables: &MeshTables, pod: &ThisPod<'_>, address: &HboneAddress) -> Result<SocketAddr, Refusal> {
    let (host, port) = match address {
        HboneAddress::Socket(socket) if pod.ips.contains(&socket.ip()) => return Ok(*socket),
        HboneAddress::Socket(socket) => return Err(Refusal::NotThisPod(*socket)),
        HboneAddress::Service { host, port } => (host, *port),
    };
    let service = tables.service_by_hostname(host, pod.namespace).ok_or_else(|| Refusal::UnknownService(host.clone()))?;
    let target = service.port(port).map(|p| p.target_port).filter(|p| *p != 0);
    let target = target.ok_or_else(|| Refusal::NoServicePort { host: host.clone(), port })?;
    if !pod.ips.contains(&pod.local) {
        return Err(Refusal::NotThisPod(SocketAddr::new(pod.local, target)));
    }
    if !service.endpoints.iter().any(|e| pod.ips.contains(&e.ip)) {
        return Err(Refusal::NotAnEndpoint(service.key()));
    }
    Ok(SocketAddr::new(pod.local, target))
}

/// The service the client addressed, by its proxy's account: `forwarded`'s `host=`, else the hostname
/// the CONNECT named (the destination's agent still takes it only if the pod backs it).
fn addressed_service(connect: &Connect) -> Option<&str> {
    let named = match &connect.address {
        HboneAddress::Service { host, .. } => Some(host.as_str()),
        HboneAddress::Socket(_) => None,
    };
    connect.forwarded_host.as_deref().or(named)
}

/// How the destination's agent reports a TCP connection into `pod`: for the service `addressed` names
/// (the client's proxy's word) if the pod backs it there, else the first it backs there.
fn report(
    shared: &ProxyShared,
    pod: &str,
    client: SocketAddr,
    destination: SocketAddr,
    identity: Option<&str>,
    addressed: Option<&str>,
) -> TcpReport {
    let tables = shared.tables();
    let service = tables.directory(&shared.telemetry.trust_domain).service_backed_by(&destination, addressed);
    let from = telemetry::Inbound { pod, service, client: client.ip(), peer: identity };
    TcpReport { traffic: shared.telemetry.inbound(&tables, &shared.mesh, from), addressed: destination }
}

#[cfg(test)]
mod tests {
    use warren_config::{cluster::ClusterState, compile::compile};
    use warren_identity::Identity;

    use super::*;

    /// Pod r1 (reviews, dual-stack) and ra1 (ratings) in namespace shop; `reviews` maps 9080 → 8080 and
    /// 9090 → 9091, `reviews-alias` 80 → 8080 on the same pods, `ratings` 80 → 80 on ra1 only.
    fn tables() -> MeshTables {
        let service = |name: &str, app: &str, ports: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{selector: {{app: {app}}}, ports: [{ports}]}}\n---\n"
            )
        };
        let mut state = ClusterState::default();
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n".to_string()
            + &service("reviews", "reviews", "{name: tcp, port: 9080, targetPort: 8080}, {name: admin, port: 9090, targetPort: 9091}")
            + &service("reviews-alias", "reviews", "{name: tcp, port: 80, targetPort: 8080}")
            + &service("ratings", "ratings", "{name: tcp, port: 80}")
            + "apiVersion: v1\nkind: Pod\nmetadata: {name: r1, namespace: shop, uid: u1, labels: {app: reviews}}\n\
               spec: {containers: [], nodeName: n1}\n\
               status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: 'fd00::2'}]}\n---\n\
               apiVersion: v1\nkind: Pod\nmetadata: {name: ra1, namespace: shop, uid: u2, labels: {app: ratings}}\n\
               spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.3}\n";
        state.add_yaml(&yaml).unwrap();
        MeshTables::new(1, compile(&state).tables_for_node("n1")).unwrap()
    }

    const REVIEWS_IPS: [&str; 2] = ["10.244.1.2", "fd00::2"];

    /// Where `authority` goes on a pod with `ips`, arrived on `local`: the address, or the refusal's status.
    fn resolve(tables: &MeshTables, ips: &[&str], local: &str, authority: &str) -> Result<String, StatusCode> {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        let pod = ThisPod { namespace: "shop", ips: &ips, local: local.parse().unwrap() };
        let address = HboneAddress::parse(authority).unwrap();
        upstream_of(tables, &pod, &address).map(|a| a.to_string()).map_err(|e| e.status())
    }

    #[test]
    fn an_address_of_this_pod_goes_where_it_names() {
        let t = tables();
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", "10.244.1.2:8080"), Ok("10.244.1.2:8080".into()));
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", "[fd00::2]:8080"), Ok("[fd00::2]:8080".into()));
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", "10.244.1.3:8080"), Err(StatusCode::BAD_REQUEST), "another pod's");
    }

    #[test]
    fn a_service_hostname_goes_to_its_target_port_on_this_pod() {
        let t = tables();
        let reviews = "reviews.shop.svc.cluster.local";
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", &format!("{reviews}:9080")), Ok("10.244.1.2:8080".into()));
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", &format!("{reviews}:9090")), Ok("10.244.1.2:9091".into()));
        // The family the connection arrived on.
        assert_eq!(resolve(&t, &REVIEWS_IPS, "fd00::2", &format!("{reviews}:9080")), Ok("[fd00::2]:8080".into()));
        // Not a port of the service, no such service: ztunnel's 503 for what it cannot resolve.
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", &format!("{reviews}:1234")), Err(StatusCode::SERVICE_UNAVAILABLE));
        let unknown = "nosuch.shop.svc.cluster.local:80";
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", unknown), Err(StatusCode::SERVICE_UNAVAILABLE));
        // A service this pod does not back: 400, as an address that is not this pod's. Control: its own
        // endpoint takes it.
        let ratings = "ratings.shop.svc.cluster.local:80";
        assert_eq!(resolve(&t, &REVIEWS_IPS, "10.244.1.2", ratings), Err(StatusCode::BAD_REQUEST));
        assert_eq!(resolve(&t, &["10.244.1.3"], "10.244.1.3", ratings), Ok("10.244.1.3:80".into()));
    }

    #[test]
    fn a_policy_denial_is_answered_401_as_ztunnel_does() {
        assert_eq!(Refusal::Denied.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::Unreachable(anyhow::anyhow!("refused")).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    fn connect(authority: &str, forwarded_host: Option<&str>) -> Connect {
        Connect {
            address: HboneAddress::parse(authority).unwrap(),
            peer: Identity::new("cluster.local", "a", "client"),
            forwarded_host: forwarded_host.map(str::to_string),
            trace: None,
        }
    }

    #[test]
    fn the_destination_reports_the_service_the_client_named_when_the_pod_backs_it() {
        let t = tables();
        let directory = t.directory("cluster.local");
        let destination: SocketAddr = "10.244.1.2:8080".parse().unwrap();
        let reported = |c: &Connect| directory.service_backed_by(&destination, addressed_service(c)).host.clone();
        // The pod backs reviews and reviews-alias on 8080: forwarded's host decides between them…
        let alias = "reviews-alias.shop.svc.cluster.local";
        assert_eq!(reported(&connect("10.244.1.2:8080", Some(alias))), alias);
        // …the CONNECT's own hostname when it has none (and forwarded's when both are there)…
        assert_eq!(reported(&connect(&format!("{alias}:80"), None)), alias);
        let reviews = "reviews.shop.svc.cluster.local";
        assert_eq!(reported(&connect(&format!("{alias}:80"), Some(reviews))), reviews);
        // …a service it does not back there is no answer (control: without any name, the first it backs).
        let first = reported(&connect("10.244.1.2:8080", None));
        assert_eq!(reported(&connect("10.244.1.2:8080", Some("ratings.shop.svc.cluster.local"))), first);
        assert!([reviews, alias].contains(&first.as_str()), "{first}");
    }
}
