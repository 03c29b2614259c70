//! HBONE connections, pooled per (source identity, destination address): the first tunnel between two
//! workloads dials destination:15008 from the source pod's netns and runs the mTLS + HTTP/2 handshakes;
//! later tunnels are new streams on the same connection. The connection is the pair's; what a CONNECT says
//! of its client and service ([`TunnelRequest`]) is each stream's.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use warren_identity::Identity;

use super::{
    H2Stream, HBONE_PORT,
    client::{ConnectError, Connection, TunnelRequest},
};
use crate::{identity::Certificates, inpod::Netns};

pub struct Pool {
    certificates: Arc<Certificates>,
    connections: Mutex<HashMap<(Identity, IpAddr), Connection>>,
}

impl Pool {
    pub fn new(certificates: Arc<Certificates>) -> Self {
        Pool { certificates, connections: Mutex::default() }
    }

    pub fn certificates(&self) -> &Arc<Certificates> {
        &self.certificates
    }

    /// A tunnel from `source` (a pod in `netns`) to `request.destination`, whose workload is `peer`.
    pub async fn connect(&self, netns: &Netns, source: &Identity, peer: &Identity, request: &TunnelRequest) -> Result<H2Stream> {
        let destination = request.destination;
        let key = (source.clone(), destination.ip());
        let pooled = self.connections.lock().unwrap().get(&key).cloned();
        if let Some(connection) = pooled {
            match connection.connect(request).await {
                Ok(stream) => return Ok(stream),
                // The peer answered (e.g. 401): the same on any connection, so it is the answer.
                Err(refused @ ConnectError::Refused { .. }) => return Err(refused.into()),
                // The connection went away (peer restarted, idle close): dial again below.
                Err(e) => tracing::debug!(%destination, "pooled HBONE connection unusable: {e}"),
            }
        }
        let connection = self.dial(netns, source, peer, destination.ip()).await?;
        self.connections.lock().unwrap().insert(key, connection.clone());
        Ok(connection.connect(request).await?)
    }

    async fn dial(&self, netns: &Netns, source: &Identity, peer: &Identity, ip: IpAddr) -> Result<Connection> {
        let config = self.certificates.client_config(source, peer).await?;
        let address = SocketAddr::new(ip, HBONE_PORT);
        let socket = netns.agent_socket(ip.is_ipv4()).await?;
        let tcp = socket.connect(address).await.with_context(|| format!("connecting to HBONE {address}"))?;
        // The peer is named by its SPIFFE identity, which the verifier checks; SNI carries nothing.
        let tls = TlsConnector::from(config)
            .connect(ServerName::try_from("hbone.warren").expect("valid name"), tcp)
            .await
            .with_context(|| format!("mTLS to {address} as {source}, expecting {peer}"))?;
        Connection::handshake(tls).await
    }
}
