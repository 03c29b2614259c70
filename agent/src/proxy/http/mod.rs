//! The L7 proxy: HTTP/1.1 and HTTP/2 (and so gRPC) requests a workload sends to a service port that
//! carries HTTP, routed one by one as a sidecar would — by the VirtualService's `http` rules, in the
//! source's agent, with no extra hop.
//!
//! Per request, in order: route (first matching rule, [`crate::state::http_routes`]), answer
//! (`redirect`, `directResponse`), fault (`delay`, then `abort`), pick the destination by weight and an
//! endpoint of its service or subset, rewrite (path, authority, header operations), mirror (copies,
//! fire-and-forget), send (pooled upstream connections, [`upstream`]) under the rule's `timeout` — none
//! by default, and none on a rule with a fault, as Istio. Every way this can fail is an [`Error`] with
//! Envoy's status, body and response flag.
mod counted;
mod deadline;
pub mod detect;
mod error;
pub mod flags;
pub mod inbound;
pub(crate) mod retry;
mod rewrite;
mod upstream;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};
use warren_api::{
    resilience::{ClusterPolicy, ConnectionPool, H2UpgradePolicy, RetryPolicy},
    tables::{DirectResponse, Fault, MESH_GATEWAY, Mirror, Resolution, Service, WeightedDestination},
};

pub use error::Error;
pub use upstream::{Destination, Upstreams};

use flags::{Flag, ResponseFlags};

use super::{Direction, ProxyShared};
use crate::{
    metrics::HttpRequestLabels,
    resilience::balance,
    telemetry::{
        self,
        istio::Reporter,
        peers::SERVICE_HEADER,
        request::{self, Exchange, Outcome},
    },
    state::{
        MeshTables,
        http_routes::{CompiledMatch, CompiledRule, RequestContext},
        pick_weighted,
    },
};

