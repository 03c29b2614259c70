//! Connections from one source pod to the endpoints its requests are routed to, pooled per endpoint:
//! HTTP/1.1 connections are reused one request at a time (back in the pool once the response body is
//! read), one HTTP/2 connection per endpoint carries every request to it. Each connection is an HBONE
//! tunnel (mTLS as the source's identity) when the endpoint is an enrolled workload, else plain TCP from
//! the pod's netns — the same choice the L4 path makes.
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use http::{Request, Response, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use warren_identity::Identity;

use super::{Body, Error};
use crate::{
    inpod::Netns,
    proxy::{ProxyShared, connect_from, hbone::H2Stream},
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// The transport under an upstream HTTP connection.
enum Transport {
    Tcp(tokio::net::TcpStream),
    Hbone(H2Stream),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Hbone(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Hbone(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Hbone(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Hbone(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One source pod's upstream connections.
pub struct Upstreams {
    netns: Arc<Netns>,
    /// Only the pod's own workload, over its loopback-reachable address (the inbound stage's upstream).
    local: bool,
    source: Option<Identity>,
    shared: ProxyShared,
    idle_h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Upstreams {
    pub fn new(netns: Arc<Netns>, source: Option<Identity>, shared: ProxyShared) -> Arc<Self> {
        Arc::new(Upstreams { netns, local: false, source, shared, idle_h1: Mutex::default(), h2: Mutex::default() })
    }

    /// Connections to the pod's own workload, dialed inside its netns (never captured again).
    pub fn local(netns: Arc<Netns>, shared: ProxyShared) -> Arc<Self> {
        Arc::new(Upstreams { netns, local: true, source: None, shared, idle_h1: Mutex::default(), h2: Mutex::default() })
    }

    /// Sends `request` to `endpoint` over HTTP/2 when `version` is, else HTTP/1.1 (an upgrade always on a
    /// connection of its own).
    pub async fn send(self: &Arc<Self>, endpoint: SocketAddr, version: Version, request: Request<Body>) -> Result<Response<Incoming>, Error> {
        if version == Version::HTTP_2 {
            return self.send_h2(endpoint, request).await;
        }
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        let mut request = request;
        // A pooled connection the server closed meanwhile gives the request back unsent: try the next.
        while let Some(mut sender) = (!upgrade).then(|| self.idle(endpoint)).flatten() {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.reuse(endpoint, sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(Error::UpstreamReset(e.into_error().to_string())),
                },
            }
        }
        let mut sender = self.handshake_h1(endpoint).await?;
        let response = sender.send_request(request).await.map_err(|e| Error::UpstreamReset(e.to_string()))?;
        if !upgrade {
            self.reuse(endpoint, sender);
        }
        Ok(response)
    }

    fn idle(&self, endpoint: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle_h1.lock().unwrap();
        let senders = idle.get_mut(&endpoint)?;
        while let Some(sender) = senders.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Back to the pool once the connection is idle again (the response body read to its end).
    fn reuse(self: &Arc<Self>, endpoint: SocketAddr, mut sender: http1::SendRequest<Body>) {
        let upstreams = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = upstreams.idle_h1.lock().unwrap();
                let senders = idle.entry(endpoint).or_default();
                if senders.len() < MAX_IDLE_PER_ENDPOINT {
                    senders.push(sender);
                }
            }
        });
    }

    async fn handshake_h1(&self, endpoint: SocketAddr) -> Result<http1::SendRequest<Body>, Error> {
        let io = TokioIo::new(self.dial(endpoint).await?);
        let (sender, connection) =
            http1::handshake(io).await.map_err(|e| Error::UpstreamConnect(format!("{endpoint}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, "upstream HTTP/1.1 connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn send_h2(&self, endpoint: SocketAddr, request: Request<Body>) -> Result<Response<Incoming>, Error> {
        let pooled = self.h2.lock().unwrap().get(&endpoint).filter(|s| !s.is_closed()).cloned();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                let io = TokioIo::new(self.dial(endpoint).await?);
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| Error::UpstreamConnect(format!("{endpoint}: {e}")))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%endpoint, "upstream HTTP/2 connection ended: {e}");
                    }
                });
                self.h2.lock().unwrap().insert(endpoint, sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(|e| Error::UpstreamReset(e.to_string()))?;
        sender.send_request(request).await.map_err(|e| Error::UpstreamReset(e.to_string()))
    }

    /// Whether connections to `ip` go as HBONE (the choice [`Upstreams::dial`] makes).
    pub fn tunnels_to(&self, ip: &std::net::IpAddr) -> bool {
        !self.local && self.shared.hbone_peer(self.source.as_ref(), ip).is_some()
    }

    async fn dial(&self, endpoint: SocketAddr) -> Result<Transport, Error> {
        let hbone = self.source.clone().filter(|_| !self.local).and_then(|source| {
            let (pool, peer) = self.shared.hbone_peer(Some(&source), &endpoint.ip())?;
            Some((pool, source, peer))
        });
        let connect_failed = |e: anyhow::Error| Error::UpstreamConnect(format!("{endpoint}: {e:#}"));
        match hbone {
            Some((pool, source, peer)) => {
                Ok(Transport::Hbone(pool.connect(&self.netns, &source, &peer, endpoint).await.map_err(connect_failed)?))
            }
            None => Ok(Transport::Tcp(connect_from(&self.netns, endpoint).await.map_err(connect_failed)?)),
        }
    }
}
