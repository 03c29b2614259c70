//! The push service: agents hold one mTLS HTTP/2 stream each (`warren_config::push` has the protocol).
//! A client certificate must carry the agents' identity; the first update on a stream is a full snapshot,
//! later ones are diffs against what that agent last ACKed. One update is in flight per agent: changes
//! made meanwhile are folded into the next one.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Response, StatusCode};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use warren_config::{
    push::{self, FrameReader, Reply},
    tables::Resource,
};
use warren_identity::Identity;

use crate::{
    metrics::{Metrics, PendingPush, PushResult},
    pipeline::Snapshot,
};

/// What the controller knows about each connected agent.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub node: String,
    pub peer: String,
    pub connected: bool,
    pub sent_version: u64,
    pub acked_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
}

pub type Agents = Arc<Mutex<HashMap<String, AgentState>>>;

pub struct PushService {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Only clients with this identity may open a stream.
    pub agent_identity: Identity,
    pub agents: Agents,
    pub metrics: Arc<Metrics>,
    /// The agents' flow reports, for the mesh graph.
    pub flows: Arc<crate::graph::FlowStore>,
}

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, service: Arc<PushService>) -> Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    info!(addr = ?listener.local_addr().ok(), agents = %service.agent_identity, "push service ready");
    loop {
        let (tcp, peer) = listener.accept().await.context("accepting")?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(acceptor, tcp, peer, service).await {
                warn!(%peer, "push connection: {e:#}");
            }
        });
    }
}