/// Why a body ended early (the peer's error, or the route's deadline).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bodies the proxy sends: the peer's, streamed, or its own.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of the proxy's own.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// A peer's body, streamed on.
fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Request headers larger than this are answered 431 (Envoy's default limit is 60 KiB).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A mirrored request's body is buffered (both copies need it) up to this size; over it, 413.
const MIRROR_BODY_LIMIT: usize = 1024 * 1024;

/// Where one client connection was going: a service port whose protocol is HTTP.
pub struct Downstream {
    /// `namespace/name` of the source pod.
    pub pod: Arc<String>,
    pub client: SocketAddr,
    /// The service address the client connected to.
    pub vip: SocketAddr,
    /// `namespace/name` of that service.
    pub service: String,
}

/// Serves one client connection of the outbound side.
pub async fn serve_outbound<IO>(io: IO, downstream: Downstream, upstreams: Arc<Upstreams>, shared: ProxyShared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let downstream = Arc::new(downstream);
    let record = super::Record {
        direction: Direction::Outbound,
        pod: downstream.pod.clone(),
        client: downstream.client,
        destination: downstream.vip,
        protocol: "http",
        peer_identity: None,
        report: None,
    };
    let handler = {
        let shared = shared.clone();
        move |request| {
            let (downstream, upstreams, shared) = (downstream.clone(), upstreams.clone(), shared.clone());
            async move { handle(request, &downstream, &upstreams, &shared).await }
        }
    };
    serve_http(io, record, &shared, handler).await
}

/// Serves HTTP/1.1, or HTTP/2 when the connection starts with its preface, answering each request with
/// `handler`; the connection is in the connection table meanwhile (closable by it). Malformed requests get
/// 400 and the connection closes; oversized headers 431 (hyper's parser).
pub(crate) async fn serve_http<IO, H, F>(io: IO, record: super::Record, shared: &ProxyShared, handler: H)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let id = record.open_in(&shared.connections);
    let closer = shared.connections.closer(id);
    let service = service_fn(move |request| {
        let answer = handler(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADER_BYTES).keep_alive(true);
    let (io, counts) = counted::Counted::new(io);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let error = tokio::select! {
        result = connection => result.err().map(|e| format!("http: {e}")),
        reason = closer.closed() => Some(reason),
    };
    if let Some(e) = &error {
        debug!(pod = %record.pod, client = %record.client, destination = %record.destination, "HTTP connection: {e}");
    }
    // From the client's side: what it sent (read here) and what it got (written).
    let (sent, received) = counts.get();
    shared.connections.close(id, sent, received, error);
}

async fn handle(mut request: Request<Incoming>, downstream: &Downstream, upstreams: &Arc<Upstreams>, shared: &ProxyShared) -> Response<Body> {
    let exchange = Exchange::begin(&mut request, downstream.client, downstream.vip, &shared.telemetry, Reporter::Source);
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let mut trace = Trace::default();
    let result = route_request(request, downstream, upstreams, shared, &mut trace).await;
    let (response, answer) = self::answer(result, trace.flags, Direction::Outbound, shared, |e| {
        // Injected faults are what the user asked for: counted, not warned about per request.
        if matches!(e, Error::FaultAbort(_) | Error::FaultAbortGrpc(_)) {
            debug!(pod = %downstream.pod, service = %downstream.service, %method, %uri, flag = e.flag().code(), "{e}");
        } else {
            warn!(pod = %downstream.pod, service = %downstream.service, %method, %uri, flag = e.flag().code(), "{e}");
        }
    });
    let outcome = sent_outcome(shared, &downstream.pod, &downstream.service, upstreams, trace.chosen, answer);
    request::respond(&shared.telemetry, exchange, outcome, response)
}

/// What the pipeline did with one request, for its telemetry: the target of its (last) try, the flags
/// raised on the way (DI, URX, UO), how many tries it took.
#[derive(Default)]
pub struct Trace {
    pub chosen: Option<RouteTarget>,
    pub flags: ResponseFlags,
    pub attempts: u32,
}

/// How the proxy's pipeline answered: Envoy's response flag (`-` for none) and what went wrong.
pub(crate) struct Answer {
    pub flags: &'static str,
    pub details: Option<String>,
}

/// The response for a pipeline's result (an error becomes Envoy's answer for it, `log`ged), counted in
/// `warren_http_requests`.
pub(crate) fn answer(
    result: Result<Response<Body>, Error>,
    flags: ResponseFlags,
    direction: Direction,
    shared: &ProxyShared,
    log: impl FnOnce(&Error),
) -> (Response<Body>, Answer) {
    let (response, answer) = match result {
        Ok(response) => (response, Answer { flags: flags.as_str(), details: None }),
        Err(e) => {
            log(&e);
            let answer = Answer { flags: flags.with(e.flag()).as_str(), details: Some(e.to_string()) };
            (e.into_response(), answer)
        }
    };
    let labels = HttpRequestLabels { direction: direction.as_str(), response_code: response.status().as_u16(), response_flags: answer.flags };
    shared.metrics.http_requests.get_or_create(&labels).inc();
    (response, answer)
}

/// A request the source's agent sent (or answered itself): to the target routing `chosen`, else to the
/// service the client addressed (`addressed`, `namespace/name`; empty at a gateway).
pub(crate) fn sent_outcome(
    shared: &ProxyShared,
    pod: &str,
    addressed: &str,
    upstreams: &Upstreams,
    chosen: Option<RouteTarget>,
    answer: Answer,
) -> Outcome {
    let tables = shared.tables();
    let directory = tables.directory(&shared.telemetry.trust_domain);
    let key = chosen.as_ref().map(|t| t.service.key());
    let service = directory.service(key.as_deref().unwrap_or(addressed));
    let endpoint = chosen.as_ref().map(|t| t.endpoint);
    let mtls = endpoint.is_some_and(|e| upstreams.tunnels_to(&e.ip()));
    let upstream_cluster = chosen.as_ref().map(|t| format!("outbound|{}|{}|{}", t.port, t.subset.as_deref().unwrap_or(""), t.service.hostname));
    let to = telemetry::Outbound { pod, service, endpoint: endpoint.map(|e| e.ip()), mtls };
    Outcome {
        traffic: shared.telemetry.outbound(&tables, &shared.mesh, to),
        flags: answer.flags,
        details: answer.details,
        upstream_host: endpoint,
        upstream_cluster,
        policy: None,
    }
}

/// What a request is sent to: a service (or one of its subsets) at a port, and the endpoint chosen.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub service: Arc<Service>,
    pub subset: Option<String>,
    /// The service port.
    pub port: u16,
    pub endpoint: SocketAddr,
    /// The endpoint's DNS name (a ServiceEntry with resolution DNS): `endpoint`'s address is looked up
    /// by [`RouteTarget::resolved`].
    pub hostname: Option<String>,
}

impl RouteTarget {
    /// The target `destination` names (its port, else `port`), with an endpoint of its service or subset.
    /// A ServiceEntry with resolution NONE has no endpoints: the connection goes where the client sent it
    /// (`original`).
    pub fn resolve(
        tables: &MeshTables,
        destination: &WeightedDestination,
        port: u16,
        original: Option<SocketAddr>,
    ) -> Result<RouteTarget, Error> {
        let mut target = RouteTarget::locate(tables, destination, port)?;
        if let Some(original) = original.filter(|_| target.passes_through()) {
            target.endpoint.set_ip(original.ip());
            return Ok(target);
        }
        let endpoint = tables.endpoint(&destination.service, destination.subset.as_deref(), random() as usize).ok_or_else(|| {
            let subset = destination.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default();
            Error::NoHealthyUpstream(format!("{}{subset} has no endpoints", destination.service))
        })?;
        target.endpoint.set_ip(endpoint.ip);
        target.hostname = endpoint.hostname.clone();
        Ok(target)
    }

    /// The service, subset and port `destination` names (its port, else `port`); the endpoint is left
    /// unspecified (each try's cluster pick fills it) but for its target port.
    pub fn locate(tables: &MeshTables, destination: &WeightedDestination, port: u16) -> Result<RouteTarget, Error> {
        let service = tables
            .service(&destination.service)
            .cloned()
            .ok_or_else(|| Error::NoHealthyUpstream(format!("{} is not a known service", destination.service)))?;
        let port = destination.port.unwrap_or(port);
        let target_port = service.port(port).map(|p| p.target_port).unwrap_or(port);
        let endpoint = SocketAddr::new([0, 0, 0, 0].into(), target_port);
        Ok(RouteTarget { service, subset: destination.subset.clone(), port, endpoint, hostname: None })
    }

    /// A ServiceEntry with resolution NONE and no endpoints: the request goes where the client sent it.
    pub fn passes_through(&self) -> bool {
        self.service.resolution == Some(Resolution::None) && self.service.endpoints.is_empty()
    }

    /// The target with its endpoint's address, looking a DNS endpoint up (the node's resolver).
    pub async fn resolved(mut self) -> Result<RouteTarget, Error> {
        let Some(host) = self.hostname.take() else { return Ok(self) };
        let port = self.endpoint.port();
        let mut addresses = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| Error::NoHealthyUpstream(format!("{host}: DNS lookup failed: {e}")))?;
        self.endpoint = addresses.next().ok_or_else(|| Error::NoHealthyUpstream(format!("{host}: no address")))?;
        Ok(self)
    }
}

