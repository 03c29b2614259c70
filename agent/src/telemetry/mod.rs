//! What the agent tells of the traffic it carries, in the formats users' tools read: Istio's standard
//! metrics ([`istio`]) reported by both agents of every request and connection, JSON access logs
//! ([`access_log`]), and the workload and service names both need ([`peers`]). HTTP requests are metered
//! by [`request`], TCP connections by [`TcpMeter`].
pub mod access_log;
pub mod flows;
pub mod istio;
pub mod peers;
pub mod request;
pub mod trace;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};

use self::{
    access_log::{AccessLog, Entry},
    istio::{IstioMetrics, Reporter, SecurityPolicy, TcpLabels, Traffic},
    peers::{ServiceMeta, WorkloadMeta},
};
use crate::state::{MeshIndex, MeshTables};

/// Istio's default cluster name (`source_cluster`, `destination_cluster`).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// The agent configuration's `telemetry` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Istio's metrics and the live graph (off: neither is recorded; for measuring what they cost).
    #[serde(default = "enabled")]
    pub metrics: bool,
    /// One JSON line per request and per connection on stdout.
    #[serde(default = "enabled")]
    pub access_log: bool,
    /// The cluster's name in the metrics' `*_cluster` labels (Istio's `values.global.multiCluster.clusterName`).
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Spans over OTLP.
    #[serde(default)]
    pub tracing: trace::TracingConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { metrics: true, access_log: true, cluster: DEFAULT_CLUSTER.into(), tracing: Default::default() }
    }
}

fn enabled() -> bool {
    true
}
fn default_cluster() -> String {
    DEFAULT_CLUSTER.into()
}

pub struct Telemetry {
    /// Istio's metrics and the flow table are recorded.
    pub metrics: bool,
    pub istio: IstioMetrics,
    pub access_log: Option<AccessLog>,
    pub cluster: Arc<str>,
    /// For the principals of workloads known by name (SPIFFE IDs).
    pub trust_domain: String,
    /// `None` without a collector.
    pub tracing: Option<trace::Tracing>,
    /// The node's live service graph.
    pub flows: flows::FlowTable,
    /// HTTP requests begun and not yet ended (their response's last byte).
    pub requests_active: prometheus_client::metrics::gauge::Gauge,
}

impl Telemetry {
    /// Fails on a tracing configuration that cannot work (the field named).
    pub fn new(config: &TelemetryConfig, trust_domain: &str, node: &str) -> anyhow::Result<Telemetry> {
        Ok(Telemetry {
            metrics: config.metrics,
            istio: IstioMetrics::default(),
            access_log: config.access_log.then(AccessLog::stdout),
            cluster: config.cluster.as_str().into(),
            trust_domain: trust_domain.to_string(),
            tracing: trace::Tracing::new(&config.tracing, node)?,
            flows: flows::FlowTable::default(),
            requests_active: Default::default(),
        })
    }

    pub fn register(&self, registry: &mut Registry) {
        self.istio.register(registry);
        registry.register("warren_http_requests_active", "HTTP requests in flight (until their response's last byte)", self.requests_active.clone());
        if let Some(log) = &self.access_log {
            registry.register("warren_access_log_dropped", "Access log lines dropped (the writer fell behind)", log.dropped.clone());
        }
    }

    /// The workload at `ip`: by this version's directory, else an enrolled pod the agent knows (a mesh
    /// without a controller), else `unknown`.
    pub fn workload_at(&self, tables: &MeshTables, mesh: &RwLock<MeshIndex>, ip: &IpAddr) -> Arc<WorkloadMeta> {
        if let Some(meta) = tables.directory(&self.trust_domain).workload_at(ip) {
            return meta.clone();
        }
        let mesh = mesh.read().unwrap();
        mesh.enrolled(ip).map_or_else(WorkloadMeta::unknown, |pod| Arc::new(WorkloadMeta::of(pod, &self.trust_domain)))
    }

    /// The workload of pod `key` (`namespace/name`), as [`Telemetry::workload_at`].
    pub fn workload(&self, tables: &MeshTables, mesh: &RwLock<MeshIndex>, key: &str) -> Arc<WorkloadMeta> {
        if let Some(meta) = tables.directory(&self.trust_domain).workload(key) {
            return meta.clone();
        }
        let mesh = mesh.read().unwrap();
        mesh.pod(key).map_or_else(WorkloadMeta::unknown, |pod| Arc::new(WorkloadMeta::of(pod, &self.trust_domain)))
    }
}

/// Where a connection or request went, as the source's agent labels it.
pub struct Outbound<'a> {
    /// The source pod (`namespace/name`).
    pub pod: &'a str,
    pub service: Arc<ServiceMeta>,
    /// The endpoint chosen (`None`: the proxy answered before choosing one).
    pub endpoint: Option<IpAddr>,
    /// Over HBONE.
    pub mtls: bool,
}

/// Where a connection or request came from, as the destination's agent labels it.
pub struct Inbound<'a> {
    /// The destination pod (`namespace/name`).
    pub pod: &'a str,
    pub service: Arc<ServiceMeta>,
    pub client: IpAddr,
    /// What mTLS proved of the client (`None`: plaintext).
    pub peer: Option<&'a str>,
}

