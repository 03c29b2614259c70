//! The inbound L7 stage: on a declared-HTTP port, the destination's agent reads each request off the
//! connection (an HBONE tunnel, or plaintext) and reports it (`reporter="destination"`); where the
//! workload's AuthorizationPolicies name request attributes, it decides each with the full policy — the
//! connection's attributes and the request's — and answers a denied one 403 `RBAC: access denied`, as
//! Istio does; an allowed one goes to the workload.
use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;
use warren_api::authz;

use super::{Body, Error, Head, Upstreams, authority, boxed, is_upgrade, rewrite, serve_http, splice_upgrade};
use crate::{
    proxy::{Direction, ProxyShared, Record, authz::Enforcer},
    telemetry::{
        self,
        istio::Reporter,
        peers::SERVICE_HEADER,
        request::{self, Exchange, Outcome},
    },
};

/// One inbound connection decided per request.
pub struct Inbound {
    /// `namespace/name` of the destination pod.
    pub pod: Arc<String>,
    pub client: SocketAddr,
    /// The workload's address and port.
    pub destination: SocketAddr,
    /// The client's SPIFFE identity, when mTLS proved it (HBONE).
    pub identity: Option<String>,
}

pub async fn serve_inbound<IO>(io: IO, inbound: Inbound, workload: Arc<Upstreams>, shared: ProxyShared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let inbound = Arc::new(inbound);
    let record = Record {
        direction: Direction::Inbound,
        pod: inbound.pod.clone(),
        client: inbound.client,
        destination: inbound.destination,
        protocol: "http",
        peer_identity: inbound.identity.clone(),
        report: None,
    };
    let handler = {
        let shared = shared.clone();
        move |request| {
            let (inbound, workload, shared) = (inbound.clone(), workload.clone(), shared.clone());
            async move { handle(request, &inbound, &workload, &shared).await }
        }
    };
    serve_http(io, record, &shared, handler).await
}

async fn handle(mut request: Request<Incoming>, inbound: &Inbound, workload: &Arc<Upstreams>, shared: &ProxyShared) -> Response<Body> {
    let exchange = Exchange::begin(&mut request, inbound.client, inbound.destination, &shared.telemetry, Reporter::Destination);
    // The service the source's agent routed to, when an mTLS peer (another agent) says so.
    let named = request.headers_mut().remove(SERVICE_HEADER).filter(|_| inbound.identity.is_some());
    let mut policy = None;
    let result = authorize_and_forward(request, inbound, workload, shared, &mut policy).await;
    let connect_failed = matches!(result, Err(Error::UpstreamConnect(_)));
    let (mut response, answer) = super::answer(result, Default::default(), Direction::Inbound, shared, |e| {
        debug!(pod = %inbound.pod, client = %inbound.client, flag = e.flag().code(), "{e}");
    });
    if connect_failed {
        // The source's agent retries this as the connect failure it is (a sidecar would have seen it).
        response.headers_mut().insert(super::retry::CONNECT_FAILURE_HEADER, http::HeaderValue::from_static("1"));
    }
    let tables = shared.tables();
    let directory = tables.directory(&shared.telemetry.trust_domain);
    let named = named.as_ref().and_then(|v| v.to_str().ok()).and_then(|host| directory.service_by_host(host));
    let service = named.unwrap_or_else(|| directory.service_backed_by(&inbound.destination, Some(&exchange.authority)));
    let from = telemetry::Inbound { pod: &inbound.pod, service, client: inbound.client.ip(), peer: inbound.identity.as_deref() };
    let outcome = Outcome {
        traffic: shared.telemetry.inbound(&tables, &shared.mesh, from),
        flags: answer.flags,
        details: answer.details,
        upstream_host: Some(inbound.destination),
        upstream_cluster: Some(format!("inbound|{}||", inbound.destination.port())),
        policy: policy.map(|d: authz::Decision| format!("{} {}", if d.allowed { "allow" } else { "deny" }, d.policy_name())),
    };
    request::respond(&shared.telemetry, exchange, outcome, response)
}

/// Decides the request by the tables in force.
fn authorize(request: &Request<Incoming>, inbound: &Inbound, shared: &ProxyShared) -> authz::Decision {
    let host = authority(request.headers(), request.uri()).to_ascii_lowercase();
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let attributes = authz::Request { method: request.method().as_str(), host: &host, path: request.uri().path(), header: &header };
    let connection = authz::Connection::new(inbound.client.ip(), inbound.identity.as_deref(), inbound.destination);
    let tables = shared.tables();
    shared.authorizer.check(&tables, &connection.with_request(&attributes), inbound.client, inbound.destination, Enforcer::Http)
}

async fn authorize_and_forward(
    mut request: Request<Incoming>,
    inbound: &Inbound,
    workload: &Arc<Upstreams>,
    shared: &ProxyShared,
    policy: &mut Option<authz::Decision>,
) -> Result<Response<Body>, Error> {
    // Decided per request while the policies in force name request attributes (a policy applied after the
    // connection opened takes its next request); otherwise the connection's decision is every request's.
    if shared.tables().authorizes_requests(&inbound.destination) {
        let decision = policy.insert(authorize(&request, inbound, shared));
        if !decision.allowed {
            shared.metrics.policy_refused.inc();
            return Err(Error::Denied);
        }
    }
    let on_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let version = if parts.version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let mut headers = parts.headers;
    rewrite::strip_hop_by_hop(&mut headers, on_upgrade.is_some());
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let head = Head { method: parts.method, authority: authority(&headers, &parts.uri), path, headers, version };
    let body = request::count_request_body(request::BodyCounter::of(&parts.extensions), boxed(body));
    // The pod's own workload: no cluster, Istio's default pool settings.
    let to = super::Destination { endpoint: inbound.destination, cluster: None, pool: &super::DEFAULT_POOL };
    let mut response = workload.send(&to, version, head.into_request(version, body)?).await?;
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(downstream) = on_upgrade.filter(|_| upgraded) {
        splice_upgrade(downstream, hyper::upgrade::on(&mut response));
    }
    let (mut parts, body) = response.into_parts();
    rewrite::strip_hop_by_hop(&mut parts.headers, upgraded);
    Ok(Response::from_parts(parts, boxed(body)))
}
