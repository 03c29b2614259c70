//! Connections from one source pod to the endpoints its requests are routed to, pooled per endpoint:
//! HTTP/1.1 connections are reused one request at a time (back in the pool once the response body is
//! read), one HTTP/2 connection per endpoint carries every request to it. Each connection is an HBONE
//! tunnel (mTLS as the source's identity) when the endpoint is an enrolled workload, else plain TCP from
//! the pod's netns — the same choice the L4 path makes. Its CONNECT names the routed service (`forwarded:
//! …;host=`) and the source pod (`baggage`); its client is the pod itself (`for=` its address, no port), as
//! one connection carries requests of many of the pod's clients.
//!
//! Pools are per (cluster, endpoint) and obey the cluster's `connectionPool`: connections counted against
//! `maxConnections` across every pod of the node (a request that needs one more waits as pending, up to
//! `http1MaxPendingRequests`, else overflows), `maxRequestsPerConnection`, `idleTimeout`,
//! `maxConnectionDuration`, `connectTimeout` and `tcpKeepalive`.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use warren_api::resilience::{ConnectionPool, TcpKeepalive};
use warren_identity::Identity;

use super::{Body, Error};
use crate::{
    inpod::Netns,
    proxy::{
        ProxyShared, connect_from,
        hbone::{
            H2Stream,
            client::TunnelRequest,
            headers::{Baggage, ForwardedFor},
        },
        outbound::with_pod,
    },
    resilience::cluster::{Cluster, Held, Limit, Limits},
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

/// Where a request goes: an endpoint of a cluster (whose pool limits apply), or — the inbound stage's
/// upstream, a mirror — an endpoint with no cluster and Istio's default pool settings.
pub struct Destination<'a> {
    pub endpoint: SocketAddr,
    pub cluster: Option<&'a Arc<Cluster>>,
    pub pool: &'a ConnectionPool,
}

/// Pools are per cluster (its id; 0 for none) and endpoint.
type PoolKey = (u64, SocketAddr);

/// An HTTP/1.1 connection at rest in the pool.
struct Idle {
    id: u64,
    sender: http1::SendRequest<Body>,
    born: Instant,
    served: u32,
}

/// The HTTP/2 connection of a pool key.
struct Multiplexed {
    sender: http2::SendRequest<Body>,
    born: Instant,
    last_used: Instant,
    served: Arc<AtomicU32>,
}

/// One source pod's upstream connections.
pub struct Upstreams {
    netns: Arc<Netns>,
    /// Only the pod's own workload, over its loopback-reachable address (the inbound stage's upstream).
    local: bool,
    source: Option<Identity>,
    /// The source pod (`namespace/name`; empty for the local pool): what the tunnels' `forwarded` and
    /// `baggage` describe.
    pod: Arc<String>,
    shared: ProxyShared,
    idle_h1: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    h2: Mutex<HashMap<PoolKey, Multiplexed>>,
    next_id: AtomicU64,
}

impl Upstreams {
    /// The pool of `pod`'s own requests (and of it as a gateway), as `source` when it has an identity.
    pub fn new(netns: Arc<Netns>, pod: Arc<String>, source: Option<Identity>, shared: ProxyShared) -> Arc<Self> {
        Arc::new(Upstreams::with(netns, false, pod, source, shared))
    }

    /// Connections to the pod's own workload, dialed inside its netns (never captured again).
    pub fn local(netns: Arc<Netns>, shared: ProxyShared) -> Arc<Self> {
        Arc::new(Upstreams::with(netns, true, Arc::default(), None, shared))
    }

    fn with(netns: Arc<Netns>, local: bool, pod: Arc<String>, source: Option<Identity>, shared: ProxyShared) -> Upstreams {
        let (idle_h1, h2, next_id) = (Mutex::default(), Mutex::default(), AtomicU64::new(1));
        Upstreams { netns, local, source, pod, shared, idle_h1, h2, next_id }
    }

