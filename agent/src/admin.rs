//! Admin endpoint: `/metrics` (Prometheus), `/connections`, `/workloads`, `/certificates`, `/config` (the
//! pushed tables), `/policies` and `/graph` (the live service graph; JSON), `/ready`.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{
    identity::Certificates,
    inpod::PodStatus,
    proxy::{ConnectionTable, authz::Authorizer},
    sources::controller::PushStatus,
    state::MeshTables,
};

pub struct AdminState {
    pub registry: Arc<Registry>,
    pub connections: ConnectionTable,
    pub workloads: Arc<Mutex<Vec<PodStatus>>>,
    pub certificates: Option<Arc<Certificates>>,
    pub tables: tokio::sync::watch::Sender<Arc<MeshTables>>,
    pub authorizer: Arc<Authorizer>,
    /// `None` unless the controller is the workload source.
    pub push: Option<Arc<Mutex<PushStatus>>>,
    pub node: String,
    /// The flow table `/graph` draws.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Endpoint health and pool state, `/endpoints`.
    pub clusters: Arc<crate::resilience::cluster::Clusters>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the admin endpoint on {addr}"))
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The Prometheus scrape endpoint (Istio's 15020): `/metrics` and `/stats/prometheus` in Prometheus' text
/// format, `/healthz/ready`.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = match req.uri().path() {
                    "/metrics" | "/stats/prometheus" => match crate::metrics::prometheus_text(&registry) {
                        Ok(text) => (StatusCode::OK, warren_api::exposition::PROMETHEUS_TEXT, text),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n")),
                    },
                    "/healthz/ready" => (StatusCode::OK, "text/plain", "ready\n".to_string()),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "endpoints: /metrics /stats/prometheus /healthz/ready\n".to_string()),
                };
                std::future::ready(Ok::<_, Infallible>(plain(answer)))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn plain((status, content_type, body): (StatusCode, &'static str, String)) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn handle(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/ready" => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n")),
            }
        }
        "/connections" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.connections.snapshot()).unwrap_or_default(),
        ),
        "/workloads" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&*state.workloads.lock().unwrap()).unwrap_or_default(),
        ),
        "/certificates" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.certificates.as_ref().map(|c| c.snapshot()).unwrap_or_default())
                .unwrap_or_default(),
        ),
        "/config" => {
            let tables = state.tables.borrow().clone();
            let mut view = tables.view();
            view["push"] =
                serde_json::to_value(state.push.as_ref().map(|p| p.lock().unwrap().clone())).unwrap_or_default();
            (StatusCode::OK, "application/json", serde_json::to_string_pretty(&view).unwrap_or_default())
        }
        "/graph" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.telemetry.flows.graph(&state.node)).unwrap_or_default(),
        ),
        "/endpoints" => {
            let tables = state.tables.borrow().clone();
            let locality = tables.node_locality(&state.node);
            let clusters = state.clusters.view(locality.as_ref());
            let view = warren_api::admin::EndpointsView { version: tables.version, clusters };
            (StatusCode::OK, "application/json", serde_json::to_string_pretty(&view).unwrap_or_default())
        }
        "/policies" => {
            let tables = state.tables.borrow().clone();
            let view = tables.policies_view(&state.node, &state.authorizer.hits());
            (StatusCode::OK, "application/json", serde_json::to_string_pretty(&view).unwrap_or_default())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /ready /metrics /connections /workloads /certificates /config /policies /graph /endpoints\n".to_string(),
        ),
    };
    Ok(plain((status, content_type, body)))
}