async fn route_request(
    request: Request<Incoming>,
    downstream: &Downstream,
    upstreams: &Arc<Upstreams>,
    shared: &ProxyShared,
    trace: &mut Trace,
) -> Result<Response<Body>, Error> {
    let tables = shared.tables();
    let (rule, matched) = select_rule(&tables, &request, downstream)?;
    let own = WeightedDestination { service: downstream.service.clone(), weight: 100, ..Default::default() };
    let client = Client { address: downstream.client.ip(), pod: tables.pod(&downstream.pod).cloned() };
    let selected =
        Selected { rule, matched, default: Some(&own), port: downstream.vip.port(), original: Some(downstream.vip), client };
    dispatch(request, selected, &tables, upstreams, trace).await
}

/// What routing chose for a request: the rule and match block (none: no VirtualService routes it), where
/// it goes without a rule, and the port and address the client addressed.
pub(crate) struct Selected<'t> {
    pub rule: Option<&'t CompiledRule>,
    pub matched: Option<&'t CompiledMatch>,
    pub default: Option<&'t WeightedDestination>,
    pub port: u16,
    pub original: Option<SocketAddr>,
    pub client: Client,
}

/// Who sent the request: the address (`useSourceIp`) and, for mesh traffic, the pod (its locality).
pub(crate) struct Client {
    pub address: std::net::IpAddr,
    pub pod: Option<Arc<warren_api::workloads::Pod>>,
}