    /// Sends `request` to the destination over HTTP/2 when `version` is, else HTTP/1.1 (an upgrade always
    /// on a connection of its own).
    pub async fn send(self: &Arc<Self>, to: &Destination<'_>, version: Version, request: Request<Body>) -> Result<Response<Incoming>, Error> {
        if version == Version::HTTP_2 {
            return self.send_h2(to, request).await;
        }
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        let key = (to.cluster.map_or(0, |c| c.id), to.endpoint);
        let mut request = request;
        loop {
            // Registered before looking, so a connection freed meanwhile is not missed.
            let released = to.cluster.map(|c| c.limits.released.notified());
            // A pooled connection the server closed meanwhile gives the request back unsent: try the next.
            while let Some(mut idle) = (!upgrade).then(|| self.idle(key, to.pool)).flatten() {
                match idle.sender.try_send_request(request).await {
                    Ok(response) => {
                        idle.served += 1;
                        self.reuse(key, idle, to);
                        return Ok(response);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(Error::UpstreamReset(e.into_error().to_string())),
                    },
                }
            }
            let Some(held) = self.connection_slot(to)? else {
                // Every connection is busy and at the limit: wait (as a pending request) for one.
                self.wait_pending(to, released).await?;
                continue;
            };
            let mut idle = self.handshake_h1(to, held).await?;
            let response = idle.sender.send_request(request).await.map_err(|e| Error::UpstreamReset(e.to_string()))?;
            idle.served = 1;
            if !upgrade {
                self.reuse(key, idle, to);
            }
            return Ok(response);
        }
    }

    /// A connection slot under `maxConnections`: `Ok(None)` when the limit is full.
    fn connection_slot(&self, to: &Destination<'_>) -> Result<Option<Option<Held>>, Error> {
        let Some(cluster) = to.cluster else { return Ok(Some(None)) };
        Ok(Limits::acquire(cluster, Limit::Connections, to.pool.tcp.max_connections).map(Some))
    }

    /// A place among the pending requests (`http1MaxPendingRequests`), else overflow.
    fn pending_slot(&self, to: &Destination<'_>) -> Result<Option<Held>, Error> {
        let Some(cluster) = to.cluster else { return Ok(None) };
        match Limits::acquire(cluster, Limit::Pending, to.pool.http.http1_max_pending_requests) {
            Some(held) => Ok(Some(held)),
            None => Err(Error::Overflow(format!("{}: pending requests over http1MaxPendingRequests", cluster.name()))),
        }
    }

    /// Waits, as one of the pending requests, for a connection to close or come back idle — at most the
    /// connect timeout (a pool whose connections never free up overflows instead of hanging).
    async fn wait_pending(&self, to: &Destination<'_>, released: Option<tokio::sync::futures::Notified<'_>>) -> Result<(), Error> {
        let _pending = self.pending_slot(to)?;
        let (Some(released), Some(cluster)) = (released, to.cluster) else { return Ok(()) };
        let limit = Duration::from_millis(to.pool.tcp.connect_timeout_ms());
        tokio::time::timeout(limit, released)
            .await
            .map_err(|_| Error::Overflow(format!("{}: no connection under maxConnections freed in {limit:?}", cluster.name())))
    }

    fn idle(&self, key: PoolKey, pool: &ConnectionPool) -> Option<Idle> {
        let mut idle = self.idle_h1.lock().unwrap();
        let senders = idle.get_mut(&key)?;
        while let Some(connection) = senders.pop() {
            if connection.sender.is_ready() && !expired(connection.born, pool) {
                return Some(connection);
            }
        }
        None
    }

    /// Back to the pool once the connection is idle again (the response body read to its end) — unless it
    /// served `maxRequestsPerConnection` or lived `maxConnectionDuration`; closed after `idleTimeout`.
    fn reuse(self: &Arc<Self>, key: PoolKey, mut idle: Idle, to: &Destination<'_>) {
        let http = &to.pool.http;
        if http.max_requests_per_connection.is_some_and(|max| idle.served >= max) || expired(idle.born, to.pool) {
            return;
        }
        let upstreams = self.clone();
        let cluster = to.cluster.cloned();
        let idle_timeout = Duration::from_millis(http.idle_timeout_ms());
        tokio::spawn(async move {
            if idle.sender.ready().await.is_err() {
                return;
            }
            let id = idle.id;
            {
                let mut pool = upstreams.idle_h1.lock().unwrap();
                let senders = pool.entry(key).or_default();
                if senders.len() >= MAX_IDLE_PER_ENDPOINT {
                    return;
                }
                senders.push(idle);
            }
            if let Some(cluster) = &cluster {
                cluster.limits.released.notify_waiters();
            }
            // Still idle after the timeout: closed (dropping its sender ends the connection).
            tokio::time::sleep(idle_timeout).await;
            if let Some(senders) = upstreams.idle_h1.lock().unwrap().get_mut(&key) {
                senders.retain(|c| c.id != id);
            }
        });
    }

