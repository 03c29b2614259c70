//! Distributed tracing: a client span in the source's agent and a server span in the destination's for
//! every sampled request, exported over OTLP/HTTP to the configured collector (the SDK's batch thread).
//! Trace context is read from W3C `traceparent`/`tracestate` or B3 (multi-header `x-b3-*` or single
//! `b3`), and passed on in `traceparent` — and in the B3 form the request came with — naming the agent's
//! span as the parent, so the next hop's spans are its children. Sampling is Istio's: the parent's
//! decision when there is one, else `samplingPercent` (1 % by default).
use std::time::Duration;

use anyhow::{Context as _, Result};
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span},
};
use serde::{Deserialize, Serialize};

/// The agent configuration's `telemetry.tracing`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/HTTP collector (`http://otel-collector.observability:4318`; `/v1/traces` is added when the
    /// URL has no path). None: no spans (trace headers still pass through untouched).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Requests without a sampled parent that start a trace, in percent (Istio's default: 1).
    #[serde(default = "default_sampling")]
    pub sampling_percent: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig { endpoint: None, sampling_percent: default_sampling() }
    }
}

fn default_sampling() -> f64 {
    1.0
}

/// How often the batch processor sends what it has (the SDK's default is 5 s).
const EXPORT_EVERY: Duration = Duration::from_secs(1);

pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// `None` without an endpoint. Fails on an endpoint that is not a URL or a sampling rate out of range.
    pub fn new(config: &TracingConfig, node: &str) -> Result<Option<Tracing>> {
        let Some(endpoint) = &config.endpoint else { return Ok(None) };
        let percent = config.sampling_percent;
        anyhow::ensure!((0.0..=100.0).contains(&percent), "telemetry.tracing.samplingPercent: {percent} is not within 0..=100");
        let url = traces_url(endpoint)?;
        // The blocking HTTP client may not be built on an async runtime's thread.
        let exporter = std::thread::spawn(move || opentelemetry_otlp::SpanExporter::builder().with_http().with_endpoint(url).build())
            .join()
            .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))?
            .context("telemetry.tracing.endpoint: building the OTLP exporter")?;
        let batch = BatchConfigBuilder::default().with_scheduled_delay(EXPORT_EVERY).build();
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
        let resource = Resource::builder().with_service_name("warren-agent").with_attribute(KeyValue::new("host.name", node.to_string())).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(percent / 100.0))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("warren-agent");
        Ok(Some(Tracing { provider, tracer }))
    }

    /// Starts the agent's span for a request whose headers carry (or not) a parent, and rewrites them to
    /// name the new span as the parent of what follows.
    pub fn start(&self, headers: &mut HeaderMap, kind: SpanKind, name: String) -> Span {
        let (parent, b3) = extract(headers);
        let span = self.tracer.span_builder(name).with_kind(kind).start_with_context(&self.tracer, &parent);
        inject(headers, span.span_context(), parent.span().span_context(), b3);
        span
    }

    /// Sends what is buffered (at shutdown).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// `http://host:4318` → `http://host:4318/v1/traces`; a URL with a path is taken as written.
fn traces_url(endpoint: &str) -> Result<String> {
    let uri: http::Uri = endpoint.parse().with_context(|| format!("telemetry.tracing.endpoint: {endpoint:?} is not a URL"))?;
    anyhow::ensure!(
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some(),
        "telemetry.tracing.endpoint: {endpoint:?} is not an http(s) URL"
    );
    Ok(match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    })
}

/// Ends `span` with the request's outcome.
pub fn finish(mut span: Span, code: u16, flags: &'static str, attributes: Vec<KeyValue>) {
    span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
    span.set_attribute(KeyValue::new("response_flags", flags));
    for attribute in attributes {
        span.set_attribute(attribute);
    }
    if code >= 500 || flags != "-" {
        span.set_status(Status::error(flags));
    }
    span.end();
}

