//! An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) in the test process: the collector the
//! agents export their spans to, keeping every span it is sent.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// One span as received, ids in hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `client`, `server`, …
    pub kind: &'static str,
    /// The exporting resource's attributes (`service.name`, `host.name`).
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
}

pub struct OtlpReceiver {
    pub address: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    /// Listens on a free loopback port of the test process' netns, on a thread of its own.
    pub fn start() -> Result<OtlpReceiver> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let kept = spans.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::spawn(move || runtime.block_on(serve(listener, kept)));
        Ok(OtlpReceiver { address, spans })
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

async fn serve(listener: std::net::TcpListener, spans: Arc<Mutex<Vec<ReceivedSpan>>>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    while let Ok((stream, _)) = listener.accept().await {
        let spans = spans.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| receive(request, spans.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn receive(request: Request<Incoming>, spans: Arc<Mutex<Vec<ReceivedSpan>>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match request.into_body().collect().await.map(|b| ExportTraceServiceRequest::decode(b.to_bytes())) {
        Ok(Ok(export)) => {
            spans.lock().unwrap().extend(received(export));
            StatusCode::OK
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/x-protobuf"));
    Ok(response)
}

fn received(export: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};
    let text = |attributes: &[KeyValue]| -> BTreeMap<String, String> {
        let value = |kv: &KeyValue| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        };
        attributes.iter().map(|kv| (kv.key.clone(), value(kv))).collect()
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = vec![];
    for resource_spans in export.resource_spans {
        let resource = resource_spans.resource.map(|r| text(&r.attributes)).unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            let kind = match span.kind {
                1 => "internal",
                2 => "server",
                3 => "client",
                4 => "producer",
                5 => "consumer",
                _ => "unspecified",
            };
            out.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name.clone(),
                kind,
                resource: resource.clone(),
                attributes: text(&span.attributes),
            });
        }
    }
    out
}