    async fn handshake_h1(&self, to: &Destination<'_>, held: Option<Held>) -> Result<Idle, Error> {
        let endpoint = to.endpoint;
        let io = TokioIo::new(self.dial(to).await?);
        let (sender, connection) =
            http1::handshake(io).await.map_err(|e| Error::UpstreamConnect(format!("{endpoint}: {e}")))?;
        tokio::spawn(async move {
            // The connection counts against maxConnections until it ends.
            let _held = held;
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, "upstream HTTP/1.1 connection ended: {e}");
            }
        });
        Ok(Idle { id: self.next_id.fetch_add(1, Ordering::Relaxed), sender, born: Instant::now(), served: 0 })
    }

    async fn send_h2(&self, to: &Destination<'_>, request: Request<Body>) -> Result<Response<Incoming>, Error> {
        let key = (to.cluster.map_or(0, |c| c.id), to.endpoint);
        let mut sender = loop {
            let released = to.cluster.map(|c| c.limits.released.notified());
            if let Some(sender) = self.pooled_h2(key, to.pool) {
                break sender;
            }
            let Some(held) = self.connection_slot(to)? else {
                self.wait_pending(to, released).await?;
                continue;
            };
            break self.handshake_h2(key, to, held).await?;
        };
        sender.ready().await.map_err(|e| Error::UpstreamReset(e.to_string()))?;
        sender.send_request(request).await.map_err(h2_error)
    }

    /// The key's HTTP/2 connection while it is open, young enough, not idle past `idleTimeout` (checked
    /// when the pool is next used) and under `maxRequestsPerConnection` — else it leaves the pool: its
    /// streams finish, and it closes.
    fn pooled_h2(&self, key: PoolKey, pool: &ConnectionPool) -> Option<http2::SendRequest<Body>> {
        let mut connections = self.h2.lock().unwrap();
        let connection = connections.get_mut(&key)?;
        let served = connection.served.fetch_add(1, Ordering::Relaxed) + 1;
        let spent = pool.http.max_requests_per_connection.is_some_and(|max| served > max);
        let idle = connection.last_used.elapsed() >= Duration::from_millis(pool.http.idle_timeout_ms());
        if connection.sender.is_closed() || spent || idle || expired(connection.born, pool) {
            connections.remove(&key);
            return None;
        }
        connection.last_used = Instant::now();
        Some(connection.sender.clone())
    }

    async fn handshake_h2(&self, key: PoolKey, to: &Destination<'_>, held: Option<Held>) -> Result<http2::SendRequest<Body>, Error> {
        let endpoint = to.endpoint;
        let io = TokioIo::new(self.dial(to).await?);
        let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| Error::UpstreamConnect(format!("{endpoint}: {e}")))?;
        tokio::spawn(async move {
            // The connection counts against maxConnections until it ends (once the pool let go of it and
            // its last stream is done).
            let _held = held;
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, "upstream HTTP/2 connection ended: {e}");
            }
        });
        let (served, now) = (Arc::new(AtomicU32::new(1)), Instant::now());
        self.h2.lock().unwrap().insert(key, Multiplexed { sender: sender.clone(), born: now, last_used: now, served });
        Ok(sender)
    }

    pub fn shared(&self) -> &ProxyShared {
        &self.shared
    }

    /// Whether connections to `ip` go as HBONE (the choice [`Upstreams::dial`] makes).
    pub fn tunnels_to(&self, ip: &std::net::IpAddr) -> bool {
        !self.local && self.shared.hbone_peer(self.source.as_ref(), ip).is_some()
    }

    /// A connection to the destination within `connectTimeout` (Istio: 10 s).
    async fn dial(&self, to: &Destination<'_>) -> Result<Transport, Error> {
        let endpoint = to.endpoint;
        let limit = Duration::from_millis(to.pool.tcp.connect_timeout_ms());
        match tokio::time::timeout(limit, self.connect(to)).await {
            Ok(result) => result,
            Err(_) => Err(Error::UpstreamConnect(format!("{endpoint}: connect timeout after {limit:?}"))),
        }
    }

    async fn connect(&self, to: &Destination<'_>) -> Result<Transport, Error> {
        let endpoint = to.endpoint;
        let hbone = self.source.clone().filter(|_| !self.local).and_then(|source| {
            let (pool, peer) = self.shared.hbone_peer(Some(&source), &endpoint.ip())?;
            Some((pool, source, peer))
        });
        let connect_failed = |e: anyhow::Error| Error::UpstreamConnect(format!("{endpoint}: {e:#}"));
        match hbone {
            Some((pool, source, peer)) => {
                let request = self.tunnel_request(to);
                Ok(Transport::Hbone(pool.connect(&self.netns, &source, &peer, &request).await.map_err(connect_failed)?))
            }
            None => {
                let keepalive = to.pool.tcp.tcp_keepalive.as_ref();
                let stream = connect_from(&self.netns, endpoint).await.map_err(connect_failed)?;
                if let Some(keepalive) = keepalive {
                    set_keepalive(&stream, keepalive).map_err(|e| connect_failed(e.into()))?;
                }
                Ok(Transport::Tcp(stream))
            }
        }
    }

    /// The CONNECT of a connection to `to`: for the pod (its address of the endpoint's family, no port), to
    /// the cluster's service when the request was routed to one.
    fn tunnel_request(&self, to: &Destination<'_>) -> TunnelRequest {
        let endpoint = to.endpoint;
        let pod = self.pod.as_str();
        let cluster = &self.shared.telemetry.cluster;
        let described = with_pod(&self.shared, pod, |pod| {
            let ip = pod.ips.iter().find(|ip| ip.is_ipv4() == endpoint.is_ipv4()).or(pod.ips.first()).copied();
            (ip, Baggage::of(pod, cluster))
        });
        let (ip, baggage) = described.unwrap_or_default();
        // Without the pod's address (a pod no source knows yet), the unspecified address says so.
        let unspecified = if endpoint.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        TunnelRequest {
            destination: endpoint,
            forwarded_for: ForwardedFor { ip: ip.unwrap_or(unspecified), port: None },
            service_host: to.cluster.map(|c| c.hostname.clone()),
            baggage,
        }
    }
}

