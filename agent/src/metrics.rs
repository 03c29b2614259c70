//! The agent's Prometheus metrics (served at /metrics on the admin address).
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;
use warren_maps::Counter as EbpfEvent;

use crate::{
    ebpf::{EbpfCounters, MapSizes},
    identity::Certificates,
    proxy::ConnectionTable,
    sources::controller::PushStatus,
    state::MeshTables,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// One HTTP request's outcome, as Istio's `istio_requests_total` labels it (the full label set is the
/// telemetry work's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequestLabels {
    pub direction: &'static str,
    pub response_code: u16,
    /// Envoy's response flags (`-` for none; `FI` fault abort, `UT` timeout, `NR` no route…).
    pub response_flags: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    /// HTTP requests the L7 proxy answered, by status and response flag.
    pub http_requests: Family<HttpRequestLabels, Counter>,
    pub connections_opened: Family<DirectionLabels, Counter>,
    pub connections_closed: Family<DirectionLabels, Counter>,
    pub connections_failed: Family<DirectionLabels, Counter>,
    pub active_connections: Family<DirectionLabels, Gauge>,
    /// Bytes from the workload that opened the connection to its peer.
    pub sent_bytes: Family<DirectionLabels, Counter>,
    /// Bytes from the peer back to the workload.
    pub received_bytes: Family<DirectionLabels, Counter>,
    /// Accepted connections whose original destination was not in the map (not forwarded).
    pub original_dst_missing: Counter,
    /// HBONE connections whose mTLS handshake failed (untrusted, expired or foreign certificate…).
    pub mtls_refused: Counter,
    /// Plaintext connections refused by PeerAuthentication STRICT.
    pub plaintext_refused: Counter,
    /// Inbound connections the agent refused by AuthorizationPolicy (HBONE, and plaintext the kernel did not
    /// refuse already: those count in the eBPF events).
    pub policy_refused: Counter,
    /// Outbound connections to a service address with no endpoint to route to.
    pub no_endpoint: Counter,
    /// Outbound connections refused by `outboundTrafficPolicy: REGISTRY_ONLY` (the destination is unknown).
    pub registry_only_refused: Counter,
    /// Gateway connections refused: no server for the SNI, a TLS handshake that failed, a server that
    /// cannot be served as written.
    pub gateway_refused: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "warren_http_requests",
            "HTTP requests the L7 proxy answered, by response code and Envoy response flag",
            self.http_requests.clone(),
        );
        registry.register(
            "warren_tcp_connections_opened",
            "TCP connections the agent proxied",
            self.connections_opened.clone(),
        );
        registry.register("warren_tcp_connections_closed", "TCP connections closed", self.connections_closed.clone());
        registry.register(
            "warren_tcp_connections_failed",
            "TCP connections that could not reach their destination",
            self.connections_failed.clone(),
        );
        registry.register("warren_tcp_active_connections", "TCP connections open now", self.active_connections.clone());
        registry.register("warren_tcp_sent_bytes", "Bytes proxied from client to server", self.sent_bytes.clone());
        registry.register(
            "warren_tcp_received_bytes",
            "Bytes proxied from server to client",
            self.received_bytes.clone(),
        );
        registry.register(
            "warren_hbone_mtls_refused",
            "HBONE connections refused in the mTLS handshake",
            self.mtls_refused.clone(),
        );
        registry.register(
            "warren_inbound_plaintext_refused",
            "Plaintext connections refused by PeerAuthentication STRICT",
            self.plaintext_refused.clone(),
        );
        registry.register(
            "warren_inbound_policy_refused",
            "Inbound connections refused by AuthorizationPolicy",
            self.policy_refused.clone(),
        );
        registry.register(
            "warren_outbound_no_endpoint",
            "Connections to a service address that had no endpoint to route to",
            self.no_endpoint.clone(),
        );
        registry.register(
            "warren_outbound_registry_only_refused",
            "Outbound connections refused by outboundTrafficPolicy REGISTRY_ONLY",
            self.registry_only_refused.clone(),
        );
        registry.register(
            "warren_gateway_refused",
            "Gateway connections refused (no server for the host, TLS handshake failed, server refused as written)",
            self.gateway_refused.clone(),
        );
        registry.register(
            "warren_original_dst_missing",
            "Redirected connections whose original destination was not recorded",
            self.original_dst_missing.clone(),
        );
    }
}

