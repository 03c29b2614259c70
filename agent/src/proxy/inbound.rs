//! Inbound: connections for an enrolled pod's addresses, handed to the agent's inbound listener in the
//! pod's netns by sk_lookup. The accepted socket's local address is where the client was going.
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{Direction, ProxyShared, forward};
use crate::inpod::Netns;

pub async fn serve(listener: TcpListener, netns: Arc<Netns>, pod: Arc<String>, shared: ProxyShared) {
    info!(pod = %pod, addr = ?listener.local_addr().ok(), "inbound listener ready");
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %pod, "inbound accept failed: {e}");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let Ok(destination) = client.local_addr() else { continue };
        let (netns, shared, pod) = (netns.clone(), shared.clone(), pod.clone());
        tokio::spawn(forward(client, peer, destination, Direction::Inbound, netns, shared, pod));
    }
}