/// The rest of the pipeline, for mesh and gateway requests alike: answer, fault, destination, send. The
/// target it sends to is left in `chosen` (for telemetry).
pub(crate) async fn dispatch(
    request: Request<Incoming>,
    selected: Selected<'_>,
    tables: &MeshTables,
    upstreams: &Arc<Upstreams>,
    trace: &mut Trace,
) -> Result<Response<Body>, Error> {
    let Selected { rule, matched, default, port, original, client } = selected;
    if let Some(answer) = rule.and_then(|r| answer_directly(r, &request)) {
        return Ok(answer);
    }
    if let Some(fault) = rule.and_then(|r| r.rule.fault.as_ref()) {
        inject(fault, &mut trace.flags).await?;
    }
    let destination = match rule {
        Some(r) => pick_weighted(&r.rule.destinations, random())
            .ok_or_else(|| Error::NoRoute(format!("http[{}] has no destination", r.index)))?,
        None => default.ok_or_else(|| Error::NoRoute(format!("{} {}: no route", request.method(), request.uri())))?,
    };
    let target = RouteTarget::locate(tables, destination, port)?;
    // Resolution NONE with no endpoints: where the client sent it, as the L4 path.
    if let Some(original) = original.filter(|_| target.passes_through()) {
        let mut target = target;
        target.endpoint.set_ip(original.ip());
        trace.chosen = Some(target.clone());
        let routed = Routed { rule, matched, destination, target, client };
        return forward_once(request, &routed, upstreams).await;
    }
    let routed = Routed { rule, matched, destination, target, client };
    forward(request, &routed, tables, port, upstreams, trace).await
}

/// The rule that takes the request, and the match block that did; `None` for a service no VirtualService
/// routes (its own endpoints take it). A VirtualService whose rules all pass the request by: 404.
fn select_rule<'t>(
    tables: &'t MeshTables,
    request: &Request<Incoming>,
    downstream: &Downstream,
) -> Result<(Option<&'t CompiledRule>, Option<&'t CompiledMatch>), Error> {
    let Some(route) = tables.http_route(&downstream.service) else {
        return Ok((None, None));
    };
    let source = tables.pod(&downstream.pod);
    let context = RequestContext {
        gateway: MESH_GATEWAY,
        port: downstream.vip.port(),
        source_labels: source.map(|p| &p.labels),
        source_namespace: source.map(|p| p.namespace.as_str()),
    };
    let (rule, matched) = route
        .route(request.method(), request.uri(), request.headers(), &context)
        .ok_or_else(|| Error::NoRoute(format!("{} {} ({})", request.method(), request.uri(), route.origin)))?;
    Ok((Some(rule), matched))
}

/// Where routing sent a request.
struct Routed<'a> {
    rule: Option<&'a CompiledRule>,
    matched: Option<&'a CompiledMatch>,
    destination: &'a WeightedDestination,
    /// The service, subset and port; the endpoint is each try's.
    target: RouteTarget,
    client: Client,
}

