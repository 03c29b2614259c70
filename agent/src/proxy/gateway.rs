//! Gateways: a pod an Istio Gateway selects is served by its node's agent, like any enrolled pod — no
//! proxy in the pod. A connection to one of the gateway's server ports (sk_lookup hands it to the agent's
//! inbound listener in that pod) is served here: TLS terminated with the server's `credentialName`
//! certificate when the server says so (the SNI picks the server), then each request routed by the
//! VirtualServices bound to the gateway, through the L7 pipeline mesh requests take (faults, rewrites,
//! timeouts, mirrors), and sent on from the gateway pod as its own workload identity (HBONE to enrolled
//! destinations).
use std::{net::SocketAddr, sync::Arc};

use ::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, warn};

use warren_identity::Identity;

use super::{
    Direction, ProxyShared, Record,
    http::{self, Body, Error, Selected, Upstreams},
    sni,
};
use crate::{
    inpod::Netns,
    telemetry::{
        istio::Reporter,
        request::{self, Exchange},
    },
    state::{
        gateways::{PortServers, ServerBinding, request_host},
        http_routes::RequestContext,
        pick_weighted,
        tls_routes::{self, TlsContext},
    },
};

/// A gateway pod: its name, its upstream connections for requests (from its netns, as its identity), and
/// that netns and identity for connections routed whole (PASSTHROUGH).
pub struct GatewayPod {
    pub pod: Arc<String>,
    pub upstreams: Arc<Upstreams>,
    pub netns: Arc<Netns>,
    pub identity: Option<Identity>,
}

/// One connection to a gateway server port.
struct Connection {
    gateway: Arc<GatewayPod>,
    client: SocketAddr,
    /// The gateway pod's address and server port the client connected to.
    local: SocketAddr,
    servers: Arc<PortServers>,
    /// The server the TLS handshake chose (every request on the connection is its); `None` on plaintext,
    /// where each request's `Host` chooses.
    tls_server: Option<Arc<ServerBinding>>,
}

/// Serves one connection to a gateway server port: `client` is the accepted socket (from outside the mesh)
/// or an HBONE tunnel (a mesh client sent by its routes, as to an egress gateway).
pub async fn serve<IO>(
    client: IO,
    peer: SocketAddr,
    destination: SocketAddr,
    servers: Arc<PortServers>,
    gateway: Arc<GatewayPod>,
    shared: ProxyShared,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let record = |protocol| Record {
        direction: Direction::Gateway,
        pod: gateway.pod.clone(),
        client: peer,
        destination,
        protocol,
        peer_identity: None,
        report: None,
    };
    if servers.passthrough() {
        return passthrough(client, record("tcp"), servers, gateway, shared).await;
    }
    if !servers.terminates_tls() {
        let record = record("http");
        let connection = Arc::new(Connection { gateway, client: peer, local: destination, servers, tls_server: None });
        return serve_requests(client, record, connection, shared).await;
    }
    let (tls, server) = match handshake(client, &servers).await {
        Ok(accepted) => accepted,
        Err(e) => {
            shared.metrics.gateway_refused.inc();
            return debug!(pod = %gateway.pod, client = %peer, %destination, "gateway TLS: {e}");
        }
    };
    let record = record("https");
    let connection = Arc::new(Connection { gateway, client: peer, local: destination, servers, tls_server: Some(server) });
    serve_requests(tls, record, connection, shared).await
}

/// PASSTHROUGH: the ClientHello's SNI picks the server, a bound VirtualService's `tls` rules the
/// destination; the connection is sent on whole, ClientHello first, from the gateway pod.
async fn passthrough<IO>(mut client: IO, mut record: Record, servers: Arc<PortServers>, gateway: Arc<GatewayPod>, shared: ProxyShared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (hello, sni) = match sni::read_client_hello(&mut client).await {
        Ok(read) => read,
        Err(e) => {
            shared.metrics.gateway_refused.inc();
            return debug!(pod = %gateway.pod, client = %record.client, "gateway PASSTHROUGH: {e}");
        }
    };
    let destination = passthrough_destination(sni.as_deref(), &servers, &shared);
    let destination = match destination {
        Ok(target) => target.resolved().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match destination {
        Ok(target) => {
            record.destination = target.endpoint;
            let service = shared.tables().directory(&shared.telemetry.trust_domain).service(&target.service.key());
            let addressed = super::outbound::Addressed { service, original: record.destination };
            super::outbound::forward_tcp(client, record, &gateway.netns, gateway.identity.clone(), hello, shared, addressed).await
        }
        Err(e) => {
            shared.metrics.gateway_refused.inc();
            warn!(pod = %gateway.pod, client = %record.client, sni = ?sni, "gateway PASSTHROUGH: {e}; closing");
        }
    }
}

/// The server for `sni`, its VirtualService, the `tls` rule and the destination it picks.
fn passthrough_destination(sni: Option<&str>, servers: &PortServers, shared: &ProxyShared) -> Result<http::RouteTarget, String> {
    let host = sni.ok_or("no SNI: a PASSTHROUGH server routes by it")?;
    let server = servers.servers.iter().find(|s| s.passthrough() && s.takes(host)).ok_or_else(|| format!("no server takes SNI {host:?}"))?;
    if let Some(reason) = server.refusal() {
        return Err(format!("{} spec.servers[{}]: {reason}", server.gateway, server.server.index));
    }
    let tables = shared.tables();
    let bound = tables
        .gateways()
        .tls_route_for(server, host)
        .ok_or_else(|| format!("no VirtualService of gateway {} has tls rules for {host:?}", server.gateway))?;
    let context = TlsContext { sni, port: server.server.port, gateway: &server.gateway, namespace: &bound.namespace, source: None };
    let rule = tls_routes::select(&bound.tls, &context).ok_or_else(|| format!("no tls rule of {} takes {host:?}", bound.compiled.origin))?;
    let destination = pick_weighted(&rule.destinations, http::random()).ok_or("the tls rule has no destination")?;
    http::RouteTarget::resolve(&tables, destination, server.server.port, None).map_err(|e| e.to_string())
}

/// Reads the ClientHello, picks the server its SNI names (a client without SNI gets the first TLS
/// server), and completes the handshake with that server's certificate.
async fn handshake<IO>(client: IO, servers: &PortServers) -> Result<(tokio_rustls::server::TlsStream<IO>, Arc<ServerBinding>), String>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client)
        .await
        .map_err(|e| format!("reading the ClientHello: {e}"))?;
    let sni = start.client_hello().server_name().map(request_host);
    let server = match &sni {
        Some(host) => servers.servers.iter().find(|s| s.terminates_tls() && s.takes(host)),
        None => servers.servers.iter().find(|s| s.terminates_tls()),
    }
    .ok_or_else(|| format!("no TLS server for SNI {sni:?}"))?
    .clone();
    if let Some(reason) = server.refusal() {
        return Err(format!("{} spec.servers[{}]: {reason}", server.gateway, server.server.index));
    }
    let Some(Ok(config)) = server.tls.clone() else {
        return Err("the server has no TLS configuration".into());
    };
    let tls = start.into_stream(config).await.map_err(|e| format!("handshake (SNI {sni:?}): {e}"))?;
    Ok((tls, server))
}

