//! Outbound: connections an enrolled workload opened, redirected by connect4/6 to the agent's loopback
//! listener inside the workload's own netns. To another enrolled workload they go as HBONE (when the
//! agent has an identity configuration); anywhere else as plain TCP from the pod's netns.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tracing::{info, warn};
use warren_identity::Identity;
use warren_maps::ConnectionKey;

use super::{Direction, ProxyShared, Record, connect_from, forward};
use crate::inpod::Netns;

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
                let record =
                    Record { direction: Direction::Outbound, pod, client: peer, destination: original, protocol: "tcp", peer_identity: None };
                tokio::spawn(async move { forward(client, record, shared, connect_from(&netns, original)).await });
            }
        }
    }
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