async fn connection(acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, peer: SocketAddr, service: Arc<PushService>) -> Result<()> {
    // A TCP probe (the readiness probe, a port check) connects and closes without a byte: not a failed agent.
    if tcp.peek(&mut [0u8; 1]).await.is_ok_and(|n| n == 0) {
        tracing::debug!(%peer, "push port probed (closed before TLS)");
        return Ok(());
    }
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let identity = warren_identity::tls::peer_identity(tls.get_ref().1).context("no client certificate")?;
    let mut h2 = h2::server::Builder::new()
        .initial_window_size(1024 * 1024)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    while let Some(request) = h2.accept().await {
        let (request, mut respond) = request.context("HTTP/2")?;
        let refuse = |respond: &mut h2::server::SendResponse<Bytes>, code: StatusCode| {
            let _ = respond.send_response(Response::builder().status(code).body(()).expect("static"), true);
        };
        if request.uri().path() != push::PATH {
            // Another version's push path: answered with this one's, so the agent can say what differs.
            if request.uri().path().starts_with(push::PATH_PREFIX) {
                warn!(%peer, path = request.uri().path(), serves = push::PATH,
                    "push refused: the agent speaks another push protocol version (agent and controller versions differ)");
                let response = Response::builder().status(StatusCode::NOT_FOUND).header(push::PATH_HEADER, push::PATH);
                let _ = respond.send_response(response.body(()).expect("static"), true);
            } else {
                refuse(&mut respond, StatusCode::NOT_FOUND);
            }
            continue;
        }
        if identity != service.agent_identity {
            warn!(%peer, %identity, expected = %service.agent_identity, "push refused: not an agent's identity");
            refuse(&mut respond, StatusCode::FORBIDDEN);
            continue;
        }
        let node = request.headers().get(push::NODE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if node.is_empty() {
            refuse(&mut respond, StatusCode::BAD_REQUEST);
            continue;
        }
        let send = respond
            .send_response(Response::builder().status(StatusCode::OK).body(()).expect("static"), false)
            .context("answering")?;
        let service = service.clone();
        let body = request.into_body();
        tokio::spawn(async move {
            info!(%node, %peer, "agent connected");
            let connected = service.metrics.agent_connected();
            service.agents.lock().unwrap().insert(
                node.clone(),
                AgentState { node: node.clone(), peer: peer.to_string(), connected: true, ..Default::default() },
            );
            let result = stream(&node, send, body, &service).await;
            drop(connected);
            if let Some(state) = service.agents.lock().unwrap().get_mut(&node) {
                state.connected = false;
            }
            match result {
                Ok(()) => info!(%node, "agent disconnected"),
                Err(e) => info!(%node, "agent stream ended: {e:#}"),
            }
        });
    }
    Ok(())
}

/// Serves one agent's stream until it closes.
async fn stream(node: &str, mut send: SendStream<Bytes>, mut replies: RecvStream, service: &PushService) -> Result<()> {
    let (mut snapshots, agents) = (service.snapshots.clone(), &service.agents);
    // What the agent holds (by its last ACK) and whether it has acknowledged a full snapshot yet on this
    // stream: until then every update is full, so nothing from before the stream can linger.
    let mut acked: BTreeMap<String, Arc<Resource>> = BTreeMap::new();
    let mut synced = false;
    // The update awaiting its answer; a `PendingPush` dropped unanswered (the stream ends, a reply for
    // another version) counts as a failed push.
    let mut in_flight: Option<(u64, BTreeMap<String, Arc<Resource>>, PendingPush)> = None;
    let mut frames = FrameReader::default();
    let mut sent_version = 0;
    loop {
        if in_flight.is_none() {
            let snapshot = snapshots.borrow_and_update().clone();
            if snapshot.version != sent_version {
                let tables = snapshot.compiled.for_node(node);
                // A full snapshot is encoded straight from the compiled tables, a diff from its copies.
                let (frame, full, upserts, removals) = if synced {
                    let update = push::diff(snapshot.version, &acked, &tables);
                    (push::encode(&update), false, update.upserts.len(), update.removals.len())
                } else {
                    let body = push::encode_update(snapshot.version, true, tables.values().map(|r| &**r), &[]);
                    (push::frame(body), true, tables.len(), 0)
                };
                info!(node, version = snapshot.version, full, upserts, removals, bytes = frame.len(), "sending update");
                let pending = service.metrics.push_sent();
                send.send_data(Bytes::from(frame), false).context("sending")?;
                if full {
                    crate::pipeline::release_freed_memory();
                }
                sent_version = snapshot.version;
                in_flight = Some((snapshot.version, tables, pending));
                if let Some(state) = agents.lock().unwrap().get_mut(node) {
                    state.sent_version = sent_version;
                }
            }
        }
        tokio::select! {
            changed = snapshots.changed(), if in_flight.is_none() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            chunk = replies.data() => {
                let Some(chunk) = chunk else { return Ok(()) };
                let chunk = chunk.context("reading replies")?;
                let _ = replies.flow_control().release_capacity(chunk.len());
                frames.push(&chunk);
                while let Some(reply) = frames.next::<Reply>().map_err(anyhow::Error::msg)? {
                    // Only an ACK or a NACK answers the update in flight: an agent's flow report between
                    // answers must neither consume it nor count as its answer.
                    if let Reply::Flows { graph } = reply {
                        service.flows.report(node, graph);
                        continue;
                    }
                    let Some((version, tables, pending)) = in_flight.take() else {
                        warn!(node, ?reply, "reply with no update in flight");
                        continue;
                    };
                    match reply {
                        Reply::Ack { version: v } if v == version => {
                            acked = tables;
                            synced = true;
                            info!(node, version, ms = pending.elapsed().as_millis() as u64, "ACK");
                            pending.answered(PushResult::Ack);
                            if let Some(state) = agents.lock().unwrap().get_mut(node) {
                                state.acked_version = version;
                                state.last_nack = None;
                            }
                        }
                        Reply::Nack { version: v, error } if v == version => {
                            warn!(node, version, "NACK: {error}");
                            pending.answered(PushResult::Nack);
                            if let Some(state) = agents.lock().unwrap().get_mut(node) {
                                state.last_nack = Some(format!("version {version}: {error}"));
                            }
                        }
                        // `pending` drops unanswered: the push counts as an error.
                        other => warn!(node, expected = version, ?other, "reply for another version; ignored"),
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