/// Exposes the eBPF programs' counters, read from the per-CPU map at scrape time.
#[derive(Debug)]
pub struct EbpfEventsCollector(pub EbpfCounters);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

impl Collector for EbpfEventsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "warren_ebpf_events",
            "Events counted by Warren's eBPF programs",
            None,
            MetricType::Counter,
        )?;
        for event in EbpfEvent::ALL {
            let labels = EventLabels { event: event.name() };
            ConstCounter::new(self.0.get(event)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The registry in Prometheus' text format (0.0.4), as Envoy's `/stats/prometheus` serves it and
/// `promtool check metrics` reads it ([`warren_api::exposition`]).
pub fn prometheus_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut open_metrics = String::new();
    prometheus_client::encoding::text::encode(&mut open_metrics, registry)?;
    Ok(warren_api::exposition::open_metrics_to_prometheus(&open_metrics))
}

/// The agent's state, read at scrape time: how full the eBPF maps holding the controller's tables are,
/// the tables' version and the push stream, the workload certificates' expiry, open proxy connections.
pub struct AgentStateCollector {
    pub maps: Arc<MapSizes>,
    pub tables: watch::Sender<Arc<MeshTables>>,
    pub push: Option<Arc<Mutex<PushStatus>>>,
    pub certificates: Option<Arc<Certificates>>,
    pub connections: ConnectionTable,
}

impl std::fmt::Debug for AgentStateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentStateCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for AgentStateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let fill = self.maps.fill();
        let mut entries = encoder.encode_descriptor("warren_ebpf_map_entries", "Entries the agent wrote to the map", None, MetricType::Gauge)?;
        for (map, count, _) in fill {
            ConstGauge::new(count as i64).encode(entries.encode_family(&MapLabels { map })?)?;
        }
        let mut ratio = encoder.encode_descriptor("warren_ebpf_map_fill_ratio", "Entries over the map's capacity", None, MetricType::Gauge)?;
        for (map, count, capacity) in fill {
            ConstGauge::new(count as f64 / f64::from(capacity)).encode(ratio.encode_family(&MapLabels { map })?)?;
        }
        let version = self.tables.borrow().version as f64;
        gauge(&mut encoder, "warren_config_version", "Version of the tables in force (the controller's)", version)?;
        if let Some(push) = &self.push {
            let status = push.lock().unwrap().clone();
            gauge(&mut encoder, "warren_push_connected", "1 while the push stream to the controller is open", f64::from(u8::from(status.connected)))?;
            let applied = status.applied_at_unix_ms as f64 / 1000.0;
            gauge(&mut encoder, "warren_push_last_applied_timestamp_seconds", "When the last pushed update took effect (Unix time)", applied)?;
            let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
                ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
            };
            counter(&mut encoder, "warren_push_updates_applied", "Pushed updates applied (ACKed)", status.updates_applied)?;
            counter(&mut encoder, "warren_push_updates_refused", "Pushed updates refused (NACKed)", status.updates_refused)?;
        }
        if let Some(certificates) = &self.certificates {
            let mut expiry = encoder.encode_descriptor(
                "warren_certificate_expiry_timestamp_seconds",
                "When each workload certificate the agent holds expires (Unix time; one per identity on the node)",
                None,
                MetricType::Gauge,
            )?;
            for info in certificates.snapshot() {
                ConstGauge::new(info.not_after_unix as i64).encode(expiry.encode_family(&IdentityLabels { identity: info.identity })?)?;
            }
        }
        let open = self.connections.open_count() as f64;
        gauge(&mut encoder, "warren_proxy_connections_open", "Connections the proxy carries now (L4 and L7)", open)
    }
}