/// Rewrites the request for its destination, mirrors it, sends it (tries, [`retry`]) under the rule's
/// timeout, and returns the answer with the response header operations applied.
async fn forward(
    mut request: Request<Incoming>,
    routed: &Routed<'_>,
    tables: &MeshTables,
    port: u16,
    upstreams: &Arc<Upstreams>,
    trace: &mut Trace,
) -> Result<Response<Body>, Error> {
    let on_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let counter = request::BodyCounter::of(&parts.extensions);
    let head = Head::prepare(parts, routed.rule, routed.matched, routed.destination, on_upgrade.is_some())?;
    let body = mirror_and_count(&head, body, counter, routed, tables, port, upstreams).await?;
    let target = &routed.target;
    let cluster = upstreams.shared().clusters.get(tables, &target.service, target.subset.as_deref(), target.port);
    let members = cluster.members();
    let pool = members.policy.connection_pool.as_ref().unwrap_or(&DEFAULT_POOL);
    let version = upstream_version(head.version, pool, on_upgrade.is_some());
    let (hash, cookie) = hash_key(&members.policy, &head, routed.client.address);
    let default_retries = RetryPolicy::istio_default();
    let policy = match routed.rule.and_then(|r| r.rule.retries.as_ref()) {
        // An upgraded connection cannot be tried twice.
        _ if on_upgrade.is_some() => &RetryPolicy::disabled(),
        Some(policy) => policy,
        None => &default_retries,
    };
    let pod = routed.client.pod.as_ref();
    let locality = pod.and_then(|p| p.parsed_locality());
    let plan = retry::Plan {
        policy,
        cluster: cluster.clone(),
        members: members.clone(),
        pool,
        target: target.clone(),
        hash,
        client_locality: locality.as_ref(),
        client_labels: routed.client.pod.as_ref().map(|p| &p.labels),
        deadline: route_deadline(routed.rule),
    };
    let make = TryRequest { head: &head, version, upstreams };
    let answered = retry::send(&plan, body, &make, upstreams, version, trace).await?;
    let mut response = finish_response(answered.response, on_upgrade, routed);
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    let (parts, body) = response.into_parts();
    let body = match answered.body_deadline {
        Some(at) => boxed(deadline::DeadlineBody::new(body, at)),
        None => boxed(body),
    };
    Ok(Response::from_parts(parts, boxed(retry::Guarded::new(body, answered.guards))))
}

/// A request to a ServiceEntry with resolution NONE: once, to where the client sent it.
async fn forward_once(mut request: Request<Incoming>, routed: &Routed<'_>, upstreams: &Arc<Upstreams>) -> Result<Response<Body>, Error> {
    let on_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let counter = request::BodyCounter::of(&parts.extensions);
    let head = Head::prepare(parts, routed.rule, routed.matched, routed.destination, on_upgrade.is_some())?;
    let body = request::count_request_body(counter, boxed(body));
    let deadline = route_deadline(routed.rule);
    let to = Destination { endpoint: routed.target.endpoint, cluster: None, pool: &DEFAULT_POOL };
    let version = head.version;
    let send = upstreams.send(&to, version, head.into_request(version, body)?);
    let response = match deadline {
        Some((at, limit)) => tokio::time::timeout_at(at, send).await.map_err(|_| Error::UpstreamTimeout(limit))??,
        None => send.await?,
    };
    let (parts, body) = finish_response(response, on_upgrade, routed).into_parts();
    let body = match deadline {
        Some((at, _)) => boxed(deadline::DeadlineBody::new(body, at)),
        None => boxed(body),
    };
    Ok(Response::from_parts(parts, body))
}

/// The pool settings of a cluster whose DestinationRule sets none: Istio's defaults.
static DEFAULT_POOL: std::sync::LazyLock<ConnectionPool> = std::sync::LazyLock::new(ConnectionPool::default);

/// The rule's `timeout` (none by default, and none on a rule with a fault, as Istio), from now.
fn route_deadline(rule: Option<&CompiledRule>) -> Option<(tokio::time::Instant, Duration)> {
    let timeout = rule.filter(|r| r.rule.fault.is_none()).and_then(|r| r.rule.timeout_ms).filter(|ms| *ms > 0);
    timeout.map(Duration::from_millis).map(|limit| (tokio::time::Instant::now() + limit, limit))
}

/// The client's HTTP version, unless `h2UpgradePolicy: UPGRADE` sends HTTP/1.1 requests as HTTP/2 (never
/// an upgrade request: those need HTTP/1.1).
fn upstream_version(version: Version, pool: &ConnectionPool, upgrade: bool) -> Version {
    let upgrade_h2 = pool.http.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade) && !pool.http.use_client_protocol;
    if upgrade_h2 && !upgrade { Version::HTTP_2 } else { version }
}

