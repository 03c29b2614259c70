//! One HTTP request's telemetry, from its head to its response's last byte: [`Exchange::begin`] reads what
//! the metrics and the access log need off the request, [`respond`] wraps the response body so that, when
//! it ends (or the client goes away), the request is counted in Istio's metrics and logged — once. Bodies
//! are counted as they stream ([`count_request_body`]), gRPC messages by their length prefixes.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version, header};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{
    Telemetry,
    access_log::{Entry, timestamp},
    istio::{Reporter, RequestLabels, RequestProtocol, Traffic},
    trace,
};
use opentelemetry::{KeyValue, trace::SpanKind};
use crate::proxy::http::{Body, BoxError};

/// Bytes and gRPC messages of a body so far.
#[derive(Debug, Default)]
pub struct BodyCount {
    bytes: AtomicU64,
    messages: AtomicU64,
}

impl BodyCount {
    fn add(&self, bytes: usize, messages: u64) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages.fetch_add(messages, Ordering::Relaxed);
    }
    fn get(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::Relaxed), self.messages.load(Ordering::Relaxed))
    }
}

/// gRPC's framing: each message is a 1-byte flag, a 4-byte big-endian length, the message. Counts the
/// messages a stream of chunks starts, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct GrpcFrames {
    header: [u8; 5],
    have: usize,
    remaining: u64,
}

impl GrpcFrames {
    /// Feeds a chunk; returns how many messages began in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64);
                self.remaining -= take;
                data = &data[take as usize..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                started += 1;
                self.have = 0;
                self.remaining = u64::from(u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]));
            }
        }
        started
    }
}

/// What a request said about itself, kept until its response ends.
pub struct Exchange {
    started: Instant,
    start_time: SystemTime,
    pub protocol: RequestProtocol,
    version: Version,
    method: String,
    path: String,
    pub authority: String,
    user_agent: Option<String>,
    pub request_id: Option<String>,
    x_forwarded_for: Option<String>,
    traceparent: Option<String>,
    client: SocketAddr,
    local: SocketAddr,
    request_body: Arc<BodyCount>,
    /// The agent's span for the request (when tracing is on).
    span: Option<opentelemetry_sdk::trace::Span>,
    /// Counted in `warren_http_requests_active` while the exchange lives.
    _active: Active,
}

/// A request in flight: the gauge goes back down when the exchange ends, however it ends.
struct Active(prometheus_client::metrics::gauge::Gauge);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const REQUEST_ID: &str = "x-request-id";

impl Exchange {
    /// Reads the request's head; gives it an `x-request-id` if it has none (so both agents log the same
    /// one); starts the agent's span (a client span in the source's agent, a server span in the
    /// destination's) and names it the parent in the trace headers sent on; marks its body to be counted
    /// where the proxy forwards it.
    pub fn begin<B>(request: &mut Request<B>, client: SocketAddr, local: SocketAddr, telemetry: &Telemetry, reporter: Reporter) -> Exchange {
        let authority = crate::proxy::http::authority(request.headers(), request.uri());
        let headers = request.headers_mut();
        if !headers.contains_key(REQUEST_ID) {
            let id = crate::proxy::http::request_id();
            headers.insert(REQUEST_ID, HeaderValue::from_str(&id).expect("hex and dashes"));
        }
        let kind = match reporter {
            Reporter::Source => SpanKind::Client,
            Reporter::Destination => SpanKind::Server,
        };
        let span = telemetry.tracing.as_ref().map(|t| t.start(headers, kind, format!("{authority}/*")));
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let grpc = request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let request_body = Arc::new(BodyCount::default());
        let exchange = Exchange {
            started: Instant::now(),
            start_time: SystemTime::now(),
            protocol: if grpc { RequestProtocol::Grpc } else { RequestProtocol::Http },
            version: request.version(),
            method: request.method().to_string(),
            path: request.uri().path_and_query().map_or_else(|| "/".into(), |p| p.to_string()),
            authority,
            user_agent: header("user-agent"),
            request_id: header(REQUEST_ID),
            x_forwarded_for: header("x-forwarded-for"),
            traceparent: header("traceparent"),
            client,
            local,
            request_body: request_body.clone(),
            span,
            _active: Active(telemetry.requests_active.clone()),
        };
        telemetry.requests_active.inc();
        if telemetry.metrics || telemetry.access_log.is_some() {
            request.extensions_mut().insert(BodyCounter(request_body, grpc));
        }
        exchange
    }
}

/// Counts a request's body into its exchange (an extension [`Exchange::begin`] sets on the request).
#[derive(Clone)]
pub struct BodyCounter(Arc<BodyCount>, bool);