impl Telemetry {
    /// The service a client addressed at `original`: the service (or ServiceEntry) there, `unknown` for a
    /// workload addressed directly, Envoy's PassthroughCluster for an address the registry does not know.
    pub fn service_addressed(&self, tables: &MeshTables, original: &SocketAddr) -> Arc<ServiceMeta> {
        match tables.service_at(original) {
            Some(service) => tables.directory(&self.trust_domain).service(&service.key()),
            None if tables.registered(original) => ServiceMeta::unknown(),
            None => ServiceMeta::passthrough(),
        }
    }

    pub fn outbound(&self, tables: &MeshTables, mesh: &RwLock<MeshIndex>, to: Outbound<'_>) -> Traffic {
        let source = self.workload(tables, mesh, to.pod);
        let destination = to.endpoint.map_or_else(WorkloadMeta::unknown, |ip| self.workload_at(tables, mesh, &ip));
        let security = if to.mtls { SecurityPolicy::MutualTls } else { SecurityPolicy::None };
        let (source_principal, destination_principal) = Traffic::principals(security, &source, &destination);
        Traffic {
            reporter: Reporter::Source,
            source,
            source_principal,
            destination,
            destination_principal,
            service: to.service,
            cluster: self.cluster.clone(),
            security,
        }
    }

    pub fn inbound(&self, tables: &MeshTables, mesh: &RwLock<MeshIndex>, from: Inbound<'_>) -> Traffic {
        let source = self.workload_at(tables, mesh, &from.client);
        let destination = self.workload(tables, mesh, from.pod);
        let (security, source_principal, destination_principal) = match from.peer {
            Some(peer) => (SecurityPolicy::MutualTls, peer.into(), destination.principal.clone()),
            None => (SecurityPolicy::None, peers::UNKNOWN.into(), peers::UNKNOWN.into()),
        };
        Traffic {
            reporter: Reporter::Destination,
            source,
            source_principal,
            destination,
            destination_principal,
            service: from.service,
            cluster: self.cluster.clone(),
            security,
        }
    }
}

/// What a TCP connection is reported as: its labels, and the address its client addressed (a service
/// VIP, or the workload's own).
#[derive(Clone, Debug)]
pub struct TcpReport {
    pub traffic: Traffic,
    pub addressed: SocketAddr,
}

/// One TCP connection's Istio metrics and access log line: opened when created, bytes counted as they
/// flow (through [`TcpMeter::sent`] / [`TcpMeter::received`]), closed and logged by [`TcpMeter::close`].
pub struct TcpMeter {
    telemetry: Arc<Telemetry>,
    traffic: Traffic,
    addressed: SocketAddr,
    pub sent: Counter,
    pub received: Counter,
    started: Instant,
    start_time: SystemTime,
}

impl TcpMeter {
    pub fn open(telemetry: &Arc<Telemetry>, report: TcpReport) -> TcpMeter {
        let labels = TcpLabels { traffic: report.traffic, flags: "-" };
        let istio = &telemetry.istio;
        let (sent, received) = if telemetry.metrics {
            istio.tcp_opened.get_or_create(&labels).inc();
            (istio.tcp_sent.get_or_create(&labels).clone(), istio.tcp_received.get_or_create(&labels).clone())
        } else {
            Default::default()
        };
        TcpMeter {
            telemetry: telemetry.clone(),
            traffic: labels.traffic,
            addressed: report.addressed,
            sent,
            received,
            started: Instant::now(),
            start_time: SystemTime::now(),
        }
    }

    /// `flags`: `-`, or Envoy's `UF` (the upstream could not be reached), `UR` (reset midway)…
    pub fn close(self, flags: &'static str, client: SocketAddr, upstream: SocketAddr, bytes: (u64, u64)) {
        let labels = TcpLabels { traffic: self.traffic, flags };
        if self.telemetry.metrics {
            self.telemetry.istio.tcp_closed.get_or_create(&labels).inc();
            let observation = flows::Observation { protocol: istio::RequestProtocol::Tcp, error: flags != "-", duration_ms: None, bytes: bytes.0 + bytes.1 };
            self.telemetry.flows.record(&labels.traffic, observation);
        }
        let Some(log) = &self.telemetry.access_log else { return };
        let traffic = &labels.traffic;
        log.write(&Entry {
            start_time: access_log::timestamp(self.start_time),
            reporter: traffic.reporter.as_str(),
            protocol: "TCP",
            method: None,
            path: None,
            authority: None,
            response_code: 0,
            grpc_status: None,
            response_flags: flags,
            response_code_details: None,
            bytes_received: bytes.0,
            bytes_sent: bytes.1,
            duration: self.started.elapsed().as_millis() as u64,
            user_agent: None,
            request_id: None,
            x_forwarded_for: None,
            traceparent: None,
            downstream_remote_address: client.to_string(),
            downstream_local_address: self.addressed.to_string(),
            upstream_host: Some(upstream.to_string()),
            upstream_cluster: None,
            source_workload: &traffic.source.workload,
            source_namespace: &traffic.source.namespace,
            source_principal: &traffic.source_principal,
            destination_workload: &traffic.destination.workload,
            destination_namespace: &traffic.destination.namespace,
            destination_principal: &traffic.destination_principal,
            destination_service: &traffic.service.host,
            connection_security_policy: traffic.security.as_str(),
            policy: None,
        });
    }
}
