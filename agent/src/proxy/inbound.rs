//! Inbound, two ways into an enrolled pod:
//! - plain TCP that sk_lookup hands to the agent's inbound listener (15006); the accepted socket's local
//!   address is where the client was going;
//! - HBONE on the pod's port 15008 (never captured): mTLS proves the peer's identity, each CONNECT names
//!   the destination, which must be one of the pod's own addresses.
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
    hbone, http,
};
use crate::{
    inpod::Netns,
    state::peer_authentication::Mode,
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
            report: Some(report(&shared, &pod, peer, destination, None)),
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
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %pod, "HBONE accept failed: {e}");
                continue;
            }
        };
        // HTTP/2 sends small control frames (WINDOW_UPDATE, SETTINGS ACK) while data is in flight: without
        // NODELAY they wait for delayed ACKs and the tunnel crawls.
        let _ = tcp.set_nodelay(true);
        let (netns, pod, pod_ips, shared, pool, identity, workload, gateway) = (
            netns.clone(),
            pod.clone(),
            pod_ips.clone(),
            shared.clone(),
            pool.clone(),
            identity.clone(),
            workload.clone(),
            gateway.clone(),
        );
        tokio::spawn(async move {
            let config = match pool.certificates().server_config(&identity).await {
                Ok(config) => config,
                Err(e) => {
                    warn!(pod = %pod, "no certificate for {identity}: {e:#}");
                    return;
                }
            };
            let tls = match TlsAcceptor::from(config).accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    warn!(pod = %pod, client = %remote, "HBONE mTLS refused: {e}");
                    shared.metrics.mtls_refused.inc();
                    return;
                }
            };
            let Some(peer) = warren_identity::tls::peer_identity(tls.get_ref().1) else {
                return;
            };
            let result = hbone::server::serve(tls, peer, move |destination, peer, tunnel| {
                let (netns, pod, pod_ips, shared, workload, gateway) =
                    (netns.clone(), pod.clone(), pod_ips.clone(), shared.clone(), workload.clone(), gateway.clone());
                async move {
                    if !pod_ips.contains(&destination.ip()) {
                        warn!(pod = %pod, peer = %peer, %destination, "HBONE CONNECT for an address that is not this pod's");
                        tunnel.refuse(StatusCode::BAD_REQUEST);
                        return;
                    }
                    let servers = shared.tables().gateways().servers(&pod, destination.port()).cloned();
                    if let Some(servers) = servers {
                        let Ok(stream) = tunnel.accept() else { return };
                        return gateway::serve(stream, remote, destination, servers, gateway, shared).await;
                    }
                    // The peer's identity is what its certificate proved in this connection's handshake.
                    let identity = peer.to_string();
                    // Where the policies name request attributes, each request decides.
                    let per_request = shared.tables().authorizes_requests(&destination);
                    if !per_request && !shared.authorize(remote, Some(&identity), destination, Enforcer::Hbone).allowed {
                        shared.metrics.policy_refused.inc();
                        tunnel.refuse(StatusCode::FORBIDDEN);
                        return;
                    }
                    if shared.tables().inbound_http(&destination) {
                        let Ok(stream) = tunnel.accept() else { return };
                        let inbound =
                            http::inbound::Inbound { pod, client: remote, destination, identity: Some(identity) };
                        return http::inbound::serve_inbound(stream, inbound, workload, shared).await;
                    }
                    let upstream = match connect_from(&netns, destination).await {
                        Ok(upstream) => upstream,
                        Err(e) => {
                            warn!(pod = %pod, peer = %peer, %destination, "HBONE: workload unreachable: {e:#}");
                            tunnel.refuse(StatusCode::SERVICE_UNAVAILABLE);
                            return;
                        }
                    };
                    let Ok(stream) = tunnel.accept() else { return };
                    let report = report(&shared, &pod, remote, destination, Some(&identity));
                    let record = Record {
                        direction: Direction::Inbound,
                        pod,
                        client: remote,
                        destination,
                        protocol: "hbone",
                        peer_identity: Some(identity.clone()),
                        report: Some(report),
                    };
                    forward(stream, record, shared, async { Ok(upstream) }).await
                }
            })
            .await;
            if let Err(e) = result {
                warn!(client = %remote, "HBONE connection: {e:#}");
            }
        });
    }
}

/// How the destination's agent reports a TCP connection into `pod`.
fn report(shared: &ProxyShared, pod: &str, client: SocketAddr, destination: SocketAddr, identity: Option<&str>) -> TcpReport {
    let tables = shared.tables();
    let service = tables.directory(&shared.telemetry.trust_domain).service_backed_by(&destination, None);
    let from = telemetry::Inbound { pod, service, client: client.ip(), peer: identity };
    TcpReport { traffic: shared.telemetry.inbound(&tables, &shared.mesh, from), addressed: destination }
}