/// Copies the request to the rule's mirrors (buffering the body they share), and counts its bytes.
async fn mirror_and_count(
    head: &Head,
    body: Incoming,
    counter: Option<request::BodyCounter>,
    routed: &Routed<'_>,
    tables: &MeshTables,
    port: u16,
    upstreams: &Arc<Upstreams>,
) -> Result<Body, Error> {
    let mirrors: Vec<&Mirror> =
        routed.rule.map(|r| r.rule.mirrors.iter().filter(|m| roll(m.percent)).collect()).unwrap_or_default();
    let body = if mirrors.is_empty() {
        boxed(body)
    } else {
        let limited = Limited::new(body, MIRROR_BODY_LIMIT).collect().await;
        let bytes = limited.map_err(|_| Error::TooLarge(MIRROR_BODY_LIMIT))?.to_bytes();
        for mirror in mirrors {
            send_mirror(tables, mirror, head, bytes.clone(), port, head.version, upstreams);
        }
        full(bytes)
    };
    Ok(request::count_request_body(counter, body))
}

/// The upstream's answer as the client gets it: upgraded connections joined, hop-by-hop headers gone,
/// the rule's and the destination's response header operations applied.
fn finish_response(mut response: Response<Incoming>, on_upgrade: Option<hyper::upgrade::OnUpgrade>, routed: &Routed<'_>) -> Response<Incoming> {
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(downstream_upgrade) = on_upgrade.filter(|_| upgraded) {
        splice_upgrade(downstream_upgrade, hyper::upgrade::on(&mut response));
    }
    let headers = response.headers_mut();
    rewrite::strip_hop_by_hop(headers, upgraded);
    if let Some(rule) = routed.rule {
        rewrite::apply(&rule.rule.headers.response, headers);
    }
    rewrite::apply(&routed.destination.headers.response, headers);
    response
}

/// Each try's request: the prepared head, the attempt count, and — over HBONE — the service it is for
/// (the destination's agent labels its metrics with it).
struct TryRequest<'a> {
    head: &'a Head,
    version: Version,
    upstreams: &'a Upstreams,
}

impl retry::MakeRequest for TryRequest<'_> {
    fn make(&self, target: &RouteTarget, body: Body, attempt: u32) -> Result<Request<Body>, Error> {
        let mut request = self.head.to_request(self.version, body)?;
        let headers = request.headers_mut();
        headers.insert(retry::ATTEMPT_HEADER, HeaderValue::from(attempt));
        if self.upstreams.tunnels_to(&target.endpoint.ip())
            && let Ok(host) = HeaderValue::from_str(&target.service.hostname)
        {
            headers.insert(SERVICE_HEADER, host);
        }
        Ok(request)
    }
}

/// The consistent hash's key for the request, hashed; and, for `httpCookie` with a `ttl` when the request
/// has no such cookie, the cookie to issue (Envoy's form: quoted value, `Max-Age`, `Path`, `HttpOnly`).
fn hash_key(policy: &ClusterPolicy, head: &Head, client: std::net::IpAddr) -> (Option<u64>, Option<HeaderValue>) {
    use warren_api::resilience::HashKey;
    let Some(hash) = policy.load_balancer.as_ref().and_then(|l| l.consistent_hash.as_ref()) else { return (None, None) };
    let of = |bytes: &[u8]| Some(balance::stable_hash(bytes));
    match &hash.key {
        HashKey::Header(name) => (head.headers.get(name.as_str()).and_then(|v| of(v.as_bytes())), None),
        HashKey::SourceIp => (of(client.to_string().as_bytes()), None),
        HashKey::QueryParameter(name) => {
            let query = head.path.query().unwrap_or("");
            let value = query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v));
            (value.and_then(|v| of(v.as_bytes())), None)
        }
        HashKey::Cookie { name, path, ttl_ms } => match cookie(&head.headers, name) {
            Some(value) => (of(value.as_bytes()), None),
            None => match ttl_ms {
                Some(ttl) => {
                    let value = format!("{:016x}", random());
                    let path = path.as_deref().map(|p| format!("; Path={p}")).unwrap_or_default();
                    // `ttl: 0s` is a session cookie (no Max-Age), as Envoy issues it.
                    let max_age = if *ttl == 0 { String::new() } else { format!("; Max-Age={}", ttl / 1000) };
                    let set = format!("{name}=\"{value}\"{max_age}{path}; HttpOnly");
                    (of(value.as_bytes()), HeaderValue::from_str(&set).ok())
                }
                None => (None, None),
            },
        },
    }
}