/// Past `maxConnectionDuration`.
fn expired(born: Instant, pool: &ConnectionPool) -> bool {
    pool.tcp.max_connection_duration_ms.is_some_and(|ms| born.elapsed() >= Duration::from_millis(ms))
}

/// REFUSED_STREAM is its own condition (safe to retry); other errors before a response are resets.
fn h2_error(e: hyper::Error) -> Error {
    use std::error::Error as _;
    let refused = e.source().and_then(|s| s.downcast_ref::<h2::Error>()).and_then(h2::Error::reason) == Some(h2::Reason::REFUSED_STREAM);
    if refused { Error::UpstreamRefused(e.to_string()) } else { Error::UpstreamReset(e.to_string()) }
}

/// `tcpKeepalive`: SO_KEEPALIVE with the probes, idle time and interval given (the kernel's for the rest).
fn set_keepalive(stream: &tokio::net::TcpStream, keepalive: &TcpKeepalive) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> std::io::Result<()> {
        // SAFETY: `fd` is an open socket owned by `stream` for this call; the option value is a c_int
        // whose size is passed alongside.
        let rc = unsafe {
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t)
        };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    if let Some(probes) = keepalive.probes {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes as libc::c_int)?;
    }
    if let Some(ms) = keepalive.time_ms {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (ms / 1000).max(1) as libc::c_int)?;
    }
    if let Some(ms) = keepalive.interval_ms {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (ms / 1000).max(1) as libc::c_int)?;
    }
    Ok(())
}
