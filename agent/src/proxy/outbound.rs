//! Outbound: connections an enrolled workload opened, redirected by connect4/6 to the agent's loopback
//! listener inside the workload's own netns. To another enrolled workload they go as HBONE (when the
//! agent has an identity configuration); anywhere else as plain TCP from the pod's netns.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tracing::{info, warn};
use warren_identity::Identity;
use warren_maps::ConnectionKey;

use super::{Direction, ProxyShared, Record, connect_from, forward};
use crate::{inpod::Netns, state::pick_weighted};

pub async fn serve(
    listener: TcpListener,
    netns_cookie: u64,
    netns: Arc<Netns>,
    pod: Arc<String>,
    source: Option<Identity>,
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
        let Some(original) = original_dst(&shared, netns_cookie, peer) else {
            // Not redirected by us (someone dialed the port directly), or the record aged out.
            shared.metrics.original_dst_missing.inc();
            warn!(pod = %pod, client = %peer, "no original destination recorded; closing");
            continue;
        };
        // A service address goes to one of its endpoints, by the route the controller pushed.
        let original = match resolve_service(&shared, original) {
            Ok(target) => target,
            Err(e) => {
                shared.metrics.no_endpoint.inc();
                warn!(pod = %pod, client = %peer, destination = %original, "{e}; closing");
                #[allow(deprecated)]
                let _ = client.set_linger(Some(std::time::Duration::ZERO));
                continue;
            }
        };
        let hbone = shared.hbone.clone().zip(source.clone()).and_then(|(pool, source)| {
            let mesh = shared.mesh.read().unwrap();
            let peer = mesh.enrolled(&original.ip())?.identity(pool.certificates().trust_domain());
            Some((pool, source, peer))
        });
        let (netns, shared, pod) = (netns.clone(), shared.clone(), pod.clone());
        match hbone {
            Some((pool, source, peer_identity)) => {
                let record = Record {
                    direction: Direction::Outbound,
                    pod,
                    client: peer,
                    destination: original,
                    protocol: "hbone",
                    peer_identity: Some(peer_identity.to_string()),
                };
                tokio::spawn(async move {
                    let open = async { pool.connect(&netns, &source, &peer_identity, original).await };
                    forward(client, record, shared, open).await
                });
            }
            None => {
                let record = Record {
                    direction: Direction::Outbound,
                    pod,
                    client: peer,
                    destination: original,
                    protocol: "tcp",
                    peer_identity: None,
                };
                tokio::spawn(async move { forward(client, record, shared, connect_from(&netns, original)).await });
            }
        }
    }
}

/// `destination` itself unless it is a service VIP:port; then an endpoint picked by the L4 route's weights
/// (spread over the chosen service or subset's endpoints).
fn resolve_service(shared: &ProxyShared, destination: SocketAddr) -> Result<SocketAddr, String> {
    let tables = shared.tables();
    let Some(route) = tables.l4_route(&destination) else {
        return Ok(destination);
    };
    let roll = random();
    let chosen = pick_weighted(&route.destinations, roll)
        .ok_or_else(|| format!("service {} has no route destination", route.service))?;
    let service = tables
        .service(&chosen.service)
        .ok_or_else(|| format!("route destination {} is not a known service", chosen.service))?;
    let port = chosen.port.unwrap_or(destination.port());
    let target_port = service.port(port).map(|p| p.target_port).unwrap_or(port);
    let ip = tables.endpoint_ip(&chosen.service, chosen.subset.as_deref(), (roll >> 32) as usize).ok_or_else(|| {
        let subset = chosen.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default();
        format!("service {}{subset} has no endpoints", chosen.service)
    })?;
    Ok(SocketAddr::new(ip, target_port))
}

/// A cheap random number (std's per-process random hash keys, mixed with a counter).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local!(static KEYS: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new());
    KEYS.with(|keys| {
        let mut hasher = keys.build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.finish()
    })
}

fn original_dst(shared: &ProxyShared, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
    // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; the map holds it as IPv4.
    let peer = match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        v4 => v4,
    };
    shared.original_dst.get(&ConnectionKey::new(netns_cookie, peer)).and_then(|o| o.socket_addr())
}