/// A cookie's value (quotes removed) from the request's `Cookie` headers.
fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.trim_matches('"').to_string())
    })
}

/// `redirect` and `directResponse`: the proxy answers, nothing is sent upstream.
fn answer_directly(rule: &CompiledRule, request: &Request<Incoming>) -> Option<Response<Body>> {
    if let Some(redirect) = &rule.rule.redirect {
        let location = rewrite::location(redirect, &authority(request.headers(), request.uri()), request.uri());
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        return Some(response);
    }
    let DirectResponse { status, body } = rule.rule.direct_response.as_ref()?;
    let mut response = Response::new(full(Bytes::from(body.clone().unwrap_or_default())));
    *response.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
    if body.is_some() {
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    rewrite::apply(&rule.rule.headers.response, response.headers_mut());
    Some(response)
}

/// `fault`: the delay first (when it applies), then the abort (when it applies), as Envoy's fault filter.
async fn inject(fault: &Fault, flags: &mut ResponseFlags) -> Result<(), Error> {
    if let Some(ms) = fault.delay_ms.filter(|_| roll(fault.delay_percent)) {
        flags.add(Flag::DelayInjected);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if !roll(fault.abort_percent) {
        return Ok(());
    }
    if let Some(code) = fault.abort_grpc_status {
        return Err(Error::FaultAbortGrpc(code));
    }
    match fault.abort_http_status.and_then(|s| StatusCode::from_u16(s).ok()) {
        Some(status) => Err(Error::FaultAbort(status)),
        None => Ok(()),
    }
}

/// A request's head as it goes upstream: rewritten, with the rule's and the destination's header
/// operations, without hop-by-hop headers.
struct Head {
    method: http::Method,
    authority: String,
    path: http::uri::PathAndQuery,
    headers: http::HeaderMap,
    /// The client's: HTTP/2, else HTTP/1.1.
    version: Version,
}

impl Head {
    fn prepare(
        parts: http::request::Parts,
        rule: Option<&CompiledRule>,
        matched: Option<&CompiledMatch>,
        destination: &WeightedDestination,
        upgrade: bool,
    ) -> Result<Head, Error> {
        let version = if parts.version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let mut headers = parts.headers;
        let mut authority = authority(&headers, &parts.uri);
        let mut path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        if let Some(rule) = rule {
            if let Some(new_path) = rewrite::rewrite_path(rule, matched.and_then(CompiledMatch::uri), &parts.uri)? {
                path = new_path;
            }
            if let Some(new_authority) = rule.rule.rewrite.as_ref().and_then(|r| r.authority.clone()) {
                authority = new_authority;
            }
            rewrite::apply(&rule.rule.headers.request, &mut headers);
        }
        rewrite::apply(&destination.headers.request, &mut headers);
        rewrite::strip_hop_by_hop(&mut headers, upgrade);
        rewrite::add_proxy_headers(&mut headers);
        Ok(Head { method: parts.method, authority, path, headers, version })
    }

    /// The request for an upstream connection of `version`: HTTP/1.1 carries the authority in `Host` and
    /// the path in origin form; HTTP/2 carries both in the URI (`:authority`, `:path`).
    /// The same request again (a retry's), the head copied.
    fn to_request(&self, version: Version, body: Body) -> Result<Request<Body>, Error> {
        let head = Head {
            method: self.method.clone(),
            authority: self.authority.clone(),
            path: self.path.clone(),
            headers: self.headers.clone(),
            version: self.version,
        };
        head.into_request(version, body)
    }

    fn into_request(self, version: Version, body: Body) -> Result<Request<Body>, Error> {
        let invalid = |e: http::Error| Error::BadRequest(format!("authority {:?}: {e}", self.authority));
        let mut headers = self.headers;
        let uri = if version == Version::HTTP_2 {
            headers.remove(header::HOST);
            Uri::builder().scheme("http").authority(self.authority.as_str()).path_and_query(self.path.clone()).build()
        } else {
            let host = HeaderValue::from_str(&self.authority).map_err(|e| invalid(e.into()))?;
            headers.insert(header::HOST, host);
            Uri::builder().path_and_query(self.path).build()
        }
        .map_err(invalid)?;
        let mut request = Request::builder().method(self.method).uri(uri).version(version).body(body).map_err(invalid)?;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// `Host` (HTTP/1.1) or the URI's authority (HTTP/2), as the matchers see it.
pub(crate) fn authority(headers: &http::HeaderMap, uri: &Uri) -> String {
    crate::state::http_routes::authority(headers, uri).to_string()
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.version() == Version::HTTP_11 && request.headers().contains_key(header::UPGRADE)
}

/// After a 101, the two upgraded connections are joined byte for byte.
fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::join!(downstream, upstream) {
            (Ok(down), Ok(up)) => {
                let (_, error) = super::copy::copy_bidirectional(TokioIo::new(down), TokioIo::new(up)).await;
                if let Some(e) = error {
                    debug!("upgraded connection: {e}");
                }
            }
            (down, up) => debug!("upgrade did not complete: {:?} / {:?}", down.err(), up.err()),
        }
    });
}

/// A copy of the request to `mirror`, fire-and-forget: its answer is read and dropped; the authority gets
/// Envoy's `-shadow` suffix so the mirror can tell copies from traffic.
fn send_mirror(
    tables: &MeshTables,
    mirror: &Mirror,
    head: &Head,
    body: Bytes,
    port: u16,
    version: Version,
    upstreams: &Arc<Upstreams>,
) {
    let destination = WeightedDestination {
        service: mirror.service.clone(),
        subset: mirror.subset.clone(),
        port: mirror.port,
        weight: 100,
        ..Default::default()
    };
    let target = match RouteTarget::resolve(tables, &destination, port, None) {
        Ok(target) => target,
        Err(e) => return debug!(mirror = %mirror.service, "mirror not sent: {e}"),
    };
    let shadow = Head {
        method: head.method.clone(),
        authority: shadow_authority(&head.authority),
        path: head.path.clone(),
        headers: head.headers.clone(),
        version,
    };
    let Ok(request) = shadow.into_request(version, full(body)) else { return };
    let upstreams = upstreams.clone();
    tokio::spawn(async move {
        let target = match target.resolved().await {
            Ok(target) => target,
            Err(e) => return debug!("mirror not sent: {e}"),
        };
        let to = Destination { endpoint: target.endpoint, cluster: None, pool: &DEFAULT_POOL };
        match upstreams.send(&to, version, request).await {
            Ok(response) => {
                let _ = response.into_body().collect().await;
            }
            Err(e) => debug!(endpoint = %target.endpoint, "mirror: {e}"),
        }
    });
}

/// `reviews:9080` → `reviews-shadow:9080`.
fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()) {
        Some((host, port)) => format!("{host}-shadow:{port}"),
        None => format!("{authority}-shadow"),
    }
}

/// True with probability `percent` / 100.
fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && (random() % 1_000_000) as f64 / 10_000.0 < percent)
}

pub(crate) use super::outbound::random;
pub(crate) use rewrite::request_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_hosts_as_envoy_names_them() {
        assert_eq!(shadow_authority("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_authority("reviews.default.svc.cluster.local"), "reviews.default.svc.cluster.local-shadow");
    }

    #[test]
    fn percentages_roll_as_written() {
        assert!((0..1000).all(|_| roll(100.0)) && (0..1000).all(|_| !roll(0.0)));
        let hits = (0..100_000).filter(|_| roll(30.0)).count();
        assert!((28_500..31_500).contains(&hits), "{hits}");
    }
}
