//! Istio's standard metrics, named, typed and labelled as Istio documents them (so Istio's Grafana
//! dashboards and Kiali read them unchanged): `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_request_messages_total`,
//! `istio_response_messages_total` (gRPC), `istio_tcp_{sent,received}_bytes_total`,
//! `istio_tcp_connections_{opened,closed}_total`. Every series carries every label (`unknown` where a
//! value cannot be known, as Istio writes it). Cardinality is bounded by workloads × services × response
//! codes × flags: no per-connection, per-path or per-address label.
use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::peers::{ServiceMeta, WorkloadMeta};

/// Envoy's default histogram buckets, which Istio's histograms use (milliseconds and bytes alike).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The agent of the workload that sent the request.
    Source,
    /// The agent of the workload that received it.
    Destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    Http,
    Grpc,
    Tcp,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// Carried over HBONE (mTLS with both identities proven).
    MutualTls,
    None,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
            RequestProtocol::Tcp => "tcp",
        }
    }
}

impl SecurityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

/// Who talked to whom, as one reporter saw it: the labels every Istio metric shares.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Traffic {
    pub reporter: Reporter,
    pub source: Arc<WorkloadMeta>,
    /// What mTLS proved of the source (`unknown` in plaintext).
    pub source_principal: Arc<str>,
    pub destination: Arc<WorkloadMeta>,
    pub destination_principal: Arc<str>,
    pub service: Arc<ServiceMeta>,
    /// The cluster both ends are in (`source_cluster`, `destination_cluster`).
    pub cluster: Arc<str>,
    pub security: SecurityPolicy,
}

impl Traffic {
    /// Principals are only what mTLS proves: `unknown` over plaintext.
    pub fn principals(security: SecurityPolicy, source: &Arc<WorkloadMeta>, destination: &Arc<WorkloadMeta>) -> (Arc<str>, Arc<str>) {
        match security {
            SecurityPolicy::MutualTls => (source.principal.clone(), destination.principal.clone()),
            SecurityPolicy::None => (super::peers::UNKNOWN.into(), super::peers::UNKNOWN.into()),
        }
    }

    fn encode_into(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (s, d, svc) = (&self.source, &self.destination, &self.service);
        let pairs: [(&str, &str); 20] = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &s.workload),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_cluster", &self.cluster),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_service", &svc.host),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_service_name", &svc.name),
            ("destination_service_namespace", &svc.namespace),
            ("destination_cluster", &self.cluster),
        ];
        for pair in pairs {
            pair.encode(encoder.encode_label())?;
        }
        ("connection_security_policy", self.security.as_str()).encode(encoder.encode_label())
    }
}

/// The labels of an HTTP or gRPC request's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub traffic: Traffic,
    pub protocol: RequestProtocol,
    pub response_code: u16,
    /// `grpc-status` of a gRPC response (`None`: not gRPC, or the stream ended without one).
    pub grpc_status: Option<u32>,
    /// Envoy's response flags, `-` for none.
    pub flags: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.traffic.encode_into(encoder)?;
        ("request_protocol", self.protocol.as_str()).encode(encoder.encode_label())?;
        ("response_code", self.response_code).encode(encoder.encode_label())?;
        let grpc = self.grpc_status.map(|s| s.to_string());
        ("grpc_response_status", grpc.as_deref().unwrap_or(super::peers::UNKNOWN)).encode(encoder.encode_label())?;
        ("response_flags", self.flags).encode(encoder.encode_label())
    }
}

/// The labels of a TCP connection's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub traffic: Traffic,
    pub flags: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.traffic.encode_into(encoder)?;
        ("request_protocol", RequestProtocol::Tcp.as_str()).encode(encoder.encode_label())?;
        ("response_flags", self.flags).encode(encoder.encode_label())
    }
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct IstioMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
    pub request_messages: Family<RequestLabels, Counter>,
    pub response_messages: Family<RequestLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
}

impl Default for IstioMetrics {
    fn default() -> Self {
        IstioMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(histogram),
            request_bytes: Family::new_with_constructor(histogram),
            response_bytes: Family::new_with_constructor(histogram),
            request_messages: Family::default(),
            response_messages: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
        }
    }
}

impl IstioMetrics {
    /// Registers under Istio's names (prometheus-client adds `_total` to counters itself).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("istio_requests", "Requests, counted when the response ends", self.requests.clone());
        registry.register_with_unit(
            "istio_request_duration",
            "Time from the request's first byte to the response's last",
            Unit::Other("milliseconds".into()),
            self.request_duration.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", self.request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", self.response_bytes.clone());
        registry.register("istio_request_messages", "gRPC messages the client sent", self.request_messages.clone());
        registry.register("istio_response_messages", "gRPC messages the server sent", self.response_messages.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes from the client to the server, counted as they flow", self.tcp_sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes from the server to the client, counted as they flow",
            self.tcp_received.clone(),
        );
        registry.register("istio_tcp_connections_opened", "TCP connections opened", self.tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", self.tcp_closed.clone());
    }
}