async fn serve_requests<IO>(io: IO, record: Record, connection: Arc<Connection>, shared: ProxyShared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = {
        let shared = shared.clone();
        move |request| {
            let (connection, shared) = (connection.clone(), shared.clone());
            async move { handle(request, &connection, &shared).await }
        }
    };
    http::serve_http(io, record, &shared, handler).await
}

async fn handle(mut request: Request<Incoming>, connection: &Connection, shared: &ProxyShared) -> Response<Body> {
    let exchange = Exchange::begin(&mut request, connection.client, connection.local, &shared.telemetry, Reporter::Source);
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let mut trace = http::Trace::default();
    let result = route(request, connection, shared, &mut trace).await;
    let (response, answer) = http::answer(result, trace.flags, Direction::Gateway, shared, |e| {
        if !matches!(e, Error::FaultAbort(_) | Error::FaultAbortGrpc(_) | Error::NoRoute(_)) {
            warn!(pod = %connection.gateway.pod, client = %connection.client, %method, %uri, flag = e.flag().code(), "{e}");
        }
    });
    let upstreams = &connection.gateway.upstreams;
    let outcome = http::sent_outcome(shared, &connection.gateway.pod, "", upstreams, trace.chosen, answer);
    request::respond(&shared.telemetry, exchange, outcome, response)
}

/// Server (by `Host` on plaintext), then VirtualService (by host), then rule; then the mesh's pipeline.
async fn route(
    mut request: Request<Incoming>,
    connection: &Connection,
    shared: &ProxyShared,
    trace: &mut http::Trace,
) -> Result<Response<Body>, Error> {
    let host = request_host(&http::authority(request.headers(), request.uri()));
    let tables = shared.tables();
    let server = match &connection.tls_server {
        Some(server) => server.clone(),
        None => connection
            .servers
            .for_host(&host)
            .cloned()
            .ok_or_else(|| Error::NoRoute(format!("no server of this gateway port takes host {host:?}")))?,
    };
    if let Some(reason) = server.refusal() {
        return Err(Error::NoRoute(format!("{} spec.servers[{}]: {reason}", server.gateway, server.server.index)));
    }
    if connection.tls_server.is_none() && server.server.tls.as_ref().is_some_and(|t| t.https_redirect) {
        return Ok(https_redirect(&request, &host));
    }
    let bound = tables
        .gateways()
        .route_for(&server, &host)
        .ok_or_else(|| Error::NoRoute(format!("no VirtualService of gateway {} takes host {host:?}", server.gateway)))?;
    let context = RequestContext { gateway: &server.gateway, port: server.server.port, source_labels: None, source_namespace: None };
    let (rule, matched) = bound
        .compiled
        .route(request.method(), request.uri(), request.headers(), &context)
        .ok_or_else(|| Error::NoRoute(format!("{} {} ({})", request.method(), request.uri(), bound.compiled.origin)))?;
    edge_headers(&mut request, connection);
    let client = http::Client { address: connection.client.ip(), pod: None };
    let selected = Selected { rule: Some(rule), matched, default: None, port: server.server.port, original: None, client };
    http::dispatch(request, selected, &tables, &connection.gateway.upstreams, trace).await
}

/// The headers an edge proxy sets, as Istio's ingress gateway: the client's address appended to
/// `x-forwarded-for`, and the scheme it used in `x-forwarded-proto` (replacing what the client sent).
fn edge_headers(request: &mut Request<Incoming>, connection: &Connection) {
    let headers = request.headers_mut();
    let client = connection.client.ip().to_canonical().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    let scheme = if connection.tls_server.is_some() { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
}

/// `httpsRedirect`: 301 to the same host and path over https.
fn https_redirect(request: &Request<Incoming>, host: &str) -> Response<Body> {
    let path = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut response = Response::new(http::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