impl BodyCounter {
    /// The counter of the request these extensions are of, if an exchange began for it.
    pub fn of(extensions: &http::Extensions) -> Option<BodyCounter> {
        extensions.get::<BodyCounter>().cloned()
    }

    /// `body`, counted as it streams.
    pub fn count(self, body: Body) -> Body {
        let frames = self.1.then(GrpcFrames::default);
        http_body_util::BodyExt::boxed_unsync(Counting { inner: body, count: self.0, frames })
    }
}

/// The request body, counted into its exchange as it streams (as is, for a request no exchange began).
pub fn count_request_body(counter: Option<BodyCounter>, body: Body) -> Body {
    match counter {
        Some(counter) => counter.count(body),
        None => body,
    }
}

/// A body that counts what passes.
struct Counting {
    inner: Body,
    count: Arc<BodyCount>,
    frames: Option<GrpcFrames>,
}

impl HttpBody for Counting {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let messages = this.frames.as_mut().map_or(0, |f| f.feed(data));
            this.count.add(data.len(), messages);
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where the request went and how routing and the upstream ended it.
pub struct Outcome {
    pub traffic: Traffic,
    /// Envoy's response flags (`-` for none).
    pub flags: &'static str,
    pub details: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub policy: Option<String>,
}

/// The response, its body wrapped so the request is recorded when it ends.
pub fn respond(telemetry: &Arc<Telemetry>, exchange: Exchange, outcome: Outcome, response: Response<Body>) -> Response<Body> {
    if !telemetry.metrics && telemetry.access_log.is_none() && exchange.span.is_none() {
        return response;
    }
    let grpc_status = grpc_status(response.headers());
    let code = response.status().as_u16();
    let (parts, inner) = response.into_parts();
    let frames = (exchange.protocol == RequestProtocol::Grpc).then(GrpcFrames::default);
    let pending = Pending { telemetry: telemetry.clone(), exchange, outcome, code, grpc_status, bytes: 0, messages: 0 };
    let mut metered = Metered { inner, frames, pending: Some(pending) };
    if metered.inner.is_end_stream() {
        metered.finish(None);
    }
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(metered))
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A request waiting for its response to end.
struct Pending {
    telemetry: Arc<Telemetry>,
    exchange: Exchange,
    outcome: Outcome,
    code: u16,
    grpc_status: Option<u32>,
    bytes: u64,
    messages: u64,
}

struct Metered {
    inner: Body,
    frames: Option<GrpcFrames>,
    pending: Option<Pending>,
}

impl Metered {
    /// Records the request (once); `flags` overrides the outcome's (the client left before the end).
    fn finish(&mut self, flags: Option<&'static str>) {
        if let Some(mut pending) = self.pending.take() {
            if let Some(flags) = flags.filter(|_| pending.outcome.flags == "-") {
                pending.outcome.flags = flags;
            }
            pending.record();
        }
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(pending)) = (frame.data_ref(), this.pending.as_mut()) {
                    pending.bytes += data.len() as u64;
                    pending.messages += this.frames.as_mut().map_or(0, |f| f.feed(data));
                }
                if let (Some(trailers), Some(pending)) = (frame.trailers_ref(), this.pending.as_mut()) {
                    pending.grpc_status = grpc_status(trailers).or(pending.grpc_status);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            // The upstream's body failed midway: Envoy's UpstreamRemoteReset.
            Poll::Ready(Some(Err(_))) => this.finish(Some("UR")),
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (Envoy's DownstreamConnectionTermination).
        let flags = (!self.inner.is_end_stream()).then_some("DC");
        self.finish(flags);
    }
}

impl Pending {
    fn record(self) {
        let Pending { telemetry, mut exchange, outcome, code, grpc_status, bytes, messages } = self;
        // An unsampled span records nothing: its attributes are not even built.
        if let Some(span) = exchange.span.take().filter(opentelemetry::trace::Span::is_recording) {
            trace::finish(span, code, outcome.flags, span_attributes(&exchange, &outcome));
        }
        let grpc_status = grpc_status.filter(|_| exchange.protocol == RequestProtocol::Grpc);
        let labels = RequestLabels {
            traffic: outcome.traffic.clone(),
            protocol: exchange.protocol,
            response_code: code,
            grpc_status,
            flags: outcome.flags,
        };
        let elapsed = exchange.started.elapsed();
        let (request_bytes, request_messages) = exchange.request_body.get();
        if telemetry.metrics {
            record_metrics(&telemetry, &labels, &exchange, &outcome, (request_bytes, request_messages), (bytes, messages), elapsed);
        }
        let Some(log) = &telemetry.access_log else { return };
        let traffic = &outcome.traffic;
        log.write(&Entry {
            start_time: timestamp(exchange.start_time),
            reporter: traffic.reporter.as_str(),
            protocol: if exchange.version == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            method: Some(&exchange.method),
            path: Some(&exchange.path),
            authority: Some(&exchange.authority),
            response_code: code,
            grpc_status,
            response_flags: outcome.flags,
            response_code_details: outcome.details.as_deref(),
            bytes_received: request_bytes,
            bytes_sent: bytes,
            duration: elapsed.as_millis() as u64,
            user_agent: exchange.user_agent.as_deref(),
            request_id: exchange.request_id.as_deref(),
            x_forwarded_for: exchange.x_forwarded_for.as_deref(),
            traceparent: exchange.traceparent.as_deref(),
            downstream_remote_address: exchange.client.to_string(),
            downstream_local_address: exchange.local.to_string(),
            upstream_host: outcome.upstream_host.map(|h| h.to_string()),
            upstream_cluster: outcome.upstream_cluster.clone(),
            source_workload: &traffic.source.workload,
            source_namespace: &traffic.source.namespace,
            source_principal: &traffic.source_principal,
            destination_workload: &traffic.destination.workload,
            destination_namespace: &traffic.destination.namespace,
            destination_principal: &traffic.destination_principal,
            destination_service: &traffic.service.host,
            connection_security_policy: traffic.security.as_str(),
            policy: outcome.policy.as_deref(),
        });
    }
}

/// Istio's request metrics and the flow table's edge.
fn record_metrics(
    telemetry: &Telemetry,
    labels: &RequestLabels,
    exchange: &Exchange,
    outcome: &Outcome,
    (request_bytes, request_messages): (u64, u64),
    (response_bytes, response_messages): (u64, u64),
    elapsed: std::time::Duration,
) {
    let istio = &telemetry.istio;
    let ms = elapsed.as_secs_f64() * 1000.0;
    istio.requests.get_or_create(labels).inc();
    istio.request_duration.get_or_create(labels).observe(ms);
    istio.request_bytes.get_or_create(labels).observe(request_bytes as f64);
    istio.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    if exchange.protocol == RequestProtocol::Grpc {
        istio.request_messages.get_or_create(labels).inc_by(request_messages);
        istio.response_messages.get_or_create(labels).inc_by(response_messages);
    }
    let observation = super::flows::Observation {
        protocol: exchange.protocol,
        error: labels.response_code >= 500 || outcome.flags != "-",
        duration_ms: Some(ms),
        bytes: request_bytes + response_bytes,
    };
    telemetry.flows.record(&outcome.traffic, observation);
}

/// What Envoy's spans say of a request (Istio's tags), besides its status.
fn span_attributes(exchange: &Exchange, outcome: &Outcome) -> Vec<KeyValue> {
    let traffic = &outcome.traffic;
    let mut attributes = vec![
        KeyValue::new("http.request.method", exchange.method.clone()),
        KeyValue::new("url.path", exchange.path.clone()),
        KeyValue::new("server.address", exchange.authority.clone()),
        KeyValue::new("component", "proxy"),
        KeyValue::new("istio.mesh_reporter", traffic.reporter.as_str()),
        KeyValue::new("istio.source_workload", traffic.source.workload.clone()),
        KeyValue::new("istio.destination_workload", traffic.destination.workload.clone()),
        KeyValue::new("istio.canonical_service", traffic.service.name.clone()),
        KeyValue::new("istio.namespace", traffic.service.namespace.clone()),
        KeyValue::new("peer.address", exchange.client.to_string()),
    ];
    attributes.extend(exchange.request_id.clone().map(|id| KeyValue::new("guid:x-request-id", id)));
    attributes.extend(outcome.upstream_cluster.clone().map(|c| KeyValue::new("upstream_cluster", c)));
    attributes.extend(exchange.user_agent.clone().map(|ua| KeyValue::new("user_agent.original", ua)));
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_counted_across_chunk_boundaries() {
        // Three messages: 3 bytes, 0 bytes, 300 bytes; fed one byte at a time, then all at once.
        let mut stream = vec![];
        for len in [3u32, 0, 300] {
            stream.push(0);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend(std::iter::repeat_n(7u8, len as usize));
        }
        let mut frames = GrpcFrames::default();
        let one_by_one: u64 = stream.iter().map(|b| frames.feed(std::slice::from_ref(b))).sum();
        assert_eq!(one_by_one, 3);
        assert_eq!(GrpcFrames::default().feed(&stream), 3);
        // Control: a truncated header has not started a message.
        assert_eq!(GrpcFrames::default().feed(&stream[..4]), 0);
    }
}