/// Which B3 form the request carried, to answer in kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum B3 {
    Multi,
    Single,
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// The parent the headers name: W3C first, else B3.
fn extract(headers: &HeaderMap) -> (Context, Option<B3>) {
    let w3c = TraceContextPropagator::new().extract(&Headers(headers));
    if w3c.span().span_context().is_valid() {
        return (w3c, None);
    }
    match b3_parent(headers) {
        Some((parent, form)) => (Context::new().with_remote_span_context(parent), Some(form)),
        None => (Context::new(), None),
    }
}

fn b3_parent(headers: &HeaderMap) -> Option<(SpanContext, B3)> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = get("b3") {
        let mut parts = single.split('-');
        let (trace, span) = (parts.next()?, parts.next()?);
        let sampled = matches!(parts.next(), Some("1" | "d"));
        return Some((remote(trace, span, sampled)?, B3::Single));
    }
    let sampled = matches!(get("x-b3-sampled"), Some("1" | "true")) || get("x-b3-flags") == Some("1");
    Some((remote(get("x-b3-traceid")?, get("x-b3-spanid")?, sampled)?, B3::Multi))
}

/// A remote parent from B3's hex ids (a 64-bit trace id is padded to 128 bits, as B3 specifies).
fn remote(trace: &str, span: &str, sampled: bool) -> Option<SpanContext> {
    let trace = TraceId::from_hex(&format!("{trace:0>32}")).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

/// `traceparent` (and `tracestate`) for the agent's span; the B3 form the request came with, too.
fn inject(headers: &mut HeaderMap, span: &SpanContext, parent: &SpanContext, b3: Option<B3>) {
    let context = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
    let sampled = if span.is_sampled() { "1" } else { "0" };
    let value = |text: String| HeaderValue::from_str(&text).expect("hex ids");
    match b3 {
        Some(B3::Single) => {
            let text = format!("{}-{}-{sampled}-{}", span.trace_id(), span.span_id(), parent.span_id());
            headers.insert("b3", value(text));
        }
        Some(B3::Multi) => {
            headers.insert("x-b3-traceid", value(span.trace_id().to_string()));
            headers.insert("x-b3-spanid", value(span.span_id().to_string()));
            headers.insert("x-b3-parentspanid", value(parent.span_id().to_string()));
            headers.insert("x-b3-sampled", HeaderValue::from_static(if span.is_sampled() { "1" } else { "0" }));
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn parents_are_read_from_w3c_then_b3() {
        let w3c = headers(&[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]);
        let (cx, form) = extract(&w3c);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(cx.span().span_context().is_sampled() && form.is_none());
        let multi = headers(&[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "a2fb4a1d1a96d312"), ("x-b3-sampled", "1")]);
        let (cx, form) = extract(&multi);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "0000000000000000463ac35c9f6413ad");
        assert_eq!(form, Some(B3::Multi));
        let single = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]);
        let (cx, form) = extract(&single);
        assert!(!cx.span().span_context().is_sampled() && form == Some(B3::Single));
        // Control: malformed or absent context is no parent.
        for bad in [headers(&[("traceparent", "00-zz-b7ad6b7169203331-01")]), headers(&[("b3", "1")]), headers(&[])] {
            assert!(!extract(&bad).0.span().span_context().is_valid());
        }
    }

    #[test]
    fn the_agents_span_is_passed_on_as_the_parent_in_every_form_received() {
        let span = remote("0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7", true).unwrap();
        let parent = remote("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", true).unwrap();
        let mut multi = HeaderMap::new();
        inject(&mut multi, &span, &parent, Some(B3::Multi));
        assert_eq!(multi["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01");
        assert_eq!((multi["x-b3-spanid"].to_str().unwrap(), multi["x-b3-parentspanid"].to_str().unwrap()), ("00f067aa0ba902b7", "b7ad6b7169203331"));
        let mut single = HeaderMap::new();
        inject(&mut single, &span, &parent, Some(B3::Single));
        assert_eq!(single["b3"], "0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-1-b7ad6b7169203331");
        assert!(!single.contains_key("x-b3-traceid"));
    }

    #[test]
    fn endpoints_get_the_traces_path_when_they_have_none() {
        assert_eq!(traces_url("http://collector:4318").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/custom").unwrap(), "http://collector:4318/custom");
        assert!(traces_url("collector:4318").is_err() && traces_url("ftp://x").is_err());
    }
}
